"""The million-frame soak: the training loader, as a multi-day run uses it, for long enough to see leaks and
slow-downs, and whether each epoch deals every clip exactly once.

    python benchmarks/bench_soak.py                       # builds its shards, >= 1M frames and >= 25 minutes
    python benchmarks/bench_soak.py --minutes 2 --frames 20000 --clips 200   # a quick look

It builds its own shard set (``--clips`` clips of ~40 frames at ``--short-side``, textured and moving), then
``--ranks`` rank processes (each its own ``make_loader`` per epoch, as pretraining's ranks) with ``--workers``
DataLoader workers each stream train epochs at the ViT-B geometry (16 frames, 224 crop, uint8 batches) until
both ``--frames`` frames have been delivered and ``--minutes`` have passed (the epoch under way is
finished). Every minute it prints the clips/s of that minute and the RSS of every process (rank mains and
their loader workers). At the end it checks and prints:

* memory: each rank's RSS from the end of the warm-up (the first 10% of the run, at least one minute) to the
  end, and the loader workers' peak RSS (sampled every 10 s; workers are started anew each epoch), the median
  peak of the workers of the last third of the run against the first third after the warm-up: goal < 5% growth;
* throughput: the clips/s of the last 10 minutes against the first 10 (after the warm-up; on a shorter run
  the last and first third): goal within 10%;
* exactly once: per epoch, the clip ids of all ranks together hold no repeat, and leave out fewer clips than
  ranks x batch (the clips past each rank's last whole batch).

The report also goes to ``--out/soak.json``. Ratios, not wall-clock limits: on a shared machine the absolute
clips/s says little, the slopes do.
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import multiprocessing
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import psutil

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from mgfm.data.stream import StreamConfig, make_loader  # noqa: E402
from mgfm.shards import BuildConfig, build_shards  # noqa: E402
from mgfm.sources.clip_index import Clip, ClipIndex  # noqa: E402
from mgfm.sources.video_io import encode_video  # noqa: E402

log = logging.getLogger("bench_soak")
CLIPS_PER_VIDEO = 10
CLIP_FRAMES = 40  # the iMiGUE median clip length


def build_soak_shards(out: Path, clips: int, short_side: int, seed: int = 0) -> Path:
    """``clips`` train clips of ~40 frames cut from textured, moving source videos, in shards of 25."""
    shards = out / "shards"
    if (shards / "manifest.json").is_file():
        return shards
    rng = np.random.default_rng(seed)
    height, width = short_side, int(round(short_side * 4 / 3 / 2)) * 2
    videos = -(-clips // CLIPS_PER_VIDEO)
    span = CLIP_FRAMES + 8
    texture = (rng.random((height // 8 + 1, width // 8 + 1, 3)) * 160).astype(np.uint8)
    texture = np.kron(texture, np.ones((8, 8, 1), np.uint8))[:height, :width]
    items = []
    for v in range(videos):
        frames = np.empty((CLIPS_PER_VIDEO * span, height, width, 3), np.uint8)
        for t in range(len(frames)):
            frame = np.roll(texture, (t * (1 + v % 3), t * (2 + v % 2)), axis=(0, 1)).copy()
            y = int((height - height // 4) * (0.5 + 0.5 * math.sin(t / 6 + v)))
            x = int((width - width // 4) * (0.5 + 0.5 * math.cos(t / 9 + v)))
            frame[y:y + height // 4, x:x + width // 4] = (230, 200 - 7 * (v % 20), 40)
            frames[t] = frame
        path = out / "sources" / f"v{v:04d}.mp4"
        path.parent.mkdir(parents=True, exist_ok=True)
        encode_video(frames, 25.0, path)
        for j in range(CLIPS_PER_VIDEO):
            if len(items) == clips:
                break
            length = int(np.clip(rng.normal(CLIP_FRAMES, CLIP_FRAMES / 4), 16, 2 * CLIP_FRAMES - 8))
            start = j * span
            items.append(Clip(video_id=f"v{v:04d}", start_frame=start, end_frame=min(start + length, len(frames)) - 1,
                              label=len(items) % 8, subject=str(v % 12), split="train", fps=25.0, path=str(path)))
    index = ClipIndex(items, [f"class_{i}" for i in range(8)], "soak")
    build_shards(index, shards, BuildConfig(short_side=short_side, shard_samples=25, workers=2))
    return shards


def rank_main(rank: int, world: int, shards: str, cfg: StreamConfig, stop, reports) -> None:
    """One rank: train epochs until ``stop`` is set; reports ``("batch", rank, time, clips, frames)`` per batch and
    ``("epoch", rank, epoch, clip ids)`` per finished epoch."""
    logging.basicConfig(level=logging.WARNING)
    epoch = 0
    while not stop.is_set():
        loader, skips = make_loader(shards, "train", cfg, "train", epoch=epoch, rank=rank, world=world)
        seen = []
        for batch in loader:
            seen += batch["clip_id"]
            video = batch["video"]
            reports.put(("batch", rank, time.time(), video.shape[0], video.shape[0] * video.shape[1]))
        reports.put(("epoch", rank, epoch, seen, skips.total))
        epoch += 1
    reports.put(("done", rank))


def family_rss(pids: list[int]) -> dict[tuple[int, int | None], float]:
    """MB of resident memory by (rank, None) for each rank process and (rank, worker pid) for its loader workers."""
    out = {}
    for rank, pid in enumerate(pids):
        try:
            proc = psutil.Process(pid)
            out[(rank, None)] = proc.memory_info().rss / 2**20
            for child in proc.children(recursive=True):
                out[(rank, child.pid)] = child.memory_info().rss / 2**20
        except psutil.NoSuchProcess:
            pass
    return out


def show_rss(rss: dict) -> str:
    ranks = sorted({r for r, _ in rss})
    return "; ".join(f"rank {r} {rss[(r, None)]:.0f}" + "".join(f", worker {v:.0f}" for (q, w), v in sorted(rss.items(), key=str)
                                                        if q == r and w is not None) for r in ranks if (r, None) in rss)


def window_rate(events: list[tuple[float, int]], start: float, end: float) -> float:
    clips = sum(n for t, n in events if start <= t < end)
    return clips / max(1e-9, end - start)


def analyse(events, minutes, workers, epochs, clips_total, world, batch, started, ended, warmup) -> dict:
    """The memory, throughput and exactly-once verdicts (see the module docstring)."""
    run_s = ended - started
    window = 600.0 if run_s - warmup >= 1200 else (run_s - warmup) / 3
    first = window_rate(events, started + warmup, started + warmup + window)
    last = window_rate(events, ended - window, ended)
    after = [m for m in minutes if m["t"] >= warmup]
    rss = {}
    for rank in range(world):
        series = [m["ranks_mb"][rank] for m in after if rank < len(m["ranks_mb"])]
        if len(series) >= 2:
            rss[f"rank {rank}"] = {"start_mb": series[0], "end_mb": series[-1], "growth": series[-1] / series[0] - 1}
    peaks = [peak for first_seen, peak in sorted(workers.values()) if first_seen >= warmup]
    third = len(peaks) // 3
    if third >= 1:
        early, late = statistics.median(peaks[:third]), statistics.median(peaks[-third:])
        rss["loader workers (median peak)"] = {"start_mb": early, "end_mb": late, "growth": late / early - 1,
                                               "workers": len(peaks)}
    exact = []
    for epoch, per_rank in sorted(epochs.items()):
        if len(per_rank) < world:
            continue
        ids = [c for ids in per_rank.values() for c in ids]
        exact.append({"epoch": epoch, "clips": len(ids), "repeats": len(ids) - len(set(ids)),
                      "left_out": clips_total - len(set(ids))})
    return {
        "seconds": run_s, "warmup_s": warmup, "window_s": window,
        "clips_per_s": {"first_window": first, "last_window": last, "ratio_last_to_first": last / max(1e-9, first),
                        "whole_run": sum(n for _, n in events) / run_s},
        "rss": rss, "epochs": exact,
        "goals": {
            "rss_growth_below_5pct": all(v["growth"] < 0.05 for v in rss.values()),
            "throughput_within_10pct": abs(last / max(1e-9, first) - 1) <= 0.10,
            "every_clip_once_per_epoch": bool(exact) and all(e["repeats"] == 0 and e["left_out"] < world * batch
                                                             for e in exact),
        },
    }


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--frames", type=int, default=1_000_000, help="frames to deliver at least (T per clip)")
    ap.add_argument("--minutes", type=float, default=25.0, help="and stream for at least this long")
    ap.add_argument("--clips", type=int, default=1000)
    ap.add_argument("--ranks", type=int, default=2)
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--short-side", type=int, default=256)
    ap.add_argument("--img-size", type=int, default=224)
    ap.add_argument("--out", type=Path, default=None, help="where the shards and soak.json go (default: a temp dir)")
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s", datefmt="%H:%M:%S")
    out = args.out or Path(tempfile.mkdtemp(prefix="soak-"))
    shards = build_soak_shards(out, args.clips, args.short_side)
    cfg = StreamConfig(frames=16, img_size=args.img_size, tubelet=2, patch=16, batch_size=args.batch_size,
                       num_workers=args.workers, video_dtype="uint8", mask_ratio=0.9)

    ctx = multiprocessing.get_context("fork")  # rank processes start their loader workers by fork, as under torchrun
    stop, reports = ctx.Event(), ctx.Queue()
    procs = [ctx.Process(target=rank_main, args=(r, args.ranks, str(shards), cfg, stop, reports))
             for r in range(args.ranks)]
    started = time.time()
    for proc in procs:
        proc.start()
    events: list[tuple[float, int]] = []
    epochs: dict[int, dict[int, list[str]]] = {}
    minutes: list[dict] = []
    workers: dict[int, tuple[float, float]] = {}  # worker pid -> (first seen, s after start; peak RSS MB)
    frames, done, next_minute, next_sample, skipped = 0, 0, started + 60, started, 0
    log.info("soak: %d ranks x %d workers, %d clips, until %d frames and %.0f minutes", args.ranks, args.workers,
             args.clips, args.frames, args.minutes)
    while done < args.ranks:
        now = time.time()
        if now >= next_sample:
            rss = family_rss([p.pid for p in procs])
            for (_, pid), mb in rss.items():
                if pid is not None:
                    first, peak = workers.get(pid, (now - started, 0.0))
                    workers[pid] = (first, max(peak, mb))
            next_sample += 10
        if now >= next_minute:
            rate = window_rate(events, next_minute - 60, next_minute)
            minutes.append({"t": next_minute - started, "clips_per_s": rate, "frames": frames,
                            "ranks_mb": [rss.get((r, None), 0.0) for r in range(args.ranks)]})
            log.info("minute %3d: %6.1f clips/s, %9d frames; RSS MB %s", len(minutes), rate, frames, show_rss(rss))
            next_minute += 60
        if frames >= args.frames and now - started >= args.minutes * 60:
            stop.set()
        try:
            item = reports.get(timeout=1)
        except Exception:  # queue.Empty
            continue
        if item[0] == "batch":
            events.append((item[2], item[3]))
            frames += item[4]
        elif item[0] == "epoch":
            epochs.setdefault(item[2], {})[item[1]] = item[3]
            skipped += item[4]
        else:
            done += 1
    ended = time.time()
    for proc in procs:
        proc.join()
    warmup = max(60.0, 0.1 * (ended - started))
    report = analyse(events, minutes, workers, epochs, args.clips, args.ranks, args.batch_size, started, ended, warmup)
    report.update(frames=frames, clips=args.clips, ranks=args.ranks, workers=args.workers, skipped=skipped,
                  minutes=minutes, command=" ".join(sys.argv))
    (out / "soak.json").write_text(json.dumps(report, indent=1))
    cps = report["clips_per_s"]
    print(f"\nsoak: {frames:,} frames in {report['seconds'] / 60:.1f} min, {cps['whole_run']:.1f} clips/s; "
          f"{len(report['epochs'])} whole epochs, {skipped} skips")
    print(f"throughput: first {report['window_s'] / 60:.1f} min {cps['first_window']:.1f} clips/s, last "
          f"{cps['last_window']:.1f}: ratio {cps['ratio_last_to_first']:.3f}")
    for name, v in report["rss"].items():
        print(f"RSS {name}: {v['start_mb']:.0f} -> {v['end_mb']:.0f} MB ({100 * v['growth']:+.1f}%)")
    print(f"exactly once: {sum(e['repeats'] for e in report['epochs'])} repeats, at most "
          f"{max((e['left_out'] for e in report['epochs']), default=0)} clips left out per epoch "
          f"(< {args.ranks * args.batch_size} allowed)")
    print("goals: " + ", ".join(f"{k} {'yes' if v else 'NO'}" for k, v in report["goals"].items()))
    print(f"report: {out / 'soak.json'}")
    return report


if __name__ == "__main__":
    main()
