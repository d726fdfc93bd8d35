"""The shard set's bookkeeping: the build plan, per-shard fragments and ``manifest.json``.

Layout of a shard folder::

    <out>/train-000000.tar ...        WebDataset shards, one mp4 + one json per sample
    <out>/test-000000.tar ...
    <out>/manifest.json               what a reader needs (only complete shards are listed)
    <out>/_meta/plan.json             the deterministic shard plan: shard name -> clip rows
    <out>/_meta/<shard>.json          one fragment per complete shard (counts, sha256, skipped clips)

A shard is complete when its tar *and* its fragment exist: the builder writes the tar to a temp
name, writes the fragment, then renames the tar, so a crash never leaves a listed half shard. The
manifest is always rebuilt from the plan and the fragments (:func:`rebuild_manifest`), so shards
built by several ``--part i/N`` runs merge by copying them into one folder and rebuilding.
"""

from __future__ import annotations

import collections
import hashlib
import json
import time
from pathlib import Path
from typing import Any

from webdataset.gopen import gopen

from mgfm.errors import InputError
from mgfm.files import write_atomic
from mgfm.sources.clip_index import natural_key

MANIFEST = "manifest.json"
META_DIR = "_meta"
PLAN = "plan.json"
FORMAT = "mgfm-shards/1"


def shard_name(split: str, index: int) -> str:
    return f"{split}-{index:06d}.tar"


def sha256_file(path: str | Path, chunk: int = 1 << 20) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        while block := handle.read(chunk):
            digest.update(block)
    return digest.hexdigest()


def write_json_atomic(path: str | Path, payload: Any) -> None:
    """Write JSON to ``path`` through a temp file in the same folder + rename."""
    write_atomic(path, json.dumps(payload, indent=1, sort_keys=False))


def fragment_path(out_dir: str | Path, name: str) -> Path:
    return Path(out_dir) / META_DIR / (name.removesuffix(".tar") + ".json")


def plan_path(out_dir: str | Path) -> Path:
    return Path(out_dir) / META_DIR / PLAN


def read_plan(out_dir: str | Path) -> dict | None:
    path = plan_path(out_dir)
    if not path.exists():
        return None
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as err:
        raise InputError(f"{path}: not valid JSON ({err}); delete it to re-plan") from None


def is_complete(out_dir: str | Path, name: str, plan_hash: str) -> bool:
    """True when shard ``name`` has its tar and a fragment written for this plan."""
    out_dir = Path(out_dir)
    frag = fragment_path(out_dir, name)
    if not (out_dir / name).exists() or not frag.exists():
        return False
    try:
        meta = json.loads(frag.read_text())
    except (OSError, json.JSONDecodeError):
        return False
    return meta.get("plan_hash") == plan_hash and (out_dir / name).stat().st_size == meta.get("bytes")


def rebuild_manifest(out_dir: str | Path) -> dict:
    """Scan the plan and the complete shards' fragments, write ``manifest.json``, return it."""
    out_dir = Path(out_dir)
    plan = read_plan(out_dir)
    if plan is None:
        raise FileNotFoundError(f"{plan_path(out_dir)}: no build plan; is {out_dir} a shard folder built by mgfm?")
    class_names = plan["class_names"]
    splits: dict[str, dict] = {}
    skipped: list[dict] = []
    missing: list[str] = []
    for name, entry in plan["shards"].items():
        split = entry["split"]
        info = splits.setdefault(split, {
            "shards": [], "samples": 0, "class_histogram": [0] * len(class_names), "unlabeled": 0,
            "subjects": collections.Counter(), "videos": set(), "skipped": 0, "planned_shards": 0,
            "missing_shards": [],
        })
        info["planned_shards"] += 1
        if not is_complete(out_dir, name, plan["plan_hash"]):
            info["missing_shards"].append(name)
            missing.append(name)
            continue
        frag = json.loads(fragment_path(out_dir, name).read_text())
        info["shards"].append({"name": name, "samples": frag["samples"], "bytes": frag["bytes"],
                               "sha256": frag["sha256"]})
        info["samples"] += frag["samples"]
        for label, count in frag["labels"].items():
            if int(label) < 0:
                info["unlabeled"] += count
            else:
                info["class_histogram"][int(label)] += count
        info["subjects"].update(frag["subjects"])
        info["videos"].update(frag["videos"])
        info["skipped"] += len(frag["skipped"])
        skipped.extend(frag["skipped"])
    for info in splits.values():
        info["subjects"] = sorted(info["subjects"], key=natural_key)
        info["videos"] = len(info["videos"])
    manifest = {
        "format": FORMAT,
        "name": plan["name"],
        "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "complete": not missing,
        "plan_hash": plan["plan_hash"],
        "source": plan["source"],
        "config": plan["config"],
        **({"encoding": plan["encoding"]} if "encoding" in plan else {}),  # absent: built before it was recorded
        "class_names": class_names,
        "emotion_splits": plan["emotion_splits"],
        "splits": dict(sorted(splits.items())),
        "totals": {
            "samples": sum(s["samples"] for s in splits.values()),
            "shards": sum(len(s["shards"]) for s in splits.values()),
            "planned_shards": len(plan["shards"]),
            "skipped": len(skipped),
        },
        "missing_shards": missing,
        "skipped": skipped,
    }
    write_json_atomic(out_dir / MANIFEST, manifest)
    return manifest


def load_manifest(source: str | Path) -> dict:
    """Read a manifest from a shard folder, a ``manifest.json`` path, or a URL that
    :func:`webdataset.gopen.gopen` can open (``http(s)://``, ``pipe:...``)."""
    text = str(source)
    if "://" in text or text.startswith("pipe:"):
        url = text if text.endswith(".json") or text.startswith("pipe:") else text.rstrip("/") + "/" + MANIFEST
        with gopen(url, "rb") as handle:
            data = handle.read()
        where = url
    else:
        path = Path(source)
        path = path / MANIFEST if path.is_dir() else path
        try:
            data = path.read_bytes()
        except OSError as err:
            raise FileNotFoundError(f"{path}: cannot read shard manifest ({err.strerror}); "
                                    "build shards with `python -m mgfm.shards build`") from None
        where = str(path)
    try:
        manifest = json.loads(data)
    except json.JSONDecodeError as err:
        raise InputError(f"{where}: manifest is not valid JSON ({err})") from None
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
        raise InputError(f"{where}: not an mgfm shard manifest (expected format {FORMAT!r})")
    return manifest


def format_manifest(manifest: dict) -> str:
    """A short human-readable table of a manifest."""
    lines = [f"shards {manifest['name']}: {manifest['totals']['samples']} samples in "
             f"{manifest['totals']['shards']}/{manifest['totals']['planned_shards']} shards"
             + ("" if manifest["complete"] else " (INCOMPLETE)")
             + f", {manifest['totals']['skipped']} clips skipped"]
    enc = manifest.get("encoding")
    if enc:
        lines.append(f"  encoding   h264 crf {enc['crf']} {enc['preset']}, tune {enc['tune'] or '-'}, "
                     f"bframes {'-' if enc['bframes'] is None else enc['bframes']}, keyint {enc['keyint'] or '-'}")
    for split, info in manifest["splits"].items():
        lines.append(f"  {split:<10} {info['samples']:>7} samples {len(info['shards']):>4} shards "
                     f"{len(info['subjects']):>4} subjects {info['skipped']:>5} skipped")
    for item in manifest["skipped"][:10]:
        lines.append(f"  skipped {item['clip_id']} ({item['path']}): {item['reason']}")
    if len(manifest["skipped"]) > 10:
        lines.append(f"  ... and {len(manifest['skipped']) - 10} more skipped clips (see manifest.json)")
    return "\n".join(lines)


