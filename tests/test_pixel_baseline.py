"""The raw-pixel baseline: feature shapes, per-video decoding, corrupt-video skipping, scoring."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest

from mgfm.evaluate.pixel_baseline import (clip_features, fit_and_score, mean_class_accuracy, motion_features,
                                          pixel_features, evenly_spaced)


def test_pixel_features_shape_range_and_sampling():
    frames = np.zeros((20, 48, 64, 3), np.uint8)
    frames[:, :, :, 0] = np.arange(20)[:, None, None] * 10  # red channel = 10 * frame number
    x = pixel_features(frames, n_frames=4, size=8)
    assert x.shape == (4 * 8 * 8 * 3,) and x.dtype == np.float32
    assert 0.0 <= x.min() and x.max() <= 1.0
    reds = x.reshape(4, 8, 8, 3)[:, 0, 0, 0] * 255
    assert np.allclose(reds, [0, 60, 130, 190], atol=1)  # frames 0, 6, 13, 19
    assert pixel_features(frames[:3]).shape == (8 * 16 * 16 * 3,)  # shorter than n_frames: repeats
    with pytest.raises(ValueError, match="T, H, W, 3"):
        pixel_features(np.zeros((4, 8, 8), np.uint8))
    assert list(evenly_spaced(10, 3)) == [0, 4, 9]


def test_motion_features_see_movement_not_appearance():
    still = np.full((10, 32, 32, 3), 200, np.uint8)
    assert motion_features(still).shape == (7 * 16 * 16,) and not motion_features(still).any()
    moving = still.copy()
    for t in range(10):
        moving[t, 8:16, 2 * t:2 * t + 8] = 0
    m = motion_features(moving)
    recoloured = moving // 2  # another look, same movement: the same map
    assert m.max() == pytest.approx(1.0) and np.allclose(m, motion_features(recoloured), atol=0.05)


def test_clip_features_decode_the_clip_span_and_skip_broken_videos(tiny_index, tmp_path):
    from conftest import read_time_code

    clips = list(tiny_index)
    broken = tmp_path / "broken.mp4"
    broken.write_bytes(b"not a video")
    clips.append(dataclasses.replace(clips[0], path=str(broken), clip_id="broken"))
    x, kept, skipped = clip_features(clips, n_frames=4, size=16, progress=False)
    assert skipped == 1 and len(kept) == len(clips) - 1 and x.shape == (len(kept), 4 * 16 * 16 * 3)
    for row, clip in zip(x, kept):
        frames = (row.reshape(4, 16, 16, 3) * 255).round().astype(np.uint8)
        want = clip.start_frame + evenly_spaced(clip.n_frames, 4)
        assert list(read_time_code(frames)) == list(want)


def test_scoring_on_separable_data_and_mean_class_accuracy():
    rng = np.random.default_rng(0)
    y = np.repeat([0, 1, 2], 20)
    x = rng.normal(0, 0.1, (60, 5)) + np.eye(3, 5)[y] * 3
    r = fit_and_score(x, y, x, y, c=1.0)
    assert r["top1"] == 1.0 and r["mean_class"] == 1.0 and r["n_test"] == 60
    assert mean_class_accuracy(np.array([0, 0, 0, 1]), np.array([0, 0, 0, 0])) == 0.5
