"""Linear probe on frozen features, MAE style: standardise the features (BatchNorm without affine
parameters, with the train split's statistics), then one linear classifier.

The classifier is a multinomial logistic regression (scikit-learn, L-BFGS). Its L2 strength decides
most of a probe's score on small, cross-subject datasets: a weakly regularised probe memorises the
train subjects and lands below the majority class on new ones. So ``C=None`` (the default) picks C from
``c_grid`` by cross-validation over groups of train *subjects* (never clips of one subject on both sides),
the same generalisation the test split asks for, and refits on the whole train split.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable
import warnings

import numpy as np
from sklearn.exceptions import ConvergenceWarning
from sklearn.linear_model import LogisticRegression
from sklearn.metrics import balanced_accuracy_score
from sklearn.model_selection import GroupKFold

from mgfm.config import bounded
from mgfm.evaluate.featureset import FeatureError, FeatureSet


@dataclass
class ProbeConfig:
    C: float | None = bounded(None, gt=0)  # inverse L2 strength; None = chosen by subject-grouped CV from c_grid
    c_grid: list[float] = bounded(default_factory=lambda: [1e-3, 1e-2, 1e-1, 1.0], gt=0)
    cv_folds: int = bounded(3, ge=2)
    # "none" | "balanced": loss weighted by inverse class frequency (long-tailed data)
    class_weighting: str = "none"
    max_iter: int = bounded(300, ge=1)


@dataclass
class LinearProbe:
    """A fitted probe: feature standardisation + linear classifier over ``num_classes`` columns."""

    mean: np.ndarray
    scale: np.ndarray
    model: object  # sklearn LogisticRegression
    num_classes: int
    C: float
    cv_scores: dict[float, float] = field(default_factory=dict)

    def logits(self, features: np.ndarray) -> np.ndarray:
        """``(N, D)`` -> ``(N, num_classes)`` float32; classes absent from the train split get -inf."""
        x = (np.asarray(features, dtype=np.float64) - self.mean) / self.scale
        scores = self.model.decision_function(x)
        if scores.ndim == 1:  # two classes present: sklearn returns the positive-class margin only
            scores = np.stack([-scores, scores], axis=1)
        out = np.full((len(x), self.num_classes), -np.inf, dtype=np.float32)
        out[:, self.model.classes_] = scores
        return out

    def affine(self) -> tuple[np.ndarray, np.ndarray]:
        """The probe as one linear layer on raw features, the standardisation folded in: ``(weight
        (num_classes, D), bias (num_classes,))`` whose softmax is the regression's class probabilities (two
        classes: +-margin / 2). A class absent from the train split gets a flat row at the lowest bias."""
        coef, icpt = self.model.coef_, self.model.intercept_
        if len(self.model.classes_) == 2:  # sklearn keeps the positive-class margin only
            coef, icpt = np.concatenate([-coef, coef]) / 2, np.concatenate([-icpt, icpt]) / 2
        fitted = icpt - (coef * self.mean / self.scale).sum(axis=1)
        weight = np.zeros((self.num_classes, coef.shape[1]))
        bias = np.full(self.num_classes, fitted.min())
        weight[self.model.classes_] = coef / self.scale
        bias[self.model.classes_] = fitted
        return weight, bias


def _fit(x: np.ndarray, y: np.ndarray, C: float, cfg: ProbeConfig):
    model = LogisticRegression(C=C, max_iter=cfg.max_iter,
                               class_weight="balanced" if cfg.class_weighting == "balanced" else None)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ConvergenceWarning)
        return model.fit(x, y)


def subject_groups(train: FeatureSet) -> np.ndarray:
    """The CV groups of a train split: each clip's subject (a clip without one is its own group)."""
    return np.array([str(r.get("subject", i)) for i, r in enumerate(train.rows)])


def choose_by_group_cv(grid: list[float], score: Callable[[float, np.ndarray, np.ndarray], float],
                       y: np.ndarray, groups: np.ndarray, folds: int) -> tuple[float, dict[float, float]]:
    """The value of ``grid`` with the best mean ``score(value, train_idx, val_idx)`` over subject-grouped
    folds (ties: the smaller value), and every value's score. Fewer than 2 groups: the middle value."""
    folds = min(folds, len(np.unique(groups)))
    if folds < 2:
        return grid[len(grid) // 2], {}
    splits = list(GroupKFold(folds).split(np.zeros(len(y)), y, groups))
    scores = {value: float(np.mean([score(value, tr, va) for tr, va in splits])) for value in grid}
    return max(scores, key=lambda v: (scores[v], -v)), scores


def _choose_c(x: np.ndarray, y: np.ndarray, groups: np.ndarray, cfg: ProbeConfig) -> tuple[float, dict]:
    metric = balanced_accuracy_score if cfg.class_weighting == "balanced" else _accuracy

    def score(C: float, train_idx: np.ndarray, val_idx: np.ndarray) -> float:
        return metric(y[val_idx], _fit(x[train_idx], y[train_idx], C, cfg).predict(x[val_idx]))

    return choose_by_group_cv(cfg.c_grid, score, y, groups, cfg.cv_folds)


def _accuracy(y_true: np.ndarray, y_pred: np.ndarray) -> float:
    return float(np.mean(y_true == y_pred))


def labelled_train_split(train: FeatureSet, num_classes: int, what: str) -> FeatureSet:
    """The labelled rows of a probe's train split; a one-line error (naming ``what``) when they cannot train
    a ``num_classes``-way probe: none, a label out of range, or a single class."""
    train = train.labelled().require(what)
    y = train.labels
    if int(y.max()) >= num_classes:
        raise FeatureError(f"{what}: label {int(y.max())} >= num_classes {num_classes}")
    if len(np.unique(y)) < 2:
        raise FeatureError(f"{what}: needs clips of at least 2 classes")
    return train


def channel_stats(x: np.ndarray, axis: int | tuple[int, ...]) -> tuple[np.ndarray, np.ndarray]:
    """float64 mean and standard deviation of ``x`` over ``axis`` (a constant channel's scale is 1): what a
    probe standardises its inputs with."""
    mean = x.mean(axis=axis, dtype=np.float64)
    scale = x.std(axis=axis, dtype=np.float64)
    scale[scale < 1e-6] = 1.0
    return mean, scale


def train_probe(train: FeatureSet, num_classes: int, cfg: ProbeConfig | None = None) -> LinearProbe:
    """Fit a :class:`LinearProbe` on the labelled rows of ``train``."""
    cfg = cfg or ProbeConfig()
    if cfg.class_weighting not in ("none", "balanced"):
        raise FeatureError(f"probe class_weighting: expected 'none' or 'balanced', got {cfg.class_weighting!r}")
    train = labelled_train_split(train, num_classes, "probe train split")
    y = train.labels
    mean, scale = channel_stats(train.features, 0)
    x = (train.features - mean) / scale
    scores: dict[float, float] = {}
    C = cfg.C
    if C is None:
        C, scores = _choose_c(x, y, subject_groups(train), cfg)
    return LinearProbe(mean, scale, _fit(x, y, C, cfg), num_classes, C, scores)


def predict(probe: LinearProbe, features: FeatureSet) -> np.ndarray:
    """Logits ``(N, C)`` float32."""
    return probe.logits(features.features)
