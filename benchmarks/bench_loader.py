"""Loader benchmark: the training stream vs raw decoding of the same sampled frames, and vs the floor.

    python benchmarks/bench_loader.py                    # builds a small shard set in a temp dir
    python benchmarks/bench_loader.py --shards shards/x  # or measures an existing one
    python benchmarks/bench_loader.py --tune fastdecode --bframes 7 --short-side 224   # the set's encoding
    python benchmarks/bench_loader.py --workers 2        # both sides with 2 worker processes
    python benchmarks/bench_loader_levers.py             # every lever alone and together (its own script)

The sides decode the same clips, the same number of frames per clip with the same temporal sampling policy
(``mgfm.data.sampling``) and the same number of processes:

* the **raw decord** reference only decodes (decord ``VideoReader`` over the mp4 bytes, already in memory,
  then decord's documented ``get_batch(...).asnumpy()``; ``--reference zero-copy`` takes the batch's memory
  over DLPack instead) — what the stream decoded before it decoded with PyAV;
* the **floor** decodes only the frames a sample needs at the stored size and nothing else: one draw of
  each clip's sampled frames, stored on their own, intra-only (``floor, intra-only``) and as a clip of just
  those frames in the shard set's own encoding (``floor, frames alone``), decoded whole (PyAV);
* the **stream** also reads the tars, shuffles, decodes (``--backend``, default the stream's), crops,
  resizes, (normalises), draws masks and collates.

``--workers 0`` (default, the acceptance setting): all sides run in this process, interleaved batch by
batch (each side yields a batch's worth of clips in turn; who goes first rotates), so a shared machine's
changing load hits every side alike. Reported: wall-clock clips/s per side and the stream's ratios to the
others (per round; the median over rounds), plus clips per CPU-second of each side (the rate of one core).
``--workers N``: stream and raw decoding use N processes (DataLoader workers / a process pool); rounds
alternate reference, stream, ..., and the median of the per-round ratios is reported.

Memory: two subprocesses stream 1x and 4x as many batches; their peak RSS should be the same (memory
must not grow with the amount streamed).
"""

from __future__ import annotations

import argparse
import dataclasses
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
from typing import Callable

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from mgfm.sources.clip_index import Clip, ClipIndex  # noqa: E402
from mgfm.data.sampling import sample_indices  # noqa: E402
from mgfm.data.stream import StreamConfig, make_loader  # noqa: E402
from mgfm.sources.video_io import H264Encoding, decode_frames, encode_video, from_decord  # noqa: E402
from mgfm.shards import BuildConfig, build_shards  # noqa: E402

log = logging.getLogger("bench_loader")
CLIPS_PER_VIDEO = 8  # clips cut from one source video
CLIP_GAP = 10  # frames between consecutive clips of a source video
SOURCE_FPS = 25.0


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
        encode_video(video, SOURCE_FPS, path)
        paths.append(path)
    return paths


def bench_index(root: Path, clips: int, clip_frames: int, short_side: int, seed: int) -> ClipIndex:
    """``clips`` clips around ``clip_frames`` frames long (the iMiGUE median is ~40) cut from source videos
    rendered at ``short_side`` (4:3) under ``root``."""
    rng = np.random.default_rng(seed)
    n_videos = -(-clips // CLIPS_PER_VIDEO)
    src_frames = CLIPS_PER_VIDEO * (clip_frames + CLIP_GAP) + 2 * CLIP_GAP
    height, width = short_side, int(round(short_side * 4 / 3 / 2)) * 2
    videos = make_source_videos(root, n_videos, src_frames, height, width, seed)
    items = []
    for k in range(clips):
        v, j = divmod(k, CLIPS_PER_VIDEO)
        length = int(np.clip(rng.normal(clip_frames, clip_frames / 4), 12, clip_frames * 2))
        start = j * (clip_frames + CLIP_GAP)
        end = min(start + length - 1, src_frames - 1)
        items.append(Clip(video_id=f"src{v:03d}", start_frame=start, end_frame=end, label=k % 4, subject=str(v),
                          split="train", fps=SOURCE_FPS, path=str(videos[v])))
    return ClipIndex(items, [f"class_{i}" for i in range(4)], "bench")


def build_set(index: ClipIndex, out: Path, short_side: int, clips: int, **encoding) -> Path:
    """The train shards of ``index`` at ``short_side`` with the encoding options ``encoding`` (BuildConfig's
    ``tune``, ``bframes``, ``keyint``, ``crf``) in four shards."""
    build_shards(index, out, BuildConfig(short_side=short_side, shard_samples=max(1, clips // 4), **encoding))
    return out


def build_bench_shards(out: Path, clips: int, clip_frames: int, short_side: int, seed: int, **encoding) -> Path:
    """Source videos under ``out/sources`` and their shard set in ``out/shards`` (see :func:`bench_index`)."""
    index = bench_index(out / "sources", clips, clip_frames, short_side, seed)
    return build_set(index, out / "shards", short_side, clips, **encoding)


def set_encoding(shards: Path) -> H264Encoding:
    """The encoding a shard set's manifest records (a set built before the record: x264's defaults)."""
    record = json.loads((shards / "manifest.json").read_text()).get("encoding") or {}
    fields = {f.name for f in dataclasses.fields(H264Encoding)}
    return H264Encoding(**{k: v for k, v in record.items() if k in fields})


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


def mean_kib(clips: dict[str, tuple[bytes, int]]) -> float:
    return statistics.mean(len(data) for data, _ in clips.values()) / 1024


# ------------------------------------------------------------------------------------------ the sides


def _decode_one(args: tuple[bytes, int, int, str, int, int, bool]) -> int:
    """Raw decoding of one clip: decord's documented ``get_batch(...).asnumpy()``, or with ``zero_copy``
    the batch's own memory over DLPack."""
    import decord

    data, n_frames, frames, policy, stride, seed, zero_copy = args
    idx = sample_indices(n_frames, frames, policy, stride, np.random.default_rng(seed))
    reader = decord.VideoReader(io.BytesIO(data), num_threads=1)
    batch = reader.get_batch(np.minimum(idx, len(reader) - 1).tolist())
    return (from_decord(batch) if zero_copy else batch.asnumpy()).shape[0]


def floor_clips(by_id: dict[str, tuple[bytes, int]], cfg: StreamConfig, encoding: H264Encoding,
                seed: int = 0) -> dict[str, dict[str, bytes]]:
    """Per clip, one draw of its sampled frames (at the stored size) stored on their own: ``intra`` every
    frame a keyframe, ``alone`` a clip of just those frames in ``encoding``. Decoding one whole is the least
    work any decoder can do for a sample of that clip."""
    rng = np.random.default_rng(seed)
    out = {}
    for key, (data, n_frames) in by_id.items():
        frames = decode_frames(data, sample_indices(n_frames, cfg.frames, cfg.stride_policy, cfg.stride, rng).tolist(),
                               backend="pyav")
        out[key] = {"intra": encode_video(frames, SOURCE_FPS, encoding=dataclasses.replace(encoding, keyint=1)),
                    "alone": encode_video(frames, SOURCE_FPS, encoding=encoding)}
    return out


class Side:
    """One measured side: ``step()`` produces one batch's worth of clips and returns (clips, training
    samples); wall-clock and CPU time (this process's, all threads) are summed per side."""

    def __init__(self, name: str, step: Callable[[], tuple[int, int]]):
        self.name, self._step = name, step
        self.clips = self.samples = 0
        self.wall = self.cpu = 0.0

    def step(self) -> None:
        t0, c0 = time.perf_counter(), time.process_time()
        clips, samples = self._step()
        self.wall += time.perf_counter() - t0
        self.cpu += time.process_time() - c0
        self.clips += clips
        self.samples += samples

    def rates(self) -> dict[str, float]:
        return {"clips_per_s": self.clips / self.wall, "clips_per_cpu_s": self.clips / self.cpu,
                "samples_per_cpu_s": self.samples / self.cpu, "ms_per_clip": 1000 * self.cpu / self.clips}


def stream_step(shards: Path, cfg: StreamConfig, batches: int, epoch: int) -> Callable[[], tuple[int, int]]:
    """The train stream over ``shards``: each call takes its next batch (the loader made per round)."""
    cfg = dataclasses.replace(cfg, batches_per_epoch=batches)
    loader, skips = make_loader(shards, "train", cfg, mode="train", epoch=epoch, rank=0, world=1)
    it = iter(loader)

    def step() -> tuple[int, int]:
        batch = next(it)
        if skips.total:
            raise RuntimeError(f"stream skipped samples: {skips.summary()}")
        rows = batch["video"].shape[0]
        return rows // cfg.repeats, rows
    return step


def decode_step(by_id: dict[str, tuple[bytes, int]], cfg: StreamConfig, seed: int,
                decode: Callable[[str, int], object]) -> Callable[[], tuple[int, int]]:
    """``cfg.batch_size`` clips per call through ``decode(clip id, draw seed)``, walking the clips in a shuffled
    order of their own (decoding a clip right after another side decoded the same bytes runs ~15% faster:
    warm caches, so no side may follow another systematically)."""
    keys = list(by_id)
    rng = np.random.default_rng(seed)
    position = 0

    def step() -> tuple[int, int]:
        nonlocal position
        for _ in range(cfg.batch_size):
            if position % len(keys) == 0:
                rng.shuffle(keys)
            decode(keys[position % len(keys)], seed * 1_000_003 + position)
            position += 1
        return cfg.batch_size, cfg.batch_size
    return step


def raw_decord(by_id: dict[str, tuple[bytes, int]], cfg: StreamConfig, zero_copy: bool) -> Callable[[str, int], int]:
    """Decode one clip's sampled frames with decord alone (the reference)."""
    def decode(key: str, seed: int) -> int:
        data, n_frames = by_id[key]
        return _decode_one((data, n_frames, cfg.frames, cfg.stride_policy, cfg.stride, seed, zero_copy))
    return decode


def raw_decoder(by_id: dict[str, tuple[bytes, int]], cfg: StreamConfig, backend: str) -> Callable[[str, int], object]:
    """Decode one clip's sampled frames with :func:`mgfm.sources.video_io.decode_frames` alone."""
    def decode(key: str, seed: int):
        data, n_frames = by_id[key]
        idx = sample_indices(n_frames, cfg.frames, cfg.stride_policy, cfg.stride, np.random.default_rng(seed))
        return decode_frames(data, idx.tolist(), backend=backend)
    return decode


def floor_decoder(floors: dict[str, dict[str, bytes]], kind: str) -> Callable[[str, int], object]:
    """Decode one clip's stored sampled frames (``kind``: ``intra`` or ``alone``) whole (PyAV)."""
    return lambda key, seed: decode_frames(floors[key][kind], None, backend="pyav")


def interleaved(make_sides: Callable[[int], list[Side]], batches: int, rounds: int, warmup: int = 2) -> list[dict]:
    """Rounds of ``batches`` steps of every side, interleaved batch by batch (the first side rotates), after an
    untimed warm-up round of ``warmup`` batches; per round and side, the :meth:`Side.rates`."""
    out = []
    for r in [-1, *range(rounds)]:
        sides = make_sides(r)
        for b in range(warmup if r < 0 else batches):
            for k in range(len(sides)):
                sides[(b + k) % len(sides)].step()
        if r >= 0:
            out.append({side.name: side.rates() for side in sides})
    return out


def median(rounds: list[dict], side: str, key: str = "clips_per_cpu_s") -> float:
    return statistics.median(r[side][key] for r in rounds)


def median_ratio(rounds: list[dict], a: str, b: str, key: str = "clips_per_s") -> float:
    """Median over rounds of side ``a``'s ``key`` over side ``b``'s (measured side by side)."""
    return statistics.median(r[a][key] / r[b][key] for r in rounds)


# ------------------------------------------------------------------------------------------ worker mode


def reference_rate(clips: list[tuple[bytes, int]], n: int, cfg: StreamConfig, workers: int, pool,
                   zero_copy: bool = False) -> float:
    """Clips/s of raw decord decoding of ``n`` clips' sampled frames (in a pool of ``workers``)."""
    jobs = [(clips[k % len(clips)][0], clips[k % len(clips)][1], cfg.frames, cfg.stride_policy, cfg.stride, k,
             zero_copy) for k in range(n)]
    start = time.perf_counter()
    for _ in pool.imap_unordered(_decode_one, jobs, chunksize=4):
        pass
    return n / (time.perf_counter() - start)


def stream_rate(shards: Path, n_batches: int, cfg: StreamConfig, epoch: int) -> float:
    """Clips/s of the training stream over ``n_batches`` batches (including worker start-up)."""
    step = stream_step(shards, cfg, n_batches, epoch)
    start = time.perf_counter()
    clips = sum(step()[0] for _ in range(n_batches))
    return clips / (time.perf_counter() - start)


# ------------------------------------------------------------------------------------------ memory


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
           "--batch-size", str(args.batch_size), "--video-dtype", args.video_dtype, "--backend", args.backend]
    out = subprocess.run(cmd, check=True, capture_output=True, text=True).stdout
    return json.loads(out.strip().splitlines()[-1])


def stream_config(args: argparse.Namespace) -> StreamConfig:
    return StreamConfig(frames=args.frames, img_size=args.img_size, tubelet=2, patch=16, batch_size=args.batch_size,
                        num_workers=args.workers, decoder_keep_ratio=0.5, seed=0, log_skips=0,
                        video_dtype=args.video_dtype, repeats=args.repeats, backend=args.backend)


def add_geometry_args(parser: argparse.ArgumentParser) -> None:
    """The arguments this script shares with ``bench_loader_levers.py``: the built set and the stream's geometry."""
    parser.add_argument("--clips", type=int, default=64, help="clips in the built shard set")
    parser.add_argument("--clip-frames", type=int, default=40, help="typical clip length of the built set")
    parser.add_argument("--frames", type=int, default=16)
    parser.add_argument("--img-size", type=int, default=112)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--video-dtype", choices=("float32", "uint8"), default="float32",
                        help="stream output: normalised float32 (default) or uint8 left for the accelerator")
    parser.add_argument("--batches", type=int, default=24, help="batches per side per timed round")
    parser.add_argument("--rounds", type=int, default=3, help="timed rounds")
    parser.add_argument("--gpu-clips-per-s", type=float, default=None,
                        help="an accelerator's training rate: print the CPU cores the stream needs to feed it")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_geometry_args(parser)
    parser.add_argument("--shards", type=Path, default=None, help="existing shard folder (default: build one)")
    parser.add_argument("--short-side", type=int, default=128)
    parser.add_argument("--tune", default=None, help="built set: x264 tuning (e.g. fastdecode)")
    parser.add_argument("--bframes", type=int, default=None, help="built set: non-reference B-frames")
    parser.add_argument("--keyint", type=int, default=None, help="built set: keyframe interval")
    parser.add_argument("--backend", choices=("pyav", "decord"), default=StreamConfig.backend,
                        help="the stream's decoder (default: the stream's own)")
    parser.add_argument("--workers", type=int, default=0, help="worker processes on both sides (0: in-process)")
    parser.add_argument("--rss-batches", type=int, default=20, help="batches of the 1x memory run")
    parser.add_argument("--repeats", type=int, default=1,
                        help="stream: crops + masks per decoded clip (training samples = clips x repeats)")
    parser.add_argument("--reference", choices=("asnumpy", "zero-copy"), default="asnumpy",
                        help="how the reference takes decord's frames: its documented .asnumpy() copy (default) or "
                             "the batch's own memory over DLPack")
    parser.add_argument("--rss-child", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)
    if args.rss_child:
        rss_child(args)
        return

    with tempfile.TemporaryDirectory(prefix="bench_loader_") as tmp:
        shards = args.shards
        if shards is None:
            encoding = {k: v for k in ("tune", "bframes", "keyint") if (v := getattr(args, k)) is not None}
            shards = build_bench_shards(Path(tmp), args.clips, args.clip_frames, args.short_side, 0, **encoding)
        by_id = load_clips(shards)
        cfg = stream_config(args)
        zero_copy = args.reference == "zero-copy"
        if args.workers == 0:
            floors = floor_clips(by_id, cfg, set_encoding(shards))
            names = {"ref": f"raw decord decode ({args.reference})", "intra": "floor, intra-only",
                     "alone": "floor, frames alone", "stream": "training stream (mgfm)"}

            def make_sides(r: int) -> list[Side]:
                return [Side(names["stream"], stream_step(shards, cfg, args.batches if r >= 0 else 2, 99 if r < 0 else r)),
                        Side(names["ref"], decode_step(by_id, cfg, r + 1, raw_decord(by_id, cfg, zero_copy))),
                        Side(names["intra"], decode_step(by_id, cfg, r + 1, floor_decoder(floors, "intra"))),
                        Side(names["alone"], decode_step(by_id, cfg, r + 1, floor_decoder(floors, "alone")))]

            rounds = interleaved(make_sides, args.batches, args.rounds)
            rounds = [{key: r[name] for key, name in names.items()} for r in rounds]
        else:
            rounds = []
            clips = list(by_id.values())
            with multiprocessing.get_context("fork").Pool(args.workers) as pool:
                reference_rate(clips, min(len(clips), 16), cfg, args.workers, pool, zero_copy)  # warm-up
                stream_rate(shards, 2, cfg, epoch=99)
                for r in range(args.rounds):
                    ref = reference_rate(clips, args.batches * args.batch_size, cfg, args.workers, pool, zero_copy)
                    ours = stream_rate(shards, args.batches, cfg, epoch=r)
                    rounds.append({"stream": {"clips_per_s": ours}, "ref": {"clips_per_s": ref}})
        small = peak_rss(shards, args.rss_batches, args)
        large = peak_rss(shards, 4 * args.rss_batches, args)
        report(args, cfg, rounds, by_id, shards, small, large)


def report(args: argparse.Namespace, cfg: StreamConfig, rounds: list[dict], by_id: dict, shards: Path, small: dict,
           large: dict) -> None:
    def per_round(side: str) -> str:
        return ", ".join(f"{r[side]['clips_per_s']:.1f}" for r in rounds)

    enc = set_encoding(shards)
    how = "interleaved batch by batch in one process" if args.workers == 0 else \
        f"{args.workers} worker processes on both sides, alternating rounds"
    print(f"shard set: {len(by_id)} clips, mean {statistics.mean(n for _, n in by_id.values()):.1f} frames, "
          f"{mean_kib(by_id):.1f} KiB per clip (crf {enc.crf}, tune {enc.tune or '-'}, bframes "
          f"{'-' if enc.bframes is None else enc.bframes}, keyint {enc.keyint or '-'}); sampling {args.frames} frames "
          f"({cfg.stride_policy}, max stride {cfg.stride}); crop {args.img_size}; batch {args.batch_size}; video "
          f"{args.video_dtype}; stream decoder {args.backend}; {how}; {args.rounds} rounds of "
          f"{args.batches * args.batch_size} clips")
    sides = [("ref", f"raw decord decode ({args.reference})"), ("intra", "floor, intra-only"),
             ("alone", "floor, frames alone"), ("stream", "training stream (mgfm)")]
    sides = [s for s in sides if s[0] in rounds[0]]
    cpu = args.workers == 0
    print(f"{'side':<34}{'clips/s (median)':>18}{'clips/CPU-s' if cpu else '':>13}   per round")
    for key, name in sides:
        rate = statistics.median(r[key]["clips_per_s"] for r in rounds)
        print(f"{name:<34}{rate:>18.1f}{f'{median(rounds, key):.1f}' if cpu else '':>13}   {per_round(key)}")
    ratio = median_ratio(rounds, "stream", "ref")
    print(f"ratio stream / raw decode: {ratio:.2f} (median of per-round ratios "
          + ", ".join(f"{r['stream']['clips_per_s'] / r['ref']['clips_per_s']:.2f}" for r in rounds) + ")")
    if not cpu:
        rss_line(small, large)
        return
    print(f"ratio stream / floor: {median_ratio(rounds, 'stream', 'intra'):.2f} (intra-only), "
          f"{median_ratio(rounds, 'stream', 'alone'):.2f} (frames alone)")
    print(f"ratio of CPU time (reference / stream): {median_ratio(rounds, 'stream', 'ref', 'clips_per_cpu_s'):.2f}")
    per_core = median(rounds, "stream")
    print(f"clips per CPU-second (= clips/s per core): raw decode {median(rounds, 'ref'):.1f}, stream {per_core:.1f}")
    samples = per_core * args.repeats
    if args.repeats > 1:
        print(f"training samples per CPU-second (clips x {args.repeats} repeats): {samples:.1f}")
    if args.gpu_clips_per_s:
        print(f"cores to feed {args.gpu_clips_per_s:.0f} training samples/s: {args.gpu_clips_per_s / samples:.0f} "
              f"(stream at {samples:.1f} samples/s per core)")
    rss_line(small, large)


def rss_line(small: dict, large: dict) -> None:
    grow = (large["peak_rss_mib"] + large["peak_worker_rss_mib"]) / (small["peak_rss_mib"] + small["peak_worker_rss_mib"])
    print(f"peak RSS streaming {small['batches']} batches: {small['peak_rss_mib']:.0f} MiB "
          f"(+ workers {small['peak_worker_rss_mib']:.0f} MiB); {large['batches']} batches: "
          f"{large['peak_rss_mib']:.0f} MiB (+ workers {large['peak_worker_rss_mib']:.0f} MiB); ratio 4x/1x {grow:.2f}")


if __name__ == "__main__":
    main()
