"""``make demo``: the whole main job on the embedded synthetic micro-gesture benchmark.

Stages, each skipped when its output is already complete (rerunning resumes):

1. ``data``: render the synthetic benchmark (iMiGUE format) and print its statistics;
2. ``shards``: cut and shard its clips (WebDataset, manifest);
3. ``pretrain``: masked video pretraining of the tiny encoder (recipes/pretrain/tiny_cpu.yaml);
4. ``eval``: frozen-encoder linear probe + k-means against random-init and raw-pixel references;
5. ``retrieval``: a FAISS index over the train clips queried with the test clips (same cached features);
6. ``emotion``: video-level emotion heads over the same cached clip features (``mgfm.evaluate.emotion_eval``).

Finally ``<runs>/<run>/demo_summary.md`` gathers the numbers.
"""

from __future__ import annotations

import argparse
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
    run_dir = pretrain(recipe)
    timings["pretrain"] = time.time() - start
    if last < STAGES.index("eval"):
        return

    start = time.time()
    report = run_probe(ProbeRecipe(run=str(run_dir), shards=args.shards))
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
    write_summary(run_dir, index.summary(), report, timings, emotion, retrieval)


def write_summary(run_dir: Path, data_summary: dict, probe_report: dict, timings: dict[str, float],
                  emotion_report: dict | None = None, retrieval_report: dict | None = None) -> Path:
    results = probe_report["results"]
    has_without = "without" in results["pretrained"]["probe"]
    headers, rows = summary_rows(results, has_without)
    pretrain_summary = json.loads((run_dir / "summary.json").read_text())
    gain = results["pretrained"]["probe"]["top1"] - results.get("random init", {}).get("probe", {}).get("top1", 0.0)
    lines = [
        "# mgfm demo summary", "",
        f"Data: {data_summary['clips']} clips, {data_summary['videos']} videos, {data_summary['subjects']} subjects "
        f"({', '.join(f'{k} {v}' for k, v in data_summary['clips_per_split'].items())}).", "",
        f"Pretraining: {pretrain_summary['steps']} steps, final loss {pretrain_summary['final_loss']:.4f}, "
        f"{pretrain_summary['clips_per_s']:.1f} clips/s.", "",
        "## Frozen-encoder recognition (test split)", "", markdown_table(headers, rows), "",
        f"Linear-probe top-1 gain of pretraining over random init: {100 * gain:+.1f} points.", "",
    ]
    if retrieval_report is not None:
        r_headers, r_rows = retrieval_rows(retrieval_report["results"], retrieval_report["ks"])
        lines += ["## Retrieval (test clips querying the train index, cosine)", "", markdown_table(r_headers, r_rows), ""]
    if emotion_report is not None:
        lines += ["## Video-level emotion (emotion-test videos)", "",
                  markdown_table(emotion_report["summary"]["headers"], emotion_report["summary"]["rows"]), "",
                  *[f"- {line}" for line in emotion_report["gains"]], ""]
    lines += [
        "## Time per stage", "", markdown_table(["stage", "seconds"], [[k, round(v, 1)] for k, v in timings.items()]),
    ]
    path = write_atomic(run_dir / "demo_summary.md", "\n".join(lines) + "\n")
    print(f"demo summary: {path}")
    return path


if __name__ == "__main__":
    main()
