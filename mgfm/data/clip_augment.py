"""Clip augmentations on cached uint8 tensors (weak / strong views for fine-tuning and FixMatch).

Input: uint8 ``(B, T, 3, S0, S0)`` clips (a :class:`mgfm.data.decoded_split.DecodedSplit` batch, one temporal
window each). Output: float32 ``(B, T, 3, S, S)`` normalised with the encoder's mean/std.

* weak (the supervised recipe and FixMatch's pseudo-labelling view): a random square crop of a fraction
  (``crop_scales``) of the cached side placed at random, resized to ``S``; optional horizontal flip.
* strong (FixMatch's student view): weak, then per clip a random brightness / contrast / saturation
  change, random greyscale, a temporal jitter (the clip shifted by up to ``temporal_shift`` frames with
  the edge frame repeated) and a cutout box over every frame.
* eval: centre crop of the whole cached side resized to ``S`` (the identity when ``S0 == S``).

One crop box and one set of colour factors per clip (a moving crop would invent motion). Randomness
comes from an explicit ``torch.Generator`` so a step is reproducible (and resumable) from its seed.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import torch
import torch.nn.functional as F

from mgfm.config import bounded

# ITU-R BT.601 luma weights (greyscale / saturation).
_LUMA = (0.299, 0.587, 0.114)


@dataclass
class StrongAugConfig:
    """How strong FixMatch's strong view is (each a maximum; the amount is drawn per clip)."""

    brightness: float = bounded(0.4, ge=0, le=1)  # factor in [1 - b, 1 + b]
    contrast: float = bounded(0.4, ge=0, le=1)
    saturation: float = bounded(0.4, ge=0, le=1)
    grey_prob: float = bounded(0.2, ge=0, le=1)
    temporal_shift: int = bounded(2, ge=0)  # frames
    cutout: float = bounded(0.4, ge=0, le=1)  # side of the erased square as a fraction of S (0 = off)



def _uniform(n: int, lo: float, hi: float, gen: torch.Generator) -> torch.Tensor:
    return lo + (hi - lo) * torch.rand(n, generator=gen)


def crop_clips(clips: torch.Tensor, size: int, scales: Sequence[float] | None, flip: bool,
                gen: torch.Generator | None) -> torch.Tensor:
    """uint8 ``(B, T, 3, S0, S0)`` -> float ``(B, T, 3, size, size)`` in [0, 1]: a random crop (side = a
    scale drawn from ``scales`` x S0, random place) per clip, or the centre ``S0`` square when
    ``scales`` is None; bilinear resize; horizontal flip with probability 0.5 when ``flip``."""
    b, t, c, h, w = clips.shape
    out = torch.empty((b, t, c, size, size), dtype=torch.float32)
    for i in range(b):
        if scales is None:
            side = min(h, w)
            y, x = (h - side) // 2, (w - side) // 2
        else:
            scale = scales[int(torch.randint(len(scales), (1,), generator=gen))]
            side = max(1, min(h, w, int(round(min(h, w) * scale))))
            y = int(torch.randint(h - side + 1, (1,), generator=gen))
            x = int(torch.randint(w - side + 1, (1,), generator=gen))
        crop = clips[i, :, :, y:y + side, x:x + side].float().div_(255.0)
        if side != size:
            crop = F.interpolate(crop, size=(size, size), mode="bilinear", align_corners=False, antialias=side > size)
        if flip and scales is not None and bool(torch.rand(1, generator=gen) < 0.5):
            crop = crop.flip(-1)
        out[i] = crop
    return out


def strong_jitter(video: torch.Tensor, cfg: StrongAugConfig, gen: torch.Generator) -> torch.Tensor:
    """Float ``(B, T, 3, S, S)`` in [0, 1] -> the same, with colour jitter, greyscale, temporal shift and
    cutout per clip (see the module docstring). Values stay in [0, 1]."""
    b, t, c, s, _ = video.shape
    luma = torch.tensor(_LUMA, dtype=video.dtype).view(1, 1, 3, 1, 1)
    x = video * _uniform(b, 1 - cfg.brightness, 1 + cfg.brightness, gen).view(b, 1, 1, 1, 1)
    mean = (x * luma).sum(2, keepdim=True).mean(dim=(1, 3, 4), keepdim=True)
    x = (x - mean) * _uniform(b, 1 - cfg.contrast, 1 + cfg.contrast, gen).view(b, 1, 1, 1, 1) + mean
    grey = (x * luma).sum(2, keepdim=True)
    x = (x - grey) * _uniform(b, 1 - cfg.saturation, 1 + cfg.saturation, gen).view(b, 1, 1, 1, 1) + grey
    to_grey = (torch.rand(b, generator=gen) < cfg.grey_prob).view(b, 1, 1, 1, 1)
    x = torch.where(to_grey, (x * luma).sum(2, keepdim=True).expand_as(x), x).clamp_(0.0, 1.0)
    if cfg.temporal_shift and t > 1:
        shifts = torch.randint(-cfg.temporal_shift, cfg.temporal_shift + 1, (b,), generator=gen)
        frames = torch.arange(t)
        index = (frames[None, :] - shifts[:, None]).clamp(0, t - 1)  # (B, T): shifted, edge frame repeated
        x = torch.stack([x[i, index[i]] for i in range(b)])
    side = int(round(cfg.cutout * s))
    if side > 0:
        for i in range(b):
            y = int(torch.randint(s - side + 1, (1,), generator=gen))
            z = int(torch.randint(s - side + 1, (1,), generator=gen))
            x[i, :, :, y:y + side, z:z + side] = 0.5
    return x


__all__ = ["StrongAugConfig", "crop_clips", "strong_jitter"]
