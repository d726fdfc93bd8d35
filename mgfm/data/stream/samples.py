"""Shard tasks -> raw samples: each shard opened and grouped into samples (or replayed from a
:class:`~mgfm.data.stream.memory.MemoryClips`), a mixture's sets drawn by weight in train, every set's clips in
turn in eval; what a shard fails to deliver is recorded as skips."""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING, Iterable, Iterator

import numpy as np
from webdataset.gopen import gopen

from mgfm.data.stream.assignment import ShardTask
from mgfm.data.stream.skips import WorkerState
from mgfm.shards.read import group_samples, tar_members

if TYPE_CHECKING:
    from mgfm.data.stream.memory import MemoryClips

log = logging.getLogger("mgfm.data.stream")


def mixed_sources(sets: list[tuple[str | None, list[ShardTask]]], weights: list[float], rng: np.random.Generator,
                   state: WorkerState, memory: "MemoryClips | None" = None) -> Iterator[dict]:
    """Train samples of several shard sets, each next one from a set drawn with ``weights``; a set whose
    shards all broke drops out (the others' weights renormalised)."""
    sources = [read_shards(task_source(tasks, True, rng, state), state, memory) for _, tasks in sets]
    names = [name for name, _ in sets]
    live = [i for i, (_, tasks) in enumerate(sets) if tasks and weights[i] > 0]
    while live:
        p = np.array([weights[i] for i in live])
        i = live[int(rng.choice(len(live), p=p / p.sum()))]
        try:
            sample = next(sources[i])
        except StopIteration:
            live.remove(i)
            continue
        sample["__set__"] = names[i]
        yield sample


def sets_in_turn(sets: list[tuple[str | None, list[ShardTask]]], rng: np.random.Generator,
                  state: WorkerState, memory: "MemoryClips | None" = None) -> Iterator[dict]:
    """Eval samples of several shard sets: every clip of each set once, tagged with its set."""
    for name, tasks in sets:
        for sample in read_shards(task_source(tasks, False, rng, state), state, memory):
            sample["__set__"] = name
            yield sample


def task_source(tasks: list[ShardTask], train: bool, rng: np.random.Generator, state: WorkerState):
    """Eval: each task once, in order. Train: endless passes, reshuffled each time; stops when a
    whole pass read no sample at all (every shard broken) instead of spinning forever."""
    if not train:
        yield from tasks
        return
    while tasks:
        before = state.read
        for i in rng.permutation(len(tasks)):
            yield tasks[i]
        if state.read == before:
            log.error("stream: a full pass over %d shards read no sample; stopping this worker", len(tasks))
            return


def read_shards(tasks: Iterable[ShardTask], state: WorkerState, memory: "MemoryClips | None" = None) -> Iterator[dict]:
    """Open each task's shard (gopen), group tar members into samples, keep ``k % mod == rem``. A shard held
    in ``memory`` is replayed from there instead: the same samples (decoded frames in place of the mp4) and
    the same skip records."""
    for task in tasks:
        url = task.shard.url
        held = memory.shards.get(url) if memory is not None else None
        errors: list[str] = list(held.errors) if held is not None else []
        kept = 0
        for k, sample in enumerate(held.samples if held is not None else shard_samples(url, errors)):
            if k % task.mod == task.rem:
                sample = dict(sample, __shard__=url)
                state.read += 1
                kept += 1
                yield sample
        _account_shard(task, errors, kept, state)


def shard_samples(url: str, errors: list[str]) -> Iterator[dict]:
    """The samples of one shard in order; a failure to open or read it ends them and lands in ``errors``."""
    stream = None
    try:
        stream = gopen(url, "rb")
        yield from group_samples(tar_members(stream), errors.append)
    except Exception as exn:  # noqa: BLE001 - any failure of one shard must not end the stream
        errors.append(f"{type(exn).__name__}: {str(exn)[:200]}")
    finally:
        if stream is not None:
            try:
                stream.close()
            except Exception as exn:  # noqa: BLE001 - e.g. a pipe's non-zero exit status
                errors.append(f"{type(exn).__name__}: {str(exn)[:200]}")


def _account_shard(task: ShardTask, errors: list[str], kept: int, state: WorkerState) -> None:
    """Skip records for a shard task read to its end: a broken shard, and the samples it did not deliver."""
    url, expected, part = task.shard.url, task.expected, f"{task.rem}/{task.mod}"
    if errors:
        state.skip("shard", url, None, f"shard error: {errors[0]}")
        if expected is not None and kept < expected:
            state.skip("sample", url, None, f"lost in broken shard: {expected - kept} of {expected} samples",
                       count=expected - kept, part=part)
    elif expected is not None and kept < expected:  # a valid tar cut short, or an empty one
        state.skip("sample", url, None, f"fewer than the manifest lists: the shard holds {kept} of its {expected} samples",
                   count=expected - kept, part=part)
