"""Clip retrieval with a run's frozen encoder: FAISS index over one split, queries from another or a video file.

Evaluation (``evaluate``): features (cached, shared with the linear probe) of the database split
(default ``train``) go into a cosine FAISS index (``flat`` by default, ``ivf``/``hnsw`` by option, on a
GPU when faiss has one); the labelled clips of the query split (default ``test``) are scored with
Recall@k (a clip of the query's class among the top k) and mAP over the full exact ranking
(:func:`mgfm.evaluate.retrieval_metrics.retrieval_metrics`). The run's index is saved to ``<out>/index/``
(with ``key.json``: the encoder checksum, shard manifest checksum, stream and index settings it was
built with), reloaded, and the reloaded index must return the same neighbours as the built one on a
few queries before anything is reported. Random-init and raw-pixel encoders give reference rows.
Writes ``<out>/report.json`` + ``report.md`` and prints a short table.

Query (``query_video``): any video file is decoded, sampled, centre-cropped and normalised exactly as
the eval stream prepares a shard clip (:func:`eval_clip`), encoded, and searched in the saved index
(rebuilt when missing or stale). Prints the nearest clips; ``montage=out.png`` draws the query's frames
beside each neighbour's (read back from the shards by clip id).
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import numpy as np
import torch

from mgfm.config import bounded
from mgfm.data.sampling import sample_indices
from mgfm.data.stream import StreamConfig
from mgfm.data.transforms import centre_crop_box, crop_resize, normalise_into
from mgfm.sources.video_io import VideoDecodeError, decode_frames, probe
from mgfm.runtime import feature_precision
from mgfm.errors import MgfmError
from mgfm.evaluate.encoder_eval import (EncoderEvalRecipe, eval_device, features_folder, finish, output_folder,
                                        prepare, resolve_encoder, stream_for)
from mgfm.evaluate.extract import cache_key, cache_stem, split_features
from mgfm.evaluate.featureset import FeatureError, FeatureSet
from mgfm.report import format_table, markdown_table, save_figure
from mgfm.files import require_folder, write_atomic
from mgfm.shards.read import read_samples, resolve_shards
from mgfm.evaluate.retrieval import CHOICES, RetrievalIndex
from mgfm.evaluate.retrieval_metrics import retrieval_metrics
from mgfm.model.hf import encoder_checksum, load_encoder_hf
from mgfm.shards.manifest import load_manifest

log = logging.getLogger(__name__)

KEY_FILE = "key.json"  # beside RetrievalIndex's own files: what the saved index was built from


class QueryError(MgfmError, ValueError):
    """A query video that cannot be used (missing, not decodable, bad frame range); one line."""


@dataclass
class RetrievalRecipe(EncoderEvalRecipe):
    """What ``make retrieval`` / ``eval/retrieval.py`` evaluate or query, and how (``out`` default:
    <run>/retrieval/<shards name>/)."""

    database_split: str = "train"  # indexed
    query_split: str = "test"  # its labelled clips are the evaluation queries
    # auto: exact flat for small databases, else HNSW when it fits index_memory_gb, else the compressed ivfpq
    # (PQ codes + exact re-ranking from vectors on disk); or flat | ivf | hnsw | ivfpq.
    index: str = "auto"
    # The neighbour R@10 the search knob (nprobe / ef_search / rerank) is calibrated to (None: keep the given
    # knobs); the report records the recall / speed frontier it chose from.
    recall_target: float | None = bounded(0.99, gt=0, le=1)
    index_memory_gb: float | None = bounded(None, gt=0)  # RAM an index may take; default half of what is available
    nlist: int | None = bounded(None, ge=1)  # ivf / ivfpq lists (default ~4 sqrt(N))
    nprobe: int | None = bounded(None, ge=1)  # ivf lists searched (default nlist/16, at least 8; tuned with recall_target)
    hnsw_m: int = bounded(32, ge=2)
    ef_search: int = bounded(128, ge=1)  # tuned with recall_target
    use_gpu: bool | str = "auto"  # faiss index on a GPU: auto | true | false
    ks: list[int] = bounded(default_factory=lambda: [1, 5, 10], ge=1)
    selfcheck: int = bounded(8, ge=0)  # queries searched on the built and on the reloaded index (must agree)
    index_dir: str | None = None  # where the index is saved / read; default <out>/index (rebuilt when stale)
    query: str | None = None  # a video file: search the index with it instead of evaluating
    query_start: int = bounded(0, ge=0)  # first frame of the query span
    query_end: int = bounded(-1, ge=-1)  # last frame (inclusive) of the query span; -1 = end of the video
    k: int = bounded(5, ge=1)  # neighbours shown for a query
    montage: str | None = None  # PNG with the query's and the neighbours' frames
    montage_frames: int = bounded(4, ge=1)  # frames per clip in the montage

    def __post_init__(self) -> None:
        if self.index not in CHOICES:
            raise ValueError(f"index must be one of {list(CHOICES)}, got {self.index!r}")
        if self.use_gpu not in ("auto", True, False):
            raise ValueError(f"use_gpu must be auto, true or false, got {self.use_gpu!r}")
        if not self.ks or min(self.ks) < 1:
            raise ValueError(f"ks must be positive integers, got {self.ks}")
        if self.k < 1 or self.montage_frames < 1 or self.views < 1 or self.selfcheck < 0:
            raise ValueError("k, montage_frames and views must be >= 1, selfcheck >= 0")


# ------------------------------------------------------------------------------------------ helpers


def index_dir(recipe: RetrievalRecipe, out: Path) -> Path:
    """``index_dir``, else ``<out>/index``; a file in the way is a one-line error now, before any work."""
    return require_folder(Path(recipe.index_dir) if recipe.index_dir else out / "index")


def require_split(manifest: dict, shards: str, split: str) -> int:
    """Clips in ``split`` according to the manifest; a one-line :class:`FeatureError` when there are none."""
    info = manifest.get("splits", {}).get(split)
    if not info or not info.get("samples"):
        have = ", ".join(f"{s} {v.get('samples', 0)}" for s, v in manifest.get("splits", {}).items()) or "none"
        raise FeatureError(f"{shards}: split {split!r} has no clips (empty split; clips per split: {have})")
    return int(info["samples"])


def index_settings(recipe: RetrievalRecipe) -> dict:
    return {"kind": recipe.index, "recall_target": recipe.recall_target, "memory_gb": recipe.index_memory_gb,
            "nlist": recipe.nlist, "nprobe": recipe.nprobe, "hnsw_m": recipe.hnsw_m, "ef_search": recipe.ef_search,
            "seed": recipe.seed}


def index_key(encoder_id: str, recipe: RetrievalRecipe, stream: StreamConfig, device: torch.device) -> dict:
    """What an index was built from: the database features' cache key plus the index settings."""
    return {"features": cache_key(encoder_id, recipe.shards, recipe.database_split, stream, recipe.views,
                                  feature_precision(device)),
            "index": index_settings(recipe)}


def feature_stem(cache_dir: Path, encoder_id: str, recipe: RetrievalRecipe, split: str, stream: StreamConfig,
                 device: torch.device) -> Path:
    """The feature-cache stem :func:`split_features` uses for ``split`` (same key, same place)."""
    key = cache_key(encoder_id, recipe.shards, split, stream, recipe.views, feature_precision(device))
    return cache_stem(cache_dir, recipe.shards, split, key)


def build_index(database: FeatureSet, recipe: RetrievalRecipe, folder: Path | None = None) -> RetrievalIndex:
    """A ``recipe.index`` index over ``database`` (N, D), its knob calibrated to ``recipe.recall_target``;
    logs which index and why. A compressed index keeps its re-ranking vectors in ``folder``."""
    budget = None if recipe.index_memory_gb is None else int(recipe.index_memory_gb * 2**30)
    vectors = None
    if folder is not None:
        folder.mkdir(parents=True, exist_ok=True)
        vectors = folder / "vectors.build.npy"
    index = RetrievalIndex.build(database.features, database.rows, kind=recipe.index, nlist=recipe.nlist,
                                 nprobe=recipe.nprobe, hnsw_m=recipe.hnsw_m, ef_search=recipe.ef_search,
                                 use_gpu=recipe.use_gpu, seed=recipe.seed, recall_target=recipe.recall_target,
                                 budget=budget, vectors_path=vectors if recipe.index in ("auto", "ivfpq") else None)
    log.info("retrieval index: %s (%s)%s", index.kind, index.params.get("why", f"asked for index={recipe.index}"),
             _calibration_text(index.params.get("calibration")))
    return index


def _calibration_text(calib: dict | None) -> str:
    if not calib:
        return ""
    if calib.get("exact"):
        return "; exact search, recall 1.0"
    knobs = ", ".join(f"{k}={v}" for k, v in calib.items() if k in ("nprobe", "ef_search", "rerank"))
    return (f"; {knobs} gives neighbour R@{calib['k']} {calib['recall']:.3f} on {calib['queries']} calibration "
            f"queries at {calib['qps']:.0f} q/s (target {calib['recall_target']})")


def save_index(index: RetrievalIndex, folder: Path, key: dict) -> None:
    """Save ``index`` and, last, the key it was built from (a folder with a key is complete)."""
    (folder / KEY_FILE).unlink(missing_ok=True)
    index.save(folder)
    (folder / "vectors.build.npy").unlink(missing_ok=True)  # a compressed index's build copy; saved as vectors.npy
    write_atomic(folder / KEY_FILE, json.dumps(key, sort_keys=True))


def saved_key(folder: Path) -> dict | None:
    try:
        return json.loads((folder / KEY_FILE).read_text())
    except (OSError, json.JSONDecodeError):
        return None


def check_same_search(built: RetrievalIndex, loaded: RetrievalIndex, queries: np.ndarray, k: int) -> dict:
    """Search ``queries`` (Q, D) in both indexes; raise RuntimeError unless neighbours and scores agree."""
    if len(queries) == 0:
        return {"queries": 0, "k": 0, "identical": True}
    scores_a, ids_a = built.search(queries, k)
    scores_b, ids_b = loaded.search(queries, k)
    same = np.array_equal(ids_a, ids_b) and np.allclose(scores_a, scores_b, rtol=1e-5, atol=1e-6)
    if not same:
        raise RuntimeError(f"the saved index does not search like the built one ({int((ids_a != ids_b).sum())} "
                           f"of {ids_a.size} neighbours differ): not reporting from a broken index")
    return {"queries": int(len(queries)), "k": int(ids_a.shape[1]), "identical": True}


# -------------------------------------------------------------------------------------- evaluation


def evaluate(recipe: RetrievalRecipe) -> dict:
    """Index the database split, score the query split, for the run's encoder and the references.

    Returns the report dict (also written to ``<out>/report.json``)."""
    setup = prepare(recipe, "retrieval")
    manifest = load_manifest(recipe.shards)
    for split in (recipe.database_split, recipe.query_split):
        require_split(manifest, recipe.shards, split)
    results: dict[str, dict] = {}
    selfcheck: dict = bounded({}, ge=0)
    folder = index_dir(recipe, setup.out)
    for name, encoder, encoder_id in setup.encoders:
        log.info("retrieval for %s", name)
        feats = {recipe.database_split: setup.features(encoder, encoder_id, recipe.database_split, scored=False),
                 recipe.query_split: setup.features(encoder, encoder_id, recipe.query_split, scored=True)}
        db = feats[recipe.database_split].require(f"{recipe.shards} split {recipe.database_split!r} (database)")
        queries = feats[recipe.query_split].labelled().require(
            f"{recipe.shards} split {recipe.query_split!r} (labelled queries)", db.dim)
        index = build_index(db, recipe, folder if name == "pretrained" else None)
        if name == "pretrained":
            chosen = {"kind": index.kind, "why": index.params.get("why", f"asked for index={recipe.index}"),
                      "calibration": index.params.get("calibration"), "frontier": index.params.get("frontier", [])}
            save_index(index, folder, index_key(encoder_id, recipe, setup.stream, setup.device))
            loaded = RetrievalIndex.load(folder, use_gpu=recipe.use_gpu)
            selfcheck = check_same_search(index, loaded, queries.features[: recipe.selfcheck], max(recipe.ks))
            log.info("saved index %s reloaded: same neighbours on %d queries", folder, selfcheck["queries"])
            index = loaded
        metrics = retrieval_metrics(index, queries.features, queries.labels, recipe.ks)
        results[name] = {**metrics, "feature_dim": db.dim, "index_params": index.params, "on_gpu": index.on_gpu,
                         "features": {split: str(feature_stem(setup.cache, encoder_id, recipe, split, setup.stream,
                                                              setup.device))
                                      for split in (recipe.database_split, recipe.query_split)}}

    report = {
        "run": str(setup.run_dir), "encoder": str(setup.encoder_folder), "shards": recipe.shards,
        "splits": {"database": recipe.database_split, "queries": recipe.query_split}, "views": recipe.views,
        "index": {"asked": index_settings(recipe), "folder": str(folder), **chosen}, "ks": list(recipe.ks),
        "selfcheck": selfcheck, "results": results,
    }
    headers, rows = summary_rows(results, recipe.ks)
    first = next(iter(results.values()))
    markdown = (f"Run `{setup.run_dir}`, shards `{recipe.shards}`: {first['n_database']} `{recipe.database_split}` "
                f"clips indexed ({chosen['kind']}: {chosen['why']}{_calibration_text(chosen['calibration'])}; cosine), "
                f"{first['n_queries']} labelled `{recipe.query_split}` clips "
                f"as queries, {recipe.views} temporal view(s) per clip. R@k: a clip of the query's class among the "
                "k nearest; mAP over the full exact ranking.\n\n"
                + markdown_table(headers, rows)
                + f"\n\nIndex saved to `{folder}`; reloaded and checked against the built index on "
                f"{selfcheck.get('queries', 0)} queries (identical neighbours).\n")
    return finish(setup.out, report, markdown, "Frozen-encoder retrieval", feats, [format_table(headers, rows)])


def summary_rows(results: dict[str, dict], ks: Sequence[int]) -> tuple[list[str], list[list]]:
    ks = sorted({int(k) for k in ks})
    headers = ["encoder", *(f"R@{k}" for k in ks), "mAP", "dim"]
    rows = [[name, *(r["recall"][str(k)] for k in ks), r.get("map"), r["feature_dim"]] for name, r in results.items()]
    return headers, rows


# ------------------------------------------------------------------------------------------- query


def eval_clip(source: bytes | str | Path, cfg: StreamConfig, start: int = 0, end: int = -1,
              n_frames: int | None = None) -> tuple[np.ndarray, np.ndarray]:
    """One clip prepared exactly as the eval stream prepares a shard sample.

    Frames ``start..end`` (inclusive; ``end=-1``: to the last frame) of the video are sampled with
    ``cfg``'s eval policy (centred, deterministic), centre-cropped (``cfg.eval_crop``), resized to
    ``cfg.img_size`` and normalised with ``cfg.mean``/``cfg.std``.

    Returns:
        ``(frames uint8 (T, S, S, 3), video float32 (T, 3, S, S))`` with ``T = cfg.frames``, ``S = cfg.img_size``.
    Raises:
        VideoDecodeError: not a decodable video.
        ValueError: the frame range lies outside the video.
    """
    n = int(n_frames) if n_frames is not None else probe(source)["n_frames"]
    last = n - 1 if end < 0 else int(end)
    if not 0 <= start <= last < n:
        raise QueryError(f"frames {start}..{end} are outside the video's {n} frames")
    indices = start + sample_indices(last - start + 1, cfg.frames, cfg.stride_policy, cfg.stride, None, cfg.pad)
    lookup = np.unique(indices)
    decoded = decode_frames(source, lookup.tolist(), backend=cfg.backend, fallback=cfg.fallback_backend)
    frames = decoded[np.searchsorted(lookup, indices)]
    frames = crop_resize(frames, centre_crop_box(frames.shape[1], frames.shape[2], cfg.eval_crop), cfg.img_size)
    video = np.empty((len(frames), 3, cfg.img_size, cfg.img_size), dtype=np.float32)
    normalise_into(np.ascontiguousarray(frames.transpose(0, 3, 1, 2)), video, cfg.mean, cfg.std)
    return frames, video


def query_clip(path: str | Path, cfg: StreamConfig, start: int = 0, end: int = -1) -> tuple[np.ndarray, np.ndarray]:
    """:func:`eval_clip` of a user's video file, with its failures as one-line :class:`QueryError`."""
    path = Path(path)
    if not path.is_file():
        raise QueryError(f"{path}: no such file")
    try:
        return eval_clip(path, cfg, start, end)
    except VideoDecodeError as err:
        detail = " ".join(str(err.__cause__ or err).split())
        raise QueryError(f"{path}: not a decodable video ({detail})") from None
    except ValueError as err:
        raise QueryError(f"{path}: query_start/query_end: {err}") from None


@torch.no_grad()
def encode_clip(encoder: torch.nn.Module, video: np.ndarray, device: torch.device) -> np.ndarray:
    """``video`` float32 (T, 3, S, S) -> feature float32 (D,)."""
    encoder = encoder.to(device).eval()
    return encoder.features(torch.from_numpy(video)[None].to(device)).float().cpu().numpy()[0]


def index_for_queries(recipe: RetrievalRecipe, run_dir: Path, encoder: torch.nn.Module, encoder_id: str,
                      stream: StreamConfig, device: torch.device) -> RetrievalIndex:
    """The saved index when it was built from this encoder, shards and settings; else build and save one.

    With an explicit ``index_dir`` the saved index is used as it is (it must exist)."""
    folder = index_dir(recipe, output_folder(recipe, run_dir, "retrieval"))
    key = index_key(encoder_id, recipe, stream, device)
    if recipe.index_dir:
        return RetrievalIndex.load(folder, use_gpu=recipe.use_gpu)
    if saved_key(folder) == key:
        log.info("using the saved index %s", folder)
        return RetrievalIndex.load(folder, use_gpu=recipe.use_gpu)
    log.info("no up-to-date index in %s: building one", folder)

    require_split(load_manifest(recipe.shards), recipe.shards, recipe.database_split)
    db = split_features(None, recipe.shards, recipe.database_split, stream, features_folder(recipe, run_dir), recipe.views,
                        encoder=encoder, encoder_id=encoder_id, device=device)
    index = build_index(db.require(f"{recipe.shards} split {recipe.database_split!r} (database)"), recipe, folder)
    save_index(index, folder, key)
    return index


def read_shard_clips(shards: str, split: str, clip_ids: Sequence[str],
                     remote_commands: dict[str, str] | None = None) -> dict[str, bytes]:
    """``{clip_id: mp4 bytes}`` read from the ``split`` shards of ``shards`` (one pass, stops when all are found)."""
    wanted = set(clip_ids)
    found: dict[str, bytes] = {}
    for ref in resolve_shards(shards, split, remote_commands):
        if len(found) == len(wanted):
            break
        for sample in read_samples(ref.url):
            key = sample["__key__"]
            if key in wanted and key not in found and "mp4" in sample:
                found[key] = sample["mp4"]
                if len(found) == len(wanted):
                    break
    missing = wanted - set(found)
    if missing:
        log.warning("%s %s: %d neighbour clips not found in the shards (e.g. %s)", shards, split, len(missing),
                    sorted(missing)[0])
    return found


def pick_frames(frames: np.ndarray, count: int) -> np.ndarray:
    """``count`` evenly spaced frames of (T, H, W, 3)."""
    return frames[np.linspace(0, len(frames) - 1, min(count, len(frames))).round().astype(int)]


def write_montage(path: str | Path, strips: Sequence[tuple[np.ndarray | None, str]]) -> Path:
    """A PNG with one row per ``(frames uint8 (F, H, W, 3) or None, caption)``: frames side by side,
    caption above. Written atomically."""
    # deferred on purpose: matplotlib is slow to import and only plots need it
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    width = max((len(f) for f, _ in strips if f is not None), default=1)
    fig = Figure(figsize=(max(4.0, 1.6 * width), 1.9 * len(strips)), dpi=100)
    FigureCanvasAgg(fig)
    for i, (frames, caption) in enumerate(strips):
        ax = fig.add_subplot(len(strips), 1, i + 1)
        if frames is not None:
            gap = np.full((frames.shape[1], max(1, frames.shape[2] // 16), 3), 255, dtype=np.uint8)
            ax.imshow(np.concatenate([x for f in frames for x in (f, gap)][:-1], axis=1))
        else:
            ax.text(0.5, 0.5, "(clip not found in the shards)", ha="center", va="center", transform=ax.transAxes)
        ax.set_title(caption, fontsize=8, loc="left")
        ax.axis("off")
    fig.tight_layout()
    return save_figure(fig, path)


def query_video(recipe: RetrievalRecipe) -> dict:
    """Encode ``recipe.query`` and print its ``recipe.k`` nearest database clips (and a montage).

    Returns ``{"query", "frames", "index", "neighbours": [{rank, clip_id, label, label_name, video_id,
    start_frame, end_frame, score}]}``."""
    run_dir, encoder_folder = resolve_encoder(recipe)
    encoder, cfg = load_encoder_hf(encoder_folder)
    stream = stream_for(cfg, recipe)
    frames, video = query_clip(recipe.query, stream, recipe.query_start, recipe.query_end)
    device = eval_device(recipe)
    feature = encode_clip(encoder, video, device)
    index = index_for_queries(recipe, run_dir, encoder, encoder_checksum(encoder_folder), stream, device)
    if index.dim != len(feature):
        folder = index_dir(recipe, output_folder(recipe, run_dir, "retrieval"))
        raise FeatureError(f"{folder}: the index holds {index.dim}-d vectors but encoder {encoder_folder} gives "
                           f"{len(feature)}-d features")
    scores, ids = index.search(feature[None], recipe.k)
    neighbours = []
    for rank, (score, i) in enumerate(zip(scores[0], ids[0]), 1):
        if i < 0:
            continue
        row = index.rows[int(i)]
        neighbours.append({"rank": rank, "clip_id": row.get("clip_id"), "label": row.get("label"),
                           "label_name": row.get("label_name") or str(row.get("label")),
                           "video_id": row.get("video_id"), "start_frame": row.get("start_frame"),
                           "end_frame": row.get("end_frame"), "score": float(score)})
    headers = ["rank", "clip_id", "label", "video_id", "start", "end", "cosine"]
    print(f"query {recipe.query}: {len(neighbours)} nearest of {index.ntotal} `{recipe.database_split}` clips")
    print(format_table(headers, [[n["rank"], n["clip_id"], n["label_name"], n["video_id"], n["start_frame"],
                                  n["end_frame"], n["score"]] for n in neighbours]))
    result = {"query": str(recipe.query), "frames": [recipe.query_start, recipe.query_end],
              "index": {"kind": index.kind, "ntotal": index.ntotal}, "neighbours": neighbours}
    if recipe.montage:
        clips = read_shard_clips(recipe.shards, recipe.database_split, [n["clip_id"] for n in neighbours],
                                 stream.remote_commands)
        strips: list[tuple[np.ndarray | None, str]] = [(pick_frames(frames, recipe.montage_frames),
                                                        f"query: {Path(recipe.query).name}")]
        for n in neighbours:
            mp4 = clips.get(n["clip_id"])
            clip_frames = pick_frames(eval_clip(mp4, stream)[0], recipe.montage_frames) if mp4 is not None else None
            strips.append((clip_frames, f"#{n['rank']} {n['label_name']}  cos {n['score']:.3f}  {n['video_id']} "
                                        f"[{n['start_frame']}-{n['end_frame']}]"))
        result["montage"] = str(write_montage(recipe.montage, strips))
        print(f"montage: {recipe.montage}")
    return result


def run(recipe: RetrievalRecipe) -> dict:
    """The entry point: :func:`query_video` when ``recipe.query`` is set, else :func:`evaluate`."""
    return query_video(recipe) if recipe.query else evaluate(recipe)
