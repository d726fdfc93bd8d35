"""Reader for a user's own clip list: a CSV with ``path,label,subject,split``.

Optional columns: ``start_frame,end_frame,video_id,emotion,label_name,fps``. ``path`` is relative to
the CSV's folder (or absolute). ``label`` is a 0-based class id, a class name, or empty / ``-1`` for
unlabelled clips. Without ``start_frame``/``end_frame`` a row is the whole video (``end_frame = -1``
means "to the last frame"; the shard builder resolves it).
"""

from __future__ import annotations

import csv
from pathlib import Path

from mgfm.data.clip_index import SPLITS, UNLABELED, AnnotationError, Clip, ClipIndex

REQUIRED_COLUMNS = ("path", "label", "subject", "split")
EMOTIONS = {"1": 1, "positive": 1, "pos": 1, "win": 1, "0": 0, "negative": 0, "neg": 0, "lose": 0, "": None}
DEFAULT_FPS = 25.0


def read_csv_index(csv_path: str | Path, class_names: list[str] | None = None, name: str | None = None) -> ClipIndex:
    """Read a generic clip CSV into a :class:`ClipIndex`.

    Class names come from ``class_names`` if given, else from the ``label_name`` column, else from
    the class names used in ``label`` (sorted), else ``class_0..class_{K-1}``.
    """
    csv_path = Path(csv_path)
    try:
        text = csv_path.read_text()
    except OSError as err:
        raise AnnotationError(csv_path, None, None, f"cannot open clip CSV ({err.strerror})") from err
    reader = csv.DictReader(text.splitlines())
    header = [h.strip() for h in (reader.fieldnames or [])]
    reader.fieldnames = header
    missing = [c for c in REQUIRED_COLUMNS if c not in header]
    if missing:
        raise AnnotationError(csv_path, 1, missing[0], f"missing column; required columns are {','.join(REQUIRED_COLUMNS)}")
    rows = [(line, {k: (v or "").strip() for k, v in row.items() if k is not None}) for line, row in enumerate(reader, 2)]
    if not rows:
        raise AnnotationError(csv_path, None, None, "no clips (the CSV has a header but no rows)")

    names = list(class_names) if class_names else _class_names(rows, csv_path)
    lookup = {n: i for i, n in enumerate(names)}
    clips = [_parse_row(row, line, csv_path, names, lookup) for line, row in rows]
    return ClipIndex(clips, names, name or csv_path.stem)


def _class_names(rows: list[tuple[int, dict]], csv_path: Path) -> list[str]:
    by_id: dict[int, str] = {}
    textual: dict[str, int] = {}
    for line, row in rows:
        label = row["label"]
        if label in ("", "-1"):
            continue
        if label.lstrip("-").isdigit():
            k = int(label)
            if row.get("label_name"):
                known = by_id.setdefault(k, row["label_name"])
                if known != row["label_name"]:
                    raise AnnotationError(
                        csv_path, line, "label_name", f"label {k} is called {known!r} earlier, {row['label_name']!r} here"
                    )
            else:
                by_id.setdefault(k, f"class_{k}")
        else:
            textual.setdefault(label, line)
    if textual and by_id:
        name, line = next(iter(textual.items()))
        raise AnnotationError(csv_path, line, "label", f"class name {name!r} in a CSV whose other labels are integer ids")
    if textual:
        return sorted(textual)
    if not by_id:
        return []
    return [by_id.get(k, f"class_{k}") for k in range(max(by_id) + 1)]


def _parse_row(row: dict, line: int, csv_path: Path, names: list[str], lookup: dict[str, int]) -> Clip:
    def integer(field_name: str, default: int) -> int:
        value = row.get(field_name, "")
        if value == "":
            return default
        try:
            number = float(value)
        except ValueError:
            number = float("nan")
        if not number.is_integer():
            raise AnnotationError(csv_path, line, field_name, f"expected an integer, got {value!r}")
        return int(number)

    if not row["path"]:
        raise AnnotationError(csv_path, line, "path", "empty path")
    path = Path(row["path"])
    if not path.is_absolute():
        path = csv_path.parent / path
    label_text = row["label"]
    if label_text in ("", "-1"):
        label = UNLABELED
    elif label_text.lstrip("-").isdigit():
        label = int(label_text)
        if not 0 <= label < len(names):
            raise AnnotationError(csv_path, line, "label", f"unknown class {label}; expected 0..{len(names) - 1} or -1")
    elif label_text in lookup:
        label = lookup[label_text]
    else:
        raise AnnotationError(csv_path, line, "label", f"unknown class {label_text!r}; known: {', '.join(names[:8])}...")
    split = row["split"].lower()
    if split not in SPLITS:
        raise AnnotationError(csv_path, line, "split", f"unknown split {row['split']!r}; expected one of {SPLITS}")
    if not row["subject"]:
        raise AnnotationError(csv_path, line, "subject", "empty subject")
    start = integer("start_frame", 0)
    end = integer("end_frame", -1)
    if start < 0:
        raise AnnotationError(csv_path, line, "start_frame", f"must be >= 0, got {start}")
    if end != -1 and end < start:
        raise AnnotationError(csv_path, line, "end_frame", f"end_frame {end} < start_frame {start}")
    emotion_text = row.get("emotion", "").lower()
    if emotion_text not in EMOTIONS:
        raise AnnotationError(csv_path, line, "emotion", f"expected positive/negative or 1/0, got {row['emotion']!r}")
    try:
        fps = float(row.get("fps") or DEFAULT_FPS)
    except ValueError:
        raise AnnotationError(csv_path, line, "fps", f"expected a number, got {row['fps']!r}") from None
    return Clip(
        video_id=row.get("video_id") or path.stem,
        start_frame=start,
        end_frame=end,
        label=label,
        subject=row["subject"],
        split=split,
        fps=fps,
        path=str(path),
        emotion=EMOTIONS[emotion_text],
        label_name=names[label] if label >= 0 else "",
    )
