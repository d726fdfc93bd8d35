"""The video encoder: a ViT over tubelet tokens (mae's ``models_vit``, V-JEPA's encoder), its configuration
and size presets, pixels <-> tokens, the token geometry and the masks it reads.

Written for mgfm from the published recipe (tubelet embedding, fixed sinusoid positions); no code from the
CC BY-NC reference repositories.

Layout conventions
------------------
* A video is ``(B, T, C, H, W)`` float, ImageNet-normalised (the Hugging Face ``pixel_values`` layout).
* A clip becomes ``N = (T / tubelet) * (H / patch) * (W / patch)`` tokens ordered ``(t, h, w)`` with ``t``
  outermost, the order of :mod:`mgfm.data.masking` and of ``transformers.VideoMAEModel``.
* A token's pixels (a "patch vector") are flattened in the order ``(C, tubelet, patch, patch)``, which is the
  order of a ``Conv3d`` kernel, so the patch embedding is a plain ``Linear`` on gathered patch vectors (only
  visible tokens are ever embedded) and converts to the Hugging Face ``Conv3d`` weight by a reshape.
* Position embeddings: :func:`mgfm.model.layers.position_table`. An encoder used at another clip length or
  crop size either refuses or resamples its trained table over ``(t, h, w)`` (:func:`at_geometry`,
  ``pos_embed=error|interpolate``).
* Masks (see :mod:`mgfm.data.masking`): ``encoder_mask`` bool ``(B, N)``, True = hidden from the encoder,
  the same count in every sample; ``decoder_mask`` bool ``(B, N)``, True = a masked token the decoder
  reconstructs (a subset of ``encoder_mask``, the same count in every sample). Without decoder masking
  pass ``decoder_mask=None`` (= ``encoder_mask``).

The masked-video objective that trains it lives in :mod:`mgfm.model.masked`; its Hugging Face I/O in
:mod:`mgfm.model.hf`.
"""

from __future__ import annotations

import dataclasses
import logging
from dataclasses import dataclass, fields

import torch
from torch import nn

from mgfm.config import bounded
from mgfm.data.masking import TokenGrid
from mgfm.data.transforms import IMAGENET_MEAN, IMAGENET_STD
from mgfm.errors import MgfmError
from mgfm.model.layers import Block, LearnedPositions, gather_tokens, init_weights, position_table, run_blocks

log = logging.getLogger(__name__)


#: Standard widths. ``tiny`` is the CPU default; S/B/L/H are the published ViT sizes with the VideoMAE
#: decoder widths (4 blocks). ``img_size``/``frames`` are defaults only; a recipe may override them.
SIZES: dict[str, dict[str, int]] = {
    "tiny": dict(dim=192, depth=4, heads=3, decoder_dim=96, decoder_depth=2, decoder_heads=3,
                 img_size=112, frames=16),
    "S": dict(dim=384, depth=12, heads=6, decoder_dim=192, decoder_depth=4, decoder_heads=3,
              img_size=224, frames=16),
    "B": dict(dim=768, depth=12, heads=12, decoder_dim=384, decoder_depth=4, decoder_heads=6,
              img_size=224, frames=16),
    "L": dict(dim=1024, depth=24, heads=16, decoder_dim=512, decoder_depth=4, decoder_heads=8,
              img_size=224, frames=16),
    "H": dict(dim=1280, depth=32, heads=16, decoder_dim=640, decoder_depth=4, decoder_heads=8,
              img_size=224, frames=16),
}
CUSTOM = "custom"


@dataclass
class ModelConfig:
    """Geometry and widths of the encoder and decoder (the mask ratio lives with the data, the pretraining
    loss terms in :class:`LossConfig`).

    ``size`` picks a preset from :data:`SIZES`; any of the preset fields left ``None`` is filled from it,
    any given explicitly wins. ``size="custom"`` needs every width given. ``final_norm`` applies a
    LayerNorm to the encoder's output tokens (VideoMAE pretraining; saved as Hugging Face
    ``use_mean_pooling=False``). ``pixel_mean``/``pixel_std`` describe how the input was normalised; the
    pixel target is computed on un-normalised pixels.
    """

    size: str = "tiny"
    img_size: int | None = bounded(None, ge=1)
    frames: int | None = bounded(None, ge=1)
    tubelet: int = bounded(2, ge=1)
    patch: int = bounded(16, ge=1)
    channels: int = bounded(3, ge=1)
    dim: int | None = bounded(None, ge=1)
    depth: int | None = bounded(None, ge=1)
    heads: int | None = bounded(None, ge=1)
    mlp_ratio: float = bounded(4.0, gt=0)
    decoder_dim: int | None = bounded(None, ge=1)
    decoder_depth: int | None = bounded(None, ge=1)
    decoder_heads: int | None = bounded(None, ge=1)
    decoder_mlp_ratio: float = bounded(4.0, gt=0)
    drop_path: float = bounded(0.0, ge=0, lt=1)
    layer_norm_eps: float = bounded(1e-6, gt=0)
    qv_bias: bool = True
    final_norm: bool = True
    norm_pix_loss: bool = True
    pixel_mean: tuple[float, ...] = bounded(IMAGENET_MEAN, ge=0, le=1)
    pixel_std: tuple[float, ...] = bounded(IMAGENET_STD, gt=0)
    grad_checkpointing: bool = False
    # The (t, h, w) token grid the encoder's position table was trained on, when it differs from this
    # config's own grid: that table resampled over (t, h, w) (see position_table and at_geometry). None = own.
    pos_grid: tuple[int, int, int] | None = bounded(None, ge=1)
    # A trained position table (VideoMAE's use_learnable_pos_emb), started from the sinusoid table and kept at
    # the grid it was trained on (pos_grid), resampled over (t, h, w) on use; False = the fixed sinusoid table.
    learned_pos: bool = False

    def __post_init__(self) -> None:
        size = self.size.upper() if self.size.lower() in ("s", "b", "l", "h") else self.size
        if size != CUSTOM and size not in SIZES:
            raise ValueError(f"model.size: expected one of {[*SIZES, CUSTOM]}, got {self.size!r}")
        self.size = size
        preset = SIZES.get(size, {})
        names = ("img_size", "frames", "dim", "depth", "heads", "decoder_dim", "decoder_depth", "decoder_heads")
        missing = [f"model.{n}" for n in names if getattr(self, n) is None and n not in preset]
        if missing:
            raise ValueError(f"{', '.join(missing)}: required when model.size is {CUSTOM!r}")
        for name in names:
            if getattr(self, name) is None:
                setattr(self, name, preset[name])
        self.pixel_mean = tuple(float(v) for v in self.pixel_mean)
        self.pixel_std = tuple(float(v) for v in self.pixel_std)
        self._validate()
        if self.pos_grid is not None:
            self.pos_grid = tuple(int(v) for v in self.pos_grid)
            if len(self.pos_grid) != 3 or min(self.pos_grid) < 1:
                raise ValueError(f"model.pos_grid: expected 3 positive token counts (t, h, w), got {self.pos_grid}")
            if self.pos_grid == self.grid_shape:
                self.pos_grid = None

    def _validate(self) -> None:
        for name in ("img_size", "frames", "tubelet", "patch", "channels", "dim", "depth", "heads",
                     "decoder_dim", "decoder_depth", "decoder_heads"):
            if getattr(self, name) <= 0:
                raise ValueError(f"model.{name}: expected a positive integer, got {getattr(self, name)}")
        if self.frames % self.tubelet:
            raise ValueError(f"model.frames: {self.frames} is not a multiple of model.tubelet={self.tubelet}")
        if self.img_size % self.patch:
            raise ValueError(f"model.img_size: {self.img_size} is not a multiple of model.patch={self.patch}")
        if self.dim % self.heads:
            raise ValueError(f"model.dim: {self.dim} is not divisible by model.heads={self.heads}")
        if self.decoder_dim % self.decoder_heads:
            raise ValueError(f"model.decoder_dim: {self.decoder_dim} is not divisible by "
                             f"model.decoder_heads={self.decoder_heads}")
        if not 0.0 <= self.drop_path < 1.0:
            raise ValueError(f"model.drop_path: expected a rate in [0, 1), got {self.drop_path}")
        for name in ("pixel_mean", "pixel_std"):
            if len(getattr(self, name)) != self.channels:
                raise ValueError(f"model.{name}: expected {self.channels} values (one per channel), "
                                 f"got {len(getattr(self, name))}")
        if any(s <= 0 for s in self.pixel_std):
            raise ValueError(f"model.pixel_std: expected positive values, got {self.pixel_std}")

    @property
    def grid(self) -> TokenGrid:
        """Token grid ``(T/tubelet, H/patch, W/patch)`` of one clip."""
        return TokenGrid.for_clip(self.frames, self.img_size, self.img_size, self.tubelet, self.patch)

    @property
    def grid_shape(self) -> tuple[int, int, int]:
        """``(t, h, w)`` token counts of one clip."""
        grid = self.grid
        return grid.t, grid.h, grid.w

    @property
    def position_grid(self) -> tuple[int, int, int]:
        """The ``(t, h, w)`` grid the encoder's position table belongs to (``pos_grid`` or its own)."""
        return self.pos_grid or self.grid_shape

    @property
    def num_tokens(self) -> int:
        return self.grid.num_tokens

    @property
    def patch_dim(self) -> int:
        """Pixels per token: ``channels * tubelet * patch * patch``."""
        return self.channels * self.tubelet * self.patch * self.patch

    @property
    def mlp_dim(self) -> int:
        return int(round(self.dim * self.mlp_ratio))

    @property
    def decoder_mlp_dim(self) -> int:
        return int(round(self.decoder_dim * self.decoder_mlp_ratio))

    def to_dict(self) -> dict:
        return {f.name: getattr(self, f.name) for f in fields(self)}


def patchify(video: torch.Tensor, tubelet: int, patch: int) -> torch.Tensor:
    """``(B, T, C, H, W)`` -> ``(B, N, C*tubelet*patch*patch)``, tokens in ``(t, h, w)`` order."""
    b, t, c, h, w = video.shape
    if t % tubelet or h % patch or w % patch:
        raise ValueError(f"video {t}x{h}x{w} is not divisible by tubelet {tubelet}x{patch}x{patch}")
    x = video.reshape(b, t // tubelet, tubelet, c, h // patch, patch, w // patch, patch)
    x = x.permute(0, 1, 4, 6, 3, 2, 5, 7)  # b, t', h', w', c, tubelet, p, p
    return x.reshape(b, (t // tubelet) * (h // patch) * (w // patch), c * tubelet * patch * patch)


def unpatchify(patches: torch.Tensor, grid: TokenGrid, channels: int, tubelet: int, patch: int) -> torch.Tensor:
    """Inverse of :func:`patchify`: ``(B, N, C*tubelet*patch*patch)`` -> ``(B, T, C, H, W)``."""
    b = patches.shape[0]
    x = patches.reshape(b, grid.t, grid.h, grid.w, channels, tubelet, patch, patch)
    x = x.permute(0, 1, 5, 4, 2, 6, 3, 7)  # b, t', tubelet, c, h', p, w', p
    return x.reshape(b, grid.t * tubelet, channels, grid.h * patch, grid.w * patch)


class GeometryError(MgfmError, ValueError):
    """An encoder asked to work on clips whose token grid its position table does not fit; one line."""


def at_geometry(trained: ModelConfig, target: ModelConfig, pos_embed: str, source: str) -> ModelConfig:
    """``target`` (an encoder config at the clip length / crop size it will be used at) set to carry the
    position table of the encoder ``trained`` was saved with.

    The same token grid keeps that table. Another grid raises :class:`GeometryError` when
    ``pos_embed="error"``; with ``pos_embed="interpolate"`` the trained table is resampled to the new grid
    (:func:`position_table`; a learned one on use, :meth:`VideoEncoder.positions`), logged. ``source`` names
    the encoder in messages.
    """
    if pos_embed not in ("error", "interpolate"):
        raise ValueError(f"pos_embed: expected 'error' or 'interpolate', got {pos_embed!r}")
    if target.grid_shape == trained.grid_shape:
        return dataclasses.replace(target, pos_grid=trained.pos_grid, learned_pos=trained.learned_pos)
    old, new = trained.grid_shape, target.grid_shape
    if pos_embed == "error":
        raise GeometryError(
            f"{source}: the encoder was trained on {trained.frames}x{trained.img_size}^2 clips "
            f"({'x'.join(map(str, old))} tokens) but is asked for {target.frames}x{target.img_size}^2 "
            f"({'x'.join(map(str, new))} tokens), where its position table would mean other places; set "
            f"pos_embed=interpolate to resample it over (t, h, w), or keep frames/img_size")
    log.warning("%s: position table resampled from a %s to a %s token grid (pos_embed=interpolate); "
                "transformers would rebuild a plain table for this model", source,
                "x".join(map(str, trained.position_grid)), "x".join(map(str, new)))
    return dataclasses.replace(target, pos_grid=trained.position_grid, learned_pos=trained.learned_pos)


def mask_indices(encoder_mask: torch.Tensor,
                 decoder_mask: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Token indices from bool masks ``(B, N)``: ``visible`` ``(B, Nv)`` and ``target`` ``(B, Nt)`` long.

    ``target`` are the tokens the decoder reconstructs (``decoder_mask``, default ``encoder_mask``), both
    in increasing token order. Raises ``ValueError`` if counts differ between samples or the decoder
    mask is not a subset of the encoder mask.
    """
    encoder_mask = torch.as_tensor(encoder_mask)
    if decoder_mask is not None:
        decoder_mask = torch.as_tensor(decoder_mask)
    if encoder_mask.dim() != 2 or encoder_mask.dtype != torch.bool:
        raise ValueError(f"encoder_mask: expected bool (B, N), got {encoder_mask.dtype} {tuple(encoder_mask.shape)}")
    dec = encoder_mask if decoder_mask is None else decoder_mask.to(encoder_mask.device)
    if dec.shape != encoder_mask.shape or dec.dtype != torch.bool:
        raise ValueError(f"decoder_mask: expected bool {tuple(encoder_mask.shape)}, got {dec.dtype} {tuple(dec.shape)}")
    b = encoder_mask.shape[0]
    stats = torch.stack([encoder_mask.sum(1), dec.sum(1), (dec & ~encoder_mask).sum(1)]).tolist()  # one sync
    n_masked, n_target, outside = stats
    if len(set(n_masked)) != 1:
        raise ValueError(f"encoder_mask: every sample must hide the same number of tokens, got {sorted(set(n_masked))}")
    if len(set(n_target)) != 1:
        raise ValueError(f"decoder_mask: every sample must keep the same number of tokens, got {sorted(set(n_target))}")
    if n_masked[0] == encoder_mask.shape[1]:
        raise ValueError("encoder_mask: hides every token, the encoder would see nothing")
    if any(outside):
        raise ValueError("decoder_mask: must be a subset of encoder_mask (True only on hidden tokens)")
    if n_target[0] == 0:
        raise ValueError("decoder_mask: no token to reconstruct")
    # a stable sort puts False (visible / not reconstructed) first, each group in token order
    vis = torch.argsort(encoder_mask.to(torch.uint8), dim=1, stable=True)[:, : encoder_mask.shape[1] - n_masked[0]]
    tgt = torch.argsort((~dec).to(torch.uint8), dim=1, stable=True)[:, : n_target[0]]
    return vis.reshape(b, -1), tgt.reshape(b, -1)


class VideoEncoder(nn.Module):
    """ViT encoder over tubelet tokens (no CLS token). Parameters: ``patch_embed`` (Linear on patch
    vectors), ``blocks``, ``norm`` (Identity when ``cfg.final_norm`` is False); ``pos_embed`` ``(N, D)``: a fixed
    buffer, or with ``cfg.learned_pos`` a :class:`~mgfm.model.layers.LearnedPositions` (:meth:`positions`).
    """

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.cfg = cfg
        self.patch_embed = nn.Linear(cfg.patch_dim, cfg.dim)
        if cfg.learned_pos:
            self.pos_embed = LearnedPositions(cfg.position_grid, cfg.grid_shape, cfg.dim)
        else:
            self.register_buffer("pos_embed", position_table(cfg.grid_shape, cfg.dim, cfg.pos_grid), persistent=False)
        rates = [cfg.drop_path * i / max(cfg.depth - 1, 1) for i in range(cfg.depth)]
        self.blocks = nn.ModuleList(
            Block(cfg.dim, cfg.heads, cfg.mlp_dim, cfg.layer_norm_eps, cfg.qv_bias, r) for r in rates
        )
        self.norm = nn.LayerNorm(cfg.dim, eps=cfg.layer_norm_eps) if cfg.final_norm else nn.Identity()
        self.apply(init_weights)

    def check_video(self, video: torch.Tensor) -> None:
        cfg = self.cfg
        want = (cfg.frames, cfg.channels, cfg.img_size, cfg.img_size)
        if video.dim() != 5 or tuple(video.shape[1:]) != want:
            raise ValueError(f"video: expected (B, T, C, H, W) = (B, {', '.join(map(str, want))}), "
                             f"got {tuple(video.shape)}")

    def patchify(self, video: torch.Tensor) -> torch.Tensor:
        """``(B, T, C, H, W)`` -> ``(B, N, P)`` patch vectors."""
        self.check_video(video)
        return patchify(video, self.cfg.tubelet, self.cfg.patch)

    def forward_patches(self, patches: torch.Tensor, index: torch.Tensor | None = None,
                        block: int | None = None) -> torch.Tensor:
        """Encode patch vectors ``(B, n, P)`` sitting at token positions ``index`` ``(B, n)`` (None = all
        ``N`` tokens in order) -> tokens ``(B, n, D)`` after the final norm, or with ``block`` the tokens
        as encoder block ``block`` (1 = the first) leaves them, before any later block and the final norm."""
        x = self.patch_embed(patches)
        table = self.positions()
        pos = table if index is None else gather_tokens(table, index)
        x = x + pos.to(x.dtype)
        if block is not None:
            if not 1 <= block <= len(self.blocks):
                raise ValueError(f"block={block}: the encoder has blocks 1 to {len(self.blocks)}")
            return run_blocks(self.blocks[:block], x, self.cfg.grad_checkpointing)
        x = run_blocks(self.blocks, x, self.cfg.grad_checkpointing)
        return self.norm(x)

    def positions(self) -> torch.Tensor:
        """The position table ``(N, D)`` of this config's token grid (a learned one resampled from its own)."""
        return self.pos_embed() if self.cfg.learned_pos else self.pos_embed

    def forward(self, video: torch.Tensor, encoder_mask: torch.Tensor | None = None,
                block: int | None = None) -> torch.Tensor:
        """Video ``(B, T, C, H, W)`` and optional bool ``encoder_mask`` ``(B, N)`` (True = hidden) ->
        visible tokens ``(B, Nv, D)`` in token order (``Nv = N`` without a mask); ``block``: read after that
        block (:meth:`forward_patches`)."""
        patches = self.patchify(video)
        if encoder_mask is None:
            return self.forward_patches(patches, block=block)
        vis, _ = mask_indices(encoder_mask.to(patches.device))
        return self.forward_patches(gather_tokens(patches, vis), vis, block)

    def features(self, video: torch.Tensor, block: int | None = None) -> torch.Tensor:
        """Clip features ``(B, D)``: mean over all ``N`` tokens of the unmasked clip (after the final norm, or
        after encoder block ``block``: intermediate blocks can probe better than the last one, whose work
        the pixel decoder shares).

        Equals ``transformers.VideoMAEModel(...).last_hidden_state.mean(1)`` for the encoder saved by
        :func:`mgfm.model.hf.save_encoder_hf`. There is deliberately no mask argument.
        """
        return self.forward(video, block=block).mean(dim=1)

    def pooled_tokens(self, video: torch.Tensor, grid: tuple[int, int, int] | None = None,
                      block: int | None = None) -> torch.Tensor:
        """Tokens of the unmasked clip for an attentive probe: ``(B, T, C, H, W)`` -> ``(B, t * h * w, D)``,
        average-pooled from the token grid ``cfg.grid_shape`` to ``grid`` ``(t, h, w)`` (None = every token);
        ``block`` as in :meth:`features`."""
        tokens = self.forward(video, block=block)
        if grid is None or tuple(grid) == self.cfg.grid_shape:
            return tokens
        b, _, d = tokens.shape
        volume = tokens.transpose(1, 2).reshape(b, d, *self.cfg.grid_shape)
        return nn.functional.adaptive_avg_pool3d(volume, tuple(grid)).flatten(2).transpose(1, 2)


def build_encoder(cfg: ModelConfig) -> VideoEncoder:
    """A freshly initialised encoder for ``cfg``."""
    return VideoEncoder(cfg)
