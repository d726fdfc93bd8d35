"""The loader's levers, each alone and together, side by side in one run: decoding cost per training clip.

    python benchmarks/bench_loader_levers.py                       # 224 px crops, 16 frames, uint8 (ViT-B)
    python benchmarks/bench_loader_levers.py --gpu-clips-per-s 1950 --batches 12 --rounds 3

One clip index (textured, moving source videos rendered larger than any stored format, as a camera's are,
so every format is a resize; clips of ~40 frames: the iMiGUE median; ``bench_loader.bench_index``) is
sharded once per stored format. Two measurements:

1. **Bytes for speed**: per stored format, the mean mp4 bytes per clip, their fidelity (PSNR of the decoded
   clips to the frames the builder encoded), and the CPU time to decode one sample's frames (the stream's
   sampling policy, the same draws for every format) with decord (what the stream used before) and with the
   stream's PyAV decoder, each against decord on today's format, formats interleaved.
2. **Levers**: the training stream (``make_loader(..., mode="train")``, in this process) with one lever
   changed at a time against today's stream, then all of them together, plus raw decoding and the floor
   (the sampled frames stored alone, decoded whole: ``bench_loader.floor_clips``), all interleaved batch by
   batch (``bench_loader.interleaved``); clips and training samples per CPU-second of this process, the ratio
   to today's stream (median over rounds of the per-round ratios), and with ``--gpu-clips-per-s`` the CPU
   cores one accelerator needs.
"""

from __future__ import annotations

import argparse
import dataclasses
import logging
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np

from gpu_check_legs import GPU_FORMAT  # noqa: E402
from bench_loader import (Side, add_geometry_args, bench_index, build_set, decode_step, floor_clips,  # noqa: E402
                          floor_decoder, interleaved, load_clips, mean_kib, median, median_ratio, raw_decoder,
                          set_encoding, stream_step)
from mgfm.data.sampling import sample_indices  # noqa: E402
from mgfm.data.stream import StreamConfig  # noqa: E402
from mgfm.sources.video_io import decode_frames  # noqa: E402

SOURCE_SCALE = 1.25  # source videos' short side over the largest stored one
TODAY, NEW = "today", "new"


def formats(today: int, train: int) -> dict[str, tuple[str, int, dict]]:
    """Stored formats: key -> (name, short side, BuildConfig encoding fields). ``today`` is the short side the
    README's iMiGUE command stored before (256), ``train`` the crop (storage at the training size, 224)."""
    bframes = {"bframes": GPU_FORMAT["bframes"]}
    rows = [(TODAY, today, {}), ("fd", today, {"tune": "fastdecode"}), ("b", today, bframes),
            ("train", train, {}), ("train fd", train, {"tune": "fastdecode"}), ("train b", train, bframes),
            (NEW, train, GPU_FORMAT), ("train fd b3", train, {"tune": "fastdecode", "bframes": 3}),
            ("train fd k16", train, {**GPU_FORMAT, "keyint": 16}),
            ("train fd k1", train, {"tune": "fastdecode", "keyint": 1})]
    out = {}
    for key, side, enc in rows:
        text = ", ".join(f"{k} {v}" for k, v in enc.items()).replace("tune ", "") or "x264 defaults"
        out[key] = (f"{side}, {text}" + (" (today)" if key == TODAY else " (new)" if key == NEW else ""), side, enc)
    return out


def bytes_for_speed(sets: dict[str, Path], cfg: StreamConfig, repeats: int) -> dict[str, dict]:
    """Per format: KiB per clip, ms of CPU per sample with each decoder (medians over ``repeats`` interleaved
    passes over every clip, the same draws for every format)."""
    clips = {name: load_clips(path) for name, path in sets.items()}
    keys = sorted(clips[TODAY])
    rng = np.random.default_rng(0)
    draws = {k: sample_indices(clips[TODAY][k][1], cfg.frames, cfg.stride_policy, cfg.stride, rng).tolist()
             for k in keys}
    times: dict[tuple[str, str], list[float]] = {}
    jobs = [(name, backend) for name in sets for backend in ("decord", "pyav")]
    for r in range(repeats):
        for j in range(len(jobs)):
            name, backend = jobs[(j + r) % len(jobs)]
            start = time.process_time()
            for k in keys:
                decode_frames(clips[name][k][0], draws[k], backend=backend)
            times.setdefault((name, backend), []).append(1000 * (time.process_time() - start) / len(keys))
    ref = statistics.median(times[(TODAY, "decord")])
    return {name: {"kib": mean_kib(clips[name]),
                   **{f"{b}_ms": statistics.median(times[(name, b)]) for b in ("decord", "pyav")},
                   **{f"{b}_speedup": ref / statistics.median(times[(name, b)]) for b in ("decord", "pyav")}}
            for name in sets}


def fidelity(index, sets: dict[str, Path]) -> dict[str, float]:
    """Per format: PSNR (dB) of its decoded clips against the frames the builder encoded (the source frames
    converted and resized by the builder's own call), over every frame of every clip."""
    import av

    clips = {name: load_clips(path) for name, path in sets.items()}
    error, count = dict.fromkeys(sets, 0.0), dict.fromkeys(sets, 0)
    for path in sorted({c.path for c in index}):
        with av.open(path) as container:
            source = list(container.decode(video=0))
        for clip in (c for c in index if c.path == path):
            for name in sets:
                decoded = decode_frames(clips[name][clip.clip_id][0], None, backend="pyav").astype(np.float64)
                _, h, w, _ = decoded.shape
                encoded = np.stack([f.to_ndarray(format="rgb24", height=h, width=w)  # as mgfm.shards.build does
                                    for f in source[clip.start_frame:clip.start_frame + len(decoded)]])
                error[name] += float(((decoded - encoded) ** 2).sum())
                count[name] += decoded.size
    return {name: 10 * np.log10(255.0**2 / (error[name] / count[name])) for name in sets}


def lever_sides(sets: dict[str, Path], cfg: StreamConfig, args: argparse.Namespace):
    """name -> how to make the side for round ``r`` (a :class:`Side` factory), the baseline first."""
    decord = dataclasses.replace(cfg, backend="decord", fallback_backend="pyav")
    pyav = dataclasses.replace(cfg, backend="pyav", fallback_backend="decord")
    new_clips = load_clips(sets[NEW])
    floors = floor_clips(new_clips, cfg, set_encoding(sets[NEW]))

    def stream(path: Path, stream_cfg: StreamConfig):
        return lambda r: stream_step(path, stream_cfg, args.batches if r >= 0 else 2, 99 if r < 0 else r)

    def raw(kind: str):
        decode = floor_decoder(floors, kind) if kind != "pyav" else raw_decoder(new_clips, cfg, "pyav")
        return lambda r: decode_step(new_clips, cfg, r + 1, decode)

    repeat2 = {"repeats": 2}
    return {
        BASELINE: stream(sets[TODAY], decord),
        "decoder alone: pyav": stream(sets[TODAY], pyav),
        "storage alone: at the crop size": stream(sets["train"], decord),
        "encoding alone: fastdecode": stream(sets["fd"], decord),
        f"encoding alone: bframes {GPU_FORMAT['bframes']}": stream(sets["b"], decord),
        f"decoder + bframes {GPU_FORMAT['bframes']}": stream(sets["b"], pyav),
        COMBINED: stream(sets[NEW], pyav),
        "today, repeats 2": stream(sets[TODAY], dataclasses.replace(decord, **repeat2)),
        "all together, repeats 2": stream(sets[NEW], dataclasses.replace(pyav, **repeat2)),
        RAW: raw("pyav"),
        FLOOR: raw("alone"),
        FLOOR_INTRA: raw("intra"),
    }


BASELINE, COMBINED = "today: decord, x264 defaults, stored larger", "all together (new defaults)"
RAW, FLOOR, FLOOR_INTRA = "raw decode (new set, pyav)", "floor: frames alone (new encoding)", "floor: frames alone, intra-only"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_geometry_args(parser)
    parser.set_defaults(img_size=224, video_dtype="uint8", batches=12)
    parser.add_argument("--decode-repeats", type=int, default=3, help="interleaved passes of the bytes-for-speed table")
    parser.add_argument("--today-side", type=int, default=256, help="the short side stored before (README's iMiGUE)")
    parser.add_argument("--train-side", type=int, default=224, help="storage at the training size (the crop)")
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)
    cfg = StreamConfig(frames=args.frames, img_size=args.img_size, tubelet=2, patch=16, batch_size=args.batch_size,
                       num_workers=0, decoder_keep_ratio=0.5, seed=0, log_skips=0, video_dtype=args.video_dtype)
    t0 = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="bench_levers_") as tmp:
        stored = formats(args.today_side, args.train_side)
        source_side = 2 * round(SOURCE_SCALE * max(side for _, side, _ in stored.values()) / 2)
        index = bench_index(Path(tmp) / "sources", args.clips, args.clip_frames, source_side, 0)
        sets = {key: build_set(index, Path(tmp) / f"set{k}", side, args.clips, **enc)
                for k, (key, (_, side, enc)) in enumerate(stored.items())}
        built = time.perf_counter() - t0
        table = bytes_for_speed(sets, cfg, args.decode_repeats)
        psnr = fidelity(index, sets)
        factories = lever_sides(sets, cfg, args)
        rounds = interleaved(lambda r: [Side(name, make(r)) for name, make in factories.items()], args.batches,
                             args.rounds)
    print(f"{args.clips} clips of ~{args.clip_frames} frames from {source_side}-px sources; sampling {args.frames} frames ({cfg.stride_policy}, "
          f"max stride {cfg.stride}); crop {args.img_size}; batch {args.batch_size}; video {args.video_dtype}; "
          f"shards built in {built:.0f} s; {args.rounds} rounds of {args.batches} batches per side, interleaved")
    print("\nbytes for speed (decode one sample's frames; ms of CPU per clip, median of "
          f"{args.decode_repeats} interleaved passes)")
    print(f"{'stored format':<42}{'KiB/clip':>9}{'PSNR dB':>9}{'decord ms':>11}{'x':>6}{'pyav ms':>10}{'x':>6}")
    for key, row in table.items():
        print(f"{stored[key][0]:<42}{row['kib']:>9.1f}{psnr[key]:>9.2f}{row['decord_ms']:>11.2f}"
              f"{row['decord_speedup']:>6.2f}{row['pyav_ms']:>10.2f}{row['pyav_speedup']:>6.2f}")
    base = next(iter(factories))
    print(f"\nlevers (clips and training samples per CPU-second; ratio to '{base}', median of per-round ratios)")
    print(f"{'side':<46}{'clips/CPU-s':>12}{'samples/CPU-s':>15}{'x clips':>9}{'x samples':>11}"
          + ("   cores/GPU" if args.gpu_clips_per_s else ""))
    for name in factories:
        clips, samples = median(rounds, name), median(rounds, name, "samples_per_cpu_s")
        x_clips = median_ratio(rounds, name, base, "clips_per_cpu_s")
        x_samples = median_ratio(rounds, name, base, "samples_per_cpu_s")
        cores = f"{args.gpu_clips_per_s / samples:>12.1f}" if args.gpu_clips_per_s else ""
        print(f"{name:<46}{clips:>12.1f}{samples:>15.1f}{x_clips:>9.2f}{x_samples:>11.2f}{cores}")
    for today, new in ((BASELINE, "today, repeats 2"), (COMBINED, "all together, repeats 2")):
        extra = statistics.median(1000 / r[new]["clips_per_cpu_s"] - 1000 / r[today]["clips_per_cpu_s"] for r in rounds)
        print(f"an extra view (repeats 2 - repeats 1) of '{today}': {extra:.2f} ms of CPU")
    print("at the new defaults, stream / floor: " + ", ".join(
        f"{median_ratio(rounds, COMBINED, side, 'clips_per_cpu_s'):.2f} ({side})" for side in (FLOOR, FLOOR_INTRA, RAW)))
    print(f"wall time {time.perf_counter() - t0:.0f} s")


if __name__ == "__main__":
    main()
