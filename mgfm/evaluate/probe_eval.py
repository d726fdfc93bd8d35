"""Frozen-encoder recognition: a linear or attentive probe + k-means on a shard set, with reference rows in
the same run.

For the run's encoder, a randomly initialised encoder of the same size, and raw pixels, extract (cached)
train and test features (``probe=linear``: mean-pooled clip features; ``probe=attentive``: tokens pooled to
``attentive.grid``, see :mod:`mgfm.evaluate.attentive`), fit the probe on train, score the test split (top-1/5, mean class
accuracy, per class, and without the excluded classes, e.g. iMiGUE's "illustrative"), and cluster the test
features with k-means (Hungarian accuracy, NMI, ARI). Writes ``report.json``, ``report.md`` and a
confusion-matrix PNG, and prints a short table.
"""

from __future__ import annotations

import dataclasses
import logging
from dataclasses import dataclass, field

import numpy as np

from mgfm.config import bounded
from mgfm.runtime import is_main_process
from mgfm.data.subset import missing_train_classes
from mgfm.evaluate.cluster import kmeans_scores
from mgfm.errors import InputError
from mgfm.evaluate.attentive import AttentiveProbeConfig, train_attentive_probe
from mgfm.evaluate.encoder_eval import EncoderEvalRecipe, finish, prepare
from mgfm.evaluate.featureset import FeatureError, FeatureSet
from mgfm.evaluate.metrics import classification_metrics, plot_confusion
from mgfm.evaluate.probe import ProbeConfig, train_probe
from mgfm.report import format_table, markdown_table, plus_minus
from mgfm.shards.manifest import load_manifest

log = logging.getLogger(__name__)


@dataclass
class ProbeRecipe(EncoderEvalRecipe):
    """What ``make linear-probe`` / ``eval/linear_probe.py`` evaluate, and how (``out`` default:
    ``<run>/eval/<shards name>``, ``<run>/eval-attentive/<shards name>`` for the attentive probe)."""

    train_split: str = "train"
    test_split: str = "test"
    exclude_classes: list[str] = field(default_factory=lambda: ["illustrative"])
    kmeans: bool = True
    probe: str = "linear"  # linear (clip features) | attentive (tokens, a cross-attention head)
    linear: ProbeConfig = field(default_factory=ProbeConfig)
    attentive: AttentiveProbeConfig = field(default_factory=AttentiveProbeConfig)
    # Read the encoders' tokens after this block (1 = the first; None = the last, after the final norm):
    # with a shallow decoder the last blocks do pixel work, and an earlier block can probe better.
    block: int | None = bounded(None, ge=1)

    def __post_init__(self) -> None:
        if self.probe not in PROBES:
            raise InputError(f"probe: expected one of {', '.join(PROBES)}, got {self.probe!r}")

    @property
    def probe_config(self) -> ProbeConfig | AttentiveProbeConfig:
        """The settings of the chosen probe (its section: ``linear.*`` or ``attentive.*``)."""
        return self.attentive if self.probe == "attentive" else self.linear

    @property
    def tokens(self) -> tuple[int, int, int] | None:
        """The token grid the probe reads (None: mean-pooled clip features)."""
        return tuple(self.attentive.grid) if self.probe == "attentive" else None


PROBES = {"linear": "Linear probe", "attentive": "Attentive probe"}


def probe_scores(train: FeatureSet, test: FeatureSet, class_names: list[str], exclude: list[int],
                 cfg: ProbeConfig | AttentiveProbeConfig, allow_missing: bool = False) -> tuple[dict, np.ndarray]:
    """Fit the probe ``cfg`` configures (linear on clip features, attentive on tokens) on ``train``, score
    ``test``. Test classes without a train clip (a damaged train split) are a one-line error naming them,
    unless ``allow_missing``: they then score as never predicted."""
    if isinstance(cfg, AttentiveProbeConfig):
        probe = train_attentive_probe(train, len(class_names), cfg)
        fitted = {"weight_decay": probe.weight_decay}
    else:
        probe = train_probe(train, len(class_names), cfg)
        fitted = {"C": probe.C}
    test = test.labelled().require("probe test split", train.dim)
    missing = missing_train_classes(train.labelled().labels.tolist(), test.labels.tolist(), class_names)
    if missing:
        lost = f"; {train.read['describe']}" if train.read.get("missing") else ""
        message = f"{missing}{lost}; the probe cannot learn them"
        if not allow_missing:
            raise FeatureError(message + " (restore the train shards, or set allow_missing=true)")
        log.warning("%s (allow_missing=true: scored as never predicted)", message)
    logits = probe.logits(test.features if test.token_dim is None else test.tokens())
    if not np.isfinite(logits).all():  # classes the train split lacks: never predicted, ranked last
        logits = np.where(np.isfinite(logits), logits, logits[np.isfinite(logits)].min() - 1e3)
    metrics = classification_metrics(logits, test.labels, class_names, exclude)
    metrics.update(fitted)
    metrics["cv_scores"] = {str(c): v for c, v in probe.cv_scores.items()}
    return metrics, logits


def run(recipe: ProbeRecipe) -> dict:
    """Run the whole evaluation; returns the report dict (also written to disk)."""
    setup = prepare(recipe, "eval" if recipe.probe == "linear" else f"eval-{recipe.probe}")
    if recipe.block is not None and recipe.block > setup.cfg.depth:
        raise InputError(f"block={recipe.block}: the encoder {setup.encoder_folder} has blocks 1 to {setup.cfg.depth}")
    class_names = list(load_manifest(recipe.shards)["class_names"])
    exclude = [class_names.index(c) for c in recipe.exclude_classes if c in class_names]
    results: dict[str, dict] = {}
    for name, encoder, encoder_id in setup.encoders:
        log.info("features for %s", name)
        feats = {split: setup.features(encoder, encoder_id, split, scored=split == recipe.test_split,
                                       tokens=recipe.tokens, block=recipe.block)
                 for split in (recipe.train_split, recipe.test_split)}
        metrics, _ = probe_scores(feats[recipe.train_split], feats[recipe.test_split], class_names, exclude,
                                  recipe.probe_config, recipe.allow_missing)
        test = feats[recipe.test_split].labelled()
        entry = {"probe": metrics, "feature_dim": test.dim if test.token_dim is None else test.token_dim}
        if recipe.kmeans:  # on clip features (for tokens: their mean)
            clips = test.features if test.token_dim is None else test.tokens().mean(axis=1)
            entry["kmeans"] = kmeans_scores(clips, test.labels, seed=recipe.seed)
        results[name] = entry
        if name == "pretrained" and is_main_process():
            plot_confusion(metrics["confusion"], class_names, setup.out / "confusion_pretrained.png")

    report = {
        "run": str(setup.run_dir), "encoder": str(setup.encoder_folder), "shards": recipe.shards,
        "splits": {"train": recipe.train_split, "test": recipe.test_split}, "views": recipe.views,
        "probe": recipe.probe, "probe_config": dataclasses.asdict(recipe.probe_config), "block": recipe.block,
        "results": results,
    }
    headers, rows = summary_rows(results, bool(exclude))
    markdown = (f"Run `{setup.run_dir}`, shards `{recipe.shards}` (train on `{recipe.train_split}`, test on "
                f"`{recipe.test_split}`, {results['pretrained']['probe']['n']} clips; top-1 ± the half-width of its 95% "
                f"bootstrap interval over them), {recipe.views} temporal view(s) per clip"
                f"{'' if recipe.block is None else f', tokens read after encoder block {recipe.block}'}.\n\n## {PROBES[recipe.probe]} and k-means\n\n"
                + markdown_table(headers, rows)
                + "\n\n![confusion matrix](confusion_pretrained.png)\n\n## Per-class accuracy (pretrained)\n\n"
                + per_class_table(results["pretrained"]["probe"]))
    return finish(setup.out, report, markdown, "Frozen-encoder recognition", feats, [format_table(headers, rows)])


def summary_rows(results: dict[str, dict], has_without: bool) -> tuple[list[str], list[list]]:
    headers = ["encoder", "top1 ± ci95", "top5", "mean class acc"]
    if has_without:
        headers += ["top1 w/o excl.", "mean class acc w/o excl."]
    headers += ["k-means acc", "NMI", "ARI"]
    rows = []
    for name, entry in results.items():
        probe = entry["probe"]
        row = [name, plus_minus(probe["top1"], probe.get("top1_ci95")), probe["top5"], probe["mean_class_accuracy"]]
        if has_without:
            row += [probe["without"]["top1"], probe["without"]["mean_class_accuracy"]]
        km = entry.get("kmeans") or {}
        row += [km.get("clustering_accuracy"), km.get("nmi"), km.get("ari")]
        rows.append(row)
    return headers, rows


def per_class_table(probe: dict) -> str:
    rows = [[name, v["support"], v["accuracy"]] for name, v in probe["per_class"].items()]
    return markdown_table(["class", "test clips", "accuracy"], rows)
