"""One entry point for every clip-index reader: ``read_index("imigue"|"smg"|"csv"|"pose"|"json", path)``."""

from __future__ import annotations

from pathlib import Path

from mgfm.sources.clip_index import ClipIndex
from mgfm.sources.generic_csv import read_csv_index
from mgfm.sources.imigue import read_imigue
from mgfm.sources.pose import LAYOUTS, read_pose_index
from mgfm.sources.smg import read_smg
from mgfm.errors import InputError
from mgfm.files import read_text

FORMATS = ("imigue", "smg", "csv", "pose", "json")


def read_index(fmt: str, path: str | Path, **kwargs) -> ClipIndex:
    """Read a clip index.

    * ``imigue``: ``path`` = labels CSV; kwargs ``protocol``, ``video_dir``, ``video_pattern``.
    * ``smg``: ``path`` = the dataset root; kwargs ``class_names``, ``fps``.
    * ``csv``: ``path`` = a ``path,label,subject,split`` CSV; kwarg ``class_names``.
    * ``pose``: ``path`` = a CSV of pose files (:mod:`mgfm.sources.pose`); kwargs ``layout``, ``class_names``.
    * ``json``: ``path`` = a file written by :meth:`ClipIndex.save_json`.
    """
    if fmt == "imigue":
        return read_imigue(path, **kwargs)
    if fmt == "smg":
        return read_smg(path, **kwargs)
    if fmt == "csv":
        return read_csv_index(path, **kwargs)
    if fmt == "pose":
        return read_pose_index(path, **kwargs)
    if fmt == "json":
        return ClipIndex.load_json(path)
    raise InputError(f"unknown clip-index format {fmt!r}; expected one of {FORMATS}")


def read_source_index(fmt: str, path: str | Path, protocol: str | None = None, video_dir: str | None = None,
                      video_pattern: str | None = None, classes: str | Path | None = None,
                      dedupe: bool = False, layout: str | None = None) -> ClipIndex:
    """Read a clip index from the shard builder's options via :func:`read_index`; ``classes`` is a text
    file of class names, one per line (csv / pose / smg); ``layout`` the joint layout of pose files."""
    kwargs: dict = {}
    if fmt == "imigue":
        kwargs = {"protocol": protocol, "video_dir": video_dir}
        if video_pattern:
            kwargs["video_pattern"] = video_pattern
    elif protocol or video_dir:
        raise InputError(f"--protocol/--video-dir only apply to --format imigue, not {fmt}")
    if fmt == "pose":
        if not layout:
            raise InputError("--format pose needs --layout (the joint layout of the set's files: "
                             f"{', '.join(LAYOUTS)})")
        kwargs["layout"] = layout
    elif layout:
        raise InputError(f"--layout only applies to --format pose, not {fmt}")
    if classes is not None:
        if fmt not in ("csv", "smg", "pose"):
            raise InputError(f"--classes only applies to --format csv, pose or smg, not {fmt}")
        kwargs["class_names"] = [line.strip() for line in read_text(classes).splitlines() if line.strip()]
    if dedupe:
        if fmt not in ("csv", "pose"):
            raise InputError(f"--dedupe only applies to --format csv or pose, not {fmt}")
        kwargs["dedupe"] = True
    return read_index(fmt, path, **kwargs)
