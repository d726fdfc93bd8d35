"""The unlabelled real-motion pretraining corpus: Bandai-Namco-Research-Motiondataset 1 and 2 (BVH mocap of
professional actors, 30 fps, CC BY-NC 4.0; docs/motion_corpus.md), taken from a git clone of
https://github.com/BandaiNamcoResearchInc/Bandai-Namco-Research-Motiondataset and rendered into stick-figure
shards.

    git clone https://github.com/BandaiNamcoResearchInc/Bandai-Namco-Research-Motiondataset /data/bandai.git
    python tools/motion_corpus.py --repo /data/bandai.git --out /data/motion_corpus --shards shards/motion_corpus
    python tools/motion_corpus.py --repo /data/bandai.git --out /data/motion_corpus --limit 1000 \\
        --shards shards/motion_corpus_1000

The BVH files are read from the clone's commit (bare or not), so the corpus is the same wherever it is made;
a file whose object the clone lacks is a counted skip. ``--limit N`` takes a fixed subset of N of the present
sequences (the first N by a hash of the file name, the same on every machine) for a smaller corpus. Writes ``<out>/bvh/``,
``<out>/index.csv`` (``path,subject,split,video_id``: no labels; ``subject`` is the dataset, as the actors are
not named per file) and ``<out>/SOURCE.json`` (commit, counts, frames, minutes); ``--shards`` then builds
the shards (``python -m mgfm.shards build --format pose --layout bvh``, short side 112, 15 fps).
"""

from __future__ import annotations

import argparse
import json
import logging
import re
import sys
import zlib
from pathlib import Path

from clone_data import build_pose_shards, files_at_head, git, write_index

from mgfm.cli import one_line_errors
from mgfm.errors import InputError
from mgfm.files import write_atomic
from mgfm.runtime import setup_logging

log = logging.getLogger("mgfm.tools.motion_corpus")
URL = "https://github.com/BandaiNamcoResearchInc/Bandai-Namco-Research-Motiondataset"
LICENCE = "CC BY-NC 4.0 (Bandai Namco Research Inc.; non-commercial research use, attribution)"
FPS = 30.0
BVH_FILE = re.compile(r"\.bvh$", re.IGNORECASE)


def bvh_objects(repo: Path) -> tuple[str, list[tuple[str, str]]]:
    """(commit, [(path in the repository, blob id)]) of every ``.bvh`` file at the clone's HEAD."""
    return files_at_head(repo, BVH_FILE, URL)


def subset(files: list[tuple[str, str]], limit: int | None) -> list[tuple[str, str]]:
    """The first ``limit`` files by a hash of their names (all when None), in path order."""
    if limit is None or limit >= len(files):
        return files
    chosen = sorted(files, key=lambda f: zlib.crc32(Path(f[0]).name.encode()))[:limit]
    return sorted(chosen)


def object_sizes(repo: Path, files: list[tuple[str, str]]) -> dict[str, int]:
    """Blob id -> size of each of ``files`` whose object the clone holds."""
    batch = git(repo, "cat-file", "--batch-check", data="".join(f"{b}\n" for _, b in files).encode())
    parts = (line.split() for line in batch.decode().splitlines())
    return {p[0]: int(p[2]) for p in parts if p[-1] != "missing"}


def extract(repo: Path, files: list[tuple[str, str]], sizes: dict[str, int], out: Path) -> list[dict]:
    """Write each blob to ``<out>/bvh/<name>`` (kept when already there with the same size); returns the
    index rows."""
    (out / "bvh").mkdir(parents=True, exist_ok=True)
    rows = []
    for path, blob in files:
        name = Path(path).name
        target = out / "bvh" / name
        if not (target.exists() and target.stat().st_size == sizes[blob]):
            write_atomic(target, git(repo, "cat-file", "blob", blob))
        rows.append({"path": f"bvh/{name}", "subject": name.split("_", 1)[0].replace("dataset-", "bn"),
                     "split": "train", "video_id": Path(name).stem, "frames": _frame_count(target)})
    return rows


def _frame_count(path: Path) -> int:
    with open(path, "rb") as fh:
        for line in fh:
            if line.startswith(b"Frames:"):
                return int(line.split()[1])
    raise InputError(f"{path}: no 'Frames:' line; not a BVH file")


def write_corpus(repo: Path, out: Path, limit: int | None) -> Path:
    """Extract the corpus into ``out`` and write its index and SOURCE.json; returns the index path."""
    commit, files = bvh_objects(repo)
    sizes = object_sizes(repo, files)
    missing = [path for path, blob in files if blob not in sizes]
    rows = extract(repo, subset([f for f in files if f[1] in sizes], limit), sizes, out)
    for path in missing:
        log.warning("skipped %s: the clone lacks its object", path)
    index = write_index(out / "index.csv", rows, ["path", "subject", "split", "video_id"])
    frames = sum(r["frames"] for r in rows)
    source = {"url": URL, "commit": commit, "licence": LICENCE, "layout": "bvh", "fps": FPS,
              "files_at_commit": len(files), "limit": limit, "sequences": len(rows),
              "skipped_missing_objects": missing, "frames": frames, "minutes": round(frames / FPS / 60, 1),
              "per_dataset": {s: sum(r["subject"] == s for r in rows) for s in sorted({r["subject"] for r in rows})}}
    write_atomic(out / "SOURCE.json", json.dumps(source, indent=2).encode())
    log.info("%d sequences (%d frames, %.1f min) in %s; %d skipped (object missing)", len(rows), frames,
             source["minutes"], out, len(missing))
    return index


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--repo", type=Path, required=True, help="a git clone (bare or not) of " + URL)
    ap.add_argument("--out", type=Path, required=True, help="where the BVH files, index.csv and SOURCE.json go")
    ap.add_argument("--limit", type=int, default=None, help="a fixed subset of this many sequences")
    ap.add_argument("--shards", type=Path, default=None, help="also build pose shards here")
    ap.add_argument("--workers", type=int, default=2, help="shard-building processes")
    args = ap.parse_args(argv)
    setup_logging()
    with one_line_errors("motion_corpus"):
        if args.limit is not None and args.limit < 1:
            raise InputError(f"--limit {args.limit}: must be at least 1")
        index = write_corpus(args.repo, args.out, args.limit)
        if args.shards is not None:
            build_pose_shards(index, args.shards, "bvh", args.workers)
    return 0


if __name__ == "__main__":
    sys.exit(main())
