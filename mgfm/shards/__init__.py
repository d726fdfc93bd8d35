"""WebDataset shards of micro-gesture clips: build (:func:`build_shards`), verify, manifest.

``python -m mgfm.shards build|verify|merge ...``; see ``shards/README.md``.
"""

from mgfm.shards.build import BuildConfig, build_shards
from mgfm.shards.manifest import load_manifest, rebuild_manifest
from mgfm.shards.plan import plan_shards
from mgfm.shards.verify import VerifyReport, verify_shards

__all__ = ["BuildConfig", "build_shards", "plan_shards", "load_manifest", "rebuild_manifest", "VerifyReport",
           "verify_shards"]
