"""``make demo``: the whole main job on the embedded synthetic micro-gesture benchmark.

Stages, each skipped when its output is already complete (rerunning resumes):

1. ``data``: render the synthetic benchmark (iMiGUE format) and print its statistics;
2. ``shards``: cut and shard its clips (WebDataset, manifest);
3. ``pretrain``: masked video pretraining of the tiny encoder (recipes/pretrain/tiny_cpu.yaml), its encoder
   before the first step kept too (``export_epochs`` 0: ``<run>/encoders/epoch_00000``);
4. ``eval``: frozen-encoder linear probe + k-means of the trained encoder and of its step 0, against
   random-init and raw-pixel references;
5. ``retrieval``: a FAISS index over the train clips queried with the test clips (same cached features);
6. ``emotion``: video-level emotion heads over the same cached clip features (``mgfm.evaluate.emotion_eval``).

Finally ``<runs>/<run>/demo_summary.md`` gathers the numbers and splits the gain over random init into what
the encoder's start gives (step 0: the tiny default's motion-PCA tubelet embedding) and what the training
steps add.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import time
from pathlib import Path

from mgfm.cli import one_line_errors
from mgfm.config import load_recipe
from mgfm.evaluate.emotion_eval import EmotionRecipe
from mgfm.evaluate.emotion_eval import run as run_emotion
from mgfm.evaluate.probe_eval import ProbeRecipe, summary_rows
from mgfm.evaluate.probe_eval import run as run_probe
from mgfm.evaluate.retrieval_eval import RetrievalRecipe
from mgfm.evaluate.retrieval_eval import run as run_retrieval
from mgfm.evaluate.retrieval_eval import summary_rows as retrieval_rows
from mgfm.files import write_atomic
from mgfm.pipeline import build_default_shards, ensure_synthetic, pretrain
from mgfm.report import markdown_table
from mgfm.shards.read import set_name
from mgfm.train.pretrain import snapshot_folder
from mgfm.train.recipe import PretrainRecipe
from mgfm.sources.clip_index import format_summary
from mgfm.runtime import setup_logging

log = logging.getLogger("mgfm.demo")
STAGES = ("data", "shards", "pretrain", "eval", "retrieval", "emotion")
REPO = Path(__file__).resolve().parents[1]


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="mgfm.demo", description=__doc__.splitlines()[0])
    parser.add_argument("--data", default="data/synthetic", help="synthetic benchmark folder")
    parser.add_argument("--shards", default="shards/synthetic", help="shard folder")
    parser.add_argument("--recipe", default=str(REPO / "recipes" / "pretrain" / "tiny_cpu.yaml"),
                        help="pretraining recipe")
    parser.add_argument("--until", choices=STAGES, default=STAGES[-1], help="last stage to run")
    parser.add_argument("overrides", nargs="*", help="key=value overrides for the pretraining recipe")
    args = parser.parse_args(argv)
    setup_logging()
    with one_line_errors("mgfm.demo"):
        run(args)


def run(args: argparse.Namespace) -> None:
    """The demo's stages up to ``args.until``."""
    last = STAGES.index(args.until)
    timings: dict[str, float] = {}

    start = time.time()
    index = ensure_synthetic(args.data)
    print(format_summary(index.summary()), flush=True)
    timings["data"] = time.time() - start
    if last < STAGES.index("shards"):
        return

    start = time.time()
    manifest = build_default_shards(args.data, args.shards)
    print(f"shards: {args.shards}: " + ", ".join(f"{s} {v['samples']} clips in {len(v['shards'])} shards"
                                                 for s, v in manifest["splits"].items()), flush=True)
    timings["shards"] = time.time() - start
    if last < STAGES.index("pretrain"):
        return

    start = time.time()
    recipe = load_recipe(PretrainRecipe, args.recipe, [f"shards={args.shards}", f"synthetic_data={args.data}",
                                                       *args.overrides])
    # the encoder before its first step too: the summary says what the start gives and what training adds
    recipe = dataclasses.replace(recipe, export_epochs=sorted({0, *recipe.export_epochs}))
    run_dir = pretrain(recipe)
    timings["pretrain"] = time.time() - start
    if last < STAGES.index("eval"):
        return

    start = time.time()
    report = run_probe(ProbeRecipe(run=str(run_dir), shards=args.shards))
    step0 = probe_step0(run_dir, args.shards)
    timings["eval"] = time.time() - start
    retrieval = None
    if last >= STAGES.index("retrieval"):
        start = time.time()
        retrieval = run_retrieval(RetrievalRecipe(run=str(run_dir), shards=args.shards))
        timings["retrieval"] = time.time() - start
    emotion = None
    if last >= STAGES.index("emotion"):
        start = time.time()
        emotion = run_emotion(EmotionRecipe(run=str(run_dir), shards=args.shards))
        timings["emotion"] = time.time() - start
    start_name = "step 0 (motion-PCA start)" if recipe.patch_init == "motion_pca" else "step 0 (its random init)"
    write_summary(run_dir, index.summary(), report, timings, emotion, retrieval, step0, start_name)


def probe_step0(run_dir: Path, shards: str) -> dict | None:
    """The linear probe report (+ k-means) of the run's encoder before its first step (no references; features
    cached beside the run's), or None when the run kept no such snapshot (one made before the demo asked)."""
    folder = snapshot_folder(run_dir, 0)
    if not (folder / "config.json").exists():
        log.warning("%s: no encoder of step 0 (pretrained before the demo kept one); the summary cannot split "
                    "the gain (delete the run folder to pretrain it again)", run_dir)
        return None
    return run_probe(ProbeRecipe(run=str(folder), shards=shards, references=False,
                                 features_dir=str(run_dir / "features"),
                                 out=str(run_dir / "eval-step0" / set_name(shards))))


def gain_lines(results: dict[str, dict], steps: int, start_name: str) -> list[str]:
    """Where the linear-probe top-1 gain over random init comes from: the encoder's start (``start_name``, the
    row of the encoder before its first step, when ``results`` has it) and the ``steps`` training steps."""
    top1 = {name: entry["probe"]["top1"] for name, entry in results.items()}
    if "random init" not in top1:
        return []
    gain = top1["pretrained"] - top1["random init"]
    if start_name not in top1:
        return [f"Linear-probe top-1 gain over random init: {100 * gain:+.1f} points (start and training not "
                f"told apart: this run kept no encoder of step 0)."]
    start = top1[start_name] - top1["random init"]
    trained_ci, start_ci = (results[name]["probe"].get("top1_ci95") for name in ("pretrained", start_name))
    overlap = trained_ci and start_ci and trained_ci[0] <= start_ci[1] and start_ci[0] <= trained_ci[1]
    within = " (within the two rows' 95% intervals)" if overlap else ""
    return [f"Linear-probe top-1 gain over random init: {100 * gain:+.1f} points: {100 * start:+.1f} from the "
            f"encoder's start, before any step (row `{start_name}`), {100 * (gain - start):+.1f} from the {steps} "
            f"pretraining steps (row `pretrained`){within}."]


def write_summary(run_dir: Path, data_summary: dict, probe_report: dict, timings: dict[str, float],
                  emotion_report: dict | None = None, retrieval_report: dict | None = None,
                  step0_report: dict | None = None, start_name: str = "step 0") -> Path:
    """``<run>/demo_summary.md``: the data, pretraining, the probe table (the trained encoder, its step 0 when
    ``step0_report`` is given, the references) with where the gain comes from, retrieval, emotion, stage times."""
    results = dict(probe_report["results"])
    if step0_report is not None:  # the step-0 row right below the trained encoder's
        pretrained = results.pop("pretrained")
        results = {"pretrained": pretrained, start_name: step0_report["results"]["pretrained"], **results}
    has_without = "without" in results["pretrained"]["probe"]
    headers, rows = summary_rows(results, has_without)
    pretrain_summary = json.loads((run_dir / "summary.json").read_text())
    lines = [
        "# mgfm demo summary", "",
        f"Data: {data_summary['clips']} clips, {data_summary['videos']} videos, {data_summary['subjects']} subjects "
        f"({', '.join(f'{k} {v}' for k, v in data_summary['clips_per_split'].items())}).", "",
        f"Pretraining: {pretrain_summary['steps']} steps, final loss {pretrain_summary['final_loss']:.4f}, "
        f"{pretrain_summary['clips_per_s']:.1f} clips/s.", "",
        "## Frozen-encoder recognition (test split)", "", markdown_table(headers, rows), "",
        *gain_lines(results, pretrain_summary["steps"], start_name), "",
    ]
    if retrieval_report is not None:
        r_headers, r_rows = retrieval_rows(retrieval_report["results"], retrieval_report["ks"])
        lines += ["## Retrieval (test clips querying the train index, cosine)", "", markdown_table(r_headers, r_rows), ""]
    if emotion_report is not None:
        lines += ["## Video-level emotion (emotion-test videos)", "",
                  markdown_table(emotion_report["summary"]["headers"], emotion_report["summary"]["rows"]), "",
                  *[f"- {line}" for line in emotion_report["gains"]], ""]
    lines += [
        "## Time per stage", "", markdown_table(["stage", "seconds"], [[k, f"{v:.1f}"] for k, v in timings.items()]),
    ]
    path = write_atomic(run_dir / "demo_summary.md", "\n".join(lines) + "\n")
    print(f"demo summary: {path}")
    return path


if __name__ == "__main__":
    main()
