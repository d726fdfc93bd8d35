"""Linear probe on frozen features, MAE style: BatchNorm without affine parameters, then one Linear layer.

The BatchNorm (no learnable scale/shift) only standardises the features, so the classifier stays linear
in them; it makes one learning rate work for encoders whose feature scales differ wildly (random init vs
pretrained vs raw pixels), which keeps the comparison rows of a report fair.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from torch import nn

from mgfm.evaluate.featureset import FeatureError, FeatureSet


@dataclass
class ProbeConfig:
    epochs: int = 100
    batch_size: int = 256
    lr: float = 1e-2
    weight_decay: float = 1e-4
    # "none" | "balanced": cross-entropy weighted by inverse class frequency (long-tailed data)
    class_weighting: str = "none"
    seed: int = 0


class LinearProbe(nn.Module):
    """``(N, D)`` features -> ``(N, C)`` logits."""

    def __init__(self, dim: int, num_classes: int) -> None:
        super().__init__()
        self.norm = nn.BatchNorm1d(dim, affine=False, eps=1e-6)
        self.head = nn.Linear(dim, num_classes)
        nn.init.trunc_normal_(self.head.weight, std=0.01)
        nn.init.zeros_(self.head.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.norm(x))


def train_probe(train: FeatureSet, num_classes: int, cfg: ProbeConfig | None = None) -> LinearProbe:
    """Fit a :class:`LinearProbe` on the labelled rows of ``train``."""
    cfg = cfg or ProbeConfig()
    if cfg.class_weighting not in ("none", "balanced"):
        raise ValueError(f"probe class_weighting: expected 'none' or 'balanced', got {cfg.class_weighting!r}")
    train = train.labelled().require("probe train split")
    labels = torch.from_numpy(train.labels)
    if int(labels.max()) >= num_classes:
        raise FeatureError(f"probe train split: label {int(labels.max())} >= num_classes {num_classes}")
    if len(train) < 2:
        raise FeatureError("probe train split: needs at least 2 labelled clips")
    generator = torch.Generator().manual_seed(cfg.seed)
    torch.manual_seed(cfg.seed)
    probe = LinearProbe(train.dim, num_classes)
    weight = None
    if cfg.class_weighting == "balanced":
        counts = torch.bincount(labels, minlength=num_classes).float()
        weight = torch.where(counts > 0, counts.sum() / (num_classes * counts.clamp(min=1)), torch.zeros_like(counts))
    loss_fn = nn.CrossEntropyLoss(weight=weight)
    optimizer = torch.optim.AdamW(probe.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    x = torch.from_numpy(train.features)
    steps_per_epoch = max(1, -(-len(x) // cfg.batch_size))
    scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, cfg.epochs * steps_per_epoch)
    probe.train()
    for _ in range(cfg.epochs):
        order = torch.randperm(len(x), generator=generator)
        for start in range(0, len(x), cfg.batch_size):
            idx = order[start:start + cfg.batch_size]
            if len(idx) < 2:  # BatchNorm needs two samples
                continue
            loss = loss_fn(probe(x[idx]), labels[idx])
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            scheduler.step()
    return probe.eval()


@torch.no_grad()
def predict(probe: LinearProbe, features: FeatureSet) -> np.ndarray:
    """Logits ``(N, C)`` float32."""
    return probe(torch.from_numpy(features.features)).numpy()
