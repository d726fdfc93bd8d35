"""Plan a synthetic dataset without rendering it: subjects, videos, emotions, splits and the clip timeline.

The class frequencies and clip lengths are shaped like the real iMiGUE annotation file
(``labels_20200831.csv``; 18,498 clips). The facts below were measured once from that file and are
written here; the file itself is neither copied nor read at run time.
"""

from __future__ import annotations

import dataclasses
import math
import os
from dataclasses import dataclass, field

import numpy as np

from mgfm.sources.imigue import CLASS_NAMES
from mgfm.sources.synthetic.body import SubjectLook, sample_subject

# Clips per class in iMiGUE, in CLASS_NAMES order (CSV class 1..31, then 99 "illustrative").
IMIGUE_CLASS_COUNTS = (15, 515, 45, 271, 90, 32, 90, 1134, 132, 5, 454, 198, 140, 70, 44, 30, 406, 131, 2, 1217,
                       227, 527, 1035, 888, 21, 430, 100, 99, 1547, 8, 2880, 5715)  # fmt: skip
# Median clip length (frames at 25 fps) per class, same order.
IMIGUE_MEDIAN_LENGTHS = (36, 34, 39, 55, 49, 55.5, 61.5, 52, 48.5, 102, 76, 76, 48, 79.5, 43.5, 76, 83, 69, 46.5,
                         57, 44, 83, 79, 79, 60, 103.5, 27, 33, 35, 52, 27, 33)  # fmt: skip
# Quantiles of log(clip length / its class median) over all clips. Overall iMiGUE clip lengths have
# 10% / 50% / 90% quantiles of 20 / 40 / 130 frames (mean 65; max 3693).
LENGTH_LOG_RATIO_Q = (0.01, 0.05, 0.10, 0.25, 0.50, 0.75, 0.90, 0.95, 0.99)
LENGTH_LOG_RATIO = (-1.479, -0.953, -0.693, -0.351, 0.0, 0.418, 0.909, 1.241, 1.851)

# Video-level emotion changes which micro-gestures occur: negative videos have more self-adaptors
# (face/body touching, hiding, tension), positive ones more open/expansive gestures. Classes in neither
# set are emotion-neutral. (A modelling choice for the benchmark, not an iMiGUE statistic.)
NEGATIVE_LEANING = frozenset({
    "turtle neck", "deep breath", "touch face", "touch forehead", "cover face", "rub eyes", "touch other face part",
    "touch ears", "bite nails", "touch chin", "touch neck", "play hair", "scratch back", "fold arm", "scratch arm",
    "rub hand", "withdraw arms", "bite lip",
})  # fmt: skip
POSITIVE_LEANING = frozenset({
    "illustrative", "head up", "sit straight", "minaret hand", "arm akimbo", "move torso", "put arm back",
})  # fmt: skip


def _default_workers() -> int:
    return max(1, min(2, os.cpu_count() or 1))


@dataclass(frozen=True)
class SyntheticConfig:
    """Size, look and statistics of the synthetic benchmark. Defaults make the embedded default dataset.

    ``workers`` only sets the parallelism; it is not part of the data's identity.
    """

    subjects: int = 32
    videos: int = 128  # spread round-robin over subjects; each subject gets both emotions when it has >= 2
    clips_per_video: int = 28  # mean; each video draws from [0.6, 1.4] x this
    seed: int = 0
    height: int = 128
    width: int = 0  # 0 = 5/4 of the height, rounded to even (160 for 128)
    fps: int = 25
    min_clip_frames: int = 10
    max_clip_frames: int = 128  # iMiGUE's long tail (~10% of clips > 128 frames, up to 3693) is cut: cheaper
    # Tiny iMiGUE classes (e.g. "put arm back": 2 of 18,498 clips) are raised to this fraction of clips so
    # every class can appear in both splits; min_clips_per_split then guarantees it (by relabelling clips
    # of the most frequent class) whenever a split is large enough.
    min_class_fraction: float = 0.008
    min_clips_per_split: int = 3
    emotion_tilt: float = 1.4  # weight factor of emotion-leaning classes in videos of that emotion (1/x in others)
    idle_gap_frames: float = 16.0  # median idle frames between clips
    negative_gap_factor: float = 0.9  # negative videos fidget more: shorter idle gaps
    crf: int = 23
    workers: int = field(default_factory=_default_workers, compare=False)

    def __post_init__(self) -> None:
        checks = {
            "subjects": self.subjects >= 2,
            "videos": self.videos >= 1,
            "clips_per_video": self.clips_per_video >= 1,
            "height": self.height >= 16 and self.height % 2 == 0,
            "width": self.width == 0 or (self.width >= 16 and self.width % 2 == 0),
            "fps": self.fps > 0,
            "min_clip_frames": 3 <= self.min_clip_frames <= self.max_clip_frames,
            "workers": self.workers >= 1,
        }
        bad = [k for k, ok in checks.items() if not ok]
        if bad:
            raise ValueError(f"SyntheticConfig field '{bad[0]}': invalid value {getattr(self, bad[0])!r} "
                             "(subjects >= 2; even height/width >= 16; 3 <= min_clip_frames <= max_clip_frames)")

    @property
    def frame_width(self) -> int:
        return self.width or 2 * round(self.height * 5 / 8)

    def identity(self) -> dict:
        """The fields that determine the generated data (everything but ``workers``)."""
        d = dataclasses.asdict(self)
        d.pop("workers")
        return d


@dataclass(frozen=True)
class ClipPlan:
    label: int  # 0-based class id (CLASS_NAMES order)
    start: int  # first frame
    end: int  # last frame (inclusive)
    seed: int

    @property
    def length(self) -> int:
        return self.end - self.start + 1


@dataclass(frozen=True)
class VideoPlan:
    video_id: int
    subject_id: int
    emotion: int  # 1 positive (iMiGUE "Win"), 0 negative ("Lose")
    seed: int
    n_frames: int
    clips: tuple[ClipPlan, ...]


@dataclass(frozen=True)
class DatasetPlan:
    config: SyntheticConfig
    looks: dict[int, SubjectLook]
    videos: tuple[VideoPlan, ...]
    train_subjects: tuple[int, ...]
    test_subjects: tuple[int, ...]
    emotion_train_videos: tuple[int, ...]
    emotion_test_videos: tuple[int, ...]

    def split_of(self, subject_id: int) -> str:
        return "train" if subject_id in self.train_subjects else "test"

    def class_counts(self, split: str | None = None, emotion: int | None = None) -> list[int]:
        counts = [0] * len(CLASS_NAMES)
        for v in self.videos:
            if (split is None or self.split_of(v.subject_id) == split) and (emotion is None or v.emotion == emotion):
                for c in v.clips:
                    counts[c.label] += 1
        return counts

    @property
    def n_frames(self) -> int:
        return sum(v.n_frames for v in self.videos)


def class_probabilities(config: SyntheticConfig, emotion: int) -> np.ndarray:
    """p(class | emotion): iMiGUE's frequencies (tiny classes raised) tilted by the emotion -> (32,) float64."""
    base = np.asarray(IMIGUE_CLASS_COUNTS, np.float64)
    base = np.maximum(base / base.sum(), config.min_class_fraction)
    tilt = np.ones_like(base)
    for k, name in enumerate(CLASS_NAMES):
        lean = 1 if name in POSITIVE_LEANING else -1 if name in NEGATIVE_LEANING else 0
        tilt[k] = config.emotion_tilt ** (lean if emotion == 1 else -lean)
    p = base * tilt
    return p / p.sum()


def sample_length(rng: np.random.Generator, label: int, config: SyntheticConfig) -> int:
    """A clip length for class ``label``: the class median times an iMiGUE-shaped ratio, clamped."""
    log_ratio = np.interp(rng.uniform(LENGTH_LOG_RATIO_Q[0], LENGTH_LOG_RATIO_Q[-1]), LENGTH_LOG_RATIO_Q,
                          LENGTH_LOG_RATIO)
    n = int(round(IMIGUE_MEDIAN_LENGTHS[label] * math.exp(log_ratio)))
    return min(config.max_clip_frames, max(config.min_clip_frames, n))


def _seed(rng: np.random.Generator) -> int:
    return int(rng.integers(0, 2**31 - 1))


def make_plan(config: SyntheticConfig) -> DatasetPlan:
    """Everything about the dataset except the pixels (fast: no rendering)."""
    root = config.seed
    subjects = list(range(1, config.subjects + 1))
    looks = {s: sample_subject(root, s) for s in subjects}

    rng = np.random.default_rng([root, 1])
    order = list(rng.permutation(subjects))
    n_train = config.subjects // 2
    train_subjects = tuple(sorted(int(s) for s in order[:n_train]))
    test_subjects = tuple(sorted(int(s) for s in order[n_train:]))

    # Videos go round-robin over a shuffled subject order; a subject's videos alternate emotions from a
    # random start, so emotions are balanced within every subject (its look says nothing about emotion).
    rng = np.random.default_rng([root, 2])
    owner = [int(s) for s in rng.permutation(subjects)]
    start_emotion = {s: int(rng.integers(2)) for s in subjects}
    seen: dict[int, int] = {}
    video_meta = []
    for k in range(config.videos):
        s = owner[k % config.subjects]
        i = seen.get(s, 0)
        seen[s] = i + 1
        video_meta.append((k + 1, s, (start_emotion[s] + i) % 2))

    # Emotion protocol: a video's emotion split is its subject's recognition split. Every subject has both
    # emotions, so no subject's look predicts the emotion of its videos on the other side (a video-level
    # split spread one subject's positive videos over train and its negative ones over test).
    emo_train = [v for v, s, _ in video_meta if s in train_subjects]
    emo_test = [v for v, s, _ in video_meta if s not in train_subjects]

    # Class sequences per video.
    probs = {e: class_probabilities(config, e) for e in (0, 1)}
    labels: dict[int, list[int]] = {}
    for vid, _, emotion in video_meta:
        vr = np.random.default_rng([root, 4, vid])
        lo = max(1, round(0.6 * config.clips_per_video))
        hi = max(lo, round(1.4 * config.clips_per_video))
        n = int(vr.integers(lo, hi + 1))
        labels[vid] = [int(c) for c in vr.choice(len(CLASS_NAMES), size=n, p=probs[emotion])]
    _ensure_every_class(labels, video_meta, train_subjects, config)

    videos = []
    for vid, subject, emotion in video_meta:
        vr = np.random.default_rng([root, 5, vid])
        gap_scale = config.idle_gap_frames * (config.negative_gap_factor if emotion == 0 else 1.0)

        def gap() -> int:
            return max(4, int(round(gap_scale * math.exp(vr.normal(0.0, 0.6)))))

        t = gap() + 10
        clips = []
        for label in labels[vid]:
            n = sample_length(vr, label, config)
            clips.append(ClipPlan(label, t, t + n - 1, _seed(vr)))
            t += n + gap()
        t += 10
        videos.append(VideoPlan(vid, subject, emotion, _seed(vr), t, tuple(clips)))
    return DatasetPlan(config, looks, tuple(videos), train_subjects, test_subjects, tuple(sorted(emo_train)),
                       tuple(sorted(emo_test)))


def _ensure_every_class(labels: dict[int, list[int]], video_meta, train_subjects, config: SyntheticConfig) -> None:
    """Relabel clips of the most frequent class so each class has >= min_clips_per_split clips in each split.

    Only done for a split with at least ``num_classes x min_clips_per_split`` clips (tiny test configs
    cannot hold every class). Deterministic.
    """
    need = config.min_clips_per_split
    k = len(CLASS_NAMES)
    rng = np.random.default_rng([config.seed, 6])
    for split_train in (True, False):
        slots = [(vid, i) for vid, subject, _ in video_meta if (subject in train_subjects) == split_train
                 for i in range(len(labels[vid]))]
        if len(slots) < k * need:
            continue
        for target in range(k):
            while True:
                counts = np.bincount([labels[v][i] for v, i in slots], minlength=k)
                if counts[target] >= need:
                    break
                donor = int(np.argmax(counts))
                choices = [(v, i) for v, i in slots if labels[v][i] == donor]
                v, i = choices[int(rng.integers(len(choices)))]
                labels[v][i] = target
