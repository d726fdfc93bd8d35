"""Spatial transforms for clips: multi-scale crop + resize (train), centre crop (eval), normalise.

Frames enter as uint8 ``(T, H, W, 3)`` RGB and leave :func:`to_tensor` as float32 ``(T, 3, S, S)``.
One crop box is used for every frame of a clip (a moving crop would invent motion). Resizing stacks
the frames along the channel axis so OpenCV resizes the whole clip in one call.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import cv2
import numpy as np
import torch

# Most channels cv2.resize accepts from a numpy array (128 with OpenCV 5); longer clips go in chunks.
_CV_MAX_CHANNELS = 128


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
    """Crop ``box`` out of every frame and resize to ``size x size``: (T,H,W,3) -> (T,size,size,3) uint8."""
    t, _, _, c = frames.shape
    crop = frames[:, box.y:box.y + box.h, box.x:box.x + box.w]
    if box.flip:
        crop = crop[:, :, ::-1]
    if crop.shape[1] == size and crop.shape[2] == size:
        return np.ascontiguousarray(crop)
    stacked = np.ascontiguousarray(crop.transpose(1, 2, 0, 3).reshape(box.h, box.w, t * c))
    interp = cv2.INTER_AREA if box.h > size and box.w > size else cv2.INTER_LINEAR
    if t * c <= _CV_MAX_CHANNELS:
        out = cv2.resize(stacked, (size, size), interpolation=interp)
    else:
        step = (_CV_MAX_CHANNELS // c) * c
        out = np.concatenate([cv2.resize(np.ascontiguousarray(stacked[:, :, i:i + step]), (size, size),
                                         interpolation=interp)
                              for i in range(0, t * c, step)], axis=2)
    return out.reshape(size, size, t, c).transpose(2, 0, 1, 3)


def to_tensor(frames: np.ndarray, mean: Sequence[float], std: Sequence[float]) -> torch.Tensor:
    """uint8 (T,H,W,3) -> normalised float32 (T,3,H,W): ``(x / 255 - mean) / std`` per channel."""
    x = torch.from_numpy(np.ascontiguousarray(frames)).permute(0, 3, 1, 2).float().div_(255.0)
    m = torch.tensor(mean, dtype=torch.float32).view(1, -1, 1, 1)
    s = torch.tensor(std, dtype=torch.float32).view(1, -1, 1, 1)
    return x.sub_(m).div_(s).contiguous()
