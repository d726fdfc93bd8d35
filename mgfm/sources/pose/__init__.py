"""Recorded skeletons as a clip source: pose files (BVH mocap, Kinect-style joint text, OpenPose keypoint
JSON, joint arrays) rendered into identity-free stick-figure clips while shards are built
(``python -m mgfm.shards build --format pose --index INDEX.csv --layout NAME``).

The index is a generic clip CSV (:mod:`mgfm.sources.generic_csv`) whose ``path`` names pose files: ``path,
subject,split`` and optionally ``label`` (absent: unlabelled), ``start_frame,end_frame`` (source frames,
inclusive), ``fps`` (the recording's frame rate; BVH files say their own), ``video_id``, ``label_name``.
"""

from __future__ import annotations

import dataclasses
import zlib
from pathlib import Path
from typing import Iterator

import numpy as np

from mgfm.sources.clip_index import AnnotationError, Clip, ClipIndex
from mgfm.sources.generic_csv import read_csv_index
from mgfm.sources.pose.errors import PoseFileError
from mgfm.sources.pose.layouts import BVH, LAYOUTS, Layout, get_layout
from mgfm.sources.pose.readers import PoseSequence, read_pose
from mgfm.sources.pose.render import FigureStyle, render_clip

__all__ = ["FigureStyle", "LAYOUTS", "Layout", "PoseFileError", "PoseSequence", "get_layout", "pose_clips",
           "read_pose", "read_pose_index", "render_clip"]


def read_pose_index(csv_path: str | Path, layout: str, class_names: list[str] | None = None,
                    dedupe: bool = False) -> ClipIndex:
    """The clip index of a pose-file CSV; every clip needs a frame rate (an ``fps`` column or a BVH file)."""
    lay = get_layout(layout)
    index = read_csv_index(csv_path, class_names, dedupe=dedupe, require_label=False, default_fps=0.0)
    for clip in index:
        is_bvh = clip.path.lower().endswith(".bvh")
        if (lay is BVH) != is_bvh:
            raise AnnotationError(csv_path, None, "path", f"{clip.path}: layout {layout} reads "
                                  f"{'only' if lay is BVH else 'no'} .bvh files")
        if clip.fps <= 0 and not is_bvh:
            raise AnnotationError(csv_path, None, "fps", f"{clip.path} does not say its frame rate; add an fps "
                                                         f"column (the recording's frames per second)")
    return index


def pose_clips(path: str, clips: list[Clip], layout: str, style: FigureStyle
               ) -> Iterator[tuple[Clip, Clip, np.ndarray | str]]:
    """Read ``path`` once and yield, for each of ``clips`` (all of that file), (clip, the clip as drawn: its
    last frame and frame rate resolved from the file, frames (T, S, S, 3) uint8), or (clip, clip, why it is
    skipped) when the file or the clip's frames cannot be drawn."""
    try:
        seq = read_pose(path, get_layout(layout))
    except PoseFileError as err:
        for clip in clips:
            yield clip, clip, f"pose file unreadable ({err.problem})"
        return
    for clip in clips:
        if clip.start_frame >= seq.n_frames:
            yield clip, clip, f"clip starts at frame {clip.start_frame} but the pose file has {seq.n_frames} frames"
            continue
        end = seq.n_frames - 1 if clip.end_frame < 0 else min(clip.end_frame, seq.n_frames - 1)
        drawn = dataclasses.replace(clip, end_frame=end, fps=clip.fps if clip.fps > 0 else seq.fps)
        yield clip, drawn, render_clip(seq, drawn.start_frame, end, drawn.fps, style, zlib.crc32(clip.clip_id.encode()))
