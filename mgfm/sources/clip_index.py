"""The clip index: the one in-memory table every reader produces and every later stage consumes.

One row (:class:`Clip`) per micro-gesture clip. Frame numbers are 0-based and ``end_frame`` is
inclusive, as in the iMiGUE annotation file. ``label`` is a 0-based class id or ``-1`` (unlabelled).
``emotion`` is a video-level label: 1 positive, 0 negative, ``None`` unknown.
"""

from __future__ import annotations

import collections
import dataclasses
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable, Iterator

from mgfm.errors import InputError, MgfmError

SPLITS = ("train", "val", "test", "unlabeled")
UNLABELED = -1


class AnnotationError(MgfmError, ValueError):
    """A bad row in an annotation file. The message names the file, the line and the field."""

    def __init__(self, path: str | Path, line: int | None, field_name: str | None, problem: str):
        where = f"{path}"
        if line is not None:
            where += f":{line}"
        if field_name:
            where += f" field '{field_name}'"
        super().__init__(f"{where}: {problem}")


@dataclass(frozen=True, slots=True)
class Clip:
    """One micro-gesture clip of a source video. (Slots: an index of millions of clips keeps one small
    object per clip, not a dict per clip.)"""

    video_id: str
    start_frame: int
    end_frame: int  # inclusive
    label: int
    subject: str
    split: str
    fps: float
    path: str  # source video file (absolute, or relative to the working directory)
    emotion: int | None = None
    label_name: str = ""
    clip_id: str = ""  # unique, dot-free key; filled by ClipIndex when empty

    @property
    def n_frames(self) -> int:
        return self.end_frame - self.start_frame + 1

    def to_row(self) -> dict:
        """A JSON-ready dict (the shard ``json`` payload starts from this). Every field is a scalar, so a
        shallow copy is :func:`dataclasses.asdict` at a fraction of its cost."""
        return {name: getattr(self, name) for name in _CLIP_FIELDS}

    @classmethod
    def from_row(cls, row: dict) -> "Clip":
        return cls(**{k: v for k, v in row.items() if k in _CLIP_FIELDS})


_CLIP_FIELDS = tuple(f.name for f in dataclasses.fields(Clip))


def make_clip_id(video_id: str, start_frame: int, end_frame: int) -> str:
    """A WebDataset-safe key (no dots, no slashes) that is unique per (video, span)."""
    safe = "".join(ch if ch.isalnum() or ch in "-_" else "_" for ch in str(video_id))
    return f"{safe}_{start_frame:07d}_{end_frame:07d}"


@dataclass
class ClipIndex:
    """All clips of a dataset plus what the readers know about it.

    ``emotion_splits`` maps a video id to ``"train"``/``"test"`` for the video-level emotion
    protocol (empty when the dataset has none).
    """

    clips: list[Clip]
    class_names: list[str]
    name: str = "dataset"
    emotion_splits: dict[str, str] = field(default_factory=dict)

    def __post_init__(self) -> None:
        fixed = []
        seen: collections.Counter = collections.Counter()
        for c in self.clips:
            changes = {}
            if not c.clip_id:
                key = make_clip_id(c.video_id, c.start_frame, c.end_frame)
                # Real annotation files do repeat a span (two labels for one gesture): keep both rows.
                seen[key] += 1
                if seen[key] > 1:
                    key = f"{key}_{seen[key] - 1}"
                changes["clip_id"] = key
            if not c.label_name and 0 <= c.label < len(self.class_names):
                changes["label_name"] = self.class_names[c.label]
            fixed.append(dataclasses.replace(c, **changes) if changes else c)
        self.clips = fixed
        dup = [k for k, n in collections.Counter(c.clip_id for c in self.clips).items() if n > 1]
        if dup:
            raise InputError(f"{self.name}: duplicate clip ids, e.g. {dup[:3]}")

    def __len__(self) -> int:
        return len(self.clips)

    def __iter__(self) -> Iterator[Clip]:
        return iter(self.clips)

    @property
    def num_classes(self) -> int:
        return len(self.class_names)

    def split(self, name: str) -> list[Clip]:
        return [c for c in self.clips if c.split == name]

    def subset(self, clips: Iterable[Clip]) -> "ClipIndex":
        return ClipIndex(list(clips), self.class_names, self.name, dict(self.emotion_splits))

    def class_histogram(self, split: str | None = None) -> list[int]:
        counts = [0] * self.num_classes
        for c in self.clips:
            if (split is None or c.split == split) and c.label >= 0:
                counts[c.label] += 1
        return counts

    def subjects(self, split: str | None = None) -> list[str]:
        return sorted({c.subject for c in self.clips if split is None or c.split == split}, key=natural_key)

    def videos(self) -> dict[str, list[Clip]]:
        """Clips grouped by video, each list in time order (by start frame)."""
        by_video: dict[str, list[Clip]] = collections.defaultdict(list)
        for c in self.clips:
            by_video[c.video_id].append(c)
        return {v: sorted(cs, key=lambda c: (c.start_frame, c.end_frame)) for v, cs in by_video.items()}

    def video_emotions(self) -> dict[str, int | None]:
        out: dict[str, int | None] = {}
        for c in self.clips:
            if out.get(c.video_id) is None:
                out[c.video_id] = c.emotion
        return out

    def summary(self) -> dict:
        """Counts a user wants to see first: clips per split and class, subjects, videos per emotion."""
        per_split = collections.Counter(c.split for c in self.clips)
        emotions = collections.Counter(self.video_emotions().values())
        return {
            "name": self.name,
            "clips": len(self.clips),
            "videos": len({c.video_id for c in self.clips}),
            "subjects": len(self.subjects()),
            "clips_per_split": dict(sorted(per_split.items())),
            "subjects_per_split": {s: len(self.subjects(s)) for s in sorted(per_split)},
            "clips_per_class": dict(zip(self.class_names, self.class_histogram())),
            "videos_per_emotion": {
                {1: "positive", 0: "negative", None: "unknown"}[k]: v for k, v in sorted(emotions.items(), key=str)
            },
            "emotion_split_videos": dict(collections.Counter(self.emotion_splits.values())),
        }

    def save_json(self, path: str | Path) -> None:
        payload = {
            "name": self.name,
            "class_names": self.class_names,
            "emotion_splits": self.emotion_splits,
            "clips": [c.to_row() for c in self.clips],
        }
        Path(path).write_text(json.dumps(payload))

    @classmethod
    def load_json(cls, path: str | Path) -> "ClipIndex":
        payload = json.loads(Path(path).read_text())
        return cls(
            [Clip.from_row(r) for r in payload["clips"]],
            payload["class_names"],
            payload.get("name", "dataset"),
            payload.get("emotion_splits", {}),
        )


def natural_key(s: str) -> tuple:
    """Sort key that puts numeric ids in numeric order ("2" before "10"), then the other ids by text."""
    return (0, int(s), "") if str(s).isdigit() else (1, 0, str(s))


def format_summary(summary: dict) -> str:
    """A human-readable table of :meth:`ClipIndex.summary`."""
    lines = [
        f"dataset {summary['name']}: {summary['clips']} clips, {summary['videos']} videos, "
        f"{summary['subjects']} subjects",
        "clips per split: " + ", ".join(f"{k} {v}" for k, v in summary["clips_per_split"].items()),
        "subjects per split: " + ", ".join(f"{k} {v}" for k, v in summary["subjects_per_split"].items()),
        "videos per emotion: " + ", ".join(f"{k} {v}" for k, v in summary["videos_per_emotion"].items()),
    ]
    if summary.get("emotion_split_videos"):
        lines.append(
            "emotion protocol videos: " + ", ".join(f"{k} {v}" for k, v in summary["emotion_split_videos"].items())
        )
    lines.append("clips per class:")
    width = max((len(n) for n in summary["clips_per_class"]), default=0)
    for i, (name, n) in enumerate(summary["clips_per_class"].items()):
        lines.append(f"  {i:>2} {name:<{width}} {n:>6}")
    return "\n".join(lines)
