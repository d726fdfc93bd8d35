"""``stream.cache=memory``: every sample of a split decoded once into RAM and replayed by the stream."""

from __future__ import annotations

import json
import logging
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from functools import partial

import numpy as np
from tqdm.auto import tqdm

from mgfm.data.stream.config import StreamConfig
from mgfm.data.stream.decode import FRAMES, SampleError, decode_mp4
from mgfm.data.stream.samples import shard_samples
from mgfm.errors import InputError
from mgfm.runtime import rank_world
from mgfm.shards.read import shard_sets

log = logging.getLogger("mgfm.data.stream")


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
        return sum(s[FRAMES].nbytes for held in self.shards.values() for s in held.samples
                   if isinstance(s.get(FRAMES), np.ndarray))

    @property
    def clips(self) -> int:
        return sum(isinstance(s.get(FRAMES), np.ndarray) for held in self.shards.values() for s in held.samples)

    @classmethod
    def load(cls, source, split: str, cfg: StreamConfig, progress: bool = True) -> "MemoryClips":
        """Read and decode every sample of ``split`` of ``source`` (one set or a :class:`Mixture`) with
        ``cfg.num_workers`` decoding threads. A split whose frames would take more than ``cfg.cache_max_gb``
        is a one-line :class:`InputError` saying how much it needs, raised before anything is decoded where
        the shards' json gives every clip's size."""
        refs = [r for _, refs in shard_sets(source, split, cfg.remote_commands) for r in refs]
        shards: dict[str, HeldShard] = {}
        todo: list[dict] = []
        need = 0
        for ref in refs:
            errors: list[str] = []
            samples = [dict(s) for s in shard_samples(ref.url, errors)]
            shards[ref.url] = HeldShard(samples, errors)
            for sample in samples:
                need += _decoded_size(sample) or 0  # unknown sizes are counted while decoding
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
            for sample, frames in zip(todo, pool.map(partial(_decode_all_frames, cfg=cfg), (s["mp4"] for s in todo))):
                sample["mp4"] = b""  # the frames replace it (the missing-member check still sees the key)
                sample[FRAMES] = frames
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


def _decode_all_frames(mp4: bytes, cfg: StreamConfig) -> np.ndarray | str:
    """Every frame of ``mp4`` (uint8 ``(n, H, W, 3)``), or the stream's skip reason when it cannot be decoded."""
    try:
        return np.ascontiguousarray(decode_mp4(mp4, None, cfg))
    except SampleError as err:
        return str(err)
