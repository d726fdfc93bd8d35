"""Draw a posed synthetic figure with OpenCV primitives: background, chair, torso, head (no face), arms, table.

The static layers (wall, chair back; table and microphone in front of the body) are drawn once per
video; each frame copies the background, draws the figure with anti-aliased sub-pixel primitives
(``shift=4``: coordinates in 1/16 pixel, so small movements stay smooth) and composites the table on
top. Frames are RGB uint8 (H, W, 3).
"""

from __future__ import annotations

import math

import cv2
import numpy as np

from mgfm.sources.synthetic.body import (BEHIND, FINGERS_UP, FIST, FRONT, INTERLOCK, POINT, SIDES, UNDER, Pose,
                                      SubjectLook, solve_elbow)

SHIFT = 4
ONE = 1 << SHIFT
AA = cv2.LINE_AA
REFERENCE_HEIGHT = 128  # SubjectLook.cam_scale is in pixels per unit at this frame height


def _shade(color: tuple[int, int, int], k: float) -> tuple[int, int, int]:
    return tuple(int(min(255, max(0, round(c * k)))) for c in color)  # type: ignore[return-value]


class FigureRenderer:
    """Renders :class:`Pose` objects of one subject in one video to (height, width, 3) uint8 RGB frames.

    ``video_seed`` adds the per-video camera jitter and lighting (independent of the video's emotion).
    """

    def __init__(self, look: SubjectLook, height: int, width: int, video_seed: int):
        rng = np.random.default_rng([video_seed, 29])
        self.look, self.height, self.width = look, height, width
        self.s = look.cam_scale * height / REFERENCE_HEIGHT * rng.uniform(0.98, 1.02)
        self.ox = width * (0.5 + look.cam_x + rng.uniform(-0.01, 0.01))
        self.oy = height * (look.cam_y + rng.uniform(-0.01, 0.01))
        gain = rng.uniform(0.9, 1.1)
        lk = look
        self.skin = _shade(lk.skin, gain)
        self.skin_dark = _shade(lk.skin, gain * 0.72)
        self.skin_mid = _shade(lk.skin, gain * 0.86)
        self.hair = _shade(lk.hair, gain)
        self.hat = _shade(lk.hat, gain) if lk.hat else None
        self.jacket = _shade(lk.jacket, gain)
        self.jacket_dark = _shade(lk.jacket, gain * 0.6)
        self.sleeve = _shade(lk.jacket, gain * 1.1 + 0.05)
        self.shirt = _shade(lk.shirt, gain)
        self.tie = _shade(lk.tie, gain) if lk.tie else None
        self.object_color = _shade(lk.object_color, gain)
        self.bg = self._background(rng, gain)
        self.fg, mask, self.fg_y0 = self._foreground(gain)
        self.fg_where = mask[:, :, None] > 0  # (H, W, 1) bool
        self.arm_px = self._px(lk.arm_w)
        self.fore_px = self._px(lk.arm_w * 0.85)
        self.neck_px = self._px(lk.neck_w)
        self.finger_px = max(1, int(round(self.s * 0.06)))

    # ------------------------------------------------------------------ coordinates
    def p(self, x: float, y: float) -> tuple[int, int]:
        """Body units -> fixed-point pixel coordinates (for ``shift=SHIFT``)."""
        return int(round((self.ox + self.s * x) * ONE)), int(round((self.oy + self.s * y) * ONE))

    def _px(self, v: float) -> int:
        """A length in units -> whole pixels (>= 1), for line thickness."""
        return max(1, int(round(v * self.s)))

    def axes(self, a: float, b: float) -> tuple[int, int]:
        return max(ONE, int(round(a * self.s * ONE))), max(ONE, int(round(b * self.s * ONE)))

    # ------------------------------------------------------------------ static layers
    def _background(self, rng: np.random.Generator, gain: float) -> np.ndarray:
        lk, h, w = self.look, self.height, self.width
        base = np.array(_shade(lk.bg_base, gain), dtype=np.float32)
        accent = np.array(_shade(lk.bg_accent, gain), dtype=np.float32)
        img = np.empty((h, w, 3), np.float32)
        img[:] = base
        period = max(4, int(lk.bg_period * w))
        # A look-specific pattern; its layout is drawn from the subject's own stream so it is the same in
        # every video of the subject.
        prng = np.random.default_rng([lk.subject_id, int(lk.bg_period * 1e6)])
        if lk.bg_pattern == "gradient":
            ramp = np.linspace(0.0, 1.0, h, dtype=np.float32)[:, None, None]
            img = img * (1 - 0.5 * ramp) + accent * 0.5 * ramp
        elif lk.bg_pattern == "stripes":
            cols = (np.arange(w) // max(2, period // 2)) % 2 == 1
            img[:, cols] = 0.7 * base + 0.3 * accent
        elif lk.bg_pattern == "panels":
            for x0 in range(-prng.integers(period), w, period * 2):
                cv2.rectangle(img, (x0 + 2, -5), (x0 + 2 * period - 3, h + 5), (0.8 * base + 0.2 * accent).tolist(), 2)
        elif lk.bg_pattern == "logos":  # a press-conference backdrop of repeated sponsor marks
            size = max(2, period // 4)
            kinds = prng.integers(0, 3, size=2)
            for row, y0 in enumerate(range(period // 2, h, period)):
                for x0 in range((row % 2) * period // 2, w + period, period):
                    kind = kinds[(x0 // period + row) % 2]
                    color = accent.tolist()
                    if kind == 0:
                        cv2.circle(img, (x0, y0), size, color, -1, AA)
                    elif kind == 1:
                        cv2.rectangle(img, (x0 - size, y0 - size // 2), (x0 + size, y0 + size // 2), color, -1)
                    else:
                        cv2.line(img, (x0 - size, y0), (x0 + size, y0), color, max(1, size // 2), AA)
        # Low-frequency mottling so the wall is not flat.
        noise = cv2.resize(rng.normal(0, 1, (4, 5)).astype(np.float32), (w, h), interpolation=cv2.INTER_CUBIC)
        img += (8.0 * noise)[:, :, None]
        # Chair back behind the torso (static).
        chair = _shade(lk.chair, gain)
        x0, y0 = self.p(-lk.shoulder_half * 1.15, -lk.torso_len * 0.95)
        x1, y1 = self.p(lk.shoulder_half * 1.15, 0.2)
        img = np.clip(img, 0, 255).astype(np.uint8)
        cv2.rectangle(img, (x0, y0), (x1, y1), chair, -1, AA, SHIFT)
        r = int(0.3 * self.s * ONE)
        cv2.ellipse(img, ((x0 + x1) // 2, y0), ((x1 - x0) // 2, r), 0, 180, 360, chair, -1, AA, SHIFT)
        return img

    def _foreground(self, gain: float) -> tuple[np.ndarray, np.ndarray, int]:
        lk, h, w = self.look, self.height, self.width
        fg = np.zeros((h, w, 3), np.uint8)
        mask = np.zeros((h, w), np.uint8)
        top = _shade(lk.table, gain)
        front = _shade(lk.table_front, gain)
        _, y_far = self.p(0.0, 0.0)
        _, y_near = self.p(0.0, lk.table_depth)
        big = 4 * w * ONE
        for img, c_top, c_front in ((fg, top, front), (mask, 255, 255)):
            cv2.rectangle(img, (-big, y_far), (big, y_near), c_top, -1, AA, SHIFT)
            cv2.rectangle(img, (-big, y_near), (big, big), c_front, -1, AA, SHIFT)
        # A little shading: the far part of the table surface is darker.
        yf, yn = y_far // ONE, min(h, y_near // ONE + 1)
        if yn > yf + 1:
            k = np.linspace(0.85, 1.05, yn - max(0, yf), dtype=np.float32)[:, None, None]
            fg[max(0, yf):yn] = np.clip(fg[max(0, yf):yn] * k, 0, 255).astype(np.uint8)
        if lk.mic_x is not None:
            dark = (40, 40, 45)
            for img, c in ((fg, dark), (mask, 255)):
                cv2.line(img, self.p(lk.mic_x, 0.45), self.p(lk.mic_x * 0.9, -0.55), c, max(1, int(0.07 * self.s)),
                         AA, SHIFT)
                cv2.ellipse(img, self.p(lk.mic_x * 0.9, -0.62), self.axes(0.09, 0.13), 0, 0, 360, c, -1, AA, SHIFT)
                cv2.ellipse(img, self.p(lk.mic_x, 0.45), self.axes(0.2, 0.06), 0, 0, 360, c, -1, AA, SHIFT)
        rows = np.nonzero(mask.any(axis=1))[0]
        y0 = int(rows[0]) if len(rows) else h
        return fg, mask, y0

    # ------------------------------------------------------------------ figure
    def render(self, pose: Pose, out: np.ndarray | None = None) -> np.ndarray:
        """Draw ``pose`` -> (H, W, 3) uint8 RGB (into ``out`` when given)."""
        if out is None:
            out = np.empty_like(self.bg)
        np.copyto(out, self.bg)
        sk = pose.skeleton()
        arms = [self._solve_arm(pose, sk, side) for side in SIDES]
        for arm in arms:
            if arm[0] == BEHIND:
                self._draw_arm(out, arm)
        self._draw_torso(out, pose, sk)
        self._draw_head(out, pose, sk)
        for arm in arms:
            if arm[0] == UNDER:
                self._draw_arm(out, arm)
        y0 = self.fg_y0
        if y0 < self.height:
            np.copyto(out[y0:], self.fg[y0:], where=self.fg_where[y0:])
        self._draw_object(out, pose)
        for arm in arms:
            if arm[0] == FRONT:
                self._draw_arm(out, arm)
        return out

    def _solve_arm(self, pose: Pose, sk, side: int):
        lk = self.look
        hand = pose.hand(side)
        shoulder = sk.shoulder(side)
        target = hand.pos
        hint = (hand.elbow_x, hand.elbow_y)
        elbow, _ = solve_elbow(shoulder, target, lk.upper_arm, lk.forearm, hint)
        # ``target`` is where the hand is; the wrist sits half a hand back along the forearm.
        dx, dy = target[0] - elbow[0], target[1] - elbow[1]
        n = math.hypot(dx, dy) or 1.0
        back = 0.45 * lk.hand_len
        wrist_goal = (target[0] - dx / n * back, target[1] - dy / n * back)
        elbow, wrist = solve_elbow(shoulder, wrist_goal, lk.upper_arm, lk.forearm, hint)
        if hand.angle is not None and hand.w > 0.3:
            ang = hand.angle
        else:
            ang = math.atan2(wrist[1] - elbow[1], wrist[0] - elbow[0])
        layer = hand.layer if hand.w > 0.5 else FRONT
        return layer, side, shoulder, elbow, wrist, ang, hand.shape if hand.w > 0.3 else 0

    def _draw_arm(self, img: np.ndarray, arm) -> None:
        _, side, shoulder, elbow, wrist, ang, shape = arm
        lk = self.look
        s, e, w = self.p(*shoulder), self.p(*elbow), self.p(*wrist)
        upper = self.sleeve
        fore = self.skin if lk.short_sleeves else self.sleeve
        fore_dark = self.skin_dark if lk.short_sleeves else self.jacket_dark
        cv2.line(img, s, e, self.jacket_dark, self.arm_px + 2, AA, SHIFT)
        cv2.line(img, e, w, fore_dark, self.fore_px + 2, AA, SHIFT)
        cv2.line(img, s, e, upper, self.arm_px, AA, SHIFT)
        cv2.line(img, e, w, fore, self.fore_px, AA, SHIFT)
        self._draw_hand(img, wrist, ang, shape, side)

    def _draw_hand(self, img: np.ndarray, wrist, ang: float, shape: int, side: int) -> None:
        lk = self.look
        c, s = math.cos(ang), math.sin(ang)
        if shape in (FIST, POINT, INTERLOCK):
            r = 0.55 * lk.hand_w
            cx, cy = wrist[0] + c * r, wrist[1] + s * r
            ctr = self.p(cx, cy)
            ax = self.axes(r, r)
            cv2.ellipse(img, ctr, ax, 0, 0, 360, self.skin, -1, AA, SHIFT)
            cv2.ellipse(img, ctr, ax, 0, 0, 360, self.skin_dark, 1, AA, SHIFT)
            if shape == POINT:
                tip = self.p(cx + c * lk.hand_len * 0.9, cy + s * lk.hand_len * 0.9)
                cv2.line(img, ctr, tip, self.skin_dark, self.finger_px + 1, AA, SHIFT)
                cv2.line(img, ctr, tip, self.skin, self.finger_px, AA, SHIFT)
            elif shape == INTERLOCK:  # interlaced fingers reaching towards the other hand
                for dv in (-0.4, 0.0, 0.4):
                    a = self.p(cx, cy + dv * r)
                    b = self.p(cx - side * 1.6 * r, cy + dv * r)
                    cv2.line(img, a, b, self.skin_dark, self.finger_px + 1, AA, SHIFT)
                    cv2.line(img, a, b, self.skin_mid, self.finger_px, AA, SHIFT)
            return
        half = 0.5 * lk.hand_len * (1.15 if shape == FINGERS_UP else 1.0)
        ctr = self.p(wrist[0] + c * half, wrist[1] + s * half)
        ax = self.axes(half, 0.5 * lk.hand_w)
        deg = math.degrees(ang)
        cv2.ellipse(img, ctr, ax, deg, 0, 360, self.skin, -1, AA, SHIFT)
        cv2.ellipse(img, ctr, ax, deg, 0, 360, self.skin_dark, 1, AA, SHIFT)

    def _draw_torso(self, img: np.ndarray, pose: Pose, sk) -> None:
        lk = self.look
        (rx, ry), (lx, ly) = sk.shoulders
        r = sk.torso_roll
        c, s = math.cos(r), math.sin(r)
        waist = lk.waist_half * (1.0 + 0.5 * pose.chest)
        down = lk.torso_len + 0.6
        bx, by = sk.neck_base
        pts = [
            (rx - 0.05, ry - 0.12), sk.torso_point(-0.3, 0.0), sk.torso_point(0.3, 0.0), (lx + 0.05, ly - 0.12),
            (lx + 0.12 * c, ly + 0.35), (bx + c * waist - s * down, by + s * waist + c * down),
            (bx - c * waist - s * down, by - s * waist + c * down), (rx - 0.12 * c, ry + 0.35),
        ]
        poly = np.array([self.p(x, y) for x, y in pts], np.int32)
        cv2.fillPoly(img, [poly], self.jacket, AA, SHIFT)
        ax = self.axes(lk.arm_w * 0.75, lk.arm_w * 0.75)
        for x, y in sk.shoulders:
            cv2.ellipse(img, self.p(x, y + 0.05), ax, 0, 0, 360, self.jacket, -1, AA, SHIFT)
        if lk.short_sleeves:  # round collar
            cv2.ellipse(img, self.p(*sk.torso_point(0.0, 0.0)), self.axes(0.24, 0.16), math.degrees(r), 0, 180,
                        self.jacket_dark, -1, AA, SHIFT)
        else:  # shirt V and tie
            v = np.array([self.p(*sk.torso_point(u, w)) for u, w in ((-0.3, 0.0), (0.3, 0.0), (0.0, 0.8))], np.int32)
            cv2.fillPoly(img, [v], self.shirt, AA, SHIFT)
            if self.tie is not None:
                d = pose.tie_dy
                tie = [(-0.05, 0.05 + d), (0.05, 0.05 + d), (0.09, 0.75), (0.0, 0.86), (-0.09, 0.75)]
                t = np.array([self.p(*sk.torso_point(u, w)) for u, w in tie], np.int32)
                cv2.fillPoly(img, [t], self.tie, AA, SHIFT)

    def _draw_head(self, img: np.ndarray, pose: Pose, sk) -> None:
        lk = self.look
        hx, hy = sk.head
        deg = math.degrees(sk.head_roll)
        hw = 0.5 * lk.head_w
        pitch = pose.head_pitch
        if lk.hair_style == "long":  # hair falling behind the shoulders
            cv2.ellipse(img, self.p(*sk.head_point(0.0, 0.25)), self.axes(hw * 1.15, 0.65), deg, 0, 360, self.hair,
                        -1, AA, SHIFT)
        nb = self.p(sk.neck_base[0], sk.neck_base[1] + 0.05)
        cv2.line(img, nb, self.p(*sk.neck_top), self.skin_mid, self.neck_px, AA, SHIFT)
        for side in SIDES:  # ears
            cv2.ellipse(img, self.p(*sk.head_point(side * 0.98, 0.02)), self.axes(0.08, 0.14), deg, 0, 360,
                        self.skin_mid, -1, AA, SHIFT)
        ctr = self.p(hx, hy)
        half_h = 0.5 * (1.0 - 0.1 * min(1.0, abs(pitch)))
        cv2.ellipse(img, ctr, self.axes(hw, half_h), deg, 180, 360, self.skin, -1, AA, SHIFT)
        cv2.ellipse(img, ctr, self.axes(hw, half_h * (1.0 - pose.jaw)), deg, 0, 180, self.skin, -1, AA, SHIFT)
        cv2.ellipse(img, ctr, self.axes(hw, half_h * (1.0 - pose.jaw)), deg, 10, 170, self.skin_dark, 1, AA, SHIFT)
        # Hair cap: its lower edge (the hairline) rises when the head tilts back, drops when it bows.
        line = -0.22 - 0.3 * pitch
        top = -0.56
        if lk.hair_style != "bald" or self.hat is not None:
            color = self.hat if self.hat is not None else self.hair
            cap_c = self.p(*sk.head_point(0.0, line))
            cap_ax = self.axes(hw * 1.06, max(0.05, line - top))
            cv2.ellipse(img, cap_c, cap_ax, deg, 180, 360, color, -1, AA, SHIFT)
            if self.hat is not None:
                brim = self.p(*sk.head_point(0.0, line + 0.02))
                cv2.ellipse(img, brim, self.axes(hw * 1.15, 0.07), deg, 0, 360, _shade(self.hat, 0.8), -1, AA, SHIFT)
            elif lk.hair_style == "bun":
                cv2.ellipse(img, self.p(*sk.head_point(0.0, -0.6)), self.axes(0.16, 0.13), deg, 0, 360, self.hair,
                            -1, AA, SHIFT)

    def _draw_object(self, img: np.ndarray, pose: Pose) -> None:
        lk = self.look
        x, y = lk.object_x + pose.obj_dx, lk.rest_forward + 0.15 + pose.obj_dy
        a = pose.obj_angle
        if lk.object_kind == "pen":
            a += 0.4
            dx, dy = math.cos(a) * 0.3, math.sin(a) * 0.3 * 0.5
            cv2.line(img, self.p(x - dx, y - dy), self.p(x + dx, y + dy), self.object_color,
                     max(1, int(round(0.09 * self.s))), AA, SHIFT)
        else:  # an upright bottle that tilts when handled
            c, s = math.cos(a * 0.5), math.sin(a * 0.5)
            corners = [(-0.1, 0.0), (0.1, 0.0), (0.1, -0.5), (-0.1, -0.5)]
            poly = np.array([self.p(x + c * u - s * v, y + s * u + c * v) for u, v in corners], np.int32)
            cv2.fillPoly(img, [poly], self.object_color, AA, SHIFT)
