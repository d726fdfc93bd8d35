"""``make demo``'s summary: the trained encoder beside its step 0 (the motion-PCA start), the gain over random
init split between the two, and stage times in plain seconds (the stages themselves are tested where they
live; this is the summary alone, on reports made here)."""

from __future__ import annotations

import json

from mgfm.demo import write_summary

DATA = {"clips": 12, "videos": 4, "subjects": 4, "clips_per_split": {"train": 6, "test": 6}}


def _probe_report(top1: dict[str, float]) -> dict:
    return {"results": {name: {"probe": {"top1": t, "top1_ci95": [t - 0.05, t + 0.05], "top5": 0.9,
                                         "mean_class_accuracy": t / 2},
                               "kmeans": {"clustering_accuracy": 0.2, "nmi": 0.1, "ari": 0.05}}
                        for name, t in top1.items()}}


def test_the_summary_splits_the_gain_into_the_start_and_the_training_steps(tmp_path):
    (tmp_path / "summary.json").write_text(json.dumps({"steps": 342, "final_loss": 0.5, "clips_per_s": 60.0}))
    report = _probe_report({"pretrained": 0.59, "random init": 0.29, "raw pixels": 0.31})
    step0 = _probe_report({"pretrained": 0.55})
    path = write_summary(tmp_path, DATA, report, {"data": 54.04, "pretrain": 156.2}, step0_report=step0,
                         start_name="step 0 (motion-PCA start)")
    text = path.read_text()
    rows = [line.split(" | ")[0].lstrip("| ") for line in text.splitlines() if line.startswith("| ")]
    assert rows[2:6] == ["pretrained", "step 0 (motion-PCA start)", "random init", "raw pixels"]
    assert ("gain over random init: +30.0 points: +26.0 from the encoder's start, before any step (row "
            "`step 0 (motion-PCA start)`), +4.0 from the 342 pretraining steps (row `pretrained`) (within the two rows' "
            "95% intervals).") in text
    assert "| pretrain | 156.2 |" in text and "| data | 54.0 |" in text and "156.2000" not in text


def test_without_a_step0_encoder_the_summary_says_the_gain_is_not_split(tmp_path):
    (tmp_path / "summary.json").write_text(json.dumps({"steps": 10, "final_loss": 0.5, "clips_per_s": 60.0}))
    report = _probe_report({"pretrained": 0.40, "random init": 0.30, "raw pixels": 0.31})
    text = write_summary(tmp_path, DATA, report, {"data": 1.0}).read_text()
    assert "+10.0 points (start and training not told apart" in text and "step 0" in text
