"""Classification scores of a probe or classifier: top-1/top-5, mean class accuracy, per-class accuracy,
confusion matrix, the same scores without excluded classes, and a confusion-matrix plot.

Tie rule: when several classes share the highest score, the lowest class index wins (``np.argmax``); for
top-k the classes are ranked by descending score, ties by ascending class index, so top-1 from the
top-k ranking always equals the argmax prediction. (sklearn's ``top_k_accuracy_score`` breaks ties the
other way round, which is why top-k is computed here; it agrees with sklearn whenever there are no ties.)

Error bars: ``top1_ci95`` is the 95% percentile-bootstrap interval of top-1 over the test samples
(:func:`bootstrap_ci`, resampled with replacement, a fixed seed so a report is reproducible); ``correct``
keeps each sample's 0/1 outcome in input order, so intervals over several runs (the mean of seeds) can be
formed from the same samples later (:func:`mean_ci`).

"Without" scores (iMiGUE reports accuracy without class 31 "illustrative"): the samples whose TRUE label
is excluded are dropped, and the remaining samples are predicted by argmax over the non-excluded classes
only (an excluded class can never be predicted). Top-k there is clipped to the number of kept classes.
"""

from __future__ import annotations

from pathlib import Path
from typing import Sequence

import numpy as np
from scipy.stats import bootstrap
from sklearn.metrics import confusion_matrix

from mgfm.evaluate.featureset import FeatureError
from mgfm.report import save_figure

TOP_K = 5
CI_RESAMPLES = 2000


def bootstrap_ci(values: np.ndarray | Sequence[float], confidence: float = 0.95, resamples: int = CI_RESAMPLES,
                 seed: int = 0) -> tuple[float, float]:
    """Percentile-bootstrap interval of the mean of ``values`` (N,) over resampled samples (N >= 2)."""
    values = np.asarray(values, dtype=np.float64)
    if len(values) < 2 or np.all(values == values[0]):
        return float(values.mean()), float(values.mean())  # nothing to resample (scipy warns on a constant)
    result = bootstrap((values,), np.mean, confidence_level=confidence, n_resamples=resamples, method="percentile",
                       vectorized=True, random_state=np.random.default_rng(seed))
    return float(result.confidence_interval.low), float(result.confidence_interval.high)


def mean_ci(correct: Sequence[Sequence[float]], confidence: float = 0.95) -> tuple[float, float]:
    """Interval of the mean over runs (seeds) of a score scored on the same samples: ``correct`` (R, N) holds
    each run's per-sample outcomes; the samples are resampled jointly for all runs (the runs' shared test
    set is what varies), i.e. the bootstrap of each sample's mean outcome over the runs."""
    table = np.asarray(correct, dtype=np.float64)
    if table.ndim != 2:
        raise FeatureError(f"mean_ci: expected (runs, samples) outcomes, got shape {table.shape}")
    return bootstrap_ci(table.mean(axis=0), confidence)


def _check(scores: np.ndarray, labels: np.ndarray, class_names: Sequence[str], exclude: Sequence[int]) -> None:
    if scores.ndim != 2:
        raise FeatureError(f"scores must be (N, C), got shape {scores.shape}")
    n, c = scores.shape
    if labels.shape != (n,):
        raise FeatureError(f"labels must be ({n},) to match scores {scores.shape}, got shape {labels.shape}")
    if n == 0:
        raise FeatureError("classification metrics: no samples")
    if len(class_names) != c:
        raise FeatureError(f"{len(class_names)} class names for {c} score columns")
    if not np.isfinite(scores).all():
        raise FeatureError("scores contain NaN or inf")
    bad = (labels < 0) | (labels >= c)
    if bad.any():
        raise FeatureError(f"labels must be class ids in [0, {c}), got {int(labels[bad][0])} "
                           f"({int(bad.sum())} such samples; drop unlabelled rows first)")
    wrong = [k for k in exclude if not 0 <= k < c]
    if wrong:
        raise FeatureError(f"exclude: class ids must be in [0, {c}), got {wrong}")
    if len(set(exclude)) >= c:
        raise FeatureError(f"exclude removes all {c} classes")


def rank_of_true(scores: np.ndarray, labels: np.ndarray) -> np.ndarray:
    """0-based rank of each true class among the columns of ``scores`` (N, C) -> (N,) int.

    Rank = number of classes with a higher score, plus those with an equal score and a lower index.
    Columns set to ``-inf`` count as ranked below everything else.
    """
    true = scores[np.arange(len(labels)), labels][:, None]
    cols = np.arange(scores.shape[1])[None, :]
    ahead = (scores > true) | ((scores == true) & (cols < labels[:, None]))
    return ahead.sum(axis=1)


def _scores(scores: np.ndarray, labels: np.ndarray, n_classes: int) -> dict:
    """top1, top-k (k clipped to n_classes), mean class accuracy and the confusion matrix."""
    ranks = rank_of_true(scores, labels)
    correct = (ranks < 1).astype(np.int64)
    pred = scores.argmax(axis=1)
    k = min(TOP_K, n_classes)
    conf = confusion_matrix(labels, pred, labels=np.arange(scores.shape[1]))
    support = conf.sum(axis=1)
    present = support > 0
    per_class_acc = np.divide(np.diag(conf), support, out=np.zeros(len(conf)), where=present)
    return {
        "n": int(len(labels)),
        "top1": float(correct.mean()),
        "top1_ci95": list(bootstrap_ci(correct)),
        "top5": float((ranks < k).mean()),
        "top5_k": k,
        # = sklearn's balanced_accuracy_score: mean recall over the classes that occur in `labels`
        "mean_class_accuracy": float(per_class_acc[present].mean()),
        "_conf": conf,
        "_acc": per_class_acc,
        "_correct": correct,
    }


def classification_metrics(scores: np.ndarray, labels: np.ndarray, class_names: Sequence[str],
                           exclude: Sequence[int] = ()) -> dict:
    """Scores of class predictions.

    Args:
        scores: (N, C) logits or probabilities (any monotone score; only the ranking per row matters).
        labels: (N,) int true class ids in [0, C).
        class_names: C names, in column order.
        exclude: class ids for the "without" scores (see the module docstring); empty = no "without".

    Returns:
        ``{"n", "top1", "top1_ci95" ([low, high], the 95% bootstrap interval), "correct" (N 0/1 outcomes,
        input order), "top5", "top5_k" (the k actually used: min(5, C)), "mean_class_accuracy",
        "per_class": {name: {"accuracy", "support"}} (accuracy None where support is 0),
        "confusion": C x C list of lists (row = true class, column = predicted),
        "class_names", and, when ``exclude`` is given, "without": {"excluded": [names], "n", "top1",
        "top5", "top5_k", "mean_class_accuracy"}}``. Accuracies are fractions in [0, 1].
    """
    scores = np.asarray(scores, dtype=np.float64)
    labels = np.asarray(labels).astype(np.int64, copy=False)
    exclude = sorted({int(k) for k in exclude})
    _check(scores, labels, class_names, exclude)
    c = scores.shape[1]
    full = _scores(scores, labels, c)
    conf, acc, correct = full.pop("_conf"), full.pop("_acc"), full.pop("_correct")
    support = conf.sum(axis=1)
    out = dict(full)
    out["correct"] = correct.tolist()
    out["per_class"] = {str(name): {"accuracy": float(acc[i]) if support[i] else None, "support": int(support[i])}
                        for i, name in enumerate(class_names)}
    out["confusion"] = conf.tolist()
    out["class_names"] = [str(n) for n in class_names]
    if exclude:
        keep = ~np.isin(labels, exclude)
        without = {"excluded": [str(class_names[k]) for k in exclude]}
        if keep.any():
            masked = scores[keep].copy()
            masked[:, exclude] = -np.inf
            part = _scores(masked, labels[keep], c - len(exclude))
            part.pop("_conf"), part.pop("_acc"), part.pop("_correct")
            without.update(part)
        else:
            without.update({"n": 0, "top1": None, "top5": None, "top5_k": None, "mean_class_accuracy": None})
        out["without"] = without
    return out


def plot_confusion(conf: np.ndarray | list, class_names: Sequence[str], path: str | Path,
                   title: str = "confusion (row-normalised)") -> Path:
    """Write a PNG of a confusion matrix (rows = true class), colour = row-normalised fraction, each
    non-zero cell annotated with its count. Sized to stay readable at 32+ classes. Atomic write.

    Args:
        conf: (C, C) counts.
        class_names: C names.
        path: the PNG to write.
    """
    # deferred on purpose: matplotlib is slow to import and only plots need it
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    conf = np.asarray(conf, dtype=np.int64)
    c = len(class_names)
    if conf.shape != (c, c):
        raise FeatureError(f"confusion matrix is {conf.shape}, expected ({c}, {c}) for {c} class names")
    rows = conf.sum(axis=1, keepdims=True)
    frac = np.divide(conf, rows, out=np.zeros(conf.shape), where=rows > 0)
    side = max(4.0, 0.32 * c + 2.5)  # inches: ~0.32 in per class plus room for the tick labels
    fig = Figure(figsize=(side, side), dpi=110)
    FigureCanvasAgg(fig)
    ax = fig.add_subplot(1, 1, 1)
    im = ax.imshow(frac, cmap="Blues", vmin=0.0, vmax=1.0)
    fig.colorbar(im, ax=ax, fraction=0.046, pad=0.04)
    font = 8 if c <= 16 else 6
    ax.set_xticks(np.arange(c), labels=list(class_names), rotation=90, fontsize=font)
    ax.set_yticks(np.arange(c), labels=list(class_names), fontsize=font)
    ax.set_xlabel("predicted")
    ax.set_ylabel("true")
    ax.set_title(title)
    for i, j in zip(*np.nonzero(conf)):
        ax.text(j, i, str(conf[i, j]), ha="center", va="center", fontsize=font - 1,
                color="white" if frac[i, j] > 0.5 else "black")
    fig.tight_layout()
    return save_figure(fig, path)
