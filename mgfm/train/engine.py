"""The one training engine: accelerator and precision, LR schedule, the optimiser step, checkpoints and
resume, per-step logs, and the export of full fp32 weights.

Pretraining (:mod:`mgfm.train.pretrain`) and fine-tuning (:mod:`mgfm.evaluate.finetune`) only build a model,
an iterator of micro-batches and a loss, then call :func:`train` (the split of mae's ``engine_pretrain.py``
and ``main_pretrain.py``)::

    engine = Engine(recipe)                                    # Accelerator, DeepSpeed when launched with it
    schedule = Schedule.for_run(recipe.optim, steps_per_epoch, global_batch)
    engine.prepare(model, param_groups, schedule)              # AdamW + warmup/cosine LambdaLR
    start = engine.resume(find_checkpoint(checkpoints, recipe.resume))   # 0 without a checkpoint
    batches = ...                                              # from engine.rank_state when it resumed
    history = train(engine, batches, loss_fn, start, checkpoints, run_dir, every, "pretrain", after_step)
    state = engine.full_state_dict()                           # fp32 master weights; collective

``loss_fn(batch, step)`` returns a :class:`MicroResult`; ``after_step(step, row)`` runs after each optimiser
step (pretraining updates its EMA teacher and exports snapshots there). ``batches`` may have a
``state_dict()`` (pretraining's :class:`~mgfm.data.stream.EpochStream`): each checkpoint keeps it per rank and
:meth:`Engine.resume` gives it back as ``engine.rank_state``, so a resumed run continues the data exactly.
SIGTERM, SIGUSR1 and Ctrl-C stop the loop at a step boundary with a checkpoint (:mod:`mgfm.train.stop`).

Where Accelerate's defaults would train wrongly on GPUs, the engine decides itself:

* **Precision** is the recipe's ``mixed_precision`` under every launcher (:func:`resolve_precision`):
  ``auto`` is bf16 on GPUs with native bf16 (not emulated), else fp32 with TF32 matmuls on CUDA; an
  explicit precision on the launcher's command line counts only when the recipe says ``auto``.
* **The LR schedule** steps once per optimiser step. Accelerate's scheduler wrapper would step it
  ``num_processes`` times per optimiser step (it assumes a data loader cut into that many parts, which ours
  is not), so N GPUs would run the schedule N times too fast.
* **Inputs** follow the weights' dtype: DeepSpeed bf16 holds bf16 weights, so float inputs are cast to
  bf16 (:meth:`Engine.inputs`); without DeepSpeed bf16 runs as autocast over fp32 weights.
* **Export** assembles the fp32 master weights (:meth:`Engine.full_state_dict`): under DeepSpeed the module
  holds bf16 (ZeRO-3: partitioned) copies, so the optimiser's fp32 partitions are gathered instead. It needs
  no ``stage3_gather_16bit_weights_on_model_save``.
"""

from __future__ import annotations

import json
import logging
import math
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator, Protocol

import torch
from torch import nn
from accelerate import Accelerator
from accelerate.state import AcceleratorState
from accelerate.utils import DeepSpeedPlugin
from tqdm.auto import tqdm

from mgfm.config import RecipeError
from mgfm.files import write_atomic
from mgfm.runtime import is_main_process, native_bf16, rank_world
from mgfm.train.checkpoint import (checkpoint_dirs, clean_unfinished, latest_checkpoint, load_checkpoint,
                                   named_checkpoint, save_checkpoint)
from mgfm.train.stop import StopRequests, Stopped

log = logging.getLogger(__name__)
PRECISIONS = ("auto", "no", "bf16", "fp16")


class TrainRecipe(Protocol):
    """What the engine reads from a recipe (:class:`~mgfm.train.recipe.PretrainRecipe` and
    :class:`~mgfm.evaluate.finetune_recipe.FinetuneRecipe` both have it)."""

    mixed_precision: str
    zero_stage: int
    resume: str
    checkpoint_every: int
    keep_checkpoints: int
    optim: Any  # grad_accum, clip_grad, betas
    stream: Any  # batch_size (clips per rank and micro-batch)


# ------------------------------------------------------------------------------------------ precision


def resolve_precision(requested: str, launcher: str | None = None) -> str:
    """The precision a run trains in: ``"no"`` (fp32), ``"bf16"`` or ``"fp16"``.

    ``requested`` is the recipe's ``mixed_precision``; ``launcher`` what ``accelerate launch`` exported
    (``ACCELERATE_MIXED_PRECISION``; it exports ``"no"`` when nothing was asked). ``auto`` takes an explicit
    launcher precision, else bf16 where :func:`native_bf16`, else fp32. An explicit recipe value wins.
    """
    if requested not in PRECISIONS:
        raise RecipeError(f"mixed_precision: expected one of {list(PRECISIONS)}, got {requested!r}")
    launcher = (launcher if launcher is not None else os.environ.get("ACCELERATE_MIXED_PRECISION", "no")).lower()
    if requested == "auto":
        if launcher not in ("", "no"):
            return launcher
        return "bf16" if native_bf16() else "no"
    if launcher not in ("", "no", requested):
        log.warning("the launcher asked for mixed_precision=%s; the recipe's mixed_precision=%s is used",
                    launcher, requested)
    return requested


def configure_matmul(precision: str) -> bool:
    """Let fp32 matmuls and convolutions use TF32 on CUDA when training in fp32 (VideoMAE's GPU default);
    returns whether it did."""
    if precision != "no" or not torch.cuda.is_available():
        return False
    torch.backends.cuda.matmul.allow_tf32 = True
    torch.backends.cudnn.allow_tf32 = True
    return True


def make_accelerator(recipe: TrainRecipe):
    """An Accelerator in the recipe's precision and accumulation, with DeepSpeed when the launcher asked for
    it (its config file's ``auto`` values filled from the recipe) or the recipe sets ``zero_stage``."""
    precision = resolve_precision(recipe.mixed_precision)
    configure_matmul(precision)
    grad_accum = recipe.optim.grad_accum
    launched_with_deepspeed = os.environ.get("ACCELERATE_USE_DEEPSPEED", "false").lower() == "true"
    plugin = None
    if not launched_with_deepspeed and recipe.zero_stage > 0 and not AcceleratorState._shared_state:
        plugin = DeepSpeedPlugin(zero_stage=recipe.zero_stage, gradient_accumulation_steps=grad_accum,
                                 gradient_clipping=recipe.optim.clip_grad or 0.0)
    accelerator = Accelerator(mixed_precision=precision, gradient_accumulation_steps=grad_accum,
                              deepspeed_plugin=plugin, step_scheduler_with_optimizer=False)
    ds = accelerator.state.deepspeed_plugin
    if ds is not None:
        # No data loader goes through prepare(), so DeepSpeed's "auto" batch sizes are filled here, with the
        # process group's world size (under DeepSpeed on CPU, accelerator.num_processes says 1).
        config = ds.deepspeed_config
        _, world = rank_world()
        micro = recipe.stream.batch_size
        for key, value in (("train_micro_batch_size_per_gpu", micro), ("gradient_accumulation_steps", grad_accum),
                           ("train_batch_size", micro * grad_accum * world)):
            if config.get(key, "auto") == "auto":
                config[key] = value
            elif config[key] != value:
                raise RecipeError(f"the DeepSpeed config sets {key}={config[key]} but the recipe gives {value}; "
                                  f"write \"auto\" there")
        config.setdefault("zero_allow_untested_optimizer", True)
        if config.get("gradient_clipping", "auto") == "auto":
            config["gradient_clipping"] = recipe.optim.clip_grad or 0.0
    if accelerator.gradient_accumulation_steps != grad_accum:
        raise RecipeError(f"the launcher sets gradient accumulation to {accelerator.gradient_accumulation_steps} "
                          f"but the recipe's optim.grad_accum is {grad_accum}; set it in the recipe only")
    return accelerator


# ------------------------------------------------------------------------------------------ schedule


def lr_lambda(total_steps: int, warmup_steps: int, min_ratio: float) -> Callable[[int], float]:
    """Multiplier of the peak lr after ``step`` optimiser steps: linear warmup to 1 over ``warmup_steps``,
    then cosine down to ``min_ratio`` at ``total_steps``."""
    def factor(step: int) -> float:
        if step < warmup_steps:
            return (step + 1) / max(1, warmup_steps)
        progress = min(1.0, (step - warmup_steps) / max(1, total_steps - warmup_steps))
        return min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * progress))
    return factor


@dataclass(frozen=True)
class Schedule:
    """Length and learning rates of a run. ``peak_lr`` is the lr of a parameter group with ``lr_scale`` 1."""

    total_steps: int
    steps_per_epoch: int
    warmup_steps: int
    peak_lr: float
    min_lr: float

    @classmethod
    def for_run(cls, optim, steps_per_epoch: int, global_batch: int) -> Schedule:
        """``optim.epochs`` epochs of ``steps_per_epoch`` optimiser steps, ``peak_lr = base_lr x global_batch /
        256`` (VideoMAE's scaling), ``optim.warmup_epochs`` of warmup."""
        if steps_per_epoch < 1:
            raise ValueError(f"an epoch must have at least one optimiser step, got {steps_per_epoch}")
        return cls(steps_per_epoch * optim.epochs, steps_per_epoch, int(optim.warmup_epochs * steps_per_epoch),
                   optim.base_lr * global_batch / 256, optim.min_lr)

    def lr(self, step: int, lr_scale: float = 1.0) -> float:
        """The lr of the optimiser step after ``step`` completed steps."""
        return self.peak_lr * lr_scale * lr_lambda(self.total_steps, self.warmup_steps,
                                                   self.min_lr / self.peak_lr)(step)


# ------------------------------------------------------------------------------------------ engine


class Engine:
    """One training run's accelerator, model, optimiser and schedule (see the module docstring)."""

    def __init__(self, recipe: TrainRecipe) -> None:
        self.recipe = recipe
        self.accelerator = make_accelerator(recipe)
        self.rank, self.world = rank_world()
        self.model: nn.Module | None = None
        self.optimizer = None
        self.scheduler = None
        self.schedule: Schedule | None = None
        self.clips_per_s = 0.0  # of the last train() call, all ranks together
        self.rank_state: dict | None = None  # this rank's own state in the checkpoint it resumed from

    @property
    def device(self) -> torch.device:
        return self.accelerator.device

    @property
    def precision(self) -> str:
        """What the run computes in: ``"no"`` (fp32), ``"bf16"`` or ``"fp16"`` (DeepSpeed's config included)."""
        return self.accelerator.mixed_precision

    @property
    def deepspeed(self) -> bool:
        return self.accelerator.state.deepspeed_plugin is not None

    @property
    def weights_dtype(self) -> torch.dtype:
        """The dtype the prepared model computes in (bf16 under DeepSpeed bf16, else fp32)."""
        return weights_dtype(self.model)

    def prepare(self, model: nn.Module, param_groups: list[dict], schedule: Schedule) -> nn.Module:
        """AdamW over ``param_groups`` (each may carry an ``lr_scale``) with ``schedule``'s warmup + cosine, all
        through ``accelerator.prepare``; returns the prepared model."""
        for group in param_groups:
            group["lr"] = schedule.peak_lr * group.get("lr_scale", 1.0)
        optimizer = torch.optim.AdamW(param_groups, lr=schedule.peak_lr, betas=tuple(self.recipe.optim.betas))
        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_lambda(
            schedule.total_steps, schedule.warmup_steps, schedule.min_lr / schedule.peak_lr))
        self.model, self.optimizer, self.scheduler = self.accelerator.prepare(model, optimizer, scheduler)
        self.schedule = schedule
        return self.model

    def inputs(self, tensor: torch.Tensor) -> torch.Tensor:
        """``tensor`` on the training device; floating point in the weights' dtype."""
        return to_model(tensor, self.model, self.device)

    def step(self, loss: torch.Tensor, step: int) -> None:
        """Backward ``loss`` of one micro-batch; at the end of an accumulation the optimiser and the LR
        schedule step once. Call inside ``accelerator.accumulate(model)``. A non-finite loss stops the run."""
        if not torch.isfinite(loss):
            raise FloatingPointError(f"non-finite loss {loss.item()} at step {step}")
        accelerator = self.accelerator
        accelerator.backward(loss)
        if not accelerator.sync_gradients:
            return
        clip = self.recipe.optim.clip_grad
        if clip and not self.deepspeed:  # DeepSpeed clips with its config's gradient_clipping
            accelerator.clip_grad_norm_(self.model.parameters(), clip)
        self.optimizer.step()
        if not getattr(self.optimizer, "step_was_skipped", False):  # fp16 overflow: no step, no lr step
            self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)

    @property
    def lr(self) -> float:
        """The current lr of the first parameter group with ``lr_scale`` 1 (else the last group)."""
        groups = self.optimizer.param_groups
        for group in groups:
            if group.get("lr_scale", 1.0) == 1.0:
                return float(group["lr"])
        return float(groups[-1]["lr"])

    def resume(self, path: Path | None) -> int:
        """Restore the full training state from checkpoint ``path`` (see :func:`find_checkpoint`); returns
        the optimiser step to continue from (0 without a checkpoint)."""
        if path is None:
            return 0
        meta, self.rank_state = load_checkpoint(self.accelerator, path, self.world)
        step = int(meta["step"])
        log.info("resumed from %s (step %d)", path, step)
        return step

    def save(self, root: Path, step: int, meta: dict, rank_state: dict | None = None) -> Path:
        """A resumable checkpoint of the full training state and this rank's ``rank_state`` (collective)."""
        return save_checkpoint(self.accelerator, root, step, meta, self.recipe.keep_checkpoints, rank_state)

    def full_state_dict(self) -> dict[str, torch.Tensor]:
        """The model's full fp32 weights as CPU tensors, on every rank (collective under DeepSpeed).

        Under DeepSpeed these are the optimiser's fp32 master weights, assembled from every rank's partition
        (ZeRO 1-3); a frozen parameter has no master copy and is the value the model computed with."""
        module = self.accelerator.unwrap_model(self.model)
        if not self.deepspeed:
            return {k: _fp32_cpu(v) for k, v in module.state_dict().items()}
        # deferred: deepspeed is heavy to import and only DeepSpeed runs need it
        import deepspeed
        from deepspeed.utils import safe_get_full_fp32_param

        out: dict[str, torch.Tensor] = {}
        for name, param in module.named_parameters():  # the same order on every rank: the gathers line up
            if param.requires_grad:
                full = safe_get_full_fp32_param(param)
                if full is None:
                    raise RuntimeError(f"DeepSpeed holds no fp32 master copy of the trainable parameter {name!r}")
                out[name] = _fp32_cpu(full)
            elif hasattr(param, "ds_id"):  # a frozen ZeRO-3 partition: gather the value the model computed with
                with deepspeed.zero.GatheredParameters([param]):
                    out[name] = _fp32_cpu(param.data)
            else:
                out[name] = _fp32_cpu(param)
        params = dict(module.named_parameters())
        for name, value in module.state_dict().items():  # persistent buffers
            if name not in params and name not in out:
                out[name] = _fp32_cpu(value)
        return out


def find_checkpoint(root: Path, resume: str | None) -> Path | None:
    """The checkpoint a run continues from: the newest under ``root`` that verifies (``resume="auto"``; those
    passed over are named with the reason), none (``"never"``, refused where ``root`` holds checkpoints that
    a fresh start would overwrite), or the folder ``resume`` names (verified). Also clears the unfinished
    checkpoints of a killed run (collective)."""
    clean_unfinished(root)
    if resume == "auto":
        return latest_checkpoint(root)
    if resume in ("never", "", None):
        found = checkpoint_dirs(root)
        if found:
            raise RecipeError(f"resume=never: {root} holds checkpoints up to {found[-1].name} that a fresh run "
                              f"would overwrite; resume=auto continues it, or pick another name= (or delete "
                              f"{root.parent} first)")
        return None
    return named_checkpoint(resume)


def weights_dtype(model: nn.Module) -> torch.dtype:
    """The dtype of ``model``'s (first) weights: what float inputs must be cast to."""
    return next(model.parameters()).dtype


def to_model(tensor: torch.Tensor, model: nn.Module, device: torch.device | str) -> torch.Tensor:
    """``tensor`` on ``device``; floating point cast to ``model``'s weights' dtype (bf16 under DeepSpeed
    bf16: DeepSpeed casts the weights, not the inputs)."""
    if tensor.is_floating_point():
        return tensor.to(device, dtype=weights_dtype(model), non_blocking=True)
    return tensor.to(device, non_blocking=True)


def _fp32_cpu(tensor: torch.Tensor) -> torch.Tensor:
    tensor = tensor.detach().cpu()
    return tensor.float().clone() if tensor.is_floating_point() else tensor.clone()


# ------------------------------------------------------------------------------------------ the loop


@dataclass
class MicroResult:
    """What the loss function returns for one micro-batch: the loss, scalar stats to log (averaged over the
    accumulation), and how many clips it trained on (for clips/s)."""

    loss: torch.Tensor
    stats: dict[str, float] = field(default_factory=dict)
    clips: int = 0


def train(engine: Engine, batches: Iterator, loss_fn: Callable[[Any, int], MicroResult], start_step: int,
          checkpoints: Path, run_dir: Path, checkpoint_every: int, desc: str,
          after_step: Callable[[int, dict], None] | None = None) -> list[dict]:
    """Train from ``start_step`` to the schedule's end; returns the per-step history (rank 0; ``[]`` elsewhere).

    ``batches`` yields micro-batches in order from ``start_step`` (``optim.grad_accum`` per optimiser step);
    ``loss_fn(batch, step)`` runs one forward. Rank 0 appends a row per step to ``run_dir/metrics.jsonl``
    (``step``, ``epoch``, ``lr``, ``loss`` and the stats; rows after ``start_step`` from a killed run are
    dropped first), writes TensorBoard scalars and shows a progress bar. ``after_step(step, row)`` may add
    to the row (e.g. a test evaluation). A checkpoint is saved every ``checkpoint_every`` steps and at the end,
    with ``batches.state_dict()`` of every rank when ``batches`` has one. SIGTERM / SIGUSR1 / Ctrl-C end the
    loop at the next step boundary with a checkpoint, raising :class:`~mgfm.train.stop.Stopped`.
    """
    schedule, recipe = engine.schedule, engine.recipe
    grad_accum = recipe.optim.grad_accum
    main = is_main_process()
    history = load_history(run_dir / "metrics.jsonl", start_step) if main else []
    writer = _tensorboard(run_dir, start_step) if main else None
    progress = None
    if main:
        progress = tqdm(total=schedule.total_steps, initial=start_step, desc=desc, unit="step", dynamic_ncols=True)
    engine.model.train()
    start, clips = time.time(), 0
    step = start_step

    def save(**meta) -> Path:
        state = batches.state_dict() if hasattr(batches, "state_dict") else None
        return engine.save(checkpoints, step, {"epoch": step // schedule.steps_per_epoch, **meta}, state)

    saved_at = None
    with StopRequests() as stop:
        while step < schedule.total_steps:
            sums: dict[str, float] = {}
            for _ in range(grad_accum):
                try:
                    batch = next(batches)
                except StopIteration:
                    raise RuntimeError(f"the training data ended at step {step} of {schedule.total_steps}") from None
                with engine.accelerator.accumulate(engine.model):
                    result = loss_fn(batch, step)
                    engine.step(result.loss, step)
                clips += result.clips * engine.world
                for key, value in {"loss": float(result.loss.detach().float()), **result.stats}.items():
                    sums[key] = sums.get(key, 0.0) + value / grad_accum
            step += 1
            row = {"step": step, "epoch": step / schedule.steps_per_epoch, "lr": engine.lr, **sums}
            if after_step is not None:
                after_step(step, row)
            if main:
                rate = clips / max(1e-9, time.time() - start)
                progress.update(1)
                progress.set_postfix(loss=f"{sums['loss']:.4f}", lr=f"{row['lr']:.2e}", clips_s=f"{rate:.1f}")
                for key, value in {**row, "clips_per_s": rate}.items() if writer is not None else ():
                    if key not in ("step", "epoch") and isinstance(value, (int, float)):
                        writer.add_scalar(f"train/{key}", value, step)
                history.append(row)
                with (run_dir / "metrics.jsonl").open("a") as handle:
                    handle.write(json.dumps(row) + "\n")
            if checkpoint_every and step % checkpoint_every == 0 and step < schedule.total_steps:
                save()
                saved_at = step
            signame = stop.agreed(engine.device)
            if signame is not None and step < schedule.total_steps:
                if progress is not None:
                    progress.close()
                if writer is not None:
                    writer.close()
                raise Stopped(signame, step, checkpoints / f"step_{step:08d}" if saved_at == step else save())
    if progress is not None:
        progress.close()
    if writer is not None:
        writer.close()
    engine.clips_per_s = clips / max(1e-9, time.time() - start)
    if step > start_step or latest_checkpoint(checkpoints) is None:
        save(final=True)
    return history


def load_history(path: Path, upto_step: int) -> list[dict]:
    """The rows of ``metrics.jsonl`` up to ``upto_step``; later rows (a killed run logged them after its last
    checkpoint) and a line cut short by a kill are dropped from the file too, so a resumed run continues it
    with no gap or repeat."""
    if not path.exists():
        return []
    lines = path.read_text().splitlines()
    rows = []
    for number, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            rows.append(json.loads(line))
        except ValueError:
            if number < len(lines):  # only the last line can be cut short by a kill; anything else is damage
                raise
    kept = [r for r in rows if r["step"] <= upto_step]
    if len(kept) != len(lines):
        write_atomic(path, "".join(json.dumps(r) + "\n" for r in kept))
    return kept


def _tensorboard(run_dir: Path, start_step: int):
    """A TensorBoard writer for ``run_dir/tensorboard`` that drops the events a killed run logged after
    ``start_step``, or None (warned) where tensorboard is not installed (a bare GPU box): ``metrics.jsonl``
    has every step anyway."""
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError:
        log.warning("tensorboard is not installed: no TensorBoard logs (metrics.jsonl has every step)")
        return None
    return SummaryWriter(str(run_dir / "tensorboard"), purge_step=start_step + 1 if start_step else None)

