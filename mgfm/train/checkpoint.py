"""Resumable training checkpoints: atomic, complete-or-absent, last K kept.

A checkpoint is a folder ``checkpoints/step_NNNNNNNN/`` holding Accelerate's full state (model, optimizer,
LR schedule, RNG; DeepSpeed's sharded files when DeepSpeed runs) plus ``meta.json`` (step, data epoch,
...). Every rank writes into ``step_NNNNNNNN.tmp``; after a barrier rank 0 writes ``meta.json`` and renames
the folder, so a folder without the ``.tmp`` suffix is always complete: a run killed mid-save resumes from
the previous one.
"""

from __future__ import annotations

import json
import logging
import re
import shutil
from pathlib import Path

from mgfm.files import StorageError, writing
from mgfm.runtime import barrier, is_main_process

log = logging.getLogger(__name__)
PATTERN = re.compile(r"^step_(\d{8})$")


def checkpoint_dirs(root: str | Path) -> list[Path]:
    """Complete checkpoints under ``root``, oldest first."""
    root = Path(root)
    if not root.is_dir():
        return []
    found = [p for p in root.iterdir() if p.is_dir() and PATTERN.match(p.name) and (p / "meta.json").exists()]
    return sorted(found, key=lambda p: int(PATTERN.match(p.name).group(1)))


def latest_checkpoint(root: str | Path) -> Path | None:
    found = checkpoint_dirs(root)
    return found[-1] if found else None


def save_checkpoint(accelerator, root: str | Path, step: int, meta: dict, keep: int) -> Path:
    """Save the full training state at ``step`` (collective: every rank must call it)."""
    root = Path(root)
    final = root / f"step_{step:08d}"
    tmp = root / f"step_{step:08d}.tmp"
    try:
        with writing(tmp):
            if is_main_process():
                shutil.rmtree(tmp, ignore_errors=True)
                tmp.mkdir(parents=True)
            barrier()
            accelerator.save_state(str(tmp))
            barrier()
            if is_main_process():
                (tmp / "meta.json").write_text(json.dumps({"step": step, **meta}, indent=1))
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


def load_checkpoint(accelerator, path: str | Path) -> dict:
    """Restore the full training state from ``path``; returns its ``meta.json``."""
    path = Path(path)
    meta_file = path / "meta.json"
    if not meta_file.exists():
        raise FileNotFoundError(f"{path}: not a complete mgfm checkpoint (no meta.json)")
    accelerator.load_state(str(path))
    return json.loads(meta_file.read_text())
