"""Check a shard set against its manifest: every shard present, checksums, sample counts, and every
sample decodable with its json matching its frames.

Problems found (each one names the shard, the sample key when there is one, and what is wrong):
a split without a single sample (every clip of it skipped at build time), missing shard, checksum / size mismatch, unreadable or truncated tar, sample count differs from the
manifest, a sample without exactly one ``mp4`` and one ``json``, json that does not parse or whose
``clip_id`` / ``split`` disagree with the key / shard, an mp4 that does not decode, frame count or
size that differ from the json, a key seen twice.
"""

from __future__ import annotations

import concurrent.futures
import json
import logging
import multiprocessing
import tarfile
from dataclasses import dataclass, field
from pathlib import Path

from tqdm import tqdm

from mgfm.files import sha256_file
from mgfm.runtime import exit_with_parent
from mgfm.sources.video_io import VideoDecodeError, probe
from mgfm.shards import manifest as mf

log = logging.getLogger(__name__)

REQUIRED_MEMBERS = ("json", "mp4")
JSON_FIELDS = ("clip_id", "label", "split", "n_frames", "fps", "height", "width")


@dataclass
class Problem:
    shard: str
    key: str | None
    problem: str

    def __str__(self) -> str:
        return f"{self.shard}{':' + self.key if self.key else ''}: {self.problem}"


@dataclass
class VerifyReport:
    shards_checked: int = 0
    samples_checked: int = 0
    problems: list[Problem] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.problems


def verify_shards(shard_dir: str | Path, decode: bool = True, workers: int = 1) -> VerifyReport:
    """Verify the shard set in ``shard_dir`` (see the module docstring). ``decode=False`` skips the
    per-sample video decode (checksums, counts and json only)."""
    shard_dir = Path(shard_dir)
    manifest = mf.load_manifest(shard_dir)
    report = VerifyReport()
    jobs: list[tuple[str, str, dict]] = []
    for split, info in manifest["splits"].items():
        for shard in info["shards"]:
            jobs.append((split, shard["name"], shard))
    for name in manifest.get("missing_shards", []):
        report.problems.append(Problem(name, None, "planned shard is missing (build incomplete)"))
    for split, info in manifest["splits"].items():
        if not info.get("samples"):  # a split every clip of which was skipped: nothing to train or score on
            report.problems.append(Problem(f"split {split}", None, mf.no_samples_reason(manifest, split)))
    if not manifest["splits"]:
        report.problems.append(Problem(str(shard_dir), None, "the manifest lists no split"))
    listed = {name for _, name, _ in jobs}
    for path in sorted(shard_dir.glob("*.tar")):
        if path.name not in listed:
            report.notes.append(f"{path.name}: tar file not listed in the manifest (ignored)")

    results: list[tuple[int, list[Problem], list[str]]] = []
    with tqdm(total=len(jobs), unit="shard", desc="verify", disable=not jobs) as bar:
        if workers <= 1 or len(jobs) <= 1:
            for split, name, shard in jobs:
                results.append(_check_shard(shard_dir, split, name, shard, decode))
                bar.update(1)
        else:
            ctx = multiprocessing.get_context("spawn")
            with concurrent.futures.ProcessPoolExecutor(min(workers, len(jobs)), mp_context=ctx,
                                                        initializer=exit_with_parent) as pool:
                futures = [pool.submit(_check_shard, shard_dir, s, n, sh, decode) for s, n, sh in jobs]
                for fut in futures:
                    results.append(fut.result())
                    bar.update(1)
    seen: dict[str, str] = {}
    for (_, name, _), (count, problems, keys) in zip(jobs, results):
        report.shards_checked += 1
        report.samples_checked += count
        report.problems.extend(problems)
        for key in keys:
            if key in seen:
                report.problems.append(Problem(name, key, f"key also in {seen[key]}"))
            seen[key] = name
    return report


def _check_shard(shard_dir: Path, split: str, name: str, shard: dict, decode: bool) -> tuple[int, list[Problem], list[str]]:
    """(samples read, problems, keys) for one shard."""
    path = shard_dir / name
    problems: list[Problem] = []
    if not path.exists():
        return 0, [Problem(name, None, "shard file is missing")], []
    size = path.stat().st_size
    if size != shard.get("bytes", size):
        problems.append(Problem(name, None, f"size {size} bytes, manifest says {shard['bytes']}"))
    digest = sha256_file(path)
    if digest != shard["sha256"]:
        problems.append(Problem(name, None, f"sha256 {digest[:12]}... does not match the manifest "
                                            f"({shard['sha256'][:12]}...)"))
    samples: dict[str, dict[str, bytes]] = {}
    order: list[str] = []
    try:
        with tarfile.open(path, mode="r|") as tar:
            for member in tar:
                if not member.isreg():
                    continue
                key, dot, ext = member.name.partition(".")
                handle = tar.extractfile(member)
                data = handle.read() if handle is not None else b""
                if not dot:
                    problems.append(Problem(name, key, f"member {member.name!r} has no extension"))
                    continue
                if key not in samples:
                    samples[key] = {}
                    order.append(key)
                if ext in samples[key]:
                    problems.append(Problem(name, key, f"duplicate member .{ext}"))
                samples[key][ext] = data
    except (tarfile.TarError, OSError, EOFError) as err:
        problems.append(Problem(name, None, f"unreadable or truncated tar ({err})"))
    if len(order) != shard["samples"]:
        problems.append(Problem(name, None, f"{len(order)} samples, manifest says {shard['samples']}"))
    for key in order:
        problems.extend(_check_sample(name, split, key, samples[key], decode))
    return len(order), problems, order


def _check_sample(name: str, split: str, key: str, members: dict[str, bytes], decode: bool) -> list[Problem]:
    out: list[Problem] = []
    if sorted(members) != sorted(REQUIRED_MEMBERS):
        out.append(Problem(name, key, f"members {sorted(members)}, expected {list(REQUIRED_MEMBERS)}"))
    if "json" not in members:
        return out
    try:
        meta = json.loads(members["json"])
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        return out + [Problem(name, key, f"json does not parse ({err})")]
    missing = [f for f in JSON_FIELDS if f not in meta]
    if missing:
        return out + [Problem(name, key, f"json lacks {missing}")]
    if meta["clip_id"] != key:
        out.append(Problem(name, key, f"json clip_id {meta['clip_id']!r} differs from the key"))
    if meta["split"] != split:
        out.append(Problem(name, key, f"json split {meta['split']!r} in a {split!r} shard"))
    if decode and "mp4" in members:
        try:
            info = probe(members["mp4"])
        except VideoDecodeError as err:
            return out + [Problem(name, key, f"mp4 does not decode ({err})")]
        for fld in ("n_frames", "height", "width"):
            if info[fld] != meta[fld]:
                out.append(Problem(name, key, f"video has {fld}={info[fld]}, json says {meta[fld]}"))
    return out
