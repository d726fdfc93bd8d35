"""Cosine-similarity retrieval over frozen features with FAISS (its scores: :mod:`mgfm.evaluate.retrieval_metrics`).

Vectors are L2-normalised and compared by inner product, so a score is the cosine similarity.
Index kinds: ``flat`` (exact, ``IndexFlatIP``), ``ivf`` (``IndexIVFFlat``, inner product; ``nlist``
lists, ``nprobe`` searched), ``hnsw`` (``IndexHNSWFlat``, inner product; ``hnsw_m`` links, ``ef_search``)
and ``ivfpq``, the compressed index for when float vectors do not fit in memory: product-quantised codes
(``pq_m`` bytes per vector) in IVF lists, whose ``rerank x k`` best candidates are re-ranked exactly against
the full vectors, memory-mapped from ``vectors.npy`` on disk. ``auto`` picks the kind from the database
size, width and a memory budget (:func:`choose_kind`), and a ``recall_target`` calibrates the search knob
(``nprobe`` / ``ef_search`` / ``rerank``) on held-out database vectors (:meth:`RetrievalIndex.tune`),
recording the whole recall / speed frontier. Vectors are added in chunks, so a memory-mapped feature
matrix is never copied whole. Flat, IVF and IVF-PQ run on a GPU when faiss has GPU support and
``use_gpu`` allows it (else the CPU, said once); HNSW has no GPU version in faiss. A CPU copy is always kept
(for saving and for the exact mAP pass).

Ranking rule everywhere: descending score, ties by ascending database index. ``search`` applies it to
the neighbours the index returns; faiss itself decides which of several tied candidates make it into
the top k at the boundary, so only the exact pass of :func:`retrieval_metrics` is fully tie-defined.
"""

from __future__ import annotations

import json
import logging
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

import numpy as np
import psutil

from mgfm.evaluate.featureset import FeatureError
from mgfm.files import atomic_path, write_atomic

logger = logging.getLogger(__name__)

KINDS = ("flat", "ivf", "hnsw", "ivfpq")
CHOICES = (*KINDS, "auto")  # what a recipe may ask for
INDEX_FILE, META_FILE, VECTORS_FILE = "index.faiss", "rows.json", "vectors.npy"
EXACT_BELOW = 50_000  # auto: below this many vectors exact search is fast enough
CHUNK_ROWS = 65_536  # vectors normalised and added at a time
#: the search knob each kind tunes, and the values tried (ascending cost)
KNOBS = {"ivf": ("nprobe", (1, 2, 4, 8, 12, 16, 24, 32, 48, 64, 96, 128, 192, 256, 384, 512)),
         "hnsw": ("ef_search", (16, 24, 32, 40, 48, 64, 96, 128, 192, 256, 384, 512)),
         "ivfpq": ("nprobe", (4, 8, 16, 32, 48, 64, 96, 128, 192, 256))}
RERANKS = (4, 10, 25)  # ivfpq: candidates per wanted neighbour re-ranked exactly
# elements of the (queries x database) score matrix handled at once by the exact pass (~50 bytes each at peak)
EXACT_CHUNK_ELEMENTS = 1 << 21


def _count_rows(x, name: str) -> int:
    """Rows of a (N, D) matrix-like (array or memory map), with the checks :func:`as_matrix` makes on
    shape; the values are checked chunk by chunk as they are added."""
    shape = getattr(x, "shape", None)
    if shape is None or len(shape) != 2:
        raise FeatureError(f"{name}: expected a (N, D) matrix, got shape {shape}")
    if shape[0] == 0:
        raise FeatureError(f"{name}: no vectors (empty split)")
    return int(shape[0])


def _exact_top(index: "RetrievalIndex", q: np.ndarray, k: int, own: np.ndarray) -> np.ndarray:
    """Exact top ``k`` database ids (Q, k) of unit queries ``q`` (own entries ``own`` excluded), over the
    database in chunks (a running top k, so memory stays ``Q x CHUNK_ROWS``)."""
    best_s = np.full((len(q), k), -np.inf, dtype=np.float32)
    best_i = np.full((len(q), k), -1, dtype=np.int64)
    for lo in range(0, index.ntotal, CHUNK_ROWS):
        s = q @ index.vectors(lo, CHUNK_ROWS).T
        rows = np.nonzero((own >= lo) & (own < lo + s.shape[1]))[0]
        s[rows, own[rows] - lo] = -np.inf
        ids = np.arange(lo, lo + s.shape[1])
        cat_s = np.concatenate([best_s, s], axis=1)
        cat_i = np.concatenate([best_i, np.broadcast_to(ids, s.shape)], axis=1)
        top = np.argpartition(-cat_s, k - 1, axis=1)[:, :k]
        best_s, best_i = np.take_along_axis(cat_s, top, 1), np.take_along_axis(cat_i, top, 1)
    return best_i


def as_matrix(x: np.ndarray, name: str) -> np.ndarray:
    x = np.asarray(x, dtype=np.float32)
    if x.ndim != 2:
        raise FeatureError(f"{name}: expected a (N, D) matrix, got shape {x.shape}")
    if len(x) == 0:
        raise FeatureError(f"{name}: no vectors (empty split)")
    if not np.isfinite(x).all():
        raise FeatureError(f"{name}: features contain NaN or inf")
    return x


def normalised(x: np.ndarray) -> np.ndarray:
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


def default_pq_m(d: int) -> int:
    """PQ sub-quantisers for width ``d``: one byte per 8 dimensions (the largest divisor of ``d`` at most d/8)."""
    return max(m for m in range(1, max(1, d // 8) + 1) if d % m == 0)


def memory_budget() -> int:
    """Bytes an index may hold in RAM by default: half of what the machine has available now."""
    return int(psutil.virtual_memory().available // 2)


def choose_kind(n: int, d: int, budget: int | None = None, hnsw_m: int = 32,
                exact_below: int = EXACT_BELOW) -> tuple[str, str]:
    """``(kind, why)`` for ``n`` vectors of width ``d`` under a memory ``budget`` (bytes; default
    :func:`memory_budget`): exact ``flat`` for small databases, ``hnsw`` (the fastest at high recall on
    CPUs) when its float vectors and graph fit, else the compressed ``ivfpq`` with on-disk re-ranking."""
    budget = memory_budget() if budget is None else int(budget)
    floats = n * d * 4
    graph = int((floats + n * hnsw_m * 2 * 4) * 1.1)
    if n < exact_below:
        return "flat", f"{n} vectors: exact search is fast enough below {exact_below}"
    if graph <= budget:
        return "hnsw", (f"{n} x {d}: HNSW (float vectors + graph, {graph / 2**30:.2f} GiB) fits the "
                        f"{budget / 2**30:.1f} GiB budget")
    return "ivfpq", (f"{n} x {d}: the float vectors ({floats / 2**30:.2f} GiB) do not fit the {budget / 2**30:.1f} "
                     f"GiB budget with a graph; PQ codes ({default_pq_m(d)} bytes per vector) in RAM, exact "
                     "re-ranking from vectors.npy on disk")


def exact_search(database: np.ndarray, queries: np.ndarray, k: int) -> np.ndarray:
    """Exact cosine top-``k``: ``database`` (N, D) (normalised here, chunk by chunk, so a memory-mapped matrix
    is read once), ``queries`` (Q, D) -> database indices (Q, k), best first. The reference every index and
    benchmark is measured against."""
    q = normalised(np.asarray(queries, dtype=np.float32))
    best_s = np.full((len(q), k), -np.inf, dtype=np.float32)
    best_i = np.full((len(q), k), -1, dtype=np.int64)
    for lo in range(0, len(database), CHUNK_ROWS):
        chunk = normalised(np.asarray(database[lo:lo + CHUNK_ROWS], dtype=np.float32))
        s = np.concatenate([best_s, q @ chunk.T], axis=1)
        i = np.concatenate([best_i, np.broadcast_to(np.arange(lo, lo + len(chunk)), (len(q), len(chunk)))], axis=1)
        top = np.argpartition(-s, k - 1, axis=1)[:, :k]
        best_s, best_i = np.take_along_axis(s, top, 1), np.take_along_axis(i, top, 1)
    order = np.argsort(-best_s, axis=1, kind="stable")
    return np.take_along_axis(best_i, order, 1)


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
    exact: np.ndarray | None = None  # ivfpq: the normalised float vectors (N, D) the candidates are re-ranked with

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
              use_gpu: bool | str = "auto", seed: int = 0, recall_target: float | None = None,
              budget: int | None = None, pq_m: int | None = None, rerank: int = 10,
              vectors_path: str | Path | None = None, exact_below: int = EXACT_BELOW) -> "RetrievalIndex":
        """Index ``features`` (N, D) (normalised here in chunks; the caller's array, which may be a memory map,
        is not changed or copied whole).

        Args:
            rows: N clip-index rows, in feature order.
            kind: ``flat`` | ``ivf`` | ``hnsw`` | ``ivfpq`` | ``auto`` (:func:`choose_kind` under ``budget``,
                exact below ``exact_below`` vectors).
            nlist, nprobe: IVF lists and lists probed (defaults :func:`default_nlist`, :func:`default_nprobe`).
            hnsw_m, ef_search, ef_construction: HNSW graph degree and beam widths.
            pq_m, rerank: ivfpq bytes per vector (:func:`default_pq_m`) and candidates re-ranked per neighbour.
            vectors_path: ivfpq: where the normalised float vectors go (a ``.npy`` memory map; None = RAM).
            use_gpu: ``"auto"`` (GPU when faiss has one), True (required) or False.
            seed: IVF k-means seed and calibration sample.
            recall_target: calibrate the search knob to this neighbour R@10 (:meth:`tune`).
        """
        faiss = _faiss()
        n = _count_rows(features, "database")
        if len(rows) != n:
            raise FeatureError(f"database: {n} feature rows but {len(rows)} clip rows")
        d = int(features.shape[1])
        if kind not in CHOICES:
            raise FeatureError(f"index kind must be one of {CHOICES}, got {kind!r}")
        why = None
        if kind == "auto":
            kind, why = choose_kind(n, d, budget, hnsw_m, exact_below)
        params: dict = {}
        if kind == "flat":
            index = faiss.IndexFlatIP(d)
        elif kind in ("ivf", "ivfpq"):
            nlist = int(nlist or default_nlist(n))
            if not 1 <= nlist <= n:
                raise FeatureError(f"{kind}: nlist must be in [1, N={n}], got {nlist}")
            params = {"nlist": nlist, "nprobe": int(min(nprobe or default_nprobe(nlist), nlist))}
            if kind == "ivf":
                index = faiss.IndexIVFFlat(faiss.IndexFlatIP(d), d, nlist, faiss.METRIC_INNER_PRODUCT)
            else:
                pq_m = int(pq_m or default_pq_m(d))
                if d % pq_m:
                    raise FeatureError(f"ivfpq: pq_m={pq_m} must divide the width {d}")
                params.update(pq_m=pq_m, rerank=int(rerank))
                index = faiss.IndexIVFPQ(faiss.IndexFlatIP(d), d, nlist, pq_m, 8, faiss.METRIC_INNER_PRODUCT)
            index.cp.seed = int(seed)
            index.cp.min_points_per_centroid = 1  # small databases: no faiss warning, the caller chose nlist
        else:
            params = {"hnsw_m": int(hnsw_m), "ef_search": int(ef_search), "ef_construction": int(ef_construction)}
            index = faiss.IndexHNSWFlat(d, int(hnsw_m), faiss.METRIC_INNER_PRODUCT)
            index.hnsw.efConstruction = int(ef_construction)
        if why:
            params["why"] = why
        res = _gpu_resources(use_gpu, kind)
        _set_search_params(index, kind, params)
        target = faiss.index_cpu_to_gpu(res, 0, index) if res is not None else index
        if kind in ("ivf", "ivfpq"):  # k-means on an evenly spread sample (64 vectors per list, >= 10k)
            take = np.linspace(0, n - 1, min(n, max(64 * params["nlist"], 10_000))).astype(np.int64)
            target.train(normalised(as_matrix(features[take], "database")))
        exact = None
        if kind == "ivfpq":
            exact = (np.lib.format.open_memmap(vectors_path, mode="w+", dtype=np.float32, shape=(n, d))
                     if vectors_path is not None else np.empty((n, d), dtype=np.float32))
        for lo in range(0, n, CHUNK_ROWS):
            chunk = normalised(as_matrix(features[lo:lo + CHUNK_ROWS], "database"))
            target.add(chunk)
            if exact is not None:
                exact[lo:lo + len(chunk)] = chunk
        if isinstance(exact, np.memmap):
            exact.flush()
        gpu = None
        if res is not None:  # keep a CPU copy for saving and the exact pass
            gpu, index = target, faiss.index_gpu_to_cpu(target)
        out = cls(index, [dict(r) for r in rows], kind, params,
                  search_index=gpu if gpu is not None else index, gpu_resources=res, exact=exact)
        logger.info("retrieval index: %s over %d x %d (%s)%s", kind, n, d, "GPU" if out.on_gpu else "CPU",
                    f" {params}" if params else "")
        if recall_target is not None:
            out.tune(recall_target, seed=seed)
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
        q = normalised(as_matrix(queries, "queries"))
        if q.shape[1] != self.dim:
            raise FeatureError(f"queries are {q.shape[1]}-d, the index is {self.dim}-d")
        if k < 1:
            raise FeatureError(f"k must be >= 1, got {k}")
        k = min(int(k), self.ntotal)
        if self.kind == "hnsw":  # the beam must be at least k wide
            faiss = _faiss()
            beam = faiss.SearchParametersHNSW(efSearch=max(k, int(self.params["ef_search"])))
            scores, ids = self.search_index.search(q, k, params=beam)
        elif self.kind == "ivfpq":
            scores, ids = self._rerank(q, k)
        else:
            scores, ids = self.search_index.search(q, k)
        ids = ids.astype(np.int64, copy=False)
        scores = np.where(ids < 0, -np.inf, scores).astype(np.float32)
        return _sort_hits(scores, ids)

    def _rerank(self, q: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        """ivfpq: the ``rerank x k`` best candidates by their codes, re-ranked by exact inner products with
        the full vectors (read from the memory map only for those candidates, in file order)."""
        wanted = min(self.ntotal, k * int(self.params["rerank"]))
        _, cand = self.search_index.search(q, wanted)
        cand = cand.astype(np.int64, copy=False)
        scores = np.empty((len(q), k), dtype=np.float32)
        ids = np.empty((len(q), k), dtype=np.int64)
        step = max(1, (64 << 20) // (4 * wanted * q.shape[1]))  # ~64 MB of candidate vectors at a time
        for lo in range(0, len(q), step):
            c = cand[lo:lo + step]
            valid = c >= 0
            uniq, inv = np.unique(np.where(valid, c, 0), return_inverse=True)
            vecs = np.asarray(self.exact[uniq], dtype=np.float32)[inv.reshape(c.shape)]  # (b, wanted, D)
            s = np.einsum("bcd,bd->bc", vecs, q[lo:lo + step])
            s[~valid] = -np.inf
            top = np.argsort(-s, axis=1, kind="stable")[:, :k]
            scores[lo:lo + step] = np.take_along_axis(s, top, 1)
            ids[lo:lo + step] = np.where(np.isfinite(scores[lo:lo + step]), np.take_along_axis(c, top, 1), -1)
        return scores, ids

    def apply(self, **knobs) -> None:
        """Set search knobs (``nprobe``, ``ef_search``, ``rerank``) on the index (and its GPU clone)."""
        self.params.update({k: int(v) for k, v in knobs.items()})
        _set_search_params(self.cpu_index, self.kind, self.params)
        if self.search_index is not self.cpu_index and "nprobe" in knobs:
            _faiss().GpuParameterSpace().set_index_parameter(self.search_index, "nprobe", int(knobs["nprobe"]))

    def tune(self, recall_target: float, k: int = 10, queries: int = 500, seed: int = 0) -> dict:
        """Set the search knob to the fastest setting whose neighbour R@``k`` reaches ``recall_target``.

        ``queries`` database vectors drawn at random are searched (their own entry dropped) against their
        exact top ``k`` (computed in chunks). Such queries sit in the index and are found more easily than new
        ones (measured: a held-out query misses about twice as often), so a setting qualifies when its mean
        recall minus 1.5 standard errors reaches the stricter ``1 - (1 - recall_target) / 2``. Every setting
        tried is kept in ``params["frontier"]`` (knobs, recall, queries/s), the choice in
        ``params["calibration"]``. Exact ``flat`` needs no tuning."""
        if not 0 < recall_target <= 1:
            raise FeatureError(f"recall_target must be in (0, 1], got {recall_target}")
        n = self.ntotal
        if self.kind == "flat" or n < 2:
            self.params["calibration"] = {"recall_target": recall_target, "recall": 1.0, "exact": True}
            return self.params["calibration"]
        k = min(k, n - 1)
        pick = np.random.default_rng(seed).choice(n, size=min(queries, n), replace=False)
        q = self._rows(np.sort(pick))
        truth = _exact_top(self, q, k, np.sort(pick))
        name, values = KNOBS[self.kind]
        limit = self.params.get("nlist", max(values))
        settings = [{name: v} for v in values if v <= limit]
        if self.kind == "ivfpq":
            settings = [{**s, "rerank": r} for s in settings for r in RERANKS]
        strict = 1 - (1 - recall_target) / 2
        frontier = []
        for setting in settings:
            self.apply(**setting)
            self.search(q[:8], k + 1)  # warm-up
            t0 = time.perf_counter()
            _, ids = self.search(q, k + 1)
            seconds = time.perf_counter() - t0
            found = [len(set(row[row != own][:k].tolist()) & set(t.tolist())) / k
                     for row, own, t in zip(ids, np.sort(pick), truth)]
            mean = float(np.mean(found))
            low = mean - 1.5 * float(np.std(found)) / np.sqrt(len(found))
            frontier.append({**setting, "recall": mean, "recall_low": low, "qps": len(q) / seconds})
            if self.kind != "ivfpq" and low >= strict:
                break  # costs only grow from here
        good = [f for f in frontier if f["recall_low"] >= strict]
        best = max(good, key=lambda f: f["qps"]) if good else max(frontier, key=lambda f: (f["recall"], f["qps"]))
        knobs = {key: best[key] for key in best if key not in ("recall", "recall_low", "qps")}
        self.apply(**knobs)
        self.params["frontier"] = frontier
        self.params["calibration"] = {"recall_target": recall_target, "calibrated_to": strict, "k": k,
                                      "queries": int(len(q)), "recall": best["recall"], "qps": best["qps"],
                                      "met": bool(good), **knobs}
        (logger.info if good else logger.warning)(
            "retrieval index %s: %s gives neighbour R@%d %.3f on %d calibration queries at %.0f q/s (target %.3f%s)",
            self.kind, ", ".join(f"{a}={b}" for a, b in knobs.items()), k, best["recall"], len(q), best["qps"],
            recall_target, "" if good else ": NOT met, the best setting tried is used")
        return self.params["calibration"]

    def _rows(self, ids: np.ndarray) -> np.ndarray:
        """The normalised vectors of database rows ``ids`` (ascending), float32 (len, D)."""
        if self.exact is not None:
            return np.asarray(self.exact[ids], dtype=np.float32)
        faiss = _faiss()
        if self.kind == "ivf":
            faiss.extract_index_ivf(self.cpu_index).make_direct_map(True)
        return np.stack([self.cpu_index.reconstruct(int(i)) for i in ids]).astype(np.float32)

    def vectors(self, start: int = 0, count: int | None = None) -> np.ndarray:
        """Normalised database vectors ``start .. start + count`` (default all), float32: the full vectors
        (ivfpq: its memory-mapped exact vectors), reconstructed from the CPU index otherwise."""
        count = self.ntotal - start if count is None else min(count, self.ntotal - start)
        if self.exact is not None:
            return np.asarray(self.exact[start:start + count], dtype=np.float32)
        faiss = _faiss()
        if self.kind == "ivf":
            faiss.extract_index_ivf(self.cpu_index).make_direct_map(True)
        return self.cpu_index.reconstruct_n(start, count)

    def save(self, folder: str | Path) -> Path:
        """Write ``folder/index.faiss`` and ``folder/rows.json`` (kind, params, rows), each atomically,
        the JSON last (a folder with both files is complete)."""
        faiss = _faiss()
        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        (folder / META_FILE).unlink(missing_ok=True)  # an old JSON must not vouch for a half-replaced index
        with atomic_path(folder / INDEX_FILE) as tmp:
            faiss.write_index(self.cpu_index, str(tmp))
        if self.exact is not None:  # ivfpq: the re-ranking vectors, written in chunks
            with atomic_path(folder / VECTORS_FILE, suffix=".npy") as tmp:
                out = np.lib.format.open_memmap(tmp, mode="w+", dtype=np.float32, shape=self.exact.shape)
                for lo in range(0, len(out), CHUNK_ROWS):
                    out[lo:lo + CHUNK_ROWS] = self.exact[lo:lo + CHUNK_ROWS]
                out.flush()
                del out
        meta = {"kind": self.kind, "params": self.params, "dim": self.dim, "ntotal": self.ntotal, "rows": self.rows}
        write_atomic(folder / META_FILE, json.dumps(meta))
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
        exact = None
        if meta["kind"] == "ivfpq":
            if not (folder / VECTORS_FILE).exists():
                raise FileNotFoundError(f"{folder}: an ivfpq index needs its re-ranking vectors ({VECTORS_FILE})")
            exact = np.load(folder / VECTORS_FILE, mmap_mode="r")
        res = _gpu_resources(use_gpu, meta["kind"])
        search_index = faiss.index_cpu_to_gpu(res, 0, index) if res is not None else index
        return cls(index, meta["rows"], meta["kind"], meta["params"], search_index, res, exact)


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
    if kind in ("ivf", "ivfpq"):
        faiss.ParameterSpace().set_index_parameter(index, "nprobe", int(params["nprobe"]))
    elif kind == "hnsw":
        faiss.ParameterSpace().set_index_parameter(index, "efSearch", int(params["ef_search"]))


_SAID = {"cpu": False}  # the CPU fallback is said once per process


def _gpu_resources(use_gpu: bool | str, kind: str) -> object:
    """``faiss.StandardGpuResources`` when the index should live on a GPU, else None."""
    faiss = _faiss()
    if use_gpu not in ("auto", True, False):
        raise FeatureError(f"use_gpu must be 'auto', True or False, got {use_gpu!r}")
    has_gpu = hasattr(faiss, "StandardGpuResources") and faiss.get_num_gpus() > 0
    if use_gpu is True and not has_gpu:
        raise FeatureError("use_gpu=True but faiss sees no GPU (install faiss-gpu: pip install 'mgfm[gpu]')")
    if not has_gpu and use_gpu == "auto" and not _SAID["cpu"]:
        _SAID["cpu"] = True
        logger.info("retrieval runs on the CPU: this faiss has %s", "no GPU support (faiss-cpu; the gpu extra "
                    "installs faiss-gpu)" if not hasattr(faiss, "StandardGpuResources") else "no GPU to use")
    if not has_gpu or use_gpu is False:
        return None
    if kind == "hnsw":
        logger.info("faiss has no GPU HNSW: the hnsw index stays on the CPU")
        return None
    return faiss.StandardGpuResources()
