"""Reader for the SMG dataset layout (spontaneous micro-gestures, 40 subjects, 17 classes).

Layout: ``root/SampleNNNN/SampleNNNN_finelabels.csv`` with header-less rows ``label,start,end``
(label 1..17, frames inclusive) next to the sample's RGB video. One sample is one subject; the
cross-subject protocol tests on subjects 36-40. If ``SampleNNNN_tflabels_new.csv`` is present, its rows
``segment_id,start,end,state`` mark emotional-state segments (``state // 10 == 1``: stressed -> emotion 0,
else relaxed -> 1); a clip inside a segment gets that emotion and the segment as its ``video_id``, which
is the unit SMG's emotion task classifies.

The dataset's own class names are not in its label files; pass ``class_names`` to name them.
"""

from __future__ import annotations

import csv
import io
import re
from pathlib import Path

from mgfm.sources.clip_index import AnnotationError, Clip, ClipIndex
from mgfm.files import TextFileError, read_text

NUM_CLASSES = 17
TEST_SUBJECTS = (36, 37, 38, 39, 40)
FPS = 30.0
VIDEO_SUFFIXES = (".mp4", ".avi", ".mkv", ".mov")


def read_smg(root: str | Path, class_names: list[str] | None = None, fps: float = FPS,
             test_subjects: tuple[int, ...] = TEST_SUBJECTS) -> ClipIndex:
    """Read every ``Sample*/Sample*_finelabels.csv`` under ``root`` into a :class:`ClipIndex`."""
    root = Path(root)
    label_files = sorted(root.glob("Sample*/*_finelabels.csv"))
    if not label_files:
        raise AnnotationError(root, None, None, "no Sample*/Sample*_finelabels.csv files found (is this an SMG root?)")
    names = list(class_names) if class_names else [f"smg_{k:02d}" for k in range(1, NUM_CLASSES + 1)]
    clips: list[Clip] = []
    for label_file in label_files:
        sample_dir = label_file.parent
        match = re.search(r"(\d+)", sample_dir.name)
        if not match:
            raise AnnotationError(sample_dir, None, None, "sample folder name carries no subject number")
        subject = int(match.group(1))
        video = _find_video(sample_dir)
        segments = _read_segments(sample_dir / f"{sample_dir.name}_tflabels_new.csv")
        for line, row in _rows(label_file, 3):
            label_text, start, end = row
            try:
                label = int(label_text)
            except ValueError:
                raise AnnotationError(label_file, line, "label", f"expected an integer, got {label_text!r}") from None
            if not 1 <= label <= len(names):
                raise AnnotationError(label_file, line, "label", f"unknown class {label}; expected 1..{len(names)}")
            start_frame, end_frame = _frame(label_file, line, "start", start), _frame(label_file, line, "end", end)
            if end_frame < start_frame:
                raise AnnotationError(label_file, line, "end", f"end {end_frame} < start {start_frame}")
            video_id, emotion = sample_dir.name, None
            for seg_id, seg_start, seg_end, seg_emotion in segments:
                if seg_start <= start_frame and end_frame <= seg_end:
                    video_id, emotion = f"{sample_dir.name}_seg{seg_id}", seg_emotion
                    break
            clips.append(Clip(
                video_id=video_id, start_frame=start_frame, end_frame=end_frame, label=label - 1,
                subject=str(subject), split="test" if subject in test_subjects else "train", fps=fps,
                path=str(video), emotion=emotion,
            ))
    return ClipIndex(clips, names, "smg")


def _rows(path: Path, width: int):
    try:
        text = read_text(path)
    except TextFileError as err:
        raise AnnotationError(path, err.line, None, err.problem) from None
    for line, row in enumerate(csv.reader(io.StringIO(text, newline="")), start=1):
        row = [c.strip() for c in row if c.strip() != ""]
        if not row:
            continue
        if len(row) != width:
            raise AnnotationError(path, line, None, f"expected {width} columns, got {len(row)}: {row}")
        yield line, row


def _frame(path: Path, line: int, field_name: str, value: str) -> int:
    try:
        frame = int(value)
    except ValueError:
        raise AnnotationError(path, line, field_name, f"expected a frame number, got {value!r}") from None
    if frame < 0:
        raise AnnotationError(path, line, field_name, f"must be >= 0, got {frame}")
    return frame


def _read_segments(path: Path) -> list[tuple[str, int, int, int]]:
    if not path.exists():
        return []
    segments = []
    for line, (seg_id, start, end, state) in _rows(path, 4):
        try:
            stressed = int(state) // 10 == 1
        except ValueError:
            raise AnnotationError(path, line, "state", f"expected an integer state code, got {state!r}") from None
        segments.append((seg_id, _frame(path, line, "start", start), _frame(path, line, "end", end), 0 if stressed else 1))
    return segments


def _find_video(sample_dir: Path) -> Path:
    videos = sorted(p for p in sample_dir.iterdir() if p.suffix.lower() in VIDEO_SUFFIXES)
    colour = [p for p in videos if "color" in p.stem.lower() or "rgb" in p.stem.lower()]
    if colour or videos:
        return (colour or videos)[0]
    return sample_dir / f"{sample_dir.name}_color.mp4"  # reported as missing by the shard builder
