"""The one error a pose file can raise: the file and what is wrong with it, in one line."""

from __future__ import annotations

from pathlib import Path

from mgfm.errors import MgfmError


class PoseFileError(MgfmError, ValueError):
    """An unreadable or malformed pose file. In a shard build its clips are skipped and counted."""

    def __init__(self, path: str | Path, problem: str) -> None:
        self.path, self.problem = str(path), problem
        super().__init__(f"{path}: {problem}")
