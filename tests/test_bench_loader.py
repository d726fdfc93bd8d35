"""benchmarks/bench_loader.py end to end on a tiny shard set, both references: the script the loader's
acceptance numbers come from keeps running (numbers are not checked: no wall-clock limits in tests)."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import subprocess_env

REPO = Path(__file__).resolve().parents[1]


@pytest.mark.parametrize("reference", ["asnumpy", "zero-copy"])
def test_bench_loader_runs_and_reports_ratios(reference):
    cmd = [sys.executable, str(REPO / "benchmarks" / "bench_loader.py"), "--clips", "8", "--clip-frames", "20",
           "--short-side", "64", "--img-size", "32", "--frames", "4", "--batch-size", "2", "--batches", "2",
           "--rounds", "1", "--rss-batches", "2", "--reference", reference, "--gpu-clips-per-s", "100"]
    out = subprocess.run(cmd, capture_output=True, text=True, env=subprocess_env(), timeout=600)
    assert out.returncode == 0, out.stderr[-2000:]
    assert f"raw decord decode ({reference})" in out.stdout
    ratio = re.search(r"ratio stream / raw decode: ([0-9.]+)", out.stdout)
    assert ratio and float(ratio.group(1)) > 0
    assert re.search(r"cores to feed 100 training samples/s: \d+", out.stdout)
    assert "peak RSS streaming 2 batches" in out.stdout
