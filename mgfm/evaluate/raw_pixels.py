"""The raw-pixel reference, defined once: the ``raw pixels`` row of every report (linear / attentive probe,
k-means, retrieval, emotion, the learning curves of ``experiments/``) and the synthetic benchmark's figure.

It answers "how much of the task do a clip's pixels give without any learned representation?": the eval
stream's clip (the encoder's frames and crop, normalised like its input), a few evenly spaced frames, each
average-pooled to a tiny image, read by the same probe as the encoders.
"""

from __future__ import annotations

import torch
from torch import nn

ROW = "raw pixels"  # its row in every report


class PixelEncoder(nn.Module):
    """The raw-pixel reference: each of ``frames`` evenly spaced frames average-pooled to ``size x size``.

    ``features``: ``(B, T, C, H, W)`` -> ``(B, frames * C * size * size)``.
    """

    # 8 x 3 x 4 x 4 = 384 values: enough to show what appearance alone gives, small enough that the
    # probe's cross-validated logistic regression stays seconds, not minutes.
    def __init__(self, frames: int = 8, size: int = 4) -> None:
        super().__init__()
        self.frames, self.size = frames, size

    @property
    def encoder_id(self) -> str:
        """What names these features in a feature cache's key."""
        return f"pixels:{self.frames}x{self.size}"

    @torch.no_grad()
    def features(self, video: torch.Tensor) -> torch.Tensor:
        b, t, c, h, w = video.shape
        index = torch.linspace(0, t - 1, min(self.frames, t)).round().long()
        frames = video[:, index].reshape(-1, c, h, w)
        pooled = nn.functional.adaptive_avg_pool2d(frames, self.size)
        return pooled.reshape(b, -1)

    @torch.no_grad()
    def pooled_tokens(self, video: torch.Tensor, grid: tuple[int, int, int] | None = None) -> torch.Tensor:
        """The same values as :meth:`features`, one token per sampled frame (its ``C x size x size`` image):
        ``(B, T, C, H, W)`` -> ``(B, frames, C * size * size)``. ``grid`` is an encoder's token grid and
        does not apply to pixels (accepted so both kinds of encoder are called alike)."""
        return self.features(video).reshape(len(video), min(self.frames, video.shape[1]), -1)
