"""Retrieval at scale: our ``RetrievalIndex`` (flat / IVF / HNSW / compressed IVF-PQ, or ``auto``) vs exact
numpy search, with the search knob calibrated to a recall target.

Synthetic clustered features: ``--classes`` classes, each a few sub-modes (``--modes``) around a class
centre in a ``--latent``-d space with Gaussian noise (``--noise``, so classes overlap), lifted to
``--dim`` by a random linear map plus a little isotropic noise (``--ambient``): low intrinsic dimension,
as encoder features have. (``--latent`` = ``--dim`` with large ``--ambient`` gives the hard, near-uniform
case where no approximate index does well.) The database is written in chunks to a memory-mapped ``.npy``
in ``--workdir`` (a temporary folder by default), so a million vectors never sit in RAM twice; indexes are
built from that memory map chunk by chunk.

The reference is exact cosine search in numpy, measured in the same process with the same thread count:
normalise the queries, ``queries @ database.T`` over chunks of the database with a running top k.
Each index kind is built with ``recall_target`` (its knob calibrated on database vectors, the recall /
speed frontier printed), saved, reloaded (same neighbours checked) and timed; reported per side: build
seconds, index bytes on disk (a compressed index's re-ranking vectors separately), peak RSS so far,
queries/s (median of ``--repeats`` interleaved repeats), speedup = numpy time / our time, neighbour R@k
(the exact top k found) and class R@k. Examples::

    .venv/bin/python benchmarks/bench_retrieval.py --n 100000 --dim 128 --queries 2000 --threads 2
    .venv/bin/python benchmarks/bench_retrieval.py --n 1000000 --dim 384 --queries 1000 --kinds auto
    .venv/bin/python benchmarks/bench_retrieval.py --n 1000000 --dim 384 --queries 1000 --kinds ivfpq
"""

from __future__ import annotations

import argparse
import logging
import resource
import statistics
import tempfile
import time
from pathlib import Path
from typing import Callable

import numpy as np

from mgfm.report import format_table
from mgfm.evaluate.retrieval import CHUNK_ROWS, RetrievalIndex, exact_search

log = logging.getLogger("bench_retrieval")


def make_data(n: int, n_queries: int, dim: int, classes: int, modes: int, latent: int, noise: float,
              ambient: float, seed: int, path: Path | None = None) -> tuple[np.ndarray, np.ndarray, np.ndarray,
                                                                            np.ndarray]:
    """``(database (n, dim) float32, labels (n,), queries (n_queries, dim) float32, query labels)``; the
    database a memory map at ``path`` when given, drawn in chunks.

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

    if path is None:
        x, y = draw(n)
    else:
        x = np.lib.format.open_memmap(path, mode="w+", dtype=np.float32, shape=(n, dim))
        y = np.empty(n, dtype=np.int64)
        for lo in range(0, n, CHUNK_ROWS):
            x[lo:lo + CHUNK_ROWS], y[lo:lo + CHUNK_ROWS] = draw(min(CHUNK_ROWS, n - lo))
        x.flush()
    q, yq = draw(n_queries)
    return x, y, q, yq


def class_recall(ids: np.ndarray, db_labels: np.ndarray, q_labels: np.ndarray) -> float:
    """Fraction of queries with a same-class item among ``ids`` (Q, k) (-1 = none)."""
    return float(((ids >= 0) & (db_labels[np.maximum(ids, 0)] == q_labels[:, None])).any(axis=1).mean())


def neighbour_recall(ids: np.ndarray, exact: np.ndarray) -> float:
    """Mean fraction of the exact top-k (Q, k) present in ``ids`` (Q, k)."""
    return float(np.mean([len(set(a.tolist()) & set(b.tolist())) / exact.shape[1] for a, b in zip(ids, exact)]))


def peak_rss_gib() -> float:
    """This process's peak resident memory so far, GiB."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20


def folder_bytes(folder: Path, name: str) -> int:
    path = folder / name
    return path.stat().st_size if path.exists() else 0


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
    ap.add_argument("--kinds", default="flat,ivf,hnsw,auto", help="any of flat, ivf, hnsw, ivfpq, auto")
    ap.add_argument("--recall-target", type=float, default=0.99, help="neighbour R@k the knobs are tuned to")
    ap.add_argument("--memory-gb", type=float, default=None, help="index memory budget of auto")
    ap.add_argument("--hnsw-m", type=int, default=32)
    ap.add_argument("--ef-construction", type=int, default=40)
    ap.add_argument("--threads", type=int, default=2, help="BLAS and faiss OpenMP threads for every side")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--workdir", type=Path, default=None, help="where the database memory map and indexes go")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")

    import faiss
    from threadpoolctl import threadpool_limits

    faiss.omp_set_num_threads(args.threads)
    limits = threadpool_limits(limits=args.threads)
    work = args.workdir or Path(tempfile.mkdtemp(prefix="bench_retrieval_"))
    work.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    x, y, q, yq = make_data(args.n, args.queries, args.dim, args.classes, args.modes, args.latent, args.noise,
                            args.ambient, args.seed, work / "database.npy")
    log.info("database %d x %d written to %s in %.1f s", args.n, args.dim, work, time.perf_counter() - t0)
    rows = [{"label": int(label)} for label in y]
    budget = None if args.memory_gb is None else int(args.memory_gb * 2**30)

    sides: dict[str, Callable[[], np.ndarray]] = {"numpy": lambda: exact_search(x, q, args.k)}
    info: dict[str, dict] = {"numpy": {}}
    frontiers: dict[str, list] = {}
    for kind in args.kinds.split(","):
        t0 = time.perf_counter()
        index = RetrievalIndex.build(x, rows, kind, hnsw_m=args.hnsw_m, ef_construction=args.ef_construction,
                                     use_gpu=False, seed=args.seed, recall_target=args.recall_target,
                                     budget=budget, vectors_path=work / f"{kind}.vectors.npy")
        build_s = time.perf_counter() - t0
        folder = index.save(work / f"index-{kind}")
        loaded = RetrievalIndex.load(folder, use_gpu=False)
        same = bool(np.array_equal(index.search(q[:100], args.k)[1], loaded.search(q[:100], args.k)[1]))
        name = kind if kind != "auto" else f"auto ({index.kind})"
        info[name] = {"build_s": build_s, "index_bytes": folder_bytes(folder, "index.faiss"),
                      "vectors_bytes": folder_bytes(folder, "vectors.npy"), "peak_rss_gib": peak_rss_gib(),
                      "reload_same": same, "params": {k: v for k, v in index.params.items() if k != "frontier"}}
        frontiers[name] = index.params.get("frontier", [])
        log.info("built %s in %.1f s, %.1f MB, reloaded with the same neighbours: %s", name, build_s,
                 info[name]["index_bytes"] / 1e6, same)
        sides[name] = (lambda idx: lambda: idx.search(q, args.k)[1])(loaded)

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
    out: dict = {"args": {k: str(v) for k, v in vars(args).items()}, "sides": {}, "frontiers": frontiers}
    table = []
    for name in names:
        t = statistics.median(times[name])
        row = {"qps": args.queries / t, "speedup": ref_time / t, "neighbour_recall": neighbour_recall(results[name], exact),
               "class_recall": class_recall(results[name], y, yq), **info[name]}
        out["sides"][name] = row
        knobs = row.get("params", {}).get("calibration", {})
        table.append([name, ", ".join(f"{k}={v}" for k, v in knobs.items() if k in ("nprobe", "ef_search", "rerank")),
                      round(row["qps"]), row["speedup"], row["neighbour_recall"], row["class_recall"],
                      row.get("build_s"), (row.get("index_bytes", 0) or 0) / 1e6, (row.get("vectors_bytes", 0) or 0) / 1e6,
                      row.get("peak_rss_gib"), row.get("reload_same")])
    print(f"\n{args.n} x {args.dim} database, {args.queries} queries, k={args.k}, {args.classes} classes, "
          f"latent {args.latent}, threads={args.threads}, recall target {args.recall_target} (calibrated on database "
          f"vectors; the recalls below are on the held-out queries)")
    print(format_table(["side", "tuned knobs", "queries/s", "speedup vs numpy", f"neighbour R@{args.k}",
                        f"class R@{args.k}", "build s", "index MB", "re-rank vectors MB", "peak RSS GiB",
                        "reload same"], table, floatfmt=".3f"))
    for name, frontier in frontiers.items():
        if frontier:
            keys = [k for k in frontier[0] if k not in ("recall", "recall_low", "qps")]
            print(f"\nfrontier of {name} (calibration queries):")
            print(format_table([*keys, f"neighbour R@{args.k}", "queries/s"],
                               [[*(f[k] for k in keys), f["recall"], round(f["qps"])] for f in frontier],
                               floatfmt=".4f"))
    return out


if __name__ == "__main__":
    main()
