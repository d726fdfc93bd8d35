"""A feature matrix and the clip-index rows it belongs to: what every frozen-encoder evaluation consumes.

On disk (the feature cache): ``<stem>.safetensors`` holds ``features`` float32 ``(N, D)``; ``<stem>.json``
holds the rows (one clip-index row per feature row, same order), the cache key, for token features the
token width, and the tensor file's size and sha256. Both are written atomically, the JSON last, so a cache
with a JSON file is complete; on load the tensor file is checked against the size and checksum the JSON
records, so a cut, overwritten or half-copied cache is never read (:class:`DamagedCache`; the evaluation
names it in a warning, computes the features again and rewrites it).
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from safetensors.numpy import save_file

from mgfm.errors import MgfmError
from mgfm.files import atomic_path, sha256_file, write_atomic

log = logging.getLogger(__name__)


class FeatureError(MgfmError, ValueError):
    """Features that do not fit what an evaluation expects (width, count, emptiness)."""


class DamagedCache(FeatureError):
    """A feature cache whose files do not hold what its JSON records (cut, rewritten, junk, or written before
    caches carried checksums); the message names the cache and what is wrong."""


@dataclass
class FeatureSet:
    """``features`` float32 ``(N, D)``; ``rows[i]`` is the clip-index row (dict) of ``features[i]``;
    ``key`` what made them (the cache key); ``read`` how completely the split was read
    (:meth:`mgfm.data.stream.SplitRead.to_dict` + ``describe``; empty for in-memory sets). Token features
    (for the attentive probe) are stored flat: row ``i`` is ``L`` tokens of width ``token_dim``,
    ``D = L * token_dim`` (:meth:`tokens` gives ``(N, L, token_dim)``); ``token_dim`` is None for clip features."""

    features: np.ndarray
    rows: list[dict]
    key: dict = field(default_factory=dict)
    read: dict = field(default_factory=dict)
    token_dim: int | None = None

    def __post_init__(self) -> None:
        self.features = np.ascontiguousarray(self.features, dtype=np.float32)
        if self.features.ndim != 2:
            raise FeatureError(f"features must be a (N, D) matrix, got shape {self.features.shape}")
        if len(self.rows) != len(self.features):
            raise FeatureError(f"{len(self.features)} feature rows but {len(self.rows)} clip rows")
        if self.token_dim is not None and (self.token_dim < 1 or self.features.shape[1] % self.token_dim):
            raise FeatureError(f"{self.features.shape[1]}-d rows are not whole tokens of width {self.token_dim}")

    @classmethod
    def from_labels(cls, features: np.ndarray, labels: np.ndarray) -> "FeatureSet":
        """Features ``(N, D)`` with class ids ``(N,)`` and no other clip metadata (in-memory probes)."""
        return cls(features, [{"label": int(c)} for c in labels])

    def __len__(self) -> int:
        return len(self.rows)

    @property
    def dim(self) -> int:
        return int(self.features.shape[1])

    def tokens(self) -> np.ndarray:
        """Token features as ``(N, L, token_dim)``; a one-line error for clip features."""
        if self.token_dim is None:
            raise FeatureError("these are clip features (N, D), not tokens; extract them with tokens=(t, h, w)")
        return self.features.reshape(len(self), -1, self.token_dim)

    @property
    def labels(self) -> np.ndarray:
        """int64 ``(N,)`` class ids (-1 = unlabelled)."""
        return np.array([int(r.get("label", -1)) for r in self.rows], dtype=np.int64)

    @property
    def clip_ids(self) -> list[str]:
        return [str(r["clip_id"]) for r in self.rows]

    def labelled(self) -> "FeatureSet":
        keep = self.labels >= 0
        return FeatureSet(self.features[keep], [r for r, k in zip(self.rows, keep) if k], dict(self.key),
                          dict(self.read), self.token_dim)

    def require(self, name: str, dim: int | None = None) -> "FeatureSet":
        """Raise a one-line :class:`FeatureError` if empty or of the wrong width; return self."""
        if len(self) == 0:
            raise FeatureError(f"{name}: no clips (empty split)")
        if dim is not None and self.dim != dim:
            raise FeatureError(f"{name}: features are {self.dim}-d, expected {dim}-d")
        return self

    def save(self, stem: str | Path) -> None:
        """Write the cache at ``stem``: the tensor file, then the JSON with its size and sha256 (last, so a
        JSON vouches for a complete tensor file)."""
        meta_path, tensor_path = cache_files(stem)
        with atomic_path(tensor_path) as tmp:
            save_file({"features": self.features}, str(tmp))
            tensor = {"bytes": tmp.stat().st_size, "sha256": sha256_file(tmp)}
        write_atomic(meta_path, json.dumps({"key": self.key, "read": self.read, "rows": self.rows,
                                            "token_dim": self.token_dim, "tensor": tensor}))

    @classmethod
    def load(cls, stem: str | Path) -> "FeatureSet":
        """The cached set at ``stem``, its tensor file checked against the size and sha256 its JSON records;
        the matrix is memory-mapped (read from disk only where used, so a million-clip cache can be indexed
        chunk by chunk; the checksum reads it once). ``FileNotFoundError`` when there is no cache,
        :class:`DamagedCache` when its files do not hold what its JSON says."""
        return cls._checked(stem, _cache_meta(stem))

    @classmethod
    def load_if_key(cls, stem: str | Path, key: dict) -> "FeatureSet | None":
        """The cached set at ``stem`` if it exists, was made with exactly ``key`` and is intact; else None. A
        damaged cache is named in one warning (the caller computes the features again and rewrites it)."""
        try:
            meta = _cache_meta(stem)
            return cls._checked(stem, meta) if meta.get("key") == key else None
        except FileNotFoundError:
            return None
        except DamagedCache as err:
            log.warning("feature cache %s is not usable (%s); computing the features again", Path(stem).name, err)
            return None

    @classmethod
    def _checked(cls, stem: str | Path, meta: dict) -> "FeatureSet":
        meta_path, tensor_path = cache_files(stem)
        tensor = meta.get("tensor")
        if not isinstance(tensor, dict):
            raise DamagedCache(f"{meta_path}: records no size and checksum of {tensor_path.name} (written by an "
                               f"older mgfm)")
        size = tensor_path.stat().st_size
        if size != tensor.get("bytes"):
            raise DamagedCache(f"{tensor_path}: {size} bytes, its cache records {tensor.get('bytes')}")
        if sha256_file(tensor_path) != tensor.get("sha256"):
            raise DamagedCache(f"{tensor_path}: sha256 differs from the one its cache records")
        return cls(mapped_tensor(tensor_path, "features"), meta["rows"], meta.get("key", {}), meta.get("read", {}),
                   meta.get("token_dim"))


def cache_files(stem: str | Path) -> tuple[Path, Path]:
    """``(<stem>.json, <stem>.safetensors)``: the two files of the feature cache at ``stem``."""
    stem = Path(stem)
    return stem.with_name(stem.name + ".json"), stem.with_name(stem.name + ".safetensors")


def _cache_meta(stem: str | Path) -> dict:
    """The JSON of the feature cache at ``stem``: ``FileNotFoundError`` when either file is absent,
    :class:`DamagedCache` when the JSON is not a cache's."""
    meta_path, tensor_path = cache_files(stem)
    if not meta_path.exists() or not tensor_path.exists():
        raise FileNotFoundError(f"{stem}: no complete feature cache (.json + .safetensors)")
    try:
        meta = json.loads(meta_path.read_text())
    except (UnicodeDecodeError, json.JSONDecodeError) as err:
        raise DamagedCache(f"{meta_path}: not valid JSON ({err})") from None
    if not isinstance(meta, dict) or not isinstance(meta.get("rows"), list):
        raise DamagedCache(f"{meta_path}: not a feature cache's JSON (no rows)")
    return meta


def mapped_tensor(path: str | Path, name: str) -> np.ndarray:
    """Tensor ``name`` of a safetensors file as a read-only memory map. The format is an 8-byte little-endian
    header length, a JSON header of dtypes, shapes and byte offsets, then the raw little-endian data."""
    path = Path(path)
    with path.open("rb") as handle:
        size = int.from_bytes(handle.read(8), "little")
        try:
            header = json.loads(handle.read(size))
        except (UnicodeDecodeError, json.JSONDecodeError, MemoryError) as err:
            raise DamagedCache(f"{path}: not a safetensors file (header: {type(err).__name__})") from None
    if not isinstance(header, dict):
        raise DamagedCache(f"{path}: not a safetensors file (header is not a table)")
    info = header.get(name)
    if info is None or info.get("dtype") != "F32":
        raise FeatureError(f"{path}: no float32 tensor {name!r} (has {sorted(k for k in header if k != '__metadata__')})")
    start, end = info["data_offsets"]
    shape = tuple(info["shape"])
    if end - start != int(np.prod(shape)) * 4:
        raise FeatureError(f"{path}: tensor {name!r} holds {end - start} bytes for shape {shape}")
    if int(np.prod(shape)) == 0:
        return np.zeros(shape, dtype=np.float32)
    if path.stat().st_size < 8 + size + end:
        raise DamagedCache(f"{path}: {path.stat().st_size} bytes, too short for tensor {name!r} (cut short?)")
    return np.memmap(path, dtype="<f4", mode="r", offset=8 + size + start, shape=shape)
