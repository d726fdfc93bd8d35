"""One entry point for every clip-index reader: ``read_index("imigue"|"smg"|"csv"|"json", path)``."""

from __future__ import annotations

from pathlib import Path

from mgfm.sources.clip_index import ClipIndex
from mgfm.sources.generic_csv import read_csv_index
from mgfm.sources.imigue import read_imigue
from mgfm.sources.smg import read_smg
from mgfm.errors import InputError

FORMATS = ("imigue", "smg", "csv", "json")


def read_index(fmt: str, path: str | Path, **kwargs) -> ClipIndex:
    """Read a clip index.

    * ``imigue``: ``path`` = labels CSV; kwargs ``protocol``, ``video_dir``, ``video_pattern``.
    * ``smg``: ``path`` = the dataset root; kwargs ``class_names``, ``fps``.
    * ``csv``: ``path`` = a ``path,label,subject,split`` CSV; kwarg ``class_names``.
    * ``json``: ``path`` = a file written by :meth:`ClipIndex.save_json`.
    """
    if fmt == "imigue":
        return read_imigue(path, **kwargs)
    if fmt == "smg":
        return read_smg(path, **kwargs)
    if fmt == "csv":
        return read_csv_index(path, **kwargs)
    if fmt == "json":
        return ClipIndex.load_json(path)
    raise InputError(f"unknown clip-index format {fmt!r}; expected one of {FORMATS}")
