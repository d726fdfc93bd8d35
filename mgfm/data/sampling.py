"""Temporal sampling for short micro-gesture clips (iMiGUE median ~40 frames).

A clip of ``n`` frames becomes ``num_frames`` frame indices (0-based, into the clip):

* ``adaptive`` (default): stride ``s = clamp(n // num_frames, 1, stride)``, so a 40-frame clip with 16
  frames uses stride 2 and a 200-frame clip stride ``stride`` (the cap); the window
  ``(num_frames - 1) * s + 1`` starts at random (train) or in the middle (eval).
* ``fixed``: stride ``stride`` when the window fits, else the largest stride that fits.
* ``uniform``: TSN-style, one frame from each of ``num_frames`` equal segments of the whole clip
  (random inside the segment for train, its centre for eval).

Clips shorter than ``num_frames`` are padded by repeating frames (``pad``): ``stretch`` repeats every
frame about equally often (keeps the whole motion in order), ``loop`` starts over, ``last`` repeats the
last frame.
"""

from __future__ import annotations

import numpy as np

STRIDE_POLICIES = ("adaptive", "fixed", "uniform")
PAD_MODES = ("stretch", "loop", "last")


def sample_indices(n_frames: int, num_frames: int, policy: str = "adaptive", stride: int = 4,
                   rng: np.random.Generator | None = None, pad: str = "stretch",
                   position: float = 0.5) -> np.ndarray:
    """Frame indices (num_frames,) int64 in ``[0, n_frames)``, non-decreasing.

    ``rng=None`` means evaluation: deterministic, the window placed at ``position`` of the free room
    (0 = start, 0.5 = centred, 1 = end; with ``uniform``, that point of every segment). Multi-view
    evaluation uses ``position = (v + 0.5) / V`` for view ``v`` of ``V``.
    """
    if not 0.0 <= position <= 1.0:
        raise ValueError(f"position must be in [0, 1], got {position}")
    if n_frames < 1:
        raise ValueError(f"a clip needs at least one frame, got n_frames={n_frames}")
    if num_frames < 1 or stride < 1:
        raise ValueError(f"num_frames and stride must be >= 1, got {num_frames}, {stride}")
    if policy not in STRIDE_POLICIES:
        raise ValueError(f"unknown stride policy {policy!r}; expected one of {STRIDE_POLICIES}")
    if pad not in PAD_MODES:
        raise ValueError(f"unknown pad mode {pad!r}; expected one of {PAD_MODES}")
    if n_frames < num_frames:
        return _pad(n_frames, num_frames, pad)
    if policy == "uniform":
        edges = np.linspace(0, n_frames, num_frames + 1)
        if rng is None:
            picks = edges[:-1] + position * (edges[1:] - edges[:-1])
        else:
            picks = edges[:-1] + rng.random(num_frames) * (edges[1:] - edges[:-1])
        return np.clip(np.floor(picks).astype(np.int64), 0, n_frames - 1)
    fits = (n_frames - 1) // max(num_frames - 1, 1) if num_frames > 1 else stride
    step = min(stride, max(1, n_frames // num_frames)) if policy == "adaptive" else stride
    step = max(1, min(step, fits))
    window = (num_frames - 1) * step + 1
    slack = n_frames - window
    start = int(slack * position) if rng is None else int(rng.integers(0, slack + 1))
    return start + step * np.arange(num_frames, dtype=np.int64)


def _pad(n_frames: int, num_frames: int, pad: str) -> np.ndarray:
    k = np.arange(num_frames, dtype=np.int64)
    if pad == "stretch":
        return (k * n_frames) // num_frames
    if pad == "loop":
        return k % n_frames
    return np.minimum(k, n_frames - 1)
