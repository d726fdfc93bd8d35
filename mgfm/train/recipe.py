"""The pretraining recipe: one dataclass tree, filled from ``recipes/pretrain/*.yaml`` + overrides."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

from mgfm.data.stream import StreamConfig
from mgfm.errors import InputError
from mgfm.model.videomae import LossConfig, ModelConfig


@dataclass
class OptimConfig:
    """AdamW with linear warmup and cosine decay; ``lr = base_lr * global_batch / 256`` (VideoMAE)."""

    base_lr: float = 1.5e-4
    min_lr: float = 1e-6
    weight_decay: float = 0.05
    betas: tuple[float, float] = (0.9, 0.95)
    epochs: int = 20
    warmup_epochs: float = 1.0
    grad_accum: int = 1
    clip_grad: float | None = 1.0

    def __post_init__(self) -> None:
        if not self.base_lr > 0:  # the schedule is relative to the peak lr (min_lr / peak)
            raise InputError(f"optim.base_lr: expected a positive lr, got {self.base_lr}")
        if self.min_lr < 0:
            raise InputError(f"optim.min_lr: expected a non-negative lr, got {self.min_lr}")
        if self.epochs < 1 or self.grad_accum < 1:
            raise InputError(f"optim.epochs and optim.grad_accum must be >= 1, got {self.epochs} and {self.grad_accum}")


@dataclass
class PretrainRecipe:
    """Everything a pretraining run needs. The resolved recipe is saved as ``runs/<name>/recipe.yaml``."""

    name: str = "tiny-synthetic"
    out_dir: str = "runs"
    # Shards to pretrain on: a folder with manifest.json, a brace pattern or URLs; or a list of several such
    # shard sets, streamed as one mixture sampled with `shard_weights` (default: in proportion to their clips).
    shards: str | list[str] = "shards/synthetic"
    shard_weights: list[float] | None = None
    split: str = "train"
    # When `shards` is the default path (shards/synthetic) and missing, and this is set, render this synthetic
    # benchmark and shard it first. Any other missing `shards` is an error.
    synthetic_data: str | None = "data/synthetic"
    model: ModelConfig = field(default_factory=ModelConfig)  # the clip geometry too (the stream takes it)
    loss: LossConfig = field(default_factory=LossConfig)
    stream: StreamConfig = field(default_factory=StreamConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    # DeepSpeed ZeRO stage used when the launcher gave no DeepSpeed config (0 = plain Accelerate).
    zero_stage: int = 0
    mixed_precision: str = "auto"  # auto: bf16 on a GPU with native bf16, else fp32 (TF32 on CUDA)
    init_from: str | None = None  # a Hugging Face VideoMAE folder to start the encoder from
    # init_from an encoder of another clip length / crop size: "error" (refuse) or "interpolate" (resample its
    # position table over (t, h, w) to the model's token grid).
    pos_embed: Literal["error", "interpolate"] = "error"
    # How a fresh run starts the tubelet embedding: "random", or "motion_pca" = whitened principal components
    # of in-tubelet frame differences of `patch_init_clips` unlabelled train clips (mgfm/model/motion_init.py).
    patch_init: Literal["random", "motion_pca"] = "random"
    patch_init_clips: int = 256
    # Keep the tubelet embedding fixed during training (as MoCo v3 does with its random patch projection).
    freeze_patch_embed: bool = False
    resume: str = "auto"  # auto | never | path to a checkpoint folder
    checkpoint_every: int = 0  # optimizer steps between checkpoints; 0 = at the end of every epoch
    keep_checkpoints: int = 2
    seed: int = 0
    # Epochs after which the encoder is also exported to runs/<name>/encoders/epoch_NNNNN/ (Hugging Face format,
    # like encoder/), for learning curves; 0 = the initialisation.
    export_epochs: list[int] = field(default_factory=list)
    # Write the clip ids each rank trained on to runs/<name>/data_audit/rank<R>.txt (to check data splits).
    audit_data: bool = False

    def __post_init__(self) -> None:
        if any(e < 0 or e > self.optim.epochs for e in self.export_epochs):
            raise InputError(f"export_epochs: expected epochs in [0, optim.epochs={self.optim.epochs}], "
                             f"got {self.export_epochs}")
        for key in GEOMETRY:
            given = getattr(self.stream, key)
            if given is not None and given != getattr(self.model, key):
                raise ValueError(f"stream.{key}={given}: the clip geometry is the model's (model.{key}="
                                 f"{getattr(self.model, key)}); set model.{key} only")

    @property
    def clip_stream(self) -> StreamConfig:
        """The train stream cut for the model (its clip geometry and normalisation)."""
        return self.stream.with_model(self.model)


#: Stream settings that are the model's: a recipe sets them under ``model.`` only.
GEOMETRY = ("frames", "img_size", "tubelet", "patch")
