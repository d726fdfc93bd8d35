"""tools/motion_corpus.py: the pretraining corpus is taken from a git clone's commit, reproducibly."""

import csv
import json
import subprocess
import sys
from pathlib import Path

import pytest
from test_pose import swaying_bvh

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tools"))
import motion_corpus  # noqa: E402


def clone_with(tmp_path: Path, names: list[str]) -> Path:
    repo = tmp_path / "bandai"
    data = repo / "dataset" / "data"
    data.mkdir(parents=True)
    for i, name in enumerate(names):
        swaying_bvh(data / name, n=20 + i)
    (repo / "README.md").write_text("motion")
    git = ["git", "-C", str(repo), "-c", "user.name=t", "-c", "user.email=t@t"]
    subprocess.run([*git[:3], "init", "-q"], check=True)
    subprocess.run([*git, "add", "."], check=True)
    subprocess.run([*git, "commit", "-qm", "corpus"], check=True)
    return repo


def test_the_corpus_is_extracted_indexed_and_subset_the_same_way_twice(tmp_path):
    names = [f"dataset-{1 + i % 2}_walk_normal_{i:03d}.bvh" for i in range(6)]
    repo = clone_with(tmp_path, names)
    index = motion_corpus.write_corpus(repo, tmp_path / "all", None)
    rows = list(csv.DictReader(open(index)))
    assert [r["path"] for r in rows] == [f"bvh/{n}" for n in sorted(names)]
    assert {r["subject"] for r in rows} == {"bn1", "bn2"} and {r["split"] for r in rows} == {"train"}
    source = json.loads((tmp_path / "all" / "SOURCE.json").read_text())
    assert source["sequences"] == 6 and source["skipped_missing_objects"] == []
    assert source["frames"] == sum(20 + i for i in range(6))
    first = [r["path"] for r in csv.DictReader(open(motion_corpus.write_corpus(repo, tmp_path / "a", 3)))]
    again = [r["path"] for r in csv.DictReader(open(motion_corpus.write_corpus(repo, tmp_path / "b", 3)))]
    assert len(first) == 3 and first == again and set(first) <= {r["path"] for r in rows}


def test_a_missing_clone_is_one_line(tmp_path, capsys):
    with pytest.raises(SystemExit):
        motion_corpus.main(["--repo", str(tmp_path / "nope"), "--out", str(tmp_path / "out")])
    err = capsys.readouterr().err
    assert "no such clone" in err and "Traceback" not in err
    assert not (tmp_path / "out").exists()


def test_the_corpus_renders_into_unlabelled_pose_shards(tmp_path):
    repo = clone_with(tmp_path, ["dataset-2_run_normal_001.bvh", "dataset-2_walk_elderly_002.bvh"])
    assert motion_corpus.main(["--repo", str(repo), "--out", str(tmp_path / "corpus"),
                               "--shards", str(tmp_path / "shards"), "--workers", "1"]) == 0
    manifest = json.loads((tmp_path / "shards" / "manifest.json").read_text())
    assert manifest["splits"]["train"]["samples"] == 2 and manifest["splits"]["train"]["unlabeled"] == 2
    assert manifest["source"]["layout"] == "bvh"
