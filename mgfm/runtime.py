"""Where this process runs: its rank in the process group, the device it computes on and in which precision,
collective helpers, rank-aware logging, and process-pool workers that end with their parent. Every layer may import it (it imports nothing of mgfm but the
errors).

Rank and world size come from ``torch.distributed`` when a process group is initialised, else from the
``RANK`` / ``WORLD_SIZE`` environment variables, else ``(0, 1)``. ``torch.distributed`` goes first on
purpose: under ``accelerate launch --use_deepspeed`` on CPU, ``accelerator.num_processes`` reports 1 while
the process group has 2 ranks, and the process group is what the collectives (and so the ranks that must
see disjoint data) actually use. Training gets its device and precision from Accelerate
(:mod:`mgfm.train.engine`); evaluation entries, which run under the same launchers but build no
Accelerator, take them from here.
"""

from __future__ import annotations

import contextlib
import logging
import multiprocessing
import os
import threading

import torch
import torch.distributed as dist

from mgfm.errors import InputError

log = logging.getLogger(__name__)


# ------------------------------------------------------------------------------------------- ranks


def rank_world() -> tuple[int, int]:
    """(rank, world_size) of this process: torch.distributed, else env RANK/WORLD_SIZE, else (0, 1)."""
    if dist.is_available() and dist.is_initialized():
        return int(dist.get_rank()), int(dist.get_world_size())
    if "RANK" in os.environ and "WORLD_SIZE" in os.environ:
        try:
            rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
        except ValueError as err:
            raise ValueError(f"env RANK/WORLD_SIZE must be integers, got {os.environ['RANK']!r}/"
                             f"{os.environ['WORLD_SIZE']!r}") from err
        if not 0 <= rank < world:
            raise ValueError(f"env RANK={rank} is outside WORLD_SIZE={world}")
        return rank, world
    return 0, 1


def is_main_process() -> bool:
    return rank_world()[0] == 0


def barrier() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.barrier()


def gather_objects(local: object) -> list:
    """``[rank 0's local, rank 1's, ...]``: every rank's picklable ``local`` on every rank (collective when
    a process group of several is up; ``[local]`` otherwise)."""
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return [local]
    parts: list = [None] * dist.get_world_size()
    dist.all_gather_object(parts, local)
    return parts


def join_process_group() -> bool:
    """Join the process group the launcher described (``WORLD_SIZE`` > 1 in the environment) unless this
    process is in one already: NCCL on GPUs, gloo on CPUs. Returns whether there is a group of several."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if dist.is_available() and dist.is_initialized():
        return dist.get_world_size() > 1
    if world <= 1:
        return False
    backend = "nccl" if torch.cuda.is_available() else "gloo"
    if backend == "nccl":
        torch.cuda.set_device(local_device("cuda"))
    dist.init_process_group(backend=backend)
    log.info("joined a process group of %d (%s)", dist.get_world_size(), backend)
    return True


def exit_with_parent() -> None:
    """A process-pool initializer: the worker ends when the process that started it ends (a build killed with
    SIGKILL, say), instead of lingering as an orphan that waits on its task queue forever."""
    parent = multiprocessing.parent_process()
    if parent is None:
        return

    def watch() -> None:
        parent.join()  # returns once the parent is gone
        os._exit(1)

    threading.Thread(target=watch, name="exit-with-parent", daemon=True).start()


# ----------------------------------------------------------------------------------------- devices


def native_bf16() -> bool:
    """True on a CUDA device that computes bf16 natively (Ampere and newer); emulated bf16 (V100, T4) is
    slower than fp32 there, so it does not count."""
    if not torch.cuda.is_available():
        return False
    try:
        return bool(torch.cuda.is_bf16_supported(including_emulation=False))
    except TypeError:  # torch < 2.3 has no including_emulation and does not count emulation
        return bool(torch.cuda.is_bf16_supported())


def local_device(name: str = "auto") -> torch.device:
    """The device this process computes on: ``auto`` = its own GPU (``LOCAL_RANK``) when CUDA is there, else
    the CPU; ``cuda`` = its own GPU (never every rank on GPU 0); ``cuda:N`` / ``cpu`` as given."""
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    if name == "cuda":
        return torch.device("cuda", local_rank)
    try:
        return torch.device(name)
    except RuntimeError:
        raise InputError(f"device: expected auto, cpu, cuda or cuda:N, got {name!r}") from None


def feature_precision(device: torch.device) -> str:
    """What frozen-encoder features are computed in on ``device``: ``bf16`` on GPUs with native bf16, else
    ``fp32`` (the CPU: autocast there is slower than fp32 matmuls)."""
    return "bf16" if torch.device(device).type == "cuda" and native_bf16() else "fp32"


def autocast(device: torch.device, precision: str) -> contextlib.AbstractContextManager:
    """The autocast context for ``precision`` (``fp32`` = none) on ``device``."""
    if precision == "fp32":
        return contextlib.nullcontext()
    return torch.autocast(torch.device(device).type, dtype=torch.bfloat16)


# ----------------------------------------------------------------------------------------- logging


def setup_logging(level: int = logging.INFO) -> None:
    """Log INFO on rank 0 and WARNING elsewhere, with the rank in every line."""
    rank, world = rank_world()
    prefix = f"[rank {rank}/{world}] " if world > 1 else ""
    logging.basicConfig(
        level=level if rank == 0 else logging.WARNING,
        format=f"%(asctime)s {prefix}%(levelname)s %(name)s: %(message)s",
        datefmt="%H:%M:%S",
        force=True,
    )
    for chatty in ("faiss.loader", "matplotlib", "accelerate.accelerator", "accelerate.checkpointing"):
        logging.getLogger(chatty).setLevel(logging.WARNING)
