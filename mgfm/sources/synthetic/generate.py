"""Render a planned synthetic dataset to disk in iMiGUE's own format.

Output folder::

    synthetic.json        the generating config (written first; a resume with another config is refused)
    videos/<id>.mp4       one long "interview" video per plan video (H.264, written atomically)
    labels.csv            iMiGUE columns (video_id,label_id,start_time,...,win_or_lose); written last
    protocol.json         recognition subject split, emotion video split, classes, fps; written last

Rendering is parallel over processes (one video per task), deterministic for a seed, and resumable:
a video whose file exists is not rendered again, and a finished folder is left untouched.
"""

from __future__ import annotations

import csv
import io
import json
import logging
import multiprocessing
import time
from concurrent.futures import ProcessPoolExecutor, as_completed
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import numpy as np
from tqdm import tqdm
import cv2

from mgfm.sources.imigue import CLASS_NAMES, ILLUSTRATIVE_CLASS
from mgfm.sources.synthetic.body import Pose, SubjectLook
from mgfm.sources.synthetic.gestures import GESTURES, apply_idle, idle_motion, make_motion
from mgfm.sources.synthetic.plan import DatasetPlan, SyntheticConfig, VideoPlan, make_plan
from mgfm.sources.synthetic.render import FigureRenderer
from mgfm.files import write_atomic
from mgfm.runtime import exit_with_parent
from mgfm.sources.video_io import H264Encoding, VideoWriter

logger = logging.getLogger(__name__)

GENERATOR_VERSION = 1
CONFIG_FILE = "synthetic.json"
LABELS_FILE = "labels.csv"
PROTOCOL_FILE = "protocol.json"
VIDEO_DIR = "videos"
CSV_COLUMNS = ("video_id", "label_id", "start_time", "start_frame", "end_time", "end_frame", "class", "subject_id",
               "subject_gender", "subject_nationality", "win_or_lose")


@dataclass
class GenerationStats:
    """What one :func:`generate_with_stats` call did. ``render_s``/``encode_s``: CPU seconds summed over workers."""

    csv_path: Path
    videos_rendered: int = 0
    videos_skipped: int = 0
    frames: int = 0
    render_s: float = 0.0
    encode_s: float = 0.0
    wall_s: float = 0.0
    workers: int = 1

    def speed_line(self) -> str:
        if not self.frames:
            return f"nothing rendered ({self.videos_skipped} videos already complete)"
        core_render = self.frames / max(self.render_s, 1e-9)
        core_total = self.frames / max(self.render_s + self.encode_s, 1e-9)
        return (f"rendered {self.frames} frames ({self.videos_rendered} videos) in {self.wall_s:.1f} s with "
                f"{self.workers} worker(s) = {self.frames / max(self.wall_s, 1e-9):.0f} frames/s; per CPU core: render "
                f"{core_render:.0f} frames/s, render+encode {core_total:.0f} frames/s "
                f"(encode share {self.encode_s / max(self.render_s + self.encode_s, 1e-9):.0%})")


# ----------------------------------------------------------------------------- rendering
def render_frames(video: VideoPlan, look: SubjectLook, config: SyntheticConfig) -> Iterator[np.ndarray]:
    """Yield the video's frames, each (H, W, 3) uint8 RGB. The same buffer is reused: copy to keep one."""
    renderer = FigureRenderer(look, config.height, config.frame_width, video.seed)
    idle = idle_motion(look, video.n_frames, config.fps, video.seed)
    pose = Pose(look)
    buf = np.empty((config.height, config.frame_width, 3), np.uint8)
    clips = list(video.clips)
    k = 0
    motion = None
    for f in range(video.n_frames):
        apply_idle(pose, idle, f)
        while k < len(clips) and clips[k].end < f:
            k += 1
            motion = None
        if k < len(clips) and clips[k].start <= f:
            clip = clips[k]
            if motion is None:
                motion = make_motion(look, clip.length, config.fps, clip.seed)
            GESTURES[clip.label](pose, motion, f - clip.start)
        yield renderer.render(pose, buf)


def render_video(video: VideoPlan, look: SubjectLook, config: SyntheticConfig, path: Path) -> tuple[int, float, float]:
    """Render and encode one video to ``path`` (atomic) -> (frames, render CPU seconds, encode CPU seconds).

    CPU time of this process, so the per-core speed it gives is not skewed by other load on the machine.
    """
    cv2.setNumThreads(1)
    render_s = encode_s = 0.0
    writer = VideoWriter(path, config.fps, config.height, config.frame_width, H264Encoding(crf=config.crf))
    frames = render_frames(video, look, config)
    n = 0
    clock = time.process_time
    while True:
        t0 = clock()
        frame = next(frames, None)
        t1 = clock()
        render_s += t1 - t0
        if frame is None:
            break
        writer.write(frame)
        encode_s += clock() - t1
        n += 1
    t0 = clock()
    writer.close()
    encode_s += clock() - t0
    return n, render_s, encode_s


def _render_task(args: tuple) -> tuple[int, int, float, float]:
    video, look, config, path = args
    n, r, e = render_video(video, look, config, Path(path))
    return video.video_id, n, r, e


# ----------------------------------------------------------------------------- annotation files
def labels_csv(plan: DatasetPlan) -> str:
    """The plan's clips as an iMiGUE-format CSV (class 1..31 and 99; Win = positive)."""
    buf = io.StringIO()
    writer = csv.writer(buf, lineterminator="\n")
    writer.writerow(CSV_COLUMNS)
    fps = plan.config.fps
    last = len(CLASS_NAMES) - 1
    for video in plan.videos:
        look = plan.looks[video.subject_id]
        for i, clip in enumerate(video.clips, start=1):
            writer.writerow((
                video.video_id, i, f"{clip.start / fps:.4f}", clip.start, f"{clip.end / fps:.4f}", clip.end,
                ILLUSTRATIVE_CLASS if clip.label == last else clip.label + 1, video.subject_id, look.gender,
                look.nationality, "Win" if video.emotion == 1 else "Lose",
            ))  # fmt: skip
    return buf.getvalue()


def protocol(plan: DatasetPlan) -> dict:
    """``protocol.json`` in the shape of the iMiGUE one (readable by :func:`mgfm.sources.imigue.read_imigue`)."""
    n_train = sum(len(v.clips) for v in plan.videos if plan.split_of(v.subject_id) == "train")
    n_all = sum(len(v.clips) for v in plan.videos)
    return {
        "description": "Synthetic micro-gesture benchmark (mgfm.sources.synthetic): iMiGUE's classes, format and "
                       "protocol shape. Class ids are 0-based: CSV column 'class' k in 1..31 maps to k-1, 99 to 31.",
        "fps": plan.config.fps,
        "recognition": {
            "train_subjects": list(plan.train_subjects),
            "test_subjects": list(plan.test_subjects),
            "published_counts": {"train": n_train, "test": n_all - n_train},
        },
        "emotion": {
            "label_from": "win_or_lose (Win=positive, Lose=negative)",
            "train_videos": list(plan.emotion_train_videos),
            "test_videos": list(plan.emotion_test_videos),
        },
        "classes": list(CLASS_NAMES),
    }


def _config_record(config: SyntheticConfig) -> dict:
    return {"generator_version": GENERATOR_VERSION, "config": config.identity()}


def _check_config(out: Path, config: SyntheticConfig) -> None:
    """Write the config record, or refuse when the folder was made with another one."""
    path = out / CONFIG_FILE
    record = _config_record(config)
    if path.exists():
        try:
            old = json.loads(path.read_text())
        except (OSError, json.JSONDecodeError) as err:
            raise ValueError(f"{path}: unreadable generator record ({err}); delete the folder to regenerate") from None
        if old != record:
            diff = sorted(k for k in record["config"] if old.get("config", {}).get(k) != record["config"][k])
            raise ValueError(f"{path}: folder was generated with a different config (differs in "
                             f"{diff or ['generator_version']}); use another --out or delete it")
        return
    write_atomic(path, json.dumps(record, indent=1) + "\n")


def is_rendered(out_dir: str | Path, config: SyntheticConfig) -> bool:
    """True when ``out_dir`` holds a finished dataset made with ``config`` (nothing left to do)."""
    out = Path(out_dir)
    try:
        record = json.loads((out / CONFIG_FILE).read_text())
    except (OSError, json.JSONDecodeError):
        return False
    if record != _config_record(config) or not (out / LABELS_FILE).exists() or not (out / PROTOCOL_FILE).exists():
        return False
    plan = make_plan(config)
    return all((out / VIDEO_DIR / f"{v.video_id}.mp4").exists() for v in plan.videos)


# ----------------------------------------------------------------------------- driver
def generate_with_stats(out_dir: str | Path, config: SyntheticConfig | None = None,
                        progress: bool = True) -> GenerationStats:
    """Generate (or finish) the dataset in ``out_dir``; see :func:`generate`. Returns what was done."""
    config = config or SyntheticConfig()
    out = Path(out_dir)
    csv_path = out / LABELS_FILE
    stats = GenerationStats(csv_path=csv_path, workers=config.workers)
    out.mkdir(parents=True, exist_ok=True)
    _check_config(out, config)
    plan = make_plan(config)
    video_dir = out / VIDEO_DIR
    video_dir.mkdir(exist_ok=True)
    for stale in video_dir.glob("*.tmp"):  # left by an interrupted run
        stale.unlink()
    todo = [v for v in plan.videos if not (video_dir / f"{v.video_id}.mp4").exists()]
    stats.videos_skipped = len(plan.videos) - len(todo)
    if stats.videos_skipped:
        logger.info("%s: %d of %d videos already rendered, skipping them", out, stats.videos_skipped, len(plan.videos))
    todo.sort(key=lambda v: -v.n_frames)  # longest first balances the workers
    tasks = [(v, plan.looks[v.subject_id], config, str(video_dir / f"{v.video_id}.mp4")) for v in todo]
    t0 = time.perf_counter()
    bar = tqdm(total=sum(v.n_frames for v in todo), unit="frame", desc="render synthetic", disable=not progress,
               smoothing=0.1)
    try:
        if config.workers <= 1 or len(tasks) <= 1:
            results = (_render_task(t) for t in tasks)
            for _, n, r, e in results:
                stats.videos_rendered += 1
                stats.frames, stats.render_s, stats.encode_s = stats.frames + n, stats.render_s + r, stats.encode_s + e
                bar.update(n)
        else:
            ctx = multiprocessing.get_context("spawn")
            with ProcessPoolExecutor(max_workers=config.workers, mp_context=ctx, initializer=exit_with_parent) as pool:
                futures = [pool.submit(_render_task, t) for t in tasks]
                try:
                    for fut in as_completed(futures):
                        _, n, r, e = fut.result()
                        stats.videos_rendered += 1
                        stats.frames += n
                        stats.render_s += r
                        stats.encode_s += e
                        bar.update(n)
                except BaseException:
                    for fut in futures:  # finished videos stay on disk; a rerun resumes from them
                        fut.cancel()
                    raise
    finally:
        bar.close()
    stats.wall_s = time.perf_counter() - t0
    # Annotations last: their presence marks a finished folder.
    write_atomic(out / PROTOCOL_FILE, json.dumps(protocol(plan), indent=1) + "\n")
    write_atomic(csv_path, labels_csv(plan))
    return stats


def generate(out_dir: str | Path, config: SyntheticConfig | None = None) -> Path:
    """Generate the synthetic benchmark into ``out_dir`` (skipping finished work) -> path of ``labels.csv``.

    Read it back with ``read_imigue(out/labels.csv, protocol=out/protocol.json, video_dir=out/videos)``.
    """
    config = config or SyntheticConfig()
    out = Path(out_dir)
    if is_rendered(out, config):
        logger.info("%s: synthetic dataset already complete", out)
        return out / LABELS_FILE
    stats = generate_with_stats(out, config)
    logger.info("%s", stats.speed_line())
    return stats.csv_path
