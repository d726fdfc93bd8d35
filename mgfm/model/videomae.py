"""VideoMAE-style masked video model: ViT encoder over tubelets, light pixel decoder, masked MSE loss.

Written for mgfm from the published recipe (tubelet embedding, fixed sinusoid positions, tube masking,
per-patch normalised pixel target); no code from the CC BY-NC reference repositories.

Layout conventions
------------------
* A video is ``(B, T, C, H, W)`` float, ImageNet-normalised (the Hugging Face ``pixel_values`` layout).
* A clip becomes ``N = (T / tubelet) * (H / patch) * (W / patch)`` tokens ordered ``(t, h, w)`` with ``t``
  outermost, the order of :mod:`mgfm.data.masking` and of ``transformers.VideoMAEModel``.
* A token's pixels (a "patch vector") are flattened in the order ``(C, tubelet, patch, patch)``, which is the
  order of a ``Conv3d`` kernel, so the patch embedding is a plain ``Linear`` on gathered patch vectors (only
  visible tokens are ever embedded) and converts to the Hugging Face ``Conv3d`` weight by a reshape.
* Position embeddings are the fixed sinusoid table over the flattened ``(t, h, w)`` token index, exactly the
  table ``transformers`` builds, so a saved encoder gives the same features there. An encoder used at another
  clip length or crop size either refuses or resamples its trained table over ``(t, h, w)``
  (:func:`at_geometry`, ``pos_embed=error|interpolate``).
* Masks (see :mod:`mgfm.data.masking`): ``encoder_mask`` bool ``(B, N)``, True = hidden from the encoder,
  the same count in every sample; ``decoder_mask`` bool ``(B, N)``, True = a masked token the decoder
  reconstructs (a subset of ``encoder_mask``, the same count in every sample). Without decoder masking
  pass ``decoder_mask=None`` (= ``encoder_mask``).

Training loop contract::

    model = build_pretraining_model(cfg)
    loss, out = model(video, encoder_mask, decoder_mask)   # scalar loss, PretrainOutput
    loss.backward()
    save_encoder_hf(model.encoder, run_dir / "encoder")    # mgfm.model.hf
"""

from __future__ import annotations

import copy
import dataclasses
import logging
import math
from dataclasses import dataclass, field, fields
from typing import Literal

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from mgfm.config import bounded
from mgfm.data.masking import TokenGrid
from mgfm.data.transforms import IMAGENET_MEAN, IMAGENET_STD
from mgfm.errors import MgfmError
from mgfm.model.contrastive import ClipContrast
from mgfm.model.motion_map import MotionMapHead

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


@dataclass
class LossConfig:
    """The pretraining objective: what the decoder predicts for the masked tokens (``target``) and the weights
    of the extra terms, 0 = off. Pretraining only; nothing of it is part of the exported encoder.

    ``target``:

    * ``pixels``: the tokens' pixels, normalised per patch when ``ModelConfig.norm_pix_loss`` (VideoMAE);
    * ``motion``: the tokens' frame-to-frame differences (frame ``f+1`` minus ``f``), normalised per channel
      over the whole clip, not per patch, so still background stays exactly 0 and a moving limb stands out
      (MAMP's masked motion prediction, for video);
    * ``pixels+motion``: both, side by side (the decoder predicts twice the values);
    * ``features``: an EMA teacher's features of the whole clip at the masked tokens, layer-normalised
      (data2vec / V-JEPA); the teacher follows the encoder with ``ema_momentum`` rising to
      ``ema_momentum_end`` on a cosine over the run.
    """

    target: Literal["pixels", "motion", "pixels+motion", "features"] = "pixels"
    ema_momentum: float = bounded(0.996, ge=0, le=1)
    ema_momentum_end: float = bounded(1.0, ge=0, le=1)
    # A hinge max(0, 1 - std) on the batch standard deviation of each dimension of the encoder's pooled
    # visible tokens (VICReg's variance term): keeps clips apart where a feature target could collapse.
    variance_weight: float = bounded(0.0, ge=0)
    # Clip contrast between the repeated views of each clip (mgfm.model.contrastive); 0 = pure VideoMAE.
    contrastive_weight: float = bounded(0.0, ge=0)
    contrastive_temperature: float = bounded(0.1, gt=0)
    # An extra MSE between the predicted and the target frame-to-frame differences inside each tubelet
    # (target=pixels only): it singles out what moves, which MG recognition needs.
    motion_weight: float = bounded(0.0, ge=0)
    # A linear head on the pooled features of the unmasked clip regresses where the clip moved
    # (mgfm.model.motion_map), on a motion_map_grid x motion_map_grid grid.
    motion_map_weight: float = bounded(0.0, ge=0)
    motion_map_grid: int = bounded(8, ge=1)
    # Figure-aware reconstruction: masked tokens whose input tubelet has a pixel standard deviation (in the
    # clip's normalised units, mean over channels) at or below this floor count no loss; 0 = every token.
    # Stick-figure clips are mostly flat background (45-53% of the real sets' train tubelets exactly, another
    # 19% only codec noise at std <= 0.1, which per-patch normalisation blows up to unit-variance targets that
    # nothing can predict; docs/experiments.md).
    content_floor: float = bounded(0.0, ge=0)

    def __post_init__(self) -> None:
        if self.ema_momentum > self.ema_momentum_end:
            raise ValueError(f"loss.ema_momentum/ema_momentum_end: the momentum rises, expected start <= end, got "
                             f"{self.ema_momentum}/{self.ema_momentum_end}")
        if self.motion_weight > 0 and self.target != "pixels":
            raise ValueError(f"loss.motion_weight: an extra term on predicted pixels, only with loss.target=pixels "
                             f"(got {self.target!r}; target=motion predicts the differences themselves)")

    def target_dim(self, cfg: "ModelConfig") -> int:
        """Values the decoder predicts per masked token."""
        return {"pixels": cfg.patch_dim, "motion": cfg.patch_dim, "pixels+motion": 2 * cfg.patch_dim,
                "features": cfg.dim}[self.target]

    def momentum(self, step: int, total_steps: int) -> float:
        """The teacher's EMA momentum after ``step`` of ``total_steps`` optimiser steps (cosine to the end value)."""
        progress = min(1.0, step / max(1, total_steps))
        return self.ema_momentum_end - (self.ema_momentum_end - self.ema_momentum) * (math.cos(math.pi * progress) + 1) / 2


# ----------------------------------------------------------------------------------------------------
# pixels <-> tokens


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


def pixel_targets(patches: torch.Tensor, cfg: ModelConfig, eps: float = 1e-6) -> torch.Tensor:
    """Reconstruction target for patch vectors ``(B, n, P)`` of an ImageNet-normalised video -> ``(B, n, P)`` fp32.

    With ``norm_pix_loss`` each token is normalised per channel by the mean and (unbiased) std of its own
    ``tubelet*patch*patch`` pixels, computed on un-normalised pixels ``u = x*std_c + mean_c`` as VideoMAE
    does: ``(u - mean(u)) / (std(u) + eps)``. Since ``u`` is an affine map of ``x`` this equals
    ``(x - mean(x)) / (std(x) + eps/std_c)``, which is what is computed (no un-normalised copy). Without
    ``norm_pix_loss`` the target is the un-normalised pixels ``u``.
    """
    b, n, p = patches.shape
    x = patches.float().reshape(b, n, cfg.channels, p // cfg.channels)
    std_c = torch.tensor(cfg.pixel_std, dtype=x.dtype, device=x.device).view(1, 1, -1, 1)
    if not cfg.norm_pix_loss:
        mean_c = torch.tensor(cfg.pixel_mean, dtype=x.dtype, device=x.device).view(1, 1, -1, 1)
        return (x * std_c + mean_c).reshape(b, n, p)
    var, mean = torch.var_mean(x, dim=-1, keepdim=True, correction=1)
    return ((x - mean) / (var.sqrt() + eps / std_c)).reshape(b, n, p)


def motion_video(video: torch.Tensor, eps: float = 1e-6) -> torch.Tensor:
    """The motion target of a clip: ``(B, T, C, H, W)`` -> ``(B, T, C, H, W)`` fp32 frame differences
    ``x[f+1] - x[f]`` (the last frame repeats the last difference), divided by their standard deviation per
    clip and channel over the whole clip. Normalising the whole clip at once (not each patch or each short
    segment, MAMP's criticised choice) keeps still background at exactly 0 and the scale of motion comparable
    over time; the input's per-channel affine normalisation cancels out."""
    x = video.float()
    diff = x[:, 1:] - x[:, :-1]
    diff = torch.cat((diff, diff[:, -1:]), dim=1)
    std = diff.std(dim=(1, 3, 4), keepdim=True)
    return diff / (std + eps)


def content_loss(pred: torch.Tensor, target: torch.Tensor, patches: torch.Tensor, cfg: ModelConfig,
                 floor: float) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """MSE over the tokens that show something: ``pred`` / ``target`` ``(B, Nt, V)`` at the tokens whose input
    patch vectors are ``patches`` ``(B, Nt, P)``; a token counts when its pixels' standard deviation (per
    channel, averaged over channels) is above ``floor``. Returns ``(loss, {"content_share": share of tokens
    counted})``; a batch without such a token has loss 0 (and its gradient)."""
    b, n, p = patches.shape
    spread = patches.float().reshape(b, n, cfg.channels, p // cfg.channels).std(dim=-1).mean(dim=-1)
    weight = (spread > floor).float()  # (B, Nt)
    per_token = (pred.float() - target).pow(2).mean(dim=-1)
    loss = (per_token * weight).sum() / weight.sum().clamp(min=1.0)
    return loss, {"content_share": weight.mean().detach()}


def motion_loss(pred: torch.Tensor, target: torch.Tensor, cfg: ModelConfig) -> torch.Tensor:
    """MSE between predicted and target frame-to-frame differences inside each tubelet.

    ``pred``/``target``: ``(B, Nt, P)`` patch vectors ordered ``(C, tubelet, patch, patch)``. Static
    background has zero target difference, so this term only rewards getting the moving parts right.
    """
    shape = (*target.shape[:2], cfg.channels, cfg.tubelet, -1)
    p, t = pred.float().reshape(shape), target.reshape(shape)
    return F.mse_loss(p[:, :, :, 1:] - p[:, :, :, :-1], t[:, :, :, 1:] - t[:, :, :, :-1])


def sinusoid_table(n_positions: int, dim: int) -> torch.Tensor:
    """Fixed ``(n_positions, dim)`` sinusoid table: even channels ``sin(pos / 10000^(2i/dim))``, odd ``cos``."""
    pos = torch.arange(n_positions, dtype=torch.float64)[:, None]
    j = torch.arange(dim)
    inv_freq = torch.pow(10000.0, -(2 * (j // 2)).to(torch.float64) / dim)
    angles = pos * inv_freq[None, :]
    return torch.where(j % 2 == 0, torch.sin(angles), torch.cos(angles)).float()


def position_table(grid: tuple[int, int, int], dim: int, trained: tuple[int, int, int] | None = None) -> torch.Tensor:
    """The encoder's fixed ``(t*h*w, dim)`` position table for a token ``grid``.

    Without ``trained`` (or when it equals ``grid``) it is :func:`sinusoid_table` over the flattened token
    index, the table ``transformers`` builds. Used at another clip length or crop size, that 1-D index would
    land on other ``(t, h, w)`` places, so the table of the ``trained`` grid is resampled over ``(t, h, w)``
    instead (trilinear; timm and VideoMAE V2 resize position tables for other resolutions the same way).
    """
    if trained is None or tuple(trained) == tuple(grid):
        return sinusoid_table(math.prod(grid), dim)
    return resample_table(sinusoid_table(math.prod(trained), dim), trained, grid)


def resample_table(table: torch.Tensor, trained: tuple[int, int, int], grid: tuple[int, int, int]) -> torch.Tensor:
    """A ``(t*h*w, D)`` position table of the ``trained`` token grid resampled over ``(t, h, w)`` (trilinear) to
    ``grid`` -> ``(t'*h'*w', D)``; differentiable, so a learned table trains through it."""
    if tuple(trained) == tuple(grid):
        return table
    volume = table.reshape(1, *trained, table.shape[-1]).permute(0, 4, 1, 2, 3)  # (1, D, t, h, w)
    resized = F.interpolate(volume, size=tuple(grid), mode="trilinear", align_corners=False)
    return resized.permute(0, 2, 3, 4, 1).reshape(math.prod(grid), table.shape[-1]).contiguous()


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


def _gather_tokens(x: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """``x`` ``(B, N, D)`` or ``(N, D)``, ``index`` ``(B, n)`` long -> ``(B, n, D)``."""
    if x.dim() == 2:
        return x[index]
    return torch.gather(x, 1, index[..., None].expand(-1, -1, x.shape[-1]))


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


# ----------------------------------------------------------------------------------------------------
# transformer blocks


def drop_path(x: torch.Tensor, rate: float, training: bool) -> torch.Tensor:
    """Stochastic depth: zero a whole sample's residual branch with probability ``rate``, rescale the rest."""
    if rate == 0.0 or not training:
        return x
    keep = 1.0 - rate
    scale = x.new_empty((x.shape[0],) + (1,) * (x.dim() - 1)).bernoulli_(keep).div_(keep)
    return x * scale


class Attention(nn.Module):
    """Multi-head self-attention with one fused ``qkv`` projection, q and v biases (no k bias), SDPA.

    ``qkv_weight`` ``(3D, D)`` (rows: q, k, v), ``q_bias``/``v_bias`` ``(D,)`` are parameters of this module
    itself (not of a child ``Linear``), so ZeRO-3 style parameter gathering sees them in this forward.
    """

    def __init__(self, dim: int, heads: int, qv_bias: bool = True) -> None:
        super().__init__()
        self.heads = heads
        self.qkv_weight = nn.Parameter(torch.empty(3 * dim, dim))
        nn.init.xavier_uniform_(self.qkv_weight)
        if qv_bias:
            self.q_bias = nn.Parameter(torch.zeros(dim))
            self.v_bias = nn.Parameter(torch.zeros(dim))
        else:
            self.register_parameter("q_bias", None)
            self.register_parameter("v_bias", None)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``(B, n, D)`` -> ``(B, n, D)``."""
        b, n, d = x.shape
        bias = None
        if self.q_bias is not None:
            bias = torch.cat((self.q_bias, torch.zeros_like(self.q_bias), self.v_bias))
        qkv = F.linear(x, self.qkv_weight, bias).view(b, n, 3, self.heads, d // self.heads)
        q, k, v = qkv.permute(2, 0, 3, 1, 4).unbind(0)  # each (B, heads, n, head_dim)
        out = F.scaled_dot_product_attention(q, k, v)
        return self.proj(out.transpose(1, 2).reshape(b, n, d))


class Mlp(nn.Module):
    def __init__(self, dim: int, hidden: int) -> None:
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden)
        self.fc2 = nn.Linear(hidden, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(F.gelu(self.fc1(x)))


class Block(nn.Module):
    """Pre-norm transformer block: ``x + attn(norm1(x))``, then ``x + mlp(norm2(x))``, with drop path."""

    def __init__(self, dim: int, heads: int, mlp_dim: int, eps: float, qv_bias: bool = True,
                 drop_path: float = 0.0) -> None:
        super().__init__()
        self.norm1 = nn.LayerNorm(dim, eps=eps)
        self.attn = Attention(dim, heads, qv_bias)
        self.norm2 = nn.LayerNorm(dim, eps=eps)
        self.mlp = Mlp(dim, mlp_dim)
        self.drop_path = drop_path

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``(B, n, D)`` -> ``(B, n, D)``."""
        x = x + drop_path(self.attn(self.norm1(x)), self.drop_path, self.training)
        return x + drop_path(self.mlp(self.norm2(x)), self.drop_path, self.training)


def _run_blocks(blocks: nn.ModuleList, x: torch.Tensor, use_checkpoint: bool) -> torch.Tensor:
    for blk in blocks:
        if use_checkpoint and torch.is_grad_enabled():
            x = checkpoint(blk, x, use_reentrant=False)
        else:
            x = blk(x)
    return x


def init_weights(module: nn.Module) -> None:
    if isinstance(module, nn.Linear):
        nn.init.xavier_uniform_(module.weight)
        if module.bias is not None:
            nn.init.zeros_(module.bias)
    elif isinstance(module, nn.LayerNorm):
        nn.init.ones_(module.weight)
        nn.init.zeros_(module.bias)


# ----------------------------------------------------------------------------------------------------
# encoder / decoder / pretraining model


class LearnedPositions(nn.Module):
    """A trained position table ``table`` ``(N, D)`` of the token grid it was trained on (started from the
    sinusoid table); called, it is resampled to the grid in use (:func:`resample_table`). A module of its own so
    that ZeRO-3 gathers it when it is called."""

    def __init__(self, trained: tuple[int, int, int], grid: tuple[int, int, int], dim: int) -> None:
        super().__init__()
        self.trained, self.grid = tuple(trained), tuple(grid)
        self.table = nn.Parameter(sinusoid_table(math.prod(self.trained), dim))

    def forward(self) -> torch.Tensor:
        """-> ``(t*h*w, D)`` for the grid in use."""
        return resample_table(self.table, self.trained, self.grid)


class VideoEncoder(nn.Module):
    """ViT encoder over tubelet tokens (no CLS token). Parameters: ``patch_embed`` (Linear on patch
    vectors), ``blocks``, ``norm`` (Identity when ``cfg.final_norm`` is False); ``pos_embed`` ``(N, D)``: a fixed
    buffer, or with ``cfg.learned_pos`` a :class:`LearnedPositions` (:meth:`positions`).
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
        pos = table if index is None else _gather_tokens(table, index)
        x = x + pos.to(x.dtype)
        if block is not None:
            if not 1 <= block <= len(self.blocks):
                raise ValueError(f"block={block}: the encoder has blocks 1 to {len(self.blocks)}")
            return _run_blocks(self.blocks[:block], x, self.cfg.grad_checkpointing)
        x = _run_blocks(self.blocks, x, self.cfg.grad_checkpointing)
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
        return self.forward_patches(_gather_tokens(patches, vis), vis, block)

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


class PixelDecoder(nn.Module):
    """Light transformer decoder: visible tokens + mask tokens -> the target values of the reconstructed
    tokens (``out_dim`` each: their pixels by default, see :meth:`LossConfig.target_dim`)."""

    def __init__(self, cfg: ModelConfig, out_dim: int | None = None) -> None:
        super().__init__()
        self.cfg = cfg
        self.encoder_to_decoder = nn.Linear(cfg.dim, cfg.decoder_dim, bias=False)
        self.mask_token = nn.Parameter(torch.zeros(1, 1, cfg.decoder_dim))
        self.register_buffer("pos_embed", sinusoid_table(cfg.num_tokens, cfg.decoder_dim), persistent=False)
        self.blocks = nn.ModuleList(
            Block(cfg.decoder_dim, cfg.decoder_heads, cfg.decoder_mlp_dim, cfg.layer_norm_eps, cfg.qv_bias)
            for _ in range(cfg.decoder_depth)
        )
        self.norm = nn.LayerNorm(cfg.decoder_dim, eps=cfg.layer_norm_eps)
        self.head = nn.Linear(cfg.decoder_dim, out_dim or cfg.patch_dim)
        self.apply(init_weights)
        nn.init.trunc_normal_(self.mask_token, std=0.02)

    def forward(self, tokens: torch.Tensor, visible: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        """Encoder tokens ``(B, Nv, D)`` at positions ``visible`` ``(B, Nv)``; predict the tokens at
        ``target`` ``(B, Nt)`` -> values ``(B, Nt, out_dim)``. The decoder attends over ``Nv + Nt`` tokens."""
        x = self.encoder_to_decoder(tokens)
        b, n_t = target.shape
        x_vis = x + _gather_tokens(self.pos_embed, visible).to(x.dtype)
        x_tgt = self.mask_token.to(x.dtype) + _gather_tokens(self.pos_embed, target).to(x.dtype)
        x = _run_blocks(self.blocks, torch.cat((x_vis, x_tgt), dim=1), self.cfg.grad_checkpointing)
        return self.head(self.norm(x[:, -n_t:]))


@dataclass
class PretrainOutput:
    """What a pretraining step produced besides the loss.

    ``pred`` and ``target`` are ``(B, Nt, P)`` pixels (target fp32, normalised per patch when
    ``norm_pix_loss``); ``target_index`` ``(B, Nt)`` are their token positions; ``visible_index``
    ``(B, Nv)`` the tokens the encoder saw. :func:`unpatchify` turns patch vectors back into video.
    """

    pred: torch.Tensor
    target: torch.Tensor
    target_index: torch.Tensor
    visible_index: torch.Tensor = field(repr=False)
    reconstruction_loss: torch.Tensor | None = None
    contrastive_loss: torch.Tensor | None = None
    motion_map_loss: torch.Tensor | None = None
    # scalars worth logging (detached): e.g. target_std / feature_std (the batch spread of the teacher's and
    # the encoder's pooled features: a collapse shows there first), variance_loss
    stats: dict[str, torch.Tensor] = field(default_factory=dict)


class MaskedVideoModel(nn.Module):
    """Encoder + decoder + masked-token loss (VideoMAE, optionally with VideoMAE-V2 decoder masking); the
    target is the loss config's (pixels, motion, both, or an EMA teacher's features)."""

    def __init__(self, cfg: ModelConfig, loss: LossConfig | None = None) -> None:
        super().__init__()
        self.cfg = cfg
        self.objective = loss = loss or LossConfig()
        self.encoder = VideoEncoder(cfg)
        self.decoder = PixelDecoder(cfg, loss.target_dim(cfg))
        self.teacher = None
        if loss.target == "features":
            self.teacher = copy.deepcopy(self.encoder).requires_grad_(False)
        self._teacher_fp32: list[torch.Tensor] | None = None  # EMA master copy where the teacher is not fp32
        self.contrast = None
        if loss.contrastive_weight > 0:
            self.contrast = ClipContrast(cfg.dim, temperature=loss.contrastive_temperature)
        self.motion_map = None
        if loss.motion_map_weight > 0:
            self.motion_map = MotionMapHead(cfg.dim, cfg.frames, cfg.tubelet, loss.motion_map_grid)

    def train(self, mode: bool = True) -> "MaskedVideoModel":
        super().train(mode)
        if self.teacher is not None:  # the teacher computes targets: never drop path
            self.teacher.eval()
        return self

    @torch.no_grad()
    def sync_teacher(self) -> None:
        """Start the EMA teacher from the encoder's current weights (after any initialisation of them)."""
        if self.teacher is not None:
            self.teacher.load_state_dict(self.encoder.state_dict())
            self._teacher_fp32 = None

    @torch.no_grad()
    def update_teacher(self, momentum: float) -> None:
        """``teacher = momentum * teacher + (1 - momentum) * encoder``, after each optimiser step. In bf16 (under
        DeepSpeed) an update of 1 - 0.999 is below the weights' resolution, so the average is kept in an fp32
        copy and the teacher gets its rounded value."""
        if self.teacher is None:
            return
        teacher, student = list(self.teacher.parameters()), list(self.encoder.parameters())
        if teacher[0].dtype != torch.float32 and self._teacher_fp32 is None:
            self._teacher_fp32 = [t.detach().float().clone() for t in teacher]
        masters = self._teacher_fp32 or teacher
        for master, t, s in zip(masters, teacher, student):
            master.lerp_(s.detach().to(master.dtype), 1.0 - momentum)
            if master is not t:
                t.copy_(master)

    def targets(self, video: torch.Tensor, patches: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
        """The loss config's target at token positions ``index`` ``(B, Nt)`` -> fp32 ``(B, Nt, target_dim)``."""
        target = self.objective.target
        parts = []
        if target in ("pixels", "pixels+motion"):
            parts.append(pixel_targets(_gather_tokens(patches, index), self.cfg))
        if target in ("motion", "pixels+motion"):
            moving = patchify(motion_video(video), self.cfg.tubelet, self.cfg.patch)
            parts.append(_gather_tokens(moving, index))
        if target == "features":
            tokens = self.teacher.forward_patches(patches).float()  # the whole clip, no mask
            parts.append(_gather_tokens(F.layer_norm(tokens, tokens.shape[-1:]), index))
        return parts[0] if len(parts) == 1 else torch.cat(parts, dim=-1)

    def forward(self, video: torch.Tensor, encoder_mask: torch.Tensor,
                decoder_mask: torch.Tensor | None = None,
                group: torch.Tensor | None = None) -> tuple[torch.Tensor, PretrainOutput]:
        """One pretraining forward.

        Args:
            video: ``(B, T, C, H, W)`` float, normalised with ``cfg.pixel_mean``/``cfg.pixel_std``.
            encoder_mask: bool ``(B, N)``, True = hidden from the encoder; equal count per sample.
            decoder_mask: bool ``(B, N)``, True = masked token to reconstruct (subset of
                ``encoder_mask``, equal count per sample); None = every encoder-masked token.
            group: int ``(B,)`` clip identity of each row (views of one clip share it); used by the
                contrastive term when ``loss.contrastive_weight > 0`` (see :mod:`mgfm.model.contrastive`).

        Returns:
            ``(loss, out)``: scalar fp32 MSE over the ``Nt`` reconstructed tokens (all of their target values,
            :meth:`LossConfig.target_dim` each; with ``loss.content_floor`` only the tokens that show
            something, :func:`content_loss`), plus ``motion_weight`` x :func:`motion_loss`,
            ``contrastive_weight`` x the contrastive loss, ``motion_map_weight`` x the motion-map loss (on one
            unmasked view per clip) and ``variance_weight`` x the variance hinge when enabled, and a
            :class:`PretrainOutput`.
        """
        patches = self.encoder.patchify(video)
        visible, target_index = mask_indices(encoder_mask.to(patches.device),
                                             None if decoder_mask is None else decoder_mask.to(patches.device))
        tokens = self.encoder.forward_patches(_gather_tokens(patches, visible), visible)
        pred = self.decoder(tokens, visible, target_index)
        with torch.no_grad():
            target = self.targets(video, patches, target_index)
        if self.objective.content_floor > 0:
            reconstruction, stats = content_loss(pred, target, _gather_tokens(patches, target_index), self.cfg,
                                                 self.objective.content_floor)
        else:
            reconstruction, stats = F.mse_loss(pred.float(), target), {}
        if self.objective.motion_weight > 0:
            reconstruction = reconstruction + self.objective.motion_weight * motion_loss(pred, target, self.cfg)
        loss, contrastive = reconstruction, None
        pooled = tokens.float().mean(dim=1)  # (B, D): the encoder's visible tokens per clip
        if len(pooled) > 1:
            stats["feature_std"] = pooled.detach().std(dim=0).mean()
            if self.objective.target == "features":
                stats["target_std"] = target.mean(dim=1).std(dim=0).mean()
        if self.objective.variance_weight > 0:
            variance = F.relu(1.0 - torch.sqrt(pooled.var(dim=0) + 1e-4)).mean()
            stats["variance_loss"] = variance.detach()
            loss = loss + self.objective.variance_weight * variance
        if self.contrast is not None and group is not None:
            contrastive = self.contrast(tokens, group.to(tokens.device))
            loss = loss + self.objective.contrastive_weight * contrastive
        motion = None
        if self.motion_map is not None:
            rows = first_views(group) if group is not None else slice(None)
            clip_features = self.encoder.forward_patches(patches[rows]).mean(dim=1)
            motion = self.motion_map(clip_features, video[rows], self.cfg.pixel_mean, self.cfg.pixel_std)
            loss = loss + self.objective.motion_map_weight * motion
        return loss, PretrainOutput(pred=pred, target=target, target_index=target_index, visible_index=visible,
                                    reconstruction_loss=reconstruction.detach(),
                                    contrastive_loss=None if contrastive is None else contrastive.detach(),
                                    motion_map_loss=None if motion is None else motion.detach(), stats=stats)

    def features(self, video: torch.Tensor) -> torch.Tensor:
        """``(B, T, C, H, W)`` -> ``(B, D)``; see :meth:`VideoEncoder.features`."""
        return self.encoder.features(video)


def first_views(group: torch.Tensor) -> torch.Tensor:
    """Row indices ``(G,)`` of the first row of each clip in ``group`` ``(B,)`` (one view per clip)."""
    _, inverse = torch.unique(group, return_inverse=True)
    rows = torch.arange(len(group), device=group.device)
    first = torch.full((int(inverse.max()) + 1,), len(group), dtype=torch.long, device=group.device)
    return first.scatter_reduce(0, inverse, rows, reduce="amin")


def build_encoder(cfg: ModelConfig) -> VideoEncoder:
    return VideoEncoder(cfg)


def build_pretraining_model(cfg: ModelConfig, loss: LossConfig | None = None) -> MaskedVideoModel:
    return MaskedVideoModel(cfg, loss)


def param_groups(model: nn.Module, weight_decay: float) -> list[dict]:
    """AdamW groups: no weight decay on biases, norms, q/v biases, the mask token and a learned position table."""
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        (no_decay if p.dim() < 2 or name.endswith(("mask_token", "pos_embed.table")) else decay).append(p)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


__all__ = [
    "IMAGENET_MEAN", "IMAGENET_STD", "SIZES", "ModelConfig", "LossConfig", "VideoEncoder", "PixelDecoder",
    "MaskedVideoModel", "LearnedPositions", "PretrainOutput", "build_encoder", "build_pretraining_model", "patchify",
    "unpatchify", "pixel_targets", "motion_video", "sinusoid_table", "position_table", "resample_table", "at_geometry", "GeometryError", "mask_indices", "drop_path", "param_groups",
]
