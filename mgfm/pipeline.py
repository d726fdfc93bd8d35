"""The embedded default's first stages and the pretraining command, shared by ``make demo``, ``make shards``
and ``accelerate launch pretrain.py``: render the synthetic micro-gesture benchmark if missing, shard it if
its shards are missing, and pretrain (:func:`pretrain`), rendering the default data first when a recipe
asks for it and it is not there yet."""

from __future__ import annotations

import dataclasses
import logging
import os
from pathlib import Path

from mgfm.cli import run_cli
from mgfm.runtime import barrier, is_main_process
from mgfm.shards import BuildConfig, build_shards
from mgfm.shards.read import local_source
from mgfm.sources.clip_index import ClipIndex
from mgfm.sources.synthetic import SyntheticConfig, generate, is_rendered, read_synthetic
from mgfm.train.pretrain import run as run_pretraining
from mgfm.train.pretrain import shard_sources
from mgfm.train.recipe import PretrainRecipe

log = logging.getLogger(__name__)

#: Clips per shard for the default benchmark: enough shards that 2 ranks x 2 workers read disjoint ones.
DEFAULT_SHARD_SAMPLES = 100
DEFAULT_RECIPE = Path(__file__).resolve().parents[1] / "recipes" / "pretrain" / "tiny_cpu.yaml"


def default_workers() -> int:
    return max(1, min(2, os.cpu_count() or 1))


def ensure_synthetic(data_dir: str | Path, config: SyntheticConfig | None = None) -> ClipIndex:
    """Render the synthetic benchmark into ``data_dir`` unless it is complete; return its clip index."""
    config = config or SyntheticConfig()
    if is_rendered(data_dir, config):
        log.info("synthetic benchmark found at %s", data_dir)
    else:
        log.info("rendering the synthetic micro-gesture benchmark into %s", data_dir)
        generate(data_dir, config)
    return read_synthetic(data_dir)


def build_default_shards(data_dir: str | Path, shards_dir: str | Path, workers: int | None = None) -> dict:
    """Shards of the synthetic benchmark (rendered first when missing); returns the manifest."""
    index = ensure_synthetic(data_dir)
    config = BuildConfig(shard_samples=DEFAULT_SHARD_SAMPLES, workers=workers or default_workers())
    return build_shards(index, shards_dir, config, source={"format": "imigue", "path": str(Path(data_dir) / "labels.csv")})


def ensure_default_data(recipe: PretrainRecipe) -> None:
    """Render the synthetic benchmark and shard it when the recipe's shards are missing (rank 0; the others
    wait) and are the default data path: any other missing shard set (a typo) is a one-line error, never a
    reason to render the synthetic benchmark into it."""
    default = next(f.default for f in dataclasses.fields(PretrainRecipe) if f.name == "shards")
    for source in shard_sources(recipe):
        shards = local_source(source)
        if shards is None or (shards / "manifest.json").exists():
            continue
        if recipe.synthetic_data is None or shards.resolve() != Path(default).resolve():
            near = [str(p.parent) for p in shards.parent.glob("*/manifest.json")] if shards.parent.is_dir() else []
            hint = f" (shard sets there: {', '.join(sorted(near)[:4])})" if near else ""
            raise FileNotFoundError(f"shards {source}: no manifest.json there{hint}; build them with "
                                    f"`python -m mgfm.shards build ...`")
        if is_main_process():
            log.info("shards %s are missing: building the synthetic benchmark at %s and its shards", source,
                     recipe.synthetic_data)
            build_default_shards(recipe.synthetic_data, source)
    barrier()


def pretrain(recipe: PretrainRecipe) -> Path:
    """Pretrain as the recipe says, the default data rendered first when needed; returns the run folder."""
    return run_pretraining(recipe, prepare_data=ensure_default_data)


def pretrain_main(argv: list[str] | None = None) -> Path:
    """``accelerate launch pretrain.py [--recipe FILE] [key=value ...]``; user errors end in one line."""
    return run_cli(PretrainRecipe, pretrain, argv, "pretrain.py", "Masked video pretraining (VideoMAE-style).",
                   DEFAULT_RECIPE)
