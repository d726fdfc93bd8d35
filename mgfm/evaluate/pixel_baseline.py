"""Raw-pixel baseline: logistic regression on tiny downsampled frames of each clip.

It answers "how much of the task can be solved without learning any representation?": every clip
becomes ``n_frames`` uniformly sampled frames resized to ``size x size`` RGB, standardised, and a
multinomial logistic regression is fitted on the train split and scored on the (cross-subject) test
split. A useful benchmark leaves this clearly below 100%.

``--features motion`` swaps in a hand-made reference instead: per-clip normalised grey-level frame
differences (where the figure moved, not what it looks like). The gap between the two shows how much
of the task is motion that a video representation can learn, once it ignores the subject's look.

CLI: ``python -m mgfm.evaluate.pixel_baseline --data data/synthetic [--features pixels|motion] [--C 0.001]``
"""

from __future__ import annotations

import argparse
import collections
import logging
import warnings
from pathlib import Path
from typing import Callable

import cv2
import numpy as np
from tqdm import tqdm
from sklearn.exceptions import ConvergenceWarning
from sklearn.linear_model import LogisticRegression
from sklearn.pipeline import make_pipeline
from sklearn.preprocessing import StandardScaler

from mgfm.sources.clip_index import Clip, ClipIndex
from mgfm.sources.video_io import VideoDecodeError, decode_frames
from mgfm.sources.imigue import read_imigue

logger = logging.getLogger(__name__)


def evenly_spaced(n_total: int, n_frames: int) -> np.ndarray:
    """``n_frames`` uniformly spaced positions in [0, n_total) (repeats when the clip is shorter) -> (n_frames,) int."""
    if n_total < 1:
        raise ValueError(f"expected a clip with at least one frame, got {n_total}")
    return np.linspace(0, n_total - 1, n_frames).round().astype(np.int64)


def pixel_features(frames: np.ndarray, n_frames: int = 8, size: int = 16) -> np.ndarray:
    """Flattened tiny frames of a clip.

    Args:
        frames: (T, H, W, 3) uint8 RGB, T >= 1.
        n_frames: frames sampled uniformly over T.
        size: each sampled frame is resized (area interpolation) to size x size.

    Returns:
        (n_frames * size * size * 3,) float32 in [0, 1].
    """
    frames = np.asarray(frames)
    if frames.ndim != 4 or frames.shape[-1] != 3:
        raise ValueError(f"expected frames shaped (T, H, W, 3), got {frames.shape}")
    picked = frames[evenly_spaced(len(frames), n_frames)]
    small = [cv2.resize(f, (size, size), interpolation=cv2.INTER_AREA) for f in picked]
    return (np.stack(small).astype(np.float32) / 255.0).reshape(-1)


def motion_features(frames: np.ndarray, n_frames: int = 8, size: int = 16) -> np.ndarray:
    """Where the clip moves: |grey frame - first grey frame| of the sampled frames, scaled to max 1.

    Args:
        frames: (T, H, W, 3) uint8 RGB, T >= 1.

    Returns:
        ((n_frames - 1) * size * size,) float32 in [0, 1].
    """
    grey = pixel_features(frames, n_frames, size).reshape(n_frames, size, size, 3).mean(-1)
    diff = np.abs(grey[1:] - grey[:1])
    return (diff / max(float(diff.max()), 1e-6)).reshape(-1).astype(np.float32)


FEATURES: dict[str, Callable[..., np.ndarray]] = {"pixels": pixel_features, "motion": motion_features}


def clip_features(clips: list[Clip], n_frames: int = 8, size: int = 16, backend: str = "decord",
                  progress: bool = True, features: str = "pixels") -> tuple[np.ndarray, list[Clip], int]:
    """Features (``pixels`` or ``motion``) of many clips, decoding each source video once.

    Returns ``(X (N, D) float32, the N clips in X's row order, number of clips skipped)``; clips of a
    video that cannot be decoded are skipped and counted, never a crash.
    """
    if features not in FEATURES:
        raise ValueError(f"unknown features {features!r}; expected one of {sorted(FEATURES)}")
    feature_fn = FEATURES[features]
    by_video: dict[str, list[Clip]] = collections.defaultdict(list)
    for c in clips:
        by_video[c.path].append(c)
    rows: list[np.ndarray] = []
    kept: list[Clip] = []
    skipped = 0
    for path, group in tqdm(sorted(by_video.items()), desc="pixel features", unit="video", disable=not progress):
        picks = [c.start_frame + evenly_spaced(c.n_frames, n_frames) for c in group]
        wanted = np.unique(np.concatenate(picks))
        try:
            frames = decode_frames(path, wanted.tolist(), backend=backend)
        except (VideoDecodeError, OSError) as err:
            logger.warning("%s: skipping %d clips, cannot decode (%s)", path, len(group), err)
            skipped += len(group)
            continue
        where = {int(f): k for k, f in enumerate(wanted)}
        for c, idx in zip(group, picks):
            rows.append(feature_fn(frames[[where[int(i)] for i in idx]], n_frames, size))
            kept.append(c)
    dim = len(feature_fn(np.zeros((1, size, size, 3), np.uint8), n_frames, size))
    x = np.stack(rows) if rows else np.zeros((0, dim), np.float32)
    return x, kept, skipped


def mean_class_accuracy(y_true: np.ndarray, y_pred: np.ndarray) -> float:
    """Average over the classes present in ``y_true`` of the per-class recall."""
    classes = np.unique(y_true)
    return float(np.mean([np.mean(y_pred[y_true == k] == k) for k in classes])) if len(classes) else float("nan")


def fit_and_score(x_train: np.ndarray, y_train: np.ndarray, x_test: np.ndarray, y_test: np.ndarray,
                  c: float = 0.01, max_iter: int = 500, seed: int = 0) -> dict:
    """Standardise, fit a multinomial logistic regression, score -> {top1, mean_class, n_train, n_test}."""
    model = make_pipeline(StandardScaler(), LogisticRegression(C=c, max_iter=max_iter, random_state=seed))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always", ConvergenceWarning)
        model.fit(x_train, y_train)
    if any(issubclass(w.category, ConvergenceWarning) for w in caught):
        logger.info("logistic regression stopped at max_iter=%d before full convergence", max_iter)
    pred = model.predict(x_test)
    return {
        "top1": float(np.mean(pred == y_test)),
        "mean_class": mean_class_accuracy(y_test, pred),
        "majority_top1": float(np.mean(y_test == np.bincount(y_train).argmax())),
        "n_train": int(len(y_train)),
        "n_test": int(len(y_test)),
    }


def run(index: ClipIndex, n_frames: int = 8, size: int = 16, c: float = 0.01, backend: str = "decord",
        progress: bool = True, features: str = "pixels", max_iter: int = 500) -> dict:
    """The whole baseline on a clip index with labelled ``train`` and ``test`` clips -> scores and sizes."""
    train = [cl for cl in index.split("train") if cl.label >= 0]
    test = [cl for cl in index.split("test") if cl.label >= 0]
    if not train or not test:
        raise ValueError(f"{index.name}: need labelled train and test clips, got {len(train)} and {len(test)}")
    x_tr, kept_tr, skip_tr = clip_features(train, n_frames, size, backend, progress, features)
    x_te, kept_te, skip_te = clip_features(test, n_frames, size, backend, progress, features)
    y_tr = np.array([cl.label for cl in kept_tr])
    y_te = np.array([cl.label for cl in kept_te])
    result = fit_and_score(x_tr, y_tr, x_te, y_te, c=c, max_iter=max_iter)
    result.update(skipped=skip_tr + skip_te, n_frames=n_frames, size=size, C=c, dim=int(x_tr.shape[1]),
                  features=features)
    return result


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(prog="python -m mgfm.evaluate.pixel_baseline", description=__doc__.splitlines()[0])
    ap.add_argument("--data", default="data/synthetic", help="folder with labels.csv, protocol.json, videos/")
    ap.add_argument("--n-frames", type=int, default=8)
    ap.add_argument("--size", type=int, default=16)
    ap.add_argument("--features", default="pixels", choices=sorted(FEATURES),
                    help="pixels: the raw-pixel baseline; motion: frame-difference reference")
    ap.add_argument("--C", type=float, default=0.001, help="inverse L2 strength of the logistic regression")
    ap.add_argument("--max-iter", type=int, default=500)
    ap.add_argument("--backend", default="decord", choices=("decord", "pyav"))
    ap.add_argument("--no-progress", action="store_true")
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")

    data = Path(args.data)
    index = read_imigue(data / "labels.csv", protocol=data / "protocol.json", video_dir=data / "videos",
                        name=data.name)
    r = run(index, args.n_frames, args.size, args.C, args.backend, not args.no_progress, args.features, args.max_iter)
    what = "raw-pixel baseline" if args.features == "pixels" else "frame-difference reference"
    print(f"{what} on {index.name} ({r['n_frames']} frames x {r['size']}x{r['size']}, D={r['dim']}, C={r['C']}): "
          f"train {r['n_train']} / test {r['n_test']} clips (cross-subject), {r['skipped']} skipped")
    print(f"  top-1 {100 * r['top1']:.1f}%   mean-class {100 * r['mean_class']:.1f}%   "
          f"(majority class top-1 {100 * r['majority_top1']:.1f}%)")


if __name__ == "__main__":
    main()
