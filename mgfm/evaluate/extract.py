"""Frozen-encoder features for every clip of a shard split, cached on disk.

``split_features(encoder_folder, shards, split, stream_cfg)`` returns a :class:`FeatureSet` with one row per
clip: the mean-pooled last-layer tokens of the unmasked clip (no mask at feature time), averaged over
``views`` temporal views. Under several processes each rank encodes the clips its eval stream gives it
(every clip exactly once across ranks and workers), the rows are gathered, checked for duplicates and
sorted by clip id, so the result is the same whatever the world size.

The cache key holds the encoder's checksum, the shard manifest's checksum and every stream setting that
changes a pixel; a cache is used only when its key matches exactly, so a retrained encoder, rebuilt
shards or another crop never reuse stale features.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
from functools import partial
from pathlib import Path
from typing import Callable

import numpy as np
import torch
from torch import nn
from tqdm.auto import tqdm

from mgfm.runtime import gather_objects, rank_world
from mgfm.data.stream import SkipCounter, SplitRead, StreamConfig, expected_clips, make_loader
from mgfm.data.transforms import normalise
from mgfm.runtime import autocast, feature_precision
from mgfm.errors import InputError
from mgfm.evaluate.featureset import FeatureError, FeatureSet
from mgfm.shards.read import resolve_shards, set_name
from mgfm.model.hf import encoder_checksum, load_encoder_hf

log = logging.getLogger(__name__)

# Stream settings that change what an eval clip looks like (and so its features).
EVAL_STREAM_KEYS = ("frames", "stride_policy", "stride", "pad", "img_size", "eval_crop", "eval_views", "eval_view", "mean",
                    "std")


def manifest_checksum(shards: str | Path) -> str:
    """sha256 of a local shard set's manifest (or of the source string for remote sets)."""
    path = Path(shards) / "manifest.json"
    data = path.read_bytes() if path.exists() else str(shards).encode()
    return hashlib.sha256(data).hexdigest()


def eval_stream_config(cfg: StreamConfig, batch_size: int | None = None, num_workers: int | None = None) -> StreamConfig:
    """The eval flavour of a stream config: no masks, no repeats."""
    changes: dict = {"masks": False, "repeats": 1}
    if batch_size is not None:
        changes["batch_size"] = batch_size
    if num_workers is not None:
        changes["num_workers"] = num_workers
    return dataclasses.replace(cfg, **changes)


def shard_files(shards: str | Path, split: str) -> list:
    """``[name, size, mtime_ns]`` of each local shard file of ``split`` (``[name, None, None]`` when missing):
    a shard restored, cut or rewritten since a cache was made changes this, its manifest does not."""
    out = []
    for ref in resolve_shards(shards, split, keep_missing=True):
        if "://" in ref.url or ref.url.startswith("pipe:"):
            continue
        try:
            stat = Path(ref.url).stat()
            out.append([Path(ref.url).name, stat.st_size, stat.st_mtime_ns])
        except OSError:
            out.append([Path(ref.url).name, None, None])
    return out


def cache_key(encoder_id: str, shards: str | Path, split: str, cfg: StreamConfig, views: int,
              precision: str = "fp32", tokens: tuple[int, int, int] | None = None,
              block: int | None = None) -> dict:
    key = {
        "encoder": encoder_id,
        "manifest": manifest_checksum(shards),
        "files": shard_files(shards, split),
        "split": split,
        "views": views,
        "precision": precision,
        "stream": {k: list(v) if isinstance(v, tuple) else v for k, v in
                   ((k, getattr(cfg, k)) for k in EVAL_STREAM_KEYS)},
    }
    if tokens is not None:  # token features pooled to this (t, h, w) grid, not pooled clip features
        key["tokens"] = list(tokens)
    if block is not None:  # read after this encoder block, not after the last one
        key["block"] = block
    return key


def cache_stem(cache_dir: str | Path, shards: str | Path, split: str, key: dict) -> Path:
    digest = hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:12]
    return Path(cache_dir) / f"{set_name(shards)}-{split}-{digest}"


@torch.no_grad()
def encode_split(features_fn: Callable[[torch.Tensor], torch.Tensor], shards: str | Path, split: str,
                 cfg: StreamConfig, views: int = 1, device: str | torch.device = "cpu",
                 progress: bool = True) -> FeatureSet:
    """Features of every clip of ``split`` (all ranks together; every rank returns the full set).

    ``features_fn``: ``(B, T, C, H, W)`` float -> ``(B, D)``, or tokens ``(B, L, W)`` (stored flat, with
    ``token_dim = W``). With ``views > 1`` each clip is encoded at
    ``views`` temporal offsets (evenly spread over the clip) and the features are averaged over the views
    that decoded. On a GPU with native bf16 the encoder runs under bf16 autocast
    (:func:`mgfm.runtime.feature_precision`); features are returned as fp32.
    """
    rank, _ = rank_world()
    precision = feature_precision(device)
    rows: dict[str, dict] = {}
    sums: dict[str, np.ndarray] = {}
    counts: dict[str, int] = {}
    lost: list[dict] = []
    for view in range(views):
        loader, skips = make_loader(shards, split, _view_config(cfg, view, views), mode="eval")
        bar = tqdm(loader, desc=f"features {split} view {view + 1}/{views}", unit="batch",
                   disable=not progress or rank != 0, leave=False)
        for batch in bar:
            video = batch["video"].to(device, non_blocking=True)
            if video.dtype == torch.uint8:  # stream.video_dtype=uint8: normalise on the device
                video = normalise(video, cfg.mean, cfg.std)
            with autocast(device, precision):
                feats = features_fn(video).float().cpu().numpy()
            for clip_id, meta, feat in zip(batch["clip_id"], batch["meta"], feats):
                if clip_id not in rows:
                    rows[clip_id] = {k: v for k, v in meta.items() if k != "shard"}
                    sums[clip_id] = np.zeros(feat.shape, np.float64)
                    counts[clip_id] = 0
                sums[clip_id] += feat
                counts[clip_id] += 1
        lost += skips.records
    fewer_views = [c for c, n in counts.items() if n < views]
    if fewer_views:
        log.warning("%s %s: %d clip(s) decoded in fewer than %d views (e.g. %s); their features average the "
                    "views that did", shards, split, len(fewer_views), views, fewer_views[0])
    local = (list(rows.values()), np.stack([sums[r["clip_id"]] / counts[r["clip_id"]] for r in rows.values()])
             if rows else np.zeros((0, 0)), lost)
    parts = gather_objects(local)
    all_rows = [r for part_rows, _, _ in parts for r in part_rows]
    mats = [m for _, m, _ in parts if len(m)]
    ids = [r["clip_id"] for r in all_rows]
    if len(set(ids)) != len(ids):
        raise RuntimeError(f"{shards} {split}: a clip was encoded twice across ranks; the eval stream split is broken")
    read = SplitRead(str(shards), split, expected_clips(shards, split, cfg.remote_commands), len(all_rows),
                     SkipCounter.merged_records(r for _, _, part_lost in parts for r in part_lost))
    if not all_rows:
        raise FeatureError(f"{shards} split {split!r}: no clips ({read.describe()})")
    order = np.argsort(ids, kind="stable")
    matrix = np.concatenate(mats)[order].astype(np.float32)
    if not read.complete:
        log.warning("%s: %s", shards, read.describe())
    token_dim = matrix.shape[2] if matrix.ndim == 3 else None  # tokens (N, L, W): stored one flat row per clip
    return FeatureSet(matrix.reshape(len(matrix), -1), [all_rows[i] for i in order],
                      read=read.to_dict() | {"describe": read.describe()}, token_dim=token_dim)


def require_complete(features: FeatureSet, what: str, allow_missing: bool) -> None:
    """One-line :class:`FeatureError` when ``features`` lack clips their manifest lists (an evaluation
    must be exact or say so), unless ``allow_missing``: then a warning."""
    read = features.read or {}
    if not read.get("missing"):
        return
    if not allow_missing:
        raise FeatureError(f"{what}: {read['describe']}; restore the shards (`python -m mgfm.shards verify` "
                           f"names what is wrong) or set allow_missing=true to evaluate what is there")
    log.warning("%s: %s (allow_missing=true)", what, read["describe"])


def _view_config(cfg: StreamConfig, view: int, views: int) -> StreamConfig:
    if views < 1:
        raise InputError(f"views must be >= 1, got {views}")
    if views == 1:  # a single view: the config's own eval_view / eval_views decide the window
        return cfg
    return dataclasses.replace(cfg, eval_view=view, eval_views=views)


def split_features(encoder_folder: str | Path | None, shards: str | Path, split: str, cfg: StreamConfig,
                   cache_dir: str | Path | None = None, views: int = 1, encoder: nn.Module | None = None,
                   encoder_id: str | None = None, device: str | torch.device = "cpu",
                   tokens: tuple[int, int, int] | None = None, block: int | None = None) -> FeatureSet:
    """Cached features of ``split`` from the encoder in ``encoder_folder`` (or ``encoder`` + ``encoder_id``):
    clip features ``(N, D)``, or with ``tokens`` a ``(t, h, w)`` grid the encoder's ``pooled_tokens`` (for
    the attentive probe; stored flat, see :class:`FeatureSet`); ``block``: read after that encoder block
    (None: after the last one and the final norm).

    Every rank must call it (extraction is collective); the cache is written by rank 0.
    """
    if encoder is None:
        encoder_id = encoder_checksum(encoder_folder)  # the weights' hash keys the cache; load them on a miss only
    if encoder_id is None:
        raise ValueError("split_features: pass encoder_id with an in-memory encoder")
    device = torch.device(device)
    key = cache_key(encoder_id, shards, split, cfg, views, feature_precision(device), tokens, block)
    stem = cache_stem(cache_dir, shards, split, key) if cache_dir is not None else None
    if stem is not None:
        cached = FeatureSet.load_if_key(stem, key)
        if cached is not None and cached.read and not cached.read.get("missing"):
            log.info("features %s %s: cached at %s", Path(str(shards)).name, split, stem)
            return cached
    if encoder is None:
        encoder, _ = load_encoder_hf(encoder_folder)
    encoder = encoder.to(device).eval()
    readout = {} if block is None else {"block": block}
    features_fn = (partial(encoder.features, **readout) if tokens is None
                   else partial(encoder.pooled_tokens, grid=tuple(tokens), **readout))
    result = encode_split(features_fn, shards, split, cfg, views, device)
    result.key = key
    if stem is not None and rank_world()[0] == 0:
        if result.read.get("missing"):  # an incomplete set is never cached: the next run reads the shards again
            log.info("features %s %s: not cached (incomplete)", Path(str(shards)).name, split)
        else:
            result.save(stem)
    return result
