"""Retrieval throughput and quality: our FAISS ``RetrievalIndex`` (flat / IVF / HNSW) vs exact numpy search.

Synthetic clustered features: ``--classes`` classes, each a few sub-modes (``--modes``) around a class
centre in a ``--latent``-d space with Gaussian noise (``--noise``, so classes overlap), lifted to
``--dim`` by a random linear map plus a little isotropic noise (``--ambient``): low intrinsic dimension,
as encoder features have. (``--latent`` = ``--dim`` with large ``--ambient`` gives the hard, near-uniform
case where no approximate index does well.)
The reference is exact cosine search in numpy, measured in the same process with the same thread count:
normalise the queries, ``queries @ database.T`` in chunks, ``argpartition`` for the top k, sort those k.
(The database is normalised once, outside the timing, as every index does at build time.)

For each side: queries/s of ``search(queries, k)`` (median of ``--repeats`` interleaved repeats, the
order rotating each repeat), neighbour recall (fraction of the exact top-k found), and class Recall@k (a
query is a hit if any of its top k has its class). Printed as ratios against numpy: speedup = numpy
time / our time, recall ratio = our class R@k / numpy's. Build times are shown but not compared. Example::

    .venv/bin/python benchmarks/bench_retrieval.py --n 100000 --dim 128 --queries 2000 --threads 2
"""

from __future__ import annotations

import argparse
import logging
import statistics
import time
from typing import Callable

import numpy as np

from mgfm.evaluate.report import format_table
from mgfm.evaluate.retrieval import RetrievalIndex, default_nlist, default_nprobe

log = logging.getLogger("bench_retrieval")


def make_data(n: int, n_queries: int, dim: int, classes: int, modes: int, latent: int, noise: float,
              ambient: float, seed: int) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """``(database (n, dim) float32, labels (n,), queries (n_queries, dim) float32, query labels)``.

    Points live near a ``latent``-d subspace (like encoder features, whose intrinsic dimension is far
    below their width): class centre + sub-mode offset + ``noise`` in the latent space, mapped to ``dim``
    by a random matrix, plus ``ambient`` isotropic noise in all ``dim`` directions.
    """
    rng = np.random.default_rng(seed)
    centres = rng.normal(size=(classes, 1, latent)) + 0.5 * rng.normal(size=(classes, modes, latent))
    lift = rng.normal(size=(latent, dim)) / np.sqrt(latent)

    def draw(count: int) -> tuple[np.ndarray, np.ndarray]:
        y = rng.integers(0, classes, count)
        z = centres[y, rng.integers(0, modes, count)] + noise * rng.normal(size=(count, latent))
        return (z @ lift + ambient * rng.normal(size=(count, dim))).astype(np.float32), y

    x, y = draw(n)
    q, yq = draw(n_queries)
    return x, y, q, yq


def numpy_search(db_unit: np.ndarray, queries: np.ndarray, k: int, chunk_elements: int = 1 << 24) -> np.ndarray:
    """Exact cosine top-k: ``db_unit`` (N, D) unit rows, ``queries`` (Q, D) -> indices (Q, k), best first."""
    q = queries / np.maximum(np.linalg.norm(queries, axis=1, keepdims=True), 1e-12)
    step = max(1, chunk_elements // len(db_unit))
    out = np.empty((len(q), k), dtype=np.int64)
    for lo in range(0, len(q), step):
        s = q[lo:lo + step] @ db_unit.T
        top = np.argpartition(-s, k - 1, axis=1)[:, :k]
        order = np.argsort(-np.take_along_axis(s, top, 1), axis=1)
        out[lo:lo + step] = np.take_along_axis(top, order, 1)
    return out


def class_recall(ids: np.ndarray, db_labels: np.ndarray, q_labels: np.ndarray) -> float:
    """Fraction of queries with a same-class item among ``ids`` (Q, k) (-1 = none)."""
    return float(((ids >= 0) & (db_labels[np.maximum(ids, 0)] == q_labels[:, None])).any(axis=1).mean())


def neighbour_recall(ids: np.ndarray, exact: np.ndarray) -> float:
    """Mean fraction of the exact top-k (Q, k) present in ``ids`` (Q, k)."""
    return float(np.mean([len(set(a.tolist()) & set(b.tolist())) / exact.shape[1] for a, b in zip(ids, exact)]))


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--n", type=int, default=100_000, help="database vectors")
    ap.add_argument("--queries", type=int, default=2000)
    ap.add_argument("--dim", type=int, default=128)
    ap.add_argument("--classes", type=int, default=32)
    ap.add_argument("--modes", type=int, default=4, help="sub-modes per class")
    ap.add_argument("--latent", type=int, default=16, help="intrinsic dimension of the features")
    ap.add_argument("--noise", type=float, default=1.2, help="latent noise std (class centres have std ~1.1)")
    ap.add_argument("--ambient", type=float, default=0.05, help="isotropic noise std in the full width")
    ap.add_argument("--k", type=int, default=10)
    ap.add_argument("--kinds", default="flat,ivf,hnsw")
    ap.add_argument("--nlist", type=int, default=None, help="IVF lists (default ~4 sqrt(n))")
    ap.add_argument("--nprobe", type=int, default=None, help="IVF lists probed (default nlist/16, >= 8)")
    ap.add_argument("--hnsw-m", type=int, default=32)
    ap.add_argument("--ef-search", type=int, default=128)
    ap.add_argument("--ef-construction", type=int, default=40)
    ap.add_argument("--threads", type=int, default=2, help="BLAS and faiss OpenMP threads for every side")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")

    import faiss
    from threadpoolctl import threadpool_limits

    faiss.omp_set_num_threads(args.threads)
    limits = threadpool_limits(limits=args.threads)
    x, y, q, yq = make_data(args.n, args.queries, args.dim, args.classes, args.modes, args.latent, args.noise,
                            args.ambient, args.seed)
    rows = [{"clip_id": str(i), "label": int(label)} for i, label in enumerate(y)]
    db_unit = x / np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-12)

    sides: dict[str, Callable[[], np.ndarray]] = {"numpy": lambda: numpy_search(db_unit, q, args.k)}
    build_s: dict[str, float] = {}
    for kind in args.kinds.split(","):
        t0 = time.perf_counter()
        index = RetrievalIndex.build(x, rows, kind, nlist=args.nlist, nprobe=args.nprobe, hnsw_m=args.hnsw_m,
                                     ef_search=args.ef_search, ef_construction=args.ef_construction,
                                     use_gpu=False, seed=args.seed)
        build_s[kind] = time.perf_counter() - t0
        log.info("built %s in %.1f s %s", kind, build_s[kind], index.params)
        sides[kind] = (lambda idx: lambda: idx.search(q, args.k)[1])(index)

    results = {name: fn() for name, fn in sides.items()}  # warm-up, and the neighbours scored below
    times: dict[str, list[float]] = {name: [] for name in sides}
    names = list(sides)
    for r in range(args.repeats):
        for name in names[r % len(names):] + names[: r % len(names)]:
            t0 = time.perf_counter()
            sides[name]()
            times[name].append(time.perf_counter() - t0)
    limits.restore_original_limits()

    exact = results["numpy"]
    ref_time = statistics.median(times["numpy"])
    ref_recall = class_recall(exact, y, yq)
    out: dict = {"args": vars(args), "build_s": build_s, "sides": {}}
    table = []
    for name in names:
        t = statistics.median(times[name])
        row = {"qps": args.queries / t, "speedup": ref_time / t,
               "neighbour_recall": neighbour_recall(results[name], exact),
               "class_recall": class_recall(results[name], y, yq)}
        row["recall_ratio"] = row["class_recall"] / ref_recall
        out["sides"][name] = row
        table.append([name, round(row["qps"]), row["speedup"], row["neighbour_recall"], row["class_recall"],
                      row["recall_ratio"], build_s.get(name)])
    nlist = args.nlist or default_nlist(args.n)
    print(f"\n{args.n} x {args.dim} database, {args.queries} queries, k={args.k}, {args.classes} classes, "
          f"threads={args.threads}; ivf nlist={nlist} nprobe={min(args.nprobe or default_nprobe(nlist), nlist)}, "
          f"hnsw M={args.hnsw_m} efSearch={args.ef_search} efConstruction={args.ef_construction}")
    print(format_table(["side", "queries/s", "speedup vs numpy", f"neighbour R@{args.k}", f"class R@{args.k}",
                        "class R ratio", "build s"], table, floatfmt=".3f"))
    return out


if __name__ == "__main__":
    main()
