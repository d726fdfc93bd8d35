"""Multi-view evaluation: windows spread over the clip, features averaged over them."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import torch

from mgfm.data.sampling import sample_indices
from mgfm.data.stream import StreamConfig
from mgfm.evaluate.extract import encode_split, eval_stream_config


@pytest.mark.parametrize("policy", ["adaptive", "fixed", "uniform"])
def test_eval_windows_move_with_position(policy):
    first = sample_indices(100, 8, policy, 4, None, position=0.0)
    middle = sample_indices(100, 8, policy, 4, None)
    last = sample_indices(100, 8, policy, 4, None, position=1.0)
    assert first[0] <= middle[0] <= last[0] and first[0] < last[0]
    assert np.array_equal(middle, sample_indices(100, 8, policy, 4, None, position=0.5))
    assert last[-1] <= 99


def test_position_is_validated():
    with pytest.raises(ValueError, match="position"):
        sample_indices(10, 4, position=1.5)
    with pytest.raises(ValueError, match="eval_view"):
        StreamConfig(eval_views=2, eval_view=2)


def test_two_views_average_the_single_view_features(tiny_shards):
    cfg = eval_stream_config(StreamConfig(frames=4, img_size=32, stride_policy="fixed", stride=2), 2, 0)

    def features(video: torch.Tensor) -> torch.Tensor:  # a fixed, order-sensitive "encoder"
        weights = torch.arange(1, video.shape[1] + 1, dtype=video.dtype).view(1, -1, 1, 1, 1)
        return (video * weights).mean(dim=(2, 3, 4))

    both = encode_split(features, tiny_shards, "train", cfg, views=2, progress=False)
    view0 = encode_split(features, tiny_shards, "train", dataclasses.replace(cfg, eval_views=2, eval_view=0),
                         progress=False)
    view1 = encode_split(features, tiny_shards, "train", dataclasses.replace(cfg, eval_views=2, eval_view=1),
                         progress=False)
    assert both.clip_ids == view0.clip_ids == view1.clip_ids
    np.testing.assert_allclose(both.features, (view0.features + view1.features) / 2, rtol=1e-5, atol=1e-5)
    assert not np.allclose(view0.features, view1.features), "the two views must see different frames"
