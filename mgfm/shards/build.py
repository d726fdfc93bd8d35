"""Cut every clip of a clip index out of its source video, re-encode it, write WebDataset shards.

One sample = one clip: ``<clip_id>.mp4`` (H.264, short side ``short_side``, aspect kept, even sizes)
and ``<clip_id>.json`` (the clip-index row plus ``n_frames``, ``fps``, ``height``, ``width`` and the
context frames actually added). Train / test / ... go to separate shard series
(``train-000000.tar``, ...).

How the work is split is the plan (:mod:`mgfm.shards.plan`), a deterministic function of the index and
the config. ``--part i/N`` builds the shards whose global number is ``i`` modulo ``N``; the parts are
disjoint and their union is the whole plan. A worker process builds one shard: it reads each source video once,
decoding sequentially with PyAV up to the last frame any clip in the shard needs, and feeds the frames
to one encoder per open clip. Finished shards are skipped on a rerun (see :mod:`mgfm.shards.manifest`).

A missing or undecodable source video skips its clips with a warning (the first few of each kind of
reason; the rest are counted); they are listed under ``skipped`` in the manifest. A build in which a split
(or every split) came out without a single sample is an error naming the split and why its clips were
skipped. Temporary files a killed build left are removed by the next run. Pose sources (``pose_layout`` set) are not decoded but drawn: each pose file is
read once and its clips rendered as stick figures (:mod:`mgfm.sources.pose`) at ``short_side`` square and
``pose_fps``; an unreadable pose file is skipped and listed the same way.
"""

from __future__ import annotations

import collections
import concurrent.futures
import itertools
import json
import logging
import math
import multiprocessing
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator

from tqdm import tqdm
from tqdm.contrib.logging import logging_redirect_tqdm
from webdataset import TarWriter

from mgfm.sources.clip_index import Clip, ClipIndex
from mgfm.sources.pose import FigureStyle, get_layout, pose_clips
from mgfm.sources.video_io import H264Encoding, VideoWriter
from mgfm.errors import InputError
from mgfm.files import atomic_path, make_folder, sha256_file
from mgfm.runtime import exit_with_parent
from mgfm.shards import manifest as mf
from mgfm.shards.plan import PlannedShard, part_of, plan_hash, plan_shards, write_plan

log = logging.getLogger(__name__)

# Tar member metadata: fixed so rebuilding a shard from the same inputs gives the same bytes.
_TAR_MTIME = 0  # an int: a float mtime makes tarfile add a PAX header to every member
_TAR_OWNER = "mgfm"
_QUEUED_PER_WORKER = 2  # shards handed to the process pool ahead of each worker (keeps it busy, the rows few)


@dataclass(frozen=True)
class BuildConfig:
    """How shards are made. Fields that change the output bytes go into the plan hash."""

    short_side: int = 128  # output short side in pixels; 0 keeps the source size (rounded to even)
    context_frames: int = 0  # frames of context added before and after every clip (when available)
    shard_samples: int | None = None  # clips per shard; when None, shard_mb decides
    shard_mb: float = 64.0  # target shard size in MB (approximate: from a size estimate)
    est_bytes_per_pixel: float = 0.03  # encoded bytes per output pixel per frame, for shard_mb planning
    est_aspect: float = 16 / 9  # long/short side ratio assumed when planning by size
    est_unknown_frames: int = 250  # frames assumed for a clip "to the end" whose length cannot be probed
    # How clips are encoded, flat here for the CLI and the plan hash; defaults and meaning: H264Encoding
    # (crf, preset; tune, bframes, keyint trade bytes for decoding cost, BENCHMARKS.md "Loader")
    crf: int = H264Encoding.crf
    preset: str = H264Encoding.preset
    tune: str | None = H264Encoding.tune
    bframes: int | None = H264Encoding.bframes
    keyint: int | None = H264Encoding.keyint
    source_threads: int = 1  # source decoder threads per process (0 = auto: faster when workers=1)
    max_buffered_frames: int = 1024  # longer clips stream into their encoder (bounded memory, see _ClipEncoder)
    workers: int = 1  # processes; each builds one shard at a time
    part: tuple[int, int] = (0, 1)  # (i, N): build only shards whose number is i modulo N
    splits: tuple[str, ...] | None = None  # only these splits (default: every split in the index)
    pose_layout: str | None = None  # pose files, drawn in this joint layout (mgfm.sources.pose.layouts)
    pose_fps: float = 15.0  # frame rate of the drawn clips
    pose_view: str | None = None  # image axes of the drawing, e.g. "x,-z" (None: the layout's)

    def __post_init__(self) -> None:
        if self.short_side < 0 or self.short_side % 2:
            raise InputError(f"short_side must be an even number >= 0, got {self.short_side}")
        if self.context_frames < 0:
            raise InputError(f"context_frames must be >= 0, got {self.context_frames}")
        if self.shard_samples is not None and self.shard_samples < 1:
            raise InputError(f"shard_samples must be >= 1, got {self.shard_samples}")
        if self.shard_mb <= 0:
            raise InputError(f"shard_mb must be > 0, got {self.shard_mb}")
        i, n = self.part
        if not (n >= 1 and 0 <= i < n):
            raise InputError(f"part must be i/N with 0 <= i < N, got {i}/{n}")
        if self.workers < 1:
            raise InputError(f"workers must be >= 1, got {self.workers}")
        try:
            self.encoding()
        except ValueError as err:
            raise InputError(f"encoding: {err}") from None
        if self.pose_layout is not None:
            get_layout(self.pose_layout)
            try:
                self.figure_style()
            except ValueError as err:
                raise InputError(f"pose rendering: {err}") from None

    def figure_style(self) -> FigureStyle:
        """How pose clips are drawn: ``short_side`` square (112 when 0) at ``pose_fps``."""
        return FigureStyle(size=self.short_side or 112, fps=self.pose_fps, view=self.pose_view)

    def encoding(self) -> H264Encoding:
        """How every clip is encoded (recorded in the manifest as ``encoding``)."""
        return H264Encoding(self.crf, self.preset, self.tune, self.bframes, self.keyint)

    def output_fields(self) -> dict:
        """The fields that decide the shards' content (hashed into the plan). The encoding fields added later
        count only when set, so a shard set planned before them keeps its plan (and resumes)."""
        keep = ("short_side", "context_frames", "shard_samples", "shard_mb", "est_bytes_per_pixel", "est_aspect",
                "est_unknown_frames", "crf", "preset", "splits", "pose_layout", "pose_fps", "pose_view")
        later = {k: getattr(self, k) for k in ("tune", "bframes", "keyint") if getattr(self, k) is not None}
        return {**{k: getattr(self, k) for k in keep}, **later}


def parse_part(text: str) -> tuple[int, int]:
    """``"i/N"`` -> (i, N)."""
    try:
        i, n = (int(x) for x in text.split("/"))
    except ValueError:
        raise InputError(f"--part expects i/N (e.g. 0/4), got {text!r}") from None
    return i, n


# -------------------------------------------------------------------------------------------- build


def build_shards(index: ClipIndex, out_dir: str | Path, config: BuildConfig | None = None,
                 source: dict | None = None, overwrite: bool = False) -> dict:
    """Build (or finish) the shard set of ``index`` in ``out_dir`` and return the manifest dict.

    ``source`` describes where the index came from (format, path; saved in the manifest). A rerun
    skips complete shards; a plan that differs from the one already in ``out_dir`` (other index or
    other output settings) is an error unless ``overwrite`` is set, which deletes the old shards.
    """
    config = config or BuildConfig()
    out_dir = make_folder(out_dir)
    plan = plan_shards(index, config)
    if not plan:
        raise InputError(f"{index.name}: no clips to shard (splits {config.splits})")
    digest = plan_hash(plan, config)
    write_plan(out_dir, index, plan, digest, config, source or {}, overwrite)
    mf.remove_stale_temps(out_dir, set(plan))

    todo = [n for n in part_of(plan, config.part) if not mf.shard_is_complete(out_dir, n, digest)]
    mine = part_of(plan, config.part)
    log.info("%s: %d shards planned, part %d/%d has %d, %d to build", out_dir, len(plan), *config.part,
             len(mine), len(todo))
    skips = mf.SkipLog()
    total = sum(len(plan[n].clips) for n in todo)
    with logging_redirect_tqdm(), tqdm(total=total, unit="clip", desc=f"shards {out_dir.name}",
                                       disable=total == 0) as bar:  # skip lines print above the bar
        if config.workers == 1 or len(todo) <= 1:
            for name in todo:
                skips.add(_build_one(out_dir, name, _rows(plan[name]), config, digest, progress=bar.update)["skipped"])
        else:
            _build_in_pool(out_dir, plan, todo, config, digest, lambda fragment: (
                skips.add(fragment["skipped"]), bar.update(len(plan[fragment["shard"]].clips))))
    manifest = mf.rebuild_manifest(out_dir)
    if manifest["skipped"]:
        log.warning("%d clips skipped: %s; see %s", len(manifest["skipped"]), mf.summarise_skips(manifest["skipped"]),
                    out_dir / mf.MANIFEST)
    mf.require_samples(manifest, out_dir)
    return manifest


def _rows(shard: PlannedShard) -> list[dict]:
    return [c.to_row() for c in shard.clips]


def _build_in_pool(out_dir: Path, plan: dict[str, PlannedShard], todo: list[str], config: BuildConfig, digest: str,
                   done: Callable[[dict], object]) -> None:
    """Build the ``todo`` shards in ``config.workers`` processes, calling ``done(fragment)`` as each finishes.
    At most ``_QUEUED_PER_WORKER`` shards per worker wait in the pool: the clip rows handed over stay few."""
    ctx = multiprocessing.get_context("spawn")
    queue = iter(todo)
    workers = min(config.workers, len(todo))
    with concurrent.futures.ProcessPoolExecutor(workers, mp_context=ctx, initializer=exit_with_parent) as pool:
        running: set = set()

        def submit(count: int) -> None:
            for name in itertools.islice(queue, count):
                running.add(pool.submit(_build_one, out_dir, name, _rows(plan[name]), config, digest))

        submit(_QUEUED_PER_WORKER * workers)
        try:
            while running:
                finished, _ = concurrent.futures.wait(running, return_when=concurrent.futures.FIRST_COMPLETED)
                for fut in finished:
                    running.discard(fut)
                    done(fut.result())
                submit(len(finished))
        except BaseException:
            for fut in running:
                fut.cancel()
            raise


def _build_one(out_dir: Path, name: str, rows: list[dict], config: BuildConfig, digest: str,
               progress: Callable[[int], object] | None = None) -> dict:
    """Write shard ``name`` (temp file, fragment, rename) and return its fragment."""
    clips = [Clip.from_row(r) for r in rows]
    with atomic_path(out_dir / name) as tmp:  # a shard is complete or absent
        samples: list[dict] = []
        skipped: list[dict] = []
        with open(tmp, "wb") as handle:
            writer = TarWriter(handle, encoder=False, mtime=_TAR_MTIME, user=_TAR_OWNER, group=_TAR_OWNER)
            try:
                for clip, result in _cut_clips(clips, config):
                    if isinstance(result, str):  # logged by the caller (mf.SkipLog: a few per kind, counted)
                        skipped.append({"clip_id": clip.clip_id, "video_id": clip.video_id, "split": clip.split,
                                        "path": clip.path, "reason": result})
                    else:
                        mp4, meta = result
                        writer.write({"__key__": clip.clip_id, "mp4": mp4, "json": json.dumps(meta).encode()})
                        samples.append(meta)
                    if progress is not None:
                        progress(1)
            finally:
                writer.close()
        fragment = {
            "shard": name,
            "plan_hash": digest,
            "split": clips[0].split,
            "samples": len(samples),
            "bytes": tmp.stat().st_size,
            "sha256": sha256_file(tmp),
            "keys": [m["clip_id"] for m in samples],
            "labels": dict(collections.Counter(str(m["label"]) for m in samples)),
            "subjects": dict(collections.Counter(str(m["subject"]) for m in samples)),
            "videos": sorted({m["video_id"] for m in samples}),
            "skipped": skipped,
        }
        mf.write_json_atomic(mf.fragment_path(out_dir, name), fragment)  # before the shard: it vouches for it
    return fragment


def _cut_clips(clips: list[Clip], config: BuildConfig) -> Iterator[tuple[Clip, tuple[bytes, dict] | str]]:
    """Yield (clip, (mp4 bytes, json dict)) or (clip, skip reason) for every clip, in order.

    Consecutive clips of one source video share a single sequential decode.
    """
    start = 0
    while start < len(clips):
        stop = start
        while stop < len(clips) and clips[stop].path == clips[start].path:
            stop += 1
        cut = _cut_pose if config.pose_layout else _cut_video
        yield from cut(clips[start].path, clips[start:stop], config)
        start = stop


def _cut_pose(path: str, clips: list[Clip], config: BuildConfig) -> Iterator[tuple[Clip, tuple[bytes, dict] | str]]:
    """Draw ``clips`` of one pose file and encode each."""
    style = config.figure_style()
    for clip, drawn, frames in pose_clips(path, clips, config.pose_layout, style):
        if isinstance(frames, str):
            yield clip, frames
            continue
        writer = VideoWriter(None, style.fps, style.size, style.size, config.encoding())
        for frame in frames:
            writer.write(frame)
        row = drawn.to_row()
        row.update(n_frames=len(frames), fps=style.fps, height=style.size, width=style.size, context_before=0,
                   context_after=0, source_frames=[drawn.start_frame, drawn.end_frame])
        yield clip, (writer.close(), row)


class _ClipEncoder:
    """Collects one clip's frames and encodes them when the clip is complete.

    Frames are buffered and encoded in one go, so x264 encoders never interleave: closing one libx264
    encoder while another is mid-stream perturbs the other's decisions (still a valid video). Even so
    the bundled libx264 is not strictly bit-reproducible (measured: about 1 clip in 400 differs between
    identical runs, more with a threaded source decoder alongside), so shard checksums identify one
    build, not the inputs. A clip longer than ``max_buffered_frames`` switches to streaming into its
    encoder, which bounds memory for whole-video clips.
    """

    def __init__(self, fps: float, size: tuple[int, int], config: BuildConfig):
        self.fps, self.size, self.config = fps, size, config
        self.frames: list = []
        self.writer: VideoWriter | None = None
        self.count = 0

    def _open(self) -> VideoWriter:
        return VideoWriter(None, self.fps, self.size[0], self.size[1], self.config.encoding())

    def add(self, rgb) -> None:
        self.count += 1
        if self.writer is not None:
            self.writer.write(rgb)
            return
        self.frames.append(rgb)
        if len(self.frames) > self.config.max_buffered_frames:
            self.writer = self._open()
            for frame in self.frames:
                self.writer.write(frame)
            self.frames = []

    def close(self) -> bytes:
        writer = self.writer or self._open()
        for frame in self.frames:
            writer.write(frame)
        self.frames = []
        return writer.close()


def _cut_video(path: str, clips: list[Clip], config: BuildConfig) -> Iterator[tuple[Clip, tuple[bytes, dict] | str]]:
    """Decode ``path`` once (up to the last needed frame) and cut + encode ``clips`` (same video)."""
    # deferred: the native decoder is loaded where frames are decoded, not by every importer
    import av

    pad = config.context_frames
    lo = [max(0, c.start_frame - pad) for c in clips]
    hi = [c.end_frame + pad if c.end_frame >= 0 else math.inf for c in clips]
    last_needed = max(hi)
    open_clips: dict[int, _ClipEncoder] = {}
    done: dict[int, tuple[bytes, dict] | str] = {}
    emitted = 0
    n_seen = 0
    size: tuple[int, int] | None = None
    error: str | None = None
    fps = 0.0

    def finish(j: int, last_frame: int) -> None:
        encoder = open_clips.pop(j)
        clip = clips[j]
        row = clip.to_row()
        if clip.end_frame < 0:  # "to the end of the video": resolve to the last frame decoded
            row["end_frame"] = last_frame
        row.update(n_frames=encoder.count, fps=fps, height=size[0], width=size[1],
                   context_before=clip.start_frame - lo[j], context_after=max(0, last_frame - row["end_frame"]),
                   source_frames=[lo[j], last_frame])
        done[j] = (encoder.close(), row)

    try:
        if not os.path.exists(path):
            raise FileNotFoundError(f"source video not found: {path}")
        with av.open(path) as container:
            stream = container.streams.video[0]
            stream.codec_context.thread_count = config.source_threads
            if config.source_threads != 1:
                stream.thread_type = "AUTO"
            src_fps = float(stream.average_rate or stream.guessed_rate or 0) or 25.0
            fps = float(clips[0].fps) if clips[0].fps and clips[0].fps > 0 else src_fps
            opened = 0  # clips are sorted by start, so they open in order
            for i, frame in enumerate(container.decode(stream)):
                n_seen = i + 1
                if i > last_needed:
                    break
                if size is None:
                    size = _output_size(frame.height, frame.width, config.short_side)
                while opened < len(clips) and lo[opened] <= i:
                    open_clips[opened] = _ClipEncoder(fps, size, config)
                    opened += 1
                if open_clips:
                    rgb = frame.to_ndarray(format="rgb24", height=size[0], width=size[1])
                    for j in list(open_clips):
                        open_clips[j].add(rgb)
                        if i >= hi[j]:
                            finish(j, i)
                while emitted < len(clips) and emitted in done:
                    yield clips[emitted], done.pop(emitted)
                    emitted += 1
    except (OSError, IndexError, ValueError, RuntimeError, av.error.FFmpegError) as err:
        error = f"{type(err).__name__}: {str(err).splitlines()[0][:200] if str(err) else 'unreadable'}"
    for j in sorted(open_clips):
        if error is None:
            finish(j, n_seen - 1)
        else:
            open_clips.pop(j)
    for j in range(emitted, len(clips)):
        if j in done:
            yield clips[j], done.pop(j)
        elif error is not None:
            yield clips[j], f"source video unreadable ({error})"
        else:
            yield clips[j], f"clip starts at frame {lo[j]} but the video has {n_seen} frames"


def _output_size(height: int, width: int, short_side: int) -> tuple[int, int]:
    """(h, w) with the short side ``short_side`` (0: unchanged), aspect kept, both even."""
    if short_side == 0:
        return max(2, height - height % 2), max(2, width - width % 2)
    scale = short_side / min(height, width)

    def even(x: float) -> int:
        return max(2, int(round(x / 2)) * 2)

    return (short_side, even(width * scale)) if height <= width else (even(height * scale), short_side)
