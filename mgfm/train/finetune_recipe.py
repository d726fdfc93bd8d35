"""The fine-tuning recipe: one dataclass tree, filled from ``recipes/finetune/*.yaml`` + overrides.

Attribute names shared with :class:`mgfm.train.recipe.PretrainRecipe` (``mixed_precision``, ``zero_stage``,
``optim.grad_accum``, ``optim.clip_grad``, ``stream.batch_size``) let the pretraining engine's accelerator
factory serve both loops.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

from mgfm.data.clip_augment import StrongAugConfig
from mgfm.data.stream import StreamConfig
from mgfm.data.subset import check_fraction

BALANCE = ("none", "sampler", "logit_adjust")
INITS = ("pretrained", "random")


@dataclass
class FinetuneOptim:
    """AdamW + layer-wise lr decay, linear warmup then cosine; ``lr = base_lr * global_batch / 256`` where
    the global batch counts labelled clips per optimizer step (all ranks, all accumulation steps)."""

    base_lr: float = 1e-3
    min_lr: float = 1e-6
    weight_decay: float = 0.05
    betas: tuple[float, float] = (0.9, 0.999)
    layer_decay: float = 0.75  # lr x layer_decay^(depth + 1 - layer): the head learns fastest
    epochs: int = 30  # passes over the labelled clips
    warmup_epochs: float = 5.0
    grad_accum: int = 1
    clip_grad: float | None = None
    label_smoothing: float = 0.1
    mixup: float = 0.0  # Beta(alpha, alpha) mixing of labelled clips (0 = off)
    head_dropout: float = 0.0

    def __post_init__(self) -> None:
        if self.epochs < 1 or self.grad_accum < 1:
            raise ValueError("optim.epochs and optim.grad_accum must be >= 1")
        if not 0.0 <= self.label_smoothing < 1.0:
            raise ValueError(f"optim.label_smoothing: expected a value in [0, 1), got {self.label_smoothing}")
        if self.mixup < 0:
            raise ValueError(f"optim.mixup: expected alpha >= 0 (0 = off), got {self.mixup}")
        if not 0.0 < self.layer_decay <= 1.0:
            raise ValueError(f"optim.layer_decay: expected a value in (0, 1], got {self.layer_decay}")


@dataclass
class SemiConfig:
    """Semi-supervised part: FixMatch (pseudo-labels from a weak view, trained on a strong view)."""

    method: Literal["none", "fixmatch"] = "none"
    ratio: int = 2  # unlabelled clips per labelled clip in a step (FixMatch's mu)
    threshold: float = 0.95  # confidence a pseudo-label needs (tau)
    weight: float = 1.0  # lambda_u
    ramp_epochs: float = 0.0  # lambda_u rises linearly from 0 over these epochs
    strong: StrongAugConfig = field(default_factory=StrongAugConfig)

    def __post_init__(self) -> None:
        if self.ratio < 1:
            raise ValueError(f"semi.ratio: expected >= 1, got {self.ratio}")
        if not 0.0 <= self.threshold <= 1.0:
            raise ValueError(f"semi.threshold: expected a confidence in [0, 1], got {self.threshold}")


@dataclass
class FinetuneRecipe:
    """Everything a fine-tuning run (or a ``compare=true`` grid of runs) needs."""

    name: str = "finetune"
    run: str | None = None  # a pretraining run folder or encoder folder; None = newest run in runs_dir
    runs_dir: str = "runs"
    shards: str = "shards/synthetic"
    out: str | None = None  # default: <run>/finetune/<shard set name>/<name>
    train_split: str = "train"
    test_split: str = "test"
    init: Literal["pretrained", "random"] = "pretrained"
    label_fraction: float = 1.0  # seeded stratified labelled subset of the train split (>= 1 clip per class)
    # compare=true: {random, pretrained} x {supervised, semi-supervised} at every fraction in
    # compare_fractions (empty: label_fraction), plus a summary table.
    compare: bool = False
    compare_fractions: list[float] = field(default_factory=list)
    # head_init=probe: LP-FT, the head starts from a logistic regression (C = head_init_c) on the frozen
    # features of the labelled clips; random: a fresh truncated-normal head.
    head_init: Literal["probe", "random"] = "probe"
    head_init_c: float = 0.1
    balance: Literal["none", "sampler", "logit_adjust"] = "none"
    logit_adjust_tau: float = 1.0
    frames: int | None = None  # clip length; None = the encoder's
    img_size: int | None = None  # crop side; None = the encoder's
    # Another frames/img_size than the encoder's: "error" (refuse) or "interpolate" (resample its position
    # table over (t, h, w); the saved model then needs mgfm to load, transformers rebuilds a plain table).
    pos_embed: Literal["error", "interpolate"] = "error"
    drop_path: float = 0.1
    cache_side: int | None = None  # side of the cached train clips random crops come from; None = img_size
    crop_scales: tuple[float, ...] = (1.0, 0.875, 0.75)
    flip: bool = False
    train_views: int = 1  # temporal windows cached per train clip (one drawn per use)
    views: int = 2  # temporal test views averaged per clip (multi-view test)
    # Decoding (sampling policy, batch_size = labelled clips per rank and step, num_workers); the clip
    # geometry and normalisation are the model's.
    stream: StreamConfig = field(default_factory=lambda: StreamConfig(masks=False))
    optim: FinetuneOptim = field(default_factory=FinetuneOptim)
    semi: SemiConfig = field(default_factory=SemiConfig)
    exclude_classes: list[str] = field(default_factory=lambda: ["illustrative"])
    eval_every: int = 0  # epochs between test evaluations logged during training (0 = at the end only)
    # Train and test although the test shards delivered fewer clips than their manifest lists (by default an
    # error; lost train clips are only reported).
    allow_missing: bool = False
    zero_stage: int = 0
    mixed_precision: str = "auto"
    resume: str = "auto"  # auto | never
    checkpoint_every: int = 0  # optimizer steps between checkpoints; 0 = only at the end of every 10th epoch
    keep_checkpoints: int = 2
    seed: int = 0

    def __post_init__(self) -> None:
        for key in ("frames", "img_size", "tubelet", "patch"):
            if getattr(self.stream, key) is not None:
                raise ValueError(f"stream.{key}: the clip geometry is the encoder's (frames=/img_size= change it)")
        check_fraction(self.label_fraction)
        for f in self.compare_fractions:
            check_fraction(f, "compare_fractions")
        if self.views < 1 or self.train_views < 1:
            raise ValueError("views and train_views must be >= 1")
        if self.head_init_c <= 0:
            raise ValueError(f"head_init_c: expected an inverse regularisation strength > 0, got {self.head_init_c}")
        if self.resume not in ("auto", "never"):
            raise ValueError(f"resume: expected 'auto' or 'never', got {self.resume!r}")
        if not self.crop_scales or any(not 0 < s <= 1 for s in self.crop_scales):
            raise ValueError(f"crop_scales: expected fractions in (0, 1], got {self.crop_scales}")
