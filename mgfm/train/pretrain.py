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
stream (``mgfm.data.stream``), which splits shards by ``torch.distributed`` rank and yields a fixed number
of batches per epoch, so ranks never wait on each other at an uneven end.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
import time
from pathlib import Path
from typing import Callable, Iterator

import torch

from mgfm.config import save_recipe
from mgfm.data.stream import MemoryClips, SkipCounter, make_loader
from mgfm.data.transforms import normalise
from mgfm.errors import InputError
from mgfm.files import FolderLock, write_atomic
from mgfm.shards.read import Mixture, size_mismatches
from mgfm.model.contrastive import group_ids
from mgfm.model.hf import save_encoder_hf
from mgfm.model.motion_init import frame_differences, init_patch_embed_from_motion
from mgfm.model.pretrained import fit_config, load_pretrained, read_checkpoint
from mgfm.model.videomae import build_encoder, build_pretraining_model, param_groups, patchify
from mgfm.report import save_figure
from mgfm.runtime import barrier, is_main_process, setup_logging
from mgfm.train.engine import Engine, MicroResult, Schedule, find_checkpoint, train
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
    is read (the pipeline renders the default data there)."""
    engine = Engine(recipe)
    setup_logging()
    torch.manual_seed(recipe.seed + engine.rank)
    if prepare_data is not None:
        prepare_data(recipe)
    run_dir = Path(recipe.out_dir) / recipe.name
    with FolderLock(run_dir) if is_main_process() else contextlib.nullcontext():
        return _pretrain(recipe, engine, run_dir)


def _pretrain(recipe: PretrainRecipe, engine: Engine, run_dir: Path) -> Path:
    rank, world = engine.rank, engine.world
    ckpt_root = run_dir / "checkpoints"
    if is_main_process():
        save_recipe(recipe, run_dir / "recipe.yaml")

    resume_from = find_checkpoint(ckpt_root, recipe.resume)
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
    if step >= schedule.total_steps and (run_dir / "encoder" / "config.json").exists():
        log.info("%s is already complete (%d steps); nothing to do", run_dir, step)
        barrier()
        return run_dir

    skips: list = []
    batches = train_stream(recipe, schedule, step, skips, memory)
    audit = _audit_file(run_dir, rank) if recipe.audit_data else None
    start = time.time()

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

    snapshots = {epoch * schedule.steps_per_epoch: epoch for epoch in recipe.export_epochs}
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
    history = train(engine, batches, loss_fn, step, ckpt_root, run_dir, every, "pretrain", after_step)
    batches.close()  # stops the last epoch's loader workers
    if audit is not None:
        audit.close()

    export_encoder(engine, recipe, run_dir / "encoder")
    if is_main_process():
        _plot_loss(history, run_dir / "loss.png")
        lost = SkipCounter.merged(skips)  # a clip lost in every epoch (or every resampled pass) counts once
        skipped = lost.samples
        summary = {"run": str(run_dir), "steps": schedule.total_steps,
                   "final_loss": history[-1]["loss"] if history else None, "clips_per_s": engine.clips_per_s,
                   "skipped_samples": skipped, "broken_shards": lost.shard_errors,
                   "skipped_by_reason": dict(sorted(lost.by_reason.items())), "world_size": world,
                   "precision": engine.precision, "deepspeed": engine.deepspeed,
                   "resumed_from_step": step if resume_from else None, "seconds": time.time() - start}
        write_atomic(run_dir / "summary.json", json.dumps(summary, indent=1))
        log.info("done: %d steps, final loss %s, %.1f clips/s; data: %s; encoder at %s", schedule.total_steps,
                 summary["final_loss"], summary["clips_per_s"], lost.summary(), run_dir / "encoder")
    barrier()
    return run_dir


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


def train_stream(recipe: PretrainRecipe, schedule: Schedule, start_step: int, skips: list,
                 memory: MemoryClips | None = None) -> Iterator[dict]:
    """Train micro-batches from optimiser step ``start_step`` on, epoch after epoch; each epoch is a pass of
    the stream seeded by its number. A resumed epoch restarts its stream with a new seed offset: the data
    order differs from the lost run's, the step count and schedule do not. Each pass's skip counter is
    appended to ``skips``."""
    per_epoch = schedule.steps_per_epoch * recipe.optim.grad_accum
    epoch, done = divmod(start_step, schedule.steps_per_epoch)
    while True:
        loader, counter = make_loader(stream_source(recipe), recipe.split, recipe.clip_stream, mode="train",
                                      epoch=epoch * 1000 + done, memory=memory)
        skips.append(counter)
        need, got = (schedule.steps_per_epoch - done) * recipe.optim.grad_accum, 0
        for batch in loader:
            yield batch
            got += 1
            if got == need:
                break
        if got < need:
            raise InputError(f"the train stream of {recipe.shards} ended after {got + done * recipe.optim.grad_accum}"
                               f" of {per_epoch} batches in epoch {epoch}")
        epoch, done = epoch + 1, 0


def _audit_file(run_dir: Path, rank: int):
    folder = run_dir / "data_audit"
    folder.mkdir(parents=True, exist_ok=True)
    return (folder / f"rank{rank}.txt").open("a", buffering=1)


def _plot_loss(history: list[dict], path: Path) -> None:
    if not history:
        return
    try:  # optional: a bare GPU box may lack it (metrics.jsonl has the losses anyway)
        from matplotlib.figure import Figure
    except ImportError:
        log.warning("matplotlib is not installed: no %s (metrics.jsonl has the losses)", path.name)
        return

    fig = Figure(figsize=(6, 3.5), dpi=120)
    ax = fig.add_subplot()
    ax.plot([h["step"] for h in history], [h["loss"] for h in history], lw=1)
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("pretraining loss")
    ax.grid(alpha=0.3)
    fig.tight_layout()
    save_figure(fig, path)

