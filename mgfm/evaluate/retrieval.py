"""Cosine-similarity retrieval over frozen features with FAISS, and its scores (Recall@k, mAP).

Vectors are L2-normalised and compared by inner product, so a score is the cosine similarity.
Index kinds: ``flat`` (exact, ``IndexFlatIP``), ``ivf`` (``IndexIVFFlat``, inner product; ``nlist``
lists, ``nprobe`` searched) and ``hnsw`` (``IndexHNSWFlat``, inner product; ``hnsw_m`` links,
``ef_search``). Flat and IVF run on a GPU when faiss has GPU support and ``use_gpu`` allows it; HNSW has
no GPU version in faiss and stays on the CPU. A CPU copy is always kept (for saving and for the exact
mAP pass).

Ranking rule everywhere: descending score, ties by ascending database index. ``search`` applies it to
the neighbours the index returns; faiss itself decides which of several tied candidates make it into
the top k at the boundary, so only the exact pass of :func:`retrieval_metrics` is fully tie-defined.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

import numpy as np

from mgfm.evaluate.featureset import FeatureError

logger = logging.getLogger(__name__)

KINDS = ("flat", "ivf", "hnsw")
INDEX_FILE, META_FILE = "index.faiss", "rows.json"
# elements of the (queries x database) score matrix handled at once by the exact pass (~50 bytes each at peak)
EXACT_CHUNK_ELEMENTS = 1 << 21


def _as_matrix(x: np.ndarray, name: str) -> np.ndarray:
    x = np.asarray(x, dtype=np.float32)
    if x.ndim != 2:
        raise FeatureError(f"{name}: expected a (N, D) matrix, got shape {x.shape}")
    if len(x) == 0:
        raise FeatureError(f"{name}: no vectors (empty split)")
    if not np.isfinite(x).all():
        raise FeatureError(f"{name}: features contain NaN or inf")
    return x


def _normalised(x: np.ndarray) -> np.ndarray:
    """float32 (N, D) copy with unit-norm rows (zero rows stay zero)."""
    out = np.array(x, dtype=np.float32, order="C", copy=True)
    norms = np.linalg.norm(out, axis=1, keepdims=True)
    np.divide(out, norms, out=out, where=norms > 0)
    return out


def default_nlist(n: int) -> int:
    """IVF lists for ``n`` vectors: ~4 sqrt(n), at most n/39 (faiss wants >= 39 training points per list)."""
    return int(max(1, min(round(4 * np.sqrt(n)), n // 39)))


def default_nprobe(nlist: int) -> int:
    """Lists searched per query: 1/16 of the lists, at least 8 (capped at nlist)."""
    return int(min(nlist, max(8, nlist // 16)))


def _sort_hits(scores: np.ndarray, ids: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Per row: descending score, ties by ascending id; missing hits (id -1) last."""
    missing = ids < 0
    key_score = np.where(missing, -np.inf, scores)
    key_id = np.where(missing, np.iinfo(np.int64).max, ids)
    order = np.lexsort((key_id, -key_score), axis=-1)
    return np.take_along_axis(scores, order, 1), np.take_along_axis(ids, order, 1)


@dataclass
class RetrievalIndex:
    """A FAISS index over L2-normalised database vectors and the clip rows they belong to.

    Build with :meth:`build`, reload with :meth:`load`. ``rows[i]`` is the clip-index row of database
    vector ``i``.
    """

    cpu_index: object  # faiss.Index, always on the CPU
    rows: list[dict]
    kind: str
    params: dict = field(default_factory=dict)
    search_index: object = None  # the index searched: a GPU clone or cpu_index
    gpu_resources: object = None  # keeps the GPU memory of search_index alive

    def __post_init__(self) -> None:
        if self.search_index is None:
            self.search_index = self.cpu_index

    @property
    def ntotal(self) -> int:
        return int(self.cpu_index.ntotal)

    @property
    def dim(self) -> int:
        return int(self.cpu_index.d)

    @property
    def on_gpu(self) -> bool:
        return self.gpu_resources is not None

    @property
    def labels(self) -> np.ndarray:
        """int64 (N,) class ids of the database (-1 = unlabelled)."""
        return np.array([int(r.get("label", -1)) for r in self.rows], dtype=np.int64)

    @classmethod
    def build(cls, features: np.ndarray, rows: Sequence[dict], kind: str = "flat", nlist: int | None = None,
              nprobe: int | None = None, hnsw_m: int = 32, ef_search: int = 128, ef_construction: int = 40,
              use_gpu: bool | str = "auto", seed: int = 0) -> "RetrievalIndex":
        """Index ``features`` (N, D) (normalised here; the caller's array is not changed).

        Args:
            rows: N clip-index rows, in feature order.
            kind: ``flat`` | ``ivf`` | ``hnsw``.
            nlist, nprobe: IVF lists and lists probed (defaults :func:`default_nlist`, :func:`default_nprobe`).
            hnsw_m, ef_search, ef_construction: HNSW graph degree and beam widths.
            use_gpu: ``"auto"`` (GPU when faiss has one), True (required) or False.
            seed: IVF k-means seed.
        """
        faiss = _faiss()
        x = _normalised(_as_matrix(features, "database"))
        if len(rows) != len(x):
            raise FeatureError(f"database: {len(x)} feature rows but {len(rows)} clip rows")
        if kind not in KINDS:
            raise FeatureError(f"index kind must be one of {KINDS}, got {kind!r}")
        n, d = x.shape
        params: dict = {}
        if kind == "flat":
            index = faiss.IndexFlatIP(d)
        elif kind == "ivf":
            nlist = int(nlist or default_nlist(n))
            if not 1 <= nlist <= n:
                raise FeatureError(f"ivf: nlist must be in [1, N={n}], got {nlist}")
            params = {"nlist": nlist, "nprobe": int(min(nprobe or default_nprobe(nlist), nlist))}
            index = faiss.IndexIVFFlat(faiss.IndexFlatIP(d), d, nlist, faiss.METRIC_INNER_PRODUCT)
            index.cp.seed = int(seed)
            index.cp.min_points_per_centroid = 1  # small databases: no faiss warning, the caller chose nlist
        else:
            params = {"hnsw_m": int(hnsw_m), "ef_search": int(ef_search), "ef_construction": int(ef_construction)}
            index = faiss.IndexHNSWFlat(d, int(hnsw_m), faiss.METRIC_INNER_PRODUCT)
            index.hnsw.efConstruction = int(ef_construction)
        res = _gpu_resources(use_gpu, kind)
        _set_search_params(index, kind, params)
        gpu = None
        if res is not None:  # train/add on the GPU, keep a CPU copy for saving and the exact pass
            gpu = faiss.index_cpu_to_gpu(res, 0, index)
            if kind == "ivf":
                gpu.train(x)
            gpu.add(x)
            index = faiss.index_gpu_to_cpu(gpu)
        else:
            if kind == "ivf":
                index.train(x)
            index.add(x)
        out = cls(index, [dict(r) for r in rows], kind, params,
                  search_index=gpu if gpu is not None else index, gpu_resources=res)
        logger.info("retrieval index: %s over %d x %d (%s)%s", kind, n, d, "GPU" if out.on_gpu else "CPU",
                    f" {params}" if params else "")
        return out

    def search(self, queries: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        """The ``k`` most similar database vectors of each query (normalised here).

        Args:
            queries: (Q, D) features.
            k: neighbours per query; clipped to the database size.

        Returns:
            ``(scores float32 (Q, k'), indices int64 (Q, k'))`` with k' = min(k, N): cosine similarities and
            database indices, best first (ties by ascending index). An approximate index (IVF/HNSW) may
            find fewer than k' neighbours: the missing ones have index -1 and score -inf.
        """
        q = _normalised(_as_matrix(queries, "queries"))
        if q.shape[1] != self.dim:
            raise FeatureError(f"queries are {q.shape[1]}-d, the index is {self.dim}-d")
        if k < 1:
            raise FeatureError(f"k must be >= 1, got {k}")
        k = min(int(k), self.ntotal)
        if self.kind == "hnsw":  # the beam must be at least k wide
            faiss = _faiss()
            beam = faiss.SearchParametersHNSW(efSearch=max(k, int(self.params["ef_search"])))
            scores, ids = self.search_index.search(q, k, params=beam)
        else:
            scores, ids = self.search_index.search(q, k)
        ids = ids.astype(np.int64, copy=False)
        scores = np.where(ids < 0, -np.inf, scores).astype(np.float32)
        return _sort_hits(scores, ids)

    def vectors(self) -> np.ndarray:
        """The normalised database vectors, float32 (N, D) (reconstructed from the CPU index)."""
        faiss = _faiss()
        if self.kind == "ivf":
            faiss.extract_index_ivf(self.cpu_index).make_direct_map(True)
        return self.cpu_index.reconstruct_n(0, self.ntotal)

    def save(self, folder: str | Path) -> Path:
        """Write ``folder/index.faiss`` and ``folder/rows.json`` (kind, params, rows), each atomically,
        the JSON last (a folder with both files is complete)."""
        faiss = _faiss()
        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        (folder / META_FILE).unlink(missing_ok=True)  # an old JSON must not vouch for a half-replaced index
        tmp = folder / (INDEX_FILE + ".tmp")
        faiss.write_index(self.cpu_index, str(tmp))
        tmp.replace(folder / INDEX_FILE)
        meta = {"kind": self.kind, "params": self.params, "dim": self.dim, "ntotal": self.ntotal, "rows": self.rows}
        tmp = folder / (META_FILE + ".tmp")
        tmp.write_text(json.dumps(meta))
        tmp.replace(folder / META_FILE)
        return folder

    @classmethod
    def load(cls, folder: str | Path, use_gpu: bool | str = "auto") -> "RetrievalIndex":
        """Read an index written by :meth:`save`."""
        faiss = _faiss()
        folder = Path(folder)
        index_path, meta_path = folder / INDEX_FILE, folder / META_FILE
        if not index_path.exists() or not meta_path.exists():
            raise FileNotFoundError(f"{folder}: no complete retrieval index ({INDEX_FILE} + {META_FILE})")
        meta = json.loads(meta_path.read_text())
        index = faiss.read_index(str(index_path))
        if index.ntotal != meta["ntotal"] or index.d != meta["dim"] or len(meta["rows"]) != index.ntotal:
            raise FeatureError(f"{meta_path}: describes {meta['ntotal']} x {meta['dim']} with {len(meta['rows'])} "
                               f"rows but {index_path.name} holds {index.ntotal} x {index.d}")
        _set_search_params(index, meta["kind"], meta["params"])
        res = _gpu_resources(use_gpu, meta["kind"])
        search_index = faiss.index_cpu_to_gpu(res, 0, index) if res is not None else index
        return cls(index, meta["rows"], meta["kind"], meta["params"], search_index, res)


def _faiss():
    """The faiss module; a one-line error when neither faiss build is installed (they are extras)."""
    try:
        import faiss
    except ImportError:
        raise FeatureError("faiss is not installed: pip install -e '.[cpu]' (or '.[gpu]' for faiss-gpu)") from None
    return faiss


def _set_search_params(index: object, kind: str, params: dict) -> None:
    """nprobe (IVF) / efSearch (HNSW) on a CPU index; a GPU clone made afterwards inherits them."""
    faiss = _faiss()
    if kind == "ivf":
        faiss.ParameterSpace().set_index_parameter(index, "nprobe", int(params["nprobe"]))
    elif kind == "hnsw":
        faiss.ParameterSpace().set_index_parameter(index, "efSearch", int(params["ef_search"]))


def _gpu_resources(use_gpu: bool | str, kind: str) -> object:
    """``faiss.StandardGpuResources`` when the index should live on a GPU, else None."""
    faiss = _faiss()
    if use_gpu not in ("auto", True, False):
        raise FeatureError(f"use_gpu must be 'auto', True or False, got {use_gpu!r}")
    has_gpu = hasattr(faiss, "StandardGpuResources") and faiss.get_num_gpus() > 0
    if use_gpu is True and not has_gpu:
        raise FeatureError("use_gpu=True but faiss sees no GPU (install faiss-gpu: pip install 'mgfm[gpu]')")
    if not has_gpu or use_gpu is False:
        return None
    if kind == "hnsw":
        logger.info("faiss has no GPU HNSW: the hnsw index stays on the CPU")
        return None
    return faiss.StandardGpuResources()


def _check_queries(index: RetrievalIndex, queries: np.ndarray, query_labels: np.ndarray,
                   self_index: np.ndarray | None) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    q = _as_matrix(queries, "queries")
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
        exact_hits, ap = exact_ranking_scores(index.vectors(), db_labels, _normalised(q), y, self_ids, ks,
                                              chunk_elements)
        out["exact_recall"] = {str(k): float(exact_hits[k].mean()) for k in ks}
        has_pos = ~np.isnan(ap)
        out["map"] = float(ap[has_pos].mean()) if has_pos.any() else None
        out["n_queries_without_positive"] = int((~has_pos).sum())
    return out
