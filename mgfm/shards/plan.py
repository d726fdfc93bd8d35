"""The shard plan: which clips go into which shard, as a deterministic function of the clip index and the
build's output settings.

Clips of a split are sorted by (video, start, end) and cut into shards of ``shard_samples`` clips, or of about
``shard_mb`` megabytes using a size estimate from the clip length. The plan's hash (:func:`plan_hash`) names
it: a shard built for one plan is never taken for another's. ``part_of`` gives the shards part ``i`` of ``N``
builds (global shard number modulo ``N``). On disk the plan names each shard's split and clip ids
(:func:`write_plan`); the hash is computed clip by clip, never as one string of the whole index.
"""

from __future__ import annotations

import hashlib
import json
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from mgfm.shards import manifest as mf
from mgfm.sources.clip_index import Clip, ClipIndex

if TYPE_CHECKING:  # the builder's settings; imported for annotations only (build.py imports this module)
    from mgfm.shards.build import BuildConfig

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class PlannedShard:
    """One shard of a plan: its split and its clips, in order."""

    split: str
    clips: list[Clip]


def plan_shards(index: ClipIndex, config: BuildConfig) -> dict[str, PlannedShard]:
    """Shard name -> :class:`PlannedShard` for every shard of the dataset (all parts), in build order."""
    splits = sorted({c.split for c in index.clips})
    if config.splits is not None:
        unknown = set(config.splits) - set(splits)
        if unknown:
            log.warning("splits %s have no clips in the index", sorted(unknown))
        splits = [s for s in splits if s in config.splits]
    budget = config.shard_mb * 1e6
    plan: dict[str, dict] = {}
    lengths: dict[str, int] = {}
    for split in splits:
        clips = sorted(index.split(split), key=_clip_order)
        shard: list[Clip] = []
        size = 0.0
        number = 0
        for clip in clips:
            est = _estimate_bytes(clip, config, lengths)
            full = (len(shard) >= config.shard_samples) if config.shard_samples else (shard and size + est > budget)
            if full:
                plan[mf.shard_name(split, number)] = PlannedShard(split, shard)
                number, shard, size = number + 1, [], 0.0
            shard.append(clip)
            size += est
        if shard:
            plan[mf.shard_name(split, number)] = PlannedShard(split, shard)
    return plan


def plan_hash(plan: dict[str, PlannedShard], config: BuildConfig) -> str:
    """sha256 of ``{"config": output fields, "shards": {name: {"clips": [rows], "split"}}}`` as
    ``json.dumps(..., sort_keys=True)`` writes it, fed to the hash clip by clip (the same digest as one
    string of the whole plan, which shards built earlier carry, at the memory of one row)."""
    encode = json.JSONEncoder(sort_keys=True, default=list).encode
    digest = hashlib.sha256()
    digest.update(f'{{"config": {encode(config.output_fields())}, "shards": {{'.encode())
    for k, name in enumerate(sorted(plan)):
        digest.update(f'{", " if k else ""}{encode(name)}: {{"clips": ['.encode())
        for j, clip in enumerate(plan[name].clips):
            digest.update(f'{", " if j else ""}{encode(clip.to_row())}'.encode())
        digest.update(f'], "split": {encode(plan[name].split)}}}'.encode())
    digest.update(b"}}")
    return digest.hexdigest()


def part_of(plan: dict[str, PlannedShard], part: tuple[int, int]) -> list[str]:
    """The shard names part ``i`` of ``N`` builds: global shard number modulo N (disjoint, covering)."""
    i, n = part
    return [name for k, name in enumerate(plan) if k % n == i]


def _clip_order(c: Clip) -> tuple:
    vid = (0, int(c.video_id), "") if c.video_id.isdigit() else (1, 0, c.video_id)
    return (vid, c.path, c.start_frame, c.end_frame, c.clip_id)


def _estimate_bytes(clip: Clip, config: BuildConfig, lengths: dict[str, int]) -> float:
    if clip.end_frame >= 0:
        frames = clip.n_frames + 2 * config.context_frames
    else:
        if clip.path not in lengths:
            lengths[clip.path] = _probe_length(clip.path, config.est_unknown_frames)
        frames = max(1, lengths[clip.path] - clip.start_frame) + config.context_frames
    short = config.short_side or 256
    return frames * short * short * config.est_aspect * config.est_bytes_per_pixel


def _probe_length(path: str, default: int) -> int:
    """Frame count from container metadata (no decoding); ``default`` when unknown."""
    # deferred: the native decoder is loaded where frames are decoded, not by every importer
    import av

    try:
        with av.open(path) as container:
            stream = container.streams.video[0]
            if stream.frames:
                return int(stream.frames)
            if stream.duration and stream.time_base and stream.average_rate:
                return int(float(stream.duration * stream.time_base) * float(stream.average_rate))
    except Exception:  # noqa: BLE001 - a missing/broken video is reported when the shard is built
        pass
    return default


def write_plan(out_dir: Path, index: ClipIndex, plan: dict[str, PlannedShard], digest: str, config: BuildConfig,
               source: dict, overwrite: bool) -> None:
    """Record ``plan`` (hash ``digest``) as ``out_dir``'s plan: the index's name and source, the output settings,
    the classes and each shard's split and clip ids (:func:`mgfm.shards.manifest.record_plan`)."""
    mf.record_plan(out_dir, {
        "plan_hash": digest,
        "name": index.name,
        "source": {**source, "name": index.name, "clips": len(index)},
        "config": {k: list(v) if isinstance(v, tuple) else v for k, v in config.output_fields().items()},
        "encoding": config.encoding().record(),
        "class_names": list(index.class_names),
        "emotion_splits": dict(index.emotion_splits),
        "shards": {name: {"split": shard.split, "clips": [c.clip_id for c in shard.clips]}
                   for name, shard in plan.items()},
    }, overwrite)
