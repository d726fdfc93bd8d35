"""Frozen-encoder recognition: linear probe + k-means on a shard set, with reference rows in the same run.

For the run's encoder, a randomly initialised encoder of the same size, and raw pixels, extract (cached)
train and test features, fit the linear probe on train, score the test split (top-1/5, mean class
accuracy, per class, and without the excluded classes, e.g. iMiGUE's "illustrative"), and cluster the test
features with k-means (Hungarian accuracy, NMI, ARI). Writes ``report.json``, ``report.md`` and a
confusion-matrix PNG, and prints a short table.
"""

from __future__ import annotations

import dataclasses
import logging
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from mgfm.data.distributed import is_main_process
from mgfm.data.stream import StreamConfig
from mgfm.devices import join_process_group, local_device
from mgfm.errors import MgfmError
from mgfm.evaluate.cluster import kmeans_scores
from mgfm.evaluate.features import PixelEncoder, eval_stream_config, require_complete, split_features
from mgfm.evaluate.featureset import FeatureError, FeatureSet
from mgfm.evaluate.metrics import classification_metrics, plot_confusion
from mgfm.evaluate.probe import ProbeConfig, predict, train_probe
from mgfm.evaluate.report import format_table, markdown_table, write_report

log = logging.getLogger(__name__)


class RunError(MgfmError, ValueError):
    """A run folder that cannot be evaluated (missing, no encoder)."""


@dataclass
class EncoderEvalRecipe:
    """What every frozen-encoder evaluation needs: which encoder, which shards, how to read them."""

    run: str | None = None  # a run folder (runs/<name>) or an encoder folder; None = newest run in runs_dir
    runs_dir: str = "runs"
    shards: str = "shards/synthetic"
    out: str | None = None  # default: a folder under the run, named after the evaluation and the shards
    views: int = 1  # temporal views averaged per clip
    batch_size: int = 32
    num_workers: int = 2
    references: bool = True  # add random-init and raw-pixel rows
    device: str = "auto"  # encoder device: auto (this process's GPU when CUDA is there) | cpu | cuda | cuda:N
    features_dir: str | None = None  # feature cache folder; default <run>/features
    # Evaluate although the shards delivered fewer clips than their manifest lists (the report then says so
    # first); by default a missing clip of a scored split is an error.
    allow_missing: bool = False
    seed: int = 0


@dataclass
class EvalRecipe(EncoderEvalRecipe):
    """What ``make linear-probe`` / ``eval/linear_probe.py`` evaluate, and how."""

    train_split: str = "train"
    test_split: str = "test"
    exclude_classes: list[str] = field(default_factory=lambda: ["illustrative"])
    kmeans: bool = True
    probe: ProbeConfig = field(default_factory=ProbeConfig)


def newest_run(runs_dir: str | Path) -> Path:
    runs = [p for p in Path(runs_dir).glob("*/encoder/config.json")] if Path(runs_dir).is_dir() else []
    if not runs:
        raise RunError(f"{runs_dir}: no run with an encoder/ folder; pretrain first (accelerate launch pretrain.py)")
    return max(runs, key=lambda p: p.stat().st_mtime).parent.parent


def resolve_encoder(recipe: EncoderEvalRecipe) -> tuple[Path, Path]:
    """(run folder, encoder folder) for ``recipe.run``."""
    run = Path(recipe.run) if recipe.run else newest_run(recipe.runs_dir)
    if not run.exists():
        raise RunError(f"{run}: no such run or encoder folder")
    encoder = run / "encoder" if (run / "encoder").is_dir() else run
    return (run if encoder != run else run.parent), encoder


def features_folder(recipe: EncoderEvalRecipe, run_dir: Path) -> Path:
    """Where the feature cache lives: ``features_dir``, else ``<run>/features``."""
    return Path(recipe.features_dir) if recipe.features_dir else run_dir / "features"


def data_section(feats: dict[str, FeatureSet]) -> tuple[dict, str | None]:
    """``({split: expected/read/missing/lost}, warning line or None)`` for a report: what each split read."""
    data = {split: {k: v for k, v in fs.read.items() if k != "describe"} for split, fs in feats.items()}
    short = [fs.read["describe"] for fs in feats.values() if fs.read.get("missing")]
    return data, (f"**Incomplete data (allow_missing=true):** {'; '.join(short)}." if short else None)


def eval_device(recipe: EncoderEvalRecipe) -> torch.device:
    """Join the launcher's process group (under ``accelerate launch`` / ``torchrun`` each process encodes
    its share of the clips) and pick this process's device."""
    join_process_group()
    return local_device(recipe.device)


def stream_for(encoder_cfg, recipe: EncoderEvalRecipe) -> StreamConfig:
    """An eval stream cut for the encoder's clip geometry."""
    base = StreamConfig(frames=encoder_cfg.frames, img_size=encoder_cfg.img_size, tubelet=encoder_cfg.tubelet,
                        patch=encoder_cfg.patch, mean=tuple(encoder_cfg.pixel_mean[:3]),
                        std=tuple(encoder_cfg.pixel_std[:3]), seed=recipe.seed)
    return eval_stream_config(base, recipe.batch_size, recipe.num_workers)


def encoders_to_compare(encoder_folder: Path, recipe: EncoderEvalRecipe):
    """[(row name, encoder module, encoder id)]: the run's encoder, then the references."""
    from mgfm.model.hf import encoder_checksum, load_encoder_hf
    from mgfm.model.videomae import build_encoder

    encoder, cfg = load_encoder_hf(encoder_folder)
    rows = [("pretrained", encoder, encoder_checksum(encoder_folder))]
    if recipe.references:
        torch.manual_seed(recipe.seed)
        rows.append(("random init", build_encoder(cfg), f"random-init:{cfg.size}:{cfg.dim}x{cfg.depth}:seed{recipe.seed}"))
        pixels = PixelEncoder()
        rows.append(("raw pixels", pixels, f"pixels:{pixels.frames}x{pixels.size}"))
    return rows, cfg


def probe_scores(train: FeatureSet, test: FeatureSet, class_names: list[str], exclude: list[int],
                 cfg: ProbeConfig, allow_missing: bool = False) -> tuple[dict, np.ndarray]:
    """Fit the probe on ``train``, score ``test``. Test classes without a train clip (a damaged train split)
    are a one-line error naming them, unless ``allow_missing``: they then score as never predicted."""
    probe = train_probe(train, len(class_names), cfg)
    test = test.labelled().require("probe test split", train.dim)
    absent = sorted(set(test.labels.tolist()) - set(train.labelled().labels.tolist()))
    if absent:
        names = ", ".join(f"{k} ({class_names[k]!r})" for k in absent[:6]) + (", ..." if len(absent) > 6 else "")
        lost = f"; {train.read['describe']}" if train.read.get("missing") else ""
        message = (f"classes {names} have test clips but no train clips{lost}; the probe cannot learn them")
        if not allow_missing:
            raise FeatureError(message + " (restore the train shards, or set allow_missing=true)")
        log.warning("%s (allow_missing=true: scored as never predicted)", message)
    logits = predict(probe, test)
    if not np.isfinite(logits).all():  # classes the train split lacks: never predicted, ranked last
        logits = np.where(np.isfinite(logits), logits, logits[np.isfinite(logits)].min() - 1e3)
    metrics = classification_metrics(logits, test.labels, class_names, exclude)
    metrics["C"] = probe.C
    metrics["cv_scores"] = {str(c): v for c, v in probe.cv_scores.items()}
    return metrics, logits


def evaluate(recipe: EvalRecipe) -> dict:
    """Run the whole evaluation; returns the report dict (also written to disk)."""
    from mgfm.shards.manifest import load_manifest

    device = eval_device(recipe)
    run_dir, encoder_folder = resolve_encoder(recipe)
    manifest = load_manifest(recipe.shards)
    class_names = list(manifest["class_names"])
    exclude = [class_names.index(c) for c in recipe.exclude_classes if c in class_names]
    out = Path(recipe.out) if recipe.out else run_dir / "eval" / Path(recipe.shards.rstrip("/")).name
    cache = features_folder(recipe, run_dir)
    encoders, cfg = encoders_to_compare(encoder_folder, recipe)
    stream = stream_for(cfg, recipe)

    results: dict[str, dict] = {}
    for name, encoder, encoder_id in encoders:
        log.info("features for %s", name)
        feats = {split: split_features(None, recipe.shards, split, stream, cache, recipe.views, encoder=encoder,
                                       encoder_id=encoder_id, device=device)
                 for split in (recipe.train_split, recipe.test_split)}
        require_complete(feats[recipe.test_split], f"{recipe.shards} (test)", recipe.allow_missing)
        metrics, _ = probe_scores(feats[recipe.train_split], feats[recipe.test_split], class_names, exclude,
                                  recipe.probe, recipe.allow_missing)
        entry = {"probe": metrics, "feature_dim": feats[recipe.test_split].dim}
        if recipe.kmeans:
            test = feats[recipe.test_split].labelled()
            entry["kmeans"] = kmeans_scores(test.features, test.labels, seed=recipe.seed)
        results[name] = entry
        if name == "pretrained" and is_main_process():
            plot_confusion(metrics["confusion"], class_names, out / "confusion_pretrained.png")

    data, warning = data_section(feats)
    report = {
        "incomplete": warning, "run": str(run_dir), "encoder": str(encoder_folder), "shards": recipe.shards,
        "splits": {"train": recipe.train_split, "test": recipe.test_split}, "views": recipe.views,
        "data": data, "probe_config": dataclasses.asdict(recipe.probe), "results": results,
    }
    headers, rows = summary_rows(results, bool(exclude))
    markdown = (f"{warning + chr(10) * 2 if warning else ''}Run `{run_dir}`, shards `{recipe.shards}` (train on `{recipe.train_split}`, test on "
                f"`{recipe.test_split}`), {recipe.views} temporal view(s) per clip.\n\n## Linear probe and k-means\n\n"
                + markdown_table(headers, rows)
                + "\n\n![confusion matrix](confusion_pretrained.png)\n\n## Per-class accuracy (pretrained)\n\n"
                + per_class_table(results["pretrained"]["probe"]))
    if is_main_process():
        write_report(out, report, markdown, "Frozen-encoder recognition")
        if warning:
            print(warning.replace("**", ""))
        print(format_table(headers, rows))
        print(data_table(feats))
        print(f"report: {out / 'report.md'}")
    return report


def data_table(feats: dict[str, FeatureSet]) -> str:
    """The clips each split read against its manifest, as a printed table."""
    rows = [[split, fs.read.get("expected"), fs.read.get("read", len(fs)), fs.read.get("missing", 0)]
            for split, fs in feats.items()]
    return format_table(["split", "clips listed", "read", "lost"], rows)


def summary_rows(results: dict[str, dict], has_without: bool) -> tuple[list[str], list[list]]:
    headers = ["encoder", "top1", "top5", "mean class acc"]
    if has_without:
        headers += ["top1 w/o excl.", "mean class acc w/o excl."]
    headers += ["k-means acc", "NMI", "ARI"]
    rows = []
    for name, entry in results.items():
        probe = entry["probe"]
        row = [name, probe["top1"], probe["top5"], probe["mean_class_accuracy"]]
        if has_without:
            row += [probe["without"]["top1"], probe["without"]["mean_class_accuracy"]]
        km = entry.get("kmeans") or {}
        row += [km.get("clustering_accuracy"), km.get("nmi"), km.get("ari")]
        rows.append(row)
    return headers, rows


def per_class_table(probe: dict) -> str:
    rows = [[name, v["support"], v["accuracy"]] for name, v in probe["per_class"].items()]
    return markdown_table(["class", "test clips", "accuracy"], rows)
