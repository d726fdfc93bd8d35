"""The fine-tuning recipe: one dataclass tree, filled from ``recipes/finetune/*.yaml`` + overrides.

Attribute names shared with :class:`mgfm.train.recipe.PretrainRecipe` (``mixed_precision``, ``zero_stage``,
``optim.grad_accum``, ``optim.clip_grad``, ``stream.batch_size``) let the pretraining engine's accelerator
factory serve both loops.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import ClassVar, Literal

from mgfm.config import bounded
from mgfm.data.clip_augment import StrongAugConfig
from mgfm.data.stream import StreamConfig
from mgfm.data.subset import check_fraction
from mgfm.data.stream.config import TRAIN_ONLY
from mgfm.evaluate.encoder_eval import RunRecipe

BALANCE = ("none", "sampler", "logit_adjust")
INITS = ("pretrained", "random")


@dataclass
class FinetuneOptim:
    """AdamW + layer-wise lr decay, linear warmup then cosine; ``lr = base_lr * global_batch / 256`` where
    the global batch counts labelled clips per optimizer step (all ranks, all accumulation steps)."""

    base_lr: float = bounded(1e-3, gt=0)
    min_lr: float = bounded(1e-6, ge=0)
    weight_decay: float = bounded(0.05, ge=0)
    betas: tuple[float, float] = bounded((0.9, 0.999), ge=0, lt=1)
    layer_decay: float = bounded(0.75, gt=0, le=1)  # lr x layer_decay^(depth + 1 - layer): the head learns fastest
    epochs: int = bounded(30, ge=1)  # passes over the labelled clips
    warmup_epochs: float = bounded(5.0, ge=0)
    grad_accum: int = bounded(1, ge=1)
    clip_grad: float | None = bounded(None, ge=0)
    label_smoothing: float = bounded(0.1, ge=0, lt=1)
    mixup: float = bounded(0.0, ge=0)  # Beta(alpha, alpha) mixing of labelled clips (0 = off)
    head_dropout: float = bounded(0.0, ge=0, lt=1)



@dataclass
class SemiConfig:
    """Semi-supervised part: FixMatch (pseudo-labels from a weak view, trained on a strong view)."""

    method: Literal["none", "fixmatch"] = "none"
    ratio: int = bounded(2, ge=1)  # unlabelled clips per labelled clip in a step (FixMatch's mu)
    threshold: float = bounded(0.95, ge=0, le=1)  # confidence a pseudo-label needs (tau)
    weight: float = bounded(1.0, ge=0)  # lambda_u
    ramp_epochs: float = bounded(0.0, ge=0)  # lambda_u rises linearly from 0 over these epochs
    strong: StrongAugConfig = field(default_factory=StrongAugConfig)



@dataclass
class EncoderChanges:
    """What fine-tuning changes of the encoder it starts from (None = the encoder's own): its clip length and
    crop size (the position table is then kept, resampled or refused: ``pos_embed``) and its drop path."""

    frames: int | None = bounded(None, ge=1)
    img_size: int | None = bounded(None, ge=1)
    drop_path: float = bounded(0.1, ge=0, lt=1)


@dataclass
class FinetuneRecipe(RunRecipe):
    """Everything a fine-tuning run (or a ``compare=true`` grid of runs) needs. ``run``, ``shards`` and ``out``
    (default: <run>/finetune/<shard set name>/<name>) as every evaluation has them."""

    COMMAND: ClassVar[str] = "fine-tuning"
    MOVED: ClassVar[dict[str, str]] = {"frames": "model.frames", "img_size": "model.img_size",
                                       "drop_path": "model.drop_path", "batch_size": "stream.batch_size",
                                       "stream.frames": "model.frames", "stream.img_size": "model.img_size",
                                       "stream.seed": "seed", "stream.flip": "flip", "stream.crop_scales": "crop_scales"}
    UNUSED: ClassVar[dict[str, str]] = {
        "stream.tubelet": "the encoder's", "stream.patch": "the encoder's",
        "stream.mean": "clips are normalised as the encoder was trained", "stream.std": "clips are normalised as "
        "the encoder was trained", "stream.masks": "fine-tuning sees whole clips",
        **{f"stream.{k}": "a pretraining stream setting (fine-tuning crops cached clips: crop_scales, flip)"
           for k in TRAIN_ONLY if k != "crop_scales"}}

    name: str = "finetune"
    train_split: str = "train"
    test_split: str = "test"
    init: Literal["pretrained", "random"] = "pretrained"
    label_fraction: float = bounded(1.0, gt=0, le=1)  # seeded stratified labelled subset of the train split (>= 1 clip per class)
    # compare=true: {random, pretrained} x {supervised, semi-supervised} at every fraction in
    # compare_fractions (empty: label_fraction), plus a summary table.
    compare: bool = False
    compare_fractions: list[float] = bounded(default_factory=list, gt=0, le=1)
    # head_init=probe: LP-FT, the head starts from a logistic regression (C = head_init_c) on the frozen
    # features of the labelled clips; random: a fresh truncated-normal head.
    head_init: Literal["probe", "random"] = "probe"
    head_init_c: float = bounded(0.1, gt=0)
    balance: Literal["none", "sampler", "logit_adjust"] = "none"
    logit_adjust_tau: float = bounded(1.0, ge=0)
    model: EncoderChanges = field(default_factory=EncoderChanges)
    # Another model.frames / model.img_size than the encoder's: "error" (refuse) or "interpolate" (resample its
    # position table over (t, h, w); the saved model then needs mgfm to load, transformers rebuilds a plain table).
    pos_embed: Literal["error", "interpolate"] = "error"
    cache_side: int | None = bounded(None, ge=1)  # side of the cached train clips random crops come from; None = img_size
    crop_scales: tuple[float, ...] = bounded((1.0, 0.875, 0.75), gt=0, le=1)
    flip: bool = False
    train_views: int = bounded(1, ge=1)  # temporal windows cached per train clip (one drawn per use)
    views: int = bounded(2, ge=1)  # temporal test views averaged per clip (multi-view test)
    # Decoding (sampling policy, batch_size = labelled clips per rank and step, num_workers); the clip
    # geometry and normalisation are the model's.
    stream: StreamConfig = field(default_factory=lambda: StreamConfig(masks=False))
    optim: FinetuneOptim = field(default_factory=FinetuneOptim)
    semi: SemiConfig = field(default_factory=SemiConfig)
    exclude_classes: list[str] = field(default_factory=lambda: ["illustrative"])
    eval_every: int = bounded(0, ge=0)  # epochs between test evaluations logged during training (0 = at the end only)
    # Train and test although the test shards delivered fewer clips than their manifest lists (by default an
    # error; lost train clips are only reported).
    allow_missing: bool = False
    zero_stage: int = bounded(0, ge=0, le=3)
    mixed_precision: str = "auto"
    resume: str = "auto"  # auto | never
    checkpoint_every: int = bounded(0, ge=0)  # optimizer steps between checkpoints; 0 = only at the end of every 10th epoch
    keep_checkpoints: int = bounded(2, ge=1)
    seed: int = bounded(0, ge=0)

    def __post_init__(self) -> None:
        check_fraction(self.label_fraction)
        for f in self.compare_fractions:
            check_fraction(f, "compare_fractions")
        if self.resume not in ("auto", "never"):
            raise ValueError(f"resume: expected 'auto' or 'never', got {self.resume!r}")
        if not self.crop_scales:
            raise ValueError("crop_scales: expected at least one crop fraction")
