"""Unsupervised recognition: k-means on frozen features, scored against the true classes.

k-means runs in faiss (``faiss.Kmeans``) rather than sklearn: the features are compared by cosine
everywhere else (retrieval), and faiss has spherical k-means (unit-norm centroids on L2-normalised
features) which sklearn lacks; it is also several times faster at iMiGUE sizes (~5-20k clips, 32
clusters, 384-1024-d). It is deterministic for a seed: the initial centroids of every restart are drawn
from ``seed`` and, as all points are used (no subsampling, ``max_points_per_centroid`` set above N), the
same seed gives the same assignment.
"""

from __future__ import annotations

import numpy as np
from scipy.optimize import linear_sum_assignment
from sklearn.metrics import adjusted_rand_score, normalized_mutual_info_score

from mgfm.evaluate.featureset import FeatureError


def l2_normalise(x: np.ndarray) -> np.ndarray:
    """Rows of ``x`` (N, D) scaled to unit L2 norm -> float32 (N, D) copy; all-zero rows stay zero."""
    x = np.array(x, dtype=np.float32, copy=True)
    norms = np.linalg.norm(x, axis=1, keepdims=True)
    np.divide(x, norms, out=x, where=norms > 0)
    return x


def kmeans_assign(features: np.ndarray, n_clusters: int, seed: int = 0, n_init: int = 10, n_iter: int = 50,
                  spherical: bool = True) -> np.ndarray:
    """Cluster id of each row of ``features`` (N, D) -> int64 (N,), ids in [0, n_clusters).

    ``spherical``: L2-normalise the features and keep the centroids on the unit sphere (cosine k-means);
    otherwise plain Euclidean k-means on the raw features. The best of ``n_init`` restarts (lowest
    objective) is kept.
    """
    # deferred: faiss comes from the cpu or gpu extra and loads its native library
    import faiss

    x = np.ascontiguousarray(features, dtype=np.float32)
    if x.ndim != 2 or len(x) == 0:
        raise FeatureError(f"k-means needs a non-empty (N, D) feature matrix, got shape {x.shape}")
    if not np.isfinite(x).all():
        raise FeatureError("k-means: features contain NaN or inf")
    if not 1 <= n_clusters <= len(x):
        raise FeatureError(f"k-means: n_clusters must be in [1, N={len(x)}], got {n_clusters}")
    if spherical:
        x = l2_normalise(x)
    km = faiss.Kmeans(x.shape[1], int(n_clusters), niter=int(n_iter), nredo=int(n_init), seed=int(seed),
                      spherical=spherical, verbose=False, min_points_per_centroid=1,
                      max_points_per_centroid=len(x) // n_clusters + 1)
    km.train(x)
    _, assign = km.index.search(x, 1)
    return assign[:, 0].astype(np.int64)


def clustering_scores(assign: np.ndarray, labels: np.ndarray) -> dict:
    """Agreement of a clustering with the true classes.

    Args:
        assign: (N,) int cluster ids.
        labels: (N,) int class ids (>= 0).

    Returns:
        ``{"clustering_accuracy", "nmi", "ari", "n", "n_clusters", "n_classes"}``. Clustering accuracy maps
        clusters to classes one-to-one (Hungarian algorithm on the cluster x class contingency table,
        maximising matched samples) and counts the samples whose cluster maps to their class; with more
        clusters than classes the extra clusters map to nothing (their samples count as errors), and
        vice versa. NMI uses the arithmetic-mean normalisation (sklearn's default).
    """
    assign = np.asarray(assign).astype(np.int64, copy=False)
    labels = np.asarray(labels).astype(np.int64, copy=False)
    if assign.shape != labels.shape or assign.ndim != 1 or len(labels) == 0:
        raise FeatureError(f"assignments {assign.shape} and labels {labels.shape} must be equal non-empty (N,)")
    if (labels < 0).any():
        raise FeatureError(f"{int((labels < 0).sum())} unlabelled samples (label -1): "
                           "drop them first (FeatureSet.labelled())")
    clusters, a = np.unique(assign, return_inverse=True)
    classes, y = np.unique(labels, return_inverse=True)
    table = np.zeros((len(clusters), len(classes)), dtype=np.int64)
    np.add.at(table, (a, y), 1)
    rows, cols = linear_sum_assignment(table, maximize=True)
    return {
        "clustering_accuracy": float(table[rows, cols].sum() / len(labels)),
        "nmi": float(normalized_mutual_info_score(labels, assign)),
        "ari": float(adjusted_rand_score(labels, assign)),
        "n": int(len(labels)),
        "n_clusters": int(len(clusters)),
        "n_classes": int(len(classes)),
    }


def kmeans_scores(features: np.ndarray, labels: np.ndarray, n_clusters: int | None = None, seed: int = 0,
                  n_init: int = 10, n_iter: int = 50, spherical: bool = True) -> dict:
    """k-means on ``features`` (N, D) scored against ``labels`` (N,) (class ids >= 0).

    ``n_clusters`` defaults to the number of classes present in ``labels``. Returns
    :func:`clustering_scores` with ``n_clusters`` = the requested k (an empty cluster is still counted),
    plus ``"seed"``, ``"n_init"`` and ``"spherical"``.
    """
    labels = np.asarray(labels).astype(np.int64, copy=False)
    features = np.asarray(features)
    if features.ndim != 2 or len(features) != len(labels):
        raise FeatureError(f"features {features.shape} and labels {labels.shape} must have the same N")
    if (labels < 0).any():
        raise FeatureError(f"{int((labels < 0).sum())} unlabelled samples (label -1): "
                           "drop them first (FeatureSet.labelled())")
    k = int(n_clusters) if n_clusters is not None else int(len(np.unique(labels)))
    assign = kmeans_assign(features, k, seed=seed, n_init=n_init, n_iter=n_iter, spherical=spherical)
    out = clustering_scores(assign, labels)
    out.update({"n_clusters": k, "seed": int(seed), "n_init": int(n_init), "spherical": bool(spherical)})
    return out
