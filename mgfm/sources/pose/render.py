"""Recorded skeletons -> identity-free stick-figure frames.

A clip's joints are resampled in time to the output frame rate (linear, per coordinate), projected onto the
layout's view, scaled so the figure's extent over the whole clip fills ``margin`` of the square frame
(1st-99th percentile of the joints, so one wild joint does not shrink the figure) and drawn as bones on a
plain background with a disc for the head. Background, limb and head colours are drawn per clip from its
seed, so colour says nothing about the person or the class. The look is that of the real-motion sets in
``../shared/data`` (UTKinect, Florence3D), so renders of other recordings meet an encoder on equal terms.
"""

from __future__ import annotations

from dataclasses import dataclass

import cv2
import numpy as np

from mgfm.sources.pose.layouts import parse_view
from mgfm.sources.pose.readers import PoseSequence


@dataclass(frozen=True)
class FigureStyle:
    """How skeletons are drawn: frame side in pixels, output frame rate, the view (None: the layout's, else
    e.g. ``"x,-z"``) and the share of the frame the figure's extent fills."""

    size: int = 112
    fps: float = 15.0
    view: str | None = None
    margin: float = 0.8

    def __post_init__(self) -> None:
        if self.size < 16 or self.size % 2:
            raise ValueError(f"figure size must be an even number >= 16, got {self.size}")
        if not self.fps > 0 or not 0 < self.margin <= 1:
            raise ValueError(f"figure fps must be > 0 and margin in (0, 1], got {self.fps}, {self.margin}")
        if self.view is not None:
            parse_view(self.view)


def resample(joints: np.ndarray, source_fps: float, fps: float) -> np.ndarray:
    """(T, J, 3) at ``source_fps`` -> (T', J, 3) at ``fps`` covering the same span (linear in time; a missing
    joint stays missing where a neighbouring source frame misses it)."""
    n = len(joints)
    if n == 1 or source_fps == fps:
        return joints
    times = np.arange(0.0, (n - 1) / source_fps + 1e-9, 1.0 / fps) * source_fps  # in source frames
    lo = np.minimum(np.floor(times).astype(np.int64), n - 1)
    hi = np.minimum(lo + 1, n - 1)
    w = (times - lo)[:, None, None]
    return (1 - w) * joints[lo] + w * joints[hi]


def project(joints: np.ndarray, view: tuple[str, str] | str, size: int, margin: float) -> np.ndarray:
    """(T, J, 3) -> (T, J, 2) pixel coordinates (float; NaN where missing) in a ``size`` square frame."""
    (ax, sx), (ay, sy) = parse_view(view)
    xy = np.stack([sx * joints[..., ax], sy * joints[..., ay]], axis=-1)
    seen = xy[np.isfinite(xy).all(axis=-1)]
    if not len(seen):
        return xy
    lo, hi = np.percentile(seen, 1, axis=0), np.percentile(seen, 99, axis=0)
    scale = margin * size / max(float((hi - lo).max()), 1e-6)
    return (xy - (lo + hi) / 2) * scale + size / 2


def draw(points: np.ndarray, bones: tuple[tuple[int, int], ...], head: int | None, size: int,
         rng: np.random.Generator) -> np.ndarray:
    """(T, J, 2) pixel coordinates -> (T, size, size, 3) uint8 RGB frames of one figure."""
    background = int(rng.integers(15, 70))
    limb = tuple(int(c) for c in rng.integers(140, 250, 3))
    head_colour = tuple(int(c) for c in rng.integers(140, 250, 3))
    thickness, radius = max(2, size // 40), max(3, size // 18)
    frames = np.full((len(points), size, size, 3), background, np.uint8)
    limit = 4 * size  # cv2 wants ints; a joint far off the frame is clipped, not wrapped
    for frame, p in zip(frames, points):
        ok = np.isfinite(p).all(axis=1)
        q = np.clip(np.nan_to_num(p), -limit, limit).round().astype(np.int32)
        for a, b in bones:
            if ok[a] and ok[b]:
                cv2.line(frame, (int(q[a, 0]), int(q[a, 1])), (int(q[b, 0]), int(q[b, 1])), limb, thickness,
                         cv2.LINE_AA)
        if head is not None and ok[head]:
            cv2.circle(frame, (int(q[head, 0]), int(q[head, 1])), radius, head_colour, -1, cv2.LINE_AA)
    return frames


def render_clip(seq: PoseSequence, start: int, end: int, source_fps: float, style: FigureStyle,
                seed: int) -> np.ndarray:
    """Frames ``start..end`` (inclusive, source frames; ``end = -1``: to the last) of ``seq`` drawn as a
    stick figure: (T', size, size, 3) uint8 at ``style.fps``."""
    stop = seq.n_frames if end < 0 else min(end + 1, seq.n_frames)
    joints = resample(seq.joints[start:stop].astype(np.float64), source_fps, style.fps)
    points = project(joints, style.view or seq.view, style.size, style.margin)
    return draw(points, seq.bones, seq.head, style.size, np.random.default_rng(seed))
