"""Where a process computes and in which precision: its device, native bf16, and the process group a
launcher (``accelerate launch``, ``torchrun``) described in the environment.

Training gets all of this from Accelerate (:mod:`mgfm.train.engine`); evaluation entries, which run under
the same launchers but build no Accelerator, take it from here.
"""

from __future__ import annotations

import contextlib
import logging
import os

import torch

from mgfm.errors import InputError

log = logging.getLogger(__name__)


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


def join_process_group() -> bool:
    """Join the process group the launcher described (``WORLD_SIZE`` > 1 in the environment) unless this
    process is in one already: NCCL on GPUs, gloo on CPUs. Returns whether there is a group of several."""
    import torch.distributed as dist

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


def feature_precision(device: torch.device) -> str:
    """What frozen-encoder features are computed in on ``device``: ``bf16`` on GPUs with native bf16, else
    ``fp32`` (the CPU: autocast there is slower than fp32 matmuls)."""
    return "bf16" if torch.device(device).type == "cuda" and native_bf16() else "fp32"


def autocast(device: torch.device, precision: str) -> contextlib.AbstractContextManager:
    """The autocast context for ``precision`` (``fp32`` = none) on ``device``."""
    if precision == "fp32":
        return contextlib.nullcontext()
    return torch.autocast(torch.device(device).type, dtype=torch.bfloat16)
