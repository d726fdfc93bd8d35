"""Token masks for masked video modelling.

Tokens are tubelets ordered (t, h, w) with t outermost, so a token grid is ``(T', H', W')`` =
``(frames // tubelet_frames, height // patch, width // patch)`` and token ``i`` sits at
``(i // (H'W'), (i // W') % H', i % W')``.

* ``encoder mask`` (True = hidden from the encoder): tube masking hides the same spatial positions in
  every time step, so the model cannot copy a patch from the neighbouring frame.
* ``decoder mask`` (True = a masked token the decoder reconstructs; VideoMAE V2 "dual masking"): the
  decoder only sees the visible tokens plus this subset of the masked ones, chosen with a running
  cell pattern so the kept positions move over time. Both masks have the same count in every sample,
  which lets a batch be gathered without padding.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache

import numpy as np


@dataclass(frozen=True)
class TokenGrid:
    """Token layout of one clip: ``t`` tubelet slots by ``h`` x ``w`` patches."""

    t: int
    h: int
    w: int

    @property
    def num_tokens(self) -> int:
        return self.t * self.h * self.w

    @classmethod
    def for_clip(cls, frames: int, height: int, width: int, tubelet_frames: int, patch: int) -> "TokenGrid":
        if frames % tubelet_frames or height % patch or width % patch:
            raise ValueError(
                f"clip {frames}x{height}x{width} is not divisible by tubelet {tubelet_frames}x{patch}x{patch}"
            )
        return cls(frames // tubelet_frames, height // patch, width // patch)


def num_masked(grid: TokenGrid, ratio: float) -> int:
    """Masked tokens per clip for a tube mask: whole tubes, so a multiple of ``grid.t``."""
    if not 0.0 <= ratio < 1.0:
        raise ValueError(f"mask ratio must be in [0, 1), got {ratio}")
    return int(round(ratio * grid.h * grid.w)) * grid.t


def tube_mask(grid: TokenGrid, ratio: float, rng: np.random.Generator) -> np.ndarray:
    """Bool (N,) with True on masked tokens; the same spatial positions are masked at every t."""
    spatial = grid.h * grid.w
    k = int(round(ratio * spatial))
    masked_spatial = np.zeros(spatial, dtype=bool)
    masked_spatial[rng.permutation(spatial)[:k]] = True
    return np.tile(masked_spatial, grid.t)


@lru_cache(maxsize=16)
def running_cell_keep(grid: TokenGrid, keep_ratio: float = 0.5) -> np.ndarray:
    """Bool (N,), read-only (one array per geometry, drawn for every clip): True where the running-cell
    pattern keeps a token for the decoder.

    Each 2x2 spatial cell keeps ``round(4 * keep_ratio)`` of its 4 positions; the kept positions shift
    by one cell slot per time step, so over time every position is reconstructed.
    """
    order = np.array([[0, 1], [3, 2]])  # clockwise walk through a 2x2 cell
    n_keep = int(round(4 * keep_ratio))
    slot = order[np.arange(grid.h)[:, None] % 2, np.arange(grid.w)[None, :] % 2]
    keep = ((slot[None] - np.arange(grid.t)[:, None, None]) % 4) < n_keep
    keep = keep.reshape(-1)
    keep.flags.writeable = False
    return keep


def decoder_mask(encoder_mask: np.ndarray, grid: TokenGrid, keep_ratio: float,
                 rng: np.random.Generator) -> np.ndarray:
    """Bool (N,): the masked tokens the decoder reconstructs, exactly ``round(n_masked*keep_ratio)``.

    Running-cell positions come first; ties are broken at random so the count is fixed per clip.
    """
    n_masked = int(encoder_mask.sum())
    n_keep = int(round(n_masked * keep_ratio))
    score = rng.random(grid.num_tokens) * 0.5
    score += running_cell_keep(grid, keep_ratio)
    score[~encoder_mask] = -1.0
    out = np.zeros(grid.num_tokens, dtype=bool)
    if n_keep:  # the n_keep best scores (distinct random floats: a set, so no full sort is needed)
        out[np.argpartition(score, -n_keep)[-n_keep:]] = True
    return out


@dataclass(frozen=True)
class MaskGenerator:
    """Draws (encoder_mask, decoder_mask) pairs for one clip geometry.

    ``decoder_keep_ratio=None`` disables decoder masking (the decoder reconstructs every masked
    token, ``decoder_mask == encoder_mask``).
    """

    grid: TokenGrid
    ratio: float = 0.9
    decoder_keep_ratio: float | None = None

    def __call__(self, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
        enc = tube_mask(self.grid, self.ratio, rng)
        if self.decoder_keep_ratio is None:
            return enc, enc.copy()
        return enc, decoder_mask(enc, self.grid, self.decoder_keep_ratio, rng)
