"""The pretraining recipe: one dataclass tree, filled from ``recipes/pretrain/*.yaml`` + overrides."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import ClassVar, Literal

from mgfm.config import bounded
from mgfm.data.stream import StreamConfig
from mgfm.data.stream.config import EVAL_ONLY
from mgfm.errors import InputError
from mgfm.model.encoder import ModelConfig
from mgfm.model.masked import LossConfig


@dataclass
class OptimConfig:
    """AdamW with linear warmup and cosine decay; ``lr = base_lr * global_batch / 256`` (VideoMAE)."""

    base_lr: float = bounded(1.5e-4, gt=0)
    min_lr: float = bounded(1e-6, ge=0)
    weight_decay: float = bounded(0.05, ge=0)
    betas: tuple[float, float] = bounded((0.9, 0.95), ge=0, lt=1)
    epochs: int = bounded(20, ge=1)
    warmup_epochs: float = bounded(1.0, ge=0)
    grad_accum: int = bounded(1, ge=1)
    clip_grad: float | None = bounded(1.0, ge=0)


@dataclass
class PretrainRecipe:
    """Everything a pretraining run needs. The resolved recipe is saved as ``runs/<name>/recipe.yaml``."""

    COMMAND: ClassVar[str] = "pretraining"
    # One address per setting: the stream's seed, flip, normalisation and clip geometry are the run's.
    MOVED: ClassVar[dict[str, str]] = {"stream.seed": "seed", "stream.flip": "flip", "stream.mean": "model.pixel_mean",
                                       "stream.std": "model.pixel_std",
                                       **{f"stream.{k}": f"model.{k}" for k in ("frames", "img_size", "tubelet", "patch")}}
    UNUSED: ClassVar[dict[str, str]] = {"stream.masks": "pretraining always masks",
                                        **{f"stream.{k}": "an evaluation setting" for k in EVAL_ONLY}}
    # What a resumed run may change (more epochs, logging, checkpointing, how the data is fetched): anything
    # else would make the run folder describe another model, data or schedule than its checkpoints.
    RESUMABLE: ClassVar[tuple[str, ...]] = (
        "resume", "optim.epochs", "checkpoint_every", "keep_checkpoints", "export_epochs", "audit_data",
        "synthetic_data", "stream.prefetch_factor", "stream.pin_memory", "stream.log_skips", "stream.cache",
        "stream.cache_max_gb", "stream.remote_commands", "stream.backend", "stream.fallback_backend")

    name: str = "tiny-synthetic"
    out_dir: str = "runs"
    # Shards to pretrain on: a folder with manifest.json, a brace pattern or URLs; or a list of several such
    # shard sets, streamed as one mixture sampled with `shard_weights` (default: in proportion to their clips).
    shards: str | list[str] = "shards/synthetic"
    shard_weights: list[float] | None = bounded(None, ge=0)
    split: str = "train"
    # When `shards` is the default path (shards/synthetic) and missing, and this is set, render this synthetic
    # benchmark and shard it first. Any other missing `shards` is an error.
    synthetic_data: str | None = "data/synthetic"
    model: ModelConfig = field(default_factory=ModelConfig)  # the clip geometry too (the stream takes it)
    loss: LossConfig = field(default_factory=LossConfig)
    stream: StreamConfig = field(default_factory=StreamConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    # DeepSpeed ZeRO stage used when the launcher gave no DeepSpeed config (0 = plain Accelerate).
    zero_stage: int = bounded(0, ge=0, le=3)
    mixed_precision: str = "auto"  # auto: bf16 on a GPU with native bf16, else fp32 (TF32 on CUDA)
    # A public VideoMAE checkpoint to start from: a Hugging Face folder or an original VideoMAE / V2 .pth
    # (mgfm.model.pretrained.LAYOUTS); its decoder too when it has one.
    init_from: str | None = None
    # init_from an encoder of another clip length / crop size: "error" (refuse) or "interpolate" (resample its
    # position table over (t, h, w) to the model's token grid).
    pos_embed: Literal["error", "interpolate"] = "error"
    # How a fresh run starts the tubelet embedding: "random", or "motion_pca" = whitened principal components
    # of in-tubelet frame differences of `patch_init_clips` unlabelled train clips (mgfm/model/motion_init.py).
    patch_init: Literal["random", "motion_pca"] = "random"
    patch_init_clips: int = bounded(256, ge=1)
    # Keep the tubelet embedding fixed during training (as MoCo v3 does with its random patch projection).
    freeze_patch_embed: bool = False
    resume: str = "auto"  # auto | never | path to a checkpoint folder
    checkpoint_every: int = bounded(0, ge=0)  # optimizer steps between checkpoints; 0 = at the end of every epoch
    keep_checkpoints: int = bounded(2, ge=1)
    # Every random stream of the run derives from it: the weights' init, the motion-PCA clips, shard order,
    # shuffling, frame windows, crops, flips and masks (per rank, worker and sample).
    seed: int = bounded(0, ge=0)
    # Random horizontal flip of train crops. Off by default: it swaps the hand a gesture is made with, which a
    # dataset may label (iMiGUE's and SMG's classes are side-agnostic, so flip=true is label-safe there).
    flip: bool = False
    # Epochs after which the encoder is also exported to runs/<name>/encoders/epoch_NNNNN/ (Hugging Face format,
    # like encoder/), for learning curves; 0 = the initialisation.
    export_epochs: list[int] = bounded(default_factory=list, ge=0)
    # Write the clip ids each rank trained on to runs/<name>/data_audit/rank<R>.txt (to check data splits).
    audit_data: bool = False

    def __post_init__(self) -> None:
        if any(e < 0 or e > self.optim.epochs for e in self.export_epochs):
            raise InputError(f"export_epochs: expected epochs in [0, optim.epochs={self.optim.epochs}], "
                             f"got {self.export_epochs}")
        check_masks(self.stream, self.model)

    @property
    def clip_stream(self) -> StreamConfig:
        """The train stream of this run: the recipe's ``stream`` with the model's clip geometry and
        normalisation, the run's ``seed`` and ``flip``, and masks."""
        return dataclasses.replace(self.stream.with_model(self.model), seed=self.seed, flip=self.flip, masks=True)


def check_masks(stream: StreamConfig, model: ModelConfig) -> None:
    """The masks ``stream`` draws must leave the encoder a token and give the decoder one, on ``model``'s
    token grid (a tube mask hides whole tubes: ``round(mask_ratio x patches per frame)`` of them)."""
    grid = model.grid
    patches = grid.h * grid.w
    hidden = round(stream.mask_ratio * patches)
    if not 1 <= hidden < patches:
        raise ValueError(f"stream.mask_ratio={stream.mask_ratio:g} hides {hidden} of the {patches} patches of a frame "
                         f"({grid.h}x{grid.w} at model.img_size={model.img_size}, model.patch={model.patch}); expected "
                         f"a ratio that hides at least 1 and leaves at least 1 visible: [{0.5 / patches:.3g}, "
                         f"{(patches - 0.5) / patches:.3g})")
    if stream.decoder_keep_ratio is not None and round(hidden * grid.t * stream.decoder_keep_ratio) < 1:
        raise ValueError(f"stream.decoder_keep_ratio={stream.decoder_keep_ratio:g} keeps none of the {hidden * grid.t} "
                         f"masked tokens for the decoder; expected at least {0.5 / (hidden * grid.t):.3g}")

