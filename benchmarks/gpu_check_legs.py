"""The GPU check's loader and learning legs, and what its device call carries (``gpu_check.py`` runs them).

* ``loader``   the training stream on this machine's CPU at the GPU recipes' shard format (224 px, fastdecode,
               7 non-reference B-frames, PyAV) against today's format (256 px, x264's defaults; with decord too
               where it is installed), interleaved in one process (``bench_loader``): clips per CPU-second, and
               the CPU cores one GPU needs at the rate ``pretrain_random`` measured; plus the DataLoader with
               worker processes, wall clock, for the rate this box really delivers;
* ``learning`` the tiny real-motion recipe (``recipes/pretrain/real_motion_cpu.yaml``) pretrained on the UTKinect +
               Florence3D train clips of ``../shared/data`` for as many epochs as the time budget gives (the
               epoch time measured by a one-epoch run first), then frozen linear probes of both sets' test
               clips against random init and raw pixels, top-1 with its 95% bootstrap interval, in one table.

:func:`bundle` sizes what one device call carries: the working tree as git sees it, the wheels folder and the
shared data, against the device's limit.
"""

from __future__ import annotations

import dataclasses
import logging
import math
import subprocess
import time
from pathlib import Path

from wheels import require

REPO = Path(__file__).resolve().parents[1]
CARRY_LIMIT_MIB = 64  # what one device call may carry: the working tree, shared/ and carried paths
REAL_SETS = ("utkinect", "florence3d")
REAL_RECIPE = REPO / "recipes" / "pretrain" / "real_motion_cpu.yaml"
# The GPU recipes' shard encoding (README "Shards"; stored at the crop size): BENCHMARKS.md "Loader", bytes for speed
GPU_FORMAT = {"tune": "fastdecode", "bframes": 7}
log = logging.getLogger("gpu_check")


class StageSkipped(Exception):
    """A stage that cannot run here (its data is absent): recorded as skipped, with the reason."""


@dataclasses.dataclass(frozen=True)
class LegSizes:
    """How big the loader and learning legs run: on the GPU box or in the CPU smoke."""

    loader_clips: int  # clips in each shard set of the loader leg
    loader_frames: int  # their typical length
    loader_sides: tuple[int, int, int]  # stored short side today, the crop (stored at it), the sources' side
    loader_geometry: tuple[int, int]  # (frames, crop) the stream samples
    loader_batches: int  # per side and round (2 rounds)
    loader_workers: int  # DataLoader worker processes of the wall-clock run
    learn_seconds: float  # pretraining time to spend (the epochs follow from the measured epoch time)
    learn_max_epochs: int
    learn_clips: int | None  # clips per split and set (None: all); the smoke takes a few
    learn_overrides: tuple[str, ...]  # recipe overrides (the smoke: a smaller batch)


def leg_sizes(gpu: bool, cpus: int, learn_seconds: float | None = None) -> LegSizes:
    """The GPU box's sizes (the whole check within ~8 minutes: ~3 of them pretraining) or the CPU smoke's;
    ``learn_seconds`` overrides the pretraining budget."""
    if learn_seconds is not None:
        return dataclasses.replace(leg_sizes(gpu, cpus), learn_seconds=learn_seconds)
    if gpu:
        return LegSizes(32, 40, (256, 224, 320), (16, 224), 12, max(1, min(12, cpus - 2)), 170.0, 800, None, ())
    return LegSizes(6, 16, (48, 40, 60), (4, 32), 2, 1, 6.0, 3, 12,
                    ("stream.batch_size=4", "model.frames=8", "model.img_size=64"))


# ------------------------------------------------------------------------------------------ loader


def stage_loader(ctx) -> dict:
    """Clips per CPU-second of the stream at the new defaults against today's format, the cores one GPU needs."""
    require("webdataset", "braceexpand", "av", "torchdata")
    from bench_loader import Side, bench_index, build_set, interleaved, median, median_ratio, stream_step

    from mgfm.data.stream import StreamConfig, make_loader

    s = ctx.legs
    today_side, crop_side, source_side = s.loader_sides
    frames, crop = s.loader_geometry
    root = ctx.out / "loader"
    index = bench_index(root / "sources", s.loader_clips, s.loader_frames, source_side, seed=0)
    today = build_set(index, root / "today", today_side, s.loader_clips)
    new = build_set(index, root / "new", crop_side, s.loader_clips, **GPU_FORMAT)
    cfg = StreamConfig(frames=frames, img_size=crop, tubelet=2, patch=16, batch_size=8, num_workers=0, seed=0,
                       log_skips=0, video_dtype="uint8", decoder_keep_ratio=None)
    sides = {f"new defaults (stored at the crop, fastdecode + bframes {GPU_FORMAT['bframes']}, pyav)": (new, cfg),
             "today's format, pyav": (today, cfg)}
    try:
        require("decord")
        sides["today's format, decord (before)"] = (today, dataclasses.replace(cfg, backend="decord",
                                                                               fallback_backend="pyav"))
    except RuntimeError as err:
        log.info("loader leg without decord: %s", err)
    rounds = interleaved(lambda r: [Side(name, stream_step(path, c, s.loader_batches if r >= 0 else 1, max(r, 0)))
                                    for name, (path, c) in sides.items()], s.loader_batches, rounds=2, warmup=1)
    names = list(sides)
    per_cpu_s = {name: median(rounds, name) for name in names}
    gpu_rate = ctx.gpu_clips_per_s
    out = {"clips_per_cpu_s": per_cpu_s, "vs_new": {n: median_ratio(rounds, names[0], n, "clips_per_cpu_s")
                                                   for n in names[1:]},
           "gpu_clips_per_s": gpu_rate, "geometry": {"frames": frames, "crop": crop, "stored": [today_side, crop_side]},
           "cores_per_gpu": {n: gpu_rate / v for n, v in per_cpu_s.items()} if gpu_rate else None}
    workers = dataclasses.replace(cfg, num_workers=s.loader_workers, batches_per_epoch=4 * s.loader_batches)
    loader, _ = make_loader(new, "train", workers, mode="train", rank=0, world=1)
    start = time.perf_counter()
    clips = sum(b["video"].shape[0] for b in loader)
    wall = clips / (time.perf_counter() - start)
    out["workers"] = {"workers": s.loader_workers, "clips_per_s": wall, "per_worker": wall / s.loader_workers,
                      "workers_per_gpu": gpu_rate / (wall / s.loader_workers) if gpu_rate else None}
    return out


# ------------------------------------------------------------------------------------------ learning


def shared_data(option: Path | None) -> Path | None:
    """The folder holding utkinect/ and florence3d/: ``option``, else ../shared/data, else shared/data of the tree."""
    for path in ([option] if option else [REPO.parent / "shared" / "data", REPO / "shared" / "data"]):
        if all((path / name / "index.csv").exists() for name in REAL_SETS):
            return path
    return None


def real_sets(shared: Path, out: Path, clips: int | None, workers: int) -> list[Path]:
    """Shards of UTKinect and Florence3D at short side 112 (as ``make real-motion`` builds them); with ``clips``
    only the first that many clips of each split (the smoke)."""
    from mgfm.shards import BuildConfig, build_shards
    from mgfm.sources.clip_index import ClipIndex
    from mgfm.sources.formats import read_source_index

    sets = []
    for name in REAL_SETS:
        index = read_source_index("csv", shared / name / "index.csv")
        if clips is not None:  # a few train clips, and test clips of their classes
            train = index.split("train")[:clips]
            test = [c for c in index.split("test") if c.label in {t.label for t in train}][:clips]
            index = ClipIndex(train + test, index.class_names, index.name)
        build_shards(index, out / name, BuildConfig(short_side=112, workers=workers),
                     source={"format": "csv", "index": str(shared / name / "index.csv")})
        sets.append(out / name)
    return sets


def pretrain_real(sets: list[Path], out: Path, name: str, epochs: int, overrides: tuple[str, ...]) -> dict:
    """Pretrain the real-motion recipe for ``epochs`` on both sets' train clips (equal weights), in this process;
    returns its summary (``run``, ``steps``, ``clips_per_s``, ``seconds``)."""
    import json

    from accelerate.state import AcceleratorState

    from mgfm.config import load_recipe
    from mgfm.train.pretrain import run
    from mgfm.train.recipe import PretrainRecipe

    warmup = max(1, round(epochs * 40 / 800))  # the recipe's share: 40 of 800 epochs
    recipe = load_recipe(PretrainRecipe, REAL_RECIPE, [
        f"shards=[{','.join(str(s) for s in sets)}]", "shard_weights=[1,1]", f"name={name}", f"out_dir={out}",
        "synthetic_data=null", f"optim.epochs={epochs}", f"optim.warmup_epochs={warmup}", "export_epochs=[]",
        "checkpoint_every=0", "keep_checkpoints=1", "resume=never", "seed=0", *overrides])
    try:
        run_dir = run(recipe)
    finally:
        AcceleratorState._reset_state(True)  # the next stage starts its own accelerator
    return json.loads((run_dir / "summary.json").read_text())


def stage_learning(ctx) -> dict:
    """Pretrain on the real-motion train clips for the time budget, then frozen linear probes with ci95."""
    require("webdataset", "braceexpand", "av", "torchdata")
    from mgfm.data.stream import StreamConfig
    from mgfm.evaluate.probe_eval import ProbeRecipe, run as probe
    from mgfm.report import markdown_table, plus_minus

    shared = shared_data(ctx.shared)
    if shared is None:
        raise StageSkipped(f"no {' and '.join(REAL_SETS)} (index.csv) under {ctx.shared or '../shared/data'}")
    s = ctx.legs
    root = ctx.out / "learning"
    sets = real_sets(shared, root / "shards", s.learn_clips, max(1, ctx.sizes.workers))
    calib = pretrain_real(sets, root / "runs", "calibrate", 1, s.learn_overrides)
    per_epoch = calib["steps"] * _batch(s.learn_overrides) / calib["clips_per_s"]
    epochs = max(1, min(s.learn_max_epochs, math.floor(s.learn_seconds / per_epoch)))
    summary = pretrain_real(sets, root / "runs", "real-motion", epochs, s.learn_overrides)
    rows, results = [], {}
    for shards in sets:
        report = probe(ProbeRecipe(run=summary["run"], shards=str(shards), out=str(root / "probe" / shards.name),
                                   kmeans=False, features_dir=str(root / "features"), seed=0,
                                   stream=StreamConfig(masks=False, batch_size=32, num_workers=0)))
        for encoder, entry in report["results"].items():
            top1, ci = entry["probe"]["top1"], entry["probe"]["top1_ci95"]
            results.setdefault(shards.name, {})[encoder] = {"top1": top1, "top1_ci95": ci}
            rows.append([shards.name, encoder, plus_minus(top1, ci, 100, 1)])
    table = markdown_table(["set", "encoder", "test top-1 % ± ci95"], rows)
    (root / "table.md").write_text(table + "\n")
    return {"shared": str(shared), "epochs": epochs, "seconds_per_epoch": per_epoch, "steps": summary["steps"],
            "train_seconds": summary["seconds"], "clips_per_s": summary["clips_per_s"], "run": summary["run"],
            "probes": results, "table": table}


def _batch(overrides: tuple[str, ...]) -> int:
    """The recipe's clips per step, or the override's."""
    import yaml

    for item in overrides:
        if item.startswith("stream.batch_size="):
            return int(item.split("=", 1)[1])
    return int(yaml.safe_load(REAL_RECIPE.read_text())["stream"]["batch_size"])


# ------------------------------------------------------------------------------------------ the bundle


def bundle(wheels: Path | None, shared: Path | None) -> dict:
    """MiB of what one device call carries: the working tree (git's tracked and untracked-not-ignored files),
    the wheels folder, the shared data folder; whether it fits the device's limit."""
    def size(paths) -> int:
        return sum(p.stat().st_size for p in paths if p.is_file())

    try:
        listed = subprocess.run(["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"], cwd=REPO,
                                capture_output=True, check=True).stdout.decode().split("\0")
        tree = size(REPO / name for name in listed if name)
    except (OSError, subprocess.CalledProcessError):  # not a git checkout: everything under the repo
        tree = size(p for p in REPO.rglob("*") if ".git" not in p.parts)
    parts = {"tree": tree, "wheels": size(wheels.rglob("*")) if wheels and wheels.is_dir() else 0,
             "shared": size(shared.parent.rglob("*")) if shared else 0}  # shared/ travels whole
    mib = {k: v / 2**20 for k, v in parts.items()}
    total = sum(mib.values())
    return {"mib": mib, "total_mib": total, "limit_mib": CARRY_LIMIT_MIB, "fits": total < CARRY_LIMIT_MIB,
            "wheels": sorted(p.name for p in wheels.glob("*.whl")) if wheels and wheels.is_dir() else []}
