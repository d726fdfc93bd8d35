"""Reader for a user's own clip list: a CSV with ``path,label,subject,split``.

Optional columns: ``start_frame,end_frame,video_id,emotion,label_name,fps``. ``path`` is relative to
the CSV's folder (or absolute). ``label`` is a 0-based class id, a class name, or empty / ``-1`` for
unlabelled clips. Without ``start_frame``/``end_frame`` a row is the whole video (``end_frame = -1``
means "to the last frame"; the shard builder resolves it).
"""

from __future__ import annotations

import collections
import csv
import difflib
import logging
from pathlib import Path
from typing import Iterable, Iterator

from mgfm.sources.clip_index import SPLITS, UNLABELED, AnnotationError, Clip, ClipIndex
from mgfm.files import TextFileError, read_text

log = logging.getLogger(__name__)
REQUIRED_COLUMNS = ("path", "label", "subject", "split")
EMOTIONS = {"1": 1, "positive": 1, "pos": 1, "win": 1, "0": 0, "negative": 0, "neg": 0, "lose": 0, "": None}
DEFAULT_FPS = 25.0


def read_csv_index(csv_path: str | Path, class_names: list[str] | None = None, name: str | None = None,
                   dedupe: bool = False, require_label: bool = True, default_fps: float = DEFAULT_FPS) -> ClipIndex:
    """Read a generic clip CSV into a :class:`ClipIndex`.

    ``require_label=False`` lets the ``label`` column be absent (every clip unlabelled: a pretraining
    corpus); ``default_fps`` is the frame rate of rows without an ``fps`` value (0: unknown, the source says).

    Class names come from ``class_names`` if given, else from the ``label_name`` column, else from
    the class names used in ``label`` (sorted), else ``class_0..class_{K-1}``. In a CSV that names its
    classes only by ``label``, two names a typo apart ("touch forhead" beside "touch forehead") are an
    error: a typo must not become a new class and shift every id (pass ``class_names`` when such names are
    meant). Two rows for the same clip (same video and frames) are an error naming both lines, or, with
    ``dedupe``, the later ones are dropped and counted (a warning).
    """
    csv_path = Path(csv_path)
    try:
        text = read_text(csv_path)
    except TextFileError as err:
        raise AnnotationError(csv_path, err.line, None, err.problem) from None
    lines = text.splitlines()
    del text
    header = [h.strip() for h in (next(csv.reader(lines[:1]), None) or [])]
    missing = [c for c in REQUIRED_COLUMNS if c not in header and (require_label or c != "label")]
    if missing:
        raise AnnotationError(csv_path, 1, missing[0], f"missing column; required columns are {','.join(REQUIRED_COLUMNS)}")

    def rows() -> Iterator[tuple[int, dict]]:
        """(line number, row) pairs, read afresh on each call: a large CSV is never held as dicts."""
        reader = csv.DictReader(lines, fieldnames=header)
        next(reader)  # the header
        for line, row in enumerate(reader, 2):
            yield line, {"label": "", **{k: (v or "").strip() for k, v in row.items() if k is not None}}

    names = list(class_names) if class_names else _class_names(rows(), csv_path)
    lookup = {n: i for i, n in enumerate(names)}
    paths: dict[str, tuple[str, str]] = {}  # the CSV's path text -> (resolved path, stem), once per source file
    clips = _unique(((line, _parse_row(row, line, csv_path, names, lookup, default_fps, paths)) for line, row in rows()),
                    csv_path, dedupe)
    if not clips:
        raise AnnotationError(csv_path, None, None, "no clips (the CSV has a header but no rows)")
    return ClipIndex(clips, names, name or csv_path.stem)


def _unique(parsed: Iterable[tuple[int, Clip]], csv_path: Path, dedupe: bool) -> list[Clip]:
    """The clips with repeated rows (same source, video and frames) removed when ``dedupe``, else refused."""
    first: dict[tuple, tuple[int, Clip]] = {}
    kept, dropped = [], 0
    for line, clip in parsed:
        key = (clip.path, clip.video_id, clip.start_frame, clip.end_frame)
        if key not in first:
            first[key] = (line, clip)
            kept.append(clip)
            continue
        earlier, seen = first[key]
        if not dedupe or seen.label != clip.label:
            why = "with another label " if seen.label != clip.label else ""
            raise AnnotationError(csv_path, line, None, f"the same clip as line {earlier} {why}(video "
                                                        f"{clip.video_id!r}, frames {clip.start_frame}-{clip.end_frame})"
                                                        f"; remove one{'' if why else ' or read with --dedupe'}")
        dropped += 1
    if dropped:
        log.warning("%s: %d repeated row(s) dropped (--dedupe)", csv_path, dropped)
    return kept


def _class_names(rows: Iterable[tuple[int, dict]], csv_path: Path) -> list[str]:
    by_id: dict[int, str] = {}
    textual: dict[str, int] = {}
    counts: collections.Counter = collections.Counter()
    for line, row in rows:
        label = row["label"]
        counts[label] += 1
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
        _refuse_near_duplicates(textual, counts, csv_path)
        return sorted(textual)
    if not by_id:
        return []
    return [by_id.get(k, f"class_{k}") for k in range(max(by_id) + 1)]


def edit_distance(a: str, b: str) -> int:
    """Levenshtein distance (insertions, deletions, substitutions) between two short strings."""
    previous = list(range(len(b) + 1))
    for i, ca in enumerate(a, 1):
        current = [i]
        for j, cb in enumerate(b, 1):
            current.append(min(previous[j] + 1, current[j - 1] + 1, previous[j - 1] + (ca != cb)))
        previous = current
    return previous[-1]


def _normal(name: str) -> str:
    return " ".join(name.lower().replace("_", " ").split())


def _refuse_near_duplicates(first_lines: dict[str, int], counts: dict[str, int], csv_path: Path) -> None:
    """Class names (``name -> first line``, ``name -> rows``) that differ only by case/spacing, or by one
    edit per 8 letters, are taken for a typo: a one-line error at the rarer name's first line, suggesting
    the more frequent one."""
    names = sorted(first_lines, key=first_lines.get)
    for i, b in enumerate(names):
        for a in names[:i]:
            limit = max(1, min(len(a), len(b)) // 8)
            if _normal(a) == _normal(b) or (min(len(a), len(b)) >= 5 and edit_distance(a, b) <= limit):
                typo, meant = (a, b) if counts[a] < counts[b] else (b, a)
                raise AnnotationError(csv_path, first_lines[typo], "label",
                                      f"class name {typo!r} ({counts[typo]} row(s)) is a near copy of {meant!r} "
                                      f"({counts[meant]} rows): did you mean {meant!r}? (pass the class list when "
                                      f"both are meant)")


def _parse_row(row: dict, line: int, csv_path: Path, names: list[str], lookup: dict[str, int],
               default_fps: float, paths: dict[str, tuple[str, str]]) -> Clip:
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
    if row["path"] not in paths:
        resolved = csv_path.parent / row["path"]  # an absolute path stays itself
        paths[row["path"]] = (str(resolved), resolved.stem)
    path, stem = paths[row["path"]]
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
        near = difflib.get_close_matches(label_text, names, n=1, cutoff=0.6)
        hint = f"did you mean {near[0]!r}?" if near else f"known: {', '.join(names[:8])}{'...' if len(names) > 8 else ''}"
        raise AnnotationError(csv_path, line, "label", f"unknown class {label_text!r}; {hint}")
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
        fps = float(row.get("fps") or default_fps)
    except ValueError:
        raise AnnotationError(csv_path, line, "fps", f"expected a number, got {row['fps']!r}") from None
    return Clip(
        video_id=row.get("video_id") or stem,
        start_frame=start,
        end_frame=end,
        label=label,
        subject=row["subject"],
        split=split,
        fps=fps,
        path=path,
        emotion=EMOTIONS[emotion_text],
        label_name=names[label] if label >= 0 else "",
    )
