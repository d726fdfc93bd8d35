"""stream.cache=memory: a split decoded once and replayed gives the samples, masks and skip records that
streaming gives for the same seed, for one set, a mixture, several ranks and damaged shards."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest
import torch
from test_stream import corrupt_copy, small_cfg

from mgfm.data.stream import MemoryClips, make_loader
from mgfm.errors import InputError
from mgfm.shards.read import Mixture


def batches(source, split, cfg, memory=None, epoch=0, rank=0, world=1):
    loader, skips = make_loader(source, split, cfg, mode="train", epoch=epoch, rank=rank, world=world, memory=memory)
    return list(loader), skips


def assert_same(a: list[dict], b: list[dict]) -> None:
    assert len(a) == len(b) > 0
    for x, y in zip(a, b):
        assert x["clip_id"] == y["clip_id"]
        assert torch.equal(x["video"], y["video"])
        assert torch.equal(x["encoder_mask"], y["encoder_mask"]) and torch.equal(x["decoder_mask"], y["decoder_mask"])
        assert torch.equal(x["label"], y["label"])


@pytest.mark.parametrize("epoch", [0, 3])
def test_memory_cache_gives_the_streamed_samples_for_the_same_seed(tiny_shards, epoch):
    cfg = small_cfg(repeats=2, batches_per_epoch=6, mask_ratio=0.5, decoder_keep_ratio=0.5, flip=True,
                    video_dtype="uint8")
    streamed, _ = batches(tiny_shards, "train", cfg, epoch=epoch)
    memory = MemoryClips.load(tiny_shards, "train", cfg, progress=False)
    assert memory.clips == 6 and memory.nbytes > 0
    cached, skips = batches(tiny_shards, "train", dataclasses.replace(cfg, cache="memory"), memory, epoch=epoch)
    assert_same(streamed, cached)
    assert skips.total == 0
    # the cache is reused across epochs: another epoch is another draw, as when streaming
    again, _ = batches(tiny_shards, "train", cfg, memory, epoch=epoch + 1)
    assert [b["clip_id"] for b in again] != [b["clip_id"] for b in cached] or not torch.equal(
        again[0]["video"], cached[0]["video"])


def test_memory_cache_builds_itself_from_the_config(tiny_shards):
    cfg = small_cfg(batches_per_epoch=3, cache="memory")
    loader, _ = make_loader(tiny_shards, "train", cfg, mode="train", rank=0, world=1)
    assert loader.dataset.memory is not None and len(list(loader)) == 3


def test_memory_cache_keeps_the_rank_split_and_the_mixture_proportions(tiny_shards):
    mixture = Mixture((str(tiny_shards), str(tiny_shards)), (3.0, 1.0))
    cfg = small_cfg(batches_per_epoch=8, shuffle_buffer=1)
    memory = MemoryClips.load(mixture, "train", cfg, progress=False)
    for rank in range(2):
        streamed, _ = batches(mixture, "train", cfg, rank=rank, world=2)
        cached, _ = batches(mixture, "train", cfg, memory, rank=rank, world=2)
        assert_same(streamed, cached)


def test_memory_cache_replays_bad_samples_and_broken_shards_as_skips(tiny_shards, tmp_path):
    garbled, truncated = corrupt_copy(tiny_shards, tmp_path / "bad")
    cfg = small_cfg(batches_per_epoch=4)
    streamed, streamed_skips = batches(tmp_path / "bad", "test", cfg)
    memory = MemoryClips.load(tmp_path / "bad", "test", cfg, progress=False)
    cached, cached_skips = batches(tmp_path / "bad", "test", cfg, memory)
    assert_same(streamed, cached)
    assert cached_skips.by_reason == streamed_skips.by_reason and cached_skips.samples == streamed_skips.samples
    assert garbled not in {c for b in cached for c in b["clip_id"]}


def test_memory_cache_over_its_budget_is_one_error_saying_how_big_the_set_is(tiny_shards):
    cfg = small_cfg(cache_max_gb=1e-6)
    with pytest.raises(InputError, match=r"needs 0\.\d GB for 6 clips, over stream.cache_max_gb=1e-06"):
        MemoryClips.load(tiny_shards, "train", cfg, progress=False)


def test_the_memory_cache_benchmark_runs(tmp_path):
    import subprocess
    import sys

    from conftest import subprocess_env

    repo = Path(__file__).resolve().parents[1]
    done = subprocess.run([sys.executable, "benchmarks/bench_memory_cache.py", "--clips", "8", "--batch", "2",
                           "--batches", "2", "--rounds", "2", "--img-size", "64", "--frames", "4"], cwd=repo,
                          env=subprocess_env(), capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "memory / streamed:" in done.stdout and "8 clips decoded once" in done.stdout
