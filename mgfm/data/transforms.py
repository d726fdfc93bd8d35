"""Spatial transforms for clips: multi-scale crop + resize (train), centre crop (eval), normalise.

Frames enter as uint8 ``(T, H, W, 3)`` RGB and leave as float32 ``(T, 3, S, S)`` normalised with the
ImageNet statistics (:data:`IMAGENET_MEAN`, :data:`IMAGENET_STD`): :func:`normalise_into` in the loader's
numpy hot path, :func:`normalise` on tensors.
One crop box is used for every frame of a clip (a moving crop would invent motion).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import cv2
import numpy as np
import torch

#: The pixel statistics every mgfm encoder is normalised with by default (VideoMAE's).
IMAGENET_MEAN: tuple[float, float, float] = (0.485, 0.456, 0.406)
IMAGENET_STD: tuple[float, float, float] = (0.229, 0.224, 0.225)


@dataclass(frozen=True)
class CropBox:
    """Top-left corner and size of a crop, in pixels, plus whether to flip it horizontally."""

    y: int
    x: int
    h: int
    w: int
    flip: bool = False


def multiscale_crop_box(height: int, width: int, scales: Sequence[float], rng: np.random.Generator,
                        max_distort: int = 1, flip_prob: float = 0.0) -> CropBox:
    """Random multi-scale crop: crop height and width are each ``short_side * scale`` for scales
    drawn from ``scales`` at most ``max_distort`` positions apart (so the aspect ratio varies a
    little), placed uniformly at random."""
    if not scales:
        raise ValueError("crop scales must not be empty")
    base = min(height, width)
    sizes = [max(1, int(round(base * s))) for s in scales]
    pairs = [(hs, ws) for i, hs in enumerate(sizes) for j, ws in enumerate(sizes) if abs(i - j) <= max_distort]
    ch, cw = pairs[int(rng.integers(len(pairs)))]
    ch, cw = min(ch, height), min(cw, width)
    y = int(rng.integers(0, height - ch + 1))
    x = int(rng.integers(0, width - cw + 1))
    flip = bool(flip_prob > 0 and rng.random() < flip_prob)
    return CropBox(y, x, ch, cw, flip)


def centre_crop_box(height: int, width: int, fraction: float = 1.0) -> CropBox:
    """The centred square of side ``fraction * short_side``."""
    side = max(1, int(round(min(height, width) * fraction)))
    return CropBox((height - side) // 2, (width - side) // 2, side, side)


def crop_resize(frames: np.ndarray, box: CropBox, size: int) -> np.ndarray:
    """Crop ``box`` out of every frame and resize to ``size x size``: (T,H,W,3) -> (T,size,size,3) uint8.

    Bilinear, or area interpolation when shrinking by 2x or more (where bilinear would alias).
    """
    crop = frames[:, box.y:box.y + box.h, box.x:box.x + box.w]
    if crop.shape[1] == size and crop.shape[2] == size:
        out = np.ascontiguousarray(crop)
    else:
        interp = cv2.INTER_AREA if box.h >= 2 * size and box.w >= 2 * size else cv2.INTER_LINEAR
        out = np.empty((crop.shape[0], size, size, crop.shape[3]), dtype=np.uint8)
        for t, frame in enumerate(crop):
            cv2.resize(frame, (size, size), dst=out[t], interpolation=interp)
    if box.flip:
        out = np.ascontiguousarray(out[:, :, ::-1])
    return out


def crop_resize_planar(frames: np.ndarray | Sequence[np.ndarray], box: CropBox, size: int, out: np.ndarray,
                       positions: Sequence[int] | None = None) -> np.ndarray:
    """Like :func:`crop_resize` but channel-planar, into ``out`` uint8 (T, 3, size, size).

    ``frames``: uint8 (U,H,W,3), or U frames (H,W,3) (e.g. a decoder's pictures); ``positions`` picks the
    frames to use (default: all, T = U) without gathering them into a copy first; each resized frame is
    split straight into ``out``.
    """
    picks = range(len(frames)) if positions is None else np.asarray(positions).tolist()
    interp = cv2.INTER_AREA if box.h >= 2 * size and box.w >= 2 * size else cv2.INTER_LINEAR
    same = box.h == size and box.w == size
    for planes, k in zip(out, picks, strict=True):
        region = frames[k][box.y:box.y + box.h, box.x:box.x + box.w]
        small = region if same else cv2.resize(region, (size, size), interpolation=interp)
        if box.flip:
            small = cv2.flip(small, 1)
        cv2.split(small, list(planes))
    return out


def to_planar(frames: np.ndarray) -> np.ndarray:
    """uint8 (T,H,W,3) -> contiguous uint8 (T,3,H,W)."""
    return np.ascontiguousarray(frames.transpose(0, 3, 1, 2))


def normalise_into(planar: np.ndarray, out: np.ndarray, mean: Sequence[float], std: Sequence[float]) -> np.ndarray:
    """uint8 (..., 3, H, W) -> ``out`` float32 (..., 3, H, W) = ``(x / 255 - mean) / std``, in place.

    A uint8 input has only 256 values per channel, so each channel is one table lookup (``cv2.LUT`` with
    a 256-entry float32 table) straight into ``out`` (e.g. a preallocated batch): one vectorised pass, no
    temporaries. One call per channel covers every frame (rows of a strided 2-D view), not one per frame
    plane: a third less CPU time per batch. (Torch ops are faster on an idle machine but collapse when
    their intra-op threads compete with other work on a busy one: measured in the loader, 0.3x instead of
    0.8x of raw decoding.)
    """
    if not (planar.flags.c_contiguous and out.flags.c_contiguous) or planar.shape != out.shape:
        raise ValueError(f"normalise_into needs C-contiguous arrays of one shape, got {planar.shape}, {out.shape}")
    c, h, w = planar.shape[-3:]
    src = planar.reshape(-1, c, h * w)
    dst = out.reshape(-1, c, h * w)
    levels = np.arange(256, dtype=np.float64) / 255.0
    for ch, (m, s) in enumerate(zip(mean, std, strict=True)):
        cv2.LUT(src[:, ch], ((levels - m) / s).astype(np.float32), dst=dst[:, ch])
    return out


def normalise(video: torch.Tensor, mean: Sequence[float], std: Sequence[float]) -> torch.Tensor:
    """Channels-before-pixels video ``(..., 3, H, W)``, uint8 or float in [0, 1] (on any device, e.g. a uint8
    batch moved to the GPU) -> ``(x - mean) / std`` per channel, float32 (the input's float dtype if float)."""
    x = video.float().div(255.0) if video.dtype == torch.uint8 else video
    m = torch.tensor(mean, dtype=x.dtype, device=x.device).view(3, 1, 1)
    s = torch.tensor(std, dtype=x.dtype, device=x.device).view(3, 1, 1)
    return (x - m) / s
