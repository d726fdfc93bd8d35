"""Raw-pixel baseline: logistic regression on tiny downsampled frames of each clip.

It answers "how much of the task can be solved without learning anything about motion?": every clip
becomes ``n_frames`` uniformly sampled frames resized to ``size x size`` RGB, standardised, and a
multinomial logistic regression is fitted on the train split and scored on the (cross-subject) test
split. A useful benchmark leaves this clearly below 100%.

CLI: ``python -m mgfm.evaluate.pixel_baseline --data data/synthetic``
"""

from __future__ import annotations

import argparse
import collections
import logging
from pathlib import Path

import cv2
import numpy as np
from tqdm import tqdm

from mgfm.data.clip_index import Clip, ClipIndex
from mgfm.data.video_io import VideoDecodeError, decode_frames

logger = logging.getLogger(__name__)


def sample_indices(n_total: int, n_frames: int) -> np.ndarray:
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
    picked = frames[sample_indices(len(frames), n_frames)]
    small = [cv2.resize(f, (size, size), interpolation=cv2.INTER_AREA) for f in picked]
    return (np.stack(small).astype(np.float32) / 255.0).reshape(-1)


def clip_features(clips: list[Clip], n_frames: int = 8, size: int = 16, backend: str = "decord",
                  progress: bool = True) -> tuple[np.ndarray, list[Clip], int]:
    """Features of many clips, decoding each source video once.

    Returns ``(X (N, D) float32, the N clips in X's row order, number of clips skipped)``; clips of a
    video that cannot be decoded are skipped and counted, never a crash.
    """
    by_video: dict[str, list[Clip]] = collections.defaultdict(list)
    for c in clips:
        by_video[c.path].append(c)
    rows: list[np.ndarray] = []
    kept: list[Clip] = []
    skipped = 0
    for path, group in tqdm(sorted(by_video.items()), desc="pixel features", unit="video", disable=not progress):
        picks = [c.start_frame + sample_indices(c.n_frames, n_frames) for c in group]
        wanted = np.unique(np.concatenate(picks))
        try:
            frames = decode_frames(path, wanted.tolist(), backend=backend)
        except (VideoDecodeError, OSError) as err:
            logger.warning("%s: skipping %d clips, cannot decode (%s)", path, len(group), err)
            skipped += len(group)
            continue
        where = {int(f): k for k, f in enumerate(wanted)}
        for c, idx in zip(group, picks):
            rows.append(pixel_features(frames[[where[int(i)] for i in idx]], n_frames, size))
            kept.append(c)
    dim = n_frames * size * size * 3
    x = np.stack(rows) if rows else np.zeros((0, dim), np.float32)
    return x, kept, skipped


def mean_class_accuracy(y_true: np.ndarray, y_pred: np.ndarray) -> float:
    """Average over the classes present in ``y_true`` of the per-class recall."""
    classes = np.unique(y_true)
    return float(np.mean([np.mean(y_pred[y_true == k] == k) for k in classes])) if len(classes) else float("nan")


def fit_and_score(x_train: np.ndarray, y_train: np.ndarray, x_test: np.ndarray, y_test: np.ndarray,
                  c: float = 0.01, max_iter: int = 500, seed: int = 0) -> dict:
    """Standardise, fit a multinomial logistic regression, score -> {top1, mean_class, n_train, n_test}."""
    from sklearn.linear_model import LogisticRegression
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    model = make_pipeline(StandardScaler(), LogisticRegression(C=c, max_iter=max_iter, random_state=seed))
    model.fit(x_train, y_train)
    pred = model.predict(x_test)
    return {
        "top1": float(np.mean(pred == y_test)),
        "mean_class": mean_class_accuracy(y_test, pred),
        "majority_top1": float(np.mean(y_test == np.bincount(y_train).argmax())),
        "n_train": int(len(y_train)),
        "n_test": int(len(y_test)),
    }


def run(index: ClipIndex, n_frames: int = 8, size: int = 16, c: float = 0.01, backend: str = "decord",
        progress: bool = True) -> dict:
    """The whole baseline on a clip index with labelled ``train`` and ``test`` clips."""
    train = [cl for cl in index.split("train") if cl.label >= 0]
    test = [cl for cl in index.split("test") if cl.label >= 0]
    if not train or not test:
        raise ValueError(f"{index.name}: need labelled train and test clips, got {len(train)} and {len(test)}")
    x_tr, kept_tr, skip_tr = clip_features(train, n_frames, size, backend, progress)
    x_te, kept_te, skip_te = clip_features(test, n_frames, size, backend, progress)
    y_tr = np.array([cl.label for cl in kept_tr])
    y_te = np.array([cl.label for cl in kept_te])
    result = fit_and_score(x_tr, y_tr, x_te, y_te, c=c)
    result.update(skipped=skip_tr + skip_te, n_frames=n_frames, size=size, C=c, dim=int(x_tr.shape[1]))
    return result


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(prog="python -m mgfm.evaluate.pixel_baseline", description=__doc__.splitlines()[0])
    ap.add_argument("--data", default="data/synthetic", help="folder with labels.csv, protocol.json, videos/")
    ap.add_argument("--n-frames", type=int, default=8)
    ap.add_argument("--size", type=int, default=16)
    ap.add_argument("--C", type=float, default=0.01, help="inverse L2 strength of the logistic regression")
    ap.add_argument("--backend", default="decord", choices=("decord", "pyav"))
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    from mgfm.data.imigue import read_imigue

    data = Path(args.data)
    index = read_imigue(data / "labels.csv", protocol=data / "protocol.json", video_dir=data / "videos",
                        name=data.name)
    r = run(index, args.n_frames, args.size, args.C, args.backend)
    print(f"raw-pixel baseline on {index.name} ({r['n_frames']} frames x {r['size']}x{r['size']} RGB, D={r['dim']}, "
          f"C={r['C']}): train {r['n_train']} / test {r['n_test']} clips, {r['skipped']} skipped")
    print(f"  top-1 {100 * r['top1']:.1f}%   mean-class {100 * r['mean_class']:.1f}%   "
          f"(majority class top-1 {100 * r['majority_top1']:.1f}%)")


if __name__ == "__main__":
    main()
