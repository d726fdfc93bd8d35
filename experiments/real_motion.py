"""``make real-motion``: do the features a recipe learns without labels serve recorded human motion?

One encoder per seed is pretrained on the real-motion sets of ``../shared/data`` (UTKinect, Florence3D:
stick-figure renders of recorded Kinect skeletons, see each set's SOURCE.md; ``--synthetic`` mixes the
synthetic benchmark in), train splits only and no labels, with equal set weights and the recipe
``recipes/pretrain/real_motion_cpu.yaml`` (``--recipe`` another). Every encoder snapshot the run exports
(``export_epochs``) and its final encoder are probed on every set's cross-subject test split with the linear
and the attentive probe (:mod:`experiments.curve`), against a random encoder of the same size (seeded like
the run) and raw pixels. The table gives the final encoder's mean and spread over seeds with the gaps the
issue asks for (pretrained - raw pixels, pretrained - random init, final - its own epoch 0), and the mean
learning curve over seeds.

Stages resume: built shards, finished runs, probed snapshots and cached features are reused. Writes
``<out>/table.md``, ``<out>/table.json`` and ``<out>/curves.png``; each seed's curve and probe reports stay
under ``<out>/seed<S>/curve/``.
"""

from __future__ import annotations

import argparse
import json
import logging
import time
from pathlib import Path

import numpy as np
import yaml

from mgfm.cli import one_line_errors
from mgfm.config import load_recipe, recipe_to_dict
from mgfm.evaluate.metrics import mean_ci
from mgfm.evaluate.probe_eval import PROBES
from mgfm.evaluate.raw_pixels import ROW as PIXEL_ROW
from mgfm.files import write_atomic
from mgfm.pipeline import build_default_shards, default_workers, pretrain
from mgfm.report import markdown_table, plus_minus
from mgfm.shards import BuildConfig, build_shards
from mgfm.shards.read import set_name
from mgfm.sources.formats import read_source_index
from mgfm.train.recipe import PretrainRecipe
from mgfm.errors import InputError
from mgfm.runtime import setup_logging

from experiments.curve import REFERENCES, curve, curve_markdown, plot_curve, probe_snapshot, snapshots

log = logging.getLogger("experiments.real_motion")
REPO = Path(__file__).resolve().parents[1]
REAL_SETS = ("utkinect", "florence3d")
ROWS = ("pretrained", "epoch 0", *REFERENCES)


def real_shards(shared: Path, shards_dir: Path, names: tuple[str, ...] = REAL_SETS) -> list[Path]:
    """The probed sets' shards: a name is built (or resumed) from ``<shared>/<name>/index.csv`` as the issue
    measured them (generic clip CSV, short side 112); a path to a built shard folder (one with a
    ``manifest.json``, e.g. a pose set built by ``tools/``) is taken as it is. A missing set is a one-line
    error naming where it was looked for."""
    out = []
    for name in names:
        if Path(name, "manifest.json").exists():
            out.append(Path(name))
            continue
        index = (shared / name / "index.csv").resolve()
        if not index.exists():
            raise InputError(f"{index}: no such file; real-motion needs ../shared/data/{name} (see its SOURCE.md), "
                             f"--shared DIR, or a built shard folder")
        target = shards_dir / name
        build_shards(read_source_index("csv", index), target, BuildConfig(short_side=112, workers=default_workers()),
                     source={"format": "csv", "index": str(index)})
        out.append(target)
    return out


def pretrain_seed(seed: int, sets: list[Path] | None, out: Path, recipe_path: Path, synthetic_data: str | None,
                  overrides: list[str]) -> Path:
    """Pretrain (or resume, or find finished) the run of ``seed`` on the train splits of ``sets`` in equal
    weights (None: on the recipe's own shards, a corpus); returns its run folder."""
    data = [] if sets is None else [f"shards=[{','.join(str(s) for s in sets)}]",
                                    f"shard_weights=[{','.join('1' for _ in sets)}]"]
    recipe = load_recipe(PretrainRecipe, recipe_path, [
        *data, f"synthetic_data={synthetic_data or 'null'}", f"seed={seed}", f"name=seed{seed}", f"out_dir={out}",
        *overrides])
    run_dir = Path(recipe.out_dir) / recipe.name
    saved = run_dir / "recipe.yaml"
    if ((run_dir / "summary.json").exists() and (run_dir / "encoder" / "config.json").exists()
            and yaml.safe_load(saved.read_text()) == recipe_to_dict(recipe)):
        log.info("%s: finished with this recipe; reused", run_dir)  # without decoding its data again
        return run_dir
    return pretrain(recipe)


def summarise(scores: dict[str, dict[str, dict[str, list[float]]]],
              outcomes: dict[str, dict[str, dict[str, list[list[int]]]]]) -> tuple[list[str], list[list], dict]:
    """``scores[set][probe][row]`` = top-1 per seed and ``outcomes[set][probe][row]`` = each seed's per-clip 0/1
    outcomes (rows: the final encoder, its epoch 0, the references) -> (headers, table rows, json summary).
    A row's interval is that of its mean over seeds (:func:`~mgfm.evaluate.metrics.mean_ci`); a gain over a
    reference holds only where the two intervals do not overlap."""
    headers = ["set", "probe", "seeds", *ROWS, "pretrained - pixels", "pretrained - random", "final - epoch 0"]
    rows, summary = [], {}
    for name, by_probe in scores.items():
        for probe, by_row in by_probe.items():
            mean = {row: float(np.mean(v)) for row, v in by_row.items()}
            spread = {row: float(np.std(v)) for row, v in by_row.items()}
            ci = {row: list(mean_ci(outcomes[name][probe][row])) for row in by_row}
            gaps, holds = {}, {}
            for gap, ref in (("pixels", PIXEL_ROW), ("random", "random init"), ("epoch0", "epoch 0")):
                gaps[gap] = mean["pretrained"] - mean[ref]
                holds[gap] = ci["pretrained"][0] > ci[ref][1] or ci["pretrained"][1] < ci[ref][0]
            summary.setdefault(name, {})[probe] = {"per_seed": by_row, "mean": mean, "std": spread, "ci95": ci,
                                                   "gap": gaps, "intervals_apart": holds}
            rows.append([name, probe, len(by_row["pretrained"]),
                         *[f"{plus_minus(mean[r], ci[r], 100, 1)} (sd {100 * spread[r]:.1f})" for r in ROWS],
                         *[f"{100 * gaps[g]:+.1f}{'' if holds[g] else ' (overlap)'}" for g in gaps]])
    return headers, rows, summary


def _add(scores: dict[str, list[float]], outcomes: dict[str, list[list[int]]],
         rows: dict[str, tuple[float, list[int]]]) -> None:
    """Append one seed's top-1 and per-clip outcomes to each row."""
    for row, (top1, correct) in rows.items():
        scores[row].append(top1)
        outcomes[row].append(correct)


def mean_curve(curves: list[dict]) -> dict:
    """The seeds' learning curves (:func:`experiments.curve.curve` results, with their per-clip outcomes)
    averaged at the epochs all share, each point with the 95% interval of its mean over seeds."""
    epochs = sorted(set.intersection(*(set(c["epochs"]) for c in curves)))
    scores: dict = {}
    for name, by_probe in curves[0]["scores"].items():
        for probe in by_probe:
            def at(c, e, key="scores"):
                block = c[key][name][probe]["pretrained"]
                return block[c["epochs"].index(e)]
            entry = {"pretrained": [float(np.mean([at(c, e) for c in curves])) for e in epochs],
                     "pretrained ci95": [list(mean_ci([at(c, e, "correct") for c in curves])) for e in epochs]}
            for ref in REFERENCES:
                entry[ref] = float(np.mean([c["scores"][name][probe][ref] for c in curves]))
                entry[f"{ref} ci95"] = list(mean_ci([c["correct"][name][probe][ref] for c in curves]))
            scores.setdefault(name, {})[probe] = entry
    return {"run": f"mean of {len(curves)} seeds", "epochs": epochs, "seed": "all", "scores": scores}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="experiments.real_motion", description=__doc__.splitlines()[0])
    parser.add_argument("--shared", type=Path, default=REPO.parent / "shared" / "data",
                        help="folder holding utkinect/ and florence3d/ (default: ../shared/data)")
    parser.add_argument("--real", default=",".join(REAL_SETS),
                        help="the probed sets: folders of --shared, or built shard folders")
    parser.add_argument("--corpus", action="store_true",
                        help="pretrain on the recipe's own shards (a corpus) instead of the probed sets' train splits")
    parser.add_argument("--synthetic", action=argparse.BooleanOptionalAction, default=False,
                        help="mix the synthetic benchmark in (and probe on it)")
    parser.add_argument("--shards-dir", type=Path, default=Path("shards"), help="where the shard sets live")
    parser.add_argument("--synthetic-data", default="data/synthetic", help="synthetic benchmark folder")
    parser.add_argument("--out", type=Path, default=Path("runs/real-motion"), help="runs, features and the table")
    parser.add_argument("--seeds", default="0,1,2", help="pretraining seeds (comma-separated)")
    parser.add_argument("--probes", default="linear,attentive", help="linear and/or attentive")
    parser.add_argument("--curve-probes", default=None,
                        help="the probes measured at every snapshot (default: all of --probes); the others are "
                             "measured at epoch 0 and the final encoder only")
    parser.add_argument("--recipe", type=Path, default=REPO / "recipes" / "pretrain" / "real_motion_cpu.yaml")
    parser.add_argument("overrides", nargs="*", help="key=value overrides for the pretraining recipe")
    args = parser.parse_args(argv)
    setup_logging()
    with one_line_errors("experiments.real_motion"):
        print(run(args))


def run(args: argparse.Namespace) -> str:
    seeds = [s.strip() for s in str(args.seeds).split(",") if s.strip()]
    probes = [p.strip() for p in args.probes.split(",") if p.strip()]
    if not probes or any(p not in PROBES for p in probes):
        raise InputError(f"--probes: expected linear and/or attentive, got {args.probes!r}")
    on_curve = probes if args.curve_probes is None else [p.strip() for p in args.curve_probes.split(",") if p.strip()]
    if not on_curve or not set(on_curve) <= set(probes):
        raise InputError(f"--curve-probes: expected some of --probes ({','.join(probes)}), got {args.curve_probes!r}")
    if not seeds or not all(s.isdigit() for s in seeds):
        raise InputError(f"--seeds: expected comma-separated integers, got {args.seeds!r}")
    seeds = [int(s) for s in seeds]
    start = time.time()
    sets = real_shards(args.shared, args.shards_dir, tuple(n.strip() for n in args.real.split(",") if n.strip()))
    if args.synthetic:  # rendered first when missing
        build_default_shards(args.synthetic_data, args.shards_dir / "synthetic")
        sets = [args.shards_dir / "synthetic", *sets]
    timings = {"shards": time.time() - start}
    scores: dict = {set_name(s): {p: {row: [] for row in ROWS} for p in probes} for s in sets}
    outcomes: dict = {set_name(s): {p: {row: [] for row in ROWS} for p in probes} for s in sets}
    curves = []
    for seed in seeds:
        start = time.time()
        run_dir = pretrain_seed(seed, None if args.corpus else sets, args.out, args.recipe,
                                args.synthetic_data if args.synthetic else None, args.overrides)
        timings[f"pretrain seed {seed}"] = time.time() - start
        start = time.time()
        curves.append(curve(run_dir, [str(s) for s in sets], on_curve))
        for name, by_probe in curves[-1]["scores"].items():
            for probe, entry in by_probe.items():
                seen = curves[-1]["correct"][name][probe]
                _add(scores[name][probe], outcomes[name][probe], {
                    "pretrained": (entry["pretrained"][-1], seen["pretrained"][-1]),
                    "epoch 0": (entry["pretrained"][0], seen["pretrained"][0]),
                    **{ref: (entry[ref], seen[ref]) for ref in REFERENCES}})
        found = snapshots(run_dir)
        for probe in (p for p in probes if p not in on_curve):  # the ends of the run only: its own start and end
            for shards in sets:
                first = probe_snapshot(run_dir, *found[0], str(shards), probe, seed, references=True)
                last = probe_snapshot(run_dir, *found[-1], str(shards), probe, seed, references=False)
                _add(scores[set_name(shards)][probe], outcomes[set_name(shards)][probe], {
                    "pretrained": (last["pretrained"]["top1"], last["pretrained"]["correct"]),
                    "epoch 0": (first["pretrained"]["top1"], first["pretrained"]["correct"]),
                    **{ref: (first[ref]["top1"], first[ref]["correct"]) for ref in REFERENCES}})
        timings[f"probes seed {seed}"] = time.time() - start
    headers, rows, summary = summarise(scores, outcomes)
    table = markdown_table(headers, rows)
    mean = mean_curve(curves)
    plot_curve(mean, args.out / "curves.png")
    write_atomic(args.out / "table.json", json.dumps({"seeds": seeds, "probes": probes, "curve_probes": on_curve,
                                                      "overrides": args.overrides,
                                                      "recipe": str(args.recipe), "sets": summary, "curve": mean,
                                                      "seconds": timings}, indent=1))
    write_atomic(args.out / "table.md", (
        f"# Real motion: frozen probes of encoders pretrained without labels\n\nSeeds {seeds}; pretraining recipe "
        f"`{args.recipe.name}` {' '.join(args.overrides)} on "
        f"{'its own shards (a corpus)' if args.corpus else ', '.join(set_name(s) for s in sets) + ' (equal weights)'}; "
        f"test top-1 in %: the mean over seeds ± half its 95% interval (bootstrap over the test clips, all seeds "
        f"resampled together), and the seeds' standard deviation; `epoch 0` is each run's own initialisation. A "
        f"gap marked (overlap) is within the intervals.\n\n{table}\n\n"
        f"## Learning curve, mean over seeds\n\n{curve_markdown(mean, 'curves.png')}\n"
        + markdown_table(["stage", "seconds"], [[k, round(v)] for k, v in timings.items()]) + "\n"))
    return table + f"\n\ntable: {args.out / 'table.md'}"


if __name__ == "__main__":
    main()
