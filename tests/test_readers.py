"""Clip-index readers: the real iMiGUE file, SMG layout, a stranger's generic CSV, and bad rows."""

from __future__ import annotations

import csv
import os
from pathlib import Path

import pytest

from mgfm.sources.clip_index import AnnotationError, ClipIndex
from mgfm.sources.generic_csv import read_csv_index
from mgfm.sources.imigue import CLASS_NAMES, official_protocol, read_imigue
from mgfm.sources.formats import read_index
from mgfm.sources.smg import read_smg

SHARED = Path(os.environ.get("MGFM_SHARED", Path(__file__).resolve().parents[2] / "shared"))
IMIGUE_CSV = SHARED / "data" / "imigue" / "labels_20200831.csv"
IMIGUE_PROTOCOL = SHARED / "data" / "imigue" / "protocol.json"
needs_imigue = pytest.mark.skipif(
    not IMIGUE_CSV.exists(),
    reason=f"the real iMiGUE annotation file is not at {IMIGUE_CSV} (it lives in ../shared, present in CI)",
)

HEADER = "video_id,label_id,start_time,start_frame,end_time,end_frame,class,subject_id,subject_gender,subject_nationality,win_or_lose"


@needs_imigue
@pytest.mark.parametrize("protocol", [None, IMIGUE_PROTOCOL], ids=["embedded", "protocol.json"])
def test_imigue_real_file_counts(protocol):
    index = read_imigue(IMIGUE_CSV, protocol=protocol)
    assert len(index) == 18498
    assert len({c.video_id for c in index}) == 359
    assert len(index.subjects()) == 72
    assert len(index.split("train")) == 13935
    assert len(index.split("test")) == 4563
    assert len(index.subjects("train")) == 37 and len(index.subjects("test")) == 35
    assert index.class_names == CLASS_NAMES and index.num_classes == 32
    hist = index.class_histogram()
    assert hist[31] == 5715  # class 99 -> 31, "illustrative"
    assert hist[30] == 2880  # class 31 -> 30
    assert hist[18] == 2  # class 19 -> 18, the rarest
    assert all(c.fps == 25 for c in index)
    assert list(index.emotion_splits.values()).count("train") == 102
    assert list(index.emotion_splits.values()).count("test") == 100
    emotions = index.video_emotions()
    assert set(emotions.values()) == {0, 1}
    first = index.clips[0]
    assert (first.video_id, first.start_frame, first.end_frame, first.label, first.subject, first.emotion) == (
        "371", 171, 246, 19, "1", 1)
    assert first.split == "test" and first.label_name == "move torso"
    assert len({c.clip_id for c in index}) == len(index)


@needs_imigue
def test_embedded_protocol_equals_shared_protocol():
    import json

    shared = json.loads(IMIGUE_PROTOCOL.read_text())
    ours = official_protocol()
    assert sorted(ours["recognition"]["train_subjects"]) == sorted(shared["recognition"]["train_subjects"])
    assert sorted(ours["recognition"]["test_subjects"]) == sorted(shared["recognition"]["test_subjects"])
    assert ours["emotion"] == {k: shared["emotion"][k] for k in ("train_videos", "test_videos")}
    assert ours["classes"] == shared["classes"]


def _write_imigue(tmp_path: Path, rows: list[str]) -> Path:
    path = tmp_path / "labels.csv"
    path.write_text("\n".join([HEADER, *rows]) + "\n")
    return path


GOOD_ROW = "371,1,6.8553,171,9.8553,246,20,1,F,United States,Win"


@pytest.mark.parametrize(
    "bad_row, field_name",
    [
        ("371,2,1.0,100,2.0,120,42,1,F,US,Win", "class"),
        ("371,2,1.0,100,2.0,90,20,1,F,US,Win", "end_frame"),
        ("371,2,1.0,1x0,2.0,120,20,1,F,US,Win", "start_frame"),
        ("371,2,1.0,100,2.0,120,20,99,F,US,Win", "subject_id"),
        ("371,2,1.0,100,2.0,120,20,1,F,US,Draw", "win_or_lose"),
    ],
)
def test_imigue_bad_rows_name_file_line_field(tmp_path, bad_row, field_name):
    path = _write_imigue(tmp_path, [GOOD_ROW, bad_row])
    with pytest.raises(AnnotationError) as err:
        read_imigue(path)
    message = str(err.value)
    assert str(path) in message and ":3" in message and field_name in message
    assert "\n" not in message


def test_imigue_missing_column(tmp_path):
    path = tmp_path / "labels.csv"
    path.write_text("video_id,start_frame,class,subject_id,win_or_lose\n1,2,3,1,Win\n")
    with pytest.raises(AnnotationError, match="end_frame"):
        read_imigue(path)


def test_imigue_video_paths_and_protocol_dict(tmp_path):
    path = _write_imigue(tmp_path, [GOOD_ROW])
    protocol = {"fps": 30, "recognition": {"train_subjects": [1], "test_subjects": []},
                "emotion": {"train_videos": [371], "test_videos": []}, "classes": CLASS_NAMES}
    index = read_imigue(path, protocol=protocol, video_dir=tmp_path / "v", video_pattern="{video_id}_x.mp4")
    clip = index.clips[0]
    assert clip.path == str(tmp_path / "v" / "371_x.mp4") and clip.split == "train" and clip.fps == 30
    assert index.emotion_splits == {"371": "train"}


def test_generic_csv_written_by_someone_else(tmp_path):
    """Only the four required columns, written with the csv module, class names as labels."""
    path = tmp_path / "my_clips.csv"
    with path.open("w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["path", "label", "subject", "split"])
        writer.writerow(["clips/a.mp4", "wave", "alice", "train"])
        writer.writerow(["clips/b.mp4", "nod", "bob", "test"])
        writer.writerow(["/abs/c.mp4", "wave", "bob", "TEST"])
        writer.writerow(["clips/d.mp4", "", "carol", "unlabeled"])
    index = read_index("csv", path)
    assert index.class_names == ["nod", "wave"]
    assert [c.label for c in index] == [1, 0, 1, -1]
    assert index.clips[0].path == str(tmp_path / "clips" / "a.mp4")
    assert index.clips[2].path == "/abs/c.mp4"
    assert [c.split for c in index] == ["train", "test", "test", "unlabeled"]
    assert all(c.start_frame == 0 and c.end_frame == -1 for c in index)
    assert index.clips[0].video_id == "a" and index.clips[0].fps == 25.0


def test_generic_csv_optional_columns(tmp_path):
    path = tmp_path / "clips.csv"
    path.write_text(
        "path,label,subject,split,start_frame,end_frame,video_id,emotion,label_name\n"
        "v.mp4,0,s1,train,10,40,vid1,positive,shrug\n"
        "v.mp4,1,s1,train,50,60,vid1,positive,nod\n"
        "w.mp4,0,s2,test,0,20,vid2,0,shrug\n"
    )
    index = read_csv_index(path)
    assert index.class_names == ["shrug", "nod"]
    assert [(c.start_frame, c.end_frame, c.video_id, c.emotion) for c in index] == [
        (10, 40, "vid1", 1), (50, 60, "vid1", 1), (0, 20, "vid2", 0)]
    assert index.videos()["vid1"][0].start_frame == 10


@pytest.mark.parametrize(
    "row, field_name",
    [
        ("a.mp4,-3,s,train", "label"),
        ("a.mp4,wave,s,train", "label"),
        ("a.mp4,0,s,holdout", "split"),
        (",0,s,train", "path"),
        ("a.mp4,0,s,train,30,10", "end_frame"),
        ("a.mp4,0,s,train,x,10", "start_frame"),
    ],
)
def test_generic_csv_bad_rows(tmp_path, row, field_name):
    path = tmp_path / "clips.csv"
    path.write_text("path,label,subject,split,start_frame,end_frame\na.mp4,0,s,train,0,5\nb.mp4,1,s,test,0,5\n" + row + "\n")
    with pytest.raises(AnnotationError) as err:
        read_csv_index(path)
    assert f"{path}:4" in str(err.value) and field_name in str(err.value)


def test_generic_csv_missing_required_column(tmp_path):
    path = tmp_path / "clips.csv"
    path.write_text("path,label,split\na.mp4,0,train\n")
    with pytest.raises(AnnotationError, match="subject"):
        read_csv_index(path)


def test_smg_layout(tmp_path):
    for subject in (1, 36):
        sample = tmp_path / f"Sample{subject:04d}"
        sample.mkdir()
        (sample / f"Sample{subject:04d}_color.mp4").write_bytes(b"")
        (sample / f"Sample{subject:04d}_finelabels.csv").write_text("3,10,40\n17,50,80\n")
    (tmp_path / "Sample0001" / "Sample0001_tflabels_new.csv").write_text("1,0,45,11\n2,46,100,2\n")
    index = read_smg(tmp_path)
    assert len(index) == 4 and index.num_classes == 17
    assert [c.split for c in index] == ["train", "train", "test", "test"]
    assert [c.label for c in index] == [2, 16, 2, 16]
    assert [c.emotion for c in index] == [0, 1, None, None]
    assert index.clips[0].video_id == "Sample0001_seg1"
    assert index.clips[0].path.endswith("Sample0001_color.mp4")


def test_smg_bad_label(tmp_path):
    sample = tmp_path / "Sample0002"
    sample.mkdir()
    (sample / "Sample0002_finelabels.csv").write_text("3,10,40\n18,50,80\n")
    with pytest.raises(AnnotationError, match=r"Sample0002_finelabels.csv:2 field 'label'"):
        read_smg(tmp_path)


def test_clip_index_json_round_trip(tmp_path):
    path = tmp_path / "clips.csv"
    path.write_text("path,label,subject,split,emotion\na.mp4,0,s1,train,1\nb.mp4,1,s2,test,0\n")
    index = read_csv_index(path)
    index.save_json(tmp_path / "index.json")
    again = ClipIndex.load_json(tmp_path / "index.json")
    assert again.clips == index.clips and again.class_names == index.class_names


REAL_MOTION = {"utkinect": (199, 10), "florence3d": (215, 9)}  # clips, classes (each set's SOURCE.md)


@pytest.mark.parametrize("name", sorted(REAL_MOTION))
def test_real_motion_csv_reads_unchanged_with_cross_subject_splits(name):
    """The generic CSV reader takes the real-motion sets as they are; UTKinect's long recordings are cut by
    start/end frames, and each clip's first and last frames decode."""
    from mgfm.sources.video_io import decode_frames, probe

    index_csv = SHARED / "data" / name / "index.csv"
    if not index_csv.exists():
        pytest.skip(f"{index_csv} is not there (the real-motion sets live in ../shared, present in CI)")
    index = read_index("csv", index_csv)
    clips, classes = REAL_MOTION[name]
    assert len(index.clips) == clips and len(index.class_names) == classes
    assert {c.label for c in index.clips} == set(range(classes)) and all(index.class_names)
    subjects = {split: {c.subject for c in index.clips if c.split == split} for split in ("train", "test")}
    assert subjects["train"] and subjects["test"] and not subjects["train"] & subjects["test"]
    for split in ("train", "test"):
        assert {c.label for c in index.clips if c.split == split} == set(range(classes)), split
    videos = {c.path for c in index.clips}
    if name == "utkinect":  # 20 long recordings, each cut into its action segments
        assert len(videos) == 20 and all(c.end_frame >= c.start_frame for c in index.clips)
    else:  # one whole video per clip (end_frame -1: to the end)
        assert len(videos) == clips and {c.end_frame for c in index.clips} == {-1}
    for clip in (index.clips[0], index.clips[-1]):
        frames = probe(clip.path)["n_frames"]
        end = clip.end_frame if clip.end_frame >= 0 else frames - 1
        assert 0 <= clip.start_frame <= end < frames, (clip.clip_id, frames)
        first, last = decode_frames(clip.path, [clip.start_frame, end])
        assert first.std() > 0 and last.std() > 0  # a drawn figure, not a blank frame
