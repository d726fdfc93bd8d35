"""Which shards (and which of their samples) each (rank, DataLoader worker) slot reads.

* Eval, and train streams of unknown size or of a weighted mixture: ranks first, then the rank's workers;
  disjoint shards whenever there are enough, else disjoint samples by index modulo (:func:`assign_shards`).
* A train epoch of one shard set with known sizes (:func:`epoch_tasks`): the shards, permuted by
  ``(seed, epoch)``, are one sequence of clips cut into contiguous ranges, one per rank, each cut into one
  range per worker of whole batches; every clip at most once per epoch, the clips past the last whole batch
  of each rank left for later epochs (as ``DistributedSampler(drop_last=True)``). MosaicML's StreamingDataset
  partitions its sample space the same way."""

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
    """A shard as one slot reads it: keep the samples whose index ``k`` is in ``[start, stop)`` (``stop``
    None: to the end) and has ``k % mod == rem``."""

    shard: ShardRef
    mod: int = 1
    rem: int = 0
    start: int = 0
    stop: int | None = None

    def keeps(self, k: int) -> bool:
        return self.start <= k and (self.stop is None or k < self.stop) and k % self.mod == self.rem

    @property
    def expected(self) -> int | None:
        n = self.shard.samples
        if n is None:
            return None
        stop = n if self.stop is None else min(self.stop, n)
        return len(range(self.start + (self.rem - self.start) % self.mod, stop, self.mod))


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


def epoch_order(shards: Sequence[ShardRef], seed: int, epoch: int) -> list[ShardRef]:
    """The shards of a train epoch in the order ``(seed, epoch)`` gives them, the same on every rank."""
    order = np.random.default_rng([seed, epoch, 0x5EED]).permutation(len(shards))
    return [shards[i] for i in order]


def assign_shards(shards: Sequence[ShardRef], slot: Slot, mode: str = "eval", seed: int = 0,
                  epoch: int = 0) -> list[ShardTask]:
    """The shard tasks one (rank, worker) slot reads: ranks first, then the rank's workers.

    In ``train`` mode the shard list is first permuted with ``(seed, epoch)`` (:func:`epoch_order`).
    """
    tasks = [ShardTask(s) for s in (epoch_order(shards, seed, epoch) if mode == "train" else shards)]
    mine = split_tasks(tasks, slot.world, slot.rank)
    return split_tasks(mine, slot.workers, slot.worker)


def worker_quotas(batches: int, workers: int) -> list[int]:
    """How a rank's ``batches`` per epoch are dealt to its ``workers`` (the first ones take one more)."""
    return [batches // workers + (1 if w < batches % workers else 0) for w in range(workers)]


def epoch_tasks(shards: Sequence[ShardRef], slot: Slot, seed: int, epoch: int, batch_size: int,
                batches: int) -> list[ShardTask] | None:
    """The contiguous range of a train epoch one slot reads (see the module docstring), as shard tasks in
    reading order; None where the plan does not apply: a shard of unknown size, or ``batches`` per rank that
    need more clips than a rank's range holds (an explicit ``batches_per_epoch``: the stream resamples)."""
    if any(s.samples is None for s in shards):
        return None
    ordered = epoch_order(shards, seed, epoch)
    total = sum(s.samples for s in ordered)
    rank_lo, rank_hi = slot.rank * total // slot.world, (slot.rank + 1) * total // slot.world
    if batches * batch_size > rank_hi - rank_lo:
        return None
    quotas = worker_quotas(batches, slot.workers)
    lo = rank_lo + batch_size * sum(quotas[:slot.worker])
    hi = lo + batch_size * quotas[slot.worker]
    tasks, offset = [], 0
    for shard in ordered:
        start, stop = max(lo - offset, 0), min(hi - offset, shard.samples)
        if start < stop:
            tasks.append(ShardTask(shard, start=start, stop=stop))
        offset += shard.samples
    return tasks
