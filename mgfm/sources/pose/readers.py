"""Pose files -> :class:`PoseSequence` (joint positions per frame, with the layout that draws them).

Formats, chosen by the path:

* ``*.bvh``: motion capture (the file's own hierarchy; :mod:`mgfm.sources.pose.bvh`).
* a folder of ``*.json``, or one ``*.json``: OpenPose keypoints, one file per frame (``people[*].
  pose_keypoints_2d`` = x, y, confidence per keypoint; the most confident person of each frame is kept,
  keypoints of confidence 0 are missing).
* ``*.npy``: an array (T, J, 2 or 3) of joint positions.
* anything else: Kinect-style joint text, one frame per line: optional leading columns (a frame number or a
  time stamp), then x y z (or x y z confidence) per joint of the layout, separated by spaces, tabs or commas.
  Repeated frame numbers (a second skeleton in the same frame) keep the first row; all-zero joints (not
  tracked) are missing.

Missing joints are NaN; 2-D formats have z = 0.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from mgfm.sources.pose.bvh import read_bvh
from mgfm.sources.pose.errors import PoseFileError
from mgfm.sources.pose.layouts import BVH, Layout

_SEPARATORS = re.compile(r"[\s,;]+")


@dataclass
class PoseSequence:
    """A recorded skeleton over time.

    ``joints``: (T, J, 3) float32 (NaN where a joint is missing); ``fps``: the file's frame rate when it
    says one (BVH), else None; ``bones``: (a, b) joint-index pairs to draw; ``head``: the joint drawn as a
    disc (or None); ``view``: the layout's image axes (see :class:`~mgfm.sources.pose.layouts.Layout`).
    """

    joints: np.ndarray
    fps: float | None
    bones: tuple[tuple[int, int], ...]
    head: int | None
    view: tuple[str, str]

    @property
    def n_frames(self) -> int:
        return int(self.joints.shape[0])


def read_pose(path: str | Path, layout: Layout) -> PoseSequence:
    """Read one pose file (or an OpenPose frame folder) with ``layout`` naming what the file does not say."""
    path = Path(path)
    if not path.exists():
        raise PoseFileError(path, "no such file or folder")
    if path.suffix.lower() == ".bvh":
        joints, names, bones, fps = read_bvh(path)
        head = next((i for i, n in enumerate(names) if n.lower() == "head"), None)
        seq = PoseSequence(joints, fps, tuple(bones), head, layout.view if layout is not BVH else BVH.view)
    elif layout is BVH:
        raise PoseFileError(path, "layout 'bvh' reads .bvh files only")
    elif path.is_dir() or path.suffix.lower() == ".json":
        seq = _sequence(_read_openpose(path, layout), layout)
    elif path.suffix.lower() == ".npy":
        seq = _sequence(_read_npy(path, layout), layout)
    else:
        seq = _sequence(_read_joint_text(path, layout), layout)
    if not np.isfinite(seq.joints).any(axis=(1, 2)).any():
        raise PoseFileError(path, "no frame has a tracked joint")
    return seq


def _sequence(joints: np.ndarray, layout: Layout) -> PoseSequence:
    return PoseSequence(joints.astype(np.float32), None, layout.bones, layout.head, layout.view)


def _read_joint_text(path: Path, layout: Layout) -> np.ndarray:
    try:
        lines = path.read_text(errors="replace").splitlines()
    except OSError as err:
        raise PoseFileError(path, f"cannot read: {err.strerror or err}") from None
    rows: list[list[float]] = []
    width = None
    for number, line in enumerate(lines, 1):
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        try:
            values = [float(v) for v in _SEPARATORS.split(line) if v]
        except ValueError:
            if not rows:  # one header line is allowed
                continue
            raise PoseFileError(path, f"line {number}: not numbers ({line[:40]!r})") from None
        if width is None:
            width = len(values)
        elif len(values) != width:
            raise PoseFileError(path, f"line {number}: {len(values)} values, the first frame has {width}")
        rows.append(values)
    if not rows:
        raise PoseFileError(path, "no frames (no lines of numbers)")
    table = np.asarray(rows)
    lead, per_joint = _columns(path, width, layout)
    if lead:  # a frame number first: a repeated number is a second skeleton of that frame
        _, first = np.unique(table[:, 0], return_index=True)
        if len(first) < len(table) and np.all(np.diff(table[:, 0]) >= 0):
            table = table[np.sort(first)]
    joints = table[:, lead:].reshape(len(table), layout.n_joints, per_joint)[:, :, :3].copy()
    joints[np.all(joints == 0, axis=2)] = np.nan  # Kinect writes untracked joints as zeros
    return joints


def _columns(path: Path, width: int, layout: Layout) -> tuple[int, int]:
    """(leading columns, values per joint) of a joint-text line of ``width`` values."""
    for per_joint in ((layout.values,) if layout.values else (3, 4)):
        lead = width - layout.n_joints * per_joint
        if 0 <= lead <= 2:
            return lead, per_joint
    raise PoseFileError(path, f"{width} values per line do not fit layout {layout.name} ({layout.n_joints} joints "
                              f"x 3 or 4 values, after at most 2 leading columns)")


def _read_openpose(path: Path, layout: Layout) -> np.ndarray:
    files = sorted(path.glob("*.json"), key=_natural) if path.is_dir() else [path]
    if not files:
        raise PoseFileError(path, "no *.json keypoint files in the folder")
    frames = []
    for file in files:
        try:
            data = json.loads(file.read_text())
            people = [np.asarray(p["pose_keypoints_2d"], dtype=np.float64).reshape(-1, 3) for p in data["people"]]
        except (OSError, ValueError, KeyError, TypeError) as err:
            raise PoseFileError(file, f"not an OpenPose keypoint file ({type(err).__name__})") from None
        people = [p for p in people if len(p)]
        if people and len(people[0]) != layout.n_joints:
            raise PoseFileError(file, f"{len(people[0])} keypoints per person, layout {layout.name} has "
                                      f"{layout.n_joints}")
        frame = np.full((layout.n_joints, 3), np.nan)
        if people:
            best = max(people, key=lambda p: p[:, 2].sum())
            seen = best[:, 2] > 0
            frame[seen, :2] = best[seen, :2]
            frame[seen, 2] = 0.0
        frames.append(frame)
    return np.stack(frames)


def _read_npy(path: Path, layout: Layout) -> np.ndarray:
    try:
        array = np.load(path, allow_pickle=False)
    except (OSError, ValueError) as err:
        raise PoseFileError(path, f"not a .npy array ({err})") from None
    if array.ndim != 3 or array.shape[1] != layout.n_joints or array.shape[2] not in (2, 3):
        raise PoseFileError(path, f"array of shape {array.shape}; expected (frames, {layout.n_joints}, 2 or 3) "
                                  f"for layout {layout.name}")
    if array.shape[2] == 2:
        array = np.concatenate([array, np.zeros(array.shape[:2] + (1,))], axis=2)
    return array.astype(np.float64)


def _natural(path: Path) -> tuple:
    return tuple(int(p) if p.isdigit() else p for p in re.split(r"(\d+)", path.name))
