"""The 32 iMiGUE classes as motions of the synthetic figure, plus the idle motion between them.

A gesture is a function ``(pose, motion, t)`` that adds to the idle pose of frame ``t`` of its clip
(0 <= t < motion.length): it moves the trunk/head fields of :class:`~.body.Pose` first and then aims
hands at anchor points of the resulting skeleton (forehead, chin, an ear, the other arm, ...). Every
gesture ramps in over ``motion.ramp`` frames, does its characteristic movement and returns to rest, so
the annotated span covers the whole movement. :data:`GESTURES` lists them in the order of
:data:`mgfm.sources.imigue.CLASS_NAMES`.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable

import numpy as np

from mgfm.sources.synthetic.body import (BEHIND, FINGERS_UP, FIST, FRONT, INTERLOCK, LEFT, OPEN, POINT, RIGHT, SIDES,
                                      UNDER, Pose, SubjectLook, solve_elbow)

TWO_PI = 2.0 * math.pi
UP = -math.pi / 2  # finger direction pointing up in the image


@dataclass(frozen=True)
class Motion:
    """Per-clip randomness and timing of one gesture instance.

    Attributes:
        length: clip length in frames; ramp: frames to reach (and to leave) the gesture pose.
        side: the acting hand for one-handed gestures (RIGHT/LEFT); amp: amplitude factor.
        rate: frequency factor (subject speed x clip jitter); phase: oscillation phase (radians).
        jitter: 8 standard-normal numbers for small target offsets; u: 8 uniforms for variants.
    """

    length: int
    ramp: float
    fps: float
    side: int
    amp: float
    rate: float
    phase: float
    jitter: tuple[float, ...]
    u: tuple[float, ...]

    def env(self, t: float) -> float:
        """0 -> 1 over the ramp, 1 while holding, back to 0 at the last frame (smoothstep edges)."""
        up = min(1.0, t / self.ramp)
        down = min(1.0, max(0.0, (self.length - 1 - t) / self.ramp))
        a = min(up, down)
        return a * a * (3.0 - 2.0 * a)

    def osc(self, t: float, hz: float, phase: float = 0.0) -> float:
        """A sinusoid at ``hz`` (scaled by the clip's rate)."""
        return math.sin(TWO_PI * hz * self.rate * t / self.fps + self.phase + phase)


def make_motion(look: SubjectLook, length: int, fps: float, seed: int) -> Motion:
    """Sample a clip's :class:`Motion` from its seed (deterministic)."""
    rng = np.random.default_rng([seed, 7])
    side = look.handedness if rng.random() < look.dominance else -look.handedness
    ramp = min(0.4 * (length - 1), look.reach_frames / look.speed * rng.uniform(0.8, 1.25))
    return Motion(
        length=length,
        ramp=max(1.0, ramp),
        fps=fps,
        side=side,
        amp=look.amplitude * float(rng.uniform(0.8, 1.2)),
        rate=look.speed * float(rng.uniform(0.85, 1.15)),
        phase=float(rng.uniform(0.0, TWO_PI)),
        jitter=tuple(float(v) for v in rng.normal(0.0, 1.0, 8)),
        u=tuple(float(v) for v in rng.uniform(0.0, 1.0, 8)),
    )


Gesture = Callable[[Pose, Motion, int], None]


# ----------------------------------------------------------------------------- trunk and head only
def turtle_neck(p: Pose, m: Motion, t: int) -> None:
    e = m.env(t) * m.amp
    p.neck -= 0.6 * e
    p.sh_dy[0] -= 0.12 * e
    p.sh_dy[1] -= 0.12 * e
    p.head_dy += 0.06 * e
    p.head_pitch -= 0.12 * e


def deep_breath(p: Pose, m: Motion, t: int) -> None:
    breaths = max(1, round(m.length / 60))
    b = 0.5 - 0.5 * math.cos(TWO_PI * breaths * t / max(1, m.length - 1))
    b *= m.amp
    p.chest += 0.08 * b
    p.sh_dy[0] -= 0.12 * b
    p.sh_dy[1] -= 0.12 * b
    p.torso_dy -= 0.06 * b
    p.head_pitch += 0.15 * b


def move_torso(p: Pose, m: Motion, t: int) -> None:
    e = m.env(t) * m.amp
    d = 1.0 if m.u[0] < 0.5 else -1.0
    shift = d * 0.3 * e * math.cos(TWO_PI * 0.35 * m.rate * t / m.fps)
    p.torso_dx += shift
    p.torso_roll += 0.25 * shift
    p.torso_dy += 0.05 * e * abs(m.osc(t, 0.7))
    p.head_roll -= 0.1 * shift


def sit_straight(p: Pose, m: Motion, t: int) -> None:
    e = m.env(t) * m.amp
    p.torso_dy -= 0.2 * e
    p.chest += 0.05 * e
    p.sh_dy[0] += 0.03 * e
    p.sh_dy[1] += 0.03 * e
    p.head_pitch += 0.08 * e
    p.head_dy -= 0.03 * e


def head_up(p: Pose, m: Motion, t: int) -> None:
    e = m.env(t) * m.amp
    p.head_pitch += 0.4 * e
    p.head_dy -= 0.08 * e
    p.neck += 0.2 * e


def bite_lip(p: Pose, m: Motion, t: int) -> None:
    e = m.env(t) * m.amp
    p.jaw += 0.16 * e * (0.6 + 0.4 * abs(m.osc(t, 1.5)))
    p.head_pitch -= 0.1 * e
    p.head_dy += 0.03 * e


def shake_shoulder(p: Pose, m: Motion, t: int) -> None:
    e = m.env(t) * m.amp
    s = m.osc(t, 2.5)
    if m.u[0] < 0.5:  # both shoulders shrug together
        p.sh_dy[0] -= 0.1 * e * (0.5 + 0.5 * s)
        p.sh_dy[1] -= 0.1 * e * (0.5 + 0.5 * s)
    else:  # alternating
        p.sh_dy[0] -= 0.1 * e * s
        p.sh_dy[1] += 0.1 * e * s
    p.torso_dy -= 0.02 * e * s


# ----------------------------------------------------------------------------- one hand to the head
def _to_head(p: Pose, m: Motion, t: int, u: float, v: float, shape: int = OPEN,
             du: float = 0.0, dv: float = 0.0, angle: float | None = None) -> None:
    sk = p.skeleton()
    x, y = sk.head_point(m.side * u + 0.08 * m.jitter[0] + du, v + 0.04 * m.jitter[1] + dv)
    p.hand(m.side).go(x, y, m.env(t), shape, FRONT, (m.side * 0.4, 1.0), angle)


def touch_hat(p: Pose, m: Motion, t: int) -> None:
    _to_head(p, m, t, 0.3, -0.62, OPEN, dv=0.05 * m.amp * m.osc(t, 2.2), angle=UP - m.side * 1.2)


def touch_face(p: Pose, m: Motion, t: int) -> None:
    _to_head(p, m, t, 0.85, 0.15, OPEN, dv=0.06 * m.amp * m.osc(t, 1.2), angle=UP + m.side * 0.35)


def touch_forehead(p: Pose, m: Motion, t: int) -> None:
    _to_head(p, m, t, 0.25, -0.3, OPEN, du=0.25 * m.amp * m.osc(t, 1.6), angle=UP - m.side * 0.9)


def rub_eyes(p: Pose, m: Motion, t: int) -> None:
    p.head_pitch -= 0.06 * m.env(t)
    _to_head(p, m, t, 0.38, -0.04, FIST, du=0.12 * m.amp * m.osc(t, 2.8),
             dv=0.04 * m.amp * m.osc(t, 2.8, math.pi / 2), angle=UP)


def touch_other_face_part(p: Pose, m: Motion, t: int) -> None:
    v = 0.12 if m.u[1] < 0.6 else 0.28  # nose or mouth
    _to_head(p, m, t, 0.12, v, POINT, du=0.06 * m.amp * m.osc(t, 1.8), angle=UP - m.side * 0.5)


def touch_ears(p: Pose, m: Motion, t: int) -> None:
    p.head_roll += m.side * 0.07 * m.env(t)
    _to_head(p, m, t, 1.12, 0.0, FIST, dv=0.05 * m.amp * m.osc(t, 2.0), angle=UP)


def bite_nails(p: Pose, m: Motion, t: int) -> None:
    p.head_pitch -= 0.1 * m.env(t)
    _to_head(p, m, t, 0.1, 0.32, FIST, du=0.03 * m.amp * m.osc(t, 4.5), dv=0.03 * m.amp * m.osc(t, 5.5),
             angle=UP)


def touch_chin(p: Pose, m: Motion, t: int) -> None:
    p.head_roll -= m.side * 0.05 * m.env(t)
    _to_head(p, m, t, 0.1, 0.64, FIST, dv=0.03 * m.amp * m.osc(t, 0.8), angle=UP)


def play_hair(p: Pose, m: Motion, t: int) -> None:
    p.head_roll += m.side * 0.06 * m.env(t)
    a = 0.5 + 0.5 * m.osc(t, 0.9)
    _to_head(p, m, t, 0.4 + 0.6 * a, -0.58 + 0.3 * a, OPEN, angle=UP - m.side * 0.8)


def cover_face(p: Pose, m: Motion, t: int) -> None:
    e = m.env(t)
    p.head_pitch -= 0.12 * e
    p.head_dy += 0.05 * e
    sk = p.skeleton()
    for side in SIDES:
        x, y = sk.head_point(side * 0.4, 0.08 + 0.02 * m.osc(t, 0.5))
        p.hand(side).go(x, y, e, FINGERS_UP, FRONT, (side * 0.3, 1.0), UP - side * 0.15)


# ----------------------------------------------------------------------------- hands to neck / trunk
def touch_neck(p: Pose, m: Motion, t: int) -> None:
    e = m.env(t)
    p.head_roll -= m.side * 0.06 * e
    sk = p.skeleton()
    x = 0.5 * (sk.neck_top[0] + sk.neck_base[0]) + m.side * 0.14
    y = 0.5 * (sk.neck_top[1] + sk.neck_base[1]) + 0.06 * m.amp * m.osc(t, 1.4)
    p.hand(m.side).go(x, y, e, OPEN, FRONT, (m.side * 0.4, 1.0), UP - m.side * 0.6)


def adjust_tie(p: Pose, m: Motion, t: int) -> None:
    e = m.env(t)
    pull = 0.07 * m.amp * m.osc(t, 1.3)
    p.neck += 0.15 * e
    p.head_pitch += 0.1 * e
    p.head_roll += 0.05 * e * m.osc(t, 0.65)
    p.tie_dy = pull * e
    sk = p.skeleton()
    for side in SIDES:
        x, y = sk.torso_point(side * 0.1, 0.18 + pull)
        p.hand(side).go(x, y, e, FIST, FRONT, (side, 0.7), UP)


def touch_chest(p: Pose, m: Motion, t: int) -> None:
    sk = p.skeleton()
    x, y = sk.torso_point(m.side * 0.18, 0.6 + 0.04 * m.amp * m.osc(t, 2.0) + 0.05 * m.jitter[2])
    p.hand(m.side).go(x, y, m.env(t), OPEN, FRONT, (m.side, 1.0), UP - m.side * 1.1)


def scratch_back(p: Pose, m: Motion, t: int) -> None:
    e = m.env(t)
    p.head_pitch -= 0.05 * e
    p.torso_roll -= m.side * 0.04 * e
    sk = p.skeleton()
    x, y = sk.torso_point(m.side * 0.25, 0.05 + 0.08 * m.amp * m.osc(t, 3.0))
    p.hand(m.side).go(x, y, e, FIST, BEHIND, (m.side * 0.5, -1.0))


def fold_arm(p: Pose, m: Motion, t: int) -> None:
    e = m.env(t)
    sk = p.skeleton()
    for side in SIDES:
        top = side == m.side
        x, y = sk.torso_point(-side * 0.62, (0.95 if top else 1.08) + 0.01 * m.osc(t, 0.3))
        p.hand(side).go(x, y, e, FIST, FRONT, (side, 1.2))


def put_arm_back(p: Pose, m: Motion, t: int) -> None:
    e = m.env(t)
    side = m.side
    p.sh_dy[0 if side == RIGHT else 1] += 0.07 * e
    p.torso_roll += side * 0.05 * e
    p.chest += 0.03 * e
    sk = p.skeleton()
    x, y = sk.shoulder(side)
    p.hand(side).go(x + side * 0.45, 0.3, e, FIST, BEHIND, (side, 0.2))  # hangs behind the chair


def scratch_arm(p: Pose, m: Motion, t: int) -> None:
    other = -m.side
    sk = p.skeleton()
    sh = sk.shoulder(other)
    rest = p.hand(other)
    elbow, _ = solve_elbow(sh, rest.pos, p.look.upper_arm, p.look.forearm, (other, 0.8))
    a = 0.55 + 0.18 * m.amp * m.osc(t, 3.0)
    x, y = sh[0] + a * (elbow[0] - sh[0]), sh[1] + a * (elbow[1] - sh[1])
    p.hand(m.side).go(x, y, m.env(t), FIST, FRONT, (m.side * 0.3, 1.0))


def arm_akimbo(p: Pose, m: Motion, t: int) -> None:
    e = m.env(t)
    sides = SIDES if m.u[2] < 0.7 else (m.side,)
    sk = p.skeleton()
    for side in sides:
        x, y = sk.torso_point(side * (p.look.waist_half / p.look.shoulder_half + 0.05), p.look.torso_len - 0.2)
        p.hand(side).go(x, y + 0.02 * m.osc(t, 0.4), e, FIST, FRONT, (side, -0.5))
    p.chest += 0.04 * e


# ----------------------------------------------------------------------------- hands at the table
def tidy_sleeve(p: Pose, m: Motion, t: int) -> None:
    e = m.env(t)
    other = -m.side
    sk = p.skeleton()
    ox, oy = other * 0.3, p.look.rest_forward - 0.1
    p.hand(other).go(ox, oy, e, FIST, FRONT, (other, 0.8))
    sh = sk.shoulder(other)
    a = 0.15 + 0.22 * (0.5 + 0.5 * m.osc(t, 1.0))
    p.hand(m.side).go(ox + a * (sh[0] - ox), oy + a * (sh[1] - oy), e, FIST, FRONT, (m.side, 0.8))


def rub_hand(p: Pose, m: Motion, t: int) -> None:
    e = m.env(t)
    cx, cy = 0.05 * m.jitter[3], p.look.rest_forward - 0.05
    s = 0.07 * m.amp * m.osc(t, 2.4)
    c = 0.03 * m.amp * m.osc(t, 2.4, math.pi / 2)
    for side in SIDES:
        p.hand(side).go(cx + side * 0.1 - side * s, cy + side * c, e, OPEN, FRONT, (side, 0.8),
                        math.pi if side == LEFT else 0.0)


def cross_finger(p: Pose, m: Motion, t: int) -> None:
    e = m.env(t)
    cx, cy = 0.05 * m.jitter[3], p.look.rest_forward - 0.28
    w = 0.015 * m.osc(t, 0.8)
    for side in SIDES:
        p.hand(side).go(cx + side * 0.08, cy + w, e, INTERLOCK, FRONT, (side, 1.0))


def minaret_hand(p: Pose, m: Motion, t: int) -> None:
    e = m.env(t)
    cx, cy = 0.05 * m.jitter[3], -0.45 + 0.08 * m.jitter[4]
    tap = 0.03 * m.osc(t, 1.5)
    for side in SIDES:
        p.hand(side).go(cx + side * (0.12 + tap), cy, e, FINGERS_UP, FRONT, (side, 1.0), UP - side * 0.45)


def play_things(p: Pose, m: Motion, t: int) -> None:
    e = m.env(t)
    side = (1 if p.look.object_x > 0 else -1) if m.u[3] < 0.8 else m.side
    ox, oy = p.look.object_x, p.look.rest_forward + 0.12
    grab = max(0.0, min(1.0, (t - m.ramp) / max(1.0, m.ramp)))  # the object moves once the hand holds it
    hold = grab * e
    dx = (0.15 * m.amp * m.osc(t, 0.8) - 0.15 * side) * hold  # picked up, turned over in front of the body
    dy = (0.08 * m.amp * m.osc(t, 0.8, math.pi / 2) - 0.2) * hold
    p.obj_dx, p.obj_dy = dx, dy
    p.obj_angle = 1.5 * m.osc(t, 0.6) * hold
    p.hand(side).go(ox + dx, oy + dy - 0.05, e, FIST, FRONT, (side, 0.8))


def withdraw_arms(p: Pose, m: Motion, t: int) -> None:
    e = m.env(t)
    p.torso_dy += 0.04 * e
    p.sh_dy[0] += 0.04 * e
    p.sh_dy[1] += 0.04 * e
    p.chest -= 0.03 * e
    for side in SIDES:
        p.hand(side).go(side * 0.35, 0.85, e, OPEN, UNDER, (side, 0.5))


def illustrative(p: Pose, m: Motion, t: int) -> None:
    e = m.env(t)
    sides = SIDES if m.u[4] < 0.5 else (m.side,)
    shape = (OPEN, POINT, FIST)[int(m.u[5] * 3)]
    p.head_pitch += 0.05 * e * m.osc(t, 2.0)
    sk = p.skeleton()
    base_y = 0.5 * (sk.neck_base[1] + 0.0) + 0.2 * m.jitter[5]
    for k, side in enumerate(sides):
        f1, f2 = 0.6 + 1.0 * m.u[6], 0.5 + 1.1 * m.u[7]
        ph = 1.7 * k
        x = side * (0.45 + 0.1 * m.jitter[6]) + 0.3 * m.amp * m.osc(t, f1, ph)
        y = base_y + 0.25 * m.amp * m.osc(t, f2, 2.0 + ph)
        p.hand(side).go(x, y, e, shape, FRONT, (side, 1.0))


GESTURES: tuple[Gesture, ...] = (
    turtle_neck, deep_breath, touch_hat, touch_face, touch_forehead, cover_face, rub_eyes, touch_other_face_part,
    touch_ears, bite_nails, touch_chin, touch_neck, play_hair, adjust_tie, touch_chest, scratch_back, fold_arm,
    tidy_sleeve, put_arm_back, move_torso, sit_straight, scratch_arm, rub_hand, cross_finger, minaret_hand,
    play_things, withdraw_arms, head_up, bite_lip, arm_akimbo, shake_shoulder, illustrative,
)  # fmt: skip


# ----------------------------------------------------------------------------- idle motion
@dataclass(frozen=True)
class IdleTrack:
    """Idle motion of a whole video: one float array (n_frames,) per pose field, plus hand rests."""

    torso_dx: np.ndarray
    torso_dy: np.ndarray
    torso_roll: np.ndarray
    sh_dy: np.ndarray  # (n_frames,) breathing, added to both shoulders
    head_dx: np.ndarray
    head_dy: np.ndarray
    head_roll: np.ndarray
    head_pitch: np.ndarray
    hand_x: np.ndarray  # (2, n_frames) resting hand positions, RIGHT then LEFT
    hand_y: np.ndarray


def _smooth(rng: np.random.Generator, t: np.ndarray, amp: float, f_lo: float, f_hi: float, k: int = 3) -> np.ndarray:
    """A smooth random signal: a sum of ``k`` sinusoids with random frequencies in [f_lo, f_hi] Hz."""
    out = np.zeros_like(t)
    for _ in range(k):
        f, ph, a = rng.uniform(f_lo, f_hi), rng.uniform(0, TWO_PI), rng.uniform(0.5, 1.0)
        out += a * np.sin(TWO_PI * f * t + ph)
    return amp * out / k


def idle_motion(look: SubjectLook, n_frames: int, fps: float, seed: int) -> IdleTrack:
    """Small natural motion (sway, breathing, head drift and talking nods, hand drift) for a video."""
    rng = np.random.default_rng([seed, 13])
    t = np.arange(n_frames, dtype=np.float64) / fps
    sp = look.speed
    talk = 0.5 + 0.5 * np.sin(TWO_PI * rng.uniform(0.03, 0.08) * t + rng.uniform(0, TWO_PI))
    apart = look.rest_apart * rng.uniform(0.85, 1.15)
    forward = look.rest_forward * rng.uniform(0.9, 1.1)
    hand_x = np.stack([s * apart + _smooth(rng, t, 0.05, 0.03 * sp, 0.15 * sp) for s in SIDES])
    hand_y = np.stack([forward + _smooth(rng, t, 0.04, 0.03 * sp, 0.15 * sp) for _ in SIDES])
    return IdleTrack(
        torso_dx=_smooth(rng, t, look.sway * 2.0, 0.04 * sp, 0.25 * sp),
        torso_dy=0.012 * np.sin(TWO_PI * 0.25 * sp * t + rng.uniform(0, TWO_PI)),
        torso_roll=_smooth(rng, t, 0.03, 0.04 * sp, 0.2 * sp),
        sh_dy=-0.015 * (0.5 + 0.5 * np.sin(TWO_PI * 0.25 * sp * t)),
        head_dx=_smooth(rng, t, 0.04, 0.05 * sp, 0.3 * sp),
        head_dy=_smooth(rng, t, 0.02, 0.05 * sp, 0.3 * sp),
        head_roll=_smooth(rng, t, 0.08, 0.05 * sp, 0.35 * sp),
        head_pitch=_smooth(rng, t, 0.08, 0.05 * sp, 0.3 * sp) + 0.05 * talk * np.sin(TWO_PI * 2.2 * sp * t),
        hand_x=hand_x,
        hand_y=hand_y,
    )


def apply_idle(pose: Pose, idle: IdleTrack, f: int) -> None:
    """Reset ``pose`` to the idle pose of frame ``f``."""
    pose.clear()
    pose.torso_dx = float(idle.torso_dx[f])
    pose.torso_dy = float(idle.torso_dy[f])
    pose.torso_roll = float(idle.torso_roll[f])
    b = float(idle.sh_dy[f])
    pose.sh_dy[0] = pose.sh_dy[1] = b
    pose.head_dx = float(idle.head_dx[f])
    pose.head_dy = float(idle.head_dy[f])
    pose.head_roll = float(idle.head_roll[f])
    pose.head_pitch = float(idle.head_pitch[f])
    for k, side in enumerate(SIDES):
        pose.hands[k].reset(float(idle.hand_x[k, f]), float(idle.hand_y[k, f]), side)
