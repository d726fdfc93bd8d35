"""Motion-map prediction from the pooled features of the unmasked clip (why: see docs/experiments.md "Why the tiny default starts from motion PCA").

Micro-gestures are small movements of specific body parts by people who look different; a frozen
encoder is only useful for them if its pooled clip feature says *where and when something moved*.
Masked reconstruction and clip contrast learn that too slowly for a CPU budget (measured: a tiny
encoder's linear probe stays at the majority class after 6 CPU-minutes), while a logistic regression
on plain frame differences reaches 59% on the synthetic benchmark. This term makes the encoder carry
that information itself: a linear head on the mean-pooled tokens of the *unmasked* clip (exactly the
feature the probe, retrieval and emotion heads read) regresses the clip's motion map, computed from
the input pixels with no label, like MaskFeat's HOG targets:

    grey_t = mean over channels of frame t (un-normalised, in [0, 1]), one frame per tubelet
    map    = avg_pool(|grey_t - grey_0|, grid x grid) for t = 1 .. T/tubelet - 1, divided by its max

The head is linear on purpose, so what it needs is linearly readable from the feature.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


def motion_map(video: torch.Tensor, tubelet: int, grid: int, mean: tuple[float, ...],
               std: tuple[float, ...], eps: float = 1e-6) -> torch.Tensor:
    """Where each clip moved, relative to its first frame.

    Args:
        video: ``(B, T, C, H, W)`` float, normalised with ``mean``/``std`` (one value per channel).
        tubelet: frames per token; one frame per tubelet is compared with the first.
        grid: the map's cells per side.

    Returns:
        ``(B, (T // tubelet - 1) * grid * grid)`` fp32 in [0, 1] (each clip scaled to max 1).
    """
    x = video[:, ::tubelet].float()
    c = x.shape[2]
    std_c = torch.tensor(std, dtype=x.dtype, device=x.device).view(1, 1, c, 1, 1)
    mean_c = torch.tensor(mean, dtype=x.dtype, device=x.device).view(1, 1, c, 1, 1)
    grey = (x * std_c + mean_c).mean(dim=2)  # (B, T', H, W)
    diff = (grey[:, 1:] - grey[:, :1]).abs()
    cells = F.adaptive_avg_pool2d(diff, grid).flatten(1)
    return cells / (cells.amax(dim=1, keepdim=True) + eps)


class MotionMapHead(nn.Module):
    """Linear map from pooled clip features ``(B, D)`` to a motion map; the loss is scale-free MSE."""

    def __init__(self, dim: int, frames: int, tubelet: int, grid: int) -> None:
        super().__init__()
        if frames // tubelet < 2:
            raise ValueError(f"loss.motion_map_weight needs at least 2 tubelets per clip, got "
                             f"frames={frames}, tubelet={tubelet}")
        self.tubelet, self.grid = tubelet, grid
        self.head = nn.Linear(dim, (frames // tubelet - 1) * grid * grid)

    def forward(self, features: torch.Tensor, video: torch.Tensor, mean: tuple[float, ...],
                std: tuple[float, ...]) -> torch.Tensor:
        """Pooled features ``(B, D)`` of ``video`` ``(B, T, C, H, W)`` -> scalar loss.

        MSE divided by the batch's mean squared target, so the term starts near 1 whatever the grid or
        the amount of motion, and a constant prediction cannot score well.
        """
        with torch.no_grad():
            target = motion_map(video, self.tubelet, self.grid, mean, std)
        pred = self.head(features).float()
        return F.mse_loss(pred, target) / target.pow(2).mean().clamp(min=1e-6)
