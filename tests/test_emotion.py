"""Video-level emotion heads: sequences ordered by start frame, emotion splits, metrics on a hand-checked
case, leak-free MG probabilities, heads that learn a toy problem, one-line errors, and the whole
evaluation on tiny shards."""

from __future__ import annotations

import dataclasses
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import tiny_encoder_folder

from mgfm.data.stream import StreamConfig
from mgfm.evaluate.emotion_heads import (EmotionError, SequenceHeadConfig, binary_metrics, build_sequences,
                                         concat_features, fit_sequence_head, fit_vector_head, majority_probability,
                                         mg_probabilities, one_hot_labels)
from mgfm.evaluate.emotion_eval import EmotionRecipe, split_sequences, subject_prior_row
from mgfm.evaluate.emotion_eval import run as evaluate_emotion
from mgfm.evaluate.featureset import FeatureSet
from mgfm.evaluate.probe import ProbeConfig

REPO = Path(__file__).resolve().parents[1]


def _row(video: str, start: int, emotion: int | None = 1, split: str = "train", label: int = 0,
         subject: str | None = None) -> dict:
    return {"video_id": video, "start_frame": start, "end_frame": start + 5, "label": label, "emotion": emotion,
            "split": split, "subject": subject or f"s{video}", "clip_id": f"{video}_{start:04d}"}


# ------------------------------------------------------------------------------------------ sequences

def test_sequences_are_ordered_by_start_frame_and_grouped_by_video():
    rows = [_row("7", 40), _row("12", 3, 0, "test"), _row("7", 0), _row("7", 20), _row("12", 1, 0, "test"),
            _row("7", 10)]
    feats = FeatureSet(np.arange(len(rows), dtype=np.float32)[:, None], rows)
    seqs = build_sequences(feats)
    assert [s.video_id for s in seqs] == ["7", "12"]  # numeric ids in numeric order
    v7, v12 = seqs
    assert v7.start_frames.tolist() == [0, 10, 20, 40]
    assert feats.features[v7.index, 0].tolist() == [2, 5, 3, 0]  # the rows those start frames came from
    assert [feats.rows[i]["start_frame"] for i in v12.index] == [1, 3]
    assert (v7.emotion, v7.split, v12.emotion, v12.split) == (1, "train", 0, "test")


def test_emotion_splits_override_the_clip_split_and_leave_unlisted_videos_out():
    rows = [_row("a", 0, split="train"), _row("b", 0, 0, split="train"), _row("c", 0, split="test")]
    feats = FeatureSet(np.zeros((3, 2)), rows)
    seqs = build_sequences(feats, {"a": "test", "b": "train"})
    assert {(s.video_id, s.split) for s in seqs} == {("a", "test"), ("b", "train")}


def test_clips_of_two_shard_splits_regroup_into_one_video():
    train = FeatureSet(np.ones((2, 3)), [_row("v", 9, split="train"), _row("v", 0, split="train")])
    test = FeatureSet(np.zeros((1, 3)), [_row("v", 4, split="test")])
    feats, origin = concat_features({"train": train, "test": test})
    (seq,) = build_sequences(feats, {"v": "test"})
    assert seq.start_frames.tolist() == [0, 4, 9]
    assert origin[seq.index].tolist() == ["train", "test", "train"]


@pytest.mark.parametrize("rows, splits, expected", [
    ([{**_row("a", 0), "emotion": None}], None, "no clip carries an 'emotion'"),
    ([{k: v for k, v in _row("a", 0).items() if k != "emotion"}], None, "no clip carries an 'emotion'"),
    ([_row("a", 0, 1), _row("a", 5, 0)], None, "video a: its clips disagree on emotion"),
    ([_row("a", 0, split="train"), _row("a", 5, split="test")], None, "video a: clips in splits"),
    ([_row("a", 0)], {"a": "train", "zz": "test"}, "have no clips (e.g. zz)"),
])
def test_bad_input_is_a_one_line_error(rows, splits, expected):
    with pytest.raises(EmotionError) as err:
        build_sequences(FeatureSet(np.zeros((len(rows), 2)), rows), splits, "shards/x")
    assert expected in str(err.value) and "\n" not in str(err.value)


def test_smg_style_segments_are_videos_and_clips_outside_segments_are_left_out():
    rows = [_row("S1_seg1", 0, 0), _row("S1_seg2", 50, 1), _row("S1", 30, None), _row("S1_seg1", 10, 0)]
    seqs = build_sequences(FeatureSet(np.zeros((4, 2)), rows))
    assert [(s.video_id, s.emotion, len(s.index)) for s in seqs] == [("S1_seg1", 0, 2), ("S1_seg2", 1, 1)]


def test_missing_videos_can_be_allowed():
    seqs = build_sequences(FeatureSet(np.zeros((1, 2)), [_row("a", 0)]), {"a": "train", "zz": "test"},
                           allow_missing_videos=True)
    assert [s.video_id for s in seqs] == ["a"]


def test_single_emotion_training_set_is_a_clear_error():
    rows = [_row("a", 0, 1), _row("b", 0, 1), _row("c", 0, 0, "test")]
    seqs = build_sequences(FeatureSet(np.zeros((3, 2)), rows))
    with pytest.raises(EmotionError, match="all 2 videos are positive"):
        split_sequences(seqs, "train", "test")
    with pytest.raises(EmotionError, match="need videos in 'train' and 'val'"):
        split_sequences(seqs, "train", "val")


def test_subject_prior_row_scores_test_videos_by_their_subjects_train_rate():
    rows = [_row("a", 0, 1, "train", subject="x"), _row("b", 0, 1, "train", subject="x"),
            _row("c", 0, 0, "train", subject="y"), _row("d", 0, 0, "test", subject="x"),
            _row("e", 0, 1, "test", subject="y")]
    data = split_sequences(build_sequences(FeatureSet(np.zeros((5, 2)), rows)), "train", "test")
    prior = subject_prior_row(data)
    assert prior["accuracy"]["mean"] == 0.0 and prior["auroc"]["mean"] == 0.0  # entangled: exactly wrong
    assert "2/2" in prior["input"]
    disjoint = [r if r["split"] == "train" else {**r, "subject": "new"} for r in rows]
    assert subject_prior_row(split_sequences(build_sequences(FeatureSet(np.zeros((5, 2)), disjoint)),
                                             "train", "test")) is None


# -------------------------------------------------------------------------------------------- metrics

def test_binary_metrics_hand_checked():
    m = binary_metrics([1, 1, 0, 0, 1], [0.9, 0.4, 0.2, 0.6, 0.8])
    # predictions 1 0 0 1 1: 3 of 5 right; recall 2/3 (positive) and 1/2 (negative);
    # F1 positive 2/3 (tp 2, fp 1, fn 1), negative 1/2 (tp 1, fp 1, fn 1); AUROC: 5 of 6 pairs ordered right
    assert m["n"] == 5
    assert m["accuracy"] == pytest.approx(0.6)
    assert m["balanced_accuracy"] == pytest.approx(7 / 12)
    assert m["macro_f1"] == pytest.approx(7 / 12)
    assert m["auroc"] == pytest.approx(5 / 6)


def test_majority_and_one_class_test_set():
    assert majority_probability(np.array([1, 1, 0])) == 1.0
    assert majority_probability(np.array([1, 0])) == 0.0  # ties go to negative
    m = binary_metrics([0, 1, 0, 1], [0.0] * 4)
    assert (m["accuracy"], m["balanced_accuracy"], m["macro_f1"], m["auroc"]) == (0.5, 0.5, pytest.approx(1 / 3), 0.5)
    assert binary_metrics([1, 1], [0.7, 0.2])["auroc"] is None
    with pytest.raises(EmotionError, match="labels must be 0/1"):
        binary_metrics([2, 0], [0.5, 0.5])


# ------------------------------------------------------------------------------------- MG probabilities

def test_mg_probabilities_are_cross_fitted_on_the_pool():
    """Noise features with random labels: a probe sees its own clips' labels only in-sample, so there
    the true class gets a high probability; cross-fitted pool clips must sit near chance."""
    rng = np.random.default_rng(0)
    n, d, classes = 120, 80, 3
    rows = [{"clip_id": f"c{i}", "label": int(rng.integers(classes)),
             "subject": f"s{i % 12}" if i < 96 else f"t{i % 3}", "video_id": f"v{i % 24}" if i < 96 else f"w{i % 6}"}
            for i in range(n)]  # clips 0-95: the pool (12 subjects); 96-119: 3 other subjects
    feats = FeatureSet(rng.normal(size=(n, d)), rows)
    in_pool = np.arange(n) < 96
    cfg = ProbeConfig(C=10.0)
    probs, info = mg_probabilities(feats, in_pool, classes, cfg, folds=4)
    assert probs.shape == (n, classes) and np.allclose(probs.sum(axis=1), 1.0, atol=1e-5)
    assert info["group_by"] == "subject" and info["cross_fitted_clips"] == 96 and info["C"] == 10.0
    true_prob = probs[np.arange(n), feats.labels]
    from mgfm.evaluate.probe import train_probe

    in_sample = train_probe(FeatureSet(feats.features[:96], rows[:96]), classes, cfg).logits(feats.features[:96])
    in_sample = np.exp(in_sample - in_sample.max(1, keepdims=True))
    in_sample /= in_sample.sum(1, keepdims=True)
    assert in_sample[np.arange(96), feats.labels[:96]].mean() > 0.9  # memorised
    assert true_prob[:96].mean() < 0.5  # held out: near chance (1/3)


def test_one_hot_labels_leave_unlabelled_clips_empty():
    assert one_hot_labels(np.array([2, -1, 0]), 3).tolist() == [[0, 0, 1], [0, 0, 0], [1, 0, 0]]


# ---------------------------------------------------------------------------------------------- heads

def _toy_sequences(n_videos: int, rng: np.random.Generator) -> tuple[list[np.ndarray], np.ndarray]:
    """One-hot MG sequences over 4 classes: positive videos show class 0 often, negative ones class 1."""
    seqs, y = [], np.arange(n_videos) % 2
    for emotion in y:
        p = [0.5, 0.1, 0.2, 0.2] if emotion else [0.1, 0.5, 0.2, 0.2]
        seqs.append(np.eye(4, dtype=np.float32)[rng.choice(4, size=int(rng.integers(6, 14)), p=p)])
    return seqs, y


def test_sequence_head_learns_a_toy_mg_sequence_problem_and_is_seeded():
    torch.set_num_threads(1)
    rng = np.random.default_rng(0)
    seqs, y = _toy_sequences(60, rng)
    test_seqs, y_test = _toy_sequences(30, rng)
    cfg = SequenceHeadConfig(hidden=16, epochs=60)
    fitted = fit_sequence_head(seqs, y, cfg, seed=3)
    p, attention = fitted.predict(test_seqs)
    assert binary_metrics(y_test, p)["accuracy"] >= 0.8
    assert all(a.shape == (len(s),) and abs(a.sum() - 1) < 1e-5 for a, s in zip(attention, test_seqs))
    again, _ = fit_sequence_head(seqs, y, cfg, seed=3).predict(test_seqs)
    assert np.array_equal(p, again)
    with pytest.raises(EmotionError, match="all 2 videos are negative"):
        fit_sequence_head(seqs[:2], np.array([0, 0]), cfg, seed=0)


def test_vector_head_contributions_add_up_to_its_logit():
    rng = np.random.default_rng(1)
    x = rng.normal(size=(40, 5))
    y = (x[:, 0] > 0).astype(int)
    head = fit_vector_head(x, y, [f"s{i % 8}" for i in range(40)], ProbeConfig(C=1.0))
    p = head.p_positive(x)
    logit = head.contributions(x).sum(axis=1) + head.probe.model.intercept_[0]
    assert np.allclose(p, 1 / (1 + np.exp(-logit)))
    assert binary_metrics(y, p)["accuracy"] > 0.9


# ------------------------------------------------------------------------------------ whole evaluation

@pytest.fixture(scope="module")
def emotion_shards(tiny_index, tmp_path_factory) -> Path:
    """``tiny_index`` with one emotion per video (v0, v2 positive; v1, v3 negative) and no emotion
    protocol, so each video's clip split is its emotion split."""
    from mgfm.shards import BuildConfig, build_shards

    emotions = {"v0": 1, "v1": 0, "v2": 1, "v3": 0}
    clips = [dataclasses.replace(c, emotion=emotions[c.video_id]) for c in tiny_index.clips]
    index = dataclasses.replace(tiny_index, clips=clips, emotion_splits={})
    out = tmp_path_factory.mktemp("emotion_shards") / "tiny"
    build_shards(index, out, BuildConfig(short_side=32, shard_samples=6, crf=12), source={"format": "test"})
    return out


def test_evaluate_emotion_report(tmp_path, emotion_shards):
    run = tmp_path / "run"
    tiny_encoder_folder(run / "encoder")
    recipe = EmotionRecipe(run=str(run), shards=str(emotion_shards), stream=StreamConfig(masks=False, num_workers=0, batch_size=4), seeds=[0, 1],
                           probe=ProbeConfig(C=1.0), probe_folds=2, head=SequenceHeadConfig(hidden=8, epochs=3),
                           logistic=ProbeConfig(C=1.0))
    report = evaluate_emotion(recipe)
    results = report["results"]
    assert list(results)[0] == "majority class"
    assert {"(a) pooled features + logistic regression", "(b) BiLSTM over clip features",
            "(c) BiLSTM over predicted MG distributions", "oracle: BiLSTM over true MG labels"} <= set(results)
    assert results["(b) BiLSTM over clip features"]["seeds"] == 2
    assert len(results["(b) BiLSTM over clip features"]["per_seed"]) == 2
    assert report["videos"] == {"train": 2, "test": 2, "train_positive": 1, "test_positive": 1,
                                "clips_per_video": 3.0}
    assert report["mg_probe"]["pretrained"]["cross_fitted_clips"] == 6  # the train videos' clips
    assert len(report["explanations"]) == 2
    assert {e["emotion"] for e in report["explanations"]} == {"positive", "negative"}
    assert set(report["histogram_weights"]) == {"(c) mean predicted MG distribution + logistic regression",
                                                "oracle: true MG histogram + logistic regression"}
    out = run / "emotion" / emotion_shards.name
    saved = json.loads((out / "report.json").read_text())
    assert saved["summary"]["headers"][0] == "head"
    md = (out / "report.md").read_text()
    assert "Emotion heads" in md and "over the majority class" in md and "leaned on" in md and "weigh most" in md


def test_mixed_emotions_in_a_video_is_a_one_line_cli_error(tmp_path, tiny_shards):
    run = tmp_path / "run"
    tiny_encoder_folder(run / "encoder")
    result = subprocess.run([sys.executable, "eval/emotion.py", f"run={run}", f"shards={tiny_shards}",
                             "stream.num_workers=0", f"features_dir={tmp_path / 'cache'}"], cwd=REPO, capture_output=True,
                            text=True, timeout=300)
    assert result.returncode == 2
    last = result.stderr.strip().splitlines()[-1]
    assert last.startswith("eval/emotion.py: error:") and "disagree on emotion" in last
