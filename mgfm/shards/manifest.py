"""The shard set's bookkeeping: the build plan, per-shard fragments and ``manifest.json``.

Layout of a shard folder::

    <out>/train-000000.tar ...        WebDataset shards, one mp4 + one json per sample
    <out>/test-000000.tar ...
    <out>/manifest.json               what a reader needs (only complete shards are listed)
    <out>/_meta/plan.json             the deterministic shard plan: shard name -> split and clip ids
    <out>/_meta/<shard>.json          one fragment per complete shard (counts, sha256, skipped clips)

The plan (format ``mgfm-plan/2``) names each shard's split and clip ids, not whole clip rows: a 200,000-clip
index plans into a few MB. A plan written before that format (every clip row per shard) is still read (and
rewritten compactly by the next build).

A shard is complete when its tar *and* its fragment exist: the builder writes the tar to a temp
name, writes the fragment, then renames the tar, so a crash never leaves a listed half shard. The
manifest is always rebuilt from the plan and the fragments (:func:`rebuild_manifest`), so shards
built by several ``--part i/N`` runs merge by copying them into one folder and rebuilding.
"""

from __future__ import annotations

import collections
import json
import logging
import re
import time
from pathlib import Path
from typing import Any

from webdataset.gopen import gopen

from mgfm.errors import InputError
from mgfm.files import check_path, stale_temp_files, write_atomic
from mgfm.sources.clip_index import natural_key

log = logging.getLogger(__name__)

MANIFEST = "manifest.json"
META_DIR = "_meta"
PLAN = "plan.json"
FORMAT = "mgfm-shards/1"
PLAN_FORMAT = "mgfm-plan/2"
SHOWN_SKIPS = 3  # skipped clips named in full per kind of reason (the rest are counted)


def shard_name(split: str, index: int) -> str:
    return f"{split}-{index:06d}.tar"


def write_json_atomic(path: str | Path, payload: Any, indent: int | None = 1) -> None:
    """Write JSON to ``path`` through a temp file in the same folder + rename (``indent=None``: compact)."""
    write_atomic(path, json.dumps(payload, indent=indent, sort_keys=False,
                                  separators=None if indent is not None else (",", ":")))


def fragment_path(out_dir: str | Path, name: str) -> Path:
    return Path(out_dir) / META_DIR / (name.removesuffix(".tar") + ".json")


def plan_path(out_dir: str | Path) -> Path:
    return Path(out_dir) / META_DIR / PLAN


def read_plan(out_dir: str | Path) -> dict | None:
    """The build plan of ``out_dir`` (None when there is none), in the current format: ``shards`` maps each
    shard name to ``{"split", "clips": [clip ids]}``; ``format`` says what the file on disk was written as."""
    path = plan_path(out_dir)
    if not path.exists():
        return None
    try:
        plan = json.loads(path.read_text())
    except json.JSONDecodeError as err:
        raise InputError(f"{path}: not valid JSON ({err}); delete it to re-plan") from None
    if not isinstance(plan, dict) or not isinstance(plan.get("shards"), dict) or "plan_hash" not in plan:
        raise InputError(f"{path}: not an mgfm build plan; delete it to re-plan")
    fmt = plan.setdefault("format", "mgfm-plan/1")
    if fmt not in ("mgfm-plan/1", PLAN_FORMAT):
        raise InputError(f"{path}: plan format {fmt!r} is newer than this mgfm reads ({PLAN_FORMAT}); "
                         f"update mgfm or delete the plan to re-plan")
    if fmt == "mgfm-plan/1":  # every clip row per shard: keep the ids
        for entry in plan["shards"].values():
            entry["clips"] = [row["clip_id"] for row in entry["clips"]]
    return plan


def record_plan(out_dir: str | Path, plan: dict, overwrite: bool) -> None:
    """Make ``plan`` (``plan_hash``, ``shards``: name -> ``{"split", "clips": [clip ids]}``, ...) the folder's plan.
    The same plan already there is kept (rewritten compactly when in the older format); another plan is an
    error unless ``overwrite``, which deletes that plan's shards, fragments and manifest first."""
    out_dir = Path(out_dir)
    old = read_plan(out_dir)
    if old is not None and old["plan_hash"] != plan["plan_hash"]:
        if not overwrite:
            raise InputError(f"{out_dir}: holds shards of a different plan (other index or output settings); "
                             "use another --out or --overwrite")
        for name in old["shards"]:
            (out_dir / name).unlink(missing_ok=True)
            fragment_path(out_dir, name).unlink(missing_ok=True)
        (out_dir / MANIFEST).unlink(missing_ok=True)
    if old is None or old["plan_hash"] != plan["plan_hash"] or old["format"] != PLAN_FORMAT:
        write_json_atomic(plan_path(out_dir), {"format": PLAN_FORMAT, **plan}, indent=None)


def remove_stale_temps(out_dir: str | Path, shard_names: set[str]) -> list[Path]:
    """Delete the temporary files a killed build left for ``shard_names`` (shards, their fragments, the plan and
    the manifest; see :func:`mgfm.files.stale_temp_files`); returns them. Nothing else in the folder is touched."""
    out_dir = Path(out_dir)
    fragments = {fragment_path(out_dir, n).name for n in shard_names}
    stale = (stale_temp_files(out_dir, shard_names | {MANIFEST})
             + stale_temp_files(out_dir / META_DIR, fragments | {PLAN}))
    for path in stale:
        path.unlink(missing_ok=True)
    if stale:
        log.warning("%s: removed %d temporary file(s) an interrupted build left (e.g. %s)", out_dir, len(stale),
                    stale[0].name)
    return stale


# ------------------------------------------------------------------------------------------- skips


def skip_kind(reason: str) -> str:
    """What a skip reason says without its particulars (numbers, the detail in brackets): reasons of one kind
    are counted together."""
    return re.sub(r"\d+", "N", reason.split(" (", 1)[0]).strip()


class SkipLog:
    """Logs skipped clips as a build meets them: the first :data:`SHOWN_SKIPS` of each kind of reason in full,
    the rest only counted (:meth:`summary`), so a build that skips thousands of clips prints a few lines."""

    def __init__(self) -> None:
        self.counts: collections.Counter = collections.Counter()

    def add(self, records: list[dict]) -> None:
        for item in records:
            kind = skip_kind(item["reason"])
            self.counts[kind] += 1
            if self.counts[kind] <= SHOWN_SKIPS:
                log.warning("skipping clip %s of %s: %s%s", item["clip_id"], item["path"], item["reason"],
                            " (further skips of this kind are counted, not shown)"
                            if self.counts[kind] == SHOWN_SKIPS else "")


def summarise_skips(records: list[dict]) -> str:
    """``"12 x pose file unreadable (e.g. a.txt: 61 values per line ...), 2 x ..."``: skipped clips counted per
    kind of reason, most frequent first, each with its first example."""
    kinds: dict[str, list[dict]] = {}
    for item in records:
        kinds.setdefault(skip_kind(item["reason"]), []).append(item)
    parts = []
    for kind, items in sorted(kinds.items(), key=lambda kv: -len(kv[1])):
        head, _, detail = items[0]["reason"].partition(" (")
        example = detail.removesuffix(")") or head
        if items[0]["path"] not in example:
            example = f"{items[0]['path']}: {example}"
        parts.append(f"{len(items)} x {kind} (e.g. {example})")
    return ", ".join(parts)


def empty_splits(manifest: dict) -> list[str]:
    """Splits whose planned shards are all built and hold no sample (every clip of them was skipped)."""
    return [split for split, info in manifest["splits"].items()
            if info["samples"] == 0 and not info["missing_shards"]]


def no_samples_reason(manifest: dict, split: str | None = None) -> str:
    """``"no samples: all 12 of its clips were skipped (...)"``: why ``split`` (None: every split) holds no
    sample, in one line, with the skipped clips counted per kind of reason."""
    records = [r for r in manifest["skipped"] if split is None or r.get("split") == split]
    if not records:
        return "no samples"
    whose = "its" if split is not None else "the"
    lost = f"all {len(records)} of {whose} clips were" if len(records) > 1 else f"{whose} only clip was"
    return f"no samples: {lost} skipped ({summarise_skips(records)})"


def require_samples(manifest: dict, where: str | Path) -> None:
    """One :class:`InputError` line when a split of a complete build came out empty, naming each such split
    and why its clips were skipped."""
    empty = empty_splits(manifest)
    if len(empty) == len(manifest["splits"]) > 1:
        problems = f"every split ({', '.join(empty)}) has {no_samples_reason(manifest)}"
    else:
        problems = "; ".join(f"split {s!r} has {no_samples_reason(manifest, s)}" for s in empty)
    if empty:
        raise InputError(f"{where}: {problems}; see {Path(where) / MANIFEST}")


def shard_is_complete(out_dir: str | Path, name: str, plan_hash: str) -> bool:
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
        if not shard_is_complete(out_dir, name, plan["plan_hash"]):
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
        path = check_path(source)  # a symlink loop: one line naming it
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


