"""Process-group helpers for training: barriers and rank-aware logging.

Rank and world size come from :func:`mgfm.data.distributed.rank_world` (torch.distributed first: under
``accelerate launch --use_deepspeed`` on CPU, ``Accelerator.num_processes`` reports 1 while the process
group has the real world size).
"""

from __future__ import annotations

import logging

import torch.distributed as dist

from mgfm.data.distributed import is_main_process, rank_world

__all__ = ["barrier", "is_main_process", "rank_world", "setup_logging"]


def barrier() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.barrier()


def setup_logging(level: int = logging.INFO) -> None:
    """Log INFO on rank 0 and WARNING elsewhere, with the rank in every line."""
    rank, world = rank_world()
    prefix = f"[rank {rank}/{world}] " if world > 1 else ""
    logging.basicConfig(
        level=level if rank == 0 else logging.WARNING,
        format=f"%(asctime)s {prefix}%(levelname)s %(name)s: %(message)s",
        datefmt="%H:%M:%S",
        force=True,
    )
    for chatty in ("faiss.loader", "matplotlib", "accelerate.accelerator", "accelerate.checkpointing"):
        logging.getLogger(chatty).setLevel(logging.WARNING)
