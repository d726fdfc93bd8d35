"""Retrieval scores of a :class:`~mgfm.evaluate.retrieval.RetrievalIndex`: Recall@k from the index's own
neighbours, and mAP / exact Recall@k from an exact, tie-defined pass over every database vector (descending
score, ties by ascending database index)."""

from __future__ import annotations

from typing import Sequence

import numpy as np

from mgfm.evaluate.featureset import FeatureError
from mgfm.evaluate.retrieval import EXACT_CHUNK_ELEMENTS, RetrievalIndex, as_matrix, normalised


def _check_queries(index: RetrievalIndex, queries: np.ndarray, query_labels: np.ndarray,
                   self_index: np.ndarray | None) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    q = as_matrix(queries, "queries")
    if q.shape[1] != index.dim:
        raise FeatureError(f"queries are {q.shape[1]}-d, the index is {index.dim}-d")
    y = np.asarray(query_labels).astype(np.int64, copy=False)
    if y.shape != (len(q),):
        raise FeatureError(f"query labels must be ({len(q)},), got shape {y.shape}")
    if (y < 0).any():
        raise FeatureError(f"{int((y < 0).sum())} unlabelled queries (label -1): drop them first")
    if self_index is None:
        s = np.full(len(q), -1, dtype=np.int64)
    else:
        s = np.asarray(self_index).astype(np.int64, copy=False)
        if s.shape != (len(q),) or (s >= index.ntotal).any():
            raise FeatureError(f"self_index must be ({len(q)},) database indices or -1, got shape {s.shape}")
    return q, y, s


def _index_hits(index: RetrievalIndex, q: np.ndarray, y: np.ndarray, self_ids: np.ndarray,
                k_max: int, db_labels: np.ndarray) -> np.ndarray:
    """bool (Q, k_max): neighbour j of query i (through the index, self excluded) has the query's class."""
    extra = int((self_ids >= 0).any())
    _, ids = index.search(q, k_max + extra)
    if extra:
        keep = ids != self_ids[:, None]
        # shift the kept neighbours left, dropping the query's own entry
        order = np.argsort(~keep, axis=1, kind="stable")
        ids = np.where(np.take_along_axis(keep, order, 1), np.take_along_axis(ids, order, 1), -1)
    ids = ids[:, :k_max]
    if ids.shape[1] < k_max:
        ids = np.pad(ids, ((0, 0), (0, k_max - ids.shape[1])), constant_values=-1)
    return (ids >= 0) & (db_labels[np.maximum(ids, 0)] == y[:, None])


def _descending_keys(scores: np.ndarray) -> np.ndarray:
    """int64 keys (Q, N) that sort ascending as (descending score, ascending column index)."""
    neg = -scores
    neg += 0.0  # -0.0 -> +0.0 so that equal scores get equal keys
    bits = neg.view(np.int32).astype(np.int64)
    ordered = np.where(bits < 0, bits ^ 0x7FFFFFFF, bits)  # monotone in the float value
    return (ordered << 32) + np.arange(scores.shape[1], dtype=np.int64)[None, :]


def exact_ranking_scores(db: np.ndarray, db_labels: np.ndarray, q: np.ndarray, y: np.ndarray,
                         self_ids: np.ndarray, ks: Sequence[int],
                         chunk_elements: int = EXACT_CHUNK_ELEMENTS) -> tuple[dict[int, np.ndarray], np.ndarray]:
    """Exact full rankings of the database (N, D) for each query (Q, D), both already normalised.

    Ranking: descending cosine, ties by ascending database index; a query's own entry (``self_ids``,
    -1 = none) is removed. Queries are handled ``chunk_elements // N`` at a time, so memory stays
    ~50 bytes x chunk_elements whatever Q and N are.

    Returns:
        ``({k: bool (Q,) hit@k}, ap float64 (Q,) with NaN where the query has no positive)``.
    """
    n = len(db)
    step = max(1, chunk_elements // n)
    hits = {k: np.zeros(len(q), dtype=bool) for k in ks}
    ap = np.full(len(q), np.nan)
    ranks = np.arange(1, n + 1, dtype=np.float64)
    for lo in range(0, len(q), step):
        hi = min(lo + step, len(q))
        scores = q[lo:hi] @ db.T
        mine = self_ids[lo:hi]
        rows = np.nonzero(mine >= 0)[0]
        scores[rows, mine[rows]] = -np.inf  # own entry last ...
        order = np.sort(_descending_keys(scores), axis=1) & 0xFFFFFFFF
        rel = db_labels[order] == y[lo:hi, None]
        rel[rows, n - 1] = False  # ... and not a positive (assumes no other -inf scores: inputs are finite)
        n_pos = rel.sum(axis=1)
        first = rel.argmax(axis=1)  # 0 also when there is no positive: masked by n_pos below
        for k in ks:
            hits[k][lo:hi] = (n_pos > 0) & (first < k)
        precision_sum = (np.cumsum(rel, axis=1) / ranks * rel).sum(axis=1)
        ap[lo:hi] = np.where(n_pos > 0, precision_sum / np.maximum(n_pos, 1), np.nan)
    return hits, ap


def retrieval_metrics(index: RetrievalIndex, query_features: np.ndarray, query_labels: np.ndarray,
                      ks: Sequence[int] = (1, 5, 10), self_index: np.ndarray | None = None, with_map: bool = True,
                      chunk_elements: int = EXACT_CHUNK_ELEMENTS) -> dict:
    """Class-level retrieval scores of ``query_features`` (Q, D) against ``index``.

    * ``recall@k`` (R@k): fraction of queries with at least one same-class item among their top k
      neighbours as returned by ``index.search`` (so an approximate index is scored as it is used).
    * ``exact_recall@k``: the same on the exact ranking (only with ``with_map``); for a flat index it
      differs from ``recall@k`` only where faiss breaks a tie at the k-th place differently.
    * ``map``: mean over queries of the average precision over the FULL exact ranking of the database
      (descending cosine, ties by ascending database index), computed in chunks of queries; queries
      whose class has no database item have no AP and are left out of the mean (counted in
      ``n_queries_without_positive``; they are misses for every recall).

    Args:
        query_labels: (Q,) class ids (>= 0); database items with label -1 are never positives.
        ks: the k of Recall@k (each clipped to the database size).
        self_index: (Q,) database index of each query's own entry, or -1, for leave-one-out retrieval
            when the queries are (part of) the database; None = queries are not in the database.
        with_map: run the exact pass (mAP + exact recalls); its cost is O(Q N (D + log N)).
    """
    q, y, self_ids = _check_queries(index, query_features, query_labels, self_index)
    if not ks or min(ks) < 1:
        raise FeatureError(f"ks must be positive integers, got {list(ks)}")
    db_labels = index.labels
    ks = sorted({int(k) for k in ks})
    k_max = min(ks[-1], index.ntotal)
    hit = _index_hits(index, q, y, self_ids, k_max, db_labels)
    out: dict = {"kind": index.kind, "n_queries": int(len(q)), "n_database": index.ntotal}
    out["recall"] = {str(k): float(hit[:, : min(k, k_max)].any(axis=1).mean()) for k in ks}
    if with_map:
        exact_hits, ap = exact_ranking_scores(index.vectors(), db_labels, normalised(q), y, self_ids, ks,
                                              chunk_elements)
        out["exact_recall"] = {str(k): float(exact_hits[k].mean()) for k in ks}
        has_pos = ~np.isnan(ap)
        out["map"] = float(ap[has_pos].mean()) if has_pos.any() else None
        out["n_queries_without_positive"] = int((~has_pos).sum())
    return out
