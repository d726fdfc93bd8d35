"""The synthetic figure: what a subject looks like (:class:`SubjectLook`) and how it is posed (:class:`Pose`).

Body coordinates ("units"): 1 unit = head height. The origin is the centre of the torso at the height
of the far table edge; x points to the image right (the subject's *left*, the figure faces the camera)
and y points down, as in an image. A camera (scale, offset; see ``render.py``) maps units to pixels.

The side sign of a hand is ``RIGHT = -1`` (image left) and ``LEFT = +1``. Everything a subject looks
like and how it moves is drawn from a random stream keyed by the subject id only, never by the
emotion of a video, so appearance carries no information about emotion.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

RIGHT, LEFT = -1, 1
SIDES = (RIGHT, LEFT)

# Layers a hand can be drawn in (see render.py): in front of everything, behind the table, behind the torso.
FRONT, UNDER, BEHIND = 0, 1, 2
# Hand shapes.
OPEN, FIST, POINT, FINGERS_UP, INTERLOCK = 0, 1, 2, 3, 4

_NATIONALITIES = ("United States", "Spain", "China", "France", "Germany", "Japan", "Australia", "Serbia",
                  "Canada", "Italy", "Russia", "Switzerland", "United Kingdom", "Argentina", "Brazil")
_HAIR_STYLES = ("short", "short", "long", "bald", "bun")
_BG_PATTERNS = ("plain", "gradient", "logos", "logos", "stripes", "panels")

Color = tuple[int, int, int]


@dataclass(frozen=True)
class SubjectLook:
    """Appearance, proportions, camera and movement style of one synthetic subject (all in body units)."""

    subject_id: int
    gender: str
    nationality: str
    handedness: int  # side sign of the dominant hand
    dominance: float  # probability a one-handed gesture uses the dominant hand
    # proportions
    head_w: float
    neck_len: float
    neck_w: float
    torso_len: float
    shoulder_half: float
    waist_half: float
    upper_arm: float
    forearm: float
    arm_w: float
    hand_len: float
    hand_w: float
    # colours (RGB)
    skin: Color
    hair: Color
    hair_style: str
    hat: Color | None
    jacket: Color
    shirt: Color
    tie: Color | None
    short_sleeves: bool
    bg_base: Color
    bg_accent: Color
    bg_pattern: str
    bg_period: float  # pattern period as a fraction of the frame width
    chair: Color
    table: Color
    table_front: Color
    table_depth: float
    mic_x: float | None
    object_kind: str  # "pen" or "bottle"
    object_color: Color
    object_x: float
    # camera (for a 128-pixel-high frame; scaled with the frame)
    cam_scale: float  # pixels per unit
    cam_x: float  # horizontal offset of the body centre, fraction of the frame width
    cam_y: float  # far table edge, fraction of the frame height
    # movement style
    speed: float
    amplitude: float
    sway: float
    reach_frames: float
    rest_apart: float
    rest_forward: float


def _color(rng: np.random.Generator, lo: int = 0, hi: int = 256) -> Color:
    return tuple(int(v) for v in rng.integers(lo, hi, size=3))  # type: ignore[return-value]


def _skin(rng: np.random.Generator) -> Color:
    """A skin tone on a light-to-dark ramp with a little hue jitter."""
    light, dark = np.array([236, 200, 170]), np.array([95, 60, 40])
    tone = light + rng.uniform(0, 1) * (dark - light) + rng.normal(0, 6, 3)
    return tuple(int(v) for v in np.clip(tone, 0, 255))  # type: ignore[return-value]


def _near(base: Color, rng: np.random.Generator, spread: float) -> Color:
    return tuple(int(v) for v in np.clip(np.array(base) + rng.normal(0, spread, 3), 0, 255))  # type: ignore


def sample_subject(seed: int, subject_id: int) -> SubjectLook:
    """Draw one subject's look from a stream keyed by ``(seed, subject_id)`` only."""
    rng = np.random.default_rng([seed, 101, subject_id])
    gender = "F" if rng.random() < 0.45 else "M"
    g = 0.92 if gender == "F" else 1.0
    hair_style = _HAIR_STYLES[rng.integers(len(_HAIR_STYLES))]
    if gender == "F" and hair_style == "bald":
        hair_style = "long"
    hair_palette = ((30, 22, 18), (70, 45, 25), (120, 80, 40), (200, 165, 100), (150, 150, 150), (15, 15, 15))
    jacket = _color(rng, 10, 200)
    shirt = _near((235, 235, 235), rng, 12) if rng.random() < 0.7 else _color(rng, 60, 256)
    short_sleeves = bool(rng.random() < 0.35)  # a sports shirt: no jacket, bare forearms
    if short_sleeves:
        shirt = jacket
    bg_base = _color(rng, 40, 230)
    return SubjectLook(
        subject_id=subject_id,
        gender=gender,
        nationality=_NATIONALITIES[rng.integers(len(_NATIONALITIES))],
        handedness=RIGHT if rng.random() < 0.8 else LEFT,
        dominance=float(rng.uniform(0.7, 0.9)),
        head_w=float(rng.uniform(0.70, 0.84)),
        neck_len=float(rng.uniform(0.25, 0.42)),
        neck_w=float(rng.uniform(0.30, 0.40) * g),
        torso_len=float(rng.uniform(1.5, 1.85) * g),
        shoulder_half=float(rng.uniform(0.85, 1.05) * g),
        waist_half=float(rng.uniform(0.65, 0.82) * g),
        upper_arm=float(rng.uniform(1.15, 1.35) * g),
        forearm=float(rng.uniform(1.0, 1.15) * g),
        arm_w=float(rng.uniform(0.26, 0.34) * g),
        hand_len=float(rng.uniform(0.38, 0.46) * g),
        hand_w=float(rng.uniform(0.22, 0.28) * g),
        skin=_skin(rng),
        hair=_near(hair_palette[rng.integers(len(hair_palette))], rng, 8),
        hair_style=hair_style,
        hat=_color(rng, 20, 230) if rng.random() < 0.2 else None,
        jacket=jacket,
        shirt=shirt,
        tie=_color(rng, 20, 220) if (not short_sleeves and rng.random() < 0.5) else None,
        short_sleeves=short_sleeves,
        bg_base=bg_base,
        bg_accent=_color(rng, 0, 256),
        bg_pattern=_BG_PATTERNS[rng.integers(len(_BG_PATTERNS))],
        bg_period=float(rng.uniform(0.12, 0.3)),
        chair=_color(rng, 10, 120),
        table=_color(rng, 60, 250),
        table_front=_color(rng, 20, 200),
        table_depth=float(rng.uniform(0.7, 1.0)),
        mic_x=float(rng.choice([-1, 1]) * rng.uniform(0.5, 1.1)) if rng.random() < 0.7 else None,
        object_kind="pen" if rng.random() < 0.5 else "bottle",
        object_color=_color(rng, 0, 256),
        object_x=float(rng.choice([-1, 1]) * rng.uniform(0.3, 0.8)),
        cam_scale=float(rng.uniform(22.0, 27.0)),
        cam_x=float(rng.uniform(-0.06, 0.06)),
        cam_y=float(rng.uniform(0.76, 0.82)),
        speed=float(np.exp(rng.normal(0.0, 0.2))),
        amplitude=float(np.exp(rng.normal(0.0, 0.2))),
        sway=float(rng.uniform(0.02, 0.07)),
        reach_frames=float(rng.uniform(7.0, 11.0)),
        rest_apart=float(rng.uniform(0.25, 0.65)),
        rest_forward=float(rng.uniform(0.2, 0.45)),
    )


class HandPose:
    """Where one hand goes this frame: a target blended with the resting position by weight ``w``."""

    __slots__ = ("rest_x", "rest_y", "x", "y", "w", "shape", "layer", "elbow_x", "elbow_y", "angle")

    def __init__(self) -> None:
        self.reset(0.0, 0.0, 1.0)

    def reset(self, rest_x: float, rest_y: float, side: int) -> None:
        self.rest_x, self.rest_y = rest_x, rest_y
        self.x, self.y, self.w = rest_x, rest_y, 0.0
        self.shape, self.layer = OPEN, FRONT
        self.elbow_x, self.elbow_y = float(side), 0.8  # preferred elbow direction (outwards, down)
        self.angle: float | None = None  # finger direction (radians); None = along the forearm

    def go(self, x: float, y: float, w: float, shape: int = OPEN, layer: int = FRONT,
           elbow: tuple[float, float] | None = None, angle: float | None = None) -> None:
        """Move the hand towards (x, y) with blend weight ``w`` in [0, 1]."""
        self.x, self.y, self.w = x, y, w
        self.shape = shape if w > 0.3 else self.shape
        if w > 0.5:
            self.layer = layer
        if elbow is not None:
            self.elbow_x, self.elbow_y = elbow
        if angle is not None and w > 0.3:
            self.angle = angle

    @property
    def pos(self) -> tuple[float, float]:
        return (self.rest_x + self.w * (self.x - self.rest_x), self.rest_y + self.w * (self.y - self.rest_y))


class Pose:
    """The pose of the figure in one frame (body units, radians). ``hands[0]`` is RIGHT, ``hands[1]`` LEFT.

    Idle motion fills the fields first; an active gesture then adds to them and sets hand targets.
    """

    __slots__ = ("torso_dx", "torso_dy", "torso_roll", "chest", "sh_dy", "neck", "head_dx", "head_dy",
                 "head_roll", "head_pitch", "jaw", "hands", "obj_dx", "obj_dy", "obj_angle", "tie_dy", "look")

    def __init__(self, look: SubjectLook):
        self.look = look
        self.hands = [HandPose(), HandPose()]
        self.sh_dy = [0.0, 0.0]
        self.clear()

    def clear(self) -> None:
        self.torso_dx = self.torso_dy = self.torso_roll = self.chest = 0.0
        self.sh_dy[0] = self.sh_dy[1] = 0.0
        self.neck = 1.0
        self.head_dx = self.head_dy = self.head_roll = self.head_pitch = self.jaw = 0.0
        self.obj_dx = self.obj_dy = self.obj_angle = self.tie_dy = 0.0

    def hand(self, side: int) -> HandPose:
        return self.hands[0 if side == RIGHT else 1]

    def skeleton(self) -> "Skeleton":
        """Joint positions of the trunk and head for the current pose (arms are solved by the renderer)."""
        return Skeleton(self)


class Skeleton:
    """Trunk and head joints of a :class:`Pose`, plus named anchor points gestures aim the hands at."""

    __slots__ = ("neck_base", "shoulders", "neck_top", "head", "head_roll", "look", "torso_roll", "base")

    def __init__(self, pose: Pose):
        lk = pose.look
        self.look = lk
        self.torso_roll = r = pose.torso_roll
        c, s = math.cos(r), math.sin(r)
        # The trunk pivots about its base (which slides a little with the sway); the neck base sits
        # torso_len above it, rotated by the roll, plus the rest of the sway and the vertical shift.
        bx = 0.35 * pose.torso_dx
        self.base = (bx, 0.0)
        nx = bx + s * lk.torso_len + 0.65 * pose.torso_dx
        ny = -c * lk.torso_len + pose.torso_dy
        self.neck_base = (nx, ny)
        half = lk.shoulder_half * (1.0 + pose.chest)
        self.shoulders = (
            (nx - c * half - s * (0.12 + pose.sh_dy[0]), ny - s * half + c * (0.12 + pose.sh_dy[0])),
            (nx + c * half - s * (0.12 + pose.sh_dy[1]), ny + s * half + c * (0.12 + pose.sh_dy[1])),
        )
        neck_len = lk.neck_len * pose.neck
        hr = r + pose.head_roll
        self.head_roll = hr
        tx = nx + math.sin(hr) * neck_len * 0.8 + pose.head_dx * 0.3
        ty = ny - math.cos(hr) * neck_len
        self.neck_top = (tx, ty)
        self.head = (tx + math.sin(hr) * 0.45 + pose.head_dx, ty - math.cos(hr) * 0.45 + pose.head_dy)

    def head_point(self, u: float, v: float) -> tuple[float, float]:
        """A point in the head frame: ``u`` across (units of half head width), ``v`` down (units of head height)."""
        c, s = math.cos(self.head_roll), math.sin(self.head_roll)
        x, y = u * self.look.head_w * 0.5, v
        return (self.head[0] + c * x - s * y, self.head[1] + s * x + c * y)

    def torso_point(self, u: float, v: float) -> tuple[float, float]:
        """A point on the torso: ``u`` across (units of shoulder half-width), ``v`` down from the neck base."""
        c, s = math.cos(self.torso_roll), math.sin(self.torso_roll)
        x, y = u * self.look.shoulder_half, v
        return (self.neck_base[0] + c * x - s * y, self.neck_base[1] + s * x + c * y)

    def shoulder(self, side: int) -> tuple[float, float]:
        return self.shoulders[0 if side == RIGHT else 1]


def solve_elbow(shoulder: tuple[float, float], wrist: tuple[float, float], upper: float, fore: float,
                hint: tuple[float, float]) -> tuple[tuple[float, float], tuple[float, float]]:
    """Two-link arm in the image plane -> (elbow, wrist).

    The arm is foreshortened (it also reaches towards the camera), so the effective link lengths shrink
    with the shoulder-wrist distance; of the two elbow solutions the one along ``hint`` is chosen.
    """
    sx, sy = shoulder
    dx, dy = wrist[0] - sx, wrist[1] - sy
    d = math.hypot(dx, dy)
    total = upper + fore
    reach = total * 0.98
    if d > reach:
        dx, dy = dx * reach / d, dy * reach / d
        d = reach
    d = max(d, 1e-3)
    eff = min(total, max(d / 0.8, total * 0.6))
    a, b = upper * eff / total, fore * eff / total
    cos_a = max(-1.0, min(1.0, (a * a + d * d - b * b) / (2 * a * d)))
    ang = math.acos(cos_a)
    ux, uy = dx / d, dy / d
    best = None
    for sgn in (1.0, -1.0):
        ca, sa = math.cos(sgn * ang), math.sin(sgn * ang)
        ex, ey = ux * ca - uy * sa, ux * sa + uy * ca
        score = ex * hint[0] + ey * hint[1]
        if best is None or score > best[0]:
            best = (score, (sx + a * ex, sy + a * ey))
    return best[1], (sx + dx, sy + dy)
