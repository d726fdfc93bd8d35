"""Clip stream: sampling, transforms, shard assignment, train/eval loaders, corrupt data, remote
sources, and a real two-process distributed evaluation."""

from __future__ import annotations

import collections
import functools
import http.server
import io
import json
import os
import shutil
import socket
import subprocess
import sys
import tarfile
import textwrap
import threading
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import TINY_CLIPS, read_tar, read_time_code

from mgfm.data.stream import Slot
from mgfm.runtime import rank_world
from mgfm.data.sampling import sample_indices
from mgfm.data.transforms import IMAGENET_MEAN, IMAGENET_STD
from mgfm.data.stream import ShardTask, StreamConfig, assign_shards, make_loader, split_tasks
from mgfm.shards.read import ShardRef, resolve_shards
from mgfm.sources.video_io import decode_frames
from mgfm.data.transforms import (CropBox, centre_crop_box, crop_resize, crop_resize_planar, multiscale_crop_box,
                                  normalise, normalise_into, to_planar)
from mgfm.shards import BuildConfig, build_shards

TRAIN_KEYS = sorted(f"{v}_{s:07d}_{e:07d}" for v, s, e, _ in TINY_CLIPS if v in ("v0", "v1"))
TEST_KEYS = sorted(f"{v}_{s:07d}_{e:07d}" for v, s, e, _ in TINY_CLIPS if v in ("v2", "v3"))


def small_cfg(**kw) -> StreamConfig:
    base = dict(frames=8, img_size=32, patch=16, tubelet=2, batch_size=2, num_workers=0, shuffle_buffer=4)
    base.update(kw)
    return StreamConfig(**base)


def eval_keys(source, split="test", **kw) -> tuple[list[str], object]:
    loader, skips = make_loader(source, split, small_cfg(**kw), mode="eval", rank=0, world=1)
    keys = [k for batch in loader for k in batch["clip_id"]]
    return keys, skips


# ------------------------------------------------------------------------------------ sampling


def test_adaptive_sampling_fits_short_clips():
    rng = np.random.default_rng(0)
    idx = sample_indices(40, 16, "adaptive", 4, rng)  # median iMiGUE clip: stride 2
    assert len(idx) == 16 and set(np.diff(idx)) == {2} and idx[0] >= 0 and idx[-1] < 40
    long = sample_indices(400, 16, "adaptive", 4, None)
    assert set(np.diff(long)) == {4} and long[0] == (400 - 61) // 2  # eval: centred, stride capped
    assert sample_indices(40, 16, "adaptive", 4, None).tolist() == sample_indices(40, 16, "adaptive", 4, None).tolist()
    short = sample_indices(5, 16, "adaptive", 4, rng)  # shorter than the clip: repeat, in order
    assert short.tolist() == sorted(short.tolist()) and set(short.tolist()) == {0, 1, 2, 3, 4}
    assert sample_indices(5, 8, pad="loop").tolist() == [0, 1, 2, 3, 4, 0, 1, 2]
    assert sample_indices(5, 8, pad="last").tolist() == [0, 1, 2, 3, 4, 4, 4, 4]
    fixed = sample_indices(20, 8, "fixed", 4, None)  # stride 4 does not fit 20 frames: largest that does
    assert set(np.diff(fixed)) == {2} and fixed[-1] < 20
    uni = sample_indices(64, 8, "uniform", 4, rng)
    assert all(8 * k <= i < 8 * (k + 1) for k, i in enumerate(uni))
    for n in range(1, 60):
        for policy in ("adaptive", "fixed", "uniform"):
            got = sample_indices(n, 16, policy, 4, rng)
            assert len(got) == 16 and got.min() >= 0 and got.max() < n and np.all(np.diff(got) >= 0)


# ---------------------------------------------------------------------------------- transforms


def test_crops_resize_and_normalise():
    rng = np.random.default_rng(1)
    frames = np.zeros((4, 48, 64, 3), dtype=np.uint8)
    frames[:, :, :32] = 200  # left half bright
    for _ in range(20):
        box = multiscale_crop_box(48, 64, (1.0, 0.875, 0.75, 0.66), rng)
        assert 0 <= box.y and box.y + box.h <= 48 and 0 <= box.x and box.x + box.w <= 64
        assert min(box.h, box.w) >= round(48 * 0.66) and not box.flip
    assert centre_crop_box(48, 64) == CropBox(0, 8, 48, 48)
    out = crop_resize(frames, CropBox(0, 0, 48, 32), 16)
    assert out.shape == (4, 16, 16, 3) and out.min() == 200
    flipped = crop_resize(frames, CropBox(0, 16, 48, 32, flip=True), 16)
    assert flipped[0, 0, -1, 0] == 200 and flipped[0, 0, 0, 0] == 0
    assert crop_resize(frames, CropBox(0, 0, 48, 48), 24).shape == (4, 24, 24, 3)  # shrinking 2x: area
    noisy = np.random.default_rng(3).integers(0, 256, (5, 48, 64, 3), dtype=np.uint8)
    for box in (CropBox(3, 7, 40, 36), CropBox(0, 8, 48, 48, flip=True), CropBox(8, 8, 32, 32)):
        picks = [4, 0, 2]
        planar = crop_resize_planar(noisy, box, 32, np.empty((3, 3, 32, 32), np.uint8), picks)
        assert np.array_equal(planar, to_planar(crop_resize(noisy[picks], box, 32)))
    x = normalise(torch.from_numpy(out).permute(0, 3, 1, 2), IMAGENET_MEAN, IMAGENET_STD)
    assert x.shape == (4, 3, 16, 16) and x.dtype == torch.float32
    expected = (200 / 255 - np.array(IMAGENET_MEAN)) / np.array(IMAGENET_STD)
    assert np.allclose(x[0, :, 0, 0].numpy(), expected, atol=1e-5)
    noisy = np.random.default_rng(2).integers(0, 256, (2, 4, 8, 10, 3), dtype=np.uint8)
    planar = np.stack([to_planar(clip) for clip in noisy])
    assert planar.shape == (2, 4, 3, 8, 10) and planar.flags.c_contiguous
    out = normalise_into(planar, np.empty(planar.shape, np.float32), IMAGENET_MEAN, IMAGENET_STD)
    for k in range(2):
        assert np.allclose(out[k], normalise(torch.from_numpy(noisy[k]).permute(0, 3, 1, 2), IMAGENET_MEAN, IMAGENET_STD).numpy(), atol=1e-5)
    assert np.allclose(normalise(torch.from_numpy(planar), IMAGENET_MEAN, IMAGENET_STD).numpy(), out, atol=1e-5)


# ---------------------------------------------------------------------------------- assignment


@pytest.mark.parametrize("n_shards", [1, 2, 3, 5, 8])
@pytest.mark.parametrize("world,workers", [(1, 1), (1, 3), (2, 2), (3, 2), (4, 1)])
def test_assignment_covers_every_sample_exactly_once(n_shards, world, workers):
    sizes = [5 + 3 * i for i in range(n_shards)]
    shards = [ShardRef(f"s{i}.tar", n) for i, n in enumerate(sizes)]
    for mode in ("eval", "train"):
        seen = collections.Counter()
        rank_shards: list[set[str]] = []
        for rank in range(world):
            urls = set()
            for worker in range(workers):
                for task in assign_shards(shards, Slot(rank, world, worker, workers), mode, seed=3, epoch=1):
                    n = task.shard.samples
                    kept = [k for k in range(n) if k % task.mod == task.rem]
                    assert len(kept) == task.expected
                    seen.update((task.shard.url, k) for k in kept)
                    urls.add(task.shard.url)
            rank_shards.append(urls)
        assert seen == collections.Counter((f"s{i}.tar", k) for i, n in enumerate(sizes) for k in range(n)), mode
        if n_shards >= world:  # ranks read disjoint shards
            assert sum(len(u) for u in rank_shards) == len(set().union(*rank_shards)) == n_shards


def test_split_tasks_balances_by_sample_count():
    tasks = [ShardTask(ShardRef(f"s{i}", n)) for i, n in enumerate([100, 10, 10, 10, 10, 90])]
    loads = [sum(t.expected for t in split_tasks(tasks, 2, g)) for g in range(2)]
    assert sorted(loads) == [110, 120]


def test_rank_world_prefers_env_then_default(monkeypatch):
    monkeypatch.delenv("RANK", raising=False)
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    assert rank_world() == (0, 1)
    monkeypatch.setenv("RANK", "1")
    monkeypatch.setenv("WORLD_SIZE", "3")
    assert rank_world() == (1, 3)


# -------------------------------------------------------------------------------------- loaders


def test_eval_stream_yields_every_clip_once_with_metadata(tiny_shards, tiny_index):
    loader, skips = make_loader(tiny_shards, "test", small_cfg(decoder_keep_ratio=0.5), mode="eval", rank=0, world=1)
    assert len(loader) == 3  # one reader, two shards of 3 clips, batches of 2
    batches = list(loader)
    assert len(batches) == 3
    keys = [k for b in batches for k in b["clip_id"]]
    assert sorted(keys) == TEST_KEYS and skips.total == 0
    by_id = {c.clip_id: c for c in tiny_index}
    grid_tokens = (8 // 2) * (32 // 16) ** 2
    for b in batches:
        n = len(b["clip_id"])
        assert b["video"].shape == (n, 8, 3, 32, 32) and b["video"].dtype == torch.float32
        assert b["encoder_mask"].shape == b["decoder_mask"].shape == (n, grid_tokens)
        assert b["encoder_mask"].dtype == torch.bool
        assert (b["encoder_mask"].sum(1) == 4 * round(0.9 * 4)).all()  # whole tubes
        assert (b["decoder_mask"].sum(1) == round(0.5 * 4 * round(0.9 * 4))).all()
        assert (b["decoder_mask"] & ~b["encoder_mask"]).sum() == 0
        for i, key in enumerate(b["clip_id"]):
            assert b["label"][i].item() == by_id[key].label == b["meta"][i]["label"]
            assert b["meta"][i]["n_frames"] == by_id[key].n_frames
    # deterministic: a second pass gives the same order, frames and masks
    again = list(make_loader(tiny_shards, "test", small_cfg(decoder_keep_ratio=0.5), mode="eval", rank=0, world=1)[0])
    assert [b["clip_id"] for b in again] == [b["clip_id"] for b in batches]
    assert all(torch.equal(a["video"], b["video"]) and torch.equal(a["encoder_mask"], b["encoder_mask"])
               for a, b in zip(again, batches))


def test_eval_frames_are_the_sampled_source_frames(tiny_shards):
    cfg = small_cfg(masks=False, batch_size=1)
    loader, _ = make_loader(tiny_shards, "train", cfg, mode="eval", rank=0, world=1)
    mp4s = {key: m["mp4"] for path in tiny_shards.glob("train-*.tar") for key, m in read_tar(path).items()}
    n = 0
    for batch in loader:
        assert "encoder_mask" not in batch
        meta = batch["meta"][0]
        picks = sample_indices(meta["n_frames"], 8, "adaptive", 4, None)
        frames = decode_frames(mp4s[batch["clip_id"][0]], picks.tolist(), backend="pyav")
        assert read_time_code(frames).tolist() == (meta["start_frame"] + picks).tolist()
        expected = normalise(torch.from_numpy(crop_resize(frames, centre_crop_box(32, 42), 32)).permute(0, 3, 1, 2), IMAGENET_MEAN,
                             IMAGENET_STD)
        assert torch.allclose(batch["video"][0], expected, atol=1e-6)
        n += 1
    assert n == len(TRAIN_KEYS)


def test_uint8_video_normalised_later_equals_float_video(tiny_shards):
    floats = list(make_loader(tiny_shards, "test", small_cfg(), mode="eval", rank=0, world=1)[0])
    raw = list(make_loader(tiny_shards, "test", small_cfg(video_dtype="uint8"), mode="eval", rank=0, world=1)[0])
    for f, r in zip(floats, raw):
        assert r["video"].dtype == torch.uint8 and r["video"].shape == f["video"].shape
        assert torch.allclose(normalise(r["video"], IMAGENET_MEAN, IMAGENET_STD), f["video"], atol=1e-5)


@pytest.mark.slow  # DataLoader worker processes
def test_eval_with_workers_is_exact_and_deterministic(tiny_shards):
    keys, skips = eval_keys(tiny_shards, "train", num_workers=2)
    again, _ = eval_keys(tiny_shards, "train", num_workers=2)
    assert sorted(keys) == TRAIN_KEYS and keys == again and skips.total == 0


@pytest.mark.slow  # DataLoader worker processes
def test_train_stream_fixed_batches_repeats_and_fresh_masks(tiny_shards):
    cfg = small_cfg(repeats=2, batches_per_epoch=5, num_workers=2, mask_ratio=0.5, decoder_keep_ratio=0.5, flip=True)
    loader, skips = make_loader(tiny_shards, "train", cfg, mode="train", epoch=0, rank=0, world=1)
    batches = list(loader)
    assert len(loader) == len(batches) == 5 and skips.total == 0
    for b in batches:
        assert b["video"].shape == (4, 8, 3, 32, 32)
        ids = b["clip_id"]
        assert ids[0] == ids[1] and ids[2] == ids[3]  # K=2 views of each decoded clip, side by side
        assert set(ids) <= set(TRAIN_KEYS)
    masks = torch.cat([b["encoder_mask"] for b in batches])
    assert len({tuple(m.tolist()) for m in masks}) > 1
    # epoch reseeds the order; a default batches_per_epoch comes from the manifest
    other = small_cfg(num_workers=0)
    order0 = [b["clip_id"] for b in make_loader(tiny_shards, "train", other, "train", epoch=0, rank=0, world=1)[0]]
    order1 = [b["clip_id"] for b in make_loader(tiny_shards, "train", other, "train", epoch=1, rank=0, world=1)[0]]
    assert len(order0) == 6 // 2 and order0 != order1


@pytest.mark.slow  # DataLoader worker processes
def test_train_ranks_read_disjoint_shards(tiny_index, tmp_path, monkeypatch):
    build_shards(tiny_index, tmp_path, BuildConfig(short_side=32, shard_samples=1, crf=12, splits=("train",)))
    seen = []
    for rank in range(2):
        monkeypatch.setenv("RANK", str(rank))
        monkeypatch.setenv("WORLD_SIZE", "2")
        loader, _ = make_loader(tmp_path, "train", small_cfg(batches_per_epoch=6, num_workers=2), mode="train")
        assert loader.dataset.rank == rank and loader.dataset.world == 2
        seen.append({m["shard"] for b in loader for m in b["meta"]})
    assert seen[0] and seen[1] and not seen[0] & seen[1]
    assert len(seen[0] | seen[1]) == 6


@pytest.fixture(scope="module")
def one_clip_shards(tiny_index, tmp_path_factory) -> Path:
    """The 6 train clips of the tiny index, one per shard (uneven splits over ranks and workers)."""
    out = tmp_path_factory.mktemp("one_clip_shards")
    build_shards(tiny_index, out, BuildConfig(short_side=32, shard_samples=1, crf=12, splits=("train",)))
    return out


def _epoch_clips(source, epoch: int, world: int, workers: int, batch_size: int, seed: int = 0) -> list[list[str]]:
    """Each rank's clip ids of one train epoch, in the order its loader gives them."""
    cfg = small_cfg(num_workers=workers, batch_size=batch_size, seed=seed)
    return [[c for b in make_loader(source, "train", cfg, "train", epoch=epoch, rank=r, world=world)[0]
             for c in b["clip_id"]] for r in range(world)]


@pytest.mark.parametrize("world,workers,batch_size", [(1, 0, 2), (2, 0, 1), (2, 2, 1), (1, 2, 2)])
def test_a_train_epoch_reads_every_clip_at_most_once_across_ranks_and_workers(one_clip_shards, world, workers,
                                                                              batch_size):
    for epoch in range(2):
        per_rank = _epoch_clips(one_clip_shards, epoch, world, workers, batch_size)
        seen = [c for clips in per_rank for c in clips]
        assert len(seen) == len(set(seen)), f"epoch {epoch}: a clip was read twice"
        # every rank the same number of batches; only clips past a rank's last whole batch wait
        assert {len(clips) for clips in per_rank} == {6 // world // batch_size * batch_size}
        assert set(seen) <= set(TRAIN_KEYS) and len(TRAIN_KEYS) - len(seen) < world * batch_size
    assert _epoch_clips(one_clip_shards, 0, 1, 0, 2) != _epoch_clips(one_clip_shards, 1, 1, 0, 2)
    assert _epoch_clips(one_clip_shards, 0, 1, 0, 2, seed=0) != _epoch_clips(one_clip_shards, 0, 1, 0, 2, seed=3)


def _batches(loader, n: int | None = None) -> list[tuple]:
    """(clip ids, frames bytes, masks) of the next ``n`` batches (all with None)."""
    out = []
    for batch in loader:
        out.append((batch["clip_id"], batch["video"].numpy().tobytes(), batch["encoder_mask"].numpy().tobytes()))
        if n is not None and len(out) == n:
            break
    return out


@pytest.mark.parametrize("workers", [0, pytest.param(2, marks=pytest.mark.slow)])
def test_a_train_loader_resumes_mid_epoch_with_the_batches_it_would_have_given(one_clip_shards, workers):
    cfg = small_cfg(num_workers=workers, batch_size=1, repeats=2, flip=True, mask_ratio=0.5, video_dtype="uint8")
    whole = _batches(make_loader(one_clip_shards, "train", cfg, "train", epoch=2, rank=0, world=1)[0])
    assert len(whole) == 6
    for taken in (1, 3, 4):
        first, _ = make_loader(one_clip_shards, "train", cfg, "train", epoch=2, rank=0, world=1)
        head = _batches(first, taken)
        state = first.state_dict()
        again, _ = make_loader(one_clip_shards, "train", cfg, "train", epoch=2, rank=0, world=1)
        again.load_state_dict(state)
        assert head + _batches(again) == whole, f"resumed after {taken} batches"


# -------------------------------------------------------------------------------------- failures


def corrupt_copy(tiny_shards: Path, dest: Path) -> tuple[str, str]:
    """Copy the shard set; garble one mp4 in test-000000 and cut test-000001 in the middle of its
    second sample's mp4. Returns (garbled key, the key whose mp4 is cut)."""
    shutil.copytree(tiny_shards, dest)
    first = dest / "test-000000.tar"
    with tarfile.open(first) as tar:
        members = [(m, tar.extractfile(m).read()) for m in tar]
    garbled = members[0][0].name.split(".")[0]
    with tarfile.open(first, "w") as tar:
        for member, data in members:
            if member.name == f"{garbled}.mp4":
                data = b"\x00\x01garbage" * 40
                member.size = len(data)
            tar.addfile(member, io.BytesIO(data))
    second = dest / "test-000001.tar"
    with tarfile.open(second) as tar:
        offsets = [(m.name, m.offset_data, m.size) for m in tar]
    name, offset, size = [o for o in offsets if o[0].endswith(".mp4")][1]
    with open(second, "r+b") as handle:
        handle.truncate(offset + size // 2)
    return garbled, name.split(".")[0]


@pytest.mark.parametrize("workers", [0, pytest.param(2, marks=pytest.mark.slow)])
def test_stream_survives_corrupt_sample_and_truncated_tar(tiny_shards, tmp_path, caplog, workers):
    garbled, truncated = corrupt_copy(tiny_shards, tmp_path / "bad")
    keys, skips = eval_keys(tmp_path / "bad", "test", num_workers=workers)
    lost = {garbled, truncated, TEST_KEYS[-1]}  # the last sample of the cut shard is gone entirely
    assert sorted(keys) == sorted(set(TEST_KEYS) - lost)
    assert skips.samples == 3 and skips.shard_errors == 1  # every sample accounted for
    assert [r["key"] for r in skips.records if r["kind"] == "sample"].count(garbled) == 1
    assert skips.by_reason["decode error"] == 1 and skips.by_reason["lost in broken shard"] == 2
    assert "skipped 3 samples and 1 broken shards" in caplog.text

    # training keeps going around the broken data for the requested number of batches
    cfg = small_cfg(batches_per_epoch=4, num_workers=workers)
    loader, train_skips = make_loader(tmp_path / "bad", "test", cfg, mode="train", rank=0, world=1)
    assert len(list(loader)) == 4 and train_skips.total >= 1


def test_all_broken_training_stream_ends_instead_of_spinning(tmp_path):
    bad = tmp_path / "train-000000.tar"
    bad.write_bytes(b"not a tar at all" * 10)
    loader, skips = make_loader([str(bad)], "train", small_cfg(batches_per_epoch=3), mode="train", rank=0, world=1)
    assert list(loader) == [] and skips.shard_errors >= 1


# ---------------------------------------------------------------------------------------- sources


@pytest.fixture
def http_root(tiny_shards):
    handler = functools.partial(QuietHandler, directory=str(tiny_shards))
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_address[1]}/"
    server.shutdown()
    server.server_close()


class QuietHandler(http.server.SimpleHTTPRequestHandler):
    def log_message(self, *args) -> None:
        pass


@pytest.mark.skipif(shutil.which("curl") is None, reason="webdataset opens http(s) URLs with curl")
def test_remote_http_manifest_and_brace_pattern(http_root):
    keys, skips = eval_keys(http_root, "test")
    assert sorted(keys) == TEST_KEYS and skips.total == 0
    refs = resolve_shards(http_root, "test")
    assert [r.url for r in refs] == [http_root + "test-000000.tar", http_root + "test-000001.tar"]
    assert [r.samples for r in refs] == [3, 3]
    keys, _ = eval_keys(http_root + "{split}-{000000..000001}.tar", "train")
    assert sorted(keys) == TRAIN_KEYS
    missing, skips = eval_keys(http_root + "test-00000{0,7}.tar", "test")  # one URL 404s: counted, not fatal
    assert len(missing) == 3 and skips.shard_errors == 1


def test_pipe_sources_and_s3_rewrite(tiny_shards):
    keys, _ = eval_keys([f"pipe:cat {tiny_shards}/test-000000.tar", f"pipe:cat {tiny_shards}/test-000001.tar"])
    assert sorted(keys) == TEST_KEYS
    refs = resolve_shards("s3://bucket/mg/train-{000000..000001}.tar", "train", {"s3": "aws s3 cp {url} -"})
    assert [r.url for r in refs] == ["pipe:aws s3 cp s3://bucket/mg/train-000000.tar -",
                                     "pipe:aws s3 cp s3://bucket/mg/train-000001.tar -"]
    with pytest.raises(ValueError, match="no split 'val'"):
        resolve_shards(tiny_shards, "val")


# ---------------------------------------------------------------------------------- distributed

DIST_WORKER = textwrap.dedent("""
    import json, sys
    import torch.distributed as dist
    from mgfm.data.stream import StreamConfig, make_loader
    rank, world, port, shards, out = int(sys.argv[1]), int(sys.argv[2]), sys.argv[3], sys.argv[4], sys.argv[5]
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    cfg = StreamConfig(frames=8, img_size=32, tubelet=2, patch=16, batch_size=2, num_workers=2)
    loader, skips = make_loader(shards, "train", cfg, mode="eval")  # rank/world from torch.distributed
    keys = [k for batch in loader for k in batch["clip_id"]]
    ds = loader.dataset
    json.dump({"rank": ds.rank, "world": ds.world, "keys": keys, "skipped": skips.total}, open(out, "w"))
    dist.barrier()
    dist.destroy_process_group()
""")


@pytest.mark.slow
def test_two_process_eval_stream_yields_each_sample_exactly_once(tiny_index, tmp_path):
    shards = tmp_path / "shards"
    build_shards(tiny_index, shards, BuildConfig(short_side=32, shard_samples=2, crf=12, splits=("train",)))
    assert len(list(shards.glob("train-*.tar"))) == 3  # 3 shards for 2 ranks x 2 workers
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK")}
    env["PYTHONPATH"] = str(Path(__file__).resolve().parents[1]) + os.pathsep + env.get("PYTHONPATH", "")
    procs = [subprocess.Popen([sys.executable, "-c", DIST_WORKER, str(r), "2", str(port), str(shards),
                               str(tmp_path / f"rank{r}.json")], env=env, stderr=subprocess.PIPE, text=True)
             for r in range(2)]
    for p in procs:
        _, err = p.communicate(timeout=240)
        assert p.returncode == 0, err[-3000:]
    results = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in range(2)]
    assert [(r["rank"], r["world"]) for r in results] == [(0, 2), (1, 2)]
    all_keys = results[0]["keys"] + results[1]["keys"]
    assert len(all_keys) == len(set(all_keys)) == 6 and sorted(all_keys) == TRAIN_KEYS
    assert results[0]["keys"] and results[1]["keys"] and results[0]["skipped"] == results[1]["skipped"] == 0


@pytest.mark.slow  # DataLoader worker processes
def test_loader_length_counts_batches_per_worker(tiny_shards):
    loader, _ = make_loader(tiny_shards, "train", small_cfg(batch_size=4, num_workers=2), mode="eval", rank=0, world=1)
    assert len(loader) == 2 == len(list(loader))  # one shard per worker, 3 clips -> batches of 3


@pytest.mark.parametrize("workers", [0, pytest.param(2, marks=pytest.mark.slow)])
def test_an_error_of_our_own_code_stops_the_stream_instead_of_counting_as_bad_data(tiny_shards, monkeypatch, workers):
    import mgfm.data.stream.decode as stream_mod

    def broken(*args):
        raise TypeError("boom in our crop code")

    monkeypatch.setattr(stream_mod, "crop_resize_planar", broken)
    cfg = small_cfg(batches_per_epoch=3, num_workers=workers)
    loader, skips = make_loader(tiny_shards, "train", cfg, mode="train", rank=0, world=1)
    with pytest.raises(TypeError, match="boom in our crop code"):  # through the workers too, with its traceback
        list(loader)
    assert skips.samples == 0


def test_tar_reader_matches_tarfile_on_pax_gnu_and_truncated_tars():
    from mgfm.shards.read import tar_members

    members = [("a" * 120 + ".json", b"x" * 10), ("dir/" + "é" * 5 + ".mp4", b"y" * 700), ("__meta__", b"m"),
               ("k.json", b"")]
    for fmt in (tarfile.PAX_FORMAT, tarfile.GNU_FORMAT, tarfile.USTAR_FORMAT):
        buf = io.BytesIO()
        with tarfile.open(fileobj=buf, mode="w", format=fmt) as tar:
            for name, payload in members:
                if fmt == tarfile.USTAR_FORMAT and len(name) > 100:
                    name = "p" * 60 + "/" + name[:80]  # ustar: long names go through the prefix field
                info = tarfile.TarInfo(name)
                info.size = len(payload)
                tar.addfile(info, io.BytesIO(payload))
            folder = tarfile.TarInfo("folder")
            folder.type = tarfile.DIRTYPE
            tar.addfile(folder)
        data = buf.getvalue()
        with tarfile.open(fileobj=io.BytesIO(data)) as tar:
            expected = [(m.name, tar.extractfile(m).read()) for m in tar if m.isreg() and m.name != "__meta__"]
        assert [(m["fname"], m["data"]) for m in tar_members(io.BytesIO(data))] == expected
        with pytest.raises(EOFError):
            list(tar_members(io.BytesIO(data[:1500])))



def test_samples_are_grouped_as_webdataset_groups_them_and_a_repeated_member_is_reported():
    from webdataset.tariterators import group_by_keys

    from mgfm.shards.read import group_samples

    members = [("a.json", b"1"), ("a.mp4", b"2"), ("d/a.json", b"3"), ("d/a.MP4", b"4"), ("noext", b"5"),
               ("b.seg.json", b"6"), ("b.seg.mp4", b"7"), ("c.json", b"8")]
    files = [{"fname": name, "data": data} for name, data in members]
    ours = list(group_samples(iter(files)))
    with_url = ({**f, "__url__": "u"} for f in files)
    theirs = [{k: v for k, v in sample.items() if k != "__url__"} for sample in group_by_keys(with_url)]
    assert ours == theirs and [s["__key__"] for s in ours] == ["a", "d/a", "b", "c"]
    assert ours[2] == {"__key__": "b", "seg.json": b"6", "seg.mp4": b"7"}
    repeated = files[:2] + [{"fname": "a.json", "data": b"again"}] + files[2:3]
    with pytest.raises(ValueError, match="a.json: duplicate file name"):
        list(group_samples(iter(repeated)))
    reported: list[str] = []
    assert [s["json"] for s in group_samples(iter(repeated), reported.append)] == [b"1", b"3"]
    assert len(reported) == 1 and "already has a .json" in reported[0]


def test_normalise_into_refuses_arrays_it_would_not_write_through():
    planar = np.zeros((2, 3, 4, 4), np.uint8)
    out = np.empty((3, 2, 4, 4), np.float32).transpose(1, 0, 2, 3)  # right shape, not contiguous
    with pytest.raises(ValueError, match="C-contiguous"):
        normalise_into(planar, out, IMAGENET_MEAN, IMAGENET_STD)


# ------------------------------------------------------------------------------------- mixtures


@pytest.fixture(scope="module")
def two_sets(tiny_index, tmp_path_factory) -> tuple[Path, Path]:
    """Two shard sets of the tiny clips, one clip per shard: ``a`` and ``b`` (the same clips, other names)."""
    root = tmp_path_factory.mktemp("mix")
    for name in ("a", "b"):
        build_shards(tiny_index, root / name, BuildConfig(short_side=32, shard_samples=1, crf=12),
                     source={"format": "test"})
    return root / "a", root / "b"


def test_a_mixture_evaluates_every_clip_of_every_set_exactly_once(two_sets):
    from mgfm.shards.read import Mixture

    mixture = Mixture(tuple(str(p) for p in two_sets), (5.0, 1.0))
    seen = []
    for rank in range(3):  # three ranks: together every clip once, each set's clips tagged with the set
        loader, skips = make_loader(mixture, "test", small_cfg(), mode="eval", rank=rank, world=3)
        seen += [c for b in loader for c in b["clip_id"]]
        assert skips.total == 0
    assert sorted(seen) == sorted(f"{s}/{k}" for s in ("a", "b") for k in TEST_KEYS)


def test_a_mixture_trains_on_disjoint_clips_per_rank_in_the_given_proportions(two_sets):
    from mgfm.shards.read import Mixture

    mixture = Mixture(tuple(str(p) for p in two_sets), (3.0, 1.0))
    per_rank = []
    for rank in range(2):
        loader, _ = make_loader(mixture, "train", small_cfg(batches_per_epoch=40, shuffle_buffer=1), mode="train",
                                rank=rank, world=2)
        per_rank.append([c for b in loader for c in b["clip_id"]])
    # each rank reads its own shards of each set: the clips of two ranks never meet within an epoch
    assert not set(per_rank[0]) & set(per_rank[1])
    drawn = per_rank[0] + per_rank[1]
    share_a = sum(c.startswith("a/") for c in drawn) / len(drawn)
    assert len(drawn) == 160 and 0.65 < share_a < 0.85, share_a  # 3:1 -> 0.75
    with pytest.raises(ValueError, match="2 weights for 1 shard sets"):
        Mixture((str(two_sets[0]),), (1.0, 2.0))
