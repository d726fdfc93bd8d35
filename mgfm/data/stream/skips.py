"""What a stream lost and why: the per-worker record of skips (:class:`WorkerState`), the main process's
:class:`SkipCounter` (each lost clip once, however often a resampling stream meets it) and an evaluation's
:class:`SplitRead` (how completely it read a split against its manifest)."""

from __future__ import annotations

import collections
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable

from mgfm.shards.read import shard_sets

log = logging.getLogger("mgfm.data.stream")


class SkipCounter:
    """What the stream skipped, as seen by the main process: ``samples`` (bad samples, plus the samples a
    broken, cut or missing shard did not deliver when the manifest says how many it holds) and
    ``shard_errors`` (unopenable / truncated / missing shards), by reason, with the first records kept.

    Each lost clip counts once however often a resampling train stream meets it again (records are keyed by
    shard and sample key, or by shard and part for losses without a key). ``padded``: the clips that were
    used although shorter than the clip length (filled by ``stream.pad``): not losses, but worth saying."""

    def __init__(self, keep: int = 1000):
        self.records: list[dict] = []
        self.keep = keep
        self._samples: dict[tuple, tuple[int, str]] = {}  # (shard, key, part) -> (clips, reason)
        self._shards: dict[str, str] = {}  # broken shard -> reason
        self._padded: set[tuple] = set()

    @property
    def padded(self) -> int:
        return len(self._padded)

    @property
    def samples(self) -> int:
        return sum(count for count, _ in self._samples.values())

    @property
    def shard_errors(self) -> int:
        return len(self._shards)

    @property
    def total(self) -> int:
        return self.samples + self.shard_errors

    @property
    def by_reason(self) -> collections.Counter:
        """Lost clips and broken shards by reason (the reason's text up to its first colon)."""
        out: collections.Counter = collections.Counter()
        for count, reason in self._samples.values():
            out[reason] += count
        for reason in self._shards.values():
            out[reason] += 1
        return out

    def add(self, records: Iterable[dict]) -> None:
        for rec in records:
            count, reason = int(rec.get("count", 1)), rec["reason"].split(":")[0]
            if rec["kind"] == "padded":
                self._padded.add((rec["shard"], rec.get("key")))
                continue
            if rec["kind"] == "shard":
                if rec["shard"] in self._shards:
                    continue
                self._shards[rec["shard"]] = reason
            else:
                key = (rec["shard"], rec.get("key"), rec.get("part"))
                if key in self._samples:
                    continue
                self._samples[key] = (count, reason)
            if len(self.records) < self.keep:
                self.records.append(rec)

    @classmethod
    def merged(cls, counters: Iterable["SkipCounter"]) -> "SkipCounter":
        """One counter over several (epochs, ranks, views): a clip lost in each of them counts once."""
        out = cls()
        for counter in counters:
            for key, value in counter._samples.items():
                out._samples.setdefault(key, value)
            for shard, reason in counter._shards.items():
                out._shards.setdefault(shard, reason)
            out._padded |= counter._padded
            for rec in counter.records:
                if len(out.records) < out.keep and rec not in out.records:
                    out.records.append(rec)
        return out

    def state_dict(self) -> dict:
        """Everything counted, JSON-able (a checkpoint keeps it so a resumed run reports the whole run)."""
        return {"samples": [[*key, *value] for key, value in self._samples.items()], "shards": self._shards,
                "padded": sorted(self._padded, key=str), "records": self.records}

    @classmethod
    def from_state(cls, state: dict) -> "SkipCounter":
        out = cls()
        out._samples = {(shard, key, part): (int(count), reason) for shard, key, part, count, reason in state["samples"]}
        out._shards = dict(state["shards"])
        out._padded = {tuple(p) for p in state["padded"]}
        out.records = list(state["records"])
        return out

    @classmethod
    def merged_records(cls, records: Iterable[dict]) -> list[dict]:
        """``records`` with repeats of one loss (other ranks, views, passes) dropped."""
        out = cls()
        out.add(records)
        return out.records

    def summary(self) -> str:
        reasons = ", ".join(f"{k} {v}" for k, v in sorted(self.by_reason.items()))
        return f"skipped {self.samples} samples and {self.shard_errors} broken shards ({reasons or 'none'})"


@dataclass
class SplitRead:
    """How completely an evaluation read a split: the clips its manifest lists (``expected``, None when
    unknown), the clips that arrived (``read``) and the skip records of what did not (``lost``)."""

    source: str
    split: str
    expected: int | None
    read: int
    lost: list[dict] = field(default_factory=list)

    @property
    def missing(self) -> int:
        """Clips the split should have had but did not deliver."""
        if self.expected is not None:
            return max(0, self.expected - self.read)
        return sum(int(r.get("count", 1)) for r in self.lost if r["kind"] != "shard")

    @property
    def complete(self) -> bool:
        return self.missing == 0

    def describe(self) -> str:
        """``read 45 of 60 clips of test (15 lost: test-000001.tar: missing shard: ...: 15 samples not read)``."""
        of = f" of {self.expected}" if self.expected is not None else ""
        text = f"read {self.read}{of} clips of {self.split}"
        if self.complete:
            return text
        where = "; ".join(f"{Path(str(r['shard'])).name}{' key ' + str(r['key']) if r.get('key') else ''}: "
                          f"{r['reason']}" for r in self.lost[:3])
        more = f"; {len(self.lost) - 3} more" if len(self.lost) > 3 else ""
        return f"{text} ({self.missing} lost: {where or 'unknown'}{more})"

    def to_dict(self) -> dict:
        return {"expected": self.expected, "read": self.read, "missing": self.missing,
                "lost": [{k: r.get(k) for k in ("shard", "key", "reason", "count")} for r in self.lost[:100]]}


def expected_clips(source, split: str, remote_commands: dict | None = None) -> int | None:
    """Clips the manifests list for ``split`` of ``source`` (None when shard sizes are unknown)."""
    refs = [r for _, refs in shard_sets(source, split, remote_commands, keep_missing=True) for r in refs]
    return None if any(r.samples is None for r in refs) else sum(r.samples for r in refs)


def printable(text: str, limit: int = 300) -> str:
    """``text`` cut to ``limit`` characters of printable ASCII (an error about a garbage file can quote its
    bytes; those must not reach the terminal)."""
    clean = "".join(c if c.isprintable() and ord(c) < 128 else "?" for c in str(text))
    return clean if len(clean) <= limit else clean[:limit] + "..."


class WorkerState:
    """Per-iteration state shared by the stages inside one worker: pending skip records, progress."""

    def __init__(self, log_limit: int):
        self.pending: list[dict] = []
        self.logged = 0
        self.log_limit = log_limit
        self.read = 0  # raw samples read from shards
        self.pulled = 0  # samples the decode stage took from the shuffled stream (bad ones included)
        self.batches = 0  # full batches this worker has given in this epoch
        self.failures_in_a_row = 0  # samples skipped since the last good one

    def skip(self, kind: str, shard: str, key: str | None, reason: str, count: int = 1,
             part: str | None = None) -> None:
        reason = printable(reason)
        rec = {"kind": kind, "shard": shard, "key": key, "reason": reason, "count": count, "part": part}
        self.pending.append(rec)
        if self.logged < self.log_limit:
            log.warning("stream skip (%s) %s%s: %s", kind, shard, f" key {key}" if key else "", reason)
            self.logged += 1

    def note_padded(self, shard: str, key: str | None) -> None:
        """A clip shorter than the clip length, filled by ``stream.pad`` (reported, not skipped)."""
        self.pending.append({"kind": "padded", "shard": shard, "key": key, "reason": "padded", "count": 0})

    def drain(self) -> list[dict]:
        out, self.pending = self.pending, []
        return out
