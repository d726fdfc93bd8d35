"""``stream.cache=memory`` against streaming: train samples/s of the same stream, side by side in one process.

    python benchmarks/bench_memory_cache.py                          # builds a small shard set in a temp dir
    python benchmarks/bench_memory_cache.py --shards shards/utkinect # or measures an existing one

Both sides are :func:`mgfm.data.stream.make_loader` in train mode with the same config and seed, so they yield
the same samples (tests/test_memory_cache.py proves it); one reads and decodes the shards, the other replays a
:class:`~mgfm.data.stream.MemoryClips` decoded once before the rounds (the one-off decode is timed and printed
apart). Rounds alternate who goes first; reported: samples/s per side, the median of the per-round ratios,
and the model step's samples/s for scale (the tiny encoder's pretraining step at the same geometry), which
says how much of a step the loader still costs.
"""

from __future__ import annotations

import argparse
import dataclasses
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from bench_loader import build_bench_shards  # noqa: E402

from mgfm.data.stream import MemoryClips, StreamConfig, make_loader  # noqa: E402
from mgfm.data.transforms import normalise  # noqa: E402
from mgfm.model.encoder import ModelConfig  # noqa: E402
from mgfm.model.masked import build_pretraining_model, param_groups  # noqa: E402


def samples_per_s(shards: Path, cfg: StreamConfig, batches: int, epoch: int, memory: MemoryClips | None) -> float:
    loader, _ = make_loader(shards, "train", dataclasses.replace(cfg, batches_per_epoch=batches), mode="train",
                            epoch=epoch, rank=0, world=1, memory=memory)
    start = time.perf_counter()
    n = sum(len(batch["clip_id"]) for batch in loader)
    return n / (time.perf_counter() - start)


def step_samples_per_s(cfg: StreamConfig, shards: Path, memory: MemoryClips, steps: int = 6) -> float:
    """The tiny encoder's pretraining step (forward, backward, AdamW) on batches of this stream."""
    model_cfg = ModelConfig(size="tiny", frames=cfg.frames, img_size=cfg.img_size, decoder_depth=4)
    model = build_pretraining_model(model_cfg)
    opt = torch.optim.AdamW(param_groups(model, 0.05), lr=1e-4)
    loader, _ = make_loader(shards, "train", dataclasses.replace(cfg, batches_per_epoch=steps + 1), mode="train",
                            rank=0, world=1, memory=memory)
    batches = list(loader)
    times = []
    for batch in batches:
        start = time.perf_counter()
        video = normalise(batch["video"], model_cfg.pixel_mean, model_cfg.pixel_std)
        loss, _ = model(video, batch["encoder_mask"])
        loss.backward()
        opt.step()
        opt.zero_grad()
        times.append(time.perf_counter() - start)
    return len(batches[0]["clip_id"]) / statistics.median(times[1:])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shards", type=Path, help="an existing shard set (default: build one in a temp dir)")
    parser.add_argument("--clips", type=int, default=64)
    parser.add_argument("--img-size", type=int, default=112)
    parser.add_argument("--frames", type=int, default=16)
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--batches", type=int, default=12, help="batches per side and round")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    with tempfile.TemporaryDirectory() as tmp:
        shards = args.shards or build_bench_shards(Path(tmp) / "shards", args.clips, 40, 128, seed=0)
        cfg = StreamConfig(frames=args.frames, img_size=args.img_size, tubelet=2, patch=16, batch_size=args.batch,
                           num_workers=0, video_dtype="uint8", mask_ratio=0.9, flip=True)
        start = time.perf_counter()
        memory = MemoryClips.load(shards, "train", cfg, progress=False)
        decode_s = time.perf_counter() - start
        ratios, rates = [], {"streamed": [], "memory": []}
        for r in range(args.rounds):
            order = ("streamed", "memory") if r % 2 == 0 else ("memory", "streamed")
            got = {side: samples_per_s(shards, cfg, args.batches, r, memory if side == "memory" else None)
                   for side in order}
            for side, rate in got.items():
                rates[side].append(rate)
            ratios.append(got["memory"] / got["streamed"])
        step = step_samples_per_s(cfg, shards, memory)
    print(f"shards {shards if args.shards else '(temp, ' + str(args.clips) + ' clips)'}, {args.frames} x "
          f"{args.img_size} px, batch {args.batch}, {args.threads} thread(s)")
    print(f"memory cache: {memory.clips} clips decoded once in {decode_s:.1f} s ({memory.nbytes / 2**20:.0f} MB)")
    print(f"{'side':<10} {'samples/s (rounds)':<40} median")
    for side, values in rates.items():
        print(f"{side:<10} {', '.join(f'{v:.1f}' for v in values):<40} {np.median(values):.1f}")
    print(f"memory / streamed: {np.median(ratios):.2f}x (rounds {', '.join(f'{x:.2f}' for x in ratios)})")
    print(f"model step (tiny, decoder 4, mask 0.9): {step:.1f} samples/s: the loader takes "
          f"{100 * step / np.median(rates['streamed']):.0f}% of a step's time streamed, "
          f"{100 * step / np.median(rates['memory']):.0f}% from memory")


if __name__ == "__main__":
    main()
