"""The synthetic benchmark: plan statistics, iMiGUE-format output, determinism, resume, rendering."""

from __future__ import annotations

import collections
import dataclasses
import json

import numpy as np
import pytest

from mgfm.sources.imigue import CLASS_NAMES, read_imigue
from mgfm.sources.synthetic import SyntheticConfig, generate, generate_with_stats, is_rendered, make_plan
from mgfm.sources.synthetic.body import Pose, sample_subject
from mgfm.sources.synthetic.gestures import GESTURES, apply_idle, idle_motion, make_motion
from mgfm.sources.synthetic.plan import NEGATIVE_LEANING, POSITIVE_LEANING, ClipPlan, VideoPlan, class_probabilities
from mgfm.sources.synthetic.render import FigureRenderer
from mgfm.sources.synthetic.generate import render_frames, render_video
from mgfm.sources.video_io import decode_frames, probe

TINY = SyntheticConfig(subjects=2, videos=4, clips_per_video=3, height=64, width=80, max_clip_frames=30,
                       idle_gap_frames=6, workers=1)


def _read(out):
    return read_imigue(out / "labels.csv", protocol=out / "protocol.json", video_dir=out / "videos")


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
    out = tmp_path_factory.mktemp("synthetic") / "tiny"
    generate(out, TINY)
    return out


def test_gestures_follow_class_names():
    assert [g.__name__.replace("_", " ") for g in GESTURES] == list(CLASS_NAMES)


def test_config_rejects_bad_values():
    with pytest.raises(ValueError, match="height"):
        SyntheticConfig(height=63)
    with pytest.raises(ValueError, match="subjects"):
        SyntheticConfig(subjects=1)


def test_default_plan_has_every_class_in_both_splits_and_subject_disjoint_splits():
    cfg = SyntheticConfig()
    plan = make_plan(cfg)
    for split in ("train", "test"):
        counts = plan.class_counts(split)
        assert min(counts) >= cfg.min_clips_per_split, (split, counts)
    assert 3000 <= sum(plan.class_counts()) <= 4500
    assert len(plan.train_subjects) == len(plan.test_subjects) == cfg.subjects // 2
    assert not set(plan.train_subjects) & set(plan.test_subjects)


def test_default_plan_is_shaped_like_the_real_imigue_file():
    """The long tail and the clip lengths follow the real annotation file (../shared), not bands around
    the generator's own output."""
    from pathlib import Path

    from scipy.stats import spearmanr

    from test_readers import IMIGUE_CSV

    if not IMIGUE_CSV.exists():
        pytest.skip(f"the real iMiGUE annotation file is not at {IMIGUE_CSV} (it lives in ../shared, present in CI)")
    real = read_imigue(IMIGUE_CSV, video_dir=Path("/nonexistent"))
    real_counts = np.bincount([c.label for c in real.clips], minlength=len(CLASS_NAMES))
    real_lengths = np.array([c.end_frame - c.start_frame + 1 for c in real.clips])
    cfg = SyntheticConfig()
    plan = make_plan(cfg)
    counts = np.array(plan.class_counts())
    lengths = np.array([c.length for v in plan.videos for c in v.clips])
    # the same most frequent class, the same order of class frequencies, a head as heavy
    assert counts.argmax() == real_counts.argmax()
    assert spearmanr(counts, real_counts).statistic > 0.75
    top5, real_top5 = (np.sort(c)[-5:].sum() / c.sum() for c in (counts, real_counts))
    assert abs(top5 - real_top5) < 0.06, (top5, real_top5)
    # clip-length percentiles within 15% of the real ones (the 90th against the real one capped like ours)
    real_p = np.percentile(np.minimum(real_lengths, cfg.max_clip_frames), [10, 50, 90])
    ours = np.percentile(lengths, [10, 50, 90])
    assert np.all(np.abs(ours - real_p) <= 0.15 * real_p), (ours, real_p)


def test_emotion_changes_which_gestures_occur():
    plan = make_plan(SyntheticConfig())
    neg = np.array(plan.class_counts(emotion=0), float)
    pos = np.array(plan.class_counts(emotion=1), float)
    neg_idx = [CLASS_NAMES.index(n) for n in NEGATIVE_LEANING]
    pos_idx = [CLASS_NAMES.index(n) for n in POSITIVE_LEANING]
    assert neg[neg_idx].sum() / neg.sum() > 1.2 * pos[neg_idx].sum() / pos.sum()
    assert pos[pos_idx].sum() / pos.sum() > 1.2 * neg[pos_idx].sum() / neg.sum()
    cfg = SyntheticConfig()
    assert not np.allclose(class_probabilities(cfg, 0), class_probabilities(cfg, 1))
    flat = dataclasses.replace(cfg, emotion_tilt=1.0)
    assert np.allclose(class_probabilities(flat, 0), class_probabilities(flat, 1))


def test_subject_look_is_independent_of_emotion():
    plan = make_plan(SyntheticConfig())
    per_subject = collections.defaultdict(collections.Counter)
    for v in plan.videos:
        per_subject[v.subject_id][v.emotion] += 1
    # Every subject appears in both emotions equally often, so who you are says nothing about emotion...
    assert all(c[0] == c[1] >= 1 for c in per_subject.values()), per_subject
    # ...and a look is a function of (seed, subject) alone.
    assert plan.looks[3] == sample_subject(0, 3) != sample_subject(1, 3)
    # Rendering never sees the emotion: same subject and video seed -> same pixels for either emotion.
    look = plan.looks[1]
    clips = (ClipPlan(CLASS_NAMES.index("touch chin"), 5, 20, 11),)
    a = [f.copy() for f in render_frames(VideoPlan(1, 1, 0, 99, 30, clips), look, TINY)]
    b = [f.copy() for f in render_frames(VideoPlan(2, 1, 1, 99, 30, clips), look, TINY)]
    assert np.array_equal(np.stack(a), np.stack(b))


def test_emotion_split_follows_subjects_and_balances_emotions_within_each():
    plan = make_plan(SyntheticConfig())
    emotion = {v.video_id: v.emotion for v in plan.videos}
    subject = {v.video_id: v.subject_id for v in plan.videos}
    assert not set(plan.emotion_train_videos) & set(plan.emotion_test_videos)
    assert set(plan.emotion_train_videos) | set(plan.emotion_test_videos) == set(emotion)
    assert {subject[v] for v in plan.emotion_train_videos} == set(plan.train_subjects)
    assert {subject[v] for v in plan.emotion_test_videos} == set(plan.test_subjects)
    for side in (plan.emotion_train_videos, plan.emotion_test_videos):
        assert sum(emotion[v] for v in side) * 2 == len(side)  # 50/50 on each side
    for s in set(subject.values()):  # every subject has as many positive as negative videos
        mine = [emotion[v] for v in emotion if subject[v] == s]
        assert sum(mine) * 2 == len(mine)


def test_every_gesture_moves_the_figure():
    look = sample_subject(0, 5)
    renderer = FigureRenderer(look, 64, 80, video_seed=1)
    idle = idle_motion(look, 40, 25, seed=2)
    pose = Pose(look)
    apply_idle(pose, idle, 20)
    rest = renderer.render(pose).astype(int)
    for k, gesture in enumerate(GESTURES):
        motion = make_motion(look, 40, 25, seed=k)
        changed = 0
        for t in (12, 20, 28):  # the hold phase: a sum over a few frames catches oscillating gestures
            apply_idle(pose, idle, 20)
            gesture(pose, motion, t)
            changed = max(changed, int((np.abs(renderer.render(pose).astype(int) - rest).sum(-1) > 30).sum()))
        assert changed >= 4, f"{CLASS_NAMES[k]} changes only {changed} pixels"


def test_tiny_dataset_reads_back_with_the_plan_counts(tiny_dir):
    plan = make_plan(TINY)
    index = _read(tiny_dir)
    assert len(index) == sum(len(v.clips) for v in plan.videos)
    assert index.class_names == list(CLASS_NAMES)
    assert sorted(int(s) for s in index.subjects("train")) == list(plan.train_subjects)
    assert sorted(int(s) for s in index.subjects("test")) == list(plan.test_subjects)
    want = [(str(v.video_id), c.start, c.end, c.label, v.emotion) for v in plan.videos for c in v.clips]
    got = [(c.video_id, c.start_frame, c.end_frame, c.label, c.emotion) for c in index]
    assert got == want
    assert index.emotion_splits == {**{str(v): "train" for v in plan.emotion_train_videos},
                                    **{str(v): "test" for v in plan.emotion_test_videos}}
    proto = json.loads((tiny_dir / "protocol.json").read_text())
    assert proto["classes"] == list(CLASS_NAMES) and proto["fps"] == TINY.fps
    header = (tiny_dir / "labels.csv").read_text().splitlines()[0]
    assert header == ("video_id,label_id,start_time,start_frame,end_time,end_frame,class,subject_id,"
                      "subject_gender,subject_nationality,win_or_lose")


def test_tiny_videos_have_the_planned_frames(tiny_dir):
    plan = make_plan(TINY)
    for v in plan.videos:
        info = probe(tiny_dir / "videos" / f"{v.video_id}.mp4")
        assert (info["n_frames"], info["height"], info["width"], info["fps"]) == (v.n_frames, 64, 80, 25.0)
        assert v.clips[-1].end < v.n_frames


def test_same_seed_gives_identical_csv_and_frames(tiny_dir, tmp_path):
    again = tmp_path / "again"
    generate(again, TINY)
    assert (again / "labels.csv").read_bytes() == (tiny_dir / "labels.csv").read_bytes()
    assert (again / "protocol.json").read_bytes() == (tiny_dir / "protocol.json").read_bytes()
    for v in make_plan(TINY).videos:
        a = decode_frames(tiny_dir / "videos" / f"{v.video_id}.mp4")
        b = decode_frames(again / "videos" / f"{v.video_id}.mp4")
        assert np.array_equal(a, b)
    other = make_plan(dataclasses.replace(TINY, seed=1))
    assert [c.label for v in other.videos for c in v.clips] != [c.label for v in make_plan(TINY).videos
                                                                for c in v.clips]


def test_resume_skips_finished_videos_and_refuses_another_config(tiny_dir, tmp_path):
    import shutil

    out = tmp_path / "resume"
    shutil.copytree(tiny_dir, out)
    assert is_rendered(out, TINY)
    videos = sorted((out / "videos").glob("*.mp4"))
    kept, removed = videos[0], videos[1]
    stamp = kept.stat().st_mtime_ns
    removed.unlink()
    (out / "labels.csv").unlink()  # as if interrupted before the annotations were written
    assert not is_rendered(out, TINY)
    stats = generate_with_stats(out, TINY, progress=False)
    assert stats.videos_rendered == 1 and stats.videos_skipped == len(videos) - 1
    assert kept.stat().st_mtime_ns == stamp and removed.exists()
    assert (out / "labels.csv").read_bytes() == (tiny_dir / "labels.csv").read_bytes()
    assert np.array_equal(decode_frames(removed), decode_frames(tiny_dir / "videos" / removed.name))
    assert generate_with_stats(out, TINY, progress=False).videos_rendered == 0
    with pytest.raises(ValueError, match="different config.*height"):
        generate(out, dataclasses.replace(TINY, height=32, width=40))


def test_render_video_reports_frames(tmp_path):
    plan = make_plan(TINY)
    v = plan.videos[0]
    n, render_s, encode_s = render_video(v, plan.looks[v.subject_id], TINY, tmp_path / "v.mp4")
    assert n == v.n_frames and render_s > 0 and encode_s > 0
    assert probe(tmp_path / "v.mp4")["n_frames"] == n


@pytest.mark.slow
def test_parallel_workers_give_the_same_bytes(tiny_dir, tmp_path):
    out = tmp_path / "parallel"
    stats = generate_with_stats(out, dataclasses.replace(TINY, workers=2), progress=False)
    assert stats.videos_rendered == TINY.videos
    for v in make_plan(TINY).videos:
        name = f"{v.video_id}.mp4"
        assert (out / "videos" / name).read_bytes() == (tiny_dir / "videos" / name).read_bytes()
