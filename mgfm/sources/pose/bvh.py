"""BVH motion capture: the hierarchy, the motion channels, and world joint positions by forward kinematics.

A BVH file holds a joint tree (``ROOT`` / ``JOINT`` / ``End Site``, each with an ``OFFSET`` from its parent
and its ``CHANNELS``) and a ``MOTION`` block of one line of channel values per frame. Rotations are Euler
angles in degrees applied in the order the channels list them (``Zrotation Xrotation Yrotation`` is
R = Rz Rx Ry, intrinsic); a joint's world position is its parent's plus the parent's world rotation applied
to its offset (plus its own position channels, usually only the root's).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from scipy.spatial.transform import Rotation

from mgfm.sources.pose.errors import PoseFileError

_POSITIONS = ("Xposition", "Yposition", "Zposition")
_ROTATIONS = ("Xrotation", "Yrotation", "Zrotation")


@dataclass
class _Joint:
    name: str
    parent: int  # -1 for the root
    offset: np.ndarray
    channels: list[str] = field(default_factory=list)
    first_channel: int = 0


def read_bvh(path: str | Path) -> tuple[np.ndarray, list[str], list[tuple[int, int]], float]:
    """World joint positions of a BVH file.

    Returns:
        joints: (T, J, 3) float32, in the file's units and axes (J counts end sites too).
        names: J joint names (an end site is ``<parent>_end``).
        bones: (parent, child) index pairs of the hierarchy.
        fps: 1 / ``Frame Time``.
    """
    path = Path(path)
    try:
        text = path.read_text(errors="replace")
    except OSError as err:
        raise PoseFileError(path, f"cannot read: {err.strerror or err}") from None
    tokens = text.split()
    if not tokens or tokens[0] != "HIERARCHY":
        raise PoseFileError(path, "not a BVH file (it does not start with HIERARCHY)")
    joints, pos = _parse_hierarchy(path, tokens)
    frames, frame_time, values = _parse_motion(path, tokens, pos, sum(len(j.channels) for j in joints))
    return (_forward_kinematics(joints, values).astype(np.float32), [j.name for j in joints],
            [(j.parent, i) for i, j in enumerate(joints) if j.parent >= 0], 1.0 / frame_time)


def _parse_hierarchy(path: Path, tokens: list[str]) -> tuple[list[_Joint], int]:
    joints: list[_Joint] = []
    stack: list[int] = []
    channel = 0
    i = 1
    try:
        while tokens[i] != "MOTION":
            word = tokens[i]
            if word in ("ROOT", "JOINT"):
                name = tokens[i + 1]
                i += 2
            elif word == "End":  # "End Site"
                name = f"{joints[stack[-1]].name}_end"
                i += 2
            elif word == "{":
                i += 1
                continue
            elif word == "}":
                stack.pop()
                i += 1
                continue
            else:
                raise PoseFileError(path, f"unexpected word {word!r} in the HIERARCHY")
            if tokens[i] != "{" or tokens[i + 1] != "OFFSET":
                raise PoseFileError(path, f"joint {name!r}: expected '{{ OFFSET x y z'")
            offset = np.array([float(t) for t in tokens[i + 2:i + 5]])
            i += 5
            joint = _Joint(name, stack[-1] if stack else -1, offset, first_channel=channel)
            if tokens[i] == "CHANNELS":
                count = int(tokens[i + 1])
                joint.channels = tokens[i + 2:i + 2 + count]
                unknown = [c for c in joint.channels if c not in _POSITIONS + _ROTATIONS]
                if unknown:
                    raise PoseFileError(path, f"joint {name!r}: unknown channel {unknown[0]!r}")
                channel += count
                i += 2 + count
            if joint.parent < 0 and joints:
                raise PoseFileError(path, "more than one ROOT (only one skeleton per file is read)")
            joints.append(joint)
            stack.append(len(joints) - 1)
    except (IndexError, ValueError):
        raise PoseFileError(path, "truncated or malformed HIERARCHY") from None
    if not joints:
        raise PoseFileError(path, "no joints in the HIERARCHY")
    return joints, i


def _parse_motion(path: Path, tokens: list[str], pos: int, n_channels: int) -> tuple[int, float, np.ndarray]:
    try:
        if tokens[pos + 1] != "Frames:" or tokens[pos + 3:pos + 5] != ["Frame", "Time:"]:
            raise ValueError
        frames = int(tokens[pos + 2])
        frame_time = float(tokens[pos + 5])
    except (IndexError, ValueError):
        raise PoseFileError(path, "MOTION block without 'Frames: N' and 'Frame Time: S'") from None
    if frames < 1 or not frame_time > 0:
        raise PoseFileError(path, f"MOTION block with {frames} frames of {frame_time} s")
    body = tokens[pos + 6:]
    complete = len(body) // n_channels if n_channels else 0
    if complete < 1:
        raise PoseFileError(path, f"no complete frame of {n_channels} channel values in the MOTION block")
    try:
        values = np.asarray(body[:complete * n_channels], dtype=np.float64).reshape(complete, n_channels)
    except ValueError:
        raise PoseFileError(path, "non-numeric values in the MOTION block") from None
    if not np.isfinite(values).all():
        raise PoseFileError(path, "NaN or infinite values in the MOTION block")
    # a file cut short keeps the frames it has (real archives hold a few such files); more frames than
    # announced are read too
    return complete, frame_time, values


def _forward_kinematics(joints: list[_Joint], values: np.ndarray) -> np.ndarray:
    """(T, J, 3) world positions from the channel values (T, C)."""
    n = len(values)
    positions = np.zeros((n, len(joints), 3))
    rotations: list[Rotation] = []
    for k, joint in enumerate(joints):
        local = np.broadcast_to(joint.offset, (n, 3)).copy()
        order, angles = "", []
        for c, name in enumerate(joint.channels):
            column = values[:, joint.first_channel + c]
            if name in _POSITIONS:
                local[:, _POSITIONS.index(name)] += column
            else:
                order += name[0]
                angles.append(column)
        own = Rotation.from_euler(order, np.stack(angles, axis=1), degrees=True) if order else Rotation.identity(n)
        if joint.parent < 0:
            positions[:, k] = local
            rotations.append(own)
        else:
            parent = rotations[joint.parent]
            positions[:, k] = positions[:, joint.parent] + parent.apply(local)
            rotations.append(parent * own)
    return positions
