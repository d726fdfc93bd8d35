"""WebDataset streams of MG clips for training and evaluation.

``make_loader(source, split, cfg, mode="train"|"eval", epoch=0) -> (loader, skips)`` returns a
:class:`torch.utils.data.DataLoader` (already batched) and the :class:`SkipCounter` it fills. A batch is
a dict::

    video          float32 (B*K, T, 3, S, S)  normalised frames (K = cfg.repeats in train, 1 in eval);
                                              uint8 unnormalised with cfg.video_dtype="uint8"
    encoder_mask   bool    (B*K, N)           True = token hidden from the encoder (tube mask)
    decoder_mask   bool    (B*K, N)           True = masked token the decoder reconstructs
    label          int64   (B*K,)             class id, -1 when unlabelled
    clip_id        list[str] (B*K)
    meta           list[dict] (B*K)           the shard json (+ "shard": its URL)

with ``N = (T / tubelet) * (S / patch)^2`` tokens in (t, h, w) order (see :mod:`mgfm.data.masking`);
the K views of one clip are adjacent rows. ``cfg.batch_size`` counts clips, so a batch has
``batch_size * K`` rows.

Sources: a local shard folder (its ``manifest.json`` maps split -> shards), a manifest URL or a remote
folder URL ending in ``/`` (``http(s)://``, ``s3://``, ...), a brace pattern (``shards/train-{000000..000009}.tar``,
``http://host/train-{000000..000009}.tar``; ``{split}`` is substituted), or a list of URLs. Remote shards
are opened with :func:`webdataset.gopen.gopen` (``http(s)`` via curl, ``pipe:CMD``); URL schemes in
``cfg.remote_commands`` are turned into ``pipe:`` commands, e.g. ``s3://b/k`` -> ``pipe:aws s3 cp 's3://b/k' -``.

Splitting across processes. The stream does its own node and worker splitting and the loader must NOT
be passed through ``accelerator.prepare()``: Accelerate re-shards or broadcasts IterableDatasets
(``dispatch_batches``), which fights WebDataset's shard-level splitting and can duplicate or drop
samples. Rank and world come from ``torch.distributed`` when it is initialised (under DeepSpeed on CPU
``accelerator.num_processes`` can say 1 while the process group has 2 ranks), else env
``RANK``/``WORLD_SIZE``, else 0/1 (:mod:`mgfm.data.distributed`); they are read once in
:func:`make_loader` and travel with the dataset into the DataLoader workers. Shards are assigned
hierarchically: to ranks first (disjoint shard sets whenever there are at least as many shards as ranks,
balanced by sample count), then to the rank's DataLoader workers. Where a level has fewer shards than
slots, slots share a shard and keep disjoint samples by index modulo (:func:`assign_shards`).

* ``train``: each epoch permutes the shard list with ``(seed, epoch)`` (the same on every rank, so ranks
  stay disjoint), each worker loops over its shards endlessly (reshuffled every pass: resampled), shuffles
  samples in a buffer, and the rank yields exactly ``batches_per_epoch`` full batches, so ranks never wait
  on each other because of uneven shards.
* ``eval``: every sample exactly once across all ranks and workers, in a deterministic order, last batch
  partial; ranks may get different numbers of batches (gather results, do not all-reduce per batch).

Decoding: decord from bytes (``cfg.backend``), with ``cfg.fallback_backend`` (PyAV) tried when it fails.
Temporal sampling: :mod:`mgfm.data.sampling`; spatial transforms: :mod:`mgfm.data.transforms`. Horizontal
flip is off by default: flipping swaps the hand a gesture is made with, which a dataset may label or a
model may use (iMiGUE's and SMG's classes are side-agnostic, so ``flip=True`` is label-safe there).
Repeated sampling (``repeats=K``) decodes a clip once and yields K crops + masks of it.

Where the time goes (see ``benchmarks/bench_loader.py``; decoding is ~80% of it): a worker decodes a
batch's clips back to back (the decoder is faster with warm caches), then crops and resizes them
straight into a planar uint8 batch buffer. Batches cross the process boundary as uint8 and the main
process converts them to normalised float32 (shared memory for 4x the bytes costs more than the
conversion); with ``video_dtype="uint8"`` that step is left to the accelerator
(:func:`mgfm.data.transforms.normalise`), which also moves 4x less over PCIe. In train mode the
DataLoader takes batches from whichever worker is ready first (``in_order=False``).

Errors: a sample with a bad json, a missing member or an undecodable video is skipped; a shard that
cannot be opened or is truncated is abandoned where it breaks. Both are counted, never crash, never
sleep. Any other exception is a bug in our code, not bad data: it stops the stream with its traceback. Counts travel to the main process inside the batches (and a final marker item per worker that
the loader drops), land in the :class:`SkipCounter`, and are logged when an epoch ends.
"""

from __future__ import annotations

import collections
import dataclasses
import inspect
import itertools
import json
import logging
import mmap
import random
import zlib
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Any, Iterable, Iterator, Literal, Sequence

import numpy as np
import torch
from torch.utils.data import DataLoader, IterableDataset

from mgfm.config import bounded
from mgfm.data.distributed import Slot, rank_world, worker_info
from mgfm.data.masking import MaskGenerator, TokenGrid
from mgfm.errors import InputError
from mgfm.shards.read import Mixture, ShardRef, group_samples, missing_local_shards, shard_sets, tar_members
from mgfm.data.sampling import sample_indices
from mgfm.data.transforms import (IMAGENET_MEAN, IMAGENET_STD, centre_crop_box, crop_resize_planar,
                                  multiscale_crop_box, normalise_into)
from mgfm.data.video_io import VideoDecodeError, decode_frames

log = logging.getLogger(__name__)

MODES = ("train", "eval")
# Samples per shard assumed when a shard's size is unknown (only bounds the all-corrupt guard in train).
_UNKNOWN_SHARD_SAMPLES = 1000
# The key under which a sample held by a MemoryClips carries its decoded frames (or why they could not be).
_FRAMES = "__frames__"


@dataclass
class StreamConfig:
    """How clips are sampled, cropped, masked and batched. Their geometry (``frames``, ``img_size``,
    ``tubelet``, ``patch``) and normalisation belong to the model: recipes leave them unset and the runs fill
    them in from the model they train or evaluate (:meth:`with_model`)."""

    frames: int | None = bounded(None, ge=1)  # frames per clip (T): the model's
    stride_policy: Literal["adaptive", "fixed", "uniform"] = "adaptive"
    stride: int = bounded(4, ge=1)  # fixed stride, or the largest stride the adaptive policy uses
    pad: Literal["stretch", "loop", "last"] = "stretch"  # how clips shorter than `frames` are filled
    img_size: int | None = bounded(None, ge=1)  # output side S: the model's
    crop_scales: tuple[float, ...] = bounded((1.0, 0.875, 0.75, 0.66), gt=0, le=1)  # train: multi-scale crop sizes (x short side)
    max_distort: int = bounded(1, ge=0)  # train: how many scale steps crop height and width may differ (aspect jitter)
    flip: bool = False  # train: random horizontal flip (see the module docstring)
    eval_crop: float = bounded(1.0, gt=0, le=1)  # eval: centre square of this fraction of the short side
    eval_views: int = bounded(1, ge=1)  # eval: temporal views per clip (features average them; see eval_view)
    eval_view: int = bounded(0, ge=0)  # eval: which of the eval_views windows this stream samples, spread evenly over the clip
    mean: tuple[float, float, float] = bounded(IMAGENET_MEAN, ge=0, le=1)
    std: tuple[float, float, float] = bounded(IMAGENET_STD, gt=0)
    video_dtype: Literal["float32", "uint8"] = "float32"  # uint8: unnormalised, 4x less to move (see finish_batch)
    backend: Literal["decord", "pyav"] = "decord"
    fallback_backend: Literal["decord", "pyav"] | None = "pyav"
    masks: bool = True  # add encoder/decoder masks to batches
    mask_ratio: float = bounded(0.9, gt=0, lt=1)
    decoder_keep_ratio: float | None = bounded(None, gt=0, le=1)  # e.g. 0.5 for running-cell decoder masking
    tubelet: int | None = bounded(None, ge=1)  # frames per token (masks): the model's
    patch: int | None = bounded(None, ge=1)  # pixels per token side (masks): the model's
    repeats: int = bounded(1, ge=1)  # train: crops + masks per decoded clip (K)
    batch_size: int = bounded(8, ge=1)  # clips per batch (a batch has batch_size * K rows)
    num_workers: int = bounded(2, ge=0)  # DataLoader worker processes
    batches_per_epoch: int | None = bounded(None, ge=1)  # train, per rank; None: samples / (world * batch_size)
    shuffle_buffer: int = bounded(256, ge=0)  # train: samples in the shuffle buffer
    seed: int = bounded(0, ge=0)
    remote_commands: dict[str, str] = field(default_factory=lambda: {"s3": "aws s3 cp {url} -"})
    prefetch_factor: int = bounded(4, ge=1)  # batches each worker may have ready ahead (uint8 frames: ~5 MB each at defaults)
    pin_memory: bool | None = None  # None: page-locked batches when CUDA is there (asynchronous copies)
    log_skips: int = bounded(5, ge=0)  # per worker: skipped samples logged as warnings (the rest are counted only)
    # "memory": decode every clip of the split once and keep its uint8 frames in RAM (small sets trained for
    # hundreds of epochs); crops, flips, repeats and masks are still drawn per sample, as when streaming.
    cache: Literal["none", "memory"] = "none"
    cache_max_gb: float = bounded(8.0, gt=0)  # budget of the memory cache per process; a set that needs more is an error

    def __post_init__(self) -> None:
        if self.masks and None not in (self.frames, self.img_size, self.tubelet, self.patch) and (
                self.frames % self.tubelet or self.img_size % self.patch):
            raise ValueError(f"stream: frames {self.frames} / img_size {self.img_size} must be divisible by "
                             f"tubelet {self.tubelet} / patch {self.patch}")
        if len(self.mean) != 3 or len(self.std) != 3:
            raise ValueError("stream: mean and std need 3 values (RGB)")
        if not 0 <= self.eval_view < self.eval_views:
            raise ValueError(f"stream: eval_view {self.eval_view} must be in [0, eval_views={self.eval_views})")

    @property
    def grid(self) -> TokenGrid:
        return TokenGrid.for_clip(self.frames, self.img_size, self.img_size, self.tubelet, self.patch)

    def with_model(self, model) -> "StreamConfig":
        """This stream cut for ``model`` (a :class:`~mgfm.model.videomae.ModelConfig`): its clip length,
        crop size, tubelet and patch, and its pixel normalisation."""
        return dataclasses.replace(self, frames=model.frames, img_size=model.img_size, tubelet=model.tubelet,
                                   patch=model.patch, mean=tuple(model.pixel_mean[:3]), std=tuple(model.pixel_std[:3]))

    def require_geometry(self) -> None:
        """A stream needs its clip geometry before it reads anything (masks need the token grid too)."""
        needed = ("frames", "img_size") + (("tubelet", "patch") if self.masks else ())
        unset = [k for k in needed if getattr(self, k) is None]
        if unset:
            raise ValueError(f"stream: {', '.join(unset)} not set; build the stream from the model "
                             f"(StreamConfig.with_model) or give them")


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


# ---------------------------------------------------------------------------------------- counting


class SkipCounter:
    """What the stream skipped, as seen by the main process: ``samples`` (bad samples, plus the samples a
    broken, cut or missing shard did not deliver when the manifest says how many it holds) and
    ``shard_errors`` (unopenable / truncated / missing shards), by reason, with the first records kept.

    Each lost clip counts once however often a resampling train stream meets it again (records are keyed by
    shard and sample key, or by shard and part for losses without a key). ``padded``: the clips that were
    used although shorter than the clip length (filled by ``stream.pad``): not losses, but worth saying."""

    def __init__(self, keep: int = 1000):
        self.by_reason: collections.Counter = collections.Counter()
        self.records: list[dict] = []
        self.keep = keep
        self._samples: dict[tuple, int] = {}
        self._shards: set[str] = set()
        self._padded: set[tuple] = set()

    @property
    def padded(self) -> int:
        return len(self._padded)

    @property
    def samples(self) -> int:
        return sum(self._samples.values())

    @property
    def shard_errors(self) -> int:
        return len(self._shards)

    @property
    def total(self) -> int:
        return self.samples + self.shard_errors

    def add(self, records: Iterable[dict]) -> None:
        for rec in records:
            count = int(rec.get("count", 1))
            if rec["kind"] == "padded":
                self._padded.add((rec["shard"], rec.get("key")))
                continue
            if rec["kind"] == "shard":
                if rec["shard"] in self._shards:
                    continue
                self._shards.add(rec["shard"])
            else:
                key = (rec["shard"], rec.get("key"), rec.get("part"))
                if key in self._samples:
                    continue
                self._samples[key] = count
            self.by_reason[rec["reason"].split(":")[0]] += count
            if len(self.records) < self.keep:
                self.records.append(rec)

    @classmethod
    def merged(cls, counters: Iterable["SkipCounter"]) -> "SkipCounter":
        """One counter over several (epochs, ranks, views): a clip lost in each of them counts once."""
        out = cls()
        for counter in counters:
            out.add(counter.records)
            out._padded |= counter._padded
        return out

    @classmethod
    def merged_records(cls, records: Iterable[dict]) -> list[dict]:
        """``records`` with repeats of one loss (other ranks, views, passes) dropped."""
        out = cls()
        out.add(records)
        return out.records

    def summary(self) -> str:
        reasons = ", ".join(f"{k} {v}" for k, v in sorted(self.by_reason.items()))
        return f"skipped {self.samples} samples and {self.shard_errors} broken shards ({reasons or 'none'})"


@dataclass
class SplitRead:
    """How completely an evaluation read a split: the clips its manifest lists (``expected``, None when
    unknown), the clips that arrived (``read``) and the skip records of what did not (``lost``)."""

    source: str
    split: str
    expected: int | None
    read: int
    lost: list[dict] = field(default_factory=list)

    @property
    def missing(self) -> int:
        """Clips the split should have had but did not deliver."""
        if self.expected is not None:
            return max(0, self.expected - self.read)
        return sum(int(r.get("count", 1)) for r in self.lost if r["kind"] != "shard")

    @property
    def complete(self) -> bool:
        return self.missing == 0

    def describe(self) -> str:
        """``read 45 of 60 clips of test (15 lost: test-000001.tar: missing shard: ...: 15 samples not read)``."""
        of = f" of {self.expected}" if self.expected is not None else ""
        text = f"read {self.read}{of} clips of {self.split}"
        if self.complete:
            return text
        where = "; ".join(f"{Path(str(r['shard'])).name}{' key ' + str(r['key']) if r.get('key') else ''}: "
                          f"{r['reason']}" for r in self.lost[:3])
        more = f"; {len(self.lost) - 3} more" if len(self.lost) > 3 else ""
        return f"{text} ({self.missing} lost: {where or 'unknown'}{more})"

    def to_dict(self) -> dict:
        return {"expected": self.expected, "read": self.read, "missing": self.missing,
                "lost": [{k: r.get(k) for k in ("shard", "key", "reason", "count")} for r in self.lost[:100]]}


def expected_clips(source, split: str, remote_commands: dict | None = None) -> int | None:
    """Clips the manifests list for ``split`` of ``source`` (None when shard sizes are unknown)."""
    refs = [r for _, refs in shard_sets(source, split, remote_commands, keep_missing=True) for r in refs]
    return None if any(r.samples is None for r in refs) else sum(r.samples for r in refs)


def printable(text: str, limit: int = 300) -> str:
    """``text`` cut to ``limit`` characters of printable ASCII (an error about a garbage file can quote its
    bytes; those must not reach the terminal)."""
    clean = "".join(c if c.isprintable() and ord(c) < 128 else "?" for c in str(text))
    return clean if len(clean) <= limit else clean[:limit] + "..."


class _WorkerState:
    """Per-iteration state shared by the stages inside one worker: pending skip records, progress."""

    def __init__(self, log_limit: int):
        self.pending: list[dict] = []
        self.logged = 0
        self.log_limit = log_limit
        self.read = 0  # raw samples read from shards
        self.failures_in_a_row = 0  # samples skipped since the last good one

    def skip(self, kind: str, shard: str, key: str | None, reason: str, count: int = 1,
             part: str | None = None) -> None:
        reason = printable(reason)
        rec = {"kind": kind, "shard": shard, "key": key, "reason": reason, "count": count, "part": part}
        self.pending.append(rec)
        if self.logged < self.log_limit:
            log.warning("stream skip (%s) %s%s: %s", kind, shard, f" key {key}" if key else "", reason)
            self.logged += 1

    def note_padded(self, shard: str, key: str | None) -> None:
        """A clip shorter than the clip length, filled by ``stream.pad`` (reported, not skipped)."""
        self.pending.append({"kind": "padded", "shard": shard, "key": key, "reason": "padded", "count": 0})

    def drain(self) -> list[dict]:
        out, self.pending = self.pending, []
        return out


# ------------------------------------------------------------------------------------------- dataset


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
            weights = [sum(r.samples or _UNKNOWN_SHARD_SAMPLES for r in refs) for _, refs in self.sets]
        total = float(sum(weights))
        self.weights = [w / total for w in weights]
        self.cfg = cfg
        self.mode = mode
        self.epoch = epoch
        self.rank, self.world = rank, world
        self.batches_per_epoch = batches_per_epoch
        self.memory = memory

    def slot(self) -> Slot:
        worker, workers = worker_info()
        return Slot(self.rank, self.world, worker, workers)

    def worker_batches(self, slot: Slot) -> int:
        """Train: batches this worker yields (the rank's ``batches_per_epoch`` split over workers)."""
        total = int(self.batches_per_epoch or 0)
        return total // slot.workers + (1 if slot.worker < total % slot.workers else 0)

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
        import webdataset as wds

        slot = self.slot()
        train = self.mode == "train"
        state = _WorkerState(self.cfg.log_skips)
        rng = np.random.default_rng([self.cfg.seed, self.epoch, slot.rank, slot.worker, int(train)])
        per_set = [(name, assign_shards(refs, slot, self.mode, self.cfg.seed, self.epoch)) for name, refs in self.sets]
        tasks = [t for _, set_tasks in per_set for t in set_tasks]
        if train and len(per_set) > 1:  # one endless source per set, drawn from by weight
            stages: list[Any] = [partial(_mixed_sources, sets=per_set, weights=self.weights, rng=rng, state=state,
                                         memory=self.memory)]
        elif len(per_set) > 1:  # eval: each set's clips once, set after set
            stages = [partial(_sets_in_turn, sets=per_set, rng=rng, state=state, memory=self.memory)]
        else:
            stages = [partial(_task_source, tasks=tasks, train=train, rng=rng, state=state),
                      partial(_read_shards, state=state, memory=self.memory)]
        if train and self.cfg.shuffle_buffer > 1:
            stages.append(wds.filters.shuffle(self.cfg.shuffle_buffer, initial=self.cfg.shuffle_buffer // 2,
                                              rng=random.Random(int(rng.integers(2**62)))))
        known = [t.expected for t in tasks]
        max_failures = (sum(known) if None not in known else _UNKNOWN_SHARD_SAMPLES * len(tasks)) + self.cfg.shuffle_buffer
        stages.append(partial(_decode_stage, cfg=self.cfg, train=train, rng=rng, state=state,
                              max_failures=max_failures))
        limit = self.worker_batches(slot) if train else None
        stages.append(partial(_batch_stage, cfg=self.cfg, train=train, rng=rng, state=state, limit=limit,
                              partial_last=not train))
        return iter(wds.DataPipeline(*stages))


def _mixed_sources(sets: list[tuple[str | None, list[ShardTask]]], weights: list[float], rng: np.random.Generator,
                   state: _WorkerState, memory: "MemoryClips | None" = None) -> Iterator[dict]:
    """Train samples of several shard sets, each next one from a set drawn with ``weights``; a set whose
    shards all broke drops out (the others' weights renormalised)."""
    sources = [_read_shards(_task_source(tasks, True, rng, state), state, memory) for _, tasks in sets]
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


def _sets_in_turn(sets: list[tuple[str | None, list[ShardTask]]], rng: np.random.Generator,
                  state: _WorkerState, memory: "MemoryClips | None" = None) -> Iterator[dict]:
    """Eval samples of several shard sets: every clip of each set once, tagged with its set."""
    for name, tasks in sets:
        for sample in _read_shards(_task_source(tasks, False, rng, state), state, memory):
            sample["__set__"] = name
            yield sample


def _task_source(tasks: list[ShardTask], train: bool, rng: np.random.Generator, state: _WorkerState):
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


def _read_shards(tasks: Iterable[ShardTask], state: _WorkerState, memory: "MemoryClips | None" = None) -> Iterator[dict]:
    """Open each task's shard (gopen), group tar members into samples, keep ``k % mod == rem``. A shard held
    in ``memory`` is replayed from there instead: the same samples (decoded frames in place of the mp4) and
    the same skip records."""
    for task in tasks:
        url = task.shard.url
        held = memory.shards.get(url) if memory is not None else None
        errors: list[str] = list(held.errors) if held is not None else []
        kept = 0
        for k, sample in enumerate(held.samples if held is not None else _shard_samples(url, errors)):
            if k % task.mod == task.rem:
                sample = dict(sample, __shard__=url)
                state.read += 1
                kept += 1
                yield sample
        _account_shard(task, errors, kept, state)


def _shard_samples(url: str, errors: list[str]) -> Iterator[dict]:
    """The samples of one shard in order; a failure to open or read it ends them and lands in ``errors``."""
    from webdataset.gopen import gopen

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


def _account_shard(task: ShardTask, errors: list[str], kept: int, state: _WorkerState) -> None:
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


def _decode_stage(samples: Iterable[dict], cfg: StreamConfig, train: bool, rng: np.random.Generator,
                  state: _WorkerState, max_failures: int) -> Iterator[dict]:
    """Raw sample -> decoded clip {frames uint8 (U,H,W,3), lookup (U,), views [K x (T,)], label, clip_id,
    meta}: the union of the K views' frame indices decoded once.

    Train only: stops after ``max_failures`` bad samples in a row (a stream of nothing but corrupt
    samples would otherwise loop forever)."""
    repeats = cfg.repeats if train else 1
    for sample in samples:
        decoded = _guarded(state, sample.get("__key__"), sample.get("__shard__", "?"), _decode_one, sample, cfg,
                           train, repeats, rng, state)
        if decoded is not None:
            state.failures_in_a_row = 0
            yield decoded
            continue
        state.failures_in_a_row += 1
        if train and state.failures_in_a_row > max_failures:
            log.error("stream: %d samples in a row failed; stopping this worker", max_failures)
            return


def _guarded(state: _WorkerState, key: str | None, shard: str, fn, *args):
    """``fn(*args)``, or None after recording a skip when the sample's data is bad (:class:`_SampleError`:
    undecodable video, bad json, a missing member). Any other exception comes from our own code: it is a bug,
    not bad data, and stops the stream with its traceback (counted as a skip it would hide the bug, and a
    train stream whose every sample fails it would wait forever)."""
    try:
        return fn(*args)
    except _SampleError as err:
        state.skip("sample", shard, key, str(err))
    return None


class _SampleError(Exception):
    """A sample that cannot be used (the message starts with a short reason tag)."""


def _sample_views(n_frames: int, cfg: StreamConfig, train: bool, rng: np.random.Generator,
                  repeats: int) -> list[np.ndarray]:
    """``repeats`` frame-index windows: random in train, the ``eval_view``-th of ``eval_views`` in eval."""
    position = (cfg.eval_view + 0.5) / cfg.eval_views
    return [sample_indices(n_frames, cfg.frames, cfg.stride_policy, cfg.stride, rng if train else None, cfg.pad,
                           position) for _ in range(repeats)]


def _decode_one(sample: dict, cfg: StreamConfig, train: bool, repeats: int, rng: np.random.Generator,
                state: _WorkerState) -> dict:
    key = sample.get("__key__")
    missing = [m for m in ("json", "mp4") if m not in sample]
    if missing:
        raise _SampleError(f"missing member: no .{missing[0]} (has {sorted(k for k in sample if not k.startswith('__'))})")
    try:
        meta = json.loads(sample["json"])
        label = int(meta.get("label", -1))
        n_frames = int(meta["n_frames"]) if "n_frames" in meta else None
    except (ValueError, TypeError, AttributeError, UnicodeDecodeError) as err:
        raise _SampleError(f"bad json: {err}") from None
    if n_frames is not None and n_frames < 1:
        raise _SampleError(f"bad json: n_frames={n_frames}")
    meta["shard"] = sample.get("__shard__")
    if n_frames is None:  # shards not written by mgfm: decode everything once to learn the length
        frames = _frames(sample, None, cfg)
        lookup = np.arange(len(frames))
        views = _sample_views(len(frames), cfg, train, rng, repeats)
    else:
        views = _sample_views(n_frames, cfg, train, rng, repeats)
        lookup = np.unique(np.concatenate(views))
        frames = _frames(sample, lookup, cfg)
        if len(frames) != len(lookup):
            raise _SampleError(f"decode error: got {len(frames)} frames for {len(lookup)} indices")
    if (n_frames or len(frames)) < cfg.frames:
        state.note_padded(sample.get("__shard__", "?"), key)
    clip_id = str(meta.get("clip_id", key))
    if sample.get("__set__"):  # a mixture: clip ids of different sets must not collide
        meta["set"] = sample["__set__"]
        clip_id = f"{sample['__set__']}/{clip_id}"
    return {"frames": frames, "lookup": lookup, "views": views, "label": label, "clip_id": clip_id, "meta": meta}


def _frames(sample: dict, indices: np.ndarray | None, cfg: StreamConfig) -> np.ndarray:
    """uint8 ``(len(indices), H, W, 3)`` frames of a sample (all of them when None): decoded from its mp4, or
    taken from the frames a :class:`MemoryClips` decoded once (indices past the end clamp, as decord's do)."""
    held = sample.get(_FRAMES)
    if held is None:
        return _decode(sample["mp4"], indices, cfg)
    if isinstance(held, str):  # the memory cache could not decode it either
        raise _SampleError(held)
    return held if indices is None else held[np.minimum(indices, len(held) - 1)]


def _decode(mp4: bytes, indices: np.ndarray | None, cfg: StreamConfig) -> np.ndarray:
    try:
        return decode_frames(mp4, None if indices is None else indices.tolist(), backend=cfg.backend,
                             fallback=cfg.fallback_backend)
    except VideoDecodeError as err:
        raise _SampleError(f"decode error: {err}") from None


def _make_views(clip: dict, cfg: StreamConfig, train: bool, rng: np.random.Generator,
                masker: MaskGenerator | None, rows: np.ndarray) -> list[dict]:
    """Decoded clip -> K views: frames cropped and resized into ``rows`` uint8 (K, T, 3, S, S) (rows of
    the batch), and K items {encoder_mask, decoder_mask, label, clip_id, meta}."""
    frames, lookup = clip["frames"], clip["lookup"]
    mask_rng = rng if train else np.random.default_rng([cfg.seed, zlib.crc32(clip["clip_id"].encode())])
    _, h, w, _ = frames.shape
    items = []
    for row, view in zip(rows, clip["views"]):
        if train:
            box = multiscale_crop_box(h, w, cfg.crop_scales, rng, cfg.max_distort, 0.5 if cfg.flip else 0.0)
        else:
            box = centre_crop_box(h, w, cfg.eval_crop)
        crop_resize_planar(frames, box, cfg.img_size, row, np.searchsorted(lookup, view))
        item = {"label": clip["label"], "clip_id": clip["clip_id"], "meta": clip["meta"]}
        if masker is not None:
            item["encoder_mask"], item["decoder_mask"] = masker(mask_rng)
        items.append(item)
    return items


def _batch_stage(clips: Iterator[dict], cfg: StreamConfig, train: bool, rng: np.random.Generator,
                 state: _WorkerState, limit: int | None, partial_last: bool) -> Iterator[dict]:
    """Group ``batch_size`` decoded clips, crop their K views straight into the batch's frame buffer,
    collate; attach the skip records since the last batch. Stops after ``limit`` batches (train). Ends
    with a marker carrying leftover skip records.

    The clips of a batch are decoded back to back and transformed afterwards: the decoder runs
    measurably faster when crops and copies do not evict its caches between clips (for the same
    reason float32 batches are normalised as a whole afterwards, not clip by clip: measured 2% slower)."""
    masker = MaskGenerator(cfg.grid, cfg.mask_ratio, cfg.decoder_keep_ratio) if cfg.masks else None
    repeats = cfg.repeats if train else 1
    rows = cfg.batch_size * repeats
    clips = iter(clips)
    emitted = 0
    exhausted = limit == 0
    buffer, items, n_clips = None, [], 0
    while not exhausted:
        if buffer is None:
            buffer = np.empty((rows, cfg.frames, 3, cfg.img_size, cfg.img_size), dtype=np.uint8)
        group = list(itertools.islice(clips, cfg.batch_size - n_clips))
        exhausted = len(group) < cfg.batch_size - n_clips
        for clip in group:
            made = _guarded(state, clip["clip_id"], clip["meta"].get("shard", "?"), _make_views, clip, cfg, train, rng,
                            masker, buffer[n_clips * repeats:(n_clips + 1) * repeats])
            if made is not None:
                items.extend(made)
                n_clips += 1
        if n_clips == cfg.batch_size:
            yield collate(items, buffer, state.drain())
            emitted += 1
            buffer, items, n_clips = None, [], 0
            if limit is not None and emitted >= limit:
                break
    if items and partial_last:
        yield collate(items, buffer[: len(items)], state.drain())
    if state.pending:
        yield {"_marker": True, "skipped": state.drain()}


def collate(items: list[dict], frames: np.ndarray, skipped: list[dict] | None = None) -> dict:
    """A worker-side batch: ``frames`` uint8 (N, T, 3, S, S) (already filled) plus the items' keys.

    Frames cross the process boundary as uint8: mapping 4x more shared memory for float32 costs more
    than converting in the main process (:func:`finish_batch`)."""
    batch: dict[str, Any] = {
        "frames": torch.from_numpy(frames),
        "label": torch.tensor([it["label"] for it in items], dtype=torch.long),
        "clip_id": [it["clip_id"] for it in items],
        "meta": [it["meta"] for it in items],
        "skipped": skipped or [],
    }
    if "encoder_mask" in items[0]:
        batch["encoder_mask"] = torch.from_numpy(np.stack([it["encoder_mask"] for it in items]))
        batch["decoder_mask"] = torch.from_numpy(np.stack([it["decoder_mask"] for it in items]))
    return batch


def finish_batch(batch: dict, cfg: StreamConfig, own_pages: bool = False) -> dict:
    """Main process: ``frames`` uint8 (N,T,3,S,S) -> ``video``: float32 normalised with ``cfg.mean``/
    ``cfg.std`` (into a fresh tensor), or the uint8 frames themselves when ``cfg.video_dtype == "uint8"``
    (normalise on the accelerator with :func:`mgfm.data.transforms.normalise`).

    ``own_pages``: allocate the float tensor in its own memory mapping, returned to the OS when the
    batch is dropped. With DataLoader workers the glibc heap otherwise keeps growing by hundreds of MB
    (measured: +530 MB, 261 -> 794 MB, before it levels off), at ~0.15 ms/clip of page faults."""
    frames = batch.pop("frames")
    if cfg.video_dtype == "uint8":
        batch["video"] = frames
        return batch
    if own_pages:
        video = torch.frombuffer(mmap.mmap(-1, frames.numel() * 4), dtype=torch.float32).view(frames.shape)
    else:
        video = torch.empty(frames.shape, dtype=torch.float32)
    normalise_into(frames.numpy(), video.numpy(), cfg.mean, cfg.std)
    batch["video"] = video
    return batch


# ------------------------------------------------------------------------------------- memory cache


@dataclass
class HeldShard:
    """One shard as :class:`MemoryClips` holds it: its samples in shard order (json kept, the mp4 replaced by
    its decoded frames) and the read errors its tar gave."""

    samples: list[dict]
    errors: list[str]


class MemoryClips:
    """Every sample of some shards decoded once into RAM (``stream.cache=memory``): ``shards`` maps a shard URL
    to its :class:`HeldShard`. The stream replays a held shard instead of reading and decoding it, so
    shard order, rank and worker split, shuffling, temporal sampling, crops, flips, repeats and masks are
    drawn exactly as when streaming (the same samples for the same seed), and so are the skip records of
    bad samples and broken shards. Each process holds every shard of the split (train mode deals shards to
    ranks anew each epoch); ``nbytes`` is what the frames take."""

    def __init__(self, shards: dict[str, HeldShard]):
        self.shards = shards

    @property
    def nbytes(self) -> int:
        return sum(s[_FRAMES].nbytes for held in self.shards.values() for s in held.samples
                   if isinstance(s.get(_FRAMES), np.ndarray))

    @property
    def clips(self) -> int:
        return sum(isinstance(s.get(_FRAMES), np.ndarray) for held in self.shards.values() for s in held.samples)

    @classmethod
    def load(cls, source, split: str, cfg: StreamConfig, progress: bool = True) -> "MemoryClips":
        """Read and decode every sample of ``split`` of ``source`` (one set or a :class:`Mixture`) with
        ``cfg.num_workers`` decoding threads. A split whose frames would take more than ``cfg.cache_max_gb``
        is a one-line :class:`InputError` saying how much it needs, raised before anything is decoded where
        the shards' json gives every clip's size."""
        from concurrent.futures import ThreadPoolExecutor

        from tqdm.auto import tqdm

        refs = [r for _, refs in shard_sets(source, split, cfg.remote_commands) for r in refs]
        shards: dict[str, HeldShard] = {}
        todo: list[dict] = []
        unknown = 0
        need = 0
        for ref in refs:
            errors: list[str] = []
            samples = [dict(s) for s in _shard_samples(ref.url, errors)]
            shards[ref.url] = HeldShard(samples, errors)
            for sample in samples:
                size = _decoded_size(sample)
                if size is None and "mp4" in sample:
                    unknown += 1
                need += size or 0
                todo.append(sample)
        budget = cfg.cache_max_gb * 2**30
        where = f"stream.cache=memory: {source} ({split})"
        if need > budget:
            raise InputError(f"{where} needs {need / 2**30:.1f} GB for {len(todo)} clips, over stream.cache_max_gb="
                             f"{cfg.cache_max_gb:g}; raise it or stream the set (stream.cache=none)")
        todo = [s for s in todo if "mp4" in s and _json_or_none(s) is not None]
        rank, _ = rank_world()
        decoded = 0
        with ThreadPoolExecutor(max(1, cfg.num_workers)) as pool, tqdm(
                total=len(todo), desc=f"decode {split} into memory", unit="clip", leave=False,
                disable=not progress or rank != 0) as bar:
            for sample, frames in zip(todo, pool.map(partial(_decode_all, cfg=cfg), (s["mp4"] for s in todo))):
                sample["mp4"] = b""  # the frames replace it (the missing-member check still sees the key)
                sample[_FRAMES] = frames
                decoded += frames.nbytes if isinstance(frames, np.ndarray) else 0
                bar.update(1)
                if decoded > budget:
                    raise InputError(f"{where} needs more than stream.cache_max_gb={cfg.cache_max_gb:g} GB "
                                     f"({decoded / 2**30:.1f} GB after {bar.n} of {len(todo)} clips); raise it "
                                     f"or stream the set (stream.cache=none)")
        memory = cls(shards)
        log.info("%s: %d clips decoded into memory (%.2f GB)", where, memory.clips, memory.nbytes / 2**30)
        return memory


def _json_or_none(sample: dict) -> dict | None:
    try:
        meta = json.loads(sample["json"])
    except (KeyError, ValueError, TypeError, UnicodeDecodeError):
        return None
    return meta if isinstance(meta, dict) else None


def _decoded_size(sample: dict) -> int | None:
    """Bytes of a sample's decoded frames from its json (``n_frames`` x ``height`` x ``width`` x 3), or None."""
    meta = _json_or_none(sample)
    try:
        return int(meta["n_frames"]) * int(meta["height"]) * int(meta["width"]) * 3
    except (TypeError, KeyError, ValueError):
        return None


def _decode_all(mp4: bytes, cfg: StreamConfig) -> np.ndarray | str:
    """Every frame of ``mp4`` (uint8 ``(n, H, W, 3)``), or the stream's skip reason when it cannot be decoded."""
    try:
        return np.ascontiguousarray(_decode(mp4, None, cfg))
    except _SampleError as err:
        return str(err)


# -------------------------------------------------------------------------------------------- loader


class StreamLoader(DataLoader):
    """A DataLoader over a :class:`ClipStream` that moves skip records into a :class:`SkipCounter`,
    drops the workers' end markers, and logs the skip summary when an epoch ends."""

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

    ``rank``/``world`` default to :func:`mgfm.data.distributed.rank_world`. Create a new loader per
    epoch (``epoch`` reseeds shard order, shuffling, crops and masks). Do not ``accelerator.prepare`` it.
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
        # Train: take whichever worker's batch is ready (the order is random anyway), so one worker
        # that the OS descheduled does not stall the others. Eval keeps the deterministic order.
        if "in_order" in inspect.signature(DataLoader.__init__).parameters:  # torch >= 2.6
            kwargs["in_order"] = mode != "train"
    return StreamLoader(dataset, counter, **kwargs), counter

