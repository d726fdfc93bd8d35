"""Reader for the iMiGUE annotation file (and the synthetic benchmark, which writes the same format).

The file has one row per clip with columns
``video_id,label_id,start_time,start_frame,end_time,end_frame,class,subject_id,subject_gender,
subject_nationality,win_or_lose``; ``class`` is 1..31 for micro-gestures and 99 for illustrative
gestures. We map 1..31 -> 0..30 and 99 -> 31, Win -> emotion 1 (positive), Lose -> 0 (negative), and
split clips by subject with the official cross-subject protocol (37 train / 35 test subjects).

The protocol's facts are written here so the reader works for anyone who has the dataset; a
``protocol.json`` of the same shape (as the synthetic generator writes) overrides them.
"""

from __future__ import annotations

import csv
import io
import json
from pathlib import Path

from mgfm.sources.clip_index import AnnotationError, Clip, ClipIndex
from mgfm.files import TextFileError, read_text

FPS = 25
ILLUSTRATIVE_CLASS = 99
CLASS_NAMES = [
    "turtle neck", "deep breath", "touch hat", "touch face", "touch forehead", "cover face", "rub eyes",
    "touch other face part", "touch ears", "bite nails", "touch chin", "touch neck", "play hair", "adjust tie",
    "touch chest", "scratch back", "fold arm", "tidy sleeve", "put arm back", "move torso", "sit straight",
    "scratch arm", "rub hand", "cross finger", "minaret hand", "play things", "withdraw arms", "head up",
    "bite lip", "arm akimbo", "shake shoulder", "illustrative",
]  # fmt: skip
TRAIN_SUBJECTS = (2, 4, 5, 6, 9, 10, 12, 13, 14, 15, 17, 18, 20, 21, 22, 23, 25, 28, 29, 30, 31, 35, 36, 38, 39, 41, 42, 43, 44, 46, 47, 48, 52, 53, 59, 61, 62)  # fmt: skip
TEST_SUBJECTS = tuple(s for s in range(1, 73) if s not in TRAIN_SUBJECTS)
EMOTION_TRAIN_VIDEOS = (1, 7, 8, 11, 26, 27, 46, 47, 48, 53, 55, 57, 63, 66, 67, 74, 77, 84, 85, 86, 91, 96, 102, 103, 104, 105, 106, 108, 109, 112, 114, 117, 124, 132, 134, 140, 148, 157, 161, 162, 163, 164, 167, 169, 170, 172, 176, 186, 196, 216, 233, 236, 237, 239, 240, 241, 242, 243, 249, 252, 266, 290, 297, 300, 306, 310, 314, 318, 319, 320, 324, 334, 339, 359, 360, 365, 369, 377, 381, 385, 392, 402, 407, 410, 411, 413, 414, 415, 420, 429, 433, 435, 436, 440, 441, 445, 448, 449, 450, 451, 452, 453)  # fmt: skip
EMOTION_TEST_VIDEOS = (9, 10, 12, 16, 28, 35, 43, 49, 50, 51, 52, 54, 56, 60, 71, 72, 83, 89, 95, 100, 107, 110, 111, 121, 131, 136, 144, 145, 165, 166, 168, 171, 174, 179, 185, 191, 193, 212, 220, 223, 230, 231, 232, 234, 235, 238, 244, 246, 254, 258, 262, 263, 268, 270, 276, 280, 282, 303, 304, 311, 312, 313, 315, 316, 317, 322, 323, 325, 327, 328, 329, 333, 337, 341, 343, 344, 363, 374, 400, 401, 403, 404, 405, 406, 408, 416, 417, 419, 421, 428, 430, 431, 437, 438, 439, 442, 443, 444, 446, 447)  # fmt: skip
REQUIRED_COLUMNS = ("video_id", "start_frame", "end_frame", "class", "subject_id", "win_or_lose")


def official_protocol() -> dict:
    """The official iMiGUE protocol in the shape of ``protocol.json``."""
    return {
        "fps": FPS,
        "recognition": {"train_subjects": list(TRAIN_SUBJECTS), "test_subjects": list(TEST_SUBJECTS)},
        "emotion": {"train_videos": list(EMOTION_TRAIN_VIDEOS), "test_videos": list(EMOTION_TEST_VIDEOS)},
        "classes": list(CLASS_NAMES),
    }


def class_to_label(value: str, num_classes: int) -> int:
    """Map the CSV's ``class`` (1..num_classes-1, or 99) to a 0-based label; ValueError otherwise."""
    k = int(value)
    if k == ILLUSTRATIVE_CLASS:
        return num_classes - 1
    if 1 <= k <= num_classes - 1:
        return k - 1
    raise ValueError(f"expected 1..{num_classes - 1} or {ILLUSTRATIVE_CLASS}, got {value!r}")


def read_imigue(
    csv_path: str | Path,
    protocol: str | Path | dict | None = None,
    video_dir: str | Path | None = None,
    video_pattern: str = "{video_id}.mp4",
    name: str = "imigue",
) -> ClipIndex:
    """Read an iMiGUE-format annotation CSV into a :class:`ClipIndex`.

    Args:
        csv_path: the labels CSV (e.g. ``labels_20200831.csv``).
        protocol: a ``protocol.json`` path or dict; default: the official iMiGUE protocol.
        video_dir: folder of the source videos (default: the CSV's folder).
        video_pattern: file name of a video inside ``video_dir``, formatted with ``video_id``.
    """
    csv_path = Path(csv_path)
    if protocol is None:
        proto = official_protocol()
    elif isinstance(protocol, dict):
        proto = protocol
    else:
        try:
            proto = json.loads(Path(protocol).read_text())
        except (OSError, json.JSONDecodeError) as err:
            raise AnnotationError(protocol, None, None, f"cannot read protocol JSON ({err})") from err
    class_names = list(proto.get("classes", CLASS_NAMES))
    fps = float(proto.get("fps", FPS))
    train = {str(s) for s in proto["recognition"]["train_subjects"]}
    test = {str(s) for s in proto["recognition"]["test_subjects"]}
    emotion_splits = {str(v): "train" for v in proto.get("emotion", {}).get("train_videos", [])}
    emotion_splits.update({str(v): "test" for v in proto.get("emotion", {}).get("test_videos", [])})
    video_dir = Path(video_dir) if video_dir is not None else csv_path.parent

    try:
        text = read_text(csv_path)
    except TextFileError as err:
        raise AnnotationError(csv_path, err.line, None, err.problem) from None
    reader = csv.DictReader(io.StringIO(text, newline=""))
    missing = [c for c in REQUIRED_COLUMNS if c not in (reader.fieldnames or [])]
    if missing:
        raise AnnotationError(csv_path, 1, missing[0], f"missing column; the header must have {REQUIRED_COLUMNS}")
    clips = [_parse_row(row, csv_path, line, class_names, fps, train, test, video_dir, video_pattern)
             for line, row in enumerate(reader, start=2)]
    return ClipIndex(clips, class_names, name, emotion_splits)


def _parse_row(row, csv_path, line, class_names, fps, train, test, video_dir, video_pattern) -> Clip:
    def integer(field_name: str) -> int:
        value = row.get(field_name)
        try:
            return int(str(value).strip())
        except ValueError:
            raise AnnotationError(csv_path, line, field_name, f"expected an integer, got {value!r}") from None

    video_id = str(integer("video_id"))
    start, end = integer("start_frame"), integer("end_frame")
    if start < 0:
        raise AnnotationError(csv_path, line, "start_frame", f"must be >= 0, got {start}")
    if end < start:
        raise AnnotationError(csv_path, line, "end_frame", f"end_frame {end} < start_frame {start}")
    try:
        label = class_to_label(row["class"], len(class_names))
    except ValueError as err:
        raise AnnotationError(csv_path, line, "class", f"unknown class: {err}") from None
    subject = str(integer("subject_id"))
    if subject in train:
        split = "train"
    elif subject in test:
        split = "test"
    else:
        raise AnnotationError(csv_path, line, "subject_id", f"subject {subject} is in neither protocol split")
    outcome = str(row["win_or_lose"]).strip().lower()
    if outcome not in ("win", "lose"):
        raise AnnotationError(csv_path, line, "win_or_lose", f"expected Win or Lose, got {row['win_or_lose']!r}")
    return Clip(
        video_id=video_id,
        start_frame=start,
        end_frame=end,
        label=label,
        subject=subject,
        split=split,
        fps=fps,
        path=str(video_dir / video_pattern.format(video_id=video_id)),
        emotion=1 if outcome == "win" else 0,
    )
