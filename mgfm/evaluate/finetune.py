"""Supervised and semi-supervised fine-tuning for MG recognition: ``python eval/finetune.py [key=value ...]``
(or under ``accelerate launch``).

The pretrained encoder (or a random one, ``init=random``) plus mean pooling, ``fc_norm`` and a linear head
(:mod:`mgfm.model.classifier`) is trained end to end on a seeded stratified ``label_fraction`` of the
train split (:mod:`mgfm.data.subset`) with the usual video recipe: AdamW with layer-wise lr decay, drop
path, label smoothing, linear warmup + cosine, optional mixup, and a class-imbalance option
(``balance=sampler``: class-balanced sampling of labelled clips; ``balance=logit_adjust``: the
logit-adjusted loss of Menon et al., training logits + tau * log(class prior), plain logits at test).
With ``head_init=probe`` (LP-FT) the head starts from a logistic regression on the frozen features of the
labelled clips (:func:`fit_probe_head`).

``semi.method=fixmatch`` also uses every train clip unlabelled: per step ``semi.ratio`` x batch unlabelled
clips get a pseudo-label from the model (eval mode, no gradient) on a weak view, and the clips whose
confidence reaches ``semi.threshold`` are trained on a strong view (:mod:`mgfm.data.clip_augment`) with
weight ``semi.weight``.

Data: each split is decoded once through the eval stream into memory (:mod:`mgfm.data.decoded_split`);
every rank caches and trains on its own disjoint part. Test: ``views`` temporal windows per clip, softmax
scores averaged (multi-view test). The random draws of a step are seeded by ``(seed, rank, step)``, so a
resumed run sees the data an uninterrupted run would have seen.

Outputs (``out`` = ``<run>/finetune/<shard set name>/<name>``): ``report.json``/``report.md`` (top-1, top-5,
mean class accuracy, per class, confusion PNG), ``metrics.jsonl``, resumable ``checkpoints/`` and ``model/``,
a Hugging Face ``VideoMAEForVideoClassification`` folder with the label names. ``compare=true`` runs
{random, pretrained} x {supervised, semi-supervised} at each of ``compare_fractions`` into
``out/labels-<f>/<init>-<sup|semi>/`` and writes the summary table to ``out/report.md``.
"""

from __future__ import annotations

import contextlib
import dataclasses
import itertools
import json
import logging
import math
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from mgfm.cli import run_cli
from mgfm.config import recipe_to_dict, save_recipe
from mgfm.data.clip_augment import crop_clips
from mgfm.data.decoded_split import DecodedSplit
from mgfm.data.transforms import normalise
from mgfm.evaluate.encoder_eval import output_folder
from mgfm.evaluate.featureset import FeatureSet
from mgfm.evaluate.finetune_data import FinetuneData, StepBatch, load_data, make_batch, model_geometry, step_generator
from mgfm.evaluate.finetune_recipe import FinetuneRecipe
from mgfm.evaluate.metrics import classification_metrics, plot_confusion
from mgfm.evaluate.probe import ProbeConfig, train_probe
from mgfm.errors import InputError
from mgfm.files import FolderLock
from mgfm.model.classifier import (VideoClassifier, build_classifier, layer_decay_groups, save_classifier_hf,
                                   unwrap_classifier)
from mgfm.report import format_table, markdown_table, plus_minus, write_report
from mgfm.runtime import barrier, gather_objects, is_main_process, rank_world, setup_logging
from mgfm.train.engine import Engine, MicroResult, Schedule, find_checkpoint, make_accelerator, to_model, train

log = logging.getLogger("mgfm.finetune")
DEFAULT_RECIPE = Path(__file__).resolve().parents[2] / "recipes" / "finetune" / "tiny_cpu.yaml"
DEFAULT_CHECKPOINT_EPOCHS = 10  # checkpoint_every=0: a checkpoint every this many epochs


# -------------------------------------------------------------------------------------------- losses


def supervised_loss(logits: torch.Tensor, labels: torch.Tensor, smoothing: float,
                    log_prior: torch.Tensor | None = None, mix: tuple[torch.Tensor, float] | None = None) -> torch.Tensor:
    """Label-smoothed cross-entropy of ``logits`` ``(B, C)``; ``log_prior`` ``(C,)`` (scaled by tau) is
    added to the logits first (logit adjustment); ``mix = (labels_b, lam)`` for mixup targets."""
    if log_prior is not None:
        logits = logits + log_prior.to(logits.dtype)
    loss = F.cross_entropy(logits.float(), labels, label_smoothing=smoothing)
    if mix is not None:
        other, lam = mix
        loss = lam * loss + (1 - lam) * F.cross_entropy(logits.float(), other, label_smoothing=smoothing)
    return loss


def compute_loss(model, batch: StepBatch, recipe: FinetuneRecipe, log_prior: torch.Tensor | None,
                 semi_weight: float, gen: torch.Generator | None = None) -> tuple[torch.Tensor, dict]:
    """The step's loss (scalar) and stats: supervised loss on the labelled clips, plus for FixMatch
    ``semi_weight`` x the masked cross-entropy of the strong views against the weak views'
    confident pseudo-labels (computed without gradient, model in eval mode)."""
    device = next(model.parameters()).device
    video, labels = to_model(batch.video, model, device), batch.labels.to(device)
    mix = None
    if recipe.optim.mixup > 0:
        lam = float(np.random.default_rng(int(torch.randint(2**31, (1,), generator=gen))).beta(
            recipe.optim.mixup, recipe.optim.mixup))
        perm = torch.randperm(len(video), generator=gen).to(device)
        video = lam * video + (1 - lam) * video[perm]
        mix = (labels[perm], lam)
    stats: dict = {}
    if batch.strong is None:
        loss = supervised_loss(model(video), labels, recipe.optim.label_smoothing, log_prior, mix)
        stats["loss_l"] = float(loss.detach())
        return loss, stats
    was_training = model.training
    model.eval()
    with torch.no_grad():
        probs = torch.softmax(model(to_model(batch.weak, model, device)).float(), dim=-1)
    model.train(was_training)
    conf, pseudo = probs.max(dim=-1)
    mask = (conf >= recipe.semi.threshold).float()
    logits = model(torch.cat([video, to_model(batch.strong, model, device)]))
    n = len(video)
    loss_l = supervised_loss(logits[:n], labels, recipe.optim.label_smoothing, log_prior, mix)
    loss_u = (F.cross_entropy(logits[n:].float(), pseudo, reduction="none") * mask).mean()
    loss = loss_l + semi_weight * loss_u
    stats.update(loss_l=float(loss_l.detach()), loss_u=float(loss_u.detach()), mask_rate=float(mask.mean()))
    known = batch.unlabelled_labels is not None and bool((mask > 0).any())
    if known:
        truth = batch.unlabelled_labels.to(device)
        sel = (mask > 0) & (truth >= 0)
        if sel.any():
            stats["pseudo_acc"] = float((pseudo[sel] == truth[sel]).float().mean())
    return loss, stats


# ------------------------------------------------------------------------------------------ evaluate


@torch.no_grad()
def _map_split(fn, model, cache: DecodedSplit, batch_size: int, mean, std, img_size: int,
               device: torch.device | str, desc: str, progress: bool) -> list[torch.Tensor]:
    """``fn(flat normalised centre views)`` per batch, in eval mode: a list of ``(b, V, ...)`` CPU tensors."""
    was_training = model.training
    model.eval()
    out = []
    for start in tqdm(range(0, len(cache), batch_size), desc=desc, unit="batch", disable=not progress, leave=False):
        clips = cache.video[start:start + batch_size]  # (b, V, T, 3, S, S)
        b, v = clips.shape[:2]
        flat = normalise(crop_clips(clips.flatten(0, 1), img_size, None, False, None), mean, std)
        y = fn(to_model(flat, model, device)).float()
        out.append(y.reshape(b, v, *y.shape[1:]).cpu())
    model.train(was_training)
    return out


def predict_split(model, cache: DecodedSplit, batch_size: int, mean, std, img_size: int,
                  device: torch.device | str = "cpu", progress: bool = False) -> np.ndarray:
    """Softmax scores ``(N, C)`` of every cached clip, averaged over its ``V`` temporal windows."""
    parts = _map_split(lambda x: torch.softmax(model(x).float(), dim=-1), model, cache, batch_size, mean, std,
                       img_size, device, "test", progress)
    n_classes = unwrap_classifier(model).num_classes
    return torch.cat(parts).mean(1).numpy() if parts else np.zeros((0, n_classes), dtype=np.float32)


def fit_probe_head(model, data: FinetuneData, recipe: FinetuneRecipe, img_size: int,
                   device: torch.device | str = "cpu") -> dict:
    """LP-FT (Kumar et al., ICLR 2022): set ``model.head`` to a linear probe
    (:func:`mgfm.evaluate.probe.train_probe`, ``C = head_init_c``) fitted on the frozen model's features of
    the labelled clips (every cached window a sample, and its mirror image with ``recipe.flip``; gathered over
    ranks).

    A head trained from zero on a few hundred long-tailed clips first pulls the encoder towards the
    frequent classes; starting from the probe's head keeps the pretrained features while the whole
    network adapts. The probe's standardisation is folded into the head's weights and bias. Returns the
    probe's train accuracy."""

    caches = [data.labelled]
    if recipe.flip:  # the head then sees the mirror images fine-tuning will train on
        caches.append(DecodedSplit(data.labelled.video.flip(-1), data.labelled.labels, data.labelled.clip_ids))
    parts = [p for cache in caches for p in _map_split(model.features, model, cache, recipe.stream.batch_size * 2,
                                                       data.mean, data.std, img_size, device, "probe head", False)]
    local = torch.cat(parts).flatten(0, 1).numpy() if parts else np.zeros((0, model.cfg.dim), np.float32)
    labels = np.tile(np.repeat(data.labelled.labels.numpy(), data.labelled.views), len(caches))
    gathered = gather_objects((local, labels))  # every rank fits the same (deterministic) regression
    x = np.concatenate([g[0] for g in gathered])
    y = np.concatenate([g[1] for g in gathered])
    probe = train_probe(FeatureSet.from_labels(x, y), model.num_classes,
                        ProbeConfig(C=recipe.head_init_c, max_iter=2000))
    weight, bias = probe.affine()
    with torch.no_grad():
        model.head.weight.copy_(torch.as_tensor(weight, dtype=model.head.weight.dtype))
        model.head.bias.copy_(torch.as_tensor(bias, dtype=model.head.bias.dtype))
    accuracy = float((probe.logits(x).argmax(1) == y).mean())
    log.info("head initialised from a linear probe on %d labelled windows (C=%g, train accuracy %.3f)",
             len(y), recipe.head_init_c, accuracy)
    return {"probe_train_accuracy": accuracy, "probe_samples": int(len(y))}


def evaluate_test(model, data: FinetuneData, recipe: FinetuneRecipe, img_size: int, device) -> dict:
    """Multi-view test scores over all ranks -> :func:`mgfm.evaluate.metrics.classification_metrics`."""
    mean, std = data.mean, data.std
    scores = predict_split(model, data.test, recipe.stream.batch_size * 2, mean, std, img_size, device,
                           progress=is_main_process())
    parts = gather_objects((data.test.clip_ids, data.test.labels.numpy(), scores))
    ids = [c for p in parts for c in p[0]]
    labels = np.concatenate([p[1] for p in parts])
    scores = np.concatenate([p[2] for p in parts])
    order = np.argsort(ids, kind="stable")
    keep = labels[order] >= 0
    exclude = [data.class_names.index(c) for c in recipe.exclude_classes if c in data.class_names]
    return classification_metrics(scores[order][keep], labels[order][keep], data.class_names, exclude)



# ------------------------------------------------------------------------------------------ training


def variant_name(recipe: FinetuneRecipe) -> str:
    return f"{recipe.init}-{'semi' if recipe.semi.method != 'none' else 'sup'}"


def train_variant(recipe: FinetuneRecipe, data: FinetuneData, encoder_folder: Path, cfg, out: Path) -> dict:
    """Fine-tune one variant into ``out``; returns its report (an existing finished report is reused)."""
    rank, world = rank_world()
    resolved = recipe_to_dict(recipe)
    done = out / "report.json"
    if done.exists() and recipe.resume == "auto":
        report = json.loads(done.read_text())
        if report.get("recipe") == json.loads(json.dumps(resolved)):
            log.info("%s is already complete; reusing its report", out)
            return report
        raise InputError(f"{out}: holds a finished run of a different recipe; set out=... or name=... elsewhere")
    if is_main_process():
        out.mkdir(parents=True, exist_ok=True)
        save_recipe(recipe, out / "recipe.yaml")
    barrier()

    engine = Engine(recipe)  # one per variant: save_state saves every model prepared on an accelerator
    torch.manual_seed(recipe.seed)  # the same random init on every rank and for both methods
    init_from = encoder_folder if recipe.init == "pretrained" else None
    model = build_classifier(cfg, len(data.class_names), init_from, recipe.optim.head_dropout)
    ckpt_root = out / "checkpoints"
    resume_from = find_checkpoint(ckpt_root, recipe.resume)
    head_probe = None
    if recipe.head_init == "probe" and resume_from is None:  # features on the accelerator: a ViT-B on a CPU would crawl
        head_probe = fit_probe_head(model.to(engine.device), data, recipe, cfg.img_size, engine.device)
    semi = recipe.semi.method != "none"
    n_labelled = len(data.labelled_ids)
    per_step = recipe.stream.batch_size * recipe.optim.grad_accum * world
    schedule = Schedule.for_run(recipe.optim, max(1, math.ceil(n_labelled / per_step)), per_step)
    engine.prepare(model, layer_decay_groups(model, recipe.optim.weight_decay, recipe.optim.layer_decay), schedule)
    step = engine.resume(resume_from)
    log_prior = None
    if recipe.balance == "logit_adjust":
        prior = torch.as_tensor(data.class_counts, dtype=torch.float32) / float(data.class_counts.sum())
        log_prior = (recipe.logit_adjust_tau * prior.clamp_min(1e-12).log()).to(engine.device)
    spe = schedule.steps_per_epoch
    log.info("fine-tuning %s: %d labelled clips%s, %d ranks x %d clips x %d accumulation, peak lr %.2e, "
             "%d steps (%d epochs x %d), precision %s%s", out.name, n_labelled,
             f" + {data.n_train} unlabelled (FixMatch, ratio {recipe.semi.ratio})" if semi else "", world,
             recipe.stream.batch_size, recipe.optim.grad_accum, schedule.peak_lr, schedule.total_steps,
             recipe.optim.epochs, spe, engine.precision, " under DeepSpeed" if engine.deepspeed else "")

    ramp_steps = recipe.semi.ramp_epochs * spe

    def loss_fn(item: tuple[int, StepBatch], at_step: int) -> MicroResult:
        micro, batch = item
        semi_weight = recipe.semi.weight * (min(1.0, at_step / ramp_steps) if ramp_steps > 0 else 1.0)
        loss, stats = compute_loss(engine.model, batch, recipe, log_prior, semi_weight,
                                   step_generator(recipe.seed + 1, rank, at_step, micro))
        return MicroResult(loss, stats, clips=len(batch.labels))

    def after_step(at_step: int, row: dict) -> None:
        if recipe.eval_every and at_step % (recipe.eval_every * spe) == 0 and at_step < schedule.total_steps:
            metrics = evaluate_test(engine.model, data, recipe, cfg.img_size, engine.device)
            row.update(test_top1=metrics["top1"], test_mean_class_accuracy=metrics["mean_class_accuracy"])
            engine.model.train()

    start = time.time()
    batches = (item for at_step in itertools.count(step) for item in
               ((micro, make_batch(data, recipe, cfg.img_size, at_step, micro, semi))
                for micro in range(recipe.optim.grad_accum)))
    history = train(engine, batches, loss_fn, step, ckpt_root, out, recipe.checkpoint_every or
                    spe * DEFAULT_CHECKPOINT_EPOCHS, out.name, after_step)
    elapsed = time.time() - start
    metrics = evaluate_test(engine.model, data, recipe, cfg.img_size, engine.device)
    state = engine.full_state_dict()  # fp32 master weights; collective
    report = {
        "recipe": resolved, "variant": variant_name(recipe), "init": recipe.init, "method": recipe.semi.method,
        "label_fraction": data.fraction, "labelled_clips": n_labelled, "train_clips": data.n_train,
        "test_clips": metrics["n"], "views": recipe.views, "steps": schedule.total_steps, "world_size": world,
        "precision": engine.precision, "deepspeed": engine.deepspeed,
        "resumed_from_step": step if resume_from is not None else None, "train_seconds": elapsed,
        "balance": recipe.balance, "head_init": recipe.head_init, "head_probe": head_probe,
        "metrics": metrics, "model": str(out / "model"),
        "skipped_samples": {"train": data.train.skipped, "test": data.test.skipped},
        "final": dict(history[-1]) if history else {},
    }
    if is_main_process():
        classifier = VideoClassifier(cfg, len(data.class_names))  # a fresh fp32 copy for the export
        classifier.load_state_dict(state)
        save_classifier_hf(classifier, out / "model", data.class_names)
        plot_confusion(metrics["confusion"], data.class_names, out / "confusion.png")
        headers, rows = run_table([report])
        markdown = (f"`{variant_name(recipe)}` at label_fraction {data.fraction:g} ({n_labelled} labelled clips"
                    f"{f', {data.n_train} unlabelled' if semi else ''}), {schedule.total_steps} steps in "
                    f"{elapsed:.0f} s, {recipe.views} test view(s), shards `{recipe.shards}`.\n\n"
                    + markdown_table(headers, rows) + "\n\n![confusion matrix](confusion.png)\n\n## Per-class accuracy\n\n"
                    + markdown_table(["class", "test clips", "accuracy"],
                                     [[n, v["support"], v["accuracy"]] for n, v in metrics["per_class"].items()]))
        write_report(out, report, markdown, f"Fine-tuning: {variant_name(recipe)}")
        print(format_table(headers, rows))
    barrier()
    return json.loads(json.dumps(report, default=str))


def run_table(reports: list[dict]) -> tuple[list[str], list[list]]:
    headers = ["label fraction", "labelled clips", "init", "method", "top1 ± ci95", "top5", "mean class acc",
               "top1 w/o excl.", "mean class acc w/o excl.", "train s"]
    rows = []
    for r in reports:
        m = r["metrics"]
        w = m.get("without") or {}
        rows.append([f"{r['label_fraction']:g}", r["labelled_clips"], r["init"],
                     "semi (FixMatch)" if r["method"] == "fixmatch" else "supervised",
                     plus_minus(m["top1"], m.get("top1_ci95")), m["top5"],
                     m["mean_class_accuracy"], w.get("top1"), w.get("mean_class_accuracy"), round(r["train_seconds"])])
    return headers, rows


# ---------------------------------------------------------------------------------------------- entry


def variants(recipe: FinetuneRecipe) -> list[FinetuneRecipe]:
    """The runs a recipe asks for: itself, or the compare grid (fraction-major)."""
    if not recipe.compare:
        return [recipe]
    semi = recipe.semi if recipe.semi.method != "none" else dataclasses.replace(recipe.semi, method="fixmatch")
    out = []
    for fraction in recipe.compare_fractions or [recipe.label_fraction]:
        for init in ("random", "pretrained"):
            for method in ("none", "fixmatch"):
                out.append(dataclasses.replace(recipe, compare=False, compare_fractions=[], label_fraction=fraction,
                                               init=init, semi=dataclasses.replace(semi, method=method)))
    return out


def finetune_folder(recipe: FinetuneRecipe, run_dir: Path) -> Path:
    """``out``, else ``<run>/finetune/<shard set name>/<recipe name>``: fine-tunes of one run on two shard sets
    never share (and resume from) one folder."""
    return output_folder(recipe, run_dir, "finetune", recipe.name)


def run(recipe: FinetuneRecipe) -> dict:
    """Fine-tune as the recipe says (one run, or the compare grid); returns the (summary) report. Rank 0
    holds the output folder's :class:`FolderLock` meanwhile."""
    make_accelerator(recipe)  # initialises the process group (under accelerate launch) before any data
    setup_logging()
    encoder_folder, run_dir, cfg = model_geometry(recipe)
    out = finetune_folder(recipe, run_dir)
    with FolderLock(out) if is_main_process() else contextlib.nullcontext():
        return _run(recipe, encoder_folder, cfg, out)


def _run(recipe: FinetuneRecipe, encoder_folder: Path, cfg, out: Path) -> dict:

    data: FinetuneData | None = None
    reports = []
    for variant in variants(recipe):
        if data is None or data.fraction != variant.label_fraction:
            data = load_data(variant, cfg, variant.label_fraction, data)
        where = out / f"labels-{variant.label_fraction:g}" / variant_name(variant) if recipe.compare else out
        reports.append(train_variant(variant, data, encoder_folder, cfg, where))
    if not recipe.compare:
        return reports[0]
    headers, rows = run_table(reports)
    summary = {"recipe": recipe_to_dict(recipe), "encoder": str(encoder_folder), "runs": [
        {k: r[k] for k in ("variant", "label_fraction", "labelled_clips", "train_seconds", "steps")}
        | {k: r["metrics"][k] for k in ("top1", "top1_ci95", "top5", "mean_class_accuracy")} for r in reports]}
    if is_main_process():
        markdown = (f"Encoder `{encoder_folder}`, shards `{recipe.shards}`; {{random, pretrained}} init x "
                    f"{{supervised only, semi-supervised (FixMatch)}} on the same seeded labelled subsets "
                    f"(seed {recipe.seed}); {recipe.views} test view(s).\n\n" + markdown_table(headers, rows)
                    + "\n\nPer-run reports: `labels-<fraction>/<init>-<sup|semi>/report.md`.\n")
        write_report(out, summary, markdown, "Fine-tuning comparison")
        print(format_table(headers, rows))
        print(f"report: {out / 'report.md'}")
    barrier()
    return summary


def main(argv: list[str] | None = None) -> dict:
    """CLI entry: ``[--recipe FILE] [key=value ...]``; user errors end in one line and exit code 2."""
    return run_cli(FinetuneRecipe, run, argv, "eval/finetune.py",
                   "Supervised / semi-supervised fine-tuning for MG recognition.", DEFAULT_RECIPE)


if __name__ == "__main__":
    main()
