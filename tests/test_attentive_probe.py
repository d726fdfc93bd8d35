"""The attentive probe: it reads what mean pooling destroys, the encoder's pooled tokens agree with its clip
features, and `probe=attentive` gives the report with its reference rows and a separate output folder."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import tiny_encoder_folder

from mgfm.data.stream import StreamConfig
from mgfm.evaluate.attentive import AttentiveProbeConfig, train_attentive_probe
from mgfm.evaluate.featureset import FeatureError, FeatureSet
from mgfm.evaluate.probe import ProbeConfig, train_probe

REPO = Path(__file__).resolve().parents[1]


def _where_not_what(n: int, seed: int) -> FeatureSet:
    """Class k = a bump on channel 0 of token k (of 4); every clip's token mean is the same bump over 4."""
    rng = np.random.default_rng(seed)
    labels = rng.integers(0, 4, n)
    tokens = rng.normal(0, 0.3, (n, 4, 8)).astype(np.float32)
    tokens[np.arange(n), labels, 0] += 3.0
    rows = [{"clip_id": f"c{i}", "label": int(y), "subject": f"s{i % 6}"} for i, y in enumerate(labels)]
    return FeatureSet(tokens.reshape(n, -1), rows, token_dim=8)


def test_attentive_probe_reads_where_a_signal_is_which_the_mean_loses():
    train, test = _where_not_what(240, 0), _where_not_what(120, 1)
    probe = train_attentive_probe(train, 4, AttentiveProbeConfig(wd_grid=[0.05]))
    attentive = float((probe.logits(test.tokens()).argmax(1) == test.labels).mean())
    means = [FeatureSet(s.tokens().mean(axis=1), s.rows) for s in (train, test)]
    linear = train_probe(means[0], 4, ProbeConfig(C=1.0))
    pooled = float((linear.logits(means[1].features).argmax(1) == test.labels).mean())
    assert attentive > 0.9 and pooled < 0.5, (attentive, pooled)


def test_attentive_probe_picks_weight_decay_by_subject_cv_and_is_seeded():
    train = _where_not_what(90, 2)
    cfg = AttentiveProbeConfig(steps=30, wd_grid=[0.01, 5.0], cv_folds=3)
    a, b = train_attentive_probe(train, 4, cfg), train_attentive_probe(train, 4, cfg)
    assert set(a.cv_scores) == {0.01, 5.0} and a.weight_decay in a.cv_scores
    np.testing.assert_array_equal(a.logits(train.tokens()), b.logits(train.tokens()))


def test_clip_features_are_not_tokens():
    with pytest.raises(FeatureError, match="not tokens"):
        FeatureSet(np.zeros((2, 6)), [{"clip_id": "a"}, {"clip_id": "b"}]).tokens()
    with pytest.raises(FeatureError, match="whole tokens"):
        FeatureSet(np.zeros((2, 6)), [{"clip_id": "a"}, {"clip_id": "b"}], token_dim=4)
    with pytest.raises(FeatureError, match="attentive.grid"):
        AttentiveProbeConfig(grid=[4, 4])


def test_pooled_tokens_agree_with_the_clip_features(tmp_path):
    from mgfm.evaluate.raw_pixels import PixelEncoder
    from mgfm.model.hf import load_encoder_hf

    encoder, cfg = load_encoder_hf(tiny_encoder_folder(tmp_path / "encoder"))
    video = torch.randn(3, cfg.frames, 3, cfg.img_size, cfg.img_size)
    with torch.no_grad():
        every = encoder.pooled_tokens(video, cfg.grid_shape)
        assert torch.equal(every, encoder(video))
        one = encoder.pooled_tokens(video, (1, 1, 1))
        assert one.shape == (3, 1, cfg.dim)
        torch.testing.assert_close(one[:, 0], encoder.features(video))
    pixels = PixelEncoder(frames=4, size=2)
    assert torch.equal(pixels.pooled_tokens(video).flatten(1), pixels.features(video))
    assert pixels.pooled_tokens(video).shape == (3, 4, 3 * 2 * 2)


def test_attentive_probe_report_has_reference_rows_and_its_own_folder(tmp_path, tiny_shards):
    from mgfm.evaluate.probe_eval import ProbeRecipe
    from mgfm.evaluate.probe_eval import run as run_probe

    run = tmp_path / "run"
    tiny_encoder_folder(run / "encoder")
    recipe = ProbeRecipe(run=str(run), shards=str(tiny_shards), stream=StreamConfig(masks=False, num_workers=0, batch_size=4), probe="attentive",
                         attentive=AttentiveProbeConfig(grid=[1, 2, 2], steps=20, wd_grid=[0.1]))
    report = run_probe(recipe)
    assert set(report["results"]) == {"pretrained", "random init", "raw pixels"}
    assert report["results"]["pretrained"]["probe"]["n"] == 6
    assert report["results"]["pretrained"]["probe"]["weight_decay"] == 0.1
    assert report["results"]["pretrained"]["feature_dim"] == 32  # the token width
    out = run / "eval-attentive" / tiny_shards.name
    assert "Attentive probe" in (out / "report.md").read_text()
    assert json.loads((out / "report.json").read_text())["probe"] == "attentive"
    assert not (run / "eval").exists(), "the linear probe's report folder is not touched"
    cached = [json.loads(p.read_text()) for p in (run / "features").glob("*.json")]
    tokens = [c for c in cached if c["key"].get("tokens") == [1, 2, 2]]
    assert len(tokens) == 6 and {c["token_dim"] for c in tokens} == {32, 48}  # 3 encoders x 2 splits


def test_unknown_probe_is_one_line_error(tmp_path, tiny_shards):
    run = tmp_path / "run"
    tiny_encoder_folder(run / "encoder")
    result = subprocess.run([sys.executable, "eval/linear_probe.py", f"run={run}", f"shards={tiny_shards}",
                             "probe=attentiv"], cwd=REPO, capture_output=True, text=True, timeout=300)
    assert result.returncode == 2
    last = result.stderr.strip().splitlines()[-1]
    assert last.startswith("eval/linear_probe.py: error:") and "attentiv" in last and "linear, attentive" in last
