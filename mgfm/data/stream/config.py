"""The stream's settings (:class:`StreamConfig`): sampling, crops, masks, batching, decoding and the memory
cache. Recipes set them under ``stream.``, except :data:`RUN_FIELDS`, which each run fills from their one
address: the clip geometry and normalisation from the model (:meth:`StreamConfig.with_model`), ``seed`` and
``flip`` from the recipe's own keys, ``masks`` from what the run does."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Literal

from mgfm.config import bounded
from mgfm.data.masking import TokenGrid
from mgfm.data.transforms import IMAGENET_MEAN, IMAGENET_STD


#: Stream fields no recipe sets under ``stream.``: the run fills them in (see the module docstring).
RUN_FIELDS = ("frames", "img_size", "tubelet", "patch", "mean", "std", "seed", "flip", "masks")
#: Settings only train streams read, and only eval streams read.
TRAIN_ONLY = ("crop_scales", "max_distort", "mask_ratio", "decoder_keep_ratio", "repeats", "batches_per_epoch",
              "shuffle_buffer", "cache", "cache_max_gb")
EVAL_ONLY = ("eval_crop", "eval_views", "eval_view")


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
    # pyav decodes only what the sampled frames need (the same pixels as decord; BENCHMARKS.md "Loader")
    backend: Literal["decord", "pyav"] = "pyav"
    fallback_backend: Literal["decord", "pyav"] | None = "decord"
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
    seed: int = bounded(0, ge=0)  # every random draw of the stream derives from it (the run's `seed`)
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
        """This stream cut for ``model`` (a :class:`~mgfm.model.encoder.ModelConfig`): its clip length,
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


