"""Planning a shard build from a large clip index: time, peak memory, plan size and warning lines.

    python benchmarks/bench_index.py                                  # this checkout, 200,000 rows
    git archive main | tar -x -C /tmp/mgfm-main                       # the code before, unpacked once
    python benchmarks/bench_index.py --reference /tmp/mgfm-main       # both, side by side, with ratios

It writes a generic clip CSV of ``--rows`` rows (``--videos`` source videos, ``--rows / --videos`` clips each,
every row with its frames, so planning never opens a video; the paths are fake) and runs, for each checkout,
``python -m mgfm.shards build --format csv ... --part 999999/1000000`` in a fresh child process: the whole
index is read and planned and the plan written, and this part holds no shard, so nothing is encoded.
Measured per child (``--rounds``, the sides alternating, medians): wall and CPU seconds and peak RSS
(``wait4``), beside the same interpreter only importing the builder (torch comes in through webdataset:
about 350 MB of it), the size of ``_meta/plan.json``, and the warning lines.

A second leg builds ``--skip-rows`` rows whose videos are all missing (each clip is skipped, every shard
comes out empty) and counts the warning lines the build prints.
"""

from __future__ import annotations

import argparse
import csv
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
CLASSES = 32
SUBJECTS = 200
FRAMES_PER_VIDEO = 6000  # clips are spread over a 4-minute video at 25 fps


def write_csv(path: Path, rows: int, videos: int, exists: Path | None = None) -> Path:
    """A ``path,label,subject,split,start_frame,end_frame`` CSV; every ``path`` is ``videos/vNNNNN.mp4``
    (missing on disk)."""
    per_video = max(1, rows // videos)
    step = max(1, FRAMES_PER_VIDEO // per_video)
    with path.open("w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["path", "label", "subject", "split", "start_frame", "end_frame"])
        for i in range(rows):
            video, k = divmod(i, per_video)
            subject = video % SUBJECTS
            start = k * step
            writer.writerow([f"videos/v{video:05d}.mp4", (video * 7 + k) % CLASSES, f"s{subject:03d}",
                             "test" if subject % 5 == 0 else "train", start, start + step // 2])
    return path


def run_child(code: Path, args: list[str]) -> dict:
    """Run ``python ARGS`` with ``code`` first on the path: wall and CPU seconds, peak RSS, stderr."""
    env = dict(os.environ, PYTHONPATH=str(code), OMP_NUM_THREADS="1")
    start = time.perf_counter()
    with tempfile.TemporaryFile("w+") as err:
        proc = subprocess.Popen([sys.executable, *args], cwd=code, env=env, stdout=subprocess.DEVNULL, stderr=err)
        _, status, usage = os.wait4(proc.pid, 0)
        proc.returncode = os.waitstatus_to_exitcode(status)
        seconds = time.perf_counter() - start
        err.seek(0)
        stderr = err.read()
    return {"seconds": seconds, "cpu_s": usage.ru_utime + usage.ru_stime, "peak_rss_mb": usage.ru_maxrss / 1024,
            "rc": proc.returncode, "warnings": sum(1 for line in stderr.splitlines() if line.startswith("WARNING")),
            "last": stderr.strip().splitlines()[-1] if stderr.strip() else ""}


def measure_plan(code: Path, csv_path: Path, work: Path, round_: int) -> dict:
    """One planning run of the whole index (a fresh output folder), and the same interpreter importing the
    builder only (what planning costs above it)."""
    out = work / f"plan-{code.name}-{round_}"
    plan = run_child(code, ["-m", "mgfm.shards", "build", "--format", "csv", "--index", str(csv_path), "--out",
                            str(out), "--part", "999999/1000000"])
    if plan["rc"] != 0:
        raise SystemExit(f"{code}: planning failed: {plan['last']}")
    plan["plan_mb"] = (out / "_meta" / "plan.json").stat().st_size / 1e6
    imports = run_child(code, ["-c", "import mgfm.shards.__main__"])
    plan["import_cpu_s"], plan["import_rss_mb"] = imports["cpu_s"], imports["peak_rss_mb"]
    return plan


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=200_000)
    parser.add_argument("--videos", type=int, default=2_000)
    parser.add_argument("--skip-rows", type=int, default=5_000, help="rows of the all-skipped build")
    parser.add_argument("--reference", type=Path, default=None, help="a checkout of the code to compare with")
    parser.add_argument("--rounds", type=int, default=3, help="planning runs per side (alternating; medians)")
    args = parser.parse_args(argv)
    sides = ([("before", args.reference.resolve())] if args.reference else []) + [("after", ROOT)]
    with tempfile.TemporaryDirectory(prefix="bench_index-") as tmp:
        work = Path(tmp)
        csv_path = write_csv(work / "clips.csv", args.rows, args.videos)
        skip_csv = write_csv(work / "skips.csv", args.skip_rows, max(1, args.skip_rows // 100))
        print(f"index: {args.rows:,} rows, {args.videos:,} videos, {csv_path.stat().st_size / 1e6:.1f} MB CSV; "
              f"all-skipped build: {args.skip_rows:,} rows; {args.rounds} planning rounds per side, alternating")
        runs: dict[str, list[dict]] = {name: [] for name, _ in sides}
        for round_ in range(args.rounds):
            for name, code in (sides if round_ % 2 == 0 else sides[::-1]):
                runs[name].append(measure_plan(code, csv_path, work, round_))
        skips = {name: run_child(code, ["-m", "mgfm.shards", "build", "--format", "csv", "--index", str(skip_csv),
                                         "--out", str(work / f"skips-{name}"), "--shard-samples", "500"])
                 for name, code in sides}
    med = {name: {k: statistics.median(r[k] for r in rs) for k in rs[0] if isinstance(rs[0][k], (int, float))}
           for name, rs in runs.items()}
    print(f"{'':<8}{'wall s':>8}{'CPU s':>8}{'(imports)':>10}{'peak RSS MB':>13}{'(imports)':>10}{'plan.json MB':>14}"
          f"{'warning lines':>15}{'(skip build)':>14}")
    for name, m in med.items():
        print(f"{name:<8}{m['seconds']:>8.1f}{m['cpu_s']:>8.1f}{m['import_cpu_s']:>10.1f}{m['peak_rss_mb']:>13.0f}"
              f"{m['import_rss_mb']:>10.0f}{m['plan_mb']:>14.2f}{m['warnings']:>15.0f}{skips[name]['warnings']:>14}")
    if "before" in med:
        b, a = med["before"], med["after"]

        def ratio(key: str, base: str | None = None) -> str:
            before, after = (b[key] - b[base], a[key] - a[base]) if base else (b[key], a[key])
            return f"{before / after:.1f}x" if before > 0 and after > 0 else "n/a (within noise)"

        print(f"before / after: CPU {ratio('cpu_s')} (above imports {ratio('cpu_s', 'import_cpu_s')}), peak RSS "
              f"{ratio('peak_rss_mb')} (above imports {ratio('peak_rss_mb', 'import_rss_mb')}), plan.json "
              f"{ratio('plan_mb')}, skip-build warning lines {skips['before']['warnings']} -> {skips['after']['warnings']}")
    print(f"after, the all-skipped build's last line: {skips['after']['last']}")


if __name__ == "__main__":
    main()
