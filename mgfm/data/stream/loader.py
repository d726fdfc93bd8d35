"""The stream itself (:class:`ClipStream`, one per process and epoch) and its DataLoader
(:func:`make_loader`): the stages of :mod:`~mgfm.data.stream.samples` and :mod:`~mgfm.data.stream.decode`
chained per worker, skip records moved into a :class:`~mgfm.data.stream.skips.SkipCounter`."""

from __future__ import annotations

import logging
import warnings
from pathlib import Path
from typing import Any, Iterator, Sequence

import numpy as np
import torch
from torch.utils.data import IterableDataset
from torchdata.stateful_dataloader import StatefulDataLoader

from mgfm.data.stream.assignment import (UNKNOWN_SHARD_SAMPLES, ShardTask, Slot, assign_shards, epoch_tasks,
                                         worker_info, worker_quotas)
from mgfm.data.stream.config import StreamConfig
from mgfm.data.stream.decode import batch_stage, decode_stage, finish_batch
from mgfm.data.stream.memory import MemoryClips
from mgfm.data.stream.samples import epoch_samples, mixed_sources, read_shards, sets_in_turn, shuffled, task_source
from mgfm.data.stream.skips import SkipCounter, WorkerState
from mgfm.errors import InputError
from mgfm.runtime import rank_world
from mgfm.shards.read import Mixture, ShardRef, missing_local_shards, shard_sets

log = logging.getLogger("mgfm.data.stream")

MODES = ("train", "eval")


class ClipStream(IterableDataset):
    """The per-process clip stream; build it with :func:`make_loader` (it also sets rank/world).

    ``sets``: ``[(name or None, shards)]``, one or several shard sets (:class:`Mixture`), each split over
    ranks and workers on its own; ``weights``: their sampling weights in train mode (None: by size)."""

    def __init__(self, sets: Sequence[tuple[str | None, Sequence[ShardRef]]], cfg: StreamConfig,
                 mode: str = "train", epoch: int = 0, rank: int = 0, world: int = 1,
                 batches_per_epoch: int | None = None, weights: Sequence[float] | None = None,
                 memory: "MemoryClips | None" = None):
        super().__init__()
        if mode not in MODES:
            raise ValueError(f"stream mode must be one of {MODES}, got {mode!r}")
        if mode == "train" and not batches_per_epoch:
            raise ValueError("train stream needs batches_per_epoch >= 1")
        self.sets = [(name, list(refs)) for name, refs in sets]
        if weights is None:
            weights = [sum(r.samples or UNKNOWN_SHARD_SAMPLES for r in refs) for _, refs in self.sets]
        total = float(sum(weights))
        self.weights = [w / total for w in weights]
        self.cfg = cfg
        self.mode = mode
        self.epoch = epoch
        self.rank, self.world = rank, world
        self.batches_per_epoch = batches_per_epoch
        self.memory = memory
        self._state: WorkerState | None = None
        self._resume: dict[str, int] = {}  # the position a resumed stream starts from (load_state_dict)

    def slot(self) -> Slot:
        worker, workers = worker_info()
        return Slot(self.rank, self.world, worker, workers)

    def worker_batches(self, slot: Slot) -> int:
        """Train: batches this worker yields (the rank's ``batches_per_epoch`` split over workers)."""
        return worker_quotas(int(self.batches_per_epoch or 0), slot.workers)[slot.worker]

    def expected_batches(self, workers: int) -> int | None:
        """Batches this rank yields in one epoch (None when shard sizes are unknown)."""
        if self.mode == "train":
            return int(self.batches_per_epoch)
        total = 0
        for w in range(max(1, workers)):
            slot = Slot(self.rank, self.world, w, max(1, workers))
            tasks = [t for _, refs in self.sets for t in assign_shards(refs, slot)]
            counts = [t.expected for t in tasks]
            if any(c is None for c in counts):
                return None
            total += -(-sum(counts) // self.cfg.batch_size)
        return total

    def __iter__(self) -> Iterator[dict]:
        slot = self.slot()
        train = self.mode == "train"
        state = WorkerState(self.cfg.log_skips)
        state.batches = self._resume.get("batches", 0)
        self._state = state
        seeds = [self.cfg.seed, self.epoch, slot.rank, slot.worker, int(train)]
        rng = np.random.default_rng([*seeds, 0])  # the reading order: shard passes, mixture draws, shuffling
        samples, tasks = self._samples(slot, train, rng, state)
        known = [t.expected for t in tasks]
        max_failures = (sum(known) if None not in known else UNKNOWN_SHARD_SAMPLES * len(tasks)) + self.cfg.shuffle_buffer
        clips = decode_stage(samples, self.cfg, train, seeds, state, max_failures, skip=self._resume.get("pulled", 0))
        limit = self.worker_batches(slot) if train else None
        return batch_stage(clips, self.cfg, train, state, limit, partial_last=not train)

    def _samples(self, slot: Slot, train: bool, rng: np.random.Generator,
                 state: WorkerState) -> tuple[Iterator[dict], list[ShardTask]]:
        """This slot's raw samples in reading order (shuffled in train), and the shard tasks they come from."""
        cfg = self.cfg
        if train and len(self.sets) == 1:
            plan = epoch_tasks(self.sets[0][1], slot, cfg.seed, self.epoch, cfg.batch_size, int(self.batches_per_epoch))
            if plan is not None:
                return epoch_samples(plan, rng, state, cfg.shuffle_buffer, self.memory), plan
        per_set = [(name, assign_shards(refs, slot, self.mode, cfg.seed, self.epoch)) for name, refs in self.sets]
        tasks = [t for _, set_tasks in per_set for t in set_tasks]
        if train and len(per_set) > 1:  # one endless source per set, drawn from by weight
            samples = mixed_sources(per_set, self.weights, rng, state, self.memory)
        elif len(per_set) > 1:  # eval: each set's clips once, set after set
            samples = sets_in_turn(per_set, rng, state, self.memory)
        else:
            samples = read_shards(task_source(tasks, train, rng, state), state, self.memory)
        return (shuffled(samples, cfg.shuffle_buffer, rng) if train else samples), tasks

    # The resumable position (torchdata's StatefulDataLoader asks each worker's copy after every batch).
    def state_dict(self) -> dict:
        """Where this worker's stream stands in its epoch: the samples it has taken and the batches it gave."""
        if self._state is None:
            return {"epoch": self.epoch, "pulled": 0, "batches": 0, **self._resume}
        return {"epoch": self.epoch, "pulled": self._state.pulled, "batches": self._state.batches}

    def load_state_dict(self, state: dict) -> None:
        """Continue a stream of the same epoch after the ``pulled`` samples it had taken (they are read, not
        decoded, and dropped) and the ``batches`` it had given."""
        if state.get("epoch") != self.epoch:
            raise ValueError(f"stream state of epoch {state.get('epoch')} given to the stream of epoch {self.epoch}")
        self._resume = {"pulled": int(state["pulled"]), "batches": int(state["batches"])}


# torchdata calls a torch API that torch >= 2.10 deprecated, once per epoch; nothing for a user to do.
warnings.filterwarnings("ignore", message=".*set_vital.* is deprecated", category=UserWarning)


class StreamLoader(StatefulDataLoader):
    """A DataLoader over a :class:`ClipStream` that moves skip records into a :class:`SkipCounter`,
    drops the workers' end markers, and logs the skip summary when an epoch ends.

    It is torchdata's ``StatefulDataLoader``: ``state_dict()`` after some batches and ``load_state_dict()``
    on a new loader of the same epoch continue the stream exactly (each worker's position comes from
    :meth:`ClipStream.state_dict`, the order of the workers from the loader), so a resumed run sees the
    batches an uninterrupted one would have seen. Workers take turns (``in_order``), which makes that
    order deterministic."""

    def __init__(self, dataset: ClipStream, counter: SkipCounter, **kwargs):
        super().__init__(dataset, batch_size=None, **kwargs)
        self.counter = counter
        self._expected = dataset.expected_batches(kwargs.get("num_workers", 0))

    def __iter__(self) -> Iterator[dict]:  # type: ignore[override]
        for batch in super().__iter__():
            self.counter.add(batch.pop("skipped", []))
            if batch.get("_marker"):
                continue
            yield finish_batch(batch, self.dataset.cfg, own_pages=self.num_workers > 0)
        ds: ClipStream = self.dataset  # type: ignore[assignment]
        if self.counter.total:
            log.warning("stream %s epoch %d rank %d: %s", ds.mode, ds.epoch, ds.rank, self.counter.summary())
        else:
            log.info("stream %s epoch %d rank %d: no samples skipped", ds.mode, ds.epoch, ds.rank)
        if self.counter.padded:  # said as a warning once per run (train epoch 0) and per evaluation
            cfg = ds.cfg
            log.log(logging.WARNING if ds.mode == "eval" or ds.epoch == 0 else logging.INFO,
                    "stream %s rank %d: %d clips are shorter than %d frames and were filled (stream.pad=%s)",
                    ds.mode, ds.rank, self.counter.padded, cfg.frames, cfg.pad)

    def __len__(self) -> int:
        if self._expected is None:
            raise TypeError("stream length unknown (shard sizes are not in a manifest)")
        return self._expected


def _as_is(batch: dict) -> dict:
    return batch


def pin_memory(cfg: StreamConfig) -> bool:
    """Whether batches are page-locked: ``cfg.pin_memory``, or when it is None, whether CUDA is there."""
    if cfg.pin_memory is not None:
        return cfg.pin_memory
    return torch.cuda.is_available()


def make_loader(source: str | Path | Sequence[str] | Mixture, split: str, cfg: StreamConfig, mode: str = "train",
                epoch: int = 0, rank: int | None = None, world: int | None = None,
                memory: MemoryClips | None = None) -> tuple[StreamLoader, SkipCounter]:
    """A batched DataLoader over the ``split`` shards of ``source`` (one shard set, or a :class:`Mixture` of
    several) and the counter of what it skips.

    ``rank``/``world`` default to :func:`mgfm.runtime.rank_world`. Create a new loader per
    epoch (``epoch`` reseeds shard order, shuffling, crops and masks); ``loader.state_dict()`` /
    ``load_state_dict()`` resume one mid-epoch. Do not ``accelerator.prepare`` it.
    With ``cfg.cache="memory"`` the split is decoded once (:class:`MemoryClips`); pass the ``memory`` of an
    earlier epoch to reuse it (DataLoader workers share it copy-on-write).
    """
    cfg.require_geometry()
    if rank is None or world is None:
        rank, world = rank_world()
    sets = shard_sets(source, split, cfg.remote_commands)
    shards = [r for _, refs in sets for r in refs]
    missing = missing_local_shards(source, split, cfg.remote_commands)
    batches = cfg.batches_per_epoch
    if mode == "train" and batches is None:
        if any(s.samples is None for s in shards):
            raise InputError(f"{source}: shard sizes unknown (no manifest); set batches_per_epoch for training")
        batches = max(1, sum(s.samples for s in shards) // (world * cfg.batch_size))
    weights = source.weights if isinstance(source, Mixture) else None
    if memory is None and cfg.cache == "memory":
        memory = MemoryClips.load(source, split, cfg)
    dataset = ClipStream(sets, cfg, mode, epoch, rank, world, batches, weights, memory)
    counter = SkipCounter()
    counter.add(missing)
    for rec in missing[:cfg.log_skips] if rank == 0 else []:
        log.warning("stream skip (%s) %s: %s", rec["kind"], rec["shard"], rec["reason"])
    # collate_fn: batches are made in the dataset; skip DataLoader's recursive conversion of them.
    kwargs: dict[str, Any] = {"num_workers": cfg.num_workers, "pin_memory": pin_memory(cfg), "collate_fn": _as_is}
    if cfg.num_workers > 0:
        kwargs["prefetch_factor"] = cfg.prefetch_factor
    return StreamLoader(dataset, counter, **kwargs), counter
