"""What the data tools share: files read from a git clone's commit, an index written atomically, pose shards.

A clone (bare or not) is read at HEAD with ``git`` itself, so a set is the same wherever it is made and a file
whose object the clone lacks can be counted rather than crash the tool.
"""

from __future__ import annotations

import csv
import io
import re
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from mgfm.errors import InputError  # noqa: E402
from mgfm.files import write_atomic  # noqa: E402
from mgfm.shards import BuildConfig, build_shards  # noqa: E402
from mgfm.sources.pose import read_pose_index  # noqa: E402


def git(repo: Path, *args: str, data: bytes | None = None) -> bytes:
    """``git -C repo args`` -> its stdout; a failure is one line naming the clone."""
    try:
        return subprocess.run(["git", "-C", str(repo), *args], input=data, capture_output=True, check=True).stdout
    except subprocess.CalledProcessError as err:
        raise InputError(f"{repo}: git {' '.join(args[:2])} failed: {err.stderr.decode().strip()}") from None


def files_at_head(repo: Path, pattern: re.Pattern, url: str) -> tuple[str, list[tuple[str, str]]]:
    """(commit, [(path, blob id)] sorted by path) of the files at the clone's HEAD whose path matches."""
    if not repo.exists():
        raise InputError(f"{repo}: no such clone; git clone {url} first")
    commit = git(repo, "rev-parse", "HEAD").decode().strip()
    files = []
    for line in git(repo, "ls-tree", "-r", "HEAD").decode().splitlines():
        meta, path = line.split("\t", 1)
        if pattern.search(path):
            files.append((path, meta.split()[2]))
    if not files:
        raise InputError(f"{repo}: no files matching {pattern.pattern} at HEAD ({commit[:7]}); is this a clone "
                         f"of {url}?")
    return commit, sorted(files)


def write_index(path: Path, rows: list[dict], columns: list[str]) -> Path:
    """The generic clip CSV of ``rows`` (their other keys left out), written atomically."""
    text = io.StringIO()
    writer = csv.DictWriter(text, columns, extrasaction="ignore", lineterminator="\n")
    writer.writeheader()
    writer.writerows(rows)
    return write_atomic(path, text.getvalue())


def build_pose_shards(index: Path, shards: Path, layout: str, workers: int,
                      class_names: list[str] | None = None) -> None:
    """Draw the index's pose files into shards at short side 112 and the builder's pose frame rate (15 fps)."""
    build_shards(read_pose_index(index, layout, class_names=class_names), shards,
                 BuildConfig(short_side=112, workers=workers, pose_layout=layout),
                 source={"format": "pose", "index": str(index), "layout": layout})
