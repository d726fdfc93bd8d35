"""Which shards (and which of their samples) each (rank, DataLoader worker) slot reads: ranks first, then the
rank's workers; disjoint shards whenever there are enough, else disjoint samples by index modulo."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import numpy as np
from torch.utils.data import get_worker_info

from mgfm.shards.read import ShardRef

# Samples per shard assumed when a shard's size is unknown (only bounds the all-corrupt guard in train).
UNKNOWN_SHARD_SAMPLES = 1000


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


def worker_info() -> tuple[int, int]:
    """(worker id, number of workers) inside a DataLoader worker; (0, 1) in the main process."""
    info = get_worker_info()
    if info is None:
        return 0, 1
    return int(info.id), int(info.num_workers)


@dataclass(frozen=True)
class ShardTask:
    """A shard as one slot reads it: keep samples whose index ``k`` has ``k % mod == rem``."""

    shard: ShardRef
    mod: int = 1
    rem: int = 0

    @property
    def expected(self) -> int | None:
        n = self.shard.samples
        return None if n is None else len(range(self.rem, n, self.mod))


# ------------------------------------------------------------------------------------- assignment


def split_tasks(tasks: Sequence[ShardTask], groups: int, group: int) -> list[ShardTask]:
    """The tasks of ``group`` (0-based) when ``tasks`` are divided among ``groups`` readers.

    With at least as many tasks as groups every task goes to one group (greedy, largest expected count
    to the least loaded group; ties in list order), so groups get disjoint shards. With fewer tasks
    than groups, group ``g`` reads task ``g % n`` and keeps every ``share``-th of its samples, so the
    groups sharing a task get disjoint samples and together all of them.
    """
    n = len(tasks)
    if groups < 1 or not 0 <= group < groups:
        raise ValueError(f"group {group} out of range for {groups} groups")
    if n == 0:
        return []
    if n >= groups:
        weights = [float(t.expected) if t.expected is not None else 1.0 for t in tasks]
        loads = [0.0] * groups
        owner = [0] * n
        for i in sorted(range(n), key=lambda i: -weights[i]):
            j = min(range(groups), key=lambda g: (loads[g], g))
            owner[i] = j
            loads[j] += weights[i]
        return [t for i, t in enumerate(tasks) if owner[i] == group]
    i = group % n
    share = len(range(i, groups, n))
    task = tasks[i]
    return [ShardTask(task.shard, task.mod * share, task.rem + task.mod * (group // n))]


def assign_shards(shards: Sequence[ShardRef], slot: Slot, mode: str = "eval", seed: int = 0,
                  epoch: int = 0) -> list[ShardTask]:
    """The shard tasks one (rank, worker) slot reads: ranks first, then the rank's workers.

    In ``train`` mode the shard list is first permuted with ``(seed, epoch)``, identically on all ranks.
    """
    tasks = [ShardTask(s) for s in shards]
    if mode == "train":
        order = np.random.default_rng([seed, epoch, 0x5EED]).permutation(len(tasks))
        tasks = [tasks[i] for i in order]
    mine = split_tasks(tasks, slot.world, slot.rank)
    return split_tasks(mine, slot.workers, slot.worker)
