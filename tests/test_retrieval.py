"""FAISS retrieval index and its scores, checked against a brute-force reference written from the definitions."""

from __future__ import annotations

import numpy as np
import pytest

from mgfm.evaluate.featureset import FeatureError
from mgfm.evaluate.retrieval import RetrievalIndex
from mgfm.evaluate.retrieval_metrics import retrieval_metrics

faiss = pytest.importorskip("faiss")
HAS_GPU = hasattr(faiss, "StandardGpuResources") and faiss.get_num_gpus() > 0


def rows_for(labels: np.ndarray) -> list[dict]:
    return [{"clip_id": f"c{i}", "label": int(y)} for i, y in enumerate(labels)]


def brute_force(db: np.ndarray, db_labels: np.ndarray, q: np.ndarray, q_labels: np.ndarray, ks, self_index=None):
    """Per query, the full ranking by (-cosine, database index) in float64 python, then R@k and AP by definition."""
    db = db / np.maximum(np.linalg.norm(db, axis=1, keepdims=True), 1e-300)
    q = q / np.linalg.norm(q, axis=1, keepdims=True)
    recall = {k: [] for k in ks}
    aps = []
    for i in range(len(q)):
        s = db.astype(np.float64) @ q[i].astype(np.float64)
        ranking = sorted((j for j in range(len(db)) if self_index is None or j != self_index[i]),
                         key=lambda j: (-s[j], j))
        rel = [db_labels[j] == q_labels[i] for j in ranking]
        for k in ks:
            recall[k].append(any(rel[:k]))
        if any(rel):
            found, precisions = 0, []
            for pos, r in enumerate(rel, start=1):
                if r:
                    found += 1
                    precisions.append(found / pos)
            aps.append(sum(precisions) / len(precisions))
    return {k: float(np.mean(v)) for k, v in recall.items()}, float(np.mean(aps)), len(q) - len(aps)


def tied_data(seed: int = 0):
    """A database with exact ties: duplicated one-hot vectors (cosine = one query component, exactly, in any
    precision) plus a few general vectors; 3 classes plus unlabelled items; positive queries."""
    rng = np.random.default_rng(seed)
    d = 6
    one_hot = np.eye(d, dtype=np.float32)[rng.integers(0, d, size=40)] * rng.uniform(0.5, 2.0, size=(40, 1))
    general = rng.normal(size=(10, d)).astype(np.float32)
    db = np.concatenate([one_hot, general]).astype(np.float32)
    db_labels = rng.integers(-1, 3, size=len(db))
    q = np.abs(rng.normal(size=(15, d))).astype(np.float32)
    q_labels = rng.integers(0, 4, size=len(q))  # class 3 has no database item
    return db, db_labels, q, q_labels


def test_exact_scores_match_brute_force_with_ties():
    db, db_labels, q, q_labels = tied_data()
    index = RetrievalIndex.build(db, rows_for(db_labels), kind="flat", use_gpu=False)
    ks = (1, 3, 10, 100)
    want_recall, want_map, n_missing = brute_force(db, db_labels, q, q_labels, ks)
    assert n_missing > 0  # some queries have no positive
    for chunk in (1 << 21, 7):  # one chunk and many small ones
        m = retrieval_metrics(index, q, q_labels, ks=ks, chunk_elements=chunk)
        assert m["exact_recall"] == {str(k): pytest.approx(want_recall[k]) for k in ks}
        assert m["map"] == pytest.approx(want_map)
        assert m["n_queries_without_positive"] == n_missing
        assert (m["n_queries"], m["n_database"], m["kind"]) == (15, 50, "flat")


def test_leave_one_out_matches_brute_force():
    db, db_labels, _, _ = tied_data(seed=1)
    labelled = np.nonzero(db_labels >= 0)[0]
    index = RetrievalIndex.build(db, rows_for(db_labels), kind="flat", use_gpu=False)
    ks = (1, 5)
    want_recall, want_map, _ = brute_force(db, db_labels, db[labelled], db_labels[labelled], ks, self_index=labelled)
    m = retrieval_metrics(index, db[labelled], db_labels[labelled], ks=ks, self_index=labelled, chunk_elements=64)
    assert m["exact_recall"] == {str(k): pytest.approx(want_recall[k]) for k in ks}
    assert m["map"] == pytest.approx(want_map)


def test_leave_one_out_through_the_index():
    rng = np.random.default_rng(8)
    db, labels = rng.normal(size=(120, 8)).astype(np.float32), rng.integers(0, 4, 120)  # no ties
    index = RetrievalIndex.build(db, rows_for(labels), use_gpu=False)
    queries = np.arange(0, 120, 3)
    ks = (1, 5)
    want_recall, want_map, _ = brute_force(db, labels, db[queries], labels[queries], ks, self_index=queries)
    m = retrieval_metrics(index, db[queries], labels[queries], ks=ks, self_index=queries)
    assert m["recall"] == {str(k): pytest.approx(want_recall[k]) for k in ks} == m["exact_recall"]
    assert m["map"] == pytest.approx(want_map)
    no_self = retrieval_metrics(index, db[queries], labels[queries], ks=ks, with_map=False)
    assert no_self["recall"]["1"] == 1.0  # each query finds itself first when not excluded


def test_index_recall_matches_brute_force_without_ties():
    rng = np.random.default_rng(2)
    db, q = rng.normal(size=(300, 16)).astype(np.float32), rng.normal(size=(40, 16)).astype(np.float32)
    db_labels, q_labels = rng.integers(0, 5, 300), rng.integers(0, 5, 40)
    index = RetrievalIndex.build(db, rows_for(db_labels), use_gpu=False)
    ks = (1, 5, 10, 1000)  # 1000 > N: clipped
    want_recall, want_map, _ = brute_force(db, db_labels, q, q_labels, ks)
    m = retrieval_metrics(index, q, q_labels, ks=ks)
    assert m["recall"] == {str(k): pytest.approx(want_recall[k]) for k in ks}
    assert m["recall"] == m["exact_recall"] and m["recall"]["1000"] == 1.0
    assert m["map"] == pytest.approx(want_map)


def test_search_order_and_clipping():
    db, db_labels, q, _ = tied_data()
    index = RetrievalIndex.build(db, rows_for(db_labels), use_gpu=False)
    scores, ids = index.search(q, 100)
    assert scores.shape == ids.shape == (len(q), len(db)) and scores.dtype == np.float32 and ids.dtype == np.int64
    qn = q / np.linalg.norm(q, axis=1, keepdims=True)
    dbn = db / np.linalg.norm(db, axis=1, keepdims=True)
    want = [sorted(range(len(db)), key=lambda j: (-float(dbn[j] @ qn[i]), j)) for i in range(len(q))]
    for i in range(len(q)):  # ties (duplicated one-hots) come out by ascending index
        tied = [j for j in range(len(db)) if j < 40]
        assert [j for j in ids[i] if j in tied] == [j for j in want[i] if j in tied]
    np.testing.assert_allclose(scores, np.take_along_axis(qn @ dbn.T, ids, 1), atol=1e-6)


def clustered(n: int, n_queries: int, classes: int, dim: int, seed: int):
    rng = np.random.default_rng(seed)
    centres = rng.normal(size=(classes, dim))
    y, yq = rng.integers(0, classes, n), rng.integers(0, classes, n_queries)
    x = (centres[y] + 0.6 * rng.normal(size=(n, dim))).astype(np.float32)
    q = (centres[yq] + 0.6 * rng.normal(size=(n_queries, dim))).astype(np.float32)
    return x, y, q, yq


@pytest.mark.parametrize("kind, kw", [("ivf", {"nlist": 32, "nprobe": 4}), ("hnsw", {"hnsw_m": 16, "ef_search": 64})])
def test_approximate_close_to_flat(kind, kw):
    x, y, q, yq = clustered(3000, 200, 8, 24, seed=3)
    flat = RetrievalIndex.build(x, rows_for(y), "flat", use_gpu=False)
    approx = RetrievalIndex.build(x, rows_for(y), kind, use_gpu=False, **kw)
    _, exact_ids = flat.search(q, 10)
    _, ids = approx.search(q, 10)
    overlap = np.mean([len(set(a) & set(b)) / 10 for a, b in zip(exact_ids, ids)])
    assert overlap >= 0.9
    mf, ma = retrieval_metrics(flat, q, yq, with_map=False), retrieval_metrics(approx, q, yq)
    for k in ("1", "5", "10"):
        assert abs(ma["recall"][k] - mf["recall"][k]) <= 0.03
    assert ma["exact_recall"]["10"] == pytest.approx(mf["recall"]["10"], abs=0.01)
    assert approx.params == {"ivf": {"nlist": 32, "nprobe": 4},
                             "hnsw": {"hnsw_m": 16, "ef_search": 64, "ef_construction": 40}}[kind]


@pytest.mark.parametrize("kind", ["flat", "ivf", "hnsw"])
def test_save_load_identical(tmp_path, kind):
    x, y, q, _ = clustered(500, 30, 4, 12, seed=4)
    index = RetrievalIndex.build(x, rows_for(y), kind, nlist=8, nprobe=2, use_gpu=False)
    index.save(tmp_path / "idx")
    assert sorted(p.name for p in (tmp_path / "idx").iterdir()) == ["index.faiss", "rows.json"]
    loaded = RetrievalIndex.load(tmp_path / "idx", use_gpu=False)
    assert (loaded.kind, loaded.params, loaded.rows, loaded.dim, loaded.ntotal) == (
        index.kind, index.params, index.rows, 12, 500)
    for a, b in zip(index.search(q, 7), loaded.search(q, 7)):
        np.testing.assert_array_equal(a, b)
    np.testing.assert_array_equal(loaded.vectors(), index.vectors())
    np.testing.assert_array_equal(loaded.labels, y)


def test_load_errors(tmp_path):
    x, y, _, _ = clustered(50, 1, 2, 4, seed=5)
    with pytest.raises(FileNotFoundError, match="no complete retrieval index"):
        RetrievalIndex.load(tmp_path)
    RetrievalIndex.build(x, rows_for(y), use_gpu=False).save(tmp_path / "a")
    RetrievalIndex.build(x[:20], rows_for(y[:20]), use_gpu=False).save(tmp_path / "b")
    (tmp_path / "b" / "rows.json").replace(tmp_path / "a" / "rows.json")  # a stale mix
    with pytest.raises(FeatureError, match="holds 50 x 4"):
        RetrievalIndex.load(tmp_path / "a")


def test_bad_input_is_one_line_error():
    x, y, q, yq = clustered(50, 5, 2, 4, seed=6)
    index = RetrievalIndex.build(x, rows_for(y), use_gpu=False)
    cases = [
        (lambda: RetrievalIndex.build(x[:0], [], use_gpu=False), "database: no vectors"),
        (lambda: RetrievalIndex.build(x, rows_for(y)[:3], use_gpu=False), "50 feature rows but 3 clip rows"),
        (lambda: RetrievalIndex.build(x, rows_for(y), kind="lsh", use_gpu=False), "index kind"),
        (lambda: RetrievalIndex.build(x, rows_for(y), kind="ivf", nlist=100, use_gpu=False), "nlist"),
        (lambda: index.search(q[:0], 3), "queries: no vectors"),
        (lambda: index.search(q[:, :3], 3), "queries are 3-d, the index is 4-d"),
        (lambda: retrieval_metrics(index, q[:, :3], yq), "queries are 3-d"),
        (lambda: retrieval_metrics(index, q, yq[:2]), "query labels"),
        (lambda: retrieval_metrics(index, q, np.full(5, -1)), "unlabelled"),
        (lambda: retrieval_metrics(index, q, yq, ks=()), "ks"),
        (lambda: RetrievalIndex.build(np.full((3, 4), np.inf), rows_for(y[:3]), use_gpu=False), "NaN or inf"),
    ]
    if not HAS_GPU:
        cases.append((lambda: RetrievalIndex.build(x, rows_for(y), use_gpu=True), "sees no GPU"))
    for call, match in cases:
        with pytest.raises(FeatureError, match=match) as err:
            call()
        assert "\n" not in str(err.value)


@pytest.mark.skipif(not HAS_GPU, reason="faiss without GPU support")
@pytest.mark.parametrize("kind", ["flat", "ivf"])
def test_gpu_index_matches_cpu(tmp_path, kind):
    x, y, q, _ = clustered(2000, 50, 4, 16, seed=7)
    cpu = RetrievalIndex.build(x, rows_for(y), kind, nlist=16, nprobe=16, use_gpu=False)
    gpu = RetrievalIndex.build(x, rows_for(y), kind, nlist=16, nprobe=16, use_gpu=True)
    assert gpu.on_gpu and not cpu.on_gpu
    _, a = cpu.search(q, 5)
    _, b = gpu.search(q, 5)
    assert np.mean(a == b) > 0.95
    gpu.save(tmp_path / "g")
    _, c = RetrievalIndex.load(tmp_path / "g", use_gpu=False).search(q, 5)
    assert np.mean(c == b) > 0.95


def test_missing_faiss_is_one_line_naming_the_extras(monkeypatch):
    import sys

    monkeypatch.setitem(sys.modules, "faiss", None)  # what a base install without the cpu/gpu extra has
    with pytest.raises(FeatureError, match=r"faiss is not installed: pip install -e '\.\[cpu\]'"):
        RetrievalIndex.build(np.eye(3, dtype=np.float32), [{"clip_id": str(i)} for i in range(3)])


# ------------------------------------------------------------------------------------- at scale


def structured(n: int, q: int, dim: int = 32, latent: int = 8, spread: float = 0.6,
               seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Database and queries in 64 clusters near a ``latent``-d subspace (like encoder features)."""
    rng = np.random.default_rng(seed)
    centres = rng.normal(size=(64, latent))
    lift = rng.normal(size=(latent, dim))

    def draw(m: int) -> np.ndarray:
        z = centres[rng.integers(0, 64, m)] + spread * rng.normal(size=(m, latent))
        return (z @ lift + 0.05 * rng.normal(size=(m, dim))).astype(np.float32)
    return draw(n), draw(q)


def exact_top(db: np.ndarray, q: np.ndarray, k: int) -> np.ndarray:
    dn = db / np.linalg.norm(db, axis=1, keepdims=True)
    qn = q / np.linalg.norm(q, axis=1, keepdims=True)
    return np.argsort(-(qn @ dn.T), axis=1, kind="stable")[:, :k]


def test_kind_is_chosen_from_size_width_and_memory():
    from mgfm.evaluate.retrieval import choose_kind

    assert choose_kind(10_000, 384, budget=1 << 30)[0] == "flat"
    kind, why = choose_kind(1_000_000, 384, budget=8 << 30)
    assert kind == "hnsw" and "fits the 8.0 GiB budget" in why
    kind, why = choose_kind(1_000_000, 384, budget=1 << 30)
    assert kind == "ivfpq" and "do not fit" in why and "48 bytes per vector" in why


def test_automatic_choice_meets_its_recall_target_on_held_out_queries():
    # clusters in a 32-d latent space: hard enough that a sparse graph (M=8) needs a wide beam for the target
    db, q = structured(12_000, 300, dim=32, latent=32, spread=1.0)
    rows = [{"clip_id": str(i), "label": 0} for i in range(len(db))]
    index = RetrievalIndex.build(db, rows, "auto", recall_target=0.99, exact_below=5_000, hnsw_m=8, use_gpu=False)
    assert index.kind == "hnsw" and "fits" in index.params["why"]
    calib = index.params["calibration"]
    assert calib["met"] and calib["recall"] >= 0.99 and calib["ef_search"] == index.params["ef_search"]
    frontier = index.params["frontier"]
    assert [f["ef_search"] for f in frontier] == sorted(f["ef_search"] for f in frontier)
    assert len(frontier) >= 2 and frontier[0]["recall"] < 0.99 <= frontier[-1]["recall"]  # the cheapest that meets it
    _, ids = index.search(q, 10)
    truth = exact_top(db, q, 10)
    recall = np.mean([len(set(a) & set(b)) / 10 for a, b in zip(ids.tolist(), truth.tolist())])
    assert recall >= 0.98, recall  # the target, held out (calibration ran on database vectors)


def test_compressed_index_reranks_exactly_and_reloads_with_the_same_neighbours(tmp_path):
    db, q = structured(6_000, 200, dim=64, seed=1)
    rows = [{"clip_id": str(i), "label": 0} for i in range(len(db))]
    index = RetrievalIndex.build(db, rows, "ivfpq", nlist=32, nprobe=32, rerank=50, use_gpu=False,
                                 vectors_path=tmp_path / "v.npy")
    assert index.params["pq_m"] == 8 and isinstance(index.exact, np.memmap)
    scores, ids = index.search(q, 10)
    dn = db / np.linalg.norm(db, axis=1, keepdims=True)
    qn = q / np.linalg.norm(q, axis=1, keepdims=True)
    # scores are the exact cosines of the returned vectors, best first
    np.testing.assert_allclose(scores, np.take_along_axis(qn @ dn.T, ids, 1), rtol=1e-5, atol=1e-6)
    assert np.all(np.diff(scores, axis=1) <= 1e-7)
    # every list searched and 500 candidates per query: the exact top 10
    np.testing.assert_array_equal(ids, exact_top(db, q, 10))
    index.save(tmp_path / "saved")
    loaded = RetrievalIndex.load(tmp_path / "saved", use_gpu=False)
    assert loaded.kind == "ivfpq" and isinstance(loaded.exact, np.memmap)
    np.testing.assert_array_equal(loaded.search(q, 10)[1], ids)
    tuned = index.tune(0.97)
    assert tuned["met"] and {"nprobe", "rerank"} <= set(tuned)


def test_an_index_is_built_from_a_memory_map_in_chunks(tmp_path, monkeypatch):
    import mgfm.evaluate.retrieval as retrieval

    db, q = structured(3_000, 50)
    path = tmp_path / "features.npy"
    np.save(path, db)
    monkeypatch.setattr(retrieval, "CHUNK_ROWS", 1_000)  # three chunks
    mapped = RetrievalIndex.build(np.load(path, mmap_mode="r"), [{"label": 0}] * len(db), "hnsw", use_gpu=False)
    in_ram = RetrievalIndex.build(db, [{"label": 0}] * len(db), "flat", use_gpu=False)
    assert mapped.ntotal == 3_000
    np.testing.assert_allclose(mapped.vectors(), in_ram.vectors(), rtol=1e-6)


def test_a_cached_feature_matrix_is_memory_mapped_not_read_whole(tmp_path):
    from mgfm.evaluate.featureset import FeatureSet

    x = np.random.default_rng(0).normal(size=(40, 8)).astype(np.float32)
    FeatureSet(x, [{"clip_id": str(i), "label": i % 2} for i in range(40)], {"k": 1}).save(tmp_path / "c")
    loaded = FeatureSet.load(tmp_path / "c")
    assert isinstance(loaded.features.base, np.memmap) and not loaded.features.flags.writeable
    np.testing.assert_array_equal(loaded.features, x)
    index = RetrievalIndex.build(loaded.features, loaded.rows, "flat", use_gpu=False)
    assert index.ntotal == 40
