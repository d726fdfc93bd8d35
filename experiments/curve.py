"""Learning curves: frozen probes of the encoder snapshots a pretraining run exported (``export_epochs``).

For every ``runs/<name>/encoders/epoch_NNNNN`` (and the final ``encoder/``), each probe (linear and/or
attentive, :mod:`mgfm.evaluate.probe_eval`) is fitted on each shard set's train split and scored on its test
split, with the reference rows of the same geometry (a random encoder seeded like the run, raw pixels)
measured once per set. Snapshots are probed as they land: rerunning probes only the new ones (each probe's
report stays under ``<run>/curve/<epoch>/<probe>/<set>/`` and is reused; features are cached under
``<run>/features``). Writes ``<run>/curve/report.json``, ``report.md`` and ``curve.png``.

CLI: ``python -m experiments.curve runs/NAME [runs/OTHER ...] [--shards shards/utkinect,shards/florence3d]
[--probes linear,attentive] [--block N]``  (``--block``: probe the tokens after encoder block N instead of
the last one; kept apart under ``<run>/curve-blockN/``); ``--compare OUT.png`` also draws the runs' curves side by side, with
``--add FILE.json`` for curves kept as files (a curve ``report.json``, or a JSON list of curves).
"""

from __future__ import annotations

import argparse
import json
import logging
import re
from pathlib import Path

import yaml

from mgfm.cli import one_line_errors
from mgfm.errors import InputError
from mgfm.evaluate.probe_eval import PROBES, ProbeRecipe
from mgfm.evaluate.probe_eval import run as run_probe
from mgfm.evaluate.raw_pixels import ROW as PIXEL_ROW
from mgfm.report import markdown_table, plus_minus, save_figure, write_report
from mgfm.shards.read import set_name
from mgfm.runtime import setup_logging

log = logging.getLogger(__name__)
SNAPSHOT = re.compile(r"^epoch_(\d+)$")
REFERENCES = ("random init", PIXEL_ROW)
DEFAULT_SETS = ("shards/utkinect", "shards/florence3d")


def snapshots(run_dir: Path) -> list[tuple[int, Path]]:
    """``[(epoch, encoder folder)]`` of a run, oldest first: its exported snapshots, then the final encoder
    (at the recipe's last epoch) when no snapshot of that epoch exists."""
    found = []
    folder = run_dir / "encoders"
    for path in sorted(folder.iterdir()) if folder.is_dir() else []:
        match = SNAPSHOT.match(path.name)
        if match and (path / "config.json").exists():
            found.append((int(match.group(1)), path))
    final = run_dir / "encoder"
    recipe = run_dir / "recipe.yaml"
    if (final / "config.json").exists() and recipe.exists():
        epochs = int(yaml.safe_load(recipe.read_text())["optim"]["epochs"])
        if epochs not in {e for e, _ in found}:
            found.append((epochs, final))
    if not found:
        raise InputError(f"{run_dir}: no encoder snapshots (encoders/epoch_NNNNN/ or encoder/); pretrain with "
                         f"export_epochs=[...]")
    return found


def curve_folder(run_dir: Path, block: int | None = None) -> Path:
    """Where a run's curve is kept: ``<run>/curve``, or ``<run>/curve-blockN`` for block ``N``'s tokens."""
    return run_dir / ("curve" if block is None else f"curve-block{block}")


def probe_snapshot(run_dir: Path, epoch: int, encoder: Path, shards: str, probe: str, seed: int,
                   references: bool, block: int | None = None) -> dict[str, dict]:
    """``{row: {"top1", "ci95", "correct"}}`` of one probe of one snapshot on one shard set (test top-1, its
    95% bootstrap interval over the test clips, each clip's 0/1 outcome), with the reference rows when
    ``references`` (the report is reused when it is there and has what is asked)."""
    out = curve_folder(run_dir, block) / f"epoch_{epoch:05d}" / probe / set_name(shards)
    report_file = out / "report.json"
    report = json.loads(report_file.read_text()) if report_file.exists() else None
    if not (report and report.get("encoder") == str(encoder) and "correct" in report["results"]["pretrained"]["probe"]
            and (not references or set(REFERENCES) <= set(report["results"]))):
        report = run_probe(ProbeRecipe(run=str(encoder), shards=shards, probe=probe, seed=seed, kmeans=False,
                                       references=references, out=str(out), features_dir=str(run_dir / "features"),
                                       block=block))
    return {row: {"top1": r["probe"]["top1"], "ci95": r["probe"]["top1_ci95"], "correct": r["probe"]["correct"]}
            for row, r in report["results"].items()}


def curve(run_dir: Path, sets: list[str], probes: list[str], block: int | None = None) -> dict:
    """Probe every snapshot of ``run_dir`` on every set with every probe (reading the tokens after encoder
    block ``block``; None = the last); returns (and writes) the curve:
    ``{"epochs": [...], "scores": {set: {probe: {"pretrained": [...], "pretrained ci95": [[lo, hi], ...],
    "random init": x, "random init ci95": [lo, hi], "raw pixels": x, "raw pixels ci95": [lo, hi]}}}}``
    (test top-1 and its 95% bootstrap interval over the test clips). The references (the same for every
    snapshot of a run) are fitted once, with the first snapshot. The returned curve also holds ``"correct"``:
    each test clip's 0/1 outcome per row (``{set: {probe: {"pretrained": [per epoch], ref: [...]}}}``), for
    intervals over seeds; the written report leaves them to the probe reports."""
    recipe_file = run_dir / "recipe.yaml"
    seed = int(yaml.safe_load(recipe_file.read_text()).get("seed", 0)) if recipe_file.exists() else 0
    found = snapshots(run_dir)
    scores: dict = {set_name(s): {p: {"pretrained": [], "pretrained ci95": []} for p in probes} for s in sets}
    correct: dict = {set_name(s): {p: {"pretrained": []} for p in probes} for s in sets}
    for i, (epoch, encoder) in enumerate(found):
        for shards in sets:
            for probe in probes:
                rows = probe_snapshot(run_dir, epoch, encoder, shards, probe, seed, references=i == 0, block=block)
                entry = scores[set_name(shards)][probe]
                entry["pretrained"].append(rows["pretrained"]["top1"])
                entry["pretrained ci95"].append(rows["pretrained"]["ci95"])
                outcomes = correct[set_name(shards)][probe]
                outcomes["pretrained"].append(rows["pretrained"]["correct"])
                for ref in REFERENCES:
                    if ref in rows and ref not in entry:
                        entry[ref], entry[f"{ref} ci95"] = rows[ref]["top1"], rows[ref]["ci95"]
                        outcomes[ref] = rows[ref]["correct"]
        log.info("%s epoch %d probed", run_dir.name, epoch)
    result = {"run": str(run_dir), "epochs": [e for e, _ in found], "seed": seed, "block": block, "scores": scores}
    out = curve_folder(run_dir, block)
    plot_curve(result, out / "curve.png")
    write_report(out, result, curve_markdown(result), f"Learning curve of {curve_label(result)}")
    return {**result, "correct": correct}


def pct(entry: dict, key: str, index: int | None = None) -> str:
    """``entry[key]`` (or its ``index``-th value) in per cent as ``a ± b`` (b: half the 95% interval kept
    beside it as ``"<key> ci95"``; just ``a`` for curves kept without intervals)."""
    value, interval = entry[key], entry.get(f"{key} ci95")
    if index is not None:
        value, interval = value[index], interval[index] if interval else None
    return plus_minus(value, interval, scale=100, digits=1)


def curve_markdown(result: dict, image: str = "curve.png") -> str:
    """One table per probe: a row per set, a column per epoch, then the references (test top-1 % ± half the
    95% bootstrap interval over the test clips); ``image`` the plot."""
    epochs = result["epochs"]
    parts = []
    for probe in next(iter(result["scores"].values())):
        headers = ["set", *[f"epoch {e}" for e in epochs], *REFERENCES, "final - epoch 0"]
        rows = []
        for name, by_probe in result["scores"].items():
            entry = by_probe[probe]
            curve_ = entry["pretrained"]
            rows.append([name, *[pct(entry, "pretrained", i) for i in range(len(curve_))],
                         *[pct(entry, r) for r in REFERENCES], f"{100 * (curve_[-1] - curve_[0]):+.1f}"])
        parts.append(f"### {PROBES[probe]} (test top-1 % ± 95% interval)\n\n" + markdown_table(headers, rows))
    block = f", tokens read after encoder block {result['block']}" if result.get("block") else ""
    return (f"Run `{result['run']}`, seed {result['seed']}{block}.\n\n" + "\n\n".join(parts)
            + f"\n\n![curve]({image})\n")


def curve_label(result: dict) -> str:
    """A curve's name in titles and legends: the run's folder name, and the block when not the last."""
    return Path(result["run"]).name + (f" (block {result['block']})" if result.get("block") else "")


def _epoch_axes(ax, title: str, **title_style) -> None:
    """The learning-curve axes: epochs on a symlog axis (0 and 25 stay apart from 800), top-1 % up."""
    ax.set_xscale("symlog", linthresh=50)
    ax.set_title(title, **title_style)
    ax.set_xlabel("pretraining epoch")
    ax.set_ylabel("test top-1 %")
    ax.grid(alpha=0.3)


def _line(ax, epochs: list[int], entry: dict, key: str, colour: str, label: str, ms: float = 5) -> None:
    """A curve of top-1 %, its 95% intervals as error bars where it has them."""
    values = [100 * v for v in entry[key]]
    intervals = entry.get(f"{key} ci95")
    if intervals:
        err = [[v - 100 * lo for v, (lo, _) in zip(values, intervals)], [100 * hi - v for v, (_, hi) in zip(values, intervals)]]
        ax.errorbar(epochs, values, yerr=err, fmt="o-", color=colour, ms=ms, capsize=2, lw=1.2, label=label)
    else:
        ax.plot(epochs, values, "o-", color=colour, ms=ms, label=label)


def _reference(ax, entry: dict, ref: str, colour: str, style: str, label: str) -> None:
    """A reference row as a horizontal line, its 95% interval as a faint band where it has one."""
    ax.axhline(100 * entry[ref], color=colour, ls=style, lw=1, label=label)
    interval = entry.get(f"{ref} ci95")
    if interval:
        ax.axhspan(100 * interval[0], 100 * interval[1], color=colour, alpha=0.07)


def plot_curve(result: dict, path: Path) -> None:
    """One panel per set: each probe's curve over epochs, its references as dashed lines."""
    # deferred on purpose: matplotlib is slow to import and only plots need it
    from matplotlib.figure import Figure

    sets = list(result["scores"])
    fig = Figure(figsize=(4.2 * len(sets), 3.3), dpi=110)
    epochs = result["epochs"]
    for i, name in enumerate(sets):
        ax = fig.add_subplot(1, len(sets), i + 1)
        for j, (probe, entry) in enumerate(result["scores"][name].items()):
            colour = f"C{j}"
            _line(ax, epochs, entry, "pretrained", colour, probe)
            for ref, style in zip(REFERENCES, (":", "--")):
                _reference(ax, entry, ref, colour, style, f"{probe}: {ref}")
        _epoch_axes(ax, name)
    fig.axes[0].legend(fontsize=6)
    fig.suptitle(curve_label(result), fontsize=9)
    fig.tight_layout()
    save_figure(fig, path)


def load_curves(path: Path) -> list[dict]:
    """The curves in ``path``: a curve ``report.json`` (one curve) or a JSON list of curves (the same keys)."""
    try:
        data = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise InputError(f"{path}: cannot read a curve: {exc}") from None
    curves = data if isinstance(data, list) else [data]
    for c in curves:
        if not isinstance(c, dict) or not {"run", "epochs", "scores"} <= set(c):
            raise InputError(f"{path}: not a curve (expected the keys run, epochs, scores)")
    return curves


def plot_comparison(results: list[dict], path: Path) -> None:
    """A panel per (probe, set): one line per run, the first run's references as grey lines."""
    # deferred on purpose: matplotlib is slow to import and only plots need it
    from matplotlib.figure import Figure

    sets = list(dict.fromkeys(name for r in results for name in r["scores"]))
    probes = [p for p in PROBES if any(p in r["scores"].get(name, {}) for r in results for name in sets)]
    fig = Figure(figsize=(4.4 * len(sets), 3.4 * len(probes)), dpi=110)
    for row, probe in enumerate(probes):
        for col, name in enumerate(sets):
            ax = fig.add_subplot(len(probes), len(sets), row * len(sets) + col + 1)
            drawn_refs = False
            for k, result in enumerate(results):
                entry = result["scores"].get(name, {}).get(probe)
                if entry is None:
                    continue
                _line(ax, result["epochs"][:len(entry["pretrained"])], entry, "pretrained", f"C{k}",
                      curve_label(result), ms=3)
                if not drawn_refs:
                    for ref, style in zip(REFERENCES, (":", "--")):
                        _reference(ax, entry, ref, "grey", style, f"{ref} (first run)")
                    drawn_refs = True
            _epoch_axes(ax, f"{name}, {probe} probe", fontsize=9)
    fig.axes[0].legend(fontsize=6)
    fig.tight_layout()
    save_figure(fig, path)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="experiments.curve", description=__doc__.splitlines()[0])
    parser.add_argument("runs", nargs="*", type=Path, help="run folders (runs/<name>)")
    parser.add_argument("--shards", default=",".join(DEFAULT_SETS), help="comma-separated shard sets to probe on")
    parser.add_argument("--probes", default="linear,attentive", help="linear and/or attentive")
    parser.add_argument("--block", type=int, help="probe the tokens after this encoder block (default: the last)")
    parser.add_argument("--compare", type=Path, help="also draw all the curves side by side into this PNG")
    parser.add_argument("--add", type=Path, action="append", default=[],
                        help="with --compare: curves kept as files (a curve report.json or a JSON list of curves)")
    args = parser.parse_args(argv)
    setup_logging()
    probes = [p.strip() for p in args.probes.split(",") if p.strip()]
    if not probes or any(p not in PROBES for p in probes):
        raise SystemExit(f"experiments.curve: error: --probes: expected linear and/or attentive, got {args.probes!r}")
    if not args.runs and not args.add:
        parser.error("name at least one run folder (or --add FILE with --compare)")
    if args.add and not args.compare:
        parser.error("--add is drawn only with --compare OUT.png")
    sets = [s.strip() for s in args.shards.split(",") if s.strip()]
    if args.block is not None and args.block < 1:
        parser.error(f"--block: expected >= 1 (1 = the first encoder block), got {args.block}")
    with one_line_errors("experiments.curve"):
        results = [curve(run_dir, sets, probes, args.block) for run_dir in args.runs]
        for result in results:
            print(curve_markdown(result))
        if args.compare:
            plot_comparison([*results, *(c for f in args.add for c in load_curves(f))], args.compare)
            print(f"comparison: {args.compare}")


if __name__ == "__main__":
    main()
