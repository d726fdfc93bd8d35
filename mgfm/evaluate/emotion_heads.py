"""Video-level emotion from micro-gesture sequences, the library: a video's clips in time order
(:func:`build_sequences`), per-clip MG distributions without leaks (:func:`mg_probabilities`), the heads that
map a video to p(positive) (:class:`VectorHead`, :class:`SequenceHead`) and their binary metrics. The runner
that reads a run's features and writes the report is :mod:`mgfm.evaluate.emotion_eval`.
"""

from __future__ import annotations

import dataclasses
import logging
import warnings
from collections import Counter
from dataclasses import dataclass
from typing import Mapping, Sequence

import numpy as np
import torch
from torch import nn
from scipy.special import softmax
from sklearn.metrics import accuracy_score, balanced_accuracy_score, f1_score, roc_auc_score
from sklearn.model_selection import GroupKFold
from torch.nn.utils.rnn import pack_padded_sequence, pad_packed_sequence

from mgfm.config import bounded
from mgfm.errors import MgfmError
from mgfm.evaluate.featureset import FeatureSet
from mgfm.evaluate.probe import LinearProbe, ProbeConfig, train_probe
from mgfm.sources.clip_index import natural_key

log = logging.getLogger(__name__)
EMOTION_NAMES = {1: "positive", 0: "negative"}


class EmotionError(MgfmError, ValueError):
    """Emotion data that cannot be evaluated (no emotion labels, empty videos, one emotion only)."""


# --------------------------------------------------------------------------------------------- metrics

def binary_metrics(y_true: Sequence[int], p_positive: Sequence[float], threshold: float = 0.5) -> dict:
    """Scores of video-level emotion predictions.

    Args:
        y_true: (V,) 0/1 true emotions.
        p_positive: (V,) predicted probability of emotion 1; the prediction is ``p >= threshold``.

    Returns:
        ``{"n", "accuracy", "balanced_accuracy" (mean recall over the emotions present), "macro_f1" (mean F1
        of both emotions, an absent/never-predicted one counting 0), "auroc" (None when the test videos
        hold one emotion only)}``.
    """
    y = np.asarray(y_true).astype(np.int64)
    p = np.asarray(p_positive, dtype=np.float64)
    if y.ndim != 1 or p.shape != y.shape:
        raise EmotionError(f"emotion metrics: {y.shape} labels vs {p.shape} scores; expected two (V,) vectors")
    if len(y) == 0:
        raise EmotionError("emotion metrics: no test videos")
    if not np.isin(y, (0, 1)).all():
        raise EmotionError(f"emotion metrics: labels must be 0/1, got {sorted(set(y.tolist()))}")
    if not np.isfinite(p).all():
        raise EmotionError("emotion metrics: scores contain NaN or inf")
    pred = (p >= threshold).astype(np.int64)
    two = len(np.unique(y)) == 2
    with warnings.catch_warnings():  # a one-emotion test set: sklearn warns about predicted-only classes
        warnings.simplefilter("ignore", UserWarning)
        return {
            "n": int(len(y)),
            "accuracy": float(accuracy_score(y, pred)),
            "balanced_accuracy": float(balanced_accuracy_score(y, pred)),
            "macro_f1": float(f1_score(y, pred, labels=[0, 1], average="macro", zero_division=0)),
            "auroc": float(roc_auc_score(y, p)) if two else None,
        }


def require_both_emotions(y: np.ndarray, what: str) -> None:
    """One-line :class:`EmotionError` unless ``y`` (V,) holds videos of both emotions."""
    if len(y) == 0:
        raise EmotionError(f"{what}: no videos")
    values = sorted(set(np.asarray(y).tolist()))
    if len(values) < 2:
        name = {1: "positive", 0: "negative"}.get(values[0], str(values[0]))
        raise EmotionError(f"{what}: all {len(y)} videos are {name}; an emotion head needs both emotions to learn from")


def majority_probability(y_train: np.ndarray) -> float:
    """The majority-class head's constant ``p(positive)``: 1.0 when positives are the majority, else 0.0
    (ties go to negative, emotion 0, the lower class id)."""
    return 1.0 if int(np.sum(y_train == 1)) > int(np.sum(y_train == 0)) else 0.0


# --------------------------------------------------------------------------- logistic regression head

@dataclass
class VectorHead:
    """Standardised logistic regression on one vector per video (a fitted :class:`LinearProbe`, 2 classes)."""

    probe: LinearProbe

    def standardise(self, x: np.ndarray) -> np.ndarray:
        return (np.asarray(x, dtype=np.float64) - self.probe.mean) / self.probe.scale

    def p_positive(self, x: np.ndarray) -> np.ndarray:
        """``(V, D)`` -> ``(V,)`` p(emotion 1)."""
        model = self.probe.model
        return model.predict_proba(self.standardise(x))[:, list(model.classes_).index(1)]

    def contributions(self, x: np.ndarray) -> np.ndarray:
        """``(V, D)`` -> ``(V, D)``: each input dimension's additive share of the positive-vs-negative logit
        (coefficient x standardised value); positive = pushes towards emotion 1."""
        return self.standardise(x) * self.probe.model.coef_[0][None, :]


def fit_vector_head(x: np.ndarray, y: np.ndarray, groups: Sequence[str], cfg: ProbeConfig) -> VectorHead:
    """Fit :class:`VectorHead` on ``x`` (V, D) and 0/1 ``y`` (V,); C chosen by CV over ``groups`` (subjects)."""
    require_both_emotions(y, "emotion train split")
    rows = [{"label": int(label), "subject": str(g), "clip_id": str(i)} for i, (label, g) in enumerate(zip(y, groups))]
    return VectorHead(train_probe(FeatureSet(x, rows), 2, cfg))


# ------------------------------------------------------------------------------------ sequence head

@dataclass
class SequenceHeadConfig:
    """The BiLSTM emotion head and how it is trained (full batch, AdamW, class-balanced BCE)."""

    hidden: int = bounded(64, ge=2)  # input projection width = 2 x LSTM state width
    dropout: float = bounded(0.3, ge=0, lt=1)  # on the input features and the pooled state
    clip_dropout: float = bounded(0.2, ge=0, lt=1)  # each epoch, each training clip is dropped with this probability (order kept)
    epochs: int = bounded(150, ge=1)
    lr: float = bounded(3e-3, gt=0)
    weight_decay: float = bounded(1e-2, ge=0)


class SequenceHead(nn.Module):
    """Projection -> BiLSTM -> attention pooling over time -> one emotion logit.

    ``forward(x (B, T, D) float, lengths (B,) int)`` -> ``(logits (B,), attention (B, T))``; attention is
    a softmax over each video's valid clips (0 on padding).
    """

    def __init__(self, in_dim: int, cfg: SequenceHeadConfig) -> None:
        super().__init__()
        if cfg.hidden < 2 or cfg.hidden % 2:
            raise ValueError(f"sequence head hidden must be an even number >= 2, got {cfg.hidden}")
        self.project = nn.Sequential(nn.Dropout(cfg.dropout), nn.Linear(in_dim, cfg.hidden), nn.GELU())
        self.rnn = nn.LSTM(cfg.hidden, cfg.hidden // 2, batch_first=True, bidirectional=True)
        self.attend = nn.Linear(cfg.hidden, 1)
        self.classify = nn.Sequential(nn.Dropout(cfg.dropout), nn.Linear(cfg.hidden, 1))

    def forward(self, x: torch.Tensor, lengths: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        t = x.shape[1]
        packed = pack_padded_sequence(self.project(x), lengths.cpu(), batch_first=True, enforce_sorted=False)
        states, _ = pad_packed_sequence(self.rnn(packed)[0], batch_first=True, total_length=t)
        valid = torch.arange(t, device=x.device)[None, :] < lengths[:, None]
        attention = self.attend(states).squeeze(-1).masked_fill(~valid, float("-inf")).softmax(dim=1)
        pooled = (attention.unsqueeze(-1) * states).sum(dim=1)
        return self.classify(pooled).squeeze(-1), attention


def _pad(seqs: Sequence[np.ndarray]) -> tuple[torch.Tensor, torch.Tensor]:
    """list of (T_i, D) -> (padded (B, T_max, D) float32, lengths (B,) int64)."""
    lengths = torch.tensor([len(s) for s in seqs], dtype=torch.int64)
    out = torch.zeros(len(seqs), int(lengths.max()), seqs[0].shape[1])
    for i, s in enumerate(seqs):
        out[i, : len(s)] = torch.from_numpy(np.asarray(s, dtype=np.float32))
    return out, lengths


@dataclass
class FittedSequenceHead:
    """A trained :class:`SequenceHead` plus the train clips' per-dimension mean/scale it standardises with."""

    model: SequenceHead
    mean: np.ndarray
    scale: np.ndarray

    def _inputs(self, seqs: Sequence[np.ndarray]) -> list[np.ndarray]:
        return [((np.asarray(s, dtype=np.float64) - self.mean) / self.scale).astype(np.float32) for s in seqs]

    @torch.no_grad()
    def predict(self, seqs: Sequence[np.ndarray]) -> tuple[np.ndarray, list[np.ndarray]]:
        """list of (T_i, D) -> (p(positive) (V,), [attention (T_i,)])."""
        self.model.eval()
        x, lengths = _pad(self._inputs(seqs))
        logits, attention = self.model(x, lengths)
        return torch.sigmoid(logits).numpy().astype(np.float64), [a[:n].numpy() for a, n in zip(attention, lengths)]


def fit_sequence_head(seqs: Sequence[np.ndarray], y: np.ndarray, cfg: SequenceHeadConfig,
                      seed: int) -> FittedSequenceHead:
    """Train a :class:`SequenceHead` on ``seqs`` (list of (T_i, D) time-ordered clip vectors) and 0/1 ``y``.

    Deterministic for a given seed (CPU). The loss weights each emotion by inverse frequency.
    """
    require_both_emotions(np.asarray(y), "emotion train split")
    if any(len(s) == 0 for s in seqs):
        raise EmotionError("sequence head: a training video has no clips")
    stacked = np.concatenate([np.asarray(s, dtype=np.float64) for s in seqs])
    mean, scale = stacked.mean(axis=0), stacked.std(axis=0)
    scale[scale < 1e-6] = 1.0
    torch.manual_seed(seed)
    rng = np.random.default_rng(seed)
    model = SequenceHead(stacked.shape[1], cfg)
    fitted = FittedSequenceHead(model, mean, scale)
    inputs = fitted._inputs(seqs)
    target = torch.tensor(np.asarray(y), dtype=torch.float32)
    positives = float(target.sum())
    pos_weight = torch.tensor((len(target) - positives) / positives)
    loss_fn = nn.BCEWithLogitsLoss(pos_weight=pos_weight)
    optim = torch.optim.AdamW(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    model.train()
    for _ in range(cfg.epochs):
        batch = []
        for s in inputs:
            keep = rng.random(len(s)) >= cfg.clip_dropout
            if not keep.any():
                keep[rng.integers(len(s))] = True
            batch.append(s[keep])
        x, lengths = _pad(batch)
        logits, _ = model(x, lengths)
        loss = loss_fn(logits, target)
        optim.zero_grad()
        loss.backward()
        optim.step()
    return fitted


__all__ = [
    "EmotionError", "binary_metrics", "require_both_emotions", "majority_probability",
    "VectorHead", "fit_vector_head", "SequenceHeadConfig", "SequenceHead", "FittedSequenceHead",
    "fit_sequence_head",
]


# ------------------------------------------------------------------------------------------- sequences

@dataclass
class VideoSequence:
    """One video's clips in time order: ``index`` are row numbers of the FeatureSet it was built from."""

    video_id: str
    emotion: int
    split: str  # the emotion split
    subject: str
    index: np.ndarray  # (T,) int64 rows, ordered by (start_frame, end_frame, clip_id)
    start_frames: np.ndarray  # (T,) int64


def build_sequences(features: FeatureSet, emotion_splits: Mapping[str, str] | None = None,
                    source: str = "clips", allow_missing_videos: bool = False) -> list[VideoSequence]:
    """Group ``features``' rows by ``video_id`` into time-ordered :class:`VideoSequence` s.

    The emotion split of a video is ``emotion_splits[video_id]`` when ``emotion_splits`` is non-empty
    (videos it does not list are left out), else the split its clips share. Videos whose clips carry no
    emotion are left out (logged). One-line :class:`EmotionError` when no clip has an emotion (the
    column is missing), when a video's clips disagree on emotion or split, or when ``emotion_splits``
    lists videos without clips (unless ``allow_missing_videos``).
    """
    if len(features) == 0:
        raise EmotionError(f"{source}: no clips")
    if not any(r.get("emotion") is not None for r in features.rows):
        raise EmotionError(f"{source}: no clip carries an 'emotion' (missing emotion column?); emotion heads "
                           "need a video-level emotion (1 positive / 0 negative) on every clip")
    by_video: dict[str, list[int]] = {}
    for i, row in enumerate(features.rows):
        if row.get("video_id") in (None, ""):
            raise EmotionError(f"{source}: clip {row.get('clip_id', i)!r} has no 'video_id'; emotion heads group "
                               "clips by video")
        by_video.setdefault(str(row["video_id"]), []).append(i)
    splits = {str(k): str(v) for k, v in (emotion_splits or {}).items()}
    if splits:
        missing = sorted((v for v in splits if v not in by_video), key=natural_key)
        if missing and not allow_missing_videos:
            raise EmotionError(f"{source}: {len(missing)} video(s) of the emotion protocol have no clips "
                               f"(e.g. {', '.join(missing[:5])}); rebuild the shards from all videos or set "
                               "allow_missing_videos=true")
        if missing:
            log.warning("%s: %d emotion-protocol videos have no clips; left out", source, len(missing))
    sequences, unlabelled, unlisted = [], 0, 0
    for vid in sorted(by_video, key=natural_key):
        rows = [features.rows[i] for i in by_video[vid]]
        emotions = {int(r["emotion"]) for r in rows if r.get("emotion") is not None}
        if len(emotions) > 1:
            raise EmotionError(f"{source}: video {vid}: its clips disagree on emotion ({sorted(emotions)}); the "
                               "emotion is a video-level label")
        if not emotions:
            unlabelled += 1
            continue
        if splits:
            if vid not in splits:
                unlisted += 1
                continue
            split = splits[vid]
        else:
            clip_splits = {str(r.get("split")) for r in rows}
            if len(clip_splits) > 1:
                raise EmotionError(f"{source}: video {vid}: clips in splits {sorted(clip_splits)} and no "
                                   "emotion_splits in the manifest to say which one the video belongs to")
            split = clip_splits.pop()
        order = sorted(range(len(rows)), key=lambda k: (int(rows[k]["start_frame"]), int(rows[k]["end_frame"]),
                                                        str(rows[k].get("clip_id", ""))))
        index = np.asarray(by_video[vid], dtype=np.int64)[order]
        subjects = Counter(str(r.get("subject", vid)) for r in rows)
        sequences.append(VideoSequence(vid, emotions.pop(), split, subjects.most_common(1)[0][0], index,
                                       np.array([int(features.rows[i]["start_frame"]) for i in index], np.int64)))
    if unlabelled:
        log.warning("%s: %d video(s) without an emotion left out", source, unlabelled)
    if unlisted:
        log.info("%s: %d video(s) not in the emotion protocol left out", source, unlisted)
    return sequences


def concat_features(parts: Mapping[str, FeatureSet]) -> tuple[FeatureSet, np.ndarray]:
    """All clips of several shard splits in one FeatureSet, plus ``(N,)`` the shard split of each row."""
    sets = list(parts.values())
    if not sets:
        raise EmotionError("no shard splits to gather clips from")
    dims = {s.dim for s in sets}
    if len(dims) > 1:
        raise EmotionError(f"shard splits give features of different widths {sorted(dims)}")
    rows = [r for s in sets for r in s.rows]
    ids = [str(r["clip_id"]) for r in rows]
    if len(set(ids)) != len(ids):
        dup = next(c for c, n in Counter(ids).items() if n > 1)
        raise EmotionError(f"clip {dup} appears in more than one shard split")
    origin = np.array([name for name, s in parts.items() for _ in range(len(s))], dtype=object)
    return FeatureSet(np.concatenate([s.features for s in sets]), rows), origin


# ---------------------------------------------------------------------------- MG clip distributions

def _softmax(logits: np.ndarray) -> np.ndarray:
    return softmax(logits, axis=1).astype(np.float32)


def mg_probabilities(features: FeatureSet, in_pool: np.ndarray, num_classes: int, cfg: ProbeConfig,
                     folds: int = 5) -> tuple[np.ndarray, dict]:
    """Leak-free MG class probabilities ``(N, num_classes)`` of every clip (see the module docstring).

    Args:
        features: all clips.
        in_pool: (N,) bool, True for clips of the recognition-train split (the probe's only training data;
            only their labelled rows are used).
        folds: cross-fitting folds over the pool's groups (>= 2).
    Returns:
        (probabilities, info) with info = {"C", "group_by", "folds", "pool_clips", "cross_fitted_clips"}.
    """
    if folds < 2:
        raise EmotionError(f"probe_folds must be >= 2, got {folds}")
    rows = features.rows
    subjects_of_video: dict[str, set] = {}
    for r in rows:
        subjects_of_video.setdefault(str(r.get("video_id")), set()).add(str(r.get("subject", "")))
    by_subject = all(len(s) == 1 for s in subjects_of_video.values())
    groups = np.array([str(r.get("subject")) if by_subject else str(r.get("video_id")) for r in rows], dtype=object)
    labels = features.labels
    pool = np.flatnonzero(np.asarray(in_pool, dtype=bool) & (labels >= 0))
    if len(pool) == 0:
        raise EmotionError("MG probe: the recognition-train split has no labelled clips")
    full = train_probe(FeatureSet(features.features[pool], [rows[i] for i in pool]), num_classes, cfg)
    fixed = dataclasses.replace(cfg, C=full.C)
    probs = _softmax(full.logits(features.features))
    pool_groups = np.unique(groups[pool])
    n_folds = min(folds, len(pool_groups))
    crossed = np.zeros(len(rows), dtype=bool)
    if n_folds >= 2:
        for _, held in GroupKFold(n_folds).split(pool, groups=groups[pool]):
            held_groups = set(groups[pool][held])
            fit_idx = pool[~np.isin(groups[pool], list(held_groups))]
            probe = train_probe(FeatureSet(features.features[fit_idx], [rows[i] for i in fit_idx]), num_classes, fixed)
            target = np.flatnonzero(np.isin(groups, list(held_groups)))
            probs[target] = _softmax(probe.logits(features.features[target]))
            crossed[target] = True
    else:
        log.warning("MG probe: the pool has one %s only; its clips get in-sample probabilities",
                    "subject" if by_subject else "video")
    info = {"C": full.C, "group_by": "subject" if by_subject else "video", "folds": n_folds,
            "pool_clips": int(len(pool)), "cross_fitted_clips": int(crossed.sum())}
    return probs, info


def one_hot_labels(labels: np.ndarray, num_classes: int) -> np.ndarray:
    """(N,) class ids (-1 = unlabelled -> all zeros) -> (N, num_classes) float32."""
    out = np.zeros((len(labels), num_classes), dtype=np.float32)
    known = labels >= 0
    out[np.flatnonzero(known), labels[known]] = 1.0
    return out
