"""Pose files as a clip source: BVH forward kinematics, Kinect joint text, OpenPose keypoint folders, the
stick-figure drawing, and shards built from them (``--format pose``) with bad files skipped and counted."""

from __future__ import annotations

import csv
import json
import math
from pathlib import Path

import numpy as np
import pytest

from mgfm.shards import BuildConfig, build_shards, load_manifest
from mgfm.shards.__main__ import main as shards_main
from mgfm.shards.read import read_samples
from mgfm.sources.clip_index import AnnotationError
from mgfm.sources.pose import FigureStyle, PoseFileError, get_layout, read_pose, read_pose_index, render_clip
from mgfm.sources.pose.layouts import KINECT_V1
from mgfm.sources.formats import read_source_index
from mgfm.sources.video_io import decode_frames

# A BVH file as motion-capture software writes it (CMU's conversions use this hierarchy layout): a root
# with 6 channels, a chain of 3-channel joints ending in an end site.
BVH_HEADER = """HIERARCHY
ROOT Hips
{
\tOFFSET 0.00 0.00 0.00
\tCHANNELS 6 Xposition Yposition Zposition Zrotation Yrotation Xrotation
\tJOINT Spine
\t{
\t\tOFFSET 0.00 10.00 0.00
\t\tCHANNELS 3 Zrotation Yrotation Xrotation
\t\tJOINT Head
\t\t{
\t\t\tOFFSET 0.00 5.00 0.00
\t\t\tCHANNELS 3 Zrotation Yrotation Xrotation
\t\t\tEnd Site
\t\t\t{
\t\t\t\tOFFSET 0.00 2.00 0.00
\t\t\t}
\t\t}
\t}
\tJOINT LeftUpLeg
\t{
\t\tOFFSET 3.00 -1.00 0.00
\t\tCHANNELS 3 Zrotation Yrotation Xrotation
\t\tEnd Site
\t\t{
\t\t\tOFFSET 0.00 -8.00 0.00
\t\t}
\t}
}
MOTION
"""


def write_bvh(path: Path, frames: list[list[float]], frame_time: float = 1 / 120) -> Path:
    body = "\n".join(" ".join(f"{v:.4f}" for v in f) for f in frames)
    path.write_text(BVH_HEADER + f"Frames: {len(frames)}\nFrame Time: {frame_time:.6f}\n{body}\n")
    return path


def swaying_bvh(path: Path, n: int = 240) -> Path:
    """A figure walking along x while its spine sways and its leg swings (2 s at 120 fps)."""
    frames = []
    for i in range(n):
        t = i / 120
        frames.append([20 * t, 0, 0, 0, 0, 0, 15 * math.sin(4 * t), 0, 0, 0, 0, 0, 30 * math.sin(6 * t), 0, 0])
    return write_bvh(path, frames)


def kinect_lines(n: int, with_confidence: bool = False, repeat_frame: int | None = None) -> list[str]:
    """Kinect v1 joint text, UTKinect style: frame number, then x y z (and a confidence) for 20 joints."""
    rng = np.random.default_rng(0)
    base = rng.normal(size=(20, 3))
    lines = []
    for i in range(n):
        joints = base + 0.05 * math.sin(i / 3)
        joints[7] = 0.0 if i == 2 else joints[7]  # an untracked hand: written as zeros
        values = [[*j, 1.0] if with_confidence else list(j) for j in joints]
        lines.append(" ".join(str(v) for v in [i + 100, *np.ravel(values)]))
        if repeat_frame == i:  # a second skeleton in the same frame
            lines.append(" ".join(str(v) for v in [i + 100, *(9.0 for _ in np.ravel(values))]))
    return lines


def openpose_folder(folder: Path, n: int, keypoints: int = 25) -> Path:
    folder.mkdir(parents=True)
    for i in range(n):
        strong = [v for k in range(keypoints) for v in (100 + k + i, 50 + 3 * k, 0.9)]
        strong[3 * 4 + 2] = 0.0  # a keypoint OpenPose did not find
        weak = [v for k in range(keypoints) for v in (10.0, 10.0, 0.1)]
        (folder / f"clip_{i:012d}_keypoints.json").write_text(json.dumps(
            {"version": 1.3, "people": [{"person_id": [-1], "pose_keypoints_2d": weak},
                                        {"person_id": [-1], "pose_keypoints_2d": strong}]}))
    return folder


def test_bvh_forward_kinematics_follows_the_channel_order(tmp_path):
    # root rotated 90 degrees about z: the spine (offset +y 10) points along -x
    path = write_bvh(tmp_path / "a.bvh", [[1, 2, 3, 90, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0],
                                          [1, 2, 3, 0, 0, 0, 90, 0, 0, 0, 0, 0, 0, 0, 0]], frame_time=0.01)
    seq = read_pose(path, get_layout("bvh"))
    assert seq.joints.shape == (2, 6, 3) and seq.fps == pytest.approx(100)
    hips, spine, head, head_end = seq.joints[0, :4]
    np.testing.assert_allclose(hips, [1, 2, 3], atol=1e-5)
    np.testing.assert_allclose(spine, [1 - 10, 2, 3], atol=1e-4)
    np.testing.assert_allclose(head_end, [1 - 17, 2, 3], atol=1e-4)
    # frame 1: only the spine turns, so the spine stays and everything above it swings to -x
    np.testing.assert_allclose(seq.joints[1, 1], [1, 12, 3], atol=1e-4)
    np.testing.assert_allclose(seq.joints[1, 2], [1 - 5, 12, 3], atol=1e-4)
    assert seq.head == 2 and (0, 1) in seq.bones and (2, 3) in seq.bones and len(seq.bones) == 5


def test_a_truncated_bvh_keeps_its_whole_frames_and_garbage_is_one_line(tmp_path):
    path = swaying_bvh(tmp_path / "walk.bvh", n=10)
    text = path.read_text()
    path.write_text(text[: text.rindex("\n", 0, len(text) - 30)])  # the last frame cut in the middle
    assert read_pose(path, get_layout("bvh")).n_frames == 9
    (tmp_path / "junk.bvh").write_text("HIERARCHY\nROOT Hips\n{\n OFFSET 0 0\n")
    with pytest.raises(PoseFileError, match="junk.bvh: truncated or malformed HIERARCHY"):
        read_pose(tmp_path / "junk.bvh", get_layout("bvh"))


def test_kinect_joint_text_drops_second_skeletons_and_marks_untracked_joints(tmp_path):
    path = tmp_path / "joints_s01_e01.txt"
    path.write_text("\n".join(kinect_lines(6, repeat_frame=3)) + "\n")
    seq = read_pose(path, KINECT_V1)
    assert seq.joints.shape == (6, 20, 3) and seq.fps is None
    assert np.isnan(seq.joints[2, 7]).all() and np.isfinite(seq.joints[3]).all()
    assert not (seq.joints == 9.0).any()  # the repeated frame's second skeleton is not read
    conf = tmp_path / "with_confidence.csv"  # comma-separated, x y z confidence per joint
    conf.write_text("\n".join(line.replace(" ", ",") for line in kinect_lines(4, with_confidence=True)))
    np.testing.assert_allclose(read_pose(conf, KINECT_V1).joints[0], seq.joints[0])
    bad = tmp_path / "bad.txt"
    bad.write_text("1 2 3 4 5\n")
    with pytest.raises(PoseFileError, match="5 values per line do not fit layout kinect-v1"):
        read_pose(bad, KINECT_V1)


def test_openpose_folder_keeps_the_most_confident_person(tmp_path):
    folder = openpose_folder(tmp_path / "clip", 3)
    seq = read_pose(folder, get_layout("openpose-body25"))
    assert seq.joints.shape == (3, 25, 3)
    np.testing.assert_allclose(seq.joints[1, 0, :2], [101, 50])
    assert np.isnan(seq.joints[:, 4]).all()  # confidence 0: missing
    with pytest.raises(PoseFileError, match="25 keypoints per person, layout openpose-coco18 has 18"):
        read_pose(folder, get_layout("openpose-coco18"))


def test_a_figure_is_drawn_inside_the_frame_at_the_output_rate(tmp_path):
    seq = read_pose(swaying_bvh(tmp_path / "walk.bvh"), get_layout("bvh"))
    frames = render_clip(seq, 0, -1, 120.0, FigureStyle(size=64, fps=15), seed=3)
    assert frames.shape == (30, 64, 64, 3) and frames.dtype == np.uint8  # 2 s at 15 fps
    background = frames[0, 0, 0]
    drawn = (frames != background).any(axis=-1)
    assert drawn.mean() > 0.02 and not drawn[:, :2].any() and not drawn[:, -2:].any()
    # the figure walks, but the clip's own extent fills the frame: the drawing moves left to right
    cols = [np.nonzero(d.any(axis=0))[0].mean() for d in drawn]
    assert cols[-1] > cols[0] + 10
    other = render_clip(seq, 0, -1, 120.0, FigureStyle(size=64, fps=15), seed=4)
    assert not np.array_equal(other[0, 0, 0], background) or not np.array_equal(other, frames)


def write_index(path: Path, rows: list[dict]) -> Path:
    with open(path, "w", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    return path


def test_shards_from_two_joint_formats_with_a_corrupt_file_skipped_and_counted(tmp_path, capsys):
    (tmp_path / "k").mkdir()
    for s in (1, 2):
        (tmp_path / "k" / f"s{s}.txt").write_text("\n".join(kinect_lines(60)) + "\n")
    (tmp_path / "k" / "broken.txt").write_text("\n".join(kinect_lines(5)) + "\n1 2 3\n")
    kinect = write_index(tmp_path / "kinect.csv", [
        dict(path="k/s1.txt", label="wave", subject=1, split="train", start_frame=0, end_frame=29, fps=30),
        dict(path="k/s1.txt", label="clap", subject=1, split="train", start_frame=30, end_frame=59, fps=30),
        dict(path="k/s2.txt", label="wave", subject=2, split="test", start_frame=0, end_frame="", fps=30),
        dict(path="k/broken.txt", label="clap", subject=2, split="test", start_frame=0, end_frame="", fps=30)])
    assert shards_main(["build", "--format", "pose", "--index", str(kinect), "--layout", "kinect-v1",
                        "--out", str(tmp_path / "shards_k"), "--short-side", "64"]) == 0
    manifest = load_manifest(tmp_path / "shards_k")
    assert manifest["splits"]["train"]["samples"] == 2 and manifest["splits"]["test"]["samples"] == 1
    assert [s["path"].endswith("broken.txt") for s in manifest["skipped"]] == [True]
    assert "line 6: 3 values, the first frame has 61" in manifest["skipped"][0]["reason"]
    samples = list(read_samples(str(next((tmp_path / "shards_k").glob("test-*.tar")))))
    meta = json.loads(samples[0]["json"])
    assert (meta["n_frames"], meta["fps"], meta["height"], meta["end_frame"]) == (30, 15.0, 64, 59)
    assert decode_frames(samples[0]["mp4"]).shape == (30, 64, 64, 3)

    bvh_dir = tmp_path / "mocap"
    bvh_dir.mkdir()
    swaying_bvh(bvh_dir / "01_01.bvh")
    (bvh_dir / "02_01.bvh").write_text("not a bvh")
    corpus = write_index(tmp_path / "corpus.csv", [  # no label column: an unlabelled corpus
        dict(path="mocap/01_01.bvh", subject="01", split="train", start_frame=0, end_frame=119),
        dict(path="mocap/01_01.bvh", subject="01", split="train", start_frame=120, end_frame=239),
        dict(path="mocap/02_01.bvh", subject="02", split="train", start_frame=0, end_frame="")])
    index = read_source_index("pose", corpus, layout="bvh")
    assert all(c.label == -1 for c in index) and index.class_names == []
    manifest = build_shards(index, tmp_path / "shards_bvh", BuildConfig(short_side=64, pose_layout="bvh"))
    assert manifest["splits"]["train"]["samples"] == 2 and len(manifest["skipped"]) == 1
    assert "not a BVH file" in manifest["skipped"][0]["reason"]
    meta = json.loads(next(read_samples(str(next((tmp_path / "shards_bvh").glob("train-*.tar")))))["json"])
    assert meta["n_frames"] == 15 and meta["label"] == -1  # 1 s of 120 fps mocap drawn at 15 fps


def test_pose_index_errors_are_one_line(tmp_path, capsys):
    (tmp_path / "a.txt").write_text("\n".join(kinect_lines(3)))
    no_fps = write_index(tmp_path / "no_fps.csv", [dict(path="a.txt", subject=1, split="train")])
    with pytest.raises(AnnotationError, match="fps.*does not say its frame rate"):
        read_pose_index(no_fps, "kinect-v1")
    assert shards_main(["build", "--format", "pose", "--index", str(no_fps), "--layout", "kinect-v2x",
                        "--out", str(tmp_path / "s")]) == 1
    assert "unknown pose layout 'kinect-v2x'; known: kinect-v1, kinect-v2" in capsys.readouterr().err
    assert shards_main(["build", "--format", "pose", "--index", str(no_fps), "--out", str(tmp_path / "s")]) == 1
    assert "--format pose needs --layout" in capsys.readouterr().err
    assert not (tmp_path / "s").exists()
    bvh_rows = write_index(tmp_path / "bvh.csv", [dict(path="a.txt", subject=1, split="train", fps=30)])
    with pytest.raises(AnnotationError, match="layout bvh reads only .bvh files"):
        read_pose_index(bvh_rows, "bvh")
