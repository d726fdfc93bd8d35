"""The skeleton every frozen-encoder evaluation shares (probe, retrieval, emotion): its recipe, which run and
encoder, which process and device, the encoders compared (the run's, a random init of the same size, raw
pixels), the eval stream, the output and feature-cache folders, the features of a split (cached, exact or
saying so) and the report's data section and ending. Each evaluation (``*_eval.py``) adds only what is its own.
"""

from __future__ import annotations

import dataclasses
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import ClassVar

import torch

from mgfm.config import bounded
from mgfm.data.stream import StreamConfig
from mgfm.data.stream.config import TRAIN_ONLY
from mgfm.errors import MgfmError
from mgfm.files import require_folder
from mgfm.evaluate.extract import eval_stream_config, require_complete, split_features
from mgfm.evaluate.featureset import FeatureSet
from mgfm.evaluate.raw_pixels import PixelEncoder
from mgfm.evaluate.raw_pixels import ROW as PIXEL_ROW
from mgfm.report import format_table, write_report
from mgfm.runtime import is_main_process, join_process_group, local_device
from mgfm.shards.read import set_name
from mgfm.model.hf import encoder_checksum, load_encoder_hf
from mgfm.model.encoder import build_encoder

log = logging.getLogger(__name__)


class RunError(MgfmError, ValueError):
    """A run folder that cannot be evaluated (missing, no encoder)."""


@dataclass
class RunRecipe:
    """Which trained encoder and which shards a use of an encoder reads, and where it writes: shared by every
    evaluation and by fine-tuning."""

    run: str | None = None  # a run folder (runs/<name>) or an encoder folder; None = newest run in runs_dir
    runs_dir: str = "runs"
    shards: str = "shards/synthetic"
    out: str | None = None  # default: a folder under the run, named after the evaluation and the shards


@dataclass
class EncoderEvalRecipe(RunRecipe):
    """What every frozen-encoder evaluation needs: which encoder, which shards, how to read them. The clip
    geometry is the encoder's; ``stream`` holds how clips are decoded and batched."""

    COMMAND: ClassVar[str] = "frozen-encoder evaluations"
    MOVED: ClassVar[dict[str, str]] = {"batch_size": "stream.batch_size", "num_workers": "stream.num_workers",
                                       "stream.seed": "seed"}
    UNUSED: ClassVar[dict[str, str]] = {
        **{f"stream.{k}": "the clip geometry is the encoder's" for k in ("frames", "img_size", "tubelet", "patch")},
        "stream.mean": "clips are normalised as the encoder was trained", "stream.std": "clips are normalised as "
        "the encoder was trained", "stream.flip": "evaluations do not flip", "stream.masks": "features see the "
        "whole clip", **{f"stream.{k}": "a training setting" for k in TRAIN_ONLY}}

    views: int = bounded(1, ge=1)  # temporal views averaged per clip
    stream: StreamConfig = field(default_factory=lambda: StreamConfig(masks=False, batch_size=32))
    references: bool = True  # add random-init and raw-pixel rows
    device: str = "auto"  # encoder device: auto (this process's GPU when CUDA is there) | cpu | cuda | cuda:N
    features_dir: str | None = None  # feature cache folder; default <run>/features
    # Evaluate although the shards delivered fewer clips than their manifest lists (the report then says so
    # first); by default a missing clip of a scored split is an error.
    allow_missing: bool = False
    seed: int = bounded(0, ge=0)


def newest_run(runs_dir: str | Path) -> Path:
    runs = [p for p in Path(runs_dir).glob("*/encoder/config.json")] if Path(runs_dir).is_dir() else []
    if not runs:
        raise RunError(f"{runs_dir}: no run with an encoder/ folder; pretrain first (accelerate launch pretrain.py)")
    return max(runs, key=lambda p: p.stat().st_mtime).parent.parent


def resolve_encoder(recipe: RunRecipe) -> tuple[Path, Path]:
    """(run folder, encoder folder) for ``recipe.run``."""
    run = Path(recipe.run) if recipe.run else newest_run(recipe.runs_dir)
    if not run.exists():
        raise RunError(f"{run}: no such run or encoder folder")
    encoder = run / "encoder" if (run / "encoder").is_dir() else run
    return (run if encoder != run else run.parent), encoder


def features_folder(recipe: EncoderEvalRecipe, run_dir: Path) -> Path:
    """Where the feature cache lives: ``features_dir``, else ``<run>/features``; a file (or a symlink loop) in
    the way is a one-line error now, before any clip is encoded."""
    return require_folder(Path(recipe.features_dir) if recipe.features_dir else run_dir / "features")


def data_section(feats: dict[str, FeatureSet]) -> tuple[dict, str | None]:
    """``({split: expected/read/missing/lost}, warning line or None)`` for a report: what each split read."""
    data = {split: {k: v for k, v in fs.read.items() if k != "describe"} for split, fs in feats.items()}
    short = [fs.read["describe"] for fs in feats.values() if fs.read.get("missing")]
    return data, (f"**Incomplete data (allow_missing=true):** {'; '.join(short)}." if short else None)


def eval_device(recipe: EncoderEvalRecipe) -> torch.device:
    """Join the launcher's process group (under ``accelerate launch`` / ``torchrun`` each process encodes
    its share of the clips) and pick this process's device."""
    join_process_group()
    return local_device(recipe.device)


def stream_for(encoder_cfg, recipe: EncoderEvalRecipe) -> StreamConfig:
    """The recipe's eval stream cut for the encoder's clip geometry."""
    return eval_stream_config(dataclasses.replace(recipe.stream, seed=recipe.seed).with_model(encoder_cfg))


def encoders_to_compare(encoder_folder: Path, recipe: EncoderEvalRecipe):
    """[(row name, encoder module, encoder id)]: the run's encoder, then the references."""
    encoder, cfg = load_encoder_hf(encoder_folder)
    rows = [("pretrained", encoder, encoder_checksum(encoder_folder))]
    if recipe.references:
        torch.manual_seed(recipe.seed)
        rows.append(("random init", build_encoder(cfg), f"random-init:{cfg.size}:{cfg.dim}x{cfg.depth}:seed{recipe.seed}"))
        pixels = PixelEncoder()
        rows.append((PIXEL_ROW, pixels, pixels.encoder_id))
    return rows, cfg


def output_folder(recipe: RunRecipe, run_dir: Path, task: str, *more: str) -> Path:
    """Where a use of an encoder writes: ``out``, else ``<run>/<task>/<shard set name>[/<more>...]``; a file
    in the way is a one-line error now, before any work."""
    return require_folder(Path(recipe.out) if recipe.out else run_dir.joinpath(task, set_name(recipe.shards), *more))


@dataclass
class EvalSetup:
    """What an evaluation works with, resolved once from its recipe (:func:`prepare`)."""

    recipe: EncoderEvalRecipe
    run_dir: Path
    encoder_folder: Path
    out: Path
    cache: Path
    device: torch.device
    encoders: list  # [(row name, encoder module, encoder id)], see encoders_to_compare
    cfg: object  # the encoder's ModelConfig
    stream: StreamConfig

    def features(self, encoder, encoder_id: str, split: str, scored: bool,
                 tokens: tuple[int, int, int] | None = None, block: int | None = None) -> FeatureSet:
        """The (cached) features of ``split`` for one of :attr:`encoders` (with ``tokens``: its tokens pooled
        to that grid; with ``block``: read after that encoder block, which raw pixels do not have). A ``scored`` split that lost clips is an error unless ``allow_missing`` (then a
        warning); another split's losses are logged."""
        feats = split_features(None, self.recipe.shards, split, self.stream, self.cache, self.recipe.views,
                               encoder=encoder, encoder_id=encoder_id, device=self.device, tokens=tokens,
                               block=None if isinstance(encoder, PixelEncoder) else block)
        if scored:
            require_complete(feats, f"{self.recipe.shards} ({split})", self.recipe.allow_missing)
        elif feats.read.get("missing"):
            log.warning("%s (%s): %s", self.recipe.shards, split, feats.read["describe"])
        return feats


def prepare(recipe: EncoderEvalRecipe, task: str) -> EvalSetup:
    """Resolve an evaluation's run, encoder, device, folders, compared encoders and stream (every rank)."""
    device = eval_device(recipe)
    run_dir, encoder_folder = resolve_encoder(recipe)
    encoders, cfg = encoders_to_compare(encoder_folder, recipe)
    return EvalSetup(recipe, run_dir, encoder_folder, output_folder(recipe, run_dir, task),
                     features_folder(recipe, run_dir), device, encoders, cfg, stream_for(cfg, recipe))


def finish(out: Path, report: dict, markdown: str, title: str, feats: dict[str, FeatureSet],
           lines: list[str]) -> dict:
    """Write ``report`` (plus its ``data`` section) and ``markdown`` into ``out`` and print ``lines`` (rank 0
    only). When a split lost clips (``allow_missing``), the report and the printout say so first."""
    data, warning = data_section(feats)
    report = {"incomplete": warning, "data": data, **report}
    if is_main_process():
        write_report(out, report, f"{warning}\n\n{markdown}" if warning else markdown, title)
        for line in ([warning.replace("**", "")] if warning else []) + lines + [data_table(feats),
                                                                             f"report: {out / 'report.md'}"]:
            print(line)
    return report


def data_table(feats: dict[str, FeatureSet]) -> str:
    """The clips each split read against its manifest, as a printed table."""
    rows = [[split, fs.read.get("expected"), fs.read.get("read", len(fs)), fs.read.get("missing", 0)]
            for split, fs in feats.items()]
    return format_table(["split", "clips listed", "read", "lost"], rows)
