"""The one-command GPU check: what mgfm's GPU path does on one H100/H200, written to ``<out>/gpu_check.json``.

Stages (each records ``{"ok": false, "error": ...}`` and the run moves on when it fails):

* ``environment``     torch/CUDA versions, the card, its memory and dense bf16 peak, which optional packages import;
* ``pretrain_random`` ViT-B 16x224² pretraining in bf16 under DeepSpeed ZeRO-2 through mgfm's own engine, in
                      this process, on random smooth clips with 0.9 tube masks: clips/s, step time, model FLOPs
                      per clip and MFU, peak memory, whether the loss falls (a profile when MFU < 40%);
* ``loader``          the training stream at the GPU recipes' shard format on this box's CPU, against today's
                      format: clips per CPU-second and the cores one GPU needs at ``pretrain_random``'s rate
                      (``gpu_check_legs.py``);
* ``learning``        the tiny real-motion recipe pretrained on the UTKinect + Florence3D train clips of
                      ``../shared/data`` for ~3 minutes, then frozen linear probes of both sets against random
                      init and raw pixels with 95% intervals, in one table (skipped, saying why, without the data);
* ``pretrain_shards`` the same model end to end as users run it: render a small synthetic benchmark, shard it at
                      the GPU recipes' format and ``accelerate launch --use_deepspeed ... pretrain.py``; its
                      summary, metrics and encoder;
* ``features``        frozen-encoder features of the test split on the GPU (clips/s, precision, shape);
* ``search``          exact top-10 inner-product search, queries/s of faiss-cpu, faiss-gpu (or torch on the GPU
                      when faiss has no usable GPU) and numpy, each against numpy in the same run, and recall@10.

Without CUDA (or with ``--smoke``) every stage runs at toy sizes in a minute or two on a CPU, so CI exercises
the same code (``tests/test_gpu_check.py``). The GPU box has no network and lacks packages mgfm needs, and one
device call carries at most 64 MiB (the working tree as git sees it, ``../shared`` and carried folders; the
script prints the total first). On a Linux x86_64 machine with network, for the box's Python (3.12; binary
wheels must match it) collect the wheels (41 MiB: av is 35 of them)::

    pip download --no-deps --only-binary=:all: --python-version 3.12 --platform manylinux_2_28_x86_64 \\
        --platform manylinux_2_17_x86_64 -d wheels/ deepspeed==0.19.8 webdataset braceexpand av hjson ninja \\
        py-cpuinfo msgpack einops pydantic pydantic-core annotated-types typing-inspection torchdata==0.11.0

decord (14 MiB) and faiss-cpu (30 MiB) do not fit beside them and are not needed: the stream decodes with PyAV
(decord is only its fallback, skipped where absent), and the search stage times torch on the GPU instead of
faiss where faiss is missing. tensorboard and matplotlib are optional there (runs skip their TensorBoard logs
and loss plot, with a warning); ``environment.missing`` in the JSON lists what did not import. Put ``wheels/``
in the repo root (git-ignored: carry it) and run on the device, in one call::

    python benchmarks/gpu_check.py --wheels wheels --out gpu-check       # <= 8 minutes

``--wheels`` installs every wheel there with pip from that folder only (no index) before anything else (each
wheel alone when the set lacks a dependency); a stage whose packages are still missing says which wheel to add.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import datetime
import gc
import importlib
import json
import logging
import math
import os
import shutil
import socket
import statistics
import subprocess
import sys
import time
import traceback
from pathlib import Path
from types import SimpleNamespace
from typing import Callable

from gpu_check_legs import (GPU_FORMAT, LegSizes, StageSkipped, bundle, leg_sizes, shared_data, stage_learning,
                            stage_loader)
from wheels import OPTIONAL, install_wheels, require

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:  # mgfm from this checkout, installed or not
    sys.path.insert(0, str(REPO))

log = logging.getLogger("gpu_check")
STAGES = ("environment", "pretrain_random", "loader", "learning", "pretrain_shards", "features", "search")
# Dense bf16 tensor-core peak in TFLOP/s by device-name substring, first match wins (variants before families).
PEAK_BF16_TFLOPS = (("H100 PCIe", 756.0), ("H100 NVL", 835.0), ("H100 80GB HBM3", 989.4), ("H100 SXM", 989.4),
                    ("H200 NVL", 835.0), ("H200", 989.4), ("A100", 312.0), ("L40S", 362.05), ("A10G", 70.0))
TINY_MODEL = dict(size="custom", img_size=32, frames=4, dim=32, depth=1, heads=2, decoder_dim=16, decoder_depth=1,
                  decoder_heads=1)
PEAK_LR = 5e-4  # the loss falls visibly within a few dozen steps, and ViT-B stays finite after 5 warmup steps
DS_ENV = ("ACCELERATE_USE_DEEPSPEED", "ACCELERATE_DEEPSPEED_CONFIG_FILE", "RANK", "WORLD_SIZE", "LOCAL_RANK",
          "MASTER_ADDR", "MASTER_PORT")


@dataclasses.dataclass(frozen=True)
class Sizes:
    """How big each stage runs: the GPU defaults or the CPU smoke."""

    model: dict
    mask_ratio: float  # the smoke's 2x2-patch clips would be all masked at 0.9
    steps: int  # timed optimiser steps
    warmup: int  # untimed steps first
    batch: int  # clips per step
    height: int  # synthetic video short side (>= the crop)
    shard_steps: tuple[int, int]  # pretrain.py: (batches per epoch, epochs)
    workers: int
    search: tuple[int, int, int]  # (vectors, dim, queries)
    launch_timeout_s: int


def sizes_for(gpu: bool, args: argparse.Namespace) -> Sizes:
    cpus = os.cpu_count() or 1
    if gpu:
        base = Sizes(dict(size="B", img_size=224, frames=16), 0.9, 40, 5, 24, 256, (10, 3), max(1, min(8, cpus - 2)),
                     (200_000, 768, 2000), 300)
    else:
        base = Sizes(TINY_MODEL, 0.5, 6, 1, 2, 64, (3, 2), 1, (2000, 32, 50), 480)
    return dataclasses.replace(base, steps=args.steps or base.steps, batch=args.batch or base.batch,
                               warmup=base.warmup if args.warmup is None else args.warmup)


@dataclasses.dataclass
class Context:
    """What the stages share: the sizes, the output folder, and what earlier stages produced."""

    sizes: Sizes
    out: Path
    gpu: bool
    legs: "LegSizes | None" = None  # the loader and learning legs' sizes (gpu_check_legs.py)
    shared: Path | None = None  # --shared: the folder of utkinect/ and florence3d/
    gpu_clips_per_s: float | None = None  # pretrain_random's measured rate (the loader leg divides by it)
    shards: Path | None = None
    test_clips: int | None = None
    encoder: Path | None = None


def peak_bf16_tflops(device_name: str | None) -> float | None:
    """Dense bf16 peak of the card named ``device_name`` in TFLOP/s; None when unknown (MFU is then null)."""
    for key, peak in PEAK_BF16_TFLOPS:
        if device_name and key in device_name:
            return peak
    return None


# ------------------------------------------------------------------------------------------ stages


def stage_environment(ctx: Context) -> dict:
    import torch

    from mgfm.runtime import native_bf16

    packages, missing = {}, []
    for module, wheel in OPTIONAL.items():
        try:
            mod = importlib.import_module(module)
            packages[module] = getattr(mod, "__version__", "yes")
        except Exception as err:  # a broken install raises more than ImportError
            packages[module] = None
            missing.append(f"{wheel} ({type(err).__name__}: {err})")
    faiss_gpus = None
    if packages["faiss"] is not None:
        import faiss

        faiss_gpus = faiss.get_num_gpus() if hasattr(faiss, "get_num_gpus") else 0
    name = torch.cuda.get_device_name(0) if torch.cuda.is_available() else None
    info = {"python": sys.version.split()[0], "torch": torch.__version__, "cuda": torch.version.cuda,
            "cuda_available": torch.cuda.is_available(), "device_name": name, "cpus": os.cpu_count(),
            "packages": packages, "missing": missing, "faiss_num_gpus": faiss_gpus,
            "peak_bf16_tflops": peak_bf16_tflops(name), "native_bf16": native_bf16()}
    if name is not None:
        props = torch.cuda.get_device_properties(0)
        info.update(gpu_memory_gib=props.total_memory / 2**30, capability=f"{props.major}.{props.minor}")
    return info


def stage_pretrain_random(ctx: Context) -> dict:
    """ZeRO-2 bf16 pretraining steps through :func:`mgfm.train.engine.train` on random clips, timed per step."""
    require("deepspeed")
    import torch

    from mgfm.model.flops import pretrain_gflops
    from mgfm.model.encoder import ModelConfig
    from mgfm.model.masked import build_pretraining_model, param_groups
    from mgfm.train.engine import Engine, MicroResult, Schedule, train

    s = ctx.sizes
    cfg = ModelConfig(**s.model)
    run_dir = ctx.out / "pretrain_random"
    shutil.rmtree(run_dir, ignore_errors=True)
    run_dir.mkdir(parents=True)
    profile_steps = 3
    total = s.warmup + s.steps + profile_steps
    schedule = Schedule(total_steps=total, steps_per_epoch=total, warmup_steps=max(1, s.warmup), peak_lr=PEAK_LR,
                        min_lr=1e-6)
    optim = SimpleNamespace(grad_accum=1, clip_grad=1.0, betas=(0.9, 0.95))
    recipe = SimpleNamespace(mixed_precision="bf16", zero_stage=2, resume="never", checkpoint_every=0,
                             keep_checkpoints=1, optim=optim, stream=SimpleNamespace(batch_size=s.batch))
    gflops = pretrain_gflops(cfg, s.mask_ratio)
    peak = peak_bf16_tflops(torch.cuda.get_device_name(0) if ctx.gpu else None)
    with single_process_deepspeed():
        engine = Engine(recipe)
        torch.manual_seed(0)
        model = build_pretraining_model(cfg)
        engine.prepare(model, param_groups(model, 0.05), schedule)
        device, cuda = engine.device, engine.device.type == "cuda"
        sync = torch.cuda.synchronize if cuda else (lambda: None)
        batches = random_batches(cfg, s.batch, s.mask_ratio, total, device)

        def loss_fn(batch: dict, step: int) -> MicroResult:
            loss, _ = engine.model(engine.inputs(batch["video"]), batch["encoder_mask"])
            return MicroResult(loss, clips=len(batch["video"]))

        stamps, timing, profiler = [], {}, {}

        def after_step(step: int, row: dict) -> None:
            sync()
            stamps.append(time.perf_counter())
            if step == s.warmup + s.steps:
                times = [b - a for a, b in zip(stamps[s.warmup:-1], stamps[s.warmup + 1:])]
                timing.update(step_stats(times, s.batch, gflops, peak))
                ctx.gpu_clips_per_s = timing["clips_per_s"]
                if timing["mfu"] is None or timing["mfu"] < 0.4:  # where does the time go?
                    profiler["p"] = start_profiler(cuda)
            elif step == total and profiler:
                profiler["p"].stop()

        if cuda:
            torch.cuda.reset_peak_memory_stats(device)
        sync()
        stamps.append(time.perf_counter())
        history = train(engine, batches, loss_fn, 0, run_dir / "checkpoints", run_dir, 0, "gpu-check", after_step)
        peak_mem = torch.cuda.max_memory_allocated(device) / 2**30 if cuda else None
        precision, deepspeed = engine.precision, engine.deepspeed
        engine = model = batches = None  # free the GPU memory before the next stage (the closures above hold cells)
    shutil.rmtree(run_dir / "checkpoints", ignore_errors=True)  # GBs at ViT-B; only the timings matter
    out = {"model": s.model, "batch": s.batch, "mask_ratio": s.mask_ratio, "timed_steps": s.steps,
           "warmup_steps": s.warmup, "precision": precision, "deepspeed": deepspeed, "device": str(device),
           "peak_bf16_tflops": peak, **timing, "peak_memory_gib": peak_mem,
           **loss_stats([row["loss"] for row in history])}
    if profiler:
        out["profile"] = write_profile(profiler["p"], cuda, ctx.out / "profile.txt")
    return out


def stage_pretrain_shards(ctx: Context) -> dict:
    """Synthetic shards, then ``accelerate launch --use_deepspeed pretrain.py`` on them as users run it."""
    require("webdataset", "braceexpand", "av", "torchdata")
    from mgfm.sources.synthetic import SyntheticConfig
    from mgfm.model.hf import load_encoder_hf
    from mgfm.pipeline import ensure_synthetic
    from mgfm.shards import BuildConfig, build_shards

    s = ctx.sizes
    t0 = time.perf_counter()
    data, shards = ctx.out / "data" / f"synthetic-{s.height}", ctx.out / "shards" / f"synthetic-{s.model['img_size']}-fast"
    index = ensure_synthetic(data, SyntheticConfig(subjects=4, videos=8, clips_per_video=10, height=s.height,
                                                   workers=s.workers))
    manifest = build_shards(index, shards, BuildConfig(short_side=s.model["img_size"], shard_samples=16,
                                                       workers=s.workers, **GPU_FORMAT),  # the GPU recipes' format
                            source={"format": "imigue", "path": str(data / "labels.csv")})
    ctx.shards, ctx.test_clips = shards, manifest["splits"]["test"]["samples"]
    data_s = time.perf_counter() - t0
    require("deepspeed")  # tensorboard / matplotlib are optional there: missing, they are skipped with a warning

    model = dict(s.model)
    per_epoch, epochs = s.shard_steps
    recipe = {"name": "gpu-check", "out_dir": str(ctx.out / "runs"), "shards": str(shards), "synthetic_data": None,
              "mixed_precision": "bf16", "model": model, "loss": {"contrastive_weight": 0.0}, "patch_init": "random",
              "freeze_patch_embed": False, "stream": {"batch_size": s.batch,
                         "num_workers": s.workers, "video_dtype": "uint8", "mask_ratio": s.mask_ratio,
                         "batches_per_epoch": per_epoch, "repeats": 1},
              "optim": {"epochs": epochs, "warmup_epochs": 1, "base_lr": PEAK_LR * 256 / s.batch},
              "resume": "never", "checkpoint_every": 10**6, "keep_checkpoints": 1}  # one checkpoint, at the end
    run = ctx.out / "runs" / "gpu-check"
    shutil.rmtree(run, ignore_errors=True)
    recipe_path = ctx.out / "pretrain_recipe.yaml"
    import yaml

    recipe_path.write_text(yaml.safe_dump(recipe))
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--use_deepspeed", "--num_processes", "1",
           "--num_machines", "1", "--deepspeed_config_file", "recipes/deepspeed/zero2.json", "pretrain.py",
           "--recipe", str(recipe_path)]
    log_path = ctx.out / "pretrain_shards.log"
    t0 = time.perf_counter()
    with log_path.open("w") as handle:
        done = subprocess.run(cmd, cwd=REPO, env=child_env(ctx.gpu), stdout=handle, stderr=subprocess.STDOUT,
                              timeout=s.launch_timeout_s)
    launch_s = time.perf_counter() - t0
    if done.returncode:
        tail = log_path.read_text()[-2000:]
        raise RuntimeError(f"pretrain.py exited with {done.returncode} (log {log_path}):\n{tail}")
    summary = json.loads((run / "summary.json").read_text())
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines() if line.strip()]
    encoder, enc_cfg = load_encoder_hf(run / "encoder")
    ctx.encoder = run / "encoder"
    shutil.rmtree(run / "checkpoints", ignore_errors=True)
    return {"command": " ".join(cmd), "log": str(log_path), "shards": str(shards),
            "clips": {k: v["samples"] for k, v in manifest["splits"].items()}, "data_seconds": data_s,
            "launch_seconds": launch_s, "summary": summary, "logged_steps": len(rows),
            "lr_first_last": [rows[0]["lr"], rows[-1]["lr"]] if rows else None,
            **loss_stats([r["loss"] for r in rows]),
            "encoder": {"loads": True, "dim": enc_cfg.dim, "depth": enc_cfg.depth,
                        "params_M": sum(p.numel() for p in encoder.parameters()) / 1e6}}


def stage_features(ctx: Context) -> dict:
    """Frozen-encoder features of the shards' test split on this process's device."""
    require("webdataset", "braceexpand", "av", "torchdata")
    import torch

    from mgfm.runtime import feature_precision, local_device
    from mgfm.evaluate.extract import split_features
    from mgfm.data.stream import StreamConfig
    from mgfm.evaluate.encoder_eval import stream_for
    from mgfm.model.hf import load_encoder_hf, save_encoder_hf
    from mgfm.model.encoder import ModelConfig, build_encoder

    if ctx.shards is None:
        raise RuntimeError("no shards: the pretrain_shards stage did not build them")
    folder, note = ctx.encoder, "pretrain_shards' encoder"
    if folder is None:  # still measure extraction when the training run failed
        torch.manual_seed(0)
        folder, note = ctx.out / "random_encoder", "random init (pretrain_shards gave no encoder)"
        save_encoder_hf(build_encoder(ModelConfig(**ctx.sizes.model)), folder)
    _, cfg = load_encoder_hf(folder)
    stream = stream_for(cfg, SimpleNamespace(seed=0, stream=StreamConfig(masks=False, batch_size=ctx.sizes.batch,
                                                                         num_workers=ctx.sizes.workers)))
    device = local_device()
    t0 = time.perf_counter()
    features = split_features(folder, ctx.shards, "test", stream, device=device)
    seconds = time.perf_counter() - t0
    return {"encoder": note, "device": str(device), "precision": feature_precision(device),
            "shape": list(features.features.shape), "test_clips": ctx.test_clips, "seconds_incl_startup": seconds,
            "clips_per_s": len(features.features) / seconds,
            "finite": bool(torch.isfinite(torch.as_tensor(features.features)).all())}


def stage_search(ctx: Context) -> dict:
    """Exact flat inner-product top-10 search: queries/s of each method, its ratio to numpy and recall@10."""
    import numpy as np
    import torch

    from mgfm.evaluate.retrieval import exact_search

    n, dim, nq = ctx.sizes.search
    k = 10
    rng = np.random.default_rng(0)
    base, queries = (unit(rng.standard_normal((m, dim), dtype=np.float32)) for m in (n, nq))
    ref, ref_s = timed(lambda: exact_search(base, queries, k))
    methods = {"numpy": {"ok": True, "queries_per_s": nq / ref_s, "vs_numpy": 1.0, "recall_at_10": 1.0}}

    def measure(name: str, search: Callable[[], np.ndarray]) -> None:
        try:
            ids, seconds = timed(search)
            methods[name] = {"ok": True, "queries_per_s": nq / seconds, "vs_numpy": ref_s / seconds,
                             "recall_at_10": recall(ids, ref, base, queries)}
        except Exception as err:
            methods[name] = {"ok": False, "error": f"{type(err).__name__}: {err}"}

    faiss = None
    try:
        require("faiss")
        import faiss
    except RuntimeError as err:
        methods["faiss-cpu"] = {"ok": False, "error": str(err)}
    if faiss is not None:
        index = faiss.IndexFlatIP(dim)
        index.add(base)
        measure("faiss-cpu", lambda: index.search(queries, k)[1])
    backend, reason = "torch", "smoke mode: torch exact search on the CPU"
    if ctx.gpu:
        reason = "faiss is not installed" if faiss is None else None
        if faiss is not None and (not hasattr(faiss, "get_num_gpus") or faiss.get_num_gpus() == 0):
            reason = "faiss has no GPU support (faiss.get_num_gpus() == 0)"
        if reason is None:
            try:
                gpu_index = faiss.index_cpu_to_gpu(faiss.StandardGpuResources(), 0, index)
                measure("faiss-gpu", lambda: gpu_index.search(queries, k)[1])
                backend = "faiss-gpu"
                if not methods["faiss-gpu"]["ok"]:
                    backend, reason = "torch", f"faiss-gpu failed: {methods['faiss-gpu']['error']}"
            except Exception as err:  # e.g. a CUDA 12 faiss on a CUDA 13 driver stack
                reason = f"faiss-gpu unusable: {type(err).__name__}: {err}"
    if backend == "torch":
        device = torch.device("cuda" if ctx.gpu else "cpu")
        base_t, queries_t = torch.from_numpy(base).to(device), torch.from_numpy(queries).to(device)
        measure(f"torch-{device.type}", lambda: torch_search(base_t, queries_t, k))
    return {"vectors": n, "dim": dim, "queries": nq, "k": k, "gpu_search_backend": backend if ctx.gpu else None,
            "gpu_search_reason": reason, "methods": methods}


# ------------------------------------------------------------------------------------------ helpers


@contextlib.contextmanager
def single_process_deepspeed():
    """The environment ``accelerate launch --use_deepspeed`` gives one process (ZeRO-2 config of the repo);
    restored afterwards, with the process group and Accelerate's singleton state torn down."""
    import torch

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    env = dict(zip(DS_ENV, ("true", str(REPO / "recipes" / "deepspeed" / "zero2.json"), "0", "1", "0",
                            "127.0.0.1", str(port))))
    saved = {key: os.environ.get(key) for key in env}
    os.environ.update(env)
    try:
        yield
    finally:
        from accelerate.state import AcceleratorState

        AcceleratorState._reset_state(True)
        if torch.distributed.is_initialized():
            torch.distributed.destroy_process_group()
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value


def random_batches(cfg, batch: int, ratio: float, steps: int, device):
    """``steps`` batches ``{video (B, T, C, H, W) float32, encoder_mask (B, N) bool}`` on ``device``: random
    clips smooth over two patches and eight frames (partly predictable from the visible tokens, unlike white
    noise) cycled from a pool of 4, fresh tube masks every step."""
    import numpy as np
    import torch
    import torch.nn.functional as F

    from mgfm.data.masking import MaskGenerator

    gen = torch.Generator(device=device).manual_seed(0)
    low = (max(1, cfg.frames // 8), max(2, cfg.img_size // 32), max(2, cfg.img_size // 32))
    pool = [F.interpolate(torch.randn(batch, cfg.channels, *low, generator=gen, device=device),
                          size=(cfg.frames, cfg.img_size, cfg.img_size), mode="trilinear").transpose(1, 2).contiguous()
            for _ in range(4)]
    masks, rng = MaskGenerator(cfg.grid, ratio=ratio, decoder_keep_ratio=None), np.random.default_rng(0)
    for step in range(steps):
        enc = torch.as_tensor(np.stack([masks(rng)[0] for _ in range(batch)]))
        yield {"video": pool[step % len(pool)], "encoder_mask": enc.to(device)}


def step_stats(times: list[float], batch: int, gflops: float, peak_tflops: float | None) -> dict:
    """Step seconds -> median/p90 step time, clips/s, model TFLOP/s and MFU (None without a known peak)."""
    median = statistics.median(times)
    p90 = sorted(times)[min(len(times) - 1, math.ceil(0.9 * len(times)) - 1)]
    clips_per_s = batch / median
    tflops = clips_per_s * gflops / 1e3
    return {"step_s_median": median, "step_s_p90": p90, "clips_per_s": clips_per_s, "model_gflops_per_clip": gflops,
            "model_tflops_per_s": tflops, "mfu": tflops / peak_tflops if peak_tflops else None}


def loss_stats(losses: list[float]) -> dict:
    """First and last loss, whether all are finite, and whether the last third's mean is below the first's."""
    third = max(1, len(losses) // 3)
    finite = bool(losses) and all(math.isfinite(x) for x in losses)
    return {"first_loss": losses[0] if losses else None, "last_loss": losses[-1] if losses else None,
            "loss_finite": finite,
            "loss_falling": finite and statistics.mean(losses[-third:]) < statistics.mean(losses[:third])}


def start_profiler(cuda: bool):
    """A started ``torch.profiler`` recording CPU ops, and CUDA kernels on a GPU."""
    from torch.profiler import ProfilerActivity, profile

    prof = profile(activities=[ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else []))
    prof.start()
    return prof


def write_profile(prof, cuda: bool, path: Path) -> str:
    """Top-20 ops by self CUDA time (self CPU time on a CPU) into ``path``; returns its name."""
    averages = prof.key_averages()
    try:
        table = averages.table(sort_by="self_cuda_time_total" if cuda else "self_cpu_time_total", row_limit=20)
    except (AttributeError, KeyError):  # torch versions that only know "device" time
        table = averages.table(sort_by="self_device_time_total", row_limit=20)
    path.write_text(table)
    return path.name


def child_env(gpu: bool) -> dict:
    """A clean environment for ``accelerate launch``: no inherited rank variables, mgfm importable."""
    env = {k: v for k, v in os.environ.items() if k not in DS_ENV}
    env.update(PYTHONUNBUFFERED="1", PYTHONPATH=os.pathsep.join(filter(None, [str(REPO), env.get("PYTHONPATH")])))
    if not gpu:
        env["OMP_NUM_THREADS"] = "1"
    return env


def unit(x):
    """Rows of ``x`` scaled to unit length (inner product = cosine)."""
    import numpy as np

    return x / np.linalg.norm(x, axis=1, keepdims=True)


def torch_search(base, queries, k: int, chunk: int = 1024):
    """Exact top-``k`` ids on ``base``'s device in full fp32 (no TF32), as a numpy ``(Q, k)`` array."""
    import torch

    precision = torch.get_float32_matmul_precision()
    torch.set_float32_matmul_precision("highest")
    try:
        ids = torch.cat([(queries[s:s + chunk] @ base.T).topk(k, dim=1).indices for s in range(0, len(queries), chunk)])
        return ids.cpu().numpy()
    finally:
        torch.set_float32_matmul_precision(precision)


def recall(ids, ref, base, queries, tie: float = 1e-5) -> float:
    """recall@k of ``ids`` against the exact ``ref``; an id whose float64 score ties the k-th exact score
    within ``tie`` counts as found (float32 rounding may order near-ties either way)."""
    import numpy as np

    def scores(x):
        return np.einsum("qkd,qd->qk", base[x].astype(np.float64), queries.astype(np.float64))

    kth = scores(ref).min(axis=1, keepdims=True)
    hit = (ids[:, :, None] == ref[:, None, :]).any(axis=2) | (scores(ids) >= kth - tie)
    return float(hit.mean())


def timed(fn: Callable, repeats: int = 3):
    """``fn()``'s result and its median seconds over ``repeats`` runs after one warmup run."""
    result = fn()
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        result = fn()
        times.append(time.perf_counter() - t0)
    return result, statistics.median(times)


def write_report(report: dict, path: Path) -> None:
    """Write the JSON atomically, as every mgfm report: a reader never sees half a file."""
    from mgfm.files import write_atomic  # mgfm is importable only once main() has set up the path and wheels
    from mgfm.report import jsonable

    write_atomic(path, json.dumps(jsonable(report), indent=1))


def summary_line(name: str, r: dict) -> str:
    """What one stage measured, in a line."""
    def f(value, spec=".3g"):
        return "-" if value is None else format(value, spec)

    if not r.get("ok"):
        return f"skipped: {r.get('reason', '')}" if r.get("skipped") else r.get("error", "").splitlines()[0][:100]
    if name == "environment":
        return f"torch {r['torch']}, cuda {r['cuda']}, {r['device_name'] or 'cpu'}, peak {f(r['peak_bf16_tflops'])} TF"
    if name == "pretrain_random":
        return (f"{f(r['clips_per_s'])} clips/s, step {f(r['step_s_median'])} s (p90 {f(r['step_s_p90'])}), "
                f"MFU {f(r['mfu'], '.1%')}, mem {f(r['peak_memory_gib'])} GiB, loss {f(r['first_loss'])}"
                f"->{f(r['last_loss'])}")
    if name == "pretrain_shards":
        s = r["summary"]
        return (f"{f(s['clips_per_s'])} clips/s, {s['steps']} steps, {s['precision']}, deepspeed {s['deepspeed']}, "
                f"loss {f(r['first_loss'])}->{f(r['last_loss'])}")
    if name == "features":
        return f"{r['shape'][0]}x{r['shape'][1]} {r['precision']} on {r['device']}, {f(r['clips_per_s'])} clips/s"
    if name == "loader":
        cores = r["cores_per_gpu"] or {}
        return "; ".join(f"{side}: {f(rate, '.1f')} clips/CPU-s" + (f", {f(cores[side], '.1f')} cores/GPU" if cores else "")
                         for side, rate in r["clips_per_cpu_s"].items()) + \
            f"; {r['workers']['workers']} workers: {f(r['workers']['clips_per_s'], '.1f')} clips/s"
    if name == "learning":
        return (f"{r['epochs']} epochs ({f(r['seconds_per_epoch'])} s each), then linear probes: " + "; ".join(
            f"{name} " + ", ".join(f"{enc} {100 * v['top1']:.1f}" for enc, v in by.items())
            for name, by in r["probes"].items()))
    return ", ".join(f"{m} {f(v['queries_per_s'], ',.0f')} q/s ({f(v['vs_numpy'], '.2f')}x, "
                     f"recall {f(v['recall_at_10'], '.3f')})"
                     if v["ok"] else f"{m} failed" for m, v in r["methods"].items())


# ------------------------------------------------------------------------------------------ main


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", type=Path, required=True, help="folder for gpu_check.json, logs and data")
    ap.add_argument("--wheels", type=Path, default=None, help="folder of *.whl to pip-install first (no index)")
    ap.add_argument("--smoke", action="store_true", help="tiny sizes on whatever device (automatic without CUDA)")
    ap.add_argument("--steps", type=int, default=None, help="timed pretraining steps (GPU 40, smoke 6)")
    ap.add_argument("--warmup", type=int, default=None, help="untimed steps first (GPU 5, smoke 1)")
    ap.add_argument("--batch", type=int, default=None, help="clips per step (GPU 24, smoke 2)")
    ap.add_argument("--skip", nargs="+", default=[], choices=STAGES, metavar="STAGE", help=f"any of {STAGES}")
    ap.add_argument("--learn-seconds", type=float, default=None,
                    help="the learning leg's pretraining budget (GPU 170, smoke 6); the epochs follow from it")
    ap.add_argument("--shared", type=Path, default=None,
                    help="folder of utkinect/ and florence3d/ for the learning leg (default: ../shared/data)")
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    args.out.mkdir(parents=True, exist_ok=True)
    path = args.out / "gpu_check.json"
    report: dict = {"command": [sys.executable, *sys.argv] if argv is None else ["gpu_check.py", *argv],
                    "started": now(), "wheels": install_wheels(args.wheels) if args.wheels else None}
    carried = bundle(args.wheels, shared_data(args.shared))
    print(f"carried bundle: {carried['total_mib']:.1f} MiB (" + ", ".join(f"{k} {v:.1f}" for k, v in carried["mib"].items())
          + f") of the device call's {carried['limit_mib']} MiB" + ("" if carried["fits"] else ": TOO BIG"), flush=True)
    import torch

    gpu = torch.cuda.is_available() and not args.smoke
    ctx = Context(sizes_for(gpu, args), args.out.resolve(), gpu, leg_sizes(gpu, os.cpu_count() or 1, args.learn_seconds),
                  args.shared)
    report.update(gpu_mode=gpu, sizes=dataclasses.asdict(ctx.sizes), legs=dataclasses.asdict(ctx.legs),
                  bundle=carried, stages={})
    stages = {"environment": stage_environment, "pretrain_random": stage_pretrain_random, "loader": stage_loader,
              "learning": stage_learning, "pretrain_shards": stage_pretrain_shards, "features": stage_features,
              "search": stage_search}
    for name, stage in stages.items():
        if name in args.skip:
            report["stages"][name] = {"ok": None, "skipped": True, "reason": "--skip"}
            continue
        log.info("stage %s", name)
        t0 = time.perf_counter()
        try:
            result = {"ok": True, **stage(ctx)}
        except StageSkipped as why:
            result = {"ok": None, "skipped": True, "reason": str(why)}
        except Exception as err:  # record and go on: one broken stage must not hide the others' numbers
            log.error("stage %s failed: %s", name, traceback.format_exc())
            result = {"ok": False, "error": f"{type(err).__name__}: {err}", "traceback": traceback.format_exc()[-3000:]}
        finally:
            gc.collect()
            if torch.cuda.is_available():
                torch.cuda.empty_cache()
        report["stages"][name] = {**result, "seconds": time.perf_counter() - t0}
        write_report(report, path)  # a run killed later keeps what it measured
    report["finished"] = now()
    write_report(report, path)
    print(f"\ngpu_check ({'GPU' if gpu else 'smoke'}) -> {path}")
    print(f"{'stage':<16}{'ok':<5}{'s':>7}  result")
    for name, r in report["stages"].items():
        ok = "-" if r.get("skipped") else "yes" if r["ok"] else "NO"
        try:
            line = summary_line(name, r)
        except Exception as err:  # the JSON is written already; a surprise in it must not end the run here
            line = f"(see the JSON: {type(err).__name__})"
        print(f"{name:<16}{ok:<5}{r.get('seconds', 0):>7.1f}  {line}")
    if report["stages"].get("learning", {}).get("ok"):
        print(f"\nlearning: {report['stages']['learning']['epochs']} epochs, frozen linear probes\n"
              + report["stages"]["learning"]["table"])
    return report


def now() -> str:
    return datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")


if __name__ == "__main__":
    main()
