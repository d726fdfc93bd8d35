"""benchmarks/bench_soak.py end to end in seconds: two rank processes with a loader worker each stream a few
epochs of a tiny shard set it builds; the report states the memory and throughput slopes and finds every clip
exactly once per epoch (the verdicts on memory and throughput need minutes, so only their presence is checked)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import subprocess_env

REPO = Path(__file__).resolve().parents[1]


@pytest.mark.slow  # rank and loader worker processes
def test_bench_soak_runs_and_finds_every_clip_once_per_epoch(tmp_path):
    cmd = [sys.executable, str(REPO / "benchmarks" / "bench_soak.py"), "--clips", "24", "--frames", "400",
           "--minutes", "0.05", "--ranks", "2", "--workers", "1", "--batch-size", "2", "--short-side", "64",
           "--img-size", "32", "--out", str(tmp_path)]
    out = subprocess.run(cmd, capture_output=True, text=True, env=subprocess_env(), timeout=600)
    assert out.returncode == 0, out.stderr[-3000:]
    report = json.loads((tmp_path / "soak.json").read_text())
    assert report["frames"] >= 400 and report["epochs"]
    assert all(e["repeats"] == 0 and e["left_out"] < 2 * 2 for e in report["epochs"])
    assert report["goals"]["every_clip_once_per_epoch"]
    assert "exactly once: 0 repeats" in out.stdout and "throughput:" in out.stdout
