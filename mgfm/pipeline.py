"""The embedded default's first stages, shared by ``make demo``, ``make shards`` and ``pretrain.py``:
render the synthetic micro-gesture benchmark if missing, then shard it if its shards are missing."""

from __future__ import annotations

import logging
import os
from pathlib import Path

from mgfm.sources.clip_index import ClipIndex

log = logging.getLogger(__name__)

#: Clips per shard for the default benchmark: enough shards that 2 ranks x 2 workers read disjoint ones.
DEFAULT_SHARD_SAMPLES = 100


def default_workers() -> int:
    return max(1, min(2, os.cpu_count() or 1))


def ensure_synthetic(data_dir: str | Path, config=None) -> ClipIndex:
    """Render the synthetic benchmark into ``data_dir`` unless it is complete; return its clip index."""
    from mgfm.sources.synthetic import SyntheticConfig, generate, is_complete, read_synthetic

    config = config or SyntheticConfig()
    if is_complete(data_dir, config):
        log.info("synthetic benchmark found at %s", data_dir)
    else:
        log.info("rendering the synthetic micro-gesture benchmark into %s", data_dir)
        generate(data_dir, config)
    return read_synthetic(data_dir)


def build_default_shards(data_dir: str | Path, shards_dir: str | Path, workers: int | None = None) -> dict:
    """Shards of the synthetic benchmark (rendered first when missing); returns the manifest."""
    from mgfm.shards import BuildConfig, build_shards

    index = ensure_synthetic(data_dir)
    config = BuildConfig(shard_samples=DEFAULT_SHARD_SAMPLES, workers=workers or default_workers())
    return build_shards(index, shards_dir, config, source={"format": "imigue", "path": str(Path(data_dir) / "labels.csv")})
