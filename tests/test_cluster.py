"""k-means scores: Hungarian clustering accuracy, NMI, ARI; faiss k-means determinism."""

from __future__ import annotations

import numpy as np
from sklearn.metrics import adjusted_rand_score as adjusted_rand
import pytest

from mgfm.evaluate.cluster import clustering_scores, kmeans_assign, kmeans_scores
from mgfm.evaluate.featureset import FeatureError


def blobs(n_per: int, centres: int, dim: int, spread: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Clusters around random directions (separated in cosine), labels 0..centres-1 -> (X (N, D), y (N,))."""
    rng = np.random.default_rng(seed)
    directions = rng.normal(size=(centres, dim))
    labels = np.repeat(np.arange(centres), n_per)
    x = directions[labels] + spread * rng.normal(size=(len(labels), dim))
    return (x * rng.uniform(0.5, 3.0, size=(len(labels), 1))).astype(np.float32), labels


def test_hand_checked_hungarian():
    labels = np.array([0, 0, 0, 1, 1, 2])
    assign = np.array([1, 1, 0, 0, 0, 2])
    # clusters x classes: c0 -> {0: 1, 1: 2}, c1 -> {0: 2}, c2 -> {2: 1}; best one-to-one: c1->0, c0->1, c2->2
    s = clustering_scores(assign, labels)
    assert s["clustering_accuracy"] == pytest.approx(5 / 6)
    assert (s["n"], s["n_clusters"], s["n_classes"]) == (6, 3, 3)


def test_more_clusters_than_classes():
    # clusters c0 -> {0: 1}, c1 -> {0: 1}, c2 -> {1: 2}: only one of c0/c1 can map to class 0
    s = clustering_scores(np.array([0, 1, 2, 2]), np.array([0, 0, 1, 1]))
    assert s["clustering_accuracy"] == pytest.approx(3 / 4)


def test_permuted_labelling_is_perfect():
    labels = np.array([0, 0, 1, 1, 2, 2, 2, 5])
    assign = np.array([7, 7, 3, 3, 0, 0, 0, 1])  # the same partition under other names
    s = clustering_scores(assign, labels)
    assert s["clustering_accuracy"] == 1.0
    assert s["nmi"] == pytest.approx(1.0) and s["ari"] == pytest.approx(1.0)


def test_uninformative_clustering():
    s = clustering_scores(np.zeros(4, dtype=int), np.array([0, 0, 1, 1]))
    assert s["clustering_accuracy"] == 0.5
    assert s["nmi"] == pytest.approx(0.0) and s["ari"] == pytest.approx(0.0)


def test_kmeans_recovers_separated_classes():
    x, y = blobs(40, 5, 16, 0.05, seed=0)
    perm = np.random.default_rng(1).permutation(len(y))
    s = kmeans_scores(x[perm], (y[perm] * 3 + 2), seed=0, n_init=3)  # class ids need not be 0..K-1
    assert s["n_clusters"] == 5
    assert s["clustering_accuracy"] == 1.0 and s["nmi"] == pytest.approx(1.0) and s["ari"] == pytest.approx(1.0)


def test_kmeans_deterministic_for_a_seed():
    x, _ = blobs(30, 6, 8, 0.8, seed=2)  # overlapping: restarts/seeds matter
    a = kmeans_assign(x, 6, seed=3, n_init=2)
    b = kmeans_assign(x, 6, seed=3, n_init=2)
    assert a.dtype == np.int64 and a.shape == (len(x),)
    np.testing.assert_array_equal(a, b)
    assert set(a.tolist()) <= set(range(6))
    # the seed is used: on overlapping data some other seed lands in another partition
    others = [kmeans_assign(x, 6, seed=s, n_init=1) for s in range(4, 12)]
    assert any(adjusted_rand(a, o) < 0.999 for o in others), "every seed gave the same partition"


def test_euclidean_option_and_explicit_k():
    x, y = blobs(20, 3, 6, 0.05, seed=4)
    s = kmeans_scores(x / np.linalg.norm(x, axis=1, keepdims=True), y, n_clusters=4, spherical=False, n_init=2)
    assert s["n_clusters"] == 4 and not s["spherical"]
    # 4 clusters for 3 separated classes: one class is split, at worst in halves -> accuracy >= 50/60
    assert 50 / 60 <= s["clustering_accuracy"] < 1.0


@pytest.mark.parametrize("call, match", [
    (lambda: kmeans_scores(np.ones((3, 2)), np.array([0, -1, 1])), "unlabelled"),
    (lambda: kmeans_scores(np.ones((3, 2)), np.array([0, 1])), "same N"),
    (lambda: kmeans_assign(np.ones((3, 2)), 4), "n_clusters"),
    (lambda: kmeans_assign(np.zeros((0, 2)), 1), "non-empty"),
    (lambda: kmeans_assign(np.full((3, 2), np.nan), 1), "NaN"),
    (lambda: clustering_scores(np.array([0, 1]), np.array([0, 1, 1])), "non-empty"),
])
def test_bad_input(call, match):
    with pytest.raises(FeatureError, match=match):
        call()
