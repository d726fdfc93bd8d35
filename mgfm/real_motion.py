"""``make real-motion``: does the default recipe learn features that serve recorded human motion?

One foundation model per seed is pretrained on the mixture of the synthetic benchmark and the real-motion
sets of ``../shared/data`` (UTKinect, Florence3D: stick-figure renders of recorded Kinect skeletons, see
each set's SOURCE.md), train splits only and no labels, with the default recipe
(``recipes/pretrain/tiny_cpu.yaml``) and equal set weights. Each run's frozen encoder is then probed on every
set's cross-subject test split with the linear and the attentive probe (``eval/linear_probe.py``), against a
random encoder of the same size (seeded like the run) and raw pixels. The table gives the mean and spread
over seeds and the gaps the issue asks for (pretrained - raw pixels, pretrained - random init).

Stages resume: built shards, finished runs and cached features are reused. Writes ``<out>/table.md`` and
``<out>/table.json``; each probe's own report stays under ``<out>/seed<S>/eval*/<set>/``.
"""

from __future__ import annotations

import argparse
import json
import logging
import time
from pathlib import Path

import numpy as np

from mgfm.cli import one_line_errors
from mgfm.config import load_recipe
from mgfm.evaluate.probe_eval import PROBES, ProbeRecipe
from mgfm.evaluate.probe_eval import run as run_probe
from mgfm.pipeline import build_default_shards, default_workers, pretrain
from mgfm.report import markdown_table
from mgfm.shards import BuildConfig, build_shards
from mgfm.shards.build import read_source_index
from mgfm.train.recipe import PretrainRecipe
from mgfm.errors import InputError
from mgfm.runtime import setup_logging

log = logging.getLogger("mgfm.real_motion")
REPO = Path(__file__).resolve().parents[1]
REAL_SETS = ("utkinect", "florence3d")
ROWS = ("pretrained", "random init", "raw pixels")


def real_shards(shared: Path, shards_dir: Path, names: tuple[str, ...] = REAL_SETS) -> list[Path]:
    """Build (or resume) each real set's shards from ``<shared>/<name>/index.csv`` as the issue measured them
    (generic clip CSV, short side 112); a missing set is a one-line error naming where it was looked for."""
    out = []
    for name in names:
        index = (shared / name / "index.csv").resolve()
        if not index.exists():
            raise InputError(f"{index}: no such file; real-motion needs ../shared/data/{name} (see its SOURCE.md) "
                             f"or --shared DIR")
        target = shards_dir / name
        build_shards(read_source_index("csv", index), target, BuildConfig(short_side=112, workers=default_workers()),
                     source={"format": "csv", "index": str(index)})
        out.append(target)
    return out


def pretrain_seed(seed: int, sets: list[Path], out: Path, recipe_path: Path, synthetic_data: str | None,
                  overrides: list[str]) -> Path:
    """Pretrain (or resume, or find finished) the mixture run of ``seed``; returns its run folder."""
    recipe = load_recipe(PretrainRecipe, recipe_path, [
        f"shards=[{','.join(str(s) for s in sets)}]", f"shard_weights=[{','.join('1' for _ in sets)}]",
        f"synthetic_data={synthetic_data or 'null'}", f"seed={seed}", f"name=seed{seed}", f"out_dir={out}", *overrides])
    return pretrain(recipe)


def probe_run(run_dir: Path, shards: Path, probe: str, seed: int, features_dir: Path) -> dict[str, float]:
    """``{row: test top-1}`` of one probe of ``run_dir``'s encoder on ``shards``, with the reference rows."""
    report = run_probe(ProbeRecipe(run=str(run_dir), shards=str(shards), probe=probe, seed=seed, kmeans=False,
                                   features_dir=str(features_dir)))
    return {row: report["results"][row]["probe"]["top1"] for row in ROWS}


def summarise(scores: dict[str, dict[str, dict[str, list[float]]]]) -> tuple[list[str], list[list], dict]:
    """``scores[set][probe][row]`` = top-1 per seed -> (headers, table rows, json summary)."""
    headers = ["set", "probe", "seeds", *ROWS, "pretrained - pixels", "pretrained - random"]
    rows, summary = [], {}
    for name, by_probe in scores.items():
        for probe, by_row in by_probe.items():
            mean = {row: float(np.mean(v)) for row, v in by_row.items()}
            spread = {row: float(np.std(v)) for row, v in by_row.items()}
            gaps = {"pixels": mean["pretrained"] - mean["raw pixels"], "random": mean["pretrained"] - mean["random init"]}
            summary.setdefault(name, {})[probe] = {"per_seed": by_row, "mean": mean, "std": spread, "gap": gaps}
            rows.append([name, probe, len(by_row["pretrained"]),
                         *[f"{100 * mean[r]:.1f} ± {100 * spread[r]:.1f}" for r in ROWS],
                         f"{100 * gaps['pixels']:+.1f}", f"{100 * gaps['random']:+.1f}"])
    return headers, rows, summary


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="mgfm.real_motion", description=__doc__.splitlines()[0])
    parser.add_argument("--shared", type=Path, default=REPO.parent / "shared" / "data",
                        help="folder holding utkinect/ and florence3d/ (default: ../shared/data)")
    parser.add_argument("--real", default=",".join(REAL_SETS), help="the real sets (folders of --shared)")
    parser.add_argument("--synthetic", action=argparse.BooleanOptionalAction, default=True,
                        help="include the synthetic benchmark in the mixture and the table")
    parser.add_argument("--shards-dir", type=Path, default=Path("shards"), help="where the shard sets live")
    parser.add_argument("--synthetic-data", default="data/synthetic", help="synthetic benchmark folder")
    parser.add_argument("--out", type=Path, default=Path("runs/real-motion"), help="runs, features and the table")
    parser.add_argument("--seeds", default="0,1,2", help="pretraining seeds (comma-separated)")
    parser.add_argument("--probes", default="linear,attentive", help="linear and/or attentive")
    parser.add_argument("--recipe", type=Path, default=REPO / "recipes" / "pretrain" / "tiny_cpu.yaml")
    parser.add_argument("overrides", nargs="*", help="key=value overrides for the pretraining recipe")
    args = parser.parse_args(argv)
    setup_logging()
    with one_line_errors("mgfm.real_motion"):
        print(run(args))


def run(args: argparse.Namespace) -> str:
    seeds = [s.strip() for s in str(args.seeds).split(",") if s.strip()]
    probes = [p.strip() for p in args.probes.split(",") if p.strip()]
    if not probes or any(p not in PROBES for p in probes):
        raise InputError(f"--probes: expected linear and/or attentive, got {args.probes!r}")
    if not seeds or not all(s.isdigit() for s in seeds):
        raise InputError(f"--seeds: expected comma-separated integers, got {args.seeds!r}")
    seeds = [int(s) for s in seeds]
    start = time.time()
    sets = real_shards(args.shared, args.shards_dir, tuple(n.strip() for n in args.real.split(",") if n.strip()))
    if args.synthetic:  # rendered first when missing
        build_default_shards(args.synthetic_data, args.shards_dir / "synthetic")
        sets = [args.shards_dir / "synthetic", *sets]
    timings = {"shards": time.time() - start}
    scores: dict = {s.name: {p: {row: [] for row in ROWS} for p in probes} for s in sets}
    for seed in seeds:
        start = time.time()
        run_dir = pretrain_seed(seed, sets, args.out, args.recipe, args.synthetic_data if args.synthetic else None,
                                args.overrides)
        timings[f"pretrain seed {seed}"] = time.time() - start
        start = time.time()
        for shards in sets:
            for probe in probes:
                for row, top1 in probe_run(run_dir, shards, probe, seed, args.out / "features").items():
                    scores[shards.name][probe][row].append(top1)
        timings[f"probes seed {seed}"] = time.time() - start
    headers, rows, summary = summarise(scores)
    table = markdown_table(headers, rows)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "table.json").write_text(json.dumps({"seeds": seeds, "probes": probes, "overrides": args.overrides,
                                                     "sets": summary, "seconds": timings}, indent=1))
    (args.out / "table.md").write_text(
        f"# Real motion: frozen probes of the mixture-pretrained encoder\n\nSeeds {seeds}; pretraining recipe "
        f"`{args.recipe.name}` {' '.join(args.overrides)} on {', '.join(s.name for s in sets)} (equal weights); "
        f"test top-1 in %, mean ± std over seeds.\n\n{table}\n\n"
        + markdown_table(["stage", "seconds"], [[k, round(v)] for k, v in timings.items()]) + "\n")
    return table + f"\n\ntable: {args.out / 'table.md'}"


if __name__ == "__main__":
    main()
