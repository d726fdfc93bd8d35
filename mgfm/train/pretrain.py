"""Masked video pretraining (``accelerate launch pretrain.py [--recipe FILE] [key=value ...]`` runs it through
:mod:`mgfm.pipeline`, which also renders the default data when it is missing).

Setup only: the recipe, the model (optionally from ``init_from``, any public VideoMAE checkpoint with its decoder
(:mod:`mgfm.model.pretrained`), or a motion-PCA tubelet embedding), the
train stream epoch after epoch and the masked-reconstruction loss of a micro-batch; the training itself
(precision, DeepSpeed, LR schedule, steps, checkpoints and resume, logs) is :mod:`mgfm.train.engine`.
The end of the run writes ``encoder/`` in Hugging Face ``VideoMAEModel`` format from the fp32 master
weights.

The data loader is deliberately NOT passed through ``accelerator.prepare``: Accelerate would re-shard or
broadcast the IterableDataset and fight WebDataset's own node/worker splitting. Each rank builds its own
stream (``mgfm.data.stream``), which splits each epoch's clips by ``torch.distributed`` rank and worker and
yields a fixed number of batches per epoch, so ranks never wait on each other at an uneven end; the stream's
position is part of every checkpoint (:class:`~mgfm.data.stream.epochs.EpochStream`), so a resumed run sees
the batches the uninterrupted one would have seen.

A rerun of a finished run does nothing, and a rerun of a run whose end was interrupted (the encoder export,
``summary.json``, ``loss.png``) finishes what is missing.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
import time
from pathlib import Path
from typing import Callable

import torch
import yaml

from mgfm.config import RecipeError, recipe_changes, recipe_to_dict, save_recipe
from mgfm.data.stream import EpochStream, MemoryClips, SkipCounter, make_loader
from mgfm.data.transforms import normalise
from mgfm.errors import InputError
from mgfm.files import FolderLock, write_atomic
from mgfm.shards.read import Mixture, size_mismatches
from mgfm.model.contrastive import group_ids
from mgfm.model.hf import save_encoder_hf
from mgfm.model.motion_init import frame_differences, init_patch_embed_from_motion
from mgfm.model.encoder import build_encoder, patchify
from mgfm.model.masked import build_pretraining_model, param_groups
from mgfm.model.pretrained import fit_config, load_pretrained, read_checkpoint
from mgfm.report import save_figure
from mgfm.runtime import barrier, gather_objects, is_main_process, setup_logging
from mgfm.train.checkpoint import checkpoint_dirs
from mgfm.train.engine import Engine, MicroResult, Schedule, find_checkpoint, load_history, train
from mgfm.train.recipe import PretrainRecipe

log = logging.getLogger("mgfm.pretrain")


def shard_sources(recipe: PretrainRecipe) -> list[str]:
    """The recipe's shard sets (``shards`` is one, or a list of several)."""
    return [recipe.shards] if isinstance(recipe.shards, str) else list(recipe.shards)


def stream_source(recipe: PretrainRecipe) -> str | Mixture:
    """What the train stream reads: the one shard set, or the weighted :class:`Mixture` of several."""
    if isinstance(recipe.shards, str):
        if recipe.shard_weights is not None:
            raise InputError("shard_weights: give one weight per shard set of shards=[...], not for a single set")
        return recipe.shards
    return Mixture(tuple(recipe.shards), None if recipe.shard_weights is None else tuple(recipe.shard_weights))


def init_patch_embed(encoder, recipe: PretrainRecipe, memory: MemoryClips | None = None,
                     patches_per_clip: int = 128) -> None:
    """Start ``encoder``'s tubelet embedding from motion PCA of unlabelled train clips (rank 0's, broadcast)."""
    cfg = encoder.cfg
    stream = dataclasses.replace(recipe.clip_stream, masks=False, repeats=1)
    loader, _ = make_loader(stream_source(recipe), recipe.split, stream, mode="train", epoch=999_999,  # not an epoch
                            memory=memory)
    gen = torch.Generator().manual_seed(recipe.seed)
    diffs, clips = [], 0
    for batch in loader:
        video = batch["video"]
        if video.dtype == torch.uint8:
            video = normalise(video, recipe.model.pixel_mean, recipe.model.pixel_std)
        patches = patchify(video, cfg.tubelet, cfg.patch)  # (B, N, P)
        pick = torch.randint(patches.shape[1], (len(patches), min(patches_per_clip, patches.shape[1])), generator=gen)
        rows = torch.gather(patches, 1, pick[..., None].expand(-1, -1, patches.shape[2])).flatten(0, 1)
        diffs.append(frame_differences(rows, cfg.channels, cfg.tubelet))
        clips += len(video)
        if clips >= recipe.patch_init_clips:
            break
    if not diffs:
        raise InputError(f"patch_init=motion_pca: no clips in {recipe.shards} split {recipe.split!r}")
    rows_set = init_patch_embed_from_motion(encoder.patch_embed, torch.cat(diffs), cfg.channels, cfg.tubelet)
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        for tensor in (encoder.patch_embed.weight, encoder.patch_embed.bias):
            torch.distributed.broadcast(tensor.data, src=0)
    log.info("tubelet embedding: %d of %d rows from motion PCA of %d clips", rows_set, cfg.dim, clips)


def run(recipe: PretrainRecipe, prepare_data: Callable[[PretrainRecipe], None] | None = None) -> Path:
    """Pretrain as the recipe says; returns the run directory (held by rank 0's :class:`FolderLock` while
    the run writes to it). ``prepare_data(recipe)`` runs once the process group is up and before anything
    is read (the pipeline renders the default data there). A run folder that holds a run of another recipe
    is refused before anything is written (:func:`check_same_run`)."""
    run_dir = Path(recipe.out_dir) / recipe.name
    check_same_run(recipe, run_dir)
    engine = Engine(recipe)
    setup_logging()
    torch.manual_seed(recipe.seed + engine.rank)
    if prepare_data is not None:
        prepare_data(recipe)
    with FolderLock(run_dir) if is_main_process() else contextlib.nullcontext():
        return _pretrain(recipe, engine, run_dir)


def check_same_run(recipe: PretrainRecipe, run_dir: Path) -> None:
    """A one-line :class:`RecipeError` when ``run_dir`` holds checkpoints or an encoder of a recipe that differs
    from ``recipe`` in anything but :attr:`PretrainRecipe.RESUMABLE` (the model, the data, the schedule...),
    listing the keys: resuming would mix two runs, and the folder would describe a model its checkpoints are
    not."""
    saved = run_dir / "recipe.yaml"
    trained = checkpoint_dirs(run_dir / "checkpoints") or (run_dir / "encoder").is_dir()
    if not trained or not saved.is_file():
        return
    try:
        before = yaml.safe_load(saved.read_text()) or {}
    except (OSError, yaml.YAMLError) as err:
        raise RecipeError(f"{saved}: unreadable ({type(err).__name__}); the run it describes cannot be checked") from None
    changed = recipe_changes(before, recipe, PretrainRecipe.RESUMABLE)
    if changed:
        shown = ", ".join(f"{key} ({_value(before, key)} -> {_value(recipe_to_dict(recipe), key)})" for key in changed[:6])
        more = f" and {len(changed) - 6} more" if len(changed) > 6 else ""
        raise RecipeError(f"{run_dir} holds a run of another recipe: {shown}{more} differ from its recipe.yaml; "
                          f"a resumed run may change only {', '.join(PretrainRecipe.RESUMABLE)}; rerun with its "
                          f"recipe or pick another name=")


def _value(data: dict, key: str):
    for part in key.split("."):
        if not isinstance(data, dict) or part not in data:
            return "unset"
        data = data[part]
    return data


def _pretrain(recipe: PretrainRecipe, engine: Engine, run_dir: Path) -> Path:
    world = engine.world
    started = time.time()
    ckpt_root = run_dir / "checkpoints"
    resume_from = find_checkpoint(ckpt_root, recipe.resume)
    if is_main_process():
        save_recipe(recipe, run_dir / "recipe.yaml")

    checkpoint = None
    if recipe.init_from:  # the model keeps (or resamples) the position table the encoder was trained with
        checkpoint = read_checkpoint(recipe.init_from, recipe.model)
        recipe.model = fit_config(checkpoint, recipe.model, recipe.pos_embed)
    model = build_pretraining_model(recipe.model, recipe.loss)
    if is_main_process():
        for source in shard_sources(recipe):
            for line in size_mismatches(source, recipe.split):
                log.warning("%s", line)
    memory = None
    if recipe.clip_stream.cache == "memory":  # decoded once for every epoch of the run
        memory = MemoryClips.load(stream_source(recipe), recipe.split, recipe.clip_stream, progress=is_main_process())
    if checkpoint is not None:  # the encoder, and the decoder when the checkpoint has one
        load_pretrained(model, checkpoint)
        checkpoint = None  # loaded: drop the copy
    elif recipe.patch_init == "motion_pca" and resume_from is None:  # a checkpoint holds the embedding
        init_patch_embed(model.encoder, recipe, memory)
    if recipe.freeze_patch_embed:
        model.encoder.patch_embed.requires_grad_(False)
    model.sync_teacher()  # a checkpoint, when resuming, brings the teacher's own weights

    batches_per_epoch = train_batches_per_epoch(recipe)
    global_batch = recipe.stream.batch_size * recipe.optim.grad_accum * world
    schedule = Schedule.for_run(recipe.optim, batches_per_epoch // recipe.optim.grad_accum, global_batch)
    engine.prepare(model, param_groups(model, recipe.optim.weight_decay), schedule)
    step = engine.resume(resume_from)
    log.info("pretraining %s: %d ranks x %d clips x %d accumulation = global batch %d, peak lr %.2e, "
             "%d steps (%d epochs x %d), precision %s%s", recipe.name, world, recipe.stream.batch_size,
             recipe.optim.grad_accum, global_batch, schedule.peak_lr, schedule.total_steps, recipe.optim.epochs,
             schedule.steps_per_epoch, engine.precision, " under DeepSpeed" if engine.deepspeed else "")

    def open_epoch(epoch: int):
        return make_loader(stream_source(recipe), recipe.split, recipe.clip_stream, mode="train", epoch=epoch,
                           memory=memory)

    stream = EpochStream(open_epoch, schedule.steps_per_epoch * recipe.optim.grad_accum,
                         step * recipe.optim.grad_accum, engine.rank_state, source=f"the train stream of {recipe.shards}")
    snapshots = {epoch * schedule.steps_per_epoch: epoch for epoch in recipe.export_epochs}
    trained = step < schedule.total_steps
    if trained:
        try:
            history = _train(recipe, engine, run_dir, schedule, stream, step, snapshots)
        finally:
            stream.close()  # stops the last epoch's loader workers
        export_encoder(engine, recipe, run_dir / "encoder")
    else:
        history = finish_exports(recipe, engine, run_dir, step, snapshots)
    lost = SkipCounter.merged(SkipCounter.from_state(s) for s in gather_objects(stream.skips().state_dict()))
    if is_main_process():
        done = write_outputs(run_dir, trained, history, {
            "run": str(run_dir), "steps": schedule.total_steps, "clips_per_s": engine.clips_per_s,
            "skipped_samples": lost.samples, "broken_shards": lost.shard_errors,
            "skipped_by_reason": dict(sorted(lost.by_reason.items())), "world_size": world,
            "precision": engine.precision, "deepspeed": engine.deepspeed,
            "resumed_from_step": step if resume_from else None, "seconds": time.time() - started})
        if trained:
            log.info("done: %d steps, final loss %s, %.1f clips/s; data: %s; encoder at %s", schedule.total_steps,
                     history[-1]["loss"] if history else None, engine.clips_per_s, lost.summary(), run_dir / "encoder")
        elif done or history is None:
            log.info("%s: finished what an interrupted end of the run left undone (%s)", run_dir,
                     ", ".join(done) or "the encoder")
        else:
            log.info("%s is already complete (%d steps); nothing to do", run_dir, step)
    barrier()
    return run_dir


def _train(recipe: PretrainRecipe, engine: Engine, run_dir: Path, schedule: Schedule, stream: EpochStream,
           step: int, snapshots: dict[int, int]) -> list[dict]:
    """The optimiser steps from ``step`` to the end of the schedule (:func:`mgfm.train.engine.train`): the
    loss of a micro-batch, the EMA teacher's update and the encoder snapshots after each step."""
    audit = _audit_file(run_dir, engine.rank, step) if recipe.audit_data else None

    def loss_fn(batch: dict, at_step: int) -> MicroResult:
        video = batch["video"].to(engine.device, non_blocking=True)
        if video.dtype == torch.uint8:  # stream.video_dtype=uint8: normalise on the accelerator
            video = normalise(video, recipe.model.pixel_mean, recipe.model.pixel_std)
        masks = [batch["encoder_mask"], batch.get("decoder_mask")]
        enc_mask, dec_mask = (None if m is None else m.to(engine.device) for m in masks)
        loss, out = engine.model(engine.inputs(video), enc_mask, dec_mask, group_ids(batch["clip_id"], engine.device))
        if audit is not None:
            audit.write("".join(f"{at_step} {clip_id}\n" for clip_id in batch["clip_id"]))
        terms = {name: value.item() for name, value in (
            ("reconstruction_loss", out.reconstruction_loss), ("contrastive_loss", out.contrastive_loss),
            ("motion_map_loss", out.motion_map_loss), *out.stats.items()) if value is not None}
        return MicroResult(loss, terms, clips=video.shape[0])

    if 0 in snapshots and step == 0:
        export_encoder(engine, recipe, snapshot_folder(run_dir, 0))
    module = engine.accelerator.unwrap_model(engine.model)

    def after_step(at_step: int, row: dict) -> None:
        if module.teacher is not None:
            momentum = recipe.loss.momentum(at_step, schedule.total_steps)
            module.update_teacher(momentum)
            row["ema_momentum"] = momentum
        if at_step in snapshots:
            export_encoder(engine, recipe, snapshot_folder(run_dir, snapshots[at_step]))

    every = recipe.checkpoint_every or schedule.steps_per_epoch
    try:
        return train(engine, stream, loss_fn, step, run_dir / "checkpoints", run_dir, every, "pretrain", after_step)
    finally:
        if audit is not None:
            audit.close()


def finish_exports(recipe: PretrainRecipe, engine: Engine, run_dir: Path, step: int,
                   snapshots: dict[int, int]) -> list[dict] | None:
    """A run whose training is complete: export what an interrupted end left unexported (the encoder, the
    last snapshot; collective) and return its history (rank 0), or None when the encoder had to be exported."""
    missing_encoder = not (run_dir / "encoder" / "config.json").is_file()
    if missing_encoder:
        export_encoder(engine, recipe, run_dir / "encoder")
    for at_step, epoch in sorted(snapshots.items()):
        folder = snapshot_folder(run_dir, epoch)
        if (folder / "config.json").is_file():
            continue
        if at_step == step:
            export_encoder(engine, recipe, folder)
        elif is_main_process():
            log.warning("export_epochs: epoch %d passed before it was asked for; %s not written", epoch, folder)
    history = load_history(run_dir / "metrics.jsonl", step) if is_main_process() else []
    return None if missing_encoder else history


def write_outputs(run_dir: Path, trained: bool, history: list[dict] | None, summary: dict) -> list[str]:
    """Write ``summary.json`` and ``loss.png`` after training, or where an interrupted end of a run left them
    unwritten; returns the names written."""
    if history is None:  # the encoder of a complete run was just exported: rewrite the run's outputs
        history, trained = load_history(run_dir / "metrics.jsonl", summary["steps"]), True
    written = []
    if trained or not (run_dir / "loss.png").is_file():
        if _plot_loss(history, run_dir / "loss.png"):
            written.append("loss.png")
    if trained or not (run_dir / "summary.json").is_file():
        summary["final_loss"] = history[-1]["loss"] if history else None
        write_atomic(run_dir / "summary.json", json.dumps(summary, indent=1))
        written.append("summary.json")
    return written


def snapshot_folder(run_dir: Path, epoch: int) -> Path:
    """Where the encoder after ``epoch`` epochs is exported (``export_epochs``): ``encoders/epoch_NNNNN``."""
    return run_dir / "encoders" / f"epoch_{epoch:05d}"


def export_encoder(engine: Engine, recipe: PretrainRecipe, folder: Path) -> None:
    """Write the encoder's fp32 master weights to ``folder`` in Hugging Face format (collective: every rank
    calls it; rank 0 writes)."""
    state = engine.full_state_dict()
    if is_main_process():
        encoder = build_encoder(recipe.model)  # a fresh fp32 copy: the trained module may be bf16 or partitioned
        encoder.load_state_dict({k[len("encoder."):]: v for k, v in state.items() if k.startswith("encoder.")})
        save_encoder_hf(encoder, folder)


def train_batches_per_epoch(recipe: PretrainRecipe) -> int:
    """Micro-batches per rank and epoch (what the stream yields), at least one optimiser step's worth."""
    stream = dataclasses.replace(recipe.clip_stream, cache="none")  # only its length: nothing is decoded
    loader, _ = make_loader(stream_source(recipe), recipe.split, stream, mode="train", epoch=0)
    n = len(loader)
    if n // recipe.optim.grad_accum < 1:
        raise InputError(f"an epoch of {n} batches is shorter than optim.grad_accum={recipe.optim.grad_accum}; "
                         f"lower stream.batch_size or set stream.batches_per_epoch")
    return n


def _audit_file(run_dir: Path, rank: int, start_step: int):
    """``data_audit/rank<R>.txt`` open for appending ``step clip_id`` lines, without the lines a killed run
    wrote after ``start_step``."""
    path = run_dir / "data_audit" / f"rank{rank}.txt"
    path.parent.mkdir(parents=True, exist_ok=True)
    if path.exists():
        kept = [line for line in path.read_text().splitlines(keepends=True)
                if line.endswith("\n") and int(line.split()[0]) < start_step]
        write_atomic(path, "".join(kept))
    return path.open("a", buffering=1)


def _plot_loss(history: list[dict], path: Path) -> bool:
    if not history:
        return False
    try:  # optional: a bare GPU box may lack it (metrics.jsonl has the losses anyway)
        from matplotlib.figure import Figure
    except ImportError:
        log.warning("matplotlib is not installed: no %s (metrics.jsonl has the losses)", path.name)
        return False

    fig = Figure(figsize=(6, 3.5), dpi=120)
    ax = fig.add_subplot()
    ax.plot([h["step"] for h in history], [h["loss"] for h in history], lw=1)
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("pretraining loss")
    ax.grid(alpha=0.3)
    fig.tight_layout()
    save_figure(fig, path)
    return True
