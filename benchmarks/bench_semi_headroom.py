"""How much can the unlabelled train clips add at a small label fraction? Semi-supervised headroom of a
run's frozen features, against the supervised probe measured in the same process.

Fine-tuning on the tiny CPU default keeps the linear-probe head's decisions (LP-FT, docs/experiments.md
"Fine-tuning"), so what a semi-supervised method can add there is what the unlabelled clips add to that
head. For ``--seeds`` seeded stratified subsets (:func:`mgfm.data.subset.stratified_subset`, drawn as
fine-tuning draws them) this fits the fine-tuning head's probe (:func:`mgfm.evaluate.probe.train_probe`,
``C = --c``) on

* the labelled clips only (the reference: supervised only),
* every train label (the ceiling: what perfect pseudo-labels would give),
* the labelled clips plus self-training pseudo-labels: the reference probe's predictions on the unlabelled
  clips whose confidence reaches ``t``, or, class-balanced (CBST, Zou et al. 2018), its ``r`` x (labelled
  prior) x N most confident clips per predicted class,
* label spreading over a k-nearest-neighbour graph of every train clip (Zhou et al. 2004), refitted on its
  labels (the cluster assumption: neighbours share a class).

It prints mean test top-1 (every test clip, as the fine-tuning headline), the mean / min / max paired
difference to the reference and the pseudo-labels' accuracy on the unlabelled clips. Features come from the
run's feature cache (``eval/linear_probe.py`` fills it; computed here if missing). Example::

    .venv/bin/python benchmarks/bench_semi_headroom.py --run runs/tiny-synthetic --fraction 0.1 --seeds 8
"""

from __future__ import annotations

import argparse
import logging
import warnings
from typing import Callable

import numpy as np

from mgfm.data.subset import stratified_subset
from mgfm.evaluate.featureset import FeatureSet
from mgfm.evaluate.probe import ProbeConfig, train_probe
from mgfm.report import format_table

log = logging.getLogger("bench_semi_headroom")


def load_features(run: str, shards: str, views: int) -> tuple[FeatureSet, FeatureSet, list[str]]:
    """(train, test, class names): the run's cached frozen features, as ``eval/linear_probe.py`` makes them."""
    from mgfm.evaluate.extract import split_features
    from mgfm.evaluate.encoder_eval import resolve_encoder, stream_for
    from mgfm.evaluate.probe_eval import ProbeRecipe
    from mgfm.model.hf import config_from_hf, read_hf_config
    from mgfm.shards.manifest import load_manifest

    recipe = ProbeRecipe(run=run, shards=shards, views=views)
    run_dir, encoder = resolve_encoder(recipe)
    stream = stream_for(config_from_hf(read_hf_config(encoder), encoder), recipe)
    train, test = (split_features(encoder, shards, split, stream, run_dir / "features", views).labelled()
                   for split in (recipe.train_split, recipe.test_split))
    return train, test, list(load_manifest(shards)["class_names"])


class Headroom:
    """Fits on one labelled subset; ``accuracy(x, y)`` is the test top-1 of a probe fitted on ``(x, y)``."""

    def __init__(self, train: FeatureSet, test: FeatureSet, n_classes: int, c: float) -> None:
        self.x, self.y = train.features, train.labels
        self.test_x, self.test_y = test.features, test.labels
        self.n_classes, self.cfg = n_classes, ProbeConfig(C=c, max_iter=2000)

    def fit(self, x: np.ndarray, y: np.ndarray) -> Callable[[np.ndarray], np.ndarray]:
        """Class probabilities ``(N, n_classes)`` of a probe fitted on ``x`` ``(n, D)``, ``y`` ``(n,)``."""
        from scipy.special import softmax

        probe = train_probe(FeatureSet.from_labels(x, y), self.n_classes, self.cfg)
        return lambda z: softmax(probe.logits(z), axis=1)

    def accuracy(self, x: np.ndarray, y: np.ndarray) -> float:
        return float((self.fit(x, y)(self.test_x).argmax(1) == self.test_y).mean())


def pseudo_rows(h: Headroom, labelled: np.ndarray, thresholds: list[float], ratios: list[float],
                neighbours: list[int]) -> dict[str, tuple[float, float | None]]:
    """``{method: (test top-1, pseudo-label accuracy on the unlabelled clips)}`` for one labelled mask."""
    xl, yl, xu, yu = h.x[labelled], h.y[labelled], h.x[~labelled], h.y[~labelled]
    reference = h.fit(xl, yl)
    probs = reference(xu)
    pseudo, confidence = probs.argmax(1), probs.max(1)
    out: dict[str, tuple[float, float | None]] = {
        "supervised only (reference)": (float((reference(h.test_x).argmax(1) == h.test_y).mean()), None),
        "every train label (ceiling)": (h.accuracy(h.x, h.y), None),
    }

    def refit(name: str, chosen: np.ndarray, labels: np.ndarray) -> None:
        acc = float((labels[chosen] == yu[chosen]).mean()) if chosen.any() else None
        out[name] = (h.accuracy(np.concatenate([xl, xu[chosen]]), np.concatenate([yl, labels[chosen]])), acc)

    for t in thresholds:
        refit(f"self-training, confidence >= {t:g}", confidence >= t, pseudo)
    prior = np.bincount(yl, minlength=h.n_classes) / len(yl)
    for r in ratios:
        chosen = np.zeros(len(xu), dtype=bool)
        for c in np.unique(pseudo):
            members = np.flatnonzero(pseudo == c)
            k = max(1, round(r * prior[c] * len(xu)))
            chosen[members[np.argsort(-confidence[members])[:k]]] = True
        refit(f"class-balanced self-training, r = {r:g}", chosen, pseudo)
    if neighbours:
        from sklearn.semi_supervised import LabelSpreading

        scaled = (h.x - h.x.mean(0)) / np.maximum(h.x.std(0), 1e-6)  # unlabelled clips may set the scale
        for k in neighbours:
            spread = LabelSpreading(kernel="knn", n_neighbors=k, alpha=0.99, max_iter=1000)
            spread.fit(scaled, np.where(labelled, h.y, -1))
            refit(f"label spreading, {k}-NN graph", np.ones(len(xu), dtype=bool), spread.transduction_[~labelled])
    return out


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--run", default="runs/tiny-synthetic", help="pretraining run or encoder folder")
    ap.add_argument("--shards", default="shards/synthetic")
    ap.add_argument("--views", type=int, default=1, help="temporal views averaged per clip (the feature cache key)")
    ap.add_argument("--fraction", type=float, default=0.1, help="label fraction of the train split")
    ap.add_argument("--seeds", type=int, default=8, help="labelled subsets (seeds 0..N-1)")
    ap.add_argument("--c", type=float, default=0.1, help="probe C (the fine-tuning recipe's head_init_c)")
    ap.add_argument("--thresholds", type=float, nargs="*", default=[0.5, 0.7, 0.9])
    ap.add_argument("--ratios", type=float, nargs="*", default=[0.1, 0.2, 0.5])
    ap.add_argument("--neighbours", type=int, nargs="*", default=[10, 20])
    args = ap.parse_args(argv)
    # at 1-2% labels a subset has more classes than half its clips, which sklearn warns about for every fit
    warnings.filterwarnings("ignore", message="The number of unique classes is greater than 50%")
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s", datefmt="%H:%M:%S")

    from mgfm.cli import user_errors

    try:
        train, test, class_names = load_features(args.run, args.shards, args.views)
    except user_errors() as err:  # no run yet, no shards: one line, as the entry scripts say it
        raise SystemExit(f"{ap.prog}: error: {err}") from None
    h = Headroom(train, test, len(class_names), args.c)
    ids = train.clip_ids
    results: dict[str, list[tuple[float, float | None]]] = {}
    for seed in range(args.seeds):
        chosen = set(stratified_subset(ids, h.y.tolist(), args.fraction, seed, class_names))
        labelled = np.array([c in chosen for c in ids])
        rows = pseudo_rows(h, labelled, args.thresholds, args.ratios, args.neighbours)
        for name, value in rows.items():
            results.setdefault(name, []).append(value)
        log.info("seed %d: %d labelled, reference %.4f", seed, labelled.sum(), rows["supervised only (reference)"][0])
    reference = np.array([v[0] for v in results["supervised only (reference)"]])
    table = []
    for name, values in results.items():
        top1 = np.array([v[0] for v in values])
        diff = top1 - reference
        pseudo = [v[1] for v in values if v[1] is not None]
        table.append([name, round(float(top1.mean()), 4), round(float(diff.mean()) * 100, 2),
                      round(float(diff.min()) * 100, 2), round(float(diff.max()) * 100, 2),
                      round(float(np.mean(pseudo)), 3) if pseudo else None])
    print(f"\n{args.run}: label fraction {args.fraction:g}, {args.seeds} seeded subsets, probe C {args.c:g}, "
          f"{len(h.y)} train / {len(h.test_y)} test clips")
    print(format_table(["method", "test top-1", "mean diff (pts)", "min diff", "max diff", "pseudo-label acc"], table))


if __name__ == "__main__":
    main()
