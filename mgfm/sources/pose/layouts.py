"""Named joint layouts: the joints of a recorded skeleton in file order, the bones drawn between them, the
head (drawn as a disc) and the view (which coordinate axes become the image's x and y).

A layout names what a file does not say itself. BVH files carry their own hierarchy (:data:`BVH`: joints
and bones come from the file); Kinect-style joint text files and OpenPose keypoint JSON only hold numbers,
so the set's layout is named when its shards are built (``--layout kinect-v1``).
"""

from __future__ import annotations

from dataclasses import dataclass

from mgfm.errors import InputError

AXES = ("x", "y", "z")


@dataclass(frozen=True)
class Layout:
    """A skeleton's joints (file order), bones as joint-index pairs, and how it is seen.

    ``view`` is two signed axis names: the image's horizontal and vertical (downwards) directions, e.g.
    ``("x", "-y")`` for a y-up recording seen from the front, ``("x", "y")`` for image coordinates.
    ``values`` is how many numbers a joint has per frame in a text file (3: x y z; 4: x y z and a tracking
    confidence, which is dropped); ``None`` lets the reader infer 3 or 4 from the line length.
    """

    name: str
    joints: tuple[str, ...]
    bones: tuple[tuple[int, int], ...]
    head: int | None
    view: tuple[str, str] = ("x", "-y")
    values: int | None = None

    def __post_init__(self) -> None:
        bad = [b for b in self.bones if not all(0 <= j < len(self.joints) for j in b)]
        if bad:
            raise ValueError(f"layout {self.name}: bones {bad} name joints outside 0..{len(self.joints) - 1}")
        parse_view(self.view)

    @property
    def n_joints(self) -> int:
        return len(self.joints)


def parse_view(view: tuple[str, str] | str) -> tuple[tuple[int, float], tuple[int, float]]:
    """``("x", "-y")`` or ``"x,-y"`` -> ((axis index, sign), (axis index, sign)) for image x and y."""
    parts = tuple(p.strip() for p in view.split(",")) if isinstance(view, str) else tuple(view)
    out = []
    for part in parts:
        sign = -1.0 if part.startswith("-") else 1.0
        axis = part.lstrip("+-")
        if axis not in AXES:
            raise InputError(f"pose view {','.join(parts)!r}: expected two signed axes such as x,-y")
        out.append((AXES.index(axis), sign))
    if len(out) != 2 or out[0][0] == out[1][0]:
        raise InputError(f"pose view {','.join(parts)!r}: expected two different signed axes such as x,-y")
    return out[0], out[1]


def _bones(joints: tuple[str, ...], pairs: list[tuple[str, str]]) -> tuple[tuple[int, int], ...]:
    return tuple((joints.index(a), joints.index(b)) for a, b in pairs)


# Kinect v1 (SDK 1.x NUI_SKELETON_POSITION order): UTKinect-Action3D, MSRC-12, G3D, UTD-MHAD, ...
_KINECT_V1 = ("hip_center", "spine", "shoulder_center", "head", "shoulder_left", "elbow_left", "wrist_left",
              "hand_left", "shoulder_right", "elbow_right", "wrist_right", "hand_right", "hip_left", "knee_left",
              "ankle_left", "foot_left", "hip_right", "knee_right", "ankle_right", "foot_right")
KINECT_V1 = Layout("kinect-v1", _KINECT_V1, _bones(_KINECT_V1, [
    ("hip_center", "spine"), ("spine", "shoulder_center"), ("shoulder_center", "head"),
    ("shoulder_center", "shoulder_left"), ("shoulder_left", "elbow_left"), ("elbow_left", "wrist_left"),
    ("wrist_left", "hand_left"), ("shoulder_center", "shoulder_right"), ("shoulder_right", "elbow_right"),
    ("elbow_right", "wrist_right"), ("wrist_right", "hand_right"), ("hip_center", "hip_left"),
    ("hip_left", "knee_left"), ("knee_left", "ankle_left"), ("ankle_left", "foot_left"), ("hip_center", "hip_right"),
    ("hip_right", "knee_right"), ("knee_right", "ankle_right"), ("ankle_right", "foot_right")]), head=3)

# Kinect v2 (SDK 2.0 JointType order, 25 joints)
_KINECT_V2 = ("spine_base", "spine_mid", "neck", "head", "shoulder_left", "elbow_left", "wrist_left", "hand_left",
              "shoulder_right", "elbow_right", "wrist_right", "hand_right", "hip_left", "knee_left", "ankle_left",
              "foot_left", "hip_right", "knee_right", "ankle_right", "foot_right", "spine_shoulder", "hand_tip_left",
              "thumb_left", "hand_tip_right", "thumb_right")
KINECT_V2 = Layout("kinect-v2", _KINECT_V2, _bones(_KINECT_V2, [
    ("spine_base", "spine_mid"), ("spine_mid", "spine_shoulder"), ("spine_shoulder", "neck"), ("neck", "head"),
    ("spine_shoulder", "shoulder_left"), ("shoulder_left", "elbow_left"), ("elbow_left", "wrist_left"),
    ("wrist_left", "hand_left"), ("hand_left", "hand_tip_left"), ("wrist_left", "thumb_left"),
    ("spine_shoulder", "shoulder_right"), ("shoulder_right", "elbow_right"), ("elbow_right", "wrist_right"),
    ("wrist_right", "hand_right"), ("hand_right", "hand_tip_right"), ("wrist_right", "thumb_right"),
    ("spine_base", "hip_left"), ("hip_left", "knee_left"), ("knee_left", "ankle_left"), ("ankle_left", "foot_left"),
    ("spine_base", "hip_right"), ("hip_right", "knee_right"), ("knee_right", "ankle_right"),
    ("ankle_right", "foot_right")]), head=3)

# OpenPose BODY_25 (its default model; iMiGUE ships OpenPose keypoints): image coordinates, y down
_BODY25 = ("nose", "neck", "r_shoulder", "r_elbow", "r_wrist", "l_shoulder", "l_elbow", "l_wrist", "mid_hip", "r_hip",
           "r_knee", "r_ankle", "l_hip", "l_knee", "l_ankle", "r_eye", "l_eye", "r_ear", "l_ear", "l_big_toe",
           "l_small_toe", "l_heel", "r_big_toe", "r_small_toe", "r_heel")
OPENPOSE_BODY25 = Layout("openpose-body25", _BODY25, _bones(_BODY25, [
    ("neck", "nose"), ("neck", "r_shoulder"), ("r_shoulder", "r_elbow"), ("r_elbow", "r_wrist"),
    ("neck", "l_shoulder"), ("l_shoulder", "l_elbow"), ("l_elbow", "l_wrist"), ("neck", "mid_hip"),
    ("mid_hip", "r_hip"), ("r_hip", "r_knee"), ("r_knee", "r_ankle"), ("mid_hip", "l_hip"), ("l_hip", "l_knee"),
    ("l_knee", "l_ankle"), ("l_ankle", "l_heel"), ("l_ankle", "l_big_toe"), ("l_big_toe", "l_small_toe"),
    ("r_ankle", "r_heel"), ("r_ankle", "r_big_toe"), ("r_big_toe", "r_small_toe")]), head=0, view=("x", "y"))

# OpenPose COCO (18 keypoints; the COCO model's order, with a neck)
_COCO18 = ("nose", "neck", "r_shoulder", "r_elbow", "r_wrist", "l_shoulder", "l_elbow", "l_wrist", "r_hip", "r_knee",
           "r_ankle", "l_hip", "l_knee", "l_ankle", "r_eye", "l_eye", "r_ear", "l_ear")
OPENPOSE_COCO18 = Layout("openpose-coco18", _COCO18, _bones(_COCO18, [
    ("neck", "nose"), ("neck", "r_shoulder"), ("r_shoulder", "r_elbow"), ("r_elbow", "r_wrist"),
    ("neck", "l_shoulder"), ("l_shoulder", "l_elbow"), ("l_elbow", "l_wrist"), ("neck", "r_hip"), ("r_hip", "r_knee"),
    ("r_knee", "r_ankle"), ("neck", "l_hip"), ("l_hip", "l_knee"), ("l_knee", "l_ankle")]), head=0, view=("x", "y"))

# BVH motion capture: the file's own hierarchy gives the joints and bones (this entry only names the view:
# BVH is y-up, seen from the front)
BVH = Layout("bvh", (), (), head=None, view=("x", "-y"))

LAYOUTS: dict[str, Layout] = {lay.name: lay for lay in (KINECT_V1, KINECT_V2, OPENPOSE_BODY25, OPENPOSE_COCO18, BVH)}


def get_layout(name: str) -> Layout:
    """The layout called ``name``; a one-line error listing the known ones otherwise."""
    try:
        return LAYOUTS[name]
    except KeyError:
        raise InputError(f"unknown pose layout {name!r}; known: {', '.join(LAYOUTS)}") from None
