"""Frozen-encoder features (cache, exactly once under 2 processes), the linear probe, the probe report,
and one-line errors for bad runs, widths and splits."""

from __future__ import annotations

import json
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import tiny_encoder_folder

from mgfm.data.stream import StreamConfig
from mgfm.evaluate.extract import eval_stream_config, split_features
from mgfm.evaluate.featureset import FeatureError, FeatureSet
from mgfm.evaluate.probe import ProbeConfig, predict, train_probe

REPO = Path(__file__).resolve().parents[1]


def _stream() -> StreamConfig:
    return eval_stream_config(StreamConfig(frames=4, img_size=32), batch_size=2, num_workers=0)


def _rows(n: int) -> list[dict]:
    return [{"clip_id": f"c{i}", "label": i % 2} for i in range(n)]


def test_probe_separates_a_linearly_separable_problem():
    rng = np.random.default_rng(0)
    labels = rng.integers(0, 3, 300)
    centres = np.array([[5.0, 0, 0, 0], [0, 5.0, 0, 0], [0, 0, 5.0, 0]])
    x = centres[labels] + rng.normal(0, 0.5, (300, 4))
    rows = [{"clip_id": f"c{i}", "label": int(y)} for i, y in enumerate(labels)]
    train, test = FeatureSet(x[:200], rows[:200]), FeatureSet(x[200:], rows[200:])
    probe = train_probe(train, 3, ProbeConfig(C=1.0))
    assert (predict(probe, test).argmax(1) == test.labels).mean() == 1.0


def test_probe_hand_checked_tiny_case():
    """Two 1-d clusters at -1 and +1: the probe must put the boundary between them."""
    x = np.array([[-1.0], [-1.1], [-0.9], [1.0], [1.1], [0.9]])
    rows = [{"clip_id": str(i), "label": int(i >= 3)} for i in range(6)]
    probe = train_probe(FeatureSet(x, rows), 2, ProbeConfig(C=10.0))
    test = FeatureSet(np.array([[-2.0], [-0.5], [0.5], [2.0]]), [{"clip_id": str(i), "label": 0} for i in range(4)])
    assert predict(probe, test).argmax(1).tolist() == [0, 0, 1, 1]


def test_balanced_weighting_helps_the_rare_class():
    rng = np.random.default_rng(1)
    labels = np.array([0] * 190 + [1] * 10)
    x = np.where(labels[:, None] == 1, 0.8, 0.0) + rng.normal(0, 0.5, (200, 2))
    rows = [{"clip_id": str(i), "label": int(y)} for i, y in enumerate(labels)]
    train = FeatureSet(x, rows)
    plain = train_probe(train, 2, ProbeConfig(C=1.0))
    balanced = train_probe(train, 2, ProbeConfig(C=1.0, class_weighting="balanced"))
    rare = FeatureSet(x[labels == 1], [r for r in rows if r["label"] == 1])
    assert (predict(balanced, rare).argmax(1) == 1).mean() > (predict(plain, rare).argmax(1) == 1).mean()


def _cv_choice(x: np.ndarray, y: np.ndarray, groups: np.ndarray, grid: list[float]) -> float:
    """The C an independent 3-fold grouped CV (sklearn, standardised features, accuracy) chooses."""
    from sklearn.linear_model import LogisticRegression
    from sklearn.model_selection import GroupKFold

    xs = (x - x.mean(0)) / x.std(0)
    scores = {}
    for C in grid:
        scores[C] = np.mean([(LogisticRegression(C=C, max_iter=300).fit(xs[tr], y[tr]).predict(xs[va]) == y[va]).mean()
                             for tr, va in GroupKFold(3).split(xs, y, groups)])
    return max(scores, key=lambda c: (scores[c], -c))


def test_c_is_chosen_by_subject_grouped_cv():
    """Each subject has its own feature that predicts the class inside that subject only (noise for the
    others): CV that lets a subject's clips sit on both sides rewards memorising it (large C); grouped by
    subject, CV sees it does not carry over and prefers strong regularisation."""
    rng = np.random.default_rng(3)
    rows, x = [], []
    for subject in range(6):
        for i in range(40):
            label = i % 2
            shared = label + rng.normal(0, 1.0)
            own = np.zeros(6)
            own[subject] = (2 * label - 1) * 1.5 + rng.normal(0, 0.5)
            own += rng.normal(0, 1.5, 6) * (np.arange(6) != subject)
            rows.append({"clip_id": f"{subject}-{i}", "label": label, "subject": str(subject)})
            x.append(np.concatenate([[shared], own, rng.normal(0, 1, 10)]))
    x, grid = np.array(x), [1e-3, 1e-1, 10.0]
    y, subjects = np.array([r["label"] for r in rows]), np.array([r["subject"] for r in rows])
    by_subject, by_clip = _cv_choice(x, y, subjects, grid), _cv_choice(x, y, np.arange(len(y)).astype(str), grid)
    assert by_subject != by_clip, "the data must tell the two CV schemes apart"
    probe = train_probe(FeatureSet(x, rows), 2, ProbeConfig(c_grid=grid))
    assert set(probe.cv_scores) == set(grid)
    assert probe.C == by_subject


@pytest.mark.parametrize("classes", [[0, 1], [0, 2, 3]])
def test_probe_as_one_linear_layer_gives_its_logits(classes):
    rng = np.random.default_rng(0)
    labels = np.repeat(classes, 10)
    x = rng.normal(size=(len(labels), 5)) * [1, 3, 0.5, 2, 1] + 4 + labels[:, None] * [1, -1, 0, 0.5, 0]
    probe = train_probe(FeatureSet.from_labels(x, labels), 4, ProbeConfig(C=1.0))
    weight, bias = probe.affine()
    assert weight.shape == (4, 5) and bias.shape == (4,)
    logits = torch.as_tensor(x @ weight.T + bias)
    # the layer's softmax over the present classes is the regression's own class probabilities
    expected = probe.model.predict_proba((x - probe.mean) / probe.scale)
    assert np.allclose(logits[:, classes].softmax(dim=1).numpy(), expected, atol=1e-6)
    assert (logits.argmax(1).numpy() == probe.logits(x).argmax(1)).all()
    absent = [c for c in range(4) if c not in classes]
    assert (weight[absent] == 0).all() and (bias[absent] == bias[classes].min()).all()


def test_featureset_errors_are_one_line():
    with pytest.raises(FeatureError, match="empty split"):
        FeatureSet(np.zeros((0, 4)), []).require("test split")
    with pytest.raises(FeatureError, match="features are 4-d, expected 8-d"):
        FeatureSet(np.zeros((2, 4)), _rows(2)).require("test split", 8)
    with pytest.raises(FeatureError, match="2 feature rows but 3 clip rows"):
        FeatureSet(np.zeros((2, 4)), _rows(3))
    with pytest.raises(ValueError, match="class_weighting"):
        train_probe(FeatureSet(np.zeros((4, 2)), _rows(4)), 2, ProbeConfig(class_weighting="inverse"))


def test_features_are_cached_by_encoder_and_never_stale(tmp_path, tiny_shards):
    folder = tiny_encoder_folder(tmp_path / "encoder")
    first = split_features(folder, tiny_shards, "train", _stream(), tmp_path / "cache")
    assert len(first) == 6 and first.dim == 32
    assert first.clip_ids == sorted(first.clip_ids)
    cached = list((tmp_path / "cache").glob("*.json"))
    assert len(cached) == 1
    again = split_features(folder, tiny_shards, "train", _stream(), tmp_path / "cache")
    np.testing.assert_array_equal(first.features, again.features)

    # A retrained encoder (other weights, other checksum) must not reuse the cache.
    from mgfm.model.hf import load_encoder_hf, save_encoder_hf

    encoder, _ = load_encoder_hf(folder)
    with torch.no_grad():
        for p in encoder.parameters():
            p.add_(0.05)
    save_encoder_hf(encoder, folder)
    changed = split_features(folder, tiny_shards, "train", _stream(), tmp_path / "cache")
    assert not np.allclose(changed.features, first.features)
    assert len(list((tmp_path / "cache").glob("*.json"))) == 2


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


WORKER = """
import json, sys, torch, torch.distributed as dist
sys.path.insert(0, {tests!r})
from mgfm.data.stream import StreamConfig
from mgfm.evaluate.extract import encode_split, eval_stream_config
from mgfm.model.hf import load_encoder_hf
rank = int(sys.argv[1])
dist.init_process_group("gloo", init_method="tcp://127.0.0.1:{port}", rank=rank, world_size=2)
encoder, _ = load_encoder_hf({encoder!r})
seen = []
def features(video):
    return encoder.features(video)
cfg = eval_stream_config(StreamConfig(frames=4, img_size=32), batch_size=2, num_workers=1)
from mgfm.data.stream import make_loader
loader, _ = make_loader({shards!r}, "test", cfg, mode="eval")
local = [c for batch in loader for c in batch["clip_id"]]
result = encode_split(features, {shards!r}, "test", cfg, progress=False)
json.dump({{"local": local, "all": result.clip_ids, "sum": float(result.features.sum())}}, open({out!r} + str(rank), "w"))
del loader  # stop its worker before the group goes away
dist.barrier()  # neither rank tears gloo down while the other is still in a collective (it aborted once in CI)
dist.destroy_process_group()
"""


@pytest.mark.slow
def test_features_exactly_once_under_two_processes(tmp_path, tiny_shards):
    folder = tiny_encoder_folder(tmp_path / "encoder")
    out = str(tmp_path / "rank")
    script = WORKER.format(tests=str(REPO / "tests"), port=_free_port(), encoder=str(folder), shards=str(tiny_shards),
                           out=out)
    procs = [subprocess.Popen([sys.executable, "-c", script, str(r)], cwd=REPO) for r in (0, 1)]
    assert [p.wait(timeout=300) for p in procs] == [0, 0]
    results = [json.loads(Path(out + str(r)).read_text()) for r in (0, 1)]
    local0, local1 = set(results[0]["local"]), set(results[1]["local"])
    assert local0 and local1 and not local0 & local1, "each rank must encode different clips"

    single = split_features(folder, tiny_shards, "test", _stream())
    for r in results:
        assert r["all"] == single.clip_ids, "every clip exactly once, same order as one process"
        assert abs(r["sum"] - float(single.features.sum())) < 1e-3
    assert set(single.clip_ids) == local0 | local1


def test_linear_probe_report_and_references(tmp_path, tiny_shards):
    from mgfm.evaluate.probe_eval import ProbeRecipe
    from mgfm.evaluate.probe_eval import run as run_probe

    run = tmp_path / "run"
    tiny_encoder_folder(run / "encoder")
    report = run_probe(ProbeRecipe(run=str(run), shards=str(tiny_shards), stream=StreamConfig(masks=False, num_workers=0, batch_size=4),
                                 linear=ProbeConfig(c_grid=[0.01, 1.0])))
    assert set(report["results"]) == {"pretrained", "random init", "raw pixels"}
    probe = report["results"]["pretrained"]["probe"]
    assert probe["n"] == 6
    # the reported top-1 is what an independent refit (sklearn, the chosen C) on the cached features scores
    from sklearn.linear_model import LogisticRegression

    from mgfm.model.hf import encoder_checksum

    def cached(split: str) -> FeatureSet:  # the run encoder's features of ``split`` (the cache holds 3 encoders')
        sets = [FeatureSet.load(p.with_suffix("")) for p in (run / "features").glob(f"{tiny_shards.name}-{split}-*.json")]
        return next(fs for fs in sets if fs.key["encoder"] == encoder_checksum(run / "encoder"))

    train, test = cached("train"), cached("test")
    mean, sd = train.features.mean(0), train.features.std(0)
    sd[sd < 1e-6] = 1.0
    fit = LogisticRegression(C=probe["C"], max_iter=300).fit((train.features - mean) / sd, train.labels)
    expected = float((fit.predict((test.features - mean) / sd) == test.labels).mean())
    assert probe["top1"] == pytest.approx(expected)
    out = run / "eval" / tiny_shards.name
    assert json.loads((out / "report.json").read_text())["results"]["pretrained"]["probe"]["n"] == 6
    assert "Linear probe" in (out / "report.md").read_text()
    assert (out / "confusion_pretrained.png").stat().st_size > 1000


def _probe_cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "eval/linear_probe.py", *args], cwd=REPO, capture_output=True, text=True,
                          timeout=300)


def test_not_an_encoder_is_one_line_error(tmp_path, tiny_shards):
    (tmp_path / "junk").mkdir()
    (tmp_path / "junk" / "notes.txt").write_text("hello")
    result = _probe_cli(f"run={tmp_path / 'junk'}", f"shards={tiny_shards}")
    assert result.returncode == 2
    last = result.stderr.strip().splitlines()[-1]
    assert last.startswith("eval/linear_probe.py: error:") and "junk" in last


def test_empty_split_is_one_line_error(tmp_path, tiny_shards):
    run = tmp_path / "run"
    tiny_encoder_folder(run / "encoder")
    result = _probe_cli(f"run={run}", f"shards={tiny_shards}", "test_split=val", "stream.num_workers=0")
    assert result.returncode == 2
    assert "val" in result.stderr.strip().splitlines()[-1]
