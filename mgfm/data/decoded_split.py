"""Decode a split once into memory: uint8 clips for many cheap fine-tuning epochs.

Fine-tuning on a few hundred labelled clips runs hundreds of epochs over them; decoding every clip each
time would cost more than the model on a CPU. :func:`decode_split` streams the split through the ordinary
eval stream (:func:`mgfm.data.stream.make_loader`, ``mode="eval"``: decoding, temporal sampling and the
centre crop stay in one place, corrupt samples are skipped and counted there) and keeps the uint8
frames. Random crops, flips and stronger augmentations are then applied to the cached tensors
(:mod:`mgfm.data.clip_augment`).

Under several processes each rank caches the clips its eval stream gives it: disjoint, together every
clip once (data-parallel training on disjoint parts, like a distributed sampler).

Memory: ``N x V x T x 3 x S x S`` bytes (1,831 clips x 8 frames x 128^2 = 0.72 GB).
"""

from __future__ import annotations

import dataclasses
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable, Sequence

import torch
from tqdm.auto import tqdm

from mgfm.data.stream import SkipCounter, StreamConfig, make_loader
from mgfm.errors import InputError
from mgfm.runtime import rank_world

log = logging.getLogger(__name__)


@dataclass
class DecodedSplit:
    """Decoded clips of (this rank's part of) a split, sorted by clip id.

    ``video``: uint8 ``(N, V, T, 3, S, S)`` unnormalised RGB, ``V`` temporal windows per clip spread over
    the clip (window ``v`` at position ``(v + 0.5) / V``); ``labels``: int64 ``(N,)`` (-1 = unlabelled);
    ``clip_ids``: N ids; ``skipped``: clips the stream lost (corrupt, or missing from their shards);
    ``lost``: its skip records.
    """

    video: torch.Tensor
    labels: torch.Tensor
    clip_ids: list[str]
    skipped: int = 0
    index: dict[str, int] = field(default_factory=dict, repr=False)
    lost: list[dict] = field(default_factory=list, repr=False)

    def __post_init__(self) -> None:
        if self.video.dtype != torch.uint8 or self.video.dim() != 6:
            raise ValueError(f"DecodedSplit.video: expected uint8 (N, V, T, 3, S, S), got {self.video.dtype} "
                             f"{tuple(self.video.shape)}")
        if not len(self.video) == len(self.labels) == len(self.clip_ids):
            raise ValueError(f"DecodedSplit: {len(self.video)} clips, {len(self.labels)} labels, "
                             f"{len(self.clip_ids)} clip ids")
        self.index = {c: i for i, c in enumerate(self.clip_ids)}

    def __len__(self) -> int:
        return len(self.clip_ids)

    @property
    def views(self) -> int:
        return int(self.video.shape[1])

    def select(self, clip_ids: Iterable[str]) -> "DecodedSplit":
        """The cached clips among ``clip_ids`` (ids not cached here are ignored: another rank holds them)."""
        rows = sorted(self.index[c] for c in set(clip_ids) if c in self.index)
        take = torch.tensor(rows, dtype=torch.long)
        return DecodedSplit(self.video[take], self.labels[take], [self.clip_ids[i] for i in rows], self.skipped,
                         lost=self.lost)


def decode_split(source: str | Path | Sequence[str], split: str, cfg: StreamConfig, views: int = 1,
                 progress: bool = True, desc: str | None = None) -> DecodedSplit:
    """Decode every clip of ``split`` this rank's eval stream yields, ``views`` temporal windows each.

    ``cfg`` gives the temporal sampling, the eval centre crop (``eval_crop``), the output side
    (``img_size``), batch size and workers; masks are not made. Returns a :class:`DecodedSplit`.
    """
    if views < 1:
        raise InputError(f"views must be >= 1, got {views}")
    rank, _ = rank_world()
    base = dataclasses.replace(cfg, masks=False, repeats=1, video_dtype="uint8")
    per_view: list[dict[str, torch.Tensor]] = []
    labels: dict[str, int] = {}
    counters = []
    for view in range(views):
        vcfg = base if views == 1 else dataclasses.replace(base, eval_view=view, eval_views=views)
        loader, skips = make_loader(source, split, vcfg, mode="eval")
        frames: dict[str, torch.Tensor] = {}
        bar = tqdm(loader, desc=desc or f"decode {split} view {view + 1}/{views}", unit="batch",
                   disable=not progress or rank != 0, leave=False)
        for batch in bar:
            for clip_id, label, clip in zip(batch["clip_id"], batch["label"].tolist(), batch["video"]):
                frames[clip_id] = clip.clone()
                labels[clip_id] = int(label)
        per_view.append(frames)
        counters.append(skips)
    ids = sorted(set.intersection(*(set(f) for f in per_view))) if per_view else []
    if ids:
        video = torch.stack([torch.stack([f[c] for f in per_view]) for c in ids])
    else:
        video = torch.zeros((0, views, cfg.frames, 3, cfg.img_size, cfg.img_size), dtype=torch.uint8)
    lost = SkipCounter.merged(counters)
    if lost.samples:
        log.warning("%s %s: %d clips lost while caching (%s)", source, split, lost.samples, lost.summary())
    log.info("cached %d clips of %s/%s (%d view(s), %.0f MB)", len(ids), Path(str(source)).name, split, views,
             video.numel() / 2**20)
    return DecodedSplit(video, torch.tensor([labels[c] for c in ids], dtype=torch.long), ids, lost.samples,
                     lost=lost.records)


__all__ = ["DecodedSplit", "decode_split"]
