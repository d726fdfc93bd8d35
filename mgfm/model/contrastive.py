"""Clip-level contrast added to masked reconstruction (why: see docs/experiments.md "Why the tiny default starts from motion PCA").

Masked reconstruction alone gives features a linear probe uses poorly (VideoMAE's own SSv2 probe is
~35-39%). With repeated sampling every clip appears K times in a batch (different crops, temporal
windows and masks); this head pulls the pooled encodings of a clip's views together and pushes other
clips away (multi-positive InfoNCE, as in SupCon with clip identity as the only "label"). Batches are
drawn from a small shuffle buffer over shards written video by video, so many negatives are other
clips of the same video: same person, same background, different movement. Telling those apart needs
the pose and motion of the gesture, which is what recognition needs, not the appearance of the subject.
No class label is used.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class ClipContrast(nn.Module):
    """Projection MLP + multi-positive InfoNCE over the views of each clip in a batch."""

    def __init__(self, dim: int, proj_dim: int = 128, hidden: int = 512, temperature: float = 0.1) -> None:
        super().__init__()
        self.proj = nn.Sequential(nn.Linear(dim, hidden), nn.GELU(), nn.Linear(hidden, proj_dim))
        self.temperature = temperature

    def forward(self, tokens: torch.Tensor, group: torch.Tensor) -> torch.Tensor:
        """``tokens`` ``(B, n, D)`` encoder outputs of each row's visible tokens; ``group`` int ``(B,)``:
        rows with the same id are views of one clip. Returns the scalar loss (0 when no row has a
        positive partner)."""
        z = F.normalize(self.proj(tokens.mean(dim=1)).float(), dim=-1)
        logits = z @ z.t() / self.temperature
        eye = torch.eye(len(z), dtype=torch.bool, device=z.device)
        logits = logits.masked_fill(eye, float("-inf"))
        positive = (group[:, None] == group[None, :]) & ~eye
        has_positive = positive.any(dim=1)
        if not has_positive.any():
            return logits.new_zeros(())
        log_prob = logits.log_softmax(dim=1)
        pos_log_prob = log_prob.masked_fill(~positive, 0.0).sum(dim=1) / positive.sum(dim=1).clamp(min=1)
        return -pos_log_prob[has_positive].mean()


def group_ids(clip_ids: list[str], device: torch.device | str = "cpu") -> torch.Tensor:
    """int64 ``(B,)``: the same id for rows of the same clip (in order of first appearance)."""
    first: dict[str, int] = {}
    return torch.tensor([first.setdefault(c, len(first)) for c in clip_ids], dtype=torch.long, device=device)
