"""Shared tiny fixtures: a few time-coded videos, a clip index over them, its CSV, and built shards.

Every frame carries its frame number ``t`` as a binary stripe code in its top half (read it back with
:func:`read_time_code`, robust to lossy re-encoding and resizing); the bottom half's colour encodes the
video. Videos are 48x64 and 12-30 frames, so building,
decoding and streaming them takes well under a second. Session-scoped fixtures are shared: copy a
shard folder (``shutil.copytree``) before changing it.
"""

from __future__ import annotations

import csv
import os
import tarfile
from pathlib import Path
from typing import Callable

import numpy as np
import pytest

from mgfm.sources.clip_index import Clip, ClipIndex
from mgfm.sources.video_io import H264Encoding, encode_video

pytest_plugins = ["pytester"]  # tests/test_suite.py checks this file's own hooks on a planted test file

def pytest_configure(config) -> None:
    """Under pytest-xdist each worker keeps to one torch thread (as the child processes already do,
    :func:`subprocess_env`): two workers on two cores, not two workers fighting over four threads."""
    if os.environ.get("PYTEST_XDIST_WORKER"):
        import torch

        os.environ["OMP_NUM_THREADS"] = "1"
        torch.set_num_threads(1)


@pytest.hookimpl(tryfirst=True)  # before pytest-xdist reads the groups off the items
def pytest_collection_modifyitems(config, items) -> None:
    """Tests marked ``gpu`` skip where CUDA is absent (this CI), saying so. Tests marked ``slow`` (the
    multi-process ones: rank groups, launchers, the chaos run) share one pytest-xdist group, so under
    ``-n 2 --dist loadgroup`` they run one after another on one worker: never two rank groups competing
    for the same cores and rendezvous ports at once."""
    import torch

    skip = None if torch.cuda.is_available() else pytest.mark.skip(reason="needs CUDA (marked gpu)")
    for item in items:
        if skip is not None and "gpu" in item.keywords:
            item.add_marker(skip)
        if "slow" in item.keywords:
            item.add_marker(pytest.mark.xdist_group("multi_process"))


TINY_HEIGHT, TINY_WIDTH, TINY_FPS = 48, 64, 25.0
# video id -> (frames, subject, split)
TINY_VIDEOS = {"v0": (30, "1", "train"), "v1": (24, "2", "train"), "v2": (20, "3", "test"), "v3": (16, "4", "test")}
# (video id, start, end inclusive, label)
TINY_CLIPS = [
    ("v0", 0, 9, 0), ("v0", 8, 19, 1), ("v0", 20, 29, 2),
    ("v1", 2, 9, 1), ("v1", 10, 23, 0), ("v1", 12, 20, 2),
    ("v2", 0, 11, 2), ("v2", 5, 14, 0), ("v2", 12, 19, 1),
    ("v3", 0, 7, 0), ("v3", 4, 15, 1), ("v3", 8, 15, 2),
]
TINY_CLASSES = ["class_a", "class_b", "class_c"]
TIME_BITS = 6


def time_coded_frames(n_frames: int, video_number: int, height: int = TINY_HEIGHT,
                      width: int = TINY_WIDTH) -> np.ndarray:
    """uint8 (n_frames, height, width, 3). The top half shows the frame number ``t`` in binary as
    ``TIME_BITS`` vertical stripes (bright = 1, most significant bit left); the bottom half is a flat
    colour that identifies the video (green = 40 + 50 * video_number)."""
    if n_frames > 2**TIME_BITS:
        raise ValueError(f"time code holds at most {2**TIME_BITS} frames, got {n_frames}")
    frames = np.empty((n_frames, height, width, 3), dtype=np.uint8)
    frames[:, height // 2:] = (90, (40 + 50 * video_number) % 256, 128)
    edges = np.linspace(0, width, TIME_BITS + 1).round().astype(int)
    for t in range(n_frames):
        for bit in range(TIME_BITS):
            on = (t >> (TIME_BITS - 1 - bit)) & 1
            frames[t, : height // 2, edges[bit]:edges[bit + 1]] = 230 if on else 25
    return frames


def read_time_code(frames: np.ndarray) -> np.ndarray:
    """Frame numbers (T,) read back from time-coded frames (T, H, W, 3), at any resize of them."""
    t, h, w, _ = frames.shape
    edges = np.linspace(0, w, TIME_BITS + 1)
    out = np.zeros(t, dtype=int)
    for bit in range(TIME_BITS):
        lo, hi = edges[bit], edges[bit + 1]
        a, b = int(lo + (hi - lo) / 3), max(int(lo + (hi - lo) / 3) + 1, int(hi - (hi - lo) / 3))
        level = frames[:, h // 8: 3 * h // 8, a:b].reshape(t, -1).mean(axis=1)
        out = out * 2 + (level > 128)
    return out



def read_tar(path: Path) -> dict[str, dict[str, bytes]]:
    """key -> {ext: bytes} for every member of a shard tar (plain tarfile, no mgfm code)."""
    out: dict[str, dict[str, bytes]] = {}
    with tarfile.open(path) as tar:
        for member in tar:
            key, _, ext = member.name.partition(".")
            out.setdefault(key, {})[ext] = tar.extractfile(member).read()
    return out

@pytest.fixture(scope="session")
def tiny_video_factory(tmp_path_factory) -> Callable[..., Path]:
    """``make(path, n_frames, video_number=0, height=48, width=64) -> path``: write a time-coded mp4."""

    def make(path: Path, n_frames: int, video_number: int = 0, height: int = TINY_HEIGHT,
             width: int = TINY_WIDTH) -> Path:
        encode_video(time_coded_frames(n_frames, video_number, height, width), TINY_FPS, path, H264Encoding(crf=10))
        return Path(path)

    return make


@pytest.fixture(scope="session")
def tiny_videos(tmp_path_factory, tiny_video_factory) -> dict[str, Path]:
    """video id -> path of the four tiny source videos (see ``TINY_VIDEOS``)."""
    root = tmp_path_factory.mktemp("tiny_videos")
    return {vid: tiny_video_factory(root / f"{vid}.mp4", n, k) for k, (vid, (n, _, _)) in enumerate(TINY_VIDEOS.items())}


@pytest.fixture(scope="session")
def tiny_index(tiny_videos) -> ClipIndex:
    """12 labelled clips (8-14 frames, 3 classes) over the tiny videos; v0/v1 train, v2/v3 test."""
    clips = [
        Clip(video_id=vid, start_frame=s, end_frame=e, label=label, subject=TINY_VIDEOS[vid][1],
             split=TINY_VIDEOS[vid][2], fps=TINY_FPS, path=str(tiny_videos[vid]), emotion=k % 2)
        for k, (vid, s, e, label) in enumerate(TINY_CLIPS)
    ]
    return ClipIndex(clips, list(TINY_CLASSES), "tiny", {"v0": "train", "v2": "test"})


@pytest.fixture(scope="session")
def tiny_csv(tiny_videos, tmp_path_factory) -> Path:
    """A generic ``path,label,subject,split`` CSV of whole-video clips (one row per tiny video)."""
    path = tmp_path_factory.mktemp("tiny_csv") / "clips.csv"
    with path.open("w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["path", "label", "subject", "split"])
        for k, (vid, (_, subject, split)) in enumerate(TINY_VIDEOS.items()):
            writer.writerow([str(tiny_videos[vid]), k % len(TINY_CLASSES), subject, split])
    return path


@pytest.fixture(scope="session")
def tiny_shards(tiny_index, tmp_path_factory) -> Path:
    """Shards of ``tiny_index`` (short side 32, 3 clips per shard: 2 train + 2 test shards). Read-only:
    copy before modifying."""
    from mgfm.shards import BuildConfig, build_shards

    out = tmp_path_factory.mktemp("tiny_shards") / "tiny"
    build_shards(tiny_index, out, BuildConfig(short_side=32, shard_samples=3, crf=12), source={"format": "test"})
    return out


def subprocess_env() -> dict:
    """Environment for a child training/eval process: one torch thread, unbuffered, no inherited rank."""
    env = dict(os.environ, PYTHONUNBUFFERED="1", OMP_NUM_THREADS="1")
    env.pop("RANK", None)
    env.pop("WORLD_SIZE", None)
    return env


def tiny_encoder_folder(folder: Path) -> Path:
    """Save a seeded 1-layer, 32-wide encoder (4 frames x 32 px) as a Hugging Face folder; returns it."""
    import torch

    from mgfm.model.hf import save_encoder_hf
    from mgfm.model.encoder import ModelConfig, build_encoder

    torch.manual_seed(0)
    encoder = build_encoder(ModelConfig(size="custom", img_size=32, frames=4, dim=32, depth=1, heads=2,
                                        decoder_dim=16, decoder_depth=1, decoder_heads=1))
    save_encoder_hf(encoder, folder)
    return folder
