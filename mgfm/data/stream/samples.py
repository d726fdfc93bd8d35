"""Shard tasks -> raw samples: each shard opened and grouped into samples (or replayed from a
:class:`~mgfm.data.stream.memory.MemoryClips`), a planned train epoch read once and shuffled, a mixture's sets
drawn by weight in train, every set's clips in turn in eval; what a shard fails to deliver is recorded as
skips."""

from __future__ import annotations

import logging
import random
from typing import TYPE_CHECKING, Iterable, Iterator

import numpy as np
import webdataset as wds
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


def shuffled(samples: Iterator[dict], buffer: int, rng: np.random.Generator) -> Iterator[dict]:
    """``samples`` through a shuffle buffer of ``buffer`` samples (webdataset's; started half full), seeded from
    ``rng``; unchanged when ``buffer`` < 2."""
    if buffer < 2:
        return samples
    return wds.filters.shuffle(buffer, initial=buffer // 2, rng=random.Random(int(rng.integers(2**62))))(samples)


def epoch_samples(tasks: list[ShardTask], rng: np.random.Generator, state: WorkerState, buffer: int,
                  memory: "MemoryClips | None" = None) -> Iterator[dict]:
    """A planned train epoch (:func:`~mgfm.data.stream.assignment.epoch_tasks`): the slot's range read once,
    through the shuffle buffer. Only when skipped samples left the worker's quota short does the stream go on,
    into passes over the same range reshuffled (said once): a clip is then seen twice rather than a rank
    running dry."""
    yield from shuffled(read_shards(tasks, state, memory), buffer, rng)
    if tasks:
        log.warning("stream: skipped samples left this worker's epoch short; topping up from another pass over "
                    "its %d shard ranges", len(tasks))
        yield from shuffled(read_shards(task_source(tasks, True, rng, state), state, memory), buffer, rng)


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
        source = held.samples[:task.stop] if held is not None else shard_samples(url, errors, task.stop)
        for k, sample in enumerate(source):
            if task.keeps(k):
                sample = dict(sample, __shard__=url)
                state.read += 1
                kept += 1
                yield sample
        _account_shard(task, errors, kept, state)


def shard_samples(url: str, errors: list[str], limit: int | None = None) -> Iterator[dict]:
    """The samples of one shard in order (the first ``limit`` only: the rest is not read); a failure to open or
    read it ends them and lands in ``errors``."""
    stream, stopped = None, False
    try:
        stream = gopen(url, "rb")
        for k, sample in enumerate(group_samples(tar_members(stream), errors.append)):
            yield sample
            if limit is not None and k + 1 >= limit:
                stopped = True
                return
    except Exception as exn:  # noqa: BLE001 - any failure of one shard must not end the stream
        errors.append(f"{type(exn).__name__}: {str(exn)[:200]}")
    finally:
        if stream is not None:
            try:
                stream.close()
            except Exception as exn:  # noqa: BLE001 - e.g. a pipe's non-zero exit status
                if not stopped:  # a pipe closed before its end complains; that is not the shard's fault
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
