"""A larger labelled downstream set: UTD-MHAD's Kinect skeletons (27 actions, mostly arm gestures, 8 subjects
x 4 trials = 861 sequences, 30 fps; docs/motion_corpus.md "Downstream sets"), from a git clone that carries
its ``Skeleton/*.mat`` files, drawn as stick figures into labelled pose shards.

    git clone https://github.com/woo-chia-wei/kinect-sequence-classification /data/utd.git
    python tools/utd_mhad.py --repo /data/utd.git --out /data/utd_mhad --shards shards/utdmhad

Each ``aA_sS_tT_skeleton.mat`` (``d_skel``: 20 joints x 3 x frames, UTD's joint order) is written as a
``(frames, 20, 3)`` ``.npy`` in the Kinect SDK v1 joint order (``--layout kinect-v1``) with an index row
``path,label,subject,split,fps,video_id,label_name``. Split, cross-subject: ``--train-subjects`` (default
1,3,5) train, the other subjects test (538 of 861 clips), so the test split has over 500 clips; the usual
odd / even protocol (``--train-subjects 1,3,5,7``) leaves 430. A file the clone lacks or that cannot be read
is a counted skip.
"""

from __future__ import annotations

import argparse
import io
import json
import logging
import re
import sys
from pathlib import Path

import numpy as np
import scipy.io
from clone_data import build_pose_shards, files_at_head, git, write_index

from mgfm.cli import one_line_errors
from mgfm.errors import InputError
from mgfm.files import write_atomic
from mgfm.runtime import setup_logging
from mgfm.sources.pose.layouts import get_layout

log = logging.getLogger("mgfm.tools.utd_mhad")
URL = "https://github.com/woo-chia-wei/kinect-sequence-classification"
HOME = "https://personal.utdallas.edu/~kehtar/UTD-MHAD.html"
ACTIONS = ("right arm swipe to the left", "right arm swipe to the right", "right hand wave",
           "two hand front clap", "right arm throw", "cross arms in the chest", "basketball shoot",
           "right hand draw x", "right hand draw circle (clockwise)", "right hand draw circle (counter clockwise)",
           "draw triangle", "bowling (right hand)", "front boxing", "baseball swing from right",
           "tennis right hand forehand swing", "arm curl (two arms)", "tennis serve", "two hand push",
           "right hand knock on door", "right hand catch an object", "right hand pick up and throw", "jogging in place",
           "walking in place", "sit to stand", "stand to sit", "forward lunge (left foot forward)",
           "squat (two arms stretch out)")
# UTD-MHAD's own joint order (Skeleton_joint_order.txt), named as the kinect-v1 layout names them
UTD_JOINTS = ("head", "shoulder_center", "spine", "hip_center", "shoulder_left", "elbow_left", "wrist_left",
              "hand_left", "shoulder_right", "elbow_right", "wrist_right", "hand_right", "hip_left", "knee_left",
              "ankle_left", "foot_left", "hip_right", "knee_right", "ankle_right", "foot_right")
NAME = re.compile(r"a(\d+)_s(\d+)_t(\d+)_skeleton\.mat$")
FPS = 30.0


def to_kinect_v1(d_skel: np.ndarray) -> np.ndarray:
    """UTD's ``(20, 3, T)`` skeleton -> ``(T, 20, 3)`` in the kinect-v1 layout's joint order."""
    if d_skel.ndim != 3 or d_skel.shape[:2] != (20, 3):
        raise ValueError(f"d_skel has shape {d_skel.shape}, expected (20, 3, frames)")
    order = [UTD_JOINTS.index(j) for j in get_layout("kinect-v1").joints]
    return np.ascontiguousarray(d_skel.transpose(2, 0, 1)[:, order, :], dtype=np.float32)


def convert(repo: Path, out: Path, train_subjects: set[int]) -> Path:
    """Write every readable skeleton as ``.npy`` and the index; returns the index path."""
    commit, files = files_at_head(repo, NAME, URL)
    (out / "npy").mkdir(parents=True, exist_ok=True)
    rows, skipped = [], []
    for path, blob in files:
        action, subject, trial = (int(g) for g in NAME.search(path).groups())
        try:
            joints = to_kinect_v1(scipy.io.loadmat(io.BytesIO(git(repo, "cat-file", "blob", blob)))["d_skel"])
        except (InputError, ValueError, KeyError, OSError, scipy.io.matlab.MatReadError) as err:
            # a missing object or a damaged .mat
            skipped.append(f"{path}: {err}")
            log.warning("skipped %s: %s", path, err)
            continue
        name = f"a{action:02d}_s{subject}_t{trial}"
        target = out / "npy" / f"{name}.npy"
        buffer = io.BytesIO()
        np.save(buffer, joints)
        write_atomic(target, buffer.getvalue())
        rows.append({"path": f"npy/{name}.npy", "label": action - 1, "subject": subject,
                     "split": "train" if subject in train_subjects else "test", "fps": FPS, "video_id": name,
                     "label_name": ACTIONS[action - 1], "frames": len(joints)})
    index = write_index(out / "index.csv", rows, ["path", "label", "subject", "split", "fps", "video_id",
                                                  "label_name"])
    counts = {split: sum(r["split"] == split for r in rows) for split in ("train", "test")}
    write_atomic(out / "SOURCE.json", json.dumps({
        "dataset": "UTD-MHAD (C. Chen, R. Jafari, N. Kehtarnavaz, ICIP 2015), skeleton modality", "home": HOME,
        "copy": URL, "commit": commit, "layout": "kinect-v1", "fps": FPS, "sequences": len(rows),
        "skipped": skipped, "train_subjects": sorted(train_subjects), "clips": counts,
        "frames": sum(r["frames"] for r in rows), "classes": list(ACTIONS)}, indent=1).encode())
    log.info("%d sequences (train %d, test %d) in %s; %d skipped", len(rows), counts["train"], counts["test"],
             out, len(skipped))
    return index


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--repo", type=Path, required=True, help="a git clone (bare or not) of " + URL)
    ap.add_argument("--out", type=Path, required=True, help="where the .npy files, index.csv and SOURCE.json go")
    ap.add_argument("--train-subjects", default="1,3,5", help="subjects (1-8) of the train split; the rest test")
    ap.add_argument("--shards", type=Path, default=None, help="also build pose shards here")
    ap.add_argument("--workers", type=int, default=2, help="shard-building processes")
    args = ap.parse_args(argv)
    setup_logging()
    with one_line_errors("utd_mhad"):
        subjects = {int(s) for s in args.train_subjects.split(",") if s.strip().isdigit()}
        if not subjects or not subjects < set(range(1, 9)):
            raise InputError(f"--train-subjects {args.train_subjects!r}: expected some but not all of 1-8")
        index = convert(args.repo, args.out, subjects)
        if args.shards is not None:
            build_pose_shards(index, args.shards, "kinect-v1", args.workers, list(ACTIONS))
    return 0


if __name__ == "__main__":
    sys.exit(main())
