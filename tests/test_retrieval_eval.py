"""eval/retrieval.py and mgfm.evaluate.retrieval_eval on tiny shards with a tiny random encoder: report vs a
brute-force computation on the cached features, index save/reload, query-by-video (own clip first, montage),
the eval-clip preprocessing vs the stream, and one-line errors with exit code 2 from the entry script."""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
import subprocess
import sys
import tarfile
from pathlib import Path

import numpy as np
import pytest
import torch

from mgfm.config import RecipeError, load_recipe
from mgfm.sources.clip_index import ClipIndex
from mgfm.data.stream import make_loader
from mgfm.evaluate.featureset import FeatureSet
from mgfm.evaluate.encoder_eval import stream_for
from mgfm.evaluate.retrieval import RetrievalIndex
from mgfm.evaluate.retrieval_eval import (KEY_FILE, RetrievalRecipe, check_same_search, eval_clip, query_video,
                                          read_shard_clips, run)
from mgfm.model.hf import save_encoder_hf
from mgfm.model.encoder import ModelConfig, build_encoder

REPO = Path(__file__).resolve().parents[1]
PROG = "eval/retrieval.py"


def tiny_encoder(folder: Path, dim: int = 32, seed: int = 1) -> Path:
    torch.manual_seed(seed)  # not the reference row's seed (0), so the random-init row is another encoder
    cfg = ModelConfig(size="custom", img_size=32, frames=4, dim=dim, depth=1, heads=2, decoder_dim=16,
                      decoder_depth=1, decoder_heads=1)
    save_encoder_hf(build_encoder(cfg), folder)
    return folder


def recipe(run_dir: Path, shards: Path, *overrides: str) -> RetrievalRecipe:
    return load_recipe(RetrievalRecipe, None, [f"run={run_dir}", f"shards={shards}", "stream.num_workers=0", "stream.batch_size=4",
                                               *overrides])


@pytest.fixture(scope="module")
def evaluated(tiny_shards, tmp_path_factory):
    """(run dir, report) of a full evaluation of a tiny encoder on the tiny shards."""
    run_dir = tmp_path_factory.mktemp("retrieval_runs") / "tiny"
    tiny_encoder(run_dir / "encoder")
    report = run(recipe(run_dir, tiny_shards))
    return run_dir, report


def _brute_force(db: FeatureSet, queries: FeatureSet, ks) -> tuple[dict, float]:
    """Recall@k and mAP by sorting every cosine similarity (ties by database index)."""
    unit = lambda x: x / np.linalg.norm(x, axis=1, keepdims=True)  # noqa: E731
    queries = queries.labelled()
    sims = unit(queries.features.astype(np.float64)) @ unit(db.features.astype(np.float64)).T
    order = np.argsort(-sims, axis=1, kind="stable")
    rel = db.labels[order] == queries.labels[:, None]
    recall = {str(k): float(rel[:, :k].any(axis=1).mean()) for k in ks}
    aps = []
    for row in rel:
        hits = np.nonzero(row)[0]
        if len(hits):
            aps.append(np.mean([(j + 1) / (rank + 1) for j, rank in enumerate(hits)]))
    return recall, float(np.mean(aps))


def test_report_matches_brute_force_on_cached_features(evaluated, tiny_shards):
    run_dir, report = evaluated
    out = run_dir / "retrieval" / tiny_shards.name
    on_disk = json.loads((out / "report.json").read_text())
    assert on_disk["results"].keys() == report["results"].keys() == {"pretrained", "random init", "raw pixels"}
    assert "| pretrained |" in (out / "report.md").read_text()
    assert on_disk["selfcheck"] == {"queries": 6, "k": 6, "identical": True}
    for name, result in on_disk["results"].items():
        db = FeatureSet.load(result["features"]["train"])
        queries = FeatureSet.load(result["features"]["test"])
        assert (len(db), len(queries)) == (result["n_database"], result["n_queries"]) == (6, 6)
        recall, mean_ap = _brute_force(db, queries, on_disk["ks"])
        assert result["recall"] == recall, name
        assert result["map"] == pytest.approx(mean_ap, abs=1e-6), name
    # the reference rows are really other encoders
    pretrained = FeatureSet.load(on_disk["results"]["pretrained"]["features"]["test"]).features
    random_init = FeatureSet.load(on_disk["results"]["random init"]["features"]["test"]).features
    assert not np.allclose(pretrained, random_init)


def test_saved_index_reloads_and_searches_like_brute_force(evaluated, tiny_shards):
    run_dir, report = evaluated
    folder = Path(report["index"]["folder"])
    assert folder == run_dir / "retrieval" / tiny_shards.name / "index"
    assert (folder / KEY_FILE).exists()
    index = RetrievalIndex.load(folder, use_gpu=False)
    db = FeatureSet.load(report["results"]["pretrained"]["features"]["train"])
    queries = FeatureSet.load(report["results"]["pretrained"]["features"]["test"])
    assert [r["clip_id"] for r in index.rows] == db.clip_ids and index.dim == 32
    scores, ids = index.search(queries.features, 3)
    unit = lambda x: x / np.linalg.norm(x, axis=1, keepdims=True)  # noqa: E731
    sims = unit(queries.features) @ unit(db.features).T
    np.testing.assert_array_equal(ids, np.argsort(-sims, axis=1, kind="stable")[:, :3])
    np.testing.assert_allclose(scores, np.sort(sims, axis=1)[:, ::-1][:, :3], atol=1e-5)
    # the self-check can fail: an index over other vectors does not search like the saved one
    other = RetrievalIndex.build(db.features[::-1].copy(), db.rows[::-1], use_gpu=False)
    with pytest.raises(RuntimeError, match="does not search like"):
        check_same_search(index, other, queries.features, 3)


def test_eval_clip_prepares_a_clip_exactly_like_the_stream(evaluated, tiny_shards):
    run_dir, _ = evaluated
    cfg = stream_for(ModelConfig(size="custom", img_size=32, frames=4, dim=32, depth=1, heads=2, decoder_dim=16,
                                 decoder_depth=1, decoder_heads=1), recipe(run_dir, tiny_shards))
    loader, _ = make_loader(tiny_shards, "train", cfg, mode="eval")
    batches = list(loader)
    ids = [c for b in batches for c in b["clip_id"]]
    mp4s = read_shard_clips(str(tiny_shards), "train", ids)
    assert sorted(mp4s) == sorted(ids)
    for batch in batches:
        for clip_id, video in zip(batch["clip_id"], batch["video"]):
            frames, mine = eval_clip(mp4s[clip_id], cfg)
            assert frames.shape == (4, 32, 32, 3) and frames.dtype == np.uint8
            np.testing.assert_allclose(mine, video.numpy(), atol=1e-6)


def _clip_file(shards: Path, clip_id: str, dest: Path) -> Path:
    for shard in sorted(shards.glob("train-*.tar")):
        with tarfile.open(shard) as tar:
            if f"{clip_id}.mp4" in tar.getnames():
                dest.write_bytes(tar.extractfile(f"{clip_id}.mp4").read())
                return dest
    raise AssertionError(f"{clip_id} not in the train shards")


def test_query_finds_its_own_clip_first_and_draws_a_montage(evaluated, tiny_shards, tmp_path, capsys):
    run_dir, report = evaluated
    index_folder = Path(report["index"]["folder"])
    key_mtime = (index_folder / KEY_FILE).stat().st_mtime_ns
    db = FeatureSet.load(report["results"]["pretrained"]["features"]["train"])
    for clip_id in (db.clip_ids[1], db.clip_ids[4]):
        query = _clip_file(tiny_shards, clip_id, tmp_path / f"{clip_id}.mp4")
        montage = tmp_path / f"{clip_id}.png"
        result = query_video(recipe(run_dir, tiny_shards, f"query={query}", "k=3", f"montage={montage}"))
        top = result["neighbours"][0]
        assert top["clip_id"] == clip_id and top["score"] == pytest.approx(1.0, abs=1e-5)
        assert [n["rank"] for n in result["neighbours"]] == [1, 2, 3]
        assert all(n["score"] < 1 - 1e-4 for n in result["neighbours"][1:])
        assert montage.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and montage.stat().st_size > 5000
    printed = capsys.readouterr().out
    assert db.clip_ids[1] in printed and "cosine" in printed
    assert (index_folder / KEY_FILE).stat().st_mtime_ns == key_mtime  # the saved index was used, not rebuilt


def test_query_rebuilds_a_stale_index(evaluated, tiny_shards, tmp_path):
    run_dir, _ = evaluated
    db_clip = "v1_0000010_0000023"
    query = _clip_file(tiny_shards, db_clip, tmp_path / "q.mp4")
    out = tmp_path / "out"
    result = query_video(recipe(run_dir, tiny_shards, f"query={query}", f"out={out}", "index=hnsw", "k=2"))
    assert result["index"]["kind"] == "hnsw" and result["neighbours"][0]["clip_id"] == db_clip
    assert json.loads((out / "index" / KEY_FILE).read_text())["index"]["kind"] == "hnsw"


def test_recipe_validation():
    with pytest.raises(RecipeError, match="index must be one of"):
        load_recipe(RetrievalRecipe, None, ["index=annoy"])
    with pytest.raises(RecipeError, match="use_gpu"):
        load_recipe(RetrievalRecipe, None, ["use_gpu=maybe"])
    assert load_recipe(RetrievalRecipe, None, ["use_gpu=false"]).use_gpu is False


@pytest.fixture(scope="module")
def empty_test_shards(tiny_index, tmp_path_factory) -> Path:
    """Shards whose test clips all point at a missing video, so the test split holds no clip (the build says so
    and fails, but what it wrote stays, as a shard set built before builds refused empty splits)."""
    from mgfm.errors import InputError
    from mgfm.shards import BuildConfig, build_shards

    clips = [c if c.split == "train" else dataclasses.replace(c, path="/nonexistent/video.mp4")
             for c in tiny_index.clips]
    out = tmp_path_factory.mktemp("empty_test_shards") / "tiny_empty"
    with pytest.raises(InputError, match="split 'test' has no samples"):
        build_shards(ClipIndex(clips, tiny_index.class_names, "tiny"), out, BuildConfig(short_side=32, shard_samples=3))
    return out


def _cli(*args: str) -> subprocess.CompletedProcess:
    env = dict(os.environ, PYTHONUNBUFFERED="1", OMP_NUM_THREADS="1")
    return subprocess.run([sys.executable, PROG, *args, "stream.num_workers=0", "stream.batch_size=4"], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=300)


def _one_line_error(result: subprocess.CompletedProcess) -> str:
    assert result.returncode == 2, result.stderr[-2000:]
    assert "Traceback" not in result.stderr
    errors = [line for line in result.stderr.splitlines() if line.startswith(f"{PROG}: error:")]
    assert len(errors) == 1, result.stderr[-2000:]
    return errors[0]


@pytest.mark.slow  # four subprocesses
def test_cli_bad_input_is_one_line_and_exit_2(evaluated, tiny_shards, empty_test_shards, tmp_path):
    run_dir, report = evaluated
    not_encoder = tmp_path / "not_a_run"
    not_encoder.mkdir()
    (not_encoder / "notes.txt").write_text("hello")
    line = _one_line_error(_cli(f"run={not_encoder}", f"shards={tiny_shards}"))
    assert str(not_encoder) in line and "config.json" in line

    line = _one_line_error(_cli(f"run={run_dir}", f"shards={empty_test_shards}", "references=false"))
    assert "'test'" in line and "empty split" in line

    text = tmp_path / "notes.mp4"
    text.write_text("this is not a video\n")
    line = _one_line_error(_cli(f"run={run_dir}", f"shards={tiny_shards}", f"query={text}"))
    assert line.startswith(f"{PROG}: error: {text}: not a decodable video (")

    wide = tiny_encoder(tmp_path / "wide" / "encoder", dim=48)
    query = _clip_file(tiny_shards, "v0_0000000_0000009", tmp_path / "q.mp4")
    line = _one_line_error(_cli(f"run={wide.parent}", f"shards={tiny_shards}", f"query={query}",
                                f"index_dir={report['index']['folder']}"))
    assert "32-d" in line and "48-d" in line


@pytest.mark.slow  # a subprocess
def test_cli_evaluates_and_prints_the_table(evaluated, tiny_shards, tmp_path):
    run_dir, _ = evaluated
    run_copy = tmp_path / "run"
    shutil.copytree(run_dir / "encoder", run_copy / "encoder")
    result = _cli(f"run={run_copy}", f"shards={tiny_shards}", "references=false", "index=ivf", "nlist=2")
    assert result.returncode == 0, result.stderr[-2000:]
    assert "R@1" in result.stdout and "pretrained" in result.stdout and "random init" not in result.stdout
    report = json.loads((run_copy / "retrieval" / tiny_shards.name / "report.json").read_text())
    assert report["index"]["kind"] == "ivf" and report["results"]["pretrained"]["index_params"]["nlist"] == 2


def test_the_index_is_chosen_for_the_recall_target_and_the_report_says_which_and_why(evaluated, tiny_shards,
                                                                                   tmp_path, caplog):
    run_dir, report = evaluated  # the defaults: index=auto, recall_target=0.99
    chosen = report["index"]
    assert chosen["kind"] == "flat" and "exact search is fast enough" in chosen["why"]
    assert chosen["calibration"] == {"recall_target": 0.99, "recall": 1.0, "exact": True}
    assert "flat: 6 vectors: exact search is fast enough" in (run_dir / "retrieval" / tiny_shards.name /
                                                             "report.md").read_text()
    # an approximate index asked for is calibrated, and the frontier it chose from is in the report
    with caplog.at_level("INFO"):
        hnsw = run(recipe(run_dir, tiny_shards, "index=hnsw", "recall_target=0.99", f"out={tmp_path / 'h'}",
                          "references=false"))
    calib = hnsw["index"]["calibration"]
    assert hnsw["index"]["kind"] == "hnsw" and calib["met"] and calib["recall"] >= 0.99
    assert hnsw["index"]["frontier"] and "gives neighbour R@" in caplog.text
