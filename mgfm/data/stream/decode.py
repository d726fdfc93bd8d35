"""Raw samples -> batches: decode the frames a sample's temporal views need (PyAV, with the decord fallback),
crop and resize its views straight into the batch buffer, draw its masks, collate; and the main process's
conversion of uint8 batches to normalised float32 (:func:`finish_batch`). Only bad data (:class:`SampleError`)
is skipped; any other exception is a bug and stops the stream."""

from __future__ import annotations

import itertools
import json
import logging
import mmap
import zlib
from typing import Any, Iterable, Iterator

import numpy as np
import torch

from mgfm.data.masking import MaskGenerator
from mgfm.data.sampling import sample_indices
from mgfm.data.stream.config import StreamConfig
from mgfm.data.stream.skips import WorkerState
from mgfm.data.transforms import centre_crop_box, crop_resize_planar, multiscale_crop_box, normalise_into
from mgfm.sources.video_io import VideoDecodeError, decode_frames

log = logging.getLogger("mgfm.data.stream")
# The key under which a sample held by a MemoryClips carries its decoded frames (or why they could not be).
FRAMES = "__frames__"


def decode_stage(samples: Iterable[dict], cfg: StreamConfig, train: bool, seeds: list[int], state: WorkerState,
                 max_failures: int, skip: int = 0) -> Iterator[dict]:
    """Raw sample -> decoded clip {frames: U uint8 (H,W,3) frames (an array or a list), lookup (U,), views
    [K x (T,)], label, clip_id, meta, rng}: the union of the K views' frame indices decoded once.

    Train: sample ``i`` of this worker's stream (counting from 0, bad ones included) draws its frame windows
    here and its crops, flips and masks later from its own generator, ``default_rng(seeds + [1, i])``, so a
    resumed stream that drops its first ``skip`` samples unread (:attr:`WorkerState.pulled` of the run it
    continues) draws exactly what the uninterrupted one drew. Stops after ``max_failures`` bad samples in a
    row (a stream of nothing but corrupt samples would otherwise loop forever)."""
    repeats = cfg.repeats if train else 1
    samples = iter(samples)
    for _ in itertools.islice(samples, skip):
        pass
    state.pulled = skip
    for sample in samples:
        rng = np.random.default_rng([*seeds, 1, state.pulled]) if train else None
        state.pulled += 1
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


def _guarded(state: WorkerState, key: str | None, shard: str, fn, *args):
    """``fn(*args)``, or None after recording a skip when the sample's data is bad (:class:`SampleError`:
    undecodable video, bad json, a missing member). Any other exception comes from our own code: it is a bug,
    not bad data, and stops the stream with its traceback (counted as a skip it would hide the bug, and a
    train stream whose every sample fails it would wait forever)."""
    try:
        return fn(*args)
    except SampleError as err:
        state.skip("sample", shard, key, str(err))
    return None


class SampleError(Exception):
    """A sample that cannot be used (the message starts with a short reason tag)."""


def _sample_views(n_frames: int, cfg: StreamConfig, train: bool, rng: np.random.Generator,
                  repeats: int) -> list[np.ndarray]:
    """``repeats`` frame-index windows: random in train, the ``eval_view``-th of ``eval_views`` in eval."""
    position = (cfg.eval_view + 0.5) / cfg.eval_views
    return [sample_indices(n_frames, cfg.frames, cfg.stride_policy, cfg.stride, rng if train else None, cfg.pad,
                           position) for _ in range(repeats)]


def _decode_one(sample: dict, cfg: StreamConfig, train: bool, repeats: int, rng: np.random.Generator | None,
                state: WorkerState) -> dict:
    key = sample.get("__key__")
    missing = [m for m in ("json", "mp4") if m not in sample]
    if missing:
        raise SampleError(f"missing member: no .{missing[0]} (has {sorted(k for k in sample if not k.startswith('__'))})")
    try:
        meta = json.loads(sample["json"])
        label = int(meta.get("label", -1))
        n_frames = int(meta["n_frames"]) if "n_frames" in meta else None
    except (ValueError, TypeError, AttributeError, UnicodeDecodeError) as err:
        raise SampleError(f"bad json: {err}") from None
    if n_frames is not None and n_frames < 1:
        raise SampleError(f"bad json: n_frames={n_frames}")
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
            raise SampleError(f"decode error: got {len(frames)} frames for {len(lookup)} indices")
    if (n_frames or len(frames)) < cfg.frames:
        state.note_padded(sample.get("__shard__", "?"), key)
    clip_id = str(meta.get("clip_id", key))
    if sample.get("__set__"):  # a mixture: clip ids of different sets must not collide
        meta["set"] = sample["__set__"]
        clip_id = f"{sample['__set__']}/{clip_id}"
    return {"frames": frames, "lookup": lookup, "views": views, "label": label, "clip_id": clip_id, "meta": meta,
            "rng": rng}


def _frames(sample: dict, indices: np.ndarray | None, cfg: StreamConfig) -> np.ndarray | list[np.ndarray]:
    """``len(indices)`` uint8 (H, W, 3) frames of a sample (all of them when None): decoded from its mp4, or
    taken from the frames a :class:`MemoryClips` decoded once (indices past the end clamp, as decord's do)."""
    held = sample.get(FRAMES)
    if held is None:
        return decode_mp4(sample["mp4"], indices, cfg)
    if isinstance(held, str):  # the memory cache could not decode it either
        raise SampleError(held)
    return held if indices is None else held[np.minimum(indices, len(held) - 1)]


def decode_mp4(mp4: bytes, indices: np.ndarray | None, cfg: StreamConfig) -> np.ndarray | list[np.ndarray]:
    try:
        return decode_frames(mp4, None if indices is None else indices.tolist(), backend=cfg.backend,
                             fallback=cfg.fallback_backend, stacked=False)
    except VideoDecodeError as err:
        raise SampleError(f"decode error: {err}") from None


def _make_views(clip: dict, cfg: StreamConfig, train: bool, masker: MaskGenerator | None,
                rows: np.ndarray) -> list[dict]:
    """Decoded clip -> K views: frames cropped and resized into ``rows`` uint8 (K, T, 3, S, S) (rows of
    the batch), and K items {encoder_mask, decoder_mask, label, clip_id, meta}. Train crops, flips and masks
    come from the clip's own generator (:func:`decode_stage`); eval masks from its clip id."""
    frames, lookup, rng = clip["frames"], clip["lookup"], clip["rng"]
    mask_rng = rng if train else np.random.default_rng([cfg.seed, zlib.crc32(clip["clip_id"].encode())])
    h, w = frames[0].shape[:2]
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


def batch_stage(clips: Iterator[dict], cfg: StreamConfig, train: bool, state: WorkerState, limit: int | None,
                partial_last: bool) -> Iterator[dict]:
    """Group ``batch_size`` decoded clips, crop their K views straight into the batch's frame buffer,
    collate; attach the skip records since the last batch. Stops after ``limit`` batches (train). Ends
    with a marker carrying leftover skip records. ``limit`` counts the worker's batches of the whole epoch,
    those given before a resume (``state.batches``) included.

    The clips of a batch are decoded back to back and transformed afterwards: the decoder runs
    measurably faster when crops and copies do not evict its caches between clips (for the same
    reason float32 batches are normalised as a whole afterwards, not clip by clip: measured 2% slower)."""
    masker = MaskGenerator(cfg.grid, cfg.mask_ratio, cfg.decoder_keep_ratio) if cfg.masks else None
    repeats = cfg.repeats if train else 1
    rows = cfg.batch_size * repeats
    clips = iter(clips)
    exhausted = limit is not None and state.batches >= limit
    buffer, items, n_clips = None, [], 0
    while not exhausted:
        if buffer is None:
            buffer = np.empty((rows, cfg.frames, 3, cfg.img_size, cfg.img_size), dtype=np.uint8)
        group = list(itertools.islice(clips, cfg.batch_size - n_clips))
        exhausted = len(group) < cfg.batch_size - n_clips
        for clip in group:
            made = _guarded(state, clip["clip_id"], clip["meta"].get("shard", "?"), _make_views, clip, cfg, train,
                            masker, buffer[n_clips * repeats:(n_clips + 1) * repeats])
            if made is not None:
                items.extend(made)
                n_clips += 1
        if n_clips == cfg.batch_size:
            state.batches += 1
            yield collate(items, buffer, state.drain())
            buffer, items, n_clips = None, [], 0
            if limit is not None and state.batches >= limit:
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
