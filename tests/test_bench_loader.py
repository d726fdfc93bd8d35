"""benchmarks/bench_loader.py (both references, the floor) and bench_loader_levers.py end to end on tiny shard
sets: the scripts the loader's numbers come from keep running (numbers are not checked: no wall-clock limits in
tests)."""

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
    assert re.search(r"ratio stream / floor: [0-9.]+ \(intra-only\), [0-9.]+ \(frames alone\)", out.stdout)
    assert "peak RSS streaming 2 batches" in out.stdout


def test_bench_loader_levers_runs_every_lever_and_the_bytes_table():
    cmd = [sys.executable, str(REPO / "benchmarks" / "bench_loader_levers.py"), "--clips", "4", "--clip-frames", "16",
           "--batches", "1", "--rounds", "1", "--batch-size", "2", "--decode-repeats", "1", "--frames", "4",
           "--img-size", "32", "--today-side", "48", "--train-side", "40", "--gpu-clips-per-s", "100"]
    out = subprocess.run(cmd, capture_output=True, text=True, env=subprocess_env(), timeout=600)
    assert out.returncode == 0, out.stderr[-2000:]
    assert re.search(r"40, fastdecode, bframes 7 \(new\)\s+[0-9.]+\s+[0-9.]+\s+[0-9.]+\s+[0-9.]+\s+[0-9.]+", out.stdout)
    for side in ("decoder alone: pyav", "storage alone: at the crop size", "encoding alone: fastdecode",
                 "all together (new defaults)", "all together, repeats 2", "floor: frames alone, intra-only"):
        assert re.search(re.escape(side) + r"\s+[0-9.]+\s+[0-9.]+\s+[0-9.]+\s+[0-9.]+\s+[0-9.]+", out.stdout), side
