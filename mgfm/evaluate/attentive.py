"""Attentive probe on frozen tokens, the way V-JEPA and VideoMAE V2 evaluate frozen video encoders.

A mean-pooled clip feature throws away where and when things happen; a linear probe on it can only read
what survives the average. The attentive probe keeps the tokens (``(N, L, W)``, pooled to a small grid by
:meth:`mgfm.model.encoder.VideoEncoder.pooled_tokens` to fit a CPU budget) and trains a small head on them:
standardise each channel with the train split's statistics, add a learned embedding per token position
(started from the sin-cos table), let
one learned query cross-attend to the tokens, LayerNorm, then a linear classifier. Only the head learns.

Like the linear probe's L2 strength, the head's weight decay is picked by cross-validation over groups of
train subjects (:func:`mgfm.evaluate.probe.choose_by_group_cv`), then the head is refitted on the whole split.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np
import torch
from torch import nn

from mgfm.config import bounded
from mgfm.evaluate.featureset import FeatureError, FeatureSet
from mgfm.evaluate.probe import channel_stats, choose_by_group_cv, labelled_train_split, subject_groups
from mgfm.model.layers import sinusoid_table


@dataclass
class AttentiveProbeConfig:
    grid: list[int] = bounded(default_factory=lambda: [4, 4, 4], ge=1)  # (t, h, w) the encoder's tokens are pooled to
    heads: int = bounded(4, ge=1)  # attention heads (reduced to a divisor of the token width)
    steps: int = bounded(300, ge=1)  # optimiser steps per fit, whatever the split's size
    batch_size: int = bounded(64, ge=1)
    lr: float = bounded(5e-3, gt=0)  # few steps on small splits: a high lr (1e-3 left a where-not-what toy half learnt)
    weight_decay: float | None = bounded(None, ge=0)  # None = chosen by subject-grouped CV from wd_grid
    wd_grid: list[float] = bounded(default_factory=lambda: [0.05, 0.5], ge=0)
    cv_folds: int = bounded(3, ge=2)
    seed: int = bounded(0, ge=0)

    def __post_init__(self) -> None:
        if len(self.grid) != 3:
            raise FeatureError(f"attentive.grid: expected three token counts (t, h, w), got {self.grid}")


class AttentivePooler(nn.Module):
    """Standardised tokens ``(B, L, W)`` -> logits ``(B, num_classes)`` through one learned query's
    cross-attention (``heads`` heads) over the tokens plus a learned position embedding."""

    def __init__(self, width: int, num_tokens: int, num_classes: int, heads: int) -> None:
        super().__init__()
        # starts as the sin-cos table, at the scale of the normalised tokens: positions tell apart from step 0
        self.position = nn.Parameter(sinusoid_table(num_tokens, width).reshape(1, num_tokens, width).clone())
        self.query = nn.Parameter(torch.randn(1, 1, width) * 0.02)
        self.norm_in = nn.LayerNorm(width)
        self.attention = nn.MultiheadAttention(width, math.gcd(width, heads), batch_first=True)
        self.norm_out = nn.LayerNorm(width)
        self.classifier = nn.Linear(width, num_classes)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        x = self.norm_in(tokens) + self.position
        pooled, _ = self.attention(self.query.expand(len(x), -1, -1), x, x, need_weights=False)
        return self.classifier(self.norm_out(pooled[:, 0]))


@dataclass
class AttentiveProbe:
    """A fitted attentive probe: per-channel standardisation ``mean``/``scale`` ``(W,)`` and the head."""

    head: AttentivePooler
    mean: np.ndarray
    scale: np.ndarray
    num_classes: int
    weight_decay: float
    cv_scores: dict[float, float] = field(default_factory=dict)

    @torch.no_grad()
    def logits(self, tokens: np.ndarray) -> np.ndarray:
        """``(N, L, W)`` -> ``(N, num_classes)`` float32."""
        self.head.eval()
        x = _standardised(tokens, self.mean, self.scale)
        return torch.cat([self.head(x[i:i + 256]) for i in range(0, len(x), 256)]).numpy().astype(np.float32)


def _standardised(tokens: np.ndarray, mean: np.ndarray, scale: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(((np.asarray(tokens, dtype=np.float32) - mean) / scale).astype(np.float32))


def _fit_head(x: torch.Tensor, y: torch.Tensor, num_classes: int, weight_decay: float,
              cfg: AttentiveProbeConfig) -> AttentivePooler:
    """``cfg.steps`` AdamW steps (cosine lr) on batches drawn without replacement, epoch after epoch."""
    generator = torch.Generator().manual_seed(cfg.seed)
    with torch.random.fork_rng():
        torch.manual_seed(cfg.seed)
        head = AttentivePooler(x.shape[2], x.shape[1], num_classes, cfg.heads)
    optimiser = torch.optim.AdamW(head.parameters(), lr=cfg.lr, weight_decay=weight_decay)
    schedule = torch.optim.lr_scheduler.CosineAnnealingLR(optimiser, cfg.steps)
    head.train()
    order = torch.empty(0, dtype=torch.long)
    for _ in range(cfg.steps):
        if len(order) < min(cfg.batch_size, len(x)):
            order = torch.randperm(len(x), generator=generator)
        batch, order = order[:cfg.batch_size], order[cfg.batch_size:]
        loss = nn.functional.cross_entropy(head(x[batch]), y[batch])
        optimiser.zero_grad(set_to_none=True)
        loss.backward()
        optimiser.step()
        schedule.step()
    return head.eval()


def train_attentive_probe(train: FeatureSet, num_classes: int, cfg: AttentiveProbeConfig | None = None
                          ) -> AttentiveProbe:
    """Fit an :class:`AttentiveProbe` on the labelled token rows of ``train`` (``train.tokens()``)."""
    cfg = cfg or AttentiveProbeConfig()
    train = labelled_train_split(train, num_classes, "attentive probe train split")
    tokens, labels = train.tokens(), train.labels
    mean, scale = (stat.astype(np.float32) for stat in channel_stats(tokens, (0, 1)))
    x, y = _standardised(tokens, mean, scale), torch.from_numpy(labels)
    weight_decay, scores = cfg.weight_decay, {}
    if weight_decay is None:
        def score(wd: float, train_idx: np.ndarray, val_idx: np.ndarray) -> float:
            head = _fit_head(x[train_idx], y[train_idx], num_classes, wd, cfg)
            with torch.no_grad():
                return float((head(x[val_idx]).argmax(1) == y[val_idx]).float().mean())

        weight_decay, scores = choose_by_group_cv(cfg.wd_grid, score, labels, subject_groups(train), cfg.cv_folds)
    return AttentiveProbe(_fit_head(x, y, num_classes, weight_decay, cfg), mean, scale, num_classes, weight_decay,
                          scores)
