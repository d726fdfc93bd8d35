"""Tube masks and running-cell decoder masks: counts, tube structure, subsets."""

from __future__ import annotations

import numpy as np
import pytest

from mgfm.data.masking import MaskGenerator, TokenGrid, num_masked, running_cell_keep


def test_grid_from_clip():
    grid = TokenGrid.for_clip(16, 112, 96, tubelet_frames=2, patch=16)
    assert (grid.t, grid.h, grid.w, grid.num_tokens) == (8, 7, 6, 336)
    with pytest.raises(ValueError, match="not divisible"):
        TokenGrid.for_clip(15, 112, 112, 2, 16)


def test_tube_mask_hides_same_positions_every_step():
    grid = TokenGrid(8, 7, 7)
    enc, dec = MaskGenerator(grid, 0.9)(np.random.default_rng(0))
    per_t = enc.reshape(grid.t, -1)
    assert (per_t == per_t[0]).all()
    assert enc.sum() == num_masked(grid, 0.9) == 44 * 8
    assert np.array_equal(enc, dec)


def test_decoder_mask_is_subset_with_fixed_count():
    grid = TokenGrid(8, 7, 7)
    gen = MaskGenerator(grid, 0.9, decoder_keep_ratio=0.5)
    counts = set()
    for seed in range(5):
        enc, dec = gen(np.random.default_rng(seed))
        assert not (dec & ~enc).any()
        counts.add(int(dec.sum()))
    assert counts == {176}


def test_decoder_takes_the_running_cell_positions_first():
    grid = TokenGrid(8, 14, 14)
    cell = running_cell_keep(grid, 0.5)
    for ratio, keep in ((0.9, 0.5), (0.5, 0.75), (0.9, 0.25)):
        gen = MaskGenerator(grid, ratio, decoder_keep_ratio=keep)
        for seed in range(5):
            enc, dec = gen(np.random.default_rng(seed))
            cell_masked = enc & cell
            if (dec & ~cell).any():  # reaching beyond the cell pattern only once all of it is taken
                assert (dec[cell_masked]).all()
            else:
                assert dec.sum() <= cell_masked.sum()
            assert dec.sum() == round(enc.sum() * keep) and not (dec & ~enc).any()
    with pytest.raises(ValueError):  # one shared array per geometry: callers cannot change it
        cell[0] = not cell[0]


def test_running_cell_moves_over_time_and_covers_everything():
    grid = TokenGrid(4, 4, 4)
    keep = running_cell_keep(grid, 0.5).reshape(4, 4, 4)
    assert keep.sum(axis=(1, 2)).tolist() == [8, 8, 8, 8]
    assert not np.array_equal(keep[0], keep[1])
    assert keep.any(axis=0).all()


def test_mask_ratio_validated():
    with pytest.raises(ValueError):
        num_masked(TokenGrid(1, 2, 2), 1.0)
