"""Resumable training checkpoints: atomic, verified, complete-or-absent, last K kept.

A checkpoint is a folder ``checkpoints/step_NNNNNNNN/`` holding Accelerate's full state (model, optimizer,
LR schedule, RNG; DeepSpeed's sharded files when DeepSpeed runs), one ``rank_R.json`` per rank (its own
state outside the model: the data stream's position and what it skipped) and ``meta.json`` (step, data
epoch, ... and every other file's size and sha256). Every rank writes into ``step_NNNNNNNN.tmp``; after a
barrier rank 0 hashes the files, writes ``meta.json`` last and renames the folder, so a folder without the
``.tmp`` suffix was complete when written. What happens to it later (a torn copy, a truncated file, a disk
error) is caught by :func:`verify_checkpoint`: a run resumes from the newest checkpoint that verifies and
names the ones it passed over and why. The shared-folder assumption: rank 0 reads every rank's files, as
resuming on other nodes needs anyway.
"""

from __future__ import annotations

import json
import logging
import re
import shutil
from pathlib import Path

import torch.distributed as dist

from mgfm.errors import InputError
from mgfm.files import StorageError, sha256_file, write_atomic, writing
from mgfm.runtime import barrier, is_main_process, rank_world

log = logging.getLogger(__name__)
PATTERN = re.compile(r"^step_(\d{8})$")
META = "meta.json"


class CheckpointError(InputError):
    """A checkpoint named by ``resume=PATH`` that is not a complete, intact mgfm checkpoint."""


def checkpoint_dirs(root: str | Path) -> list[Path]:
    """Checkpoint folders under ``root`` that were completed (renamed, with ``meta.json``), oldest first."""
    root = Path(root)
    if not root.is_dir():
        return []
    found = [p for p in root.iterdir() if p.is_dir() and PATTERN.match(p.name) and (p / META).exists()]
    return sorted(found, key=lambda p: int(PATTERN.match(p.name).group(1)))


def rank_file(rank: int) -> str:
    return f"rank_{rank}.json"


def _manifest(folder: Path) -> dict[str, dict]:
    return {str(p.relative_to(folder)): {"bytes": p.stat().st_size, "sha256": sha256_file(p)}
            for p in sorted(folder.rglob("*")) if p.is_file() and p.name != META}


def verify_checkpoint(path: str | Path) -> str | None:
    """Why the checkpoint at ``path`` cannot be trusted (a file missing, of another size or checksum than
    when it was written, an unreadable ``meta.json``), or None when it verifies. A checkpoint written before
    checksums were recorded verifies with a warning."""
    path = Path(path)
    try:
        meta = json.loads((path / META).read_text())
    except (OSError, ValueError) as err:
        return f"{META} unreadable ({type(err).__name__})"
    files = meta.get("files")
    if files is None:
        log.warning("%s: written before checkpoints recorded checksums; trusted unverified", path)
        return None
    for name, want in files.items():
        file = path / name
        if not file.is_file():
            return f"{name} is missing"
        size = file.stat().st_size
        if size != want["bytes"]:
            return f"{name} is {size} bytes, {want['bytes']} when written"
        if sha256_file(file) != want["sha256"]:
            return f"{name} does not match its checksum"
    return None


def latest_checkpoint(root: str | Path) -> Path | None:
    """The newest checkpoint under ``root`` that verifies (rank 0 checks, every rank gets its answer); each
    newer one passed over is named in a warning with the reason."""
    choice = None
    if is_main_process():
        for path in reversed(checkpoint_dirs(root)):
            problem = verify_checkpoint(path)
            if problem is None:
                choice = str(path)
                break
            log.warning("checkpoint %s skipped: %s", path, problem)
    choice = _from_rank0(choice)
    return None if choice is None else Path(choice)


def named_checkpoint(path: str | Path) -> Path:
    """The checkpoint ``resume=PATH`` names, verified; a one-line :class:`CheckpointError` otherwise."""
    path = Path(path)
    problem = None
    if is_main_process():
        if not (path / META).is_file():
            problem = "not a complete mgfm checkpoint (no meta.json)"
        else:
            problem = verify_checkpoint(path)
    problem = _from_rank0(problem)
    if problem is not None:
        raise CheckpointError(f"resume={path}: {problem}")
    return path


def _from_rank0(value):
    """Rank 0's ``value`` on every rank (collective in a process group of several)."""
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return value
    box = [value]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def clean_unfinished(root: str | Path) -> None:
    """Remove the ``.tmp`` folders of checkpoints a killed run did not finish (rank 0; the run folder's lock
    makes them this run's)."""
    root = Path(root)
    if is_main_process() and root.is_dir():
        for tmp in root.glob("step_*.tmp"):
            shutil.rmtree(tmp, ignore_errors=True)


def save_checkpoint(accelerator, root: str | Path, step: int, meta: dict, keep: int,
                    rank_state: dict | None = None) -> Path:
    """Save the full training state at ``step`` (collective: every rank must call it); ``rank_state`` is this
    rank's own state (JSON-able), read back by :func:`load_checkpoint`."""
    root = Path(root)
    final = root / f"step_{step:08d}"
    tmp = root / f"step_{step:08d}.tmp"
    rank, _ = rank_world()
    try:
        with writing(tmp):
            if is_main_process():
                shutil.rmtree(tmp, ignore_errors=True)
                tmp.mkdir(parents=True)
            barrier()
            accelerator.save_state(str(tmp))
            write_atomic(tmp / rank_file(rank), json.dumps(rank_state or {}))
            barrier()
            if is_main_process():
                write_atomic(tmp / META, json.dumps({"step": step, **meta, "world": rank_world()[1],
                                                     "files": _manifest(tmp)}, indent=1))
    except StorageError:  # the half-written folder goes; the complete checkpoints before it stay
        if is_main_process():
            shutil.rmtree(tmp, ignore_errors=True)
        raise
    if is_main_process():
        if final.exists():
            shutil.rmtree(final)
        tmp.rename(final)
        for old in checkpoint_dirs(root)[:-keep] if keep > 0 else []:
            shutil.rmtree(old, ignore_errors=True)
        log.info("checkpoint saved: %s", final)
    barrier()
    return final


def load_checkpoint(accelerator, path: str | Path, world: int = 1) -> tuple[dict, dict | None]:
    """Restore the full training state from ``path`` into a run of ``world`` ranks; returns its ``meta.json``
    and this rank's own state (None in a checkpoint written before ranks kept one). A checkpoint of another
    number of ranks is a one-line :class:`CheckpointError`: its optimiser partitions and each rank's place in
    the data are those of its own ranks."""
    path = Path(path)
    meta_file = path / META
    if not meta_file.exists():
        raise CheckpointError(f"{path}: not a complete mgfm checkpoint (no meta.json)")
    written_by = json.loads(meta_file.read_text()).get("world", world)
    if written_by != world:
        raise CheckpointError(f"{path} was written by {written_by} ranks and this run has {world}: resume with "
                              f"{written_by} processes (the optimiser's partitions and each rank's place in the data "
                              f"are theirs)")
    accelerator.load_state(str(path))
    own = path / rank_file(rank_world()[0])
    return json.loads(meta_file.read_text()), (json.loads(own.read_text()) if own.is_file() else None)
