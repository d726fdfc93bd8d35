"""Rank / world / DataLoader-worker helpers for the data stream.

Rank and world size come from ``torch.distributed`` when a process group is initialised, else from
the ``RANK`` / ``WORLD_SIZE`` environment variables, else ``(0, 1)``. ``torch.distributed`` goes first
on purpose: under DeepSpeed on CPU, ``accelerator.num_processes`` reports 1 while the process group
has 2 ranks, and the process group is what the collective operations (and so the ranks that must see
disjoint data) actually use.
"""

from __future__ import annotations

import os
from dataclasses import dataclass


@dataclass(frozen=True)
class Slot:
    """Where one data-reading process sits: ``rank`` of ``world`` nodes, ``worker`` of ``workers``."""

    rank: int = 0
    world: int = 1
    worker: int = 0
    workers: int = 1

    @property
    def index(self) -> int:
        """Flat slot id in ``[0, world * workers)``, rank-major."""
        return self.rank * self.workers + self.worker

    @property
    def count(self) -> int:
        return self.world * self.workers


def rank_world() -> tuple[int, int]:
    """(rank, world_size) of this process: torch.distributed, else env RANK/WORLD_SIZE, else (0, 1)."""
    try:
        import torch.distributed as dist

        if dist.is_available() and dist.is_initialized():
            return int(dist.get_rank()), int(dist.get_world_size())
    except ImportError:  # pragma: no cover - torch is a dependency
        pass
    if "RANK" in os.environ and "WORLD_SIZE" in os.environ:
        try:
            rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
        except ValueError as err:
            raise ValueError(f"env RANK/WORLD_SIZE must be integers, got {os.environ['RANK']!r}/"
                             f"{os.environ['WORLD_SIZE']!r}") from err
        if not 0 <= rank < world:
            raise ValueError(f"env RANK={rank} is outside WORLD_SIZE={world}")
        return rank, world
    return 0, 1


def worker_info() -> tuple[int, int]:
    """(worker id, number of workers) inside a DataLoader worker; (0, 1) in the main process."""
    from torch.utils.data import get_worker_info

    info = get_worker_info()
    if info is None:
        return 0, 1
    return int(info.id), int(info.num_workers)


def is_main_process() -> bool:
    return rank_world()[0] == 0


def gather_objects(local: object) -> list:
    """``[rank 0's local, rank 1's, ...]``: every rank's picklable ``local`` on every rank (collective when
    a process group of several is up; ``[local]`` otherwise)."""
    try:
        import torch.distributed as dist
    except ImportError:  # pragma: no cover - torch is a dependency
        return [local]
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return [local]
    parts: list = [None] * dist.get_world_size()
    dist.all_gather_object(parts, local)
    return parts
