"""Loader benchmark: the training stream vs raw decord decoding of the same sampled frames.

    python benchmarks/bench_loader.py                    # builds a small shard set in a temp dir
    python benchmarks/bench_loader.py --shards shards/x  # or measures an existing one
    python benchmarks/bench_loader.py --workers 2        # both sides with 2 worker processes

Both sides decode the same clips, the same number of frames per clip with the same temporal sampling
policy (``mgfm.data.sampling``) and the same number of processes. The reference only decodes (decord
``VideoReader`` over the mp4 bytes, already in memory, then decord's documented ``get_batch(...).asnumpy()``;
``--reference zero-copy`` takes the batch's memory over DLPack instead, as the stream does); the stream
also reads the tars, shuffles, crops, resizes, normalises, draws masks and collates.

``--workers 0`` (default, the acceptance setting): both sides run in this process, interleaved batch
by batch (the stream yields a batch, the reference decodes as many clips; who goes first alternates),
so a shared machine's changing load hits both sides alike. Reported: wall-clock clips/s per side and their ratio
(per round; the median over rounds), plus the ratio of CPU time.
``--workers N``: both sides use N processes (DataLoader workers / a process pool); rounds alternate
reference, stream, ..., and the median of the per-round ratios is reported.

Memory: two subprocesses stream 1x and 4x as many batches; their peak RSS should be the same (memory
must not grow with the amount streamed).
"""

from __future__ import annotations

import argparse
import io
import json
import logging
import multiprocessing
import resource
import statistics
import subprocess
import sys
import tarfile
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from mgfm.sources.clip_index import Clip, ClipIndex  # noqa: E402
from mgfm.data.sampling import sample_indices  # noqa: E402
from mgfm.data.stream import StreamConfig, make_loader  # noqa: E402
from mgfm.sources.video_io import from_decord, encode_video  # noqa: E402
from mgfm.shards import BuildConfig, build_shards  # noqa: E402

log = logging.getLogger("bench_loader")


def make_source_videos(root: Path, n_videos: int, frames: int, height: int, width: int, seed: int) -> list[Path]:
    """Textured, moving source videos (H.264): a smooth random field drifting plus a moving blob."""
    rng = np.random.default_rng(seed)
    paths = []
    yy, xx = np.mgrid[0:height, 0:width]
    for v in range(n_videos):
        base = rng.random((height // 8 + 2, width // 8 + 2, 3))
        field = np.kron(base, np.ones((8, 8, 1)))[: height + 8, : width + 8]
        video = np.empty((frames, height, width, 3), dtype=np.uint8)
        for t in range(frames):
            shift = t % 8
            img = field[shift:shift + height, shift:shift + width] * 160
            cy, cx = height / 2 + height / 4 * np.sin(t / 7 + v), width / 2 + width / 4 * np.cos(t / 9 + v)
            blob = np.exp(-((yy - cy) ** 2 + (xx - cx) ** 2) / (2 * (height / 8) ** 2))
            img = img + 90 * blob[..., None] + rng.normal(0, 4, (height, width, 3))
            video[t] = np.clip(img, 0, 255).astype(np.uint8)
        path = root / f"src{v:03d}.mp4"
        encode_video(video, 25.0, path)
        paths.append(path)
    return paths


def build_bench_shards(out: Path, clips: int, clip_frames: int, short_side: int, seed: int) -> Path:
    """A shard set of ``clips`` clips around ``clip_frames`` frames (the iMiGUE median is ~40)."""
    rng = np.random.default_rng(seed)
    per_video = 8
    n_videos = -(-clips // per_video)
    src_frames = per_video * (clip_frames + 10) + 20
    height, width = short_side, int(round(short_side * 4 / 3 / 2)) * 2
    videos = make_source_videos(out / "sources", n_videos, src_frames, height, width, seed)
    items = []
    for k in range(clips):
        v, j = divmod(k, per_video)
        length = int(np.clip(rng.normal(clip_frames, clip_frames / 4), 12, clip_frames * 2))
        start = j * (clip_frames + 10)
        end = min(start + length - 1, src_frames - 1)
        items.append(Clip(video_id=f"src{v:03d}", start_frame=start, end_frame=end, label=k % 4, subject=str(v),
                          split="train", fps=25.0, path=str(videos[v])))
    index = ClipIndex(items, [f"class_{i}" for i in range(4)], "bench")
    shards = out / "shards"
    build_shards(index, shards, BuildConfig(short_side=short_side, shard_samples=max(1, clips // 4)))
    return shards


def load_clips(shards: Path) -> dict[str, tuple[bytes, int]]:
    """clip id -> (mp4 bytes, n_frames) of every train clip, read into memory for the reference."""
    manifest = json.loads((shards / "manifest.json").read_text())
    out = {}
    for shard in manifest["splits"]["train"]["shards"]:
        with tarfile.open(shards / shard["name"]) as tar:
            members = {m.name: tar.extractfile(m).read() for m in tar}
        for name, data in members.items():
            if name.endswith(".json"):
                out[name[:-5]] = (members[name[:-5] + ".mp4"], json.loads(data)["n_frames"])
    return out


def _decode_one(args: tuple[bytes, int, int, str, int, int, bool]) -> int:
    """Raw decoding of one clip: decord's documented ``get_batch(...).asnumpy()``, or with ``zero_copy``
    the batch's own memory over DLPack (as the stream takes it)."""
    import decord

    data, n_frames, frames, policy, stride, seed, zero_copy = args
    idx = sample_indices(n_frames, frames, policy, stride, np.random.default_rng(seed))
    reader = decord.VideoReader(io.BytesIO(data), num_threads=1)
    batch = reader.get_batch(np.minimum(idx, len(reader) - 1).tolist())
    return (from_decord(batch) if zero_copy else batch.asnumpy()).shape[0]


def reference_rate(clips: list[tuple[bytes, int]], n: int, cfg: StreamConfig, workers: int, pool,
                   zero_copy: bool = False) -> float:
    """Clips/s of raw decord decoding of ``n`` clips' sampled frames (in a pool of ``workers``)."""
    jobs = [(clips[k % len(clips)][0], clips[k % len(clips)][1], cfg.frames, cfg.stride_policy, cfg.stride, k,
             zero_copy) for k in range(n)]
    start = time.perf_counter()
    if workers == 0:
        for job in jobs:
            _decode_one(job)
    else:
        for _ in pool.imap_unordered(_decode_one, jobs, chunksize=4):
            pass
    return n / (time.perf_counter() - start)


def stream_rate(shards: Path, n_batches: int, cfg: StreamConfig, epoch: int) -> float:
    """Clips/s of the training stream over ``n_batches`` batches (including worker start-up)."""
    cfg.batches_per_epoch = n_batches
    loader, skips = make_loader(shards, "train", cfg, mode="train", epoch=epoch, rank=0, world=1)
    start = time.perf_counter()
    clips = 0
    for batch in loader:
        clips += batch["video"].shape[0] // cfg.repeats
    elapsed = time.perf_counter() - start
    if skips.total:
        raise RuntimeError(f"stream skipped samples: {skips.summary()}")
    return clips / elapsed


def interleaved_round(shards: Path, by_id: dict[str, tuple[bytes, int]], n_batches: int, cfg: StreamConfig,
                      epoch: int, zero_copy: bool = False) -> dict[str, float]:
    """In-process, batch by batch: the stream produces a batch, the reference decodes as many clips.

    Which side goes first alternates every batch, and the reference walks its own shuffled clip order:
    decoding a clip right after the other side decoded the same bytes runs ~15% faster (warm caches),
    so neither side may follow the other systematically.
    """
    cfg.batches_per_epoch = n_batches
    loader, skips = make_loader(shards, "train", cfg, mode="train", epoch=epoch, rank=0, world=1)
    it = iter(loader)
    keys = list(by_id)
    order = np.random.default_rng(epoch).permutation(len(keys) * (n_batches * cfg.batch_size // len(keys) + 1))
    wall = {"stream": 0.0, "ref": 0.0}
    cpu = {"stream": 0.0, "ref": 0.0}
    counts = {"stream": 0, "ref": 0}
    pos = 0

    def stream_step() -> None:
        t0, c0 = time.perf_counter(), time.process_time()
        batch = next(it)
        wall["stream"] += time.perf_counter() - t0
        cpu["stream"] += time.process_time() - c0
        counts["stream"] += batch["video"].shape[0] // cfg.repeats

    def ref_step() -> None:
        nonlocal pos
        t0, c0 = time.perf_counter(), time.process_time()
        for _ in range(cfg.batch_size):
            data, n_frames = by_id[keys[order[pos] % len(keys)]]
            _decode_one((data, n_frames, cfg.frames, cfg.stride_policy, cfg.stride, epoch * 100000 + pos, zero_copy))
            pos += 1
        wall["ref"] += time.perf_counter() - t0
        cpu["ref"] += time.process_time() - c0
        counts["ref"] += cfg.batch_size

    for b in range(n_batches):
        for step in ((stream_step, ref_step) if b % 2 == 0 else (ref_step, stream_step)):
            step()
    if next(it, None) is not None or skips.total:
        raise RuntimeError(f"stream gave more batches than asked or skipped samples: {skips.summary()}")
    return {"stream": counts["stream"] / wall["stream"], "ref": counts["ref"] / wall["ref"],
            "stream_per_core": counts["stream"] / cpu["stream"], "ref_per_core": counts["ref"] / cpu["ref"],
            "cpu_ratio": (cpu["ref"] / counts["ref"]) / (cpu["stream"] / counts["stream"])}


def rss_child(args: argparse.Namespace) -> None:
    """Subprocess body: stream ``--rss-batches`` batches, print peak RSS (MiB) of this process and its workers."""
    cfg = stream_config(args)
    cfg.batches_per_epoch = args.rss_batches
    loader, _ = make_loader(args.shards, "train", cfg, mode="train", rank=0, world=1)
    n = sum(1 for _ in loader)
    own = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    kids = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024
    print(json.dumps({"batches": n, "peak_rss_mib": own, "peak_worker_rss_mib": kids}))


def peak_rss(shards: Path, batches: int, args: argparse.Namespace) -> dict:
    cmd = [sys.executable, __file__, "--rss-child", "--shards", str(shards), "--rss-batches", str(batches),
           "--workers", str(args.workers), "--frames", str(args.frames), "--img-size", str(args.img_size),
           "--batch-size", str(args.batch_size), "--video-dtype", args.video_dtype]
    out = subprocess.run(cmd, check=True, capture_output=True, text=True).stdout
    return json.loads(out.strip().splitlines()[-1])


def stream_config(args: argparse.Namespace) -> StreamConfig:
    return StreamConfig(frames=args.frames, img_size=args.img_size, tubelet=2, patch=16, batch_size=args.batch_size,
                        num_workers=args.workers, decoder_keep_ratio=0.5, seed=0, log_skips=0,
                        video_dtype=args.video_dtype, repeats=args.repeats)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shards", type=Path, default=None, help="existing shard folder (default: build one)")
    parser.add_argument("--clips", type=int, default=64, help="clips in the built shard set")
    parser.add_argument("--clip-frames", type=int, default=40, help="typical clip length of the built set")
    parser.add_argument("--short-side", type=int, default=128)
    parser.add_argument("--frames", type=int, default=16)
    parser.add_argument("--img-size", type=int, default=112)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--workers", type=int, default=0, help="worker processes on both sides (0: in-process)")
    parser.add_argument("--video-dtype", choices=("float32", "uint8"), default="float32",
                        help="stream output: normalised float32 (default) or uint8 left for the accelerator")
    parser.add_argument("--batches", type=int, default=24, help="batches per timed stream run")
    parser.add_argument("--rounds", type=int, default=3, help="alternating timed runs per side")
    parser.add_argument("--rss-batches", type=int, default=20, help="batches of the 1x memory run")
    parser.add_argument("--repeats", type=int, default=1,
                        help="stream: crops + masks per decoded clip (training samples = clips x repeats)")
    parser.add_argument("--gpu-clips-per-s", type=float, default=None,
                        help="an accelerator's training rate: print the CPU cores the stream needs to feed it")
    parser.add_argument("--reference", choices=("asnumpy", "zero-copy"), default="asnumpy",
                        help="how the reference takes decord's frames: its documented .asnumpy() copy (default) or "
                             "the batch's own memory over DLPack, as the stream does")
    parser.add_argument("--rss-child", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)
    if args.rss_child:
        rss_child(args)
        return

    with tempfile.TemporaryDirectory(prefix="bench_loader_") as tmp:
        shards = args.shards or build_bench_shards(Path(tmp), args.clips, args.clip_frames, args.short_side, seed=0)
        by_id = load_clips(shards)
        clips = list(by_id.values())
        cfg = stream_config(args)
        zero_copy = args.reference == "zero-copy"
        n_clips = args.batches * args.batch_size
        rounds = []
        if args.workers == 0:
            interleaved_round(shards, by_id, 2, stream_config(args), epoch=99, zero_copy=zero_copy)  # warm-up
            for r in range(args.rounds):
                rounds.append(interleaved_round(shards, by_id, args.batches, stream_config(args), epoch=r,
                                                zero_copy=zero_copy))
        else:
            with multiprocessing.get_context("fork").Pool(args.workers) as pool:
                reference_rate(clips, min(len(clips), 16), cfg, args.workers, pool, zero_copy)  # warm-up
                stream_rate(shards, 2, stream_config(args), epoch=99)
                for r in range(args.rounds):
                    ref = reference_rate(clips, n_clips, cfg, args.workers, pool, zero_copy)
                    ours = stream_rate(shards, args.batches, stream_config(args), epoch=r)
                    rounds.append({"stream": ours, "ref": ref})
        small = peak_rss(shards, args.rss_batches, args)
        large = peak_rss(shards, 4 * args.rss_batches, args)

    ref_rate = statistics.median(r["ref"] for r in rounds)
    our_rate = statistics.median(r["stream"] for r in rounds)
    ratio = statistics.median(r["stream"] / r["ref"] for r in rounds)
    mean_frames = statistics.mean(n for _, n in clips)
    how = "interleaved batch by batch in one process" if args.workers == 0 else \
        f"{args.workers} worker processes on both sides, alternating rounds"
    print(f"shard set: {len(clips)} clips, mean {mean_frames:.1f} frames; sampling {args.frames} frames "
          f"({cfg.stride_policy}, max stride {cfg.stride}); crop {args.img_size}; batch {args.batch_size}; "
          f"video {args.video_dtype}; "
          f"{how}; {args.rounds} rounds of {n_clips} clips")
    print(f"{'side':<34}{'clips/s (median)':>18}   per round")
    print(f"{'raw decord decode (' + args.reference + ')':<34}{ref_rate:>18.1f}   " + ", ".join(f"{r['ref']:.1f}" for r in rounds))
    print(f"{'training stream (mgfm)':<34}{our_rate:>18.1f}   " + ", ".join(f"{r['stream']:.1f}" for r in rounds))
    print(f"ratio stream / raw decode: {ratio:.2f} (median of per-round ratios "
          + ", ".join(f"{r['stream'] / r['ref']:.2f}" for r in rounds) + "; acceptance >= 0.90)")
    if args.workers == 0:
        print(f"ratio of CPU time (reference / stream): {statistics.median(r['cpu_ratio'] for r in rounds):.2f}")
        per_core = statistics.median(r["stream_per_core"] for r in rounds)
        print(f"clips per CPU-second (= clips/s per core): raw decode "
              f"{statistics.median(r['ref_per_core'] for r in rounds):.1f}, stream {per_core:.1f}")
        samples = per_core * args.repeats
        if args.repeats > 1:
            print(f"training samples per CPU-second (clips x {args.repeats} repeats): {samples:.1f}")
        if args.gpu_clips_per_s:
            print(f"cores to feed {args.gpu_clips_per_s:.0f} training samples/s: {args.gpu_clips_per_s / samples:.0f} "
                  f"(stream at {samples:.1f} samples/s per core)")
    grow = (large["peak_rss_mib"] + large["peak_worker_rss_mib"]) / (small["peak_rss_mib"] + small["peak_worker_rss_mib"])
    print(f"peak RSS streaming {small['batches']} batches: {small['peak_rss_mib']:.0f} MiB "
          f"(+ workers {small['peak_worker_rss_mib']:.0f} MiB); {large['batches']} batches: "
          f"{large['peak_rss_mib']:.0f} MiB (+ workers {large['peak_worker_rss_mib']:.0f} MiB); ratio 4x/1x {grow:.2f}")


if __name__ == "__main__":
    main()
