"""Classification metrics (hand-checked), confusion plot, and report writers."""

from __future__ import annotations

import json

import numpy as np
import pytest
from sklearn.metrics import balanced_accuracy_score, top_k_accuracy_score

from mgfm.evaluate.featureset import FeatureError
from mgfm.evaluate.metrics import classification_metrics, plot_confusion, rank_of_true
from mgfm.report import format_table, jsonable, markdown_table, write_report

NAMES = ["c0", "c1", "c2", "c3", "c4", "c5"]
LABELS = np.array([0, 0, 1, 1, 2, 5])
SCORES = np.array([
    [0.90, 0.02, 0.02, 0.02, 0.02, 0.02],  # true 0: rank 0, predicted 0
    [0.10, 0.50, 0.10, 0.10, 0.10, 0.10],  # true 0: c1 ahead; ties c2..c5 rank after c0 -> rank 1, pred 1
    [0.00, 0.60, 0.10, 0.10, 0.10, 0.10],  # true 1: rank 0
    [0.50, 0.00, 0.10, 0.10, 0.10, 0.20],  # true 1: all 5 others ahead -> rank 5 (top-5 miss), predicted 0
    [0.30, 0.30, 0.30, 0.05, 0.05, 0.00],  # true 2: tied with c0, c1 (lower ids win) -> rank 2, predicted 0
    [0.10, 0.10, 0.10, 0.10, 0.10, 0.50],  # true 5: rank 0
])


def test_hand_checked_scores():
    m = classification_metrics(SCORES, LABELS, NAMES)
    assert rank_of_true(SCORES, LABELS).tolist() == [0, 1, 0, 5, 2, 0]
    assert m["n"] == 6
    assert m["top1"] == pytest.approx(3 / 6)
    assert m["top5_k"] == 5 and m["top5"] == pytest.approx(5 / 6)
    # per class: c0 1/2, c1 1/2, c2 0/1, c5 1/1; c3, c4 absent -> mean over the 4 present classes
    assert m["mean_class_accuracy"] == pytest.approx((0.5 + 0.5 + 0.0 + 1.0) / 4)
    assert m["per_class"]["c0"] == {"accuracy": 0.5, "support": 2}
    assert m["per_class"]["c2"] == {"accuracy": 0.0, "support": 1}
    assert m["per_class"]["c3"] == {"accuracy": None, "support": 0}
    assert m["per_class"]["c5"] == {"accuracy": 1.0, "support": 1}
    assert m["confusion"] == [
        [1, 1, 0, 0, 0, 0],
        [1, 1, 0, 0, 0, 0],
        [1, 0, 0, 0, 0, 0],
        [0, 0, 0, 0, 0, 0],
        [0, 0, 0, 0, 0, 0],
        [0, 0, 0, 0, 0, 1],
    ]
    assert "without" not in m
    json.dumps(m)  # plain JSON types only


def test_hand_checked_without_excluded_class():
    m = classification_metrics(SCORES, LABELS, NAMES, exclude=[1])
    w = m["without"]
    # samples of true class 1 dropped (rows 2, 3); c1 can no longer be predicted:
    # row 0 -> c0 ok; row 1 -> tie c0,c2..c5 -> c0 ok; row 4 -> tie c0,c2 -> c0 (true c2: rank 1); row 5 ok
    assert w["excluded"] == ["c1"] and w["n"] == 4
    assert w["top1"] == pytest.approx(3 / 4)
    assert w["top5_k"] == 5 and w["top5"] == pytest.approx(1.0)
    assert w["mean_class_accuracy"] == pytest.approx((1.0 + 0.0 + 1.0) / 3)
    assert m["top1"] == pytest.approx(3 / 6)  # the full scores are unchanged


def test_without_when_only_excluded_samples():
    m = classification_metrics(SCORES[2:4], LABELS[2:4], NAMES, exclude=[1])
    assert m["without"]["n"] == 0 and m["without"]["top1"] is None


def test_top_k_clipped_to_classes():
    m = classification_metrics(SCORES[:, :3][:3], np.array([0, 0, 1]), NAMES[:3])
    assert m["top5_k"] == 3 and m["top5"] == 1.0


def test_agrees_with_sklearn_without_ties():
    rng = np.random.default_rng(0)
    n, c = 200, 12
    labels = rng.integers(0, c, n)
    logits = rng.normal(size=(n, c)) + 1.5 * np.eye(c)[labels]
    m = classification_metrics(logits, labels, [f"k{i}" for i in range(c)])
    assert m["top1"] == pytest.approx(top_k_accuracy_score(labels, logits, k=1, labels=np.arange(c)))
    assert m["top5"] == pytest.approx(top_k_accuracy_score(labels, logits, k=5, labels=np.arange(c)))
    assert m["mean_class_accuracy"] == pytest.approx(balanced_accuracy_score(labels, logits.argmax(1)))


@pytest.mark.parametrize("scores, labels, names, exclude, match", [
    (SCORES, np.array([0, 0, 1, 1, 2, -1]), NAMES, (), "drop unlabelled"),
    (SCORES, LABELS[:5], NAMES, (), "labels must be"),
    (SCORES, LABELS, NAMES[:5], (), "5 class names for 6"),
    (SCORES, LABELS, NAMES, (6,), "exclude"),
    (SCORES[:0], LABELS[:0], NAMES, (), "no samples"),
    (np.full((6, 6), np.nan), LABELS, NAMES, (), "NaN"),
])
def test_bad_input_is_one_line_error(scores, labels, names, exclude, match):
    with pytest.raises(FeatureError, match=match) as err:
        classification_metrics(scores, labels, names, exclude)
    assert "\n" not in str(err.value)


def test_plot_confusion_32_classes(tmp_path):
    rng = np.random.default_rng(1)
    names = [f"class_{i:02d}_long_name" for i in range(32)]
    conf = rng.integers(0, 20, size=(32, 32))
    path = plot_confusion(conf, names, tmp_path / "plots" / "confusion.png")
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    from matplotlib.image import imread

    height, width = imread(path).shape[:2]
    assert height >= 1000 and width >= 1000  # room for 32 labelled rows/columns
    assert not list(tmp_path.glob("plots/*.tmp"))
    with pytest.raises(FeatureError, match="expected"):
        plot_confusion(conf[:3], names, tmp_path / "bad.png")


def test_write_report(tmp_path):
    report = {"top1": np.float32(0.5), "n": np.int64(3), "curve": np.arange(3), "nan": float("nan"),
              "nested": {"k": (1, 2)}, "path": tmp_path}
    json_path, md_path = write_report(tmp_path / "out", report, "| a |\n", "Linear probe")
    loaded = json.loads(json_path.read_text())
    assert loaded == {"title": "Linear probe", "top1": 0.5, "n": 3, "curve": [0, 1, 2], "nan": None,
                      "nested": {"k": [1, 2]}, "path": str(tmp_path)}
    assert md_path.read_text() == "# Linear probe\n\n| a |\n"
    assert jsonable({1: np.bool_(True)}) == {"1": True}


def test_tables():
    headers = ["split", "top1", "n"]
    rows = [["test", 0.51234, 10], ["train|all", None, 2000]]
    assert markdown_table(headers, rows) == (
        "| split | top1 | n |\n| --- | --- | --- |\n| test | 0.5123 | 10 |\n| train\\|all | - | 2000 |\n")
    lines = format_table(headers, rows, floatfmt=".2f").splitlines()
    assert lines[0] == "split      top1     n"
    assert lines[2] == "test       0.51    10"
    assert lines[3] == "train|all     -  2000"
    with pytest.raises(ValueError, match="3 cells"):
        markdown_table(headers, [["x"]])


def test_top1_has_a_bootstrap_interval_and_per_sample_outcomes():
    from mgfm.evaluate.metrics import bootstrap_ci, mean_ci

    rng = np.random.default_rng(0)
    labels = rng.integers(0, 4, 400)
    scores = rng.normal(size=(400, 4))
    scores[np.arange(300), labels[:300]] += 5  # the first 300 right, the rest by chance
    m = classification_metrics(scores, labels, ["a", "b", "c", "d"])
    assert m["correct"] == (scores.argmax(1) == labels).astype(int).tolist()
    low, high = m["top1_ci95"]
    assert low < m["top1"] < high
    # binomial standard error at n=400, p~0.8: the 95% half-width is about 1.96 * 0.02 = 0.039
    assert 0.025 < (high - low) / 2 < 0.055
    small = bootstrap_ci(np.array(m["correct"][-40:]))  # the chance part: not all right
    assert small[1] - small[0] > high - low  # fewer clips, wider interval
    assert bootstrap_ci([1, 1, 1]) == (1.0, 1.0)
    # the mean of runs scored on the same clips: resampled together, inside the runs' range
    runs = [m["correct"], np.roll(m["correct"], 7).tolist()]
    lo2, hi2 = mean_ci(runs)
    assert lo2 < np.mean(runs) < hi2
    with pytest.raises(FeatureError):
        mean_ci(m["correct"])
