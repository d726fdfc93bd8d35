"""Masked video pretraining engine: ``accelerate launch pretrain.py [--recipe FILE] [key=value ...]``.

A short loop in the nanoGPT spirit: build the recipe, the accelerator (DeepSpeed when the launcher or the
recipe asks for it), the model and the optimizer; then for each data epoch stream the train shards and
step. Checkpoints are atomic and resumable (``resume=auto``), rank 0 shows a progress bar and writes
TensorBoard scalars, and the end of the run writes ``encoder/`` in Hugging Face ``VideoMAEModel`` format.

The data loader is deliberately NOT passed through ``accelerator.prepare``: Accelerate would re-shard or
broadcast the IterableDataset and fight WebDataset's own node/worker splitting. Each rank builds its own
stream (``mgfm.data.stream``), which splits shards by ``torch.distributed`` rank and yields a fixed number
of batches per epoch, so ranks never wait on each other at an uneven end.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import os
import time
from pathlib import Path

import torch

from mgfm.config import save_recipe
from mgfm.train.checkpoint import latest_checkpoint, load_checkpoint, save_checkpoint
from mgfm.train.distributed import barrier, is_main_process, rank_world, setup_logging
from mgfm.train.recipe import PretrainRecipe
from mgfm.train.step import backward_and_step

log = logging.getLogger("mgfm.pretrain")
DEFAULT_RECIPE = Path(__file__).resolve().parents[2] / "recipes" / "pretrain" / "tiny_cpu.yaml"


def make_accelerator(recipe: PretrainRecipe):
    """An Accelerator honouring the launcher's DeepSpeed config, else the recipe's ``zero_stage``."""
    from accelerate import Accelerator
    from accelerate.utils import DeepSpeedPlugin

    precision = recipe.mixed_precision
    if precision == "auto":
        precision = "bf16" if torch.cuda.is_available() and torch.cuda.is_bf16_supported() else "no"
    launched_with_deepspeed = os.environ.get("ACCELERATE_USE_DEEPSPEED", "false").lower() == "true"
    plugin = None
    if not launched_with_deepspeed and recipe.zero_stage > 0:
        plugin = DeepSpeedPlugin(zero_stage=recipe.zero_stage, gradient_accumulation_steps=recipe.optim.grad_accum,
                                 gradient_clipping=recipe.optim.clip_grad or 0.0)
    if launched_with_deepspeed:
        # The launcher's DeepSpeed config file owns precision and accumulation; Accelerate refuses both.
        accelerator = Accelerator()
    else:
        accelerator = Accelerator(mixed_precision=precision, gradient_accumulation_steps=recipe.optim.grad_accum,
                                  deepspeed_plugin=plugin)
    ds = accelerator.state.deepspeed_plugin
    if ds is not None:
        # No dataloader goes through prepare(), so DeepSpeed's "auto" batch sizes are filled here.
        _, world = rank_world()
        micro = recipe.stream.batch_size
        ds.deepspeed_config["train_micro_batch_size_per_gpu"] = micro
        ds.deepspeed_config["gradient_accumulation_steps"] = recipe.optim.grad_accum
        ds.deepspeed_config["train_batch_size"] = micro * recipe.optim.grad_accum * world
        ds.deepspeed_config.setdefault("zero_allow_untested_optimizer", True)
        if ds.deepspeed_config.get("gradient_clipping") == "auto":
            ds.deepspeed_config["gradient_clipping"] = recipe.optim.clip_grad or 0.0
    return accelerator


def lr_lambda(total_steps: int, warmup_steps: int, min_ratio: float):
    """Linear warmup to 1, then cosine to ``min_ratio`` (a multiplier of the peak lr)."""
    def factor(step: int) -> float:
        if step < warmup_steps:
            return (step + 1) / max(1, warmup_steps)
        progress = min(1.0, (step - warmup_steps) / max(1, total_steps - warmup_steps))
        return min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * progress))
    return factor


def check_geometry(recipe: PretrainRecipe) -> None:
    """The stream must cut clips the way the model tokenises them."""
    model, stream = recipe.model, recipe.stream
    for key in ("frames", "img_size", "tubelet", "patch"):
        if getattr(model, key) != getattr(stream, key):
            raise ValueError(f"model.{key}={getattr(model, key)} but stream.{key}={getattr(stream, key)}: "
                             f"set both to the same value")


def ensure_default_data(recipe: PretrainRecipe) -> None:
    """Render the synthetic benchmark and shard it when the recipe's shards are missing (rank 0 only)."""
    shards = Path(recipe.shards)
    if "://" in recipe.shards or "{" in recipe.shards or (shards / "manifest.json").exists():
        return
    if recipe.synthetic_data is None:
        raise FileNotFoundError(f"shards {recipe.shards}: no manifest.json there; build them with "
                                f"`python -m mgfm.shards build ...` or set synthetic_data=...")
    if is_main_process():
        from mgfm.pipeline import build_default_shards

        log.info("shards %s are missing: building the synthetic benchmark at %s and its shards",
                 recipe.shards, recipe.synthetic_data)
        build_default_shards(recipe.synthetic_data, recipe.shards)
    barrier()


def init_patch_embed(encoder, recipe: PretrainRecipe, patches_per_clip: int = 128) -> None:
    """Start ``encoder``'s tubelet embedding from motion PCA of unlabelled train clips (rank 0's, broadcast)."""
    from mgfm.data.stream import make_loader
    from mgfm.data.transforms import normalise_video
    from mgfm.model.motion_init import frame_differences, init_patch_embed_from_motion
    from mgfm.model.videomae import patchify

    cfg = encoder.cfg
    stream = dataclasses.replace(recipe.stream, masks=False, repeats=1)
    loader, _ = make_loader(recipe.shards, recipe.split, stream, mode="train", epoch=999_999)  # not a training epoch
    gen = torch.Generator().manual_seed(recipe.seed)
    diffs, clips = [], 0
    for batch in loader:
        video = batch["video"]
        if video.dtype == torch.uint8:
            video = normalise_video(video, recipe.stream.mean, recipe.stream.std)
        patches = patchify(video, cfg.tubelet, cfg.patch)  # (B, N, P)
        pick = torch.randint(patches.shape[1], (len(patches), min(patches_per_clip, patches.shape[1])), generator=gen)
        rows = torch.gather(patches, 1, pick[..., None].expand(-1, -1, patches.shape[2])).flatten(0, 1)
        diffs.append(frame_differences(rows, cfg.channels, cfg.tubelet))
        clips += len(video)
        if clips >= recipe.patch_init_clips:
            break
    if not diffs:
        raise ValueError(f"patch_init=motion_pca: no clips in {recipe.shards} split {recipe.split!r}")
    rows_set = init_patch_embed_from_motion(encoder.patch_embed, torch.cat(diffs), cfg.channels, cfg.tubelet)
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        for tensor in (encoder.patch_embed.weight, encoder.patch_embed.bias):
            torch.distributed.broadcast(tensor.data, src=0)
    log.info("tubelet embedding: %d of %d rows from motion PCA of %d clips", rows_set, cfg.dim, clips)


def run(recipe: PretrainRecipe) -> Path:
    """Pretrain as the recipe says; returns the run directory."""
    from mgfm.data.stream import make_loader
    from mgfm.data.transforms import normalise_video
    from mgfm.model.contrastive import group_ids
    from mgfm.model.hf import init_encoder_from_hf, save_encoder_hf
    from mgfm.model.videomae import build_pretraining_model, param_groups

    accelerator = make_accelerator(recipe)
    setup_logging()
    rank, world = rank_world()
    torch.manual_seed(recipe.seed + rank)
    ensure_default_data(recipe)

    run_dir = Path(recipe.out_dir) / recipe.name
    ckpt_root = run_dir / "checkpoints"
    if is_main_process():
        run_dir.mkdir(parents=True, exist_ok=True)
        save_recipe(recipe, run_dir / "recipe.yaml")

    check_geometry(recipe)
    resume_from = None
    if recipe.resume == "auto":
        resume_from = latest_checkpoint(ckpt_root)
    elif recipe.resume not in ("never", "", None):
        resume_from = Path(recipe.resume)
    model = build_pretraining_model(recipe.model)
    if recipe.init_from:
        init_encoder_from_hf(model.encoder, recipe.init_from)
        log.info("encoder initialised from %s", recipe.init_from)
    elif recipe.patch_init == "motion_pca" and resume_from is None:  # a checkpoint holds the embedding
        init_patch_embed(model.encoder, recipe)
    if recipe.freeze_patch_embed:
        model.encoder.patch_embed.requires_grad_(False)

    loader, skips = make_loader(recipe.shards, recipe.split, recipe.stream, mode="train", epoch=0)
    steps_per_epoch = len(loader) // recipe.optim.grad_accum
    if steps_per_epoch < 1:
        raise ValueError(f"an epoch of {len(loader)} batches is shorter than optim.grad_accum="
                         f"{recipe.optim.grad_accum}; lower stream.batch_size or set stream.batches_per_epoch")
    total_steps = steps_per_epoch * recipe.optim.epochs
    global_batch = recipe.stream.batch_size * recipe.optim.grad_accum * world
    peak_lr = recipe.optim.base_lr * global_batch / 256
    optimizer = torch.optim.AdamW(param_groups(model, recipe.optim.weight_decay), lr=peak_lr,
                                  betas=recipe.optim.betas)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_lambda(
        total_steps, int(recipe.optim.warmup_epochs * steps_per_epoch), recipe.optim.min_lr / peak_lr))
    model, optimizer, scheduler = accelerator.prepare(model, optimizer, scheduler)

    step, epoch = 0, 0
    resumed_step = None
    if resume_from is not None:
        meta = load_checkpoint(accelerator, resume_from)
        step, epoch = meta["step"], meta["epoch"]
        resumed_step = step
        log.info("resumed from %s (step %d, data epoch %d)", resume_from, step, epoch)

    log.info("pretraining %s: %d ranks x %d clips x %d accumulation = global batch %d, peak lr %.2e, "
             "%d steps (%d epochs x %d)", recipe.name, world, recipe.stream.batch_size, recipe.optim.grad_accum,
             global_batch, peak_lr, total_steps, recipe.optim.epochs, steps_per_epoch)
    writer = _tensorboard(run_dir) if is_main_process() else None
    audit = _audit_file(run_dir, rank) if recipe.audit_data else None
    history = _load_history(run_dir / "metrics.jsonl", step)
    progress = _progress(total_steps, step)
    device = accelerator.device
    skipped_total = 0
    start = time.time()
    clips_seen = 0
    while step < total_steps:
        # A resumed epoch restarts its stream with a new seed offset: the data order differs from the lost
        # run's, the step count and schedule do not.
        if step % steps_per_epoch or epoch:
            loader, skips = make_loader(recipe.shards, recipe.split, recipe.stream, mode="train",
                                        epoch=epoch * 1000 + step % steps_per_epoch)
        done_in_epoch = step % steps_per_epoch
        micro = 0
        for batch in loader:
            if done_in_epoch >= steps_per_epoch or step >= total_steps:
                break
            video = batch["video"].to(device, non_blocking=True)
            if video.dtype == torch.uint8:  # stream.video_dtype=uint8: normalise on the accelerator
                video = normalise_video(video, recipe.stream.mean, recipe.stream.std)
            enc_mask = batch["encoder_mask"].to(device)
            dec_mask = batch["decoder_mask"].to(device) if batch.get("decoder_mask") is not None else None
            group = group_ids(batch["clip_id"], device)
            with accelerator.accumulate(model):
                loss, out = model(video, enc_mask, dec_mask, group)
                backward_and_step(accelerator, model, optimizer, scheduler, loss, recipe.optim.clip_grad, step)
            if audit is not None:
                audit.write("".join(f"{step} {clip_id}\n" for clip_id in batch["clip_id"]))
            micro += 1
            clips_seen += video.shape[0] * world
            if micro % recipe.optim.grad_accum:
                continue
            step += 1
            done_in_epoch += 1
            loss_value = loss.detach().float().item()
            lr = scheduler.get_last_lr()[0]
            rate = clips_seen / max(1e-9, time.time() - start)
            if progress is not None:
                progress.update(1)
                progress.set_postfix(loss=f"{loss_value:.4f}", lr=f"{lr:.2e}", clips_s=f"{rate:.1f}")
            if writer is not None:
                writer.add_scalar("train/loss", loss_value, step)
                writer.add_scalar("train/lr", lr, step)
                writer.add_scalar("train/clips_per_s", rate, step)
                terms = {name: value.item() for name, value in (
                    ("reconstruction_loss", out.reconstruction_loss), ("contrastive_loss", out.contrastive_loss),
                    ("motion_map_loss", out.motion_map_loss)) if value is not None}
                for name, value in terms.items():
                    writer.add_scalar(f"train/{name}", value, step)
                history.append({"step": step, "epoch": epoch, "loss": loss_value, "lr": lr, **terms})
                _append_history(run_dir / "metrics.jsonl", history[-1])
            if recipe.checkpoint_every and step % recipe.checkpoint_every == 0 and step < total_steps:
                save_checkpoint(accelerator, ckpt_root, step, {"epoch": epoch}, recipe.keep_checkpoints)
        skipped_total += skips.total
        if done_in_epoch >= steps_per_epoch:
            epoch += 1
            if not recipe.checkpoint_every or step >= total_steps:
                save_checkpoint(accelerator, ckpt_root, step, {"epoch": epoch}, recipe.keep_checkpoints)
        elif step < total_steps:
            raise RuntimeError(f"the train stream of {recipe.shards} ended after {done_in_epoch} of "
                               f"{steps_per_epoch} steps in epoch {epoch}")
    if progress is not None:
        progress.close()
    if writer is not None:
        writer.close()
    if audit is not None:
        audit.close()

    barrier()
    if resumed_step is not None and resumed_step >= total_steps and (run_dir / "encoder" / "config.json").exists():
        log.info("%s is already complete (%d steps); nothing to do", run_dir, step)
        return run_dir
    state = accelerator.get_state_dict(model)  # gathers ZeRO-3 shards; collective
    if is_main_process():
        unwrapped = accelerator.unwrap_model(model)
        unwrapped.load_state_dict(state)
        save_encoder_hf(unwrapped.encoder, run_dir / "encoder")
        _plot_loss(history, run_dir / "loss.png")
        elapsed = time.time() - start
        summary = {"run": str(run_dir), "steps": step, "final_loss": history[-1]["loss"] if history else None,
                   "clips_per_s": clips_seen / max(elapsed, 1e-9), "skipped_samples": skipped_total,
                   "world_size": world, "resumed_from_step": resumed_step, "seconds": elapsed}
        (run_dir / "summary.json").write_text(json.dumps(summary, indent=1))
        log.info("done: %d steps, final loss %s, %.1f clips/s, %d corrupt samples skipped, encoder at %s",
                 step, summary["final_loss"], summary["clips_per_s"], skipped_total, run_dir / "encoder")
    barrier()
    return run_dir


def _audit_file(run_dir: Path, rank: int):
    folder = run_dir / "data_audit"
    folder.mkdir(parents=True, exist_ok=True)
    return (folder / f"rank{rank}.txt").open("a", buffering=1)


def _tensorboard(run_dir: Path):
    from torch.utils.tensorboard import SummaryWriter

    return SummaryWriter(str(run_dir / "tensorboard"))


def _progress(total: int, initial: int):
    if not is_main_process():
        return None
    from tqdm.auto import tqdm

    return tqdm(total=total, initial=initial, desc="pretrain", unit="step", dynamic_ncols=True)


def _load_history(path: Path, upto_step: int) -> list[dict]:
    if not path.exists():
        return []
    rows = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    kept = [r for r in rows if r["step"] <= upto_step]
    if len(kept) != len(rows) and is_main_process():  # drop steps a killed run logged after its last checkpoint
        path.write_text("".join(json.dumps(r) + "\n" for r in kept))
    return kept


def _append_history(path: Path, row: dict) -> None:
    with path.open("a") as handle:
        handle.write(json.dumps(row) + "\n")


def _plot_loss(history: list[dict], path: Path) -> None:
    if not history:
        return
    from matplotlib.figure import Figure

    from mgfm.evaluate.report import save_figure

    fig = Figure(figsize=(6, 3.5), dpi=120)
    ax = fig.add_subplot()
    ax.plot([h["step"] for h in history], [h["loss"] for h in history], lw=1)
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("pretraining loss")
    ax.grid(alpha=0.3)
    fig.tight_layout()
    save_figure(fig, path)


def main(argv: list[str] | None = None) -> Path:
    """CLI entry: ``[--recipe FILE] [key=value ...]``; user errors end in one line and exit code 2."""
    from mgfm.cli import run_cli

    return run_cli(PretrainRecipe, run, argv, "pretrain.py", "Masked video pretraining (VideoMAE-style).",
                   DEFAULT_RECIPE)


if __name__ == "__main__":
    main()
