"""Large indexes (issue 39, fault 8): a compact plan that old shard sets still resume from, repeated skip
warnings summarised, and a killed build's temporary files cleaned by the next run. The 200,000-row numbers
are benchmarks/bench_index.py's (BENCHMARKS.md), not asserted here."""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
from conftest import TINY_CLASSES

from mgfm.shards import BuildConfig, build_shards, load_manifest, plan_shards
from mgfm.shards.plan import plan_hash
from mgfm.shards.manifest import plan_path
from mgfm.sources.clip_index import Clip, ClipIndex

TINY_CONFIG = BuildConfig(short_side=32, shard_samples=3, crf=12)


def _plan_as_rows(index: ClipIndex, config: BuildConfig) -> dict:
    """The plan as the builder held it before it was compact: every clip row of every shard."""
    return {name: {"split": entry.split, "clips": [c.to_row() for c in entry.clips]}
            for name, entry in plan_shards(index, config).items()}


def test_the_plan_hash_is_the_one_shard_sets_built_earlier_carry(tiny_index):
    # computed clip by clip now, never as one string of the whole index: the digest must not change, or every
    # shard set built before would be "a different plan" on its next build
    for config in (TINY_CONFIG, BuildConfig(short_side=64, shard_mb=0.01, splits=("test",))):
        whole = json.dumps({"config": config.output_fields(), "shards": _plan_as_rows(tiny_index, config)},
                           sort_keys=True, default=list)
        assert plan_hash(plan_shards(tiny_index, config), config) == hashlib.sha256(whole.encode()).hexdigest()


def _many_clips(n: int, videos: int = 20) -> ClipIndex:
    per = n // videos
    clips = [Clip(f"video{v:04d}", k * 20, k * 20 + 9, (v + k) % 3, f"s{v % 7}", "test" if v % 5 == 0 else "train",
                  25.0, f"/data/some/where/videos/video{v:04d}.mp4") for v in range(videos) for k in range(per)]
    return ClipIndex(clips, list(TINY_CLASSES), "many")


def test_the_plan_names_clip_ids_not_whole_rows(tmp_path):
    index = _many_clips(2000)
    nothing = BuildConfig(shard_samples=50, part=(999, 1000))  # plan everything, build no shard of it
    manifest = build_shards(index, tmp_path, nothing)
    assert manifest["totals"]["planned_shards"] == 40 and manifest["totals"]["shards"] == 0
    # a clip costs its id and little else (every row per shard, indented, was ~330 bytes a clip)
    assert plan_path(tmp_path).stat().st_size < 40 * len(index), plan_path(tmp_path).stat().st_size
    plan = json.loads(plan_path(tmp_path).read_text())
    assert plan["format"] == "mgfm-plan/2"
    ids = [i for entry in plan["shards"].values() for i in entry["clips"]]
    assert sorted(ids) == sorted(c.clip_id for c in index)


def test_an_older_plan_with_every_row_is_read_and_rewritten_compactly(tiny_index, tiny_shards, tmp_path):
    shards = tmp_path / "shards"
    shutil.copytree(tiny_shards, shards)
    plan = json.loads(plan_path(shards).read_text())
    plan.pop("format", None)
    plan["shards"] = _plan_as_rows(tiny_index, TINY_CONFIG)  # the file an earlier mgfm wrote
    plan_path(shards).write_text(json.dumps(plan, indent=1))
    stamps = {p.name: p.stat().st_mtime_ns for p in shards.glob("*.tar")}

    manifest = build_shards(tiny_index, shards, TINY_CONFIG)  # not "a different plan": the same, resumed
    assert manifest["complete"] and manifest["totals"]["samples"] == 12
    assert {p.name: p.stat().st_mtime_ns for p in shards.glob("*.tar")} == stamps, "a finished shard was rebuilt"
    rewritten = json.loads(plan_path(shards).read_text())
    assert rewritten["format"] == "mgfm-plan/2" and rewritten["plan_hash"] == plan["plan_hash"]
    assert rewritten["shards"]["test-000000.tar"]["clips"] == [r["clip_id"] for r in
                                                                plan["shards"]["test-000000.tar"]["clips"]]


def test_repeated_skip_warnings_are_summarised_per_kind(tmp_path, tiny_videos, caplog):
    # a build whose sources were missing printed one warning line per clip (13,902 of them for a large CSV)
    gone = [Clip(f"gone{k}", 0, 9, k % 3, "1", "train", 25.0, str(tmp_path / f"gone{k}.mp4")) for k in range(12)]
    short = [Clip("v1", 100 + k, 110 + k, 0, "2", "train", 25.0, str(tiny_videos["v1"])) for k in range(5)]
    fine = [Clip("v0", 0, 9, 0, "1", "train", 25.0, str(tiny_videos["v0"]))]
    caplog.set_level(logging.WARNING)
    manifest = build_shards(ClipIndex(gone + short + fine, list(TINY_CLASSES), "t"), tmp_path / "out",
                            BuildConfig(short_side=32, crf=12, shard_samples=4))
    assert manifest["totals"]["samples"] == 1 and len(manifest["skipped"]) == 17  # every skip is still recorded
    lines = [r.getMessage() for r in caplog.records]
    assert sum("skipping clip gone" in line for line in lines) == 3
    assert sum("skipping clip v1_" in line for line in lines) == 3
    assert "further skips of this kind are counted, not shown" in lines[2]
    summary = [line for line in lines if line.startswith("17 clips skipped: ")]
    assert len(summary) == 1 and "12 x source video unreadable (e.g. FileNotFoundError: source video not found: " \
        in summary[0] and "5 x clip starts at frame N but the video has N frames (e.g. " in summary[0], summary


def _killed_while_writing(target: Path) -> Path:
    """Start a process that dies by SIGKILL inside :func:`mgfm.files.atomic_path` writing ``target``; return the
    temporary file it left."""
    code = ("import os, signal, sys\nfrom mgfm.files import atomic_path\n"
            "with atomic_path(sys.argv[1]) as tmp:\n    tmp.write_bytes(b'half a shard')\n"
            "    print(tmp, flush=True)\n    os.kill(os.getpid(), signal.SIGKILL)\n")
    child = subprocess.run([sys.executable, "-c", code, str(target)], capture_output=True, text=True,
                           env=dict(os.environ, PYTHONPATH=str(Path(__file__).resolve().parents[1])))
    assert child.returncode == -signal.SIGKILL
    left = Path(child.stdout.strip())
    assert left.exists()
    return left


def test_a_killed_builds_temporary_files_are_removed_by_the_next_run_and_nothing_else(tiny_index, tmp_path, caplog):
    out = tmp_path / "shards"
    build_shards(tiny_index.subset(tiny_index.split("test")), out, TINY_CONFIG)  # a build that will be resumed
    (out / "test-000001.tar").unlink()
    left = [_killed_while_writing(out / "test-000001.tar"), _killed_while_writing(out / "_meta" / "test-000001.json"),
            _killed_while_writing(out / "manifest.json")]
    holder = subprocess.Popen(["sleep", "60"])  # a live writer of this host: its file is not ours to delete
    try:
        live = out / f".test-000000.tar.{holder.pid}@{socket.gethostname()}.tmp"
        other_host = out / ".test-000001.tar.1@another-host.tmp"
        unrelated = [out / ".notes.txt.1.tmp", out / "mine.tmp", out / ".test-000009.tar.1.tmp"]
        for path in [live, other_host, *unrelated]:
            path.write_bytes(b"x")
        caplog.set_level(logging.WARNING)
        manifest = build_shards(tiny_index.subset(tiny_index.split("test")), out, TINY_CONFIG)
        assert manifest["complete"] and manifest["totals"]["samples"] == 6
        assert not any(p.exists() for p in left)
        assert all(p.exists() for p in [live, other_host, *unrelated])
        assert "removed 3 temporary file(s) an interrupted build left" in caplog.text
    finally:
        holder.kill()
        holder.wait()
    assert load_manifest(out)["complete"]


@pytest.mark.slow  # seven child processes, each importing the builder
def test_bench_index_runs_both_sides_and_reports_ratios():
    repo = Path(__file__).resolve().parents[1]
    out = subprocess.run([sys.executable, str(repo / "benchmarks" / "bench_index.py"), "--rows", "300", "--videos",
                          "6", "--skip-rows", "200", "--rounds", "1", "--reference", str(repo)],
                         capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr[-2000:]
    assert "before / after: CPU" in out.stdout and "plan.json 1.0x" in out.stdout  # the same code on both sides
    assert "every split (test, train) has no samples: all 200 of the clips were skipped" in out.stdout


@pytest.mark.slow  # a process pool whose parent is killed
def test_pool_workers_of_a_killed_build_end_with_it():
    # orphaned ProcessPoolExecutor workers used to wait on their task queue forever after `kill -9` of a build
    code = ("import concurrent.futures, multiprocessing, os, signal, time\n"
            "from mgfm.runtime import exit_with_parent\n"
            "if __name__ == '__main__':\n"
            "    pool = concurrent.futures.ProcessPoolExecutor(2, mp_context=multiprocessing.get_context('spawn'),\n"
            "                                                  initializer=exit_with_parent)\n"
            "    [f.result() for f in [pool.submit(os.getpid) for _ in range(8)]]\n"
            "    print(' '.join(str(p) for p in pool._processes), flush=True)\n"
            "    os.kill(os.getpid(), signal.SIGKILL)\n")
    child = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300,
                           env=dict(os.environ, PYTHONPATH=str(Path(__file__).resolve().parents[1])))
    assert child.returncode == -signal.SIGKILL, child.stderr[-2000:]
    workers = [int(p) for p in child.stdout.split()]
    assert len(workers) == 2
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline and any(_running(p) for p in workers):
        time.sleep(0.2)
    assert not any(_running(p) for p in workers), "a pool worker outlived its killed parent"


def _running(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return not Path(f"/proc/{pid}/stat").exists() or Path(f"/proc/{pid}/stat").read_text().split()[2] != "Z"
