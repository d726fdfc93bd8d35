"""The masked-video objective (mae's ``models_mae``, V-JEPA's predictor side): what the decoder predicts for
the masked tokens and its losses (pixels, motion, an EMA teacher's features; content floor, motion and variance
terms, clip contrast, motion map), the light decoder, :class:`MaskedVideoModel` with its EMA teacher, and the
optimiser's parameter groups. Pretraining only: nothing here is part of the exported encoder.

Written for mgfm from the published recipe (tube masking, per-patch normalised pixel target, VideoMAE-V2
decoder masking); no code from the CC BY-NC reference repositories. Shapes and masks as in
:mod:`mgfm.model.encoder`.

Training loop contract::

    model = build_pretraining_model(cfg, loss_cfg)
    loss, out = model(video, encoder_mask, decoder_mask)   # scalar loss, PretrainOutput
    loss.backward()
    save_encoder_hf(model.encoder, run_dir / "encoder")    # mgfm.model.hf
"""

from __future__ import annotations

import copy
import math
from dataclasses import dataclass, field
from typing import Literal

import torch
import torch.nn.functional as F
from torch import nn

from mgfm.config import bounded
from mgfm.model.contrastive import ClipContrast
from mgfm.model.encoder import ModelConfig, VideoEncoder, mask_indices, patchify
from mgfm.model.layers import Block, gather_tokens, init_weights, run_blocks, sinusoid_table
from mgfm.model.motion_map import MotionMapHead


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

    def target_dim(self, cfg: ModelConfig) -> int:
        """Values the decoder predicts per masked token."""
        return {"pixels": cfg.patch_dim, "motion": cfg.patch_dim, "pixels+motion": 2 * cfg.patch_dim,
                "features": cfg.dim}[self.target]

    def momentum(self, step: int, total_steps: int) -> float:
        """The teacher's EMA momentum after ``step`` of ``total_steps`` optimiser steps (cosine to the end value)."""
        progress = min(1.0, step / max(1, total_steps))
        return self.ema_momentum_end - (self.ema_momentum_end - self.ema_momentum) * (math.cos(math.pi * progress) + 1) / 2


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
        x_vis = x + gather_tokens(self.pos_embed, visible).to(x.dtype)
        x_tgt = self.mask_token.to(x.dtype) + gather_tokens(self.pos_embed, target).to(x.dtype)
        x = run_blocks(self.blocks, torch.cat((x_vis, x_tgt), dim=1), self.cfg.grad_checkpointing)
        return self.head(self.norm(x[:, -n_t:]))


@dataclass
class PretrainOutput:
    """What a pretraining step produced besides the loss.

    ``pred`` and ``target`` are ``(B, Nt, P)`` pixels (target fp32, normalised per patch when
    ``norm_pix_loss``); ``target_index`` ``(B, Nt)`` are their token positions; ``visible_index``
    ``(B, Nv)`` the tokens the encoder saw. :func:`~mgfm.model.encoder.unpatchify` turns patch vectors back into video.
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
            parts.append(pixel_targets(gather_tokens(patches, index), self.cfg))
        if target in ("motion", "pixels+motion"):
            moving = patchify(motion_video(video), self.cfg.tubelet, self.cfg.patch)
            parts.append(gather_tokens(moving, index))
        if target == "features":
            tokens = self.teacher.forward_patches(patches).float()  # the whole clip, no mask
            parts.append(gather_tokens(F.layer_norm(tokens, tokens.shape[-1:]), index))
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
        tokens = self.encoder.forward_patches(gather_tokens(patches, visible), visible)
        pred = self.decoder(tokens, visible, target_index)
        with torch.no_grad():
            target = self.targets(video, patches, target_index)
        if self.objective.content_floor > 0:
            reconstruction, stats = content_loss(pred, target, gather_tokens(patches, target_index), self.cfg,
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


def build_pretraining_model(cfg: ModelConfig, loss: LossConfig | None = None) -> MaskedVideoModel:
    """A freshly initialised :class:`MaskedVideoModel` (encoder, decoder, and the heads ``loss`` turns on)."""
    return MaskedVideoModel(cfg, loss)


def param_groups(model: nn.Module, weight_decay: float) -> list[dict]:
    """AdamW groups: no weight decay on biases, norms, q/v biases, the mask token and a learned position table."""
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        (no_decay if p.dim() < 2 or name.endswith(("mask_token", "pos_embed.table")) else decay).append(p)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]

