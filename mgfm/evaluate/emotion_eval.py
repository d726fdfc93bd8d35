"""Video-level emotion recognition from the time-ordered sequence of a video's micro-gesture clips: the
runner (``make emotion`` / ``eval/emotion.py``); the sequences, MG distributions and heads are
:mod:`mgfm.evaluate.emotion_heads`.

In iMiGUE the emotion (win -> positive, lose -> negative) belongs to a whole video and has its own video
split (102 train / 100 test), different from the recognition (clip) split. So the frozen features of the
clips of *every* shard split are gathered, regrouped by ``video_id``, ordered by start frame, and each
video is put in the emotion split the shard manifest's ``emotion_splits`` gives it (when the manifest has
none, e.g. SMG emotion segments or a generic CSV, a video's own clip split is used; SMG's reader already
makes each relaxed/stressed segment a "video"). Heads, each mapping a video to p(positive):

* majority class of the emotion-train videos, and the subject prior (each test video scored by its subject's
  emotion-train positive rate, present when test subjects also have train videos) -- references;
* (a) mean-pooled clip features + logistic regression;
* (b) BiLSTM with attention pooling over the clip features;
* (c) the same BiLSTM over the clips' predicted MG distributions (the "MG sequence" route), and, order-free,
  the mean predicted MG distribution + logistic regression (its per-class contributions explain it);
* oracle rows: the same two over the TRUE MG labels (one-hot) -- an upper bound, not a result.

MG distributions without leaks: the MG probe (:func:`mgfm.evaluate.probe.train_probe`) learns only from the
recognition-train split's labelled clips (the "pool"). Pool clips are cross-fitted: the pool's groups
(subjects; videos when a video spans several subjects) go to ``probe_folds`` folds and each clip gets the
probabilities of the probe fitted on the other folds; every other clip gets the probe fitted on the whole
pool. So no clip's MG distribution comes from a probe that saw its own subject/video, whichever emotion split
its video is in (on iMiGUE, emotion-test videos can sit in the recognition-train split), and emotion-train
inputs look like emotion-test inputs (held-out predictions, not memorised ones). C is chosen once by the
probe's subject-grouped CV on the whole pool and reused for the folds.

Scores (accuracy, balanced accuracy, macro-F1, AUROC) are over the emotion-test videos, averaged over
``seeds`` (the BiLSTMs; the logistic regressions are deterministic) with the standard deviation, because
test sets are ~100 videos. Writes ``report.json`` / ``report.md`` and prints the table.
"""

from __future__ import annotations

import dataclasses
import logging
from collections import Counter
from dataclasses import dataclass, field
from typing import Callable, Sequence

import numpy as np

from mgfm.config import bounded
from mgfm.evaluate.emotion_heads import (EMOTION_NAMES, EmotionError, SequenceHeadConfig, VideoSequence,
                                         binary_metrics, build_sequences, concat_features, fit_sequence_head,
                                         fit_vector_head, majority_probability, mg_probabilities, one_hot_labels,
                                         require_both_emotions)
from mgfm.evaluate.encoder_eval import EncoderEvalRecipe, finish, prepare
from mgfm.evaluate.probe import ProbeConfig
from mgfm.report import format_table, markdown_table
from mgfm.shards.manifest import load_manifest

log = logging.getLogger(__name__)
METRICS = ("accuracy", "balanced_accuracy", "macro_f1", "auroc")


# ------------------------------------------------------------------------------------------- recipe

@dataclass
class EmotionRecipe(EncoderEvalRecipe):
    """What ``make emotion`` / ``eval/emotion.py`` evaluate, and how (``out`` default:
    <run>/emotion/<shards name>/; features shared with the linear probe's cache <run>/features/)."""

    references: bool = False  # also run the feature heads on random-init / raw-pixel features
    splits: list[str] = field(default_factory=lambda: ["train", "test"])  # shard splits whose clips are gathered
    probe_split: str = "train"  # the recognition-train shard split the MG probe learns from
    train_emotion: str = "train"  # emotion split names (manifest emotion_splits, else the clip split)
    test_emotion: str = "test"
    seeds: list[int] = bounded(default_factory=lambda: [0, 1, 2, 3, 4], ge=0)
    probe: ProbeConfig = field(default_factory=ProbeConfig)  # the MG probe (route c)
    probe_folds: int = bounded(5, ge=2)
    head: SequenceHeadConfig = field(default_factory=SequenceHeadConfig)  # the BiLSTM heads
    logistic: ProbeConfig = field(default_factory=lambda: ProbeConfig(c_grid=[1e-3, 1e-2, 1e-1, 1.0, 10.0]))
    oracle: bool = True  # add the true-MG-label rows (upper bound)
    explain_videos: int = bounded(2, ge=0)  # test videos whose most relied-on micro-gestures go into the report
    allow_missing_videos: bool = False


# --------------------------------------------------------------------------------------- evaluation

@dataclass
class _Data:
    sequences: list[VideoSequence]
    train: list[VideoSequence]
    test: list[VideoSequence]

    @property
    def y_train(self) -> np.ndarray:
        return np.array([s.emotion for s in self.train], dtype=np.int64)

    @property
    def y_test(self) -> np.ndarray:
        return np.array([s.emotion for s in self.test], dtype=np.int64)


def split_sequences(sequences: list[VideoSequence], train: str, test: str) -> _Data:
    """Train/test videos; one-line :class:`EmotionError` for an empty side or a one-emotion train side."""
    tr = [s for s in sequences if s.split == train]
    te = [s for s in sequences if s.split == test]
    if not tr or not te:
        found = dict(Counter(s.split for s in sequences))
        raise EmotionError(f"emotion splits: need videos in {train!r} and {test!r}, found {found or 'none'}")
    data = _Data(sequences, tr, te)
    require_both_emotions(data.y_train, f"emotion train split {train!r}")
    return data


def _summarise(per_seed: list[dict]) -> dict:
    out = {}
    for m in METRICS:
        values = [r[m] for r in per_seed if r[m] is not None]
        out[m] = {"mean": float(np.mean(values)) if values else None,
                  "std": float(np.std(values)) if values else None}
    return out


def _vector_row(data: _Data, vectors: np.ndarray, cfg: ProbeConfig) -> tuple[dict, object]:
    """Logistic regression on one vector per video (V_all, D) in ``data.sequences`` order."""
    pos = {id(s): k for k, s in enumerate(data.sequences)}
    xtr = vectors[[pos[id(s)] for s in data.train]]
    xte = vectors[[pos[id(s)] for s in data.test]]
    head = fit_vector_head(xtr, data.y_train, [s.subject for s in data.train], cfg)
    p = head.p_positive(xte)
    metrics = binary_metrics(data.y_test, p)
    return {"seeds": 1, "per_seed": [metrics], "C": head.probe.C, **_summarise([metrics])}, (head, xte, p)


def _sequence_row(data: _Data, clip_vectors: np.ndarray, recipe: EmotionRecipe) -> tuple[dict, object]:
    train_seqs = [clip_vectors[s.index] for s in data.train]
    test_seqs = [clip_vectors[s.index] for s in data.test]
    per_seed, first = [], None
    for seed in recipe.seeds:
        fitted = fit_sequence_head(train_seqs, data.y_train, recipe.head, seed)
        p, attention = fitted.predict(test_seqs)
        per_seed.append({"seed": seed, **binary_metrics(data.y_test, p)})
        if first is None:
            first = (p, attention)
    return {"seeds": len(per_seed), "per_seed": per_seed, **_summarise(per_seed)}, first


def _pool(data: _Data, clip_vectors: np.ndarray) -> np.ndarray:
    return np.stack([clip_vectors[s.index].mean(axis=0) for s in data.sequences])


@dataclass(frozen=True)
class Head:
    """One emotion head of the report: a stable ``key`` (what code looks rows up by), the ``name`` shown,
    what it reads (``source``: clip ``features``, predicted ``mg`` distributions or the ``true`` MG labels)
    and how (``kind``: logistic regression on the video's mean ``vector``, or a BiLSTM over the ``sequence``)."""

    key: str
    name: str
    inputs: str
    source: str
    kind: str


HEADS = (
    Head("features_mean", "(a) pooled features + logistic regression", "clip features", "features", "vector"),
    Head("features_sequence", "(b) BiLSTM over clip features", "clip features", "features", "sequence"),
    Head("mg_sequence", "(c) BiLSTM over predicted MG distributions", "predicted MG sequence", "mg", "sequence"),
    Head("mg_histogram", "(c) mean predicted MG distribution + logistic regression", "predicted MG histogram", "mg",
         "vector"),
    Head("true_sequence", "oracle: BiLSTM over true MG labels", "true MG sequence (oracle)", "true", "sequence"),
    Head("true_histogram", "oracle: true MG histogram + logistic regression", "true MG histogram (oracle)", "true",
         "vector"),
)
HEAD_BY_KEY = {h.key: h for h in HEADS}


def run_heads(data: _Data, inputs: dict[str, np.ndarray], recipe: EmotionRecipe) -> dict[str, tuple[dict, object]]:
    """Every head whose input (``features`` / ``mg`` / ``true`` clip vectors) is given: ``{key: (row,
    artefact for explanations)}``."""
    out: dict[str, tuple[dict, object]] = {}
    for head in HEADS:
        vectors = inputs.get(head.source)
        if vectors is None:
            continue
        log.info("emotion head: %s", head.name)
        fit: Callable[[], tuple[dict, object]] = (
            (lambda: _vector_row(data, _pool(data, vectors), recipe.logistic)) if head.kind == "vector"
            else (lambda: _sequence_row(data, vectors, recipe)))
        row, artefact = fit()
        out[head.key] = ({"key": head.key, "input": head.inputs, **row}, artefact)
    return out


def majority_row(data: _Data) -> dict:
    p = np.full(len(data.test), majority_probability(data.y_train))
    metrics = binary_metrics(data.y_test, p)
    return {"input": "train emotion counts", "seeds": 1, "per_seed": [metrics], **_summarise([metrics])}


def subject_prior_row(data: _Data) -> dict | None:
    """Reference: score a test video by the positive rate of its subject's emotion-train videos (the train
    rate overall for unseen subjects). Far from 0.5 only when emotion and subject identity are entangled
    across the split -- then appearance-driven heads inherit that bias. None when no test subject is seen
    in training (a subject-disjoint emotion split)."""
    rates: dict[str, list[int]] = {}
    for s in data.train:
        rates.setdefault(s.subject, []).append(s.emotion)
    if not any(s.subject in rates for s in data.test):
        return None
    overall = float(data.y_train.mean())
    p = np.array([np.mean(rates[s.subject]) if s.subject in rates else overall for s in data.test])
    metrics = binary_metrics(data.y_test, p)
    seen = sum(s.subject in rates for s in data.test)
    return {"input": f"subject identity ({seen}/{len(data.test)} test videos' subjects seen)", "seeds": 1,
            "per_seed": [metrics], **_summarise([metrics])}


def explain(data: _Data, mg_probs: np.ndarray, class_names: Sequence[str], seq_artefact, vec_artefact,
            n_videos: int, top: int = 3) -> list[dict]:
    """For up to ``n_videos`` test videos (the most confidently right positive and negative first): the
    micro-gestures the BiLSTM-over-MG head (first seed) leaned on -- the classes whose share of the video's
    predicted MG distribution rises most when clips are weighted by attention instead of equally -- its
    most attended clips, and the per-class contributions of the MG-histogram logistic regression."""
    p_seq, attention = seq_artefact
    head, x_test, p_vec = vec_artefact
    contributions = head.contributions(x_test)
    y = data.y_test
    confidence = np.where(y == 1, p_seq, 1 - p_seq)
    picks: list[int] = []
    for emotion in (1, 0):
        ranked = [int(i) for i in np.argsort(-confidence) if y[i] == emotion and int(i) not in picks]
        picks += ranked[:1]
    picks += [int(i) for i in np.argsort(-confidence) if int(i) not in picks]
    out = []
    for i in picks[:n_videos]:
        seq = data.test[i]
        clip_probs = mg_probs[seq.index]
        pred_class = clip_probs.argmax(axis=1)
        attended = attention[i] @ clip_probs  # (C,) MG distribution as the head weighted the clips
        base = clip_probs.mean(axis=0)  # (C,) the same with every clip weighted equally
        order = np.argsort(-(attended - base))[:top]
        clips = np.argsort(-attention[i])[:top]
        contrib = contributions[i]
        toward = np.argsort(-contrib if p_vec[i] >= 0.5 else contrib)[:top]
        out.append({
            "video_id": seq.video_id, "emotion": EMOTION_NAMES[seq.emotion], "clips": int(len(seq.index)),
            "p_positive": float(p_seq[i]),
            "attention_by_mg": [{"mg": class_names[k], "attended": float(attended[k]), "base": float(base[k])}
                                for k in order if attended[k] > base[k]],
            "top_clips": [{"start_frame": int(seq.start_frames[k]), "mg": class_names[int(pred_class[k])],
                           "attention": float(attention[i][k])} for k in clips],
            "histogram_p_positive": float(p_vec[i]),
            "histogram_contributions": [{"mg": class_names[k], "logit": float(contrib[k])} for k in toward],
        })
    return out


def histogram_weights(head, class_names: Sequence[str], top: int = 5) -> dict:
    """The micro-gestures an MG-histogram logistic regression weighs most: ``{"positive": [...],
    "negative": [...]}``, each ``top`` (class name, coefficient on the standardised share) pairs."""
    coef = head.probe.model.coef_[0]
    order = np.argsort(-coef)
    return {"positive": [(class_names[k], float(coef[k])) for k in order[:top] if coef[k] > 0],
            "negative": [(class_names[k], float(coef[k])) for k in order[::-1][:top] if coef[k] < 0]}


def run(recipe: EmotionRecipe) -> dict:
    """Run the emotion evaluation; returns the report dict (also written to ``out``). The report has
    ``summary`` = {"headers", "rows"} (rows of formatted "mean ± std" cells) for a demo summary; ``results``
    rows are keyed by their display name and carry the head's stable ``key``."""
    if recipe.probe_split not in recipe.splits:
        raise EmotionError(f"probe_split {recipe.probe_split!r} is not one of splits {recipe.splits}")
    if not recipe.seeds:
        raise EmotionError("seeds: give at least one seed")
    setup = prepare(recipe, "emotion")
    manifest = load_manifest(recipe.shards)
    class_names = [str(c) for c in manifest["class_names"]]

    results: dict[str, dict] = {}
    data = None
    probe_info, explanations, weights = {}, [], {}
    for name, encoder, encoder_id in setup.encoders:
        log.info("emotion: features for %s", name)
        # every clip of every split makes the video sequences: each split is scored
        parts = {split: setup.features(encoder, encoder_id, split, scored=True) for split in recipe.splits}
        feats, origin = concat_features(parts)
        sequences = build_sequences(feats, manifest.get("emotion_splits") or {}, f"{recipe.shards}",
                                    recipe.allow_missing_videos)
        data = split_sequences(sequences, recipe.train_emotion, recipe.test_emotion)
        if not results:
            results["majority class"] = majority_row(data)
            prior = subject_prior_row(data)
            if prior is not None:
                results["subject prior (reference)"] = prior
        mg_probs, info = mg_probabilities(feats, origin == recipe.probe_split, len(class_names), recipe.probe,
                                          recipe.probe_folds)
        probe_info[name] = info
        inputs = {"features": feats.features, "mg": mg_probs}
        if recipe.oracle and name == "pretrained":
            inputs["true"] = one_hot_labels(feats.labels, len(class_names))
        heads = run_heads(data, inputs, recipe)
        prefix = "" if name == "pretrained" else f"[{name}] "
        for key, (row, artefact) in heads.items():
            results[prefix + HEAD_BY_KEY[key].name] = row
            if HEAD_BY_KEY[key].kind == "vector" and HEAD_BY_KEY[key].source in ("mg", "true"):
                weights[prefix + HEAD_BY_KEY[key].name] = histogram_weights(artefact[0], class_names)
        if name == "pretrained" and recipe.explain_videos > 0:
            explanations = explain(data, mg_probs, class_names, heads["mg_sequence"][1], heads["mg_histogram"][1],
                                   recipe.explain_videos)
    assert data is not None
    headers, table = summary_table(results)
    gains = gain_lines(results)
    report = {
        "run": str(setup.run_dir), "encoder": str(setup.encoder_folder), "shards": recipe.shards,
        "views": recipe.views,
        "videos": {"train": len(data.train), "test": len(data.test),
                   "train_positive": int(data.y_train.sum()), "test_positive": int(data.y_test.sum()),
                   "clips_per_video": float(np.mean([len(s.index) for s in data.sequences]))},
        "seeds": list(recipe.seeds), "mg_probe": probe_info, "head": dataclasses.asdict(recipe.head),
        "results": results, "explanations": explanations, "histogram_weights": weights, "gains": gains,
        "summary": {"headers": headers, "rows": table},
    }
    return finish(setup.out, report, report_markdown(report, class_names), "Video-level emotion recognition",
                  parts, [format_table(headers, table), *gains])


# ------------------------------------------------------------------------------------------ reporting

def _cell(entry: dict, metric: str) -> str:
    value = entry[metric]
    if value["mean"] is None:
        return "-"
    return f"{value['mean']:.3f} ± {value['std']:.3f}" if entry["seeds"] > 1 else f"{value['mean']:.3f}"


def summary_table(results: dict[str, dict]) -> tuple[list[str], list[list]]:
    """(headers, rows): one row per head, "mean ± std" over seeds (one value for deterministic heads)."""
    headers = ["head", "input", "seeds", "accuracy", "balanced acc", "macro-F1", "AUROC"]
    rows = [[name, e["input"], e["seeds"], *(_cell(e, m) for m in METRICS)] for name, e in results.items()]
    return headers, rows


def gain_lines(results: dict[str, dict]) -> list[str]:
    """How far each MG-sequence head lands above the majority class (balanced accuracy), over seeds."""
    base = results["majority class"]["balanced_accuracy"]["mean"]
    lines = []
    for name, entry in results.items():
        head = HEAD_BY_KEY.get(entry.get("key", ""))
        if head is None or head.source == "features":
            continue
        values = np.array([r["balanced_accuracy"] for r in entry["per_seed"]]) - base
        lines.append(f"{name}: balanced accuracy {100 * values.mean():+.1f} ± {100 * values.std():.1f} points over "
                     f"the majority class ({base:.3f}); worst seed {100 * values.min():+.1f}, best "
                     f"{100 * values.max():+.1f} ({len(values)} seed(s))")
    return lines


def report_markdown(report: dict, class_names: Sequence[str]) -> str:
    v = report["videos"]
    lines = [
        f"Run `{report['run']}`, shards `{report['shards']}`: {v['train']} emotion-train videos "
        f"({v['train_positive']} positive), {v['test']} emotion-test videos ({v['test_positive']} positive), "
        f"{v['clips_per_video']:.1f} clips per video on average. Scores are over the test videos; BiLSTM rows are "
        f"mean ± std over seeds {report['seeds']}, logistic-regression rows are deterministic. Oracle rows use "
        "the TRUE micro-gesture labels: an upper bound, not a result. The subject-prior row (when present) scores a "
        "test video by its subject's emotion-train positive rate: far below 0.5 it means emotion and subject "
        "identity are anti-correlated across the split, and heads that pick up appearance land below chance "
        "too.", "",
        "## Emotion heads", "", markdown_table(*report["summary"].values()), "",
        "## Gain of the MG-sequence heads over the majority class", "",
        *[f"- {line}" for line in report["gains"]], "",
        "## MG probe behind the predicted MG distributions", "",
        "Trained on the recognition-train clips only; those clips get cross-fitted (out-of-fold) probabilities, "
        "so no clip's distribution comes from a probe that saw its own group.", "",
        *[f"- {name}: C={i['C']}, {i['folds']} folds by {i['group_by']}, {i['pool_clips']} pool clips, "
          f"{i['cross_fitted_clips']} clips cross-fitted" for name, i in report["mg_probe"].items()], "",
    ]
    if report["histogram_weights"]:
        lines += ["## Micro-gestures the MG-histogram heads weigh most", "",
                  "Logistic-regression coefficients on the standardised per-video MG shares (positive = towards "
                  "positive emotion).", ""]
        for row, w in report["histogram_weights"].items():
            pos = ", ".join(f"{k} {v:+.2f}" for k, v in w["positive"])
            neg = ", ".join(f"{k} {v:+.2f}" for k, v in w["negative"])
            lines.append(f"- {row}: towards positive: {pos or 'none'}; towards negative: {neg or 'none'}")
        lines.append("")
    if report["explanations"]:
        lines += ["## What the MG-sequence heads leaned on (test videos)", ""]
        for e in report["explanations"]:
            att = ", ".join(f"{a['mg']} {a['attended']:.3f} (vs {a['base']:.3f})" for a in e["attention_by_mg"])
            clips = ", ".join(f"frame {c['start_frame']} {c['mg']} ({c['attention']:.2f})" for c in e["top_clips"])
            contrib = ", ".join(f"{c['mg']} {c['logit']:+.2f}" for c in e["histogram_contributions"])
            lines += [f"- video {e['video_id']} (true {e['emotion']}, {e['clips']} clips, BiLSTM p(positive) "
                      f"{e['p_positive']:.2f}): MGs its attention raised most (attention-weighted share of the "
                      f"predicted MG distribution vs the plain mean): {att or 'none'}; most attended clips: {clips}; "
                      f"MG-histogram logistic regression (p(positive) {e['histogram_p_positive']:.2f}), largest "
                      f"contributions towards its prediction: {contrib}"]
        lines.append("")
    return "\n".join(lines)
