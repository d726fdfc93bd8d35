"""tools/utd_mhad.py: UTD-MHAD's skeleton .mat files become a labelled cross-subject pose set."""

import csv
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import scipy.io

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tools"))
import utd_mhad  # noqa: E402


def skeleton(frames: int, lift: float = 0.0) -> np.ndarray:
    """A standing figure in UTD's joint order, (20, 3, frames), the right hand raised by ``lift``."""
    y = {"head": 0.8, "shoulder_center": 0.6, "spine": 0.3, "hip_center": 0.0, "hip_left": -0.05,
         "hip_right": -0.05, "knee_left": -0.5, "knee_right": -0.5, "ankle_left": -0.9, "ankle_right": -0.9,
         "foot_left": -1.0, "foot_right": -1.0}
    joints = np.zeros((20, 3, frames))
    for j, name in enumerate(utd_mhad.UTD_JOINTS):
        side = -0.2 if name.endswith("left") else 0.2 if name.endswith("right") else 0.0
        height = y.get(name, 0.55 if name.startswith("shoulder") else 0.3 if name.startswith("elbow") else 0.1)
        joints[j, 0], joints[j, 1], joints[j, 2] = side, height, 2.5
    joints[utd_mhad.UTD_JOINTS.index("hand_right"), 1] += lift * np.linspace(0, 1, frames)
    return joints


def clone_with(tmp_path: Path) -> Path:
    repo = tmp_path / "utd"
    folder = repo / "data" / "Skeleton"
    folder.mkdir(parents=True)
    for action in (1, 3):
        for subject in (1, 2):
            scipy.io.savemat(folder / f"a{action}_s{subject}_t1_skeleton.mat",
                             {"d_skel": skeleton(40 + action, lift=0.5 * action)})
    (folder / "a2_s1_t1_skeleton.mat").write_bytes(b"not a mat file")
    git = ["git", "-C", str(repo), "-c", "user.name=t", "-c", "user.email=t@t"]
    subprocess.run([*git[:3], "init", "-q"], check=True)
    subprocess.run([*git, "add", "."], check=True)
    subprocess.run([*git, "commit", "-qm", "skeletons"], check=True)
    return repo


def test_joints_are_reordered_to_the_kinect_v1_layout():
    d_skel = np.arange(20 * 3 * 2, dtype=float).reshape(20, 3, 2)
    joints = utd_mhad.to_kinect_v1(d_skel)
    assert joints.shape == (2, 20, 3)
    # kinect-v1 starts hip_center, spine, shoulder_center, head: UTD's rows 4, 3, 2, 1
    assert [joints[0, j, 0] for j in range(4)] == [d_skel[i, 0, 0] for i in (3, 2, 1, 0)]


def test_a_cross_subject_labelled_pose_set_with_the_damaged_file_counted(tmp_path):
    repo = clone_with(tmp_path)
    assert utd_mhad.main(["--repo", str(repo), "--out", str(tmp_path / "utd"), "--train-subjects", "1",
                          "--shards", str(tmp_path / "shards"), "--workers", "1"]) == 0
    rows = list(csv.DictReader(open(tmp_path / "utd" / "index.csv")))
    assert {(r["label"], r["subject"], r["split"]) for r in rows} == {
        ("0", "1", "train"), ("2", "1", "train"), ("0", "2", "test"), ("2", "2", "test")}
    assert {r["label_name"] for r in rows} == {"right arm swipe to the left", "right hand wave"}
    source = json.loads((tmp_path / "utd" / "SOURCE.json").read_text())
    assert len(source["skipped"]) == 1 and "a2_s1_t1" in source["skipped"][0]
    manifest = json.loads((tmp_path / "shards" / "manifest.json").read_text())
    assert manifest["splits"]["train"]["samples"] == 2 and manifest["splits"]["test"]["samples"] == 2
    assert len(manifest["class_names"]) == 27


def test_train_subjects_must_leave_a_test_split(tmp_path, capsys):
    with pytest.raises(SystemExit):
        utd_mhad.main(["--repo", str(tmp_path), "--out", str(tmp_path / "o"), "--train-subjects", "1,2,3,4,5,6,7,8"])
    assert "expected some but not all of 1-8" in capsys.readouterr().err
