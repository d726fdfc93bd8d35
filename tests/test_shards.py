"""Shard building, resuming, parts, verification, and reading shards without mgfm."""

from __future__ import annotations

import io
import json
import shutil
import tarfile
from pathlib import Path

import pytest
from conftest import TINY_CLIPS, read_tar, read_time_code

from mgfm.sources.clip_index import Clip, ClipIndex
from mgfm.sources.video_io import decode_frames
from mgfm.shards import BuildConfig, build_shards, plan_shards, verify_shards
from mgfm.shards import build as build_mod
from mgfm.shards.__main__ import main as shards_cli
from mgfm.shards.manifest import fragment_path, load_manifest

TINY_CONFIG = BuildConfig(short_side=32, shard_samples=3, crf=12)


def all_samples(shard_dir: Path) -> dict[str, dict[str, bytes]]:
    samples: dict[str, dict[str, bytes]] = {}
    for path in sorted(shard_dir.glob("*.tar")):
        for key, members in read_tar(path).items():
            assert key not in samples, f"{key} in two shards"
            samples[key] = members
    return samples


def shard_contents(shard_dir: Path) -> dict[str, dict[str, object]]:
    """shard name -> key -> (json dict, time codes of the decoded frames). Not the bytes: libx264 is
    not strictly bit-reproducible between runs."""
    out = {}
    for path in sorted(shard_dir.glob("*.tar")):
        out[path.name] = {key: (json.loads(m["json"]), read_time_code(decode_frames(m["mp4"])).tolist())
                          for key, m in read_tar(path).items()}
    return out


def test_round_trip_every_clip_with_metadata(tiny_index, tiny_shards):
    manifest = load_manifest(tiny_shards)
    assert manifest["complete"] and manifest["totals"]["samples"] == len(tiny_index) == 12
    assert manifest["class_names"] == tiny_index.class_names
    assert manifest["emotion_splits"] == tiny_index.emotion_splits
    for split in ("train", "test"):
        info = manifest["splits"][split]
        assert info["samples"] == len(tiny_index.split(split))
        assert info["class_histogram"] == tiny_index.class_histogram(split)
        assert info["subjects"] == tiny_index.subjects(split)
        assert [s["name"] for s in info["shards"]] == [f"{split}-000000.tar", f"{split}-000001.tar"]
        assert all(s["samples"] == 3 and len(s["sha256"]) == 64 for s in info["shards"])

    samples = all_samples(tiny_shards)
    assert sorted(samples) == sorted(c.clip_id for c in tiny_index)
    for clip in tiny_index:
        members = samples[clip.clip_id]
        assert sorted(members) == ["json", "mp4"] and "." not in clip.clip_id
        meta = json.loads(members["json"])
        assert {k: meta[k] for k in clip.to_row()} == clip.to_row()
        assert (meta["n_frames"], meta["height"], meta["width"], meta["fps"]) == (clip.n_frames, 32, 42, 25.0)
        frames = decode_frames(members["mp4"], backend="pyav")
        assert frames.shape == (clip.n_frames, 32, 42, 3)
        # the cut is frame-exact: every frame carries its source frame number
        assert read_time_code(frames).tolist() == list(range(clip.start_frame, clip.end_frame + 1))


def test_plain_webdataset_and_pyav_read_the_shards(tiny_shards):
    """No mgfm code: webdataset groups the samples, PyAV decodes the mp4 bytes."""
    import av
    import webdataset as wds

    urls = [str(p) for p in sorted(tiny_shards.glob("*.tar"))]
    seen = []
    for sample in wds.WebDataset(urls, shardshuffle=False):
        meta = json.loads(sample["json"])
        assert meta["clip_id"] == sample["__key__"]
        with av.open(io.BytesIO(sample["mp4"])) as container:
            frames = [f.to_ndarray(format="rgb24") for f in container.decode(video=0)]
        assert len(frames) == meta["n_frames"] and frames[0].shape == (meta["height"], meta["width"], 3)
        seen.append(sample["__key__"])
    assert len(seen) == len(set(seen)) == len(TINY_CLIPS)


def test_interrupted_build_resumes_and_matches_a_clean_build(tiny_index, tiny_shards, tmp_path, monkeypatch):
    out = tmp_path / "shards"
    real_cut = build_mod._cut_clips
    calls = {"n": 0}

    def interrupted(clips, config):
        for item in real_cut(clips, config):
            calls["n"] += 1
            if calls["n"] == 5:  # in the middle of the second shard
                raise KeyboardInterrupt
            yield item

    monkeypatch.setattr(build_mod, "_cut_clips", interrupted)
    with pytest.raises(KeyboardInterrupt):
        build_shards(tiny_index, out, TINY_CONFIG)
    monkeypatch.setattr(build_mod, "_cut_clips", real_cut)

    first = sorted(out.glob("*.tar"))
    assert len(first) == 1 and fragment_path(out, first[0].name).exists()
    assert not list(out.glob("*.tmp")), "the interrupted shard's temp file is removed, never left half-written"
    assert not (out / "manifest.json").exists()
    stamp = first[0].stat().st_mtime_ns, first[0].stat().st_ino

    manifest = build_shards(tiny_index, out, TINY_CONFIG)
    assert manifest["complete"] and manifest["totals"]["samples"] == 12
    assert (first[0].stat().st_mtime_ns, first[0].stat().st_ino) == stamp, "a finished shard was rebuilt"
    assert not list(out.glob("*.tmp"))
    assert shard_contents(out) == shard_contents(tiny_shards), "resumed shards differ from a clean build"


def test_rebuild_with_other_settings_needs_overwrite(tiny_index, tmp_path):
    index = tiny_index.subset(tiny_index.split("test")[:2])
    build_shards(index, tmp_path, BuildConfig(short_side=32, crf=12))
    with pytest.raises(ValueError, match="different plan"):
        build_shards(index, tmp_path, BuildConfig(short_side=16, crf=12))
    manifest = build_shards(index, tmp_path, BuildConfig(short_side=16, crf=12), overwrite=True)
    meta = json.loads(read_tar(tmp_path / "test-000000.tar")[index.clips[0].clip_id]["json"])
    assert manifest["complete"] and (meta["height"], meta["width"]) == (16, 22)


@pytest.mark.slow  # part 0 builds with a 2-process pool
def test_parts_are_disjoint_and_union_to_the_whole(tiny_index, tiny_shards, tmp_path):
    planned = set(plan_shards(tiny_index, TINY_CONFIG))
    built: dict[str, set[str]] = {}
    for i in range(3):
        out = tmp_path / f"machine{i}"
        cfg = BuildConfig(short_side=32, shard_samples=3, crf=12, part=(i, 3), workers=2 if i == 0 else 1)
        manifest = build_shards(tiny_index, out, cfg)
        assert not manifest["complete"]
        built[f"machine{i}"] = {p.name for p in out.glob("*.tar")}
    names = [n for part in built.values() for n in part]
    assert len(names) == len(set(names)), "parts overlap"
    assert set(names) == planned == {"train-000000.tar", "train-000001.tar", "test-000000.tar", "test-000001.tar"}

    merged = tmp_path / "merged"
    for i in range(3):
        shutil.copytree(tmp_path / f"machine{i}", merged, dirs_exist_ok=True)
    assert shards_cli(["merge", str(merged)]) == 0
    manifest = load_manifest(merged)
    assert manifest["complete"] and manifest["totals"]["samples"] == 12
    assert shard_contents(merged) == shard_contents(tiny_shards)
    assert shards_cli(["verify", str(merged)]) == 0


def test_verify_reports_corrupt_missing_and_mismatching_samples(tiny_shards, tmp_path, capsys):
    work = tmp_path / "shards"
    shutil.copytree(tiny_shards, work)
    assert verify_shards(work).ok
    assert shards_cli(["verify", str(work)]) == 0

    # 1) garbage instead of one clip's mp4, 2) a json that lies about the frame count
    shard = work / "train-000000.tar"
    samples = read_tar(shard)
    bad_video, bad_json = sorted(samples)[:2]
    samples[bad_video]["mp4"] = b"\x00not a video" * 50
    meta = json.loads(samples[bad_json]["json"])
    meta["n_frames"] += 3
    samples[bad_json]["json"] = json.dumps(meta).encode()
    with tarfile.open(shard, "w") as tar:
        for key, members in samples.items():
            for ext, data in sorted(members.items()):
                info = tarfile.TarInfo(f"{key}.{ext}")
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))
    # 3) a shard gone
    (work / "test-000001.tar").unlink()

    report = verify_shards(work)
    text = "\n".join(str(p) for p in report.problems)
    assert f"train-000000.tar:{bad_video}: mp4 does not decode" in text
    assert f"train-000000.tar:{bad_json}: video has n_frames=" in text
    assert "train-000000.tar: sha256" in text
    assert "test-000001.tar: shard file is missing" in text
    assert shards_cli(["verify", str(work)]) == 1
    assert "PROBLEM" in capsys.readouterr().out


def test_missing_and_undecodable_sources_are_skipped_and_listed(tiny_videos, tmp_path, caplog):
    broken = tmp_path / "broken.mp4"
    broken.write_bytes(b"this is not a video" * 100)
    base = dict(label=0, subject="1", split="train", fps=25.0)
    index = ClipIndex([
        Clip(video_id="v0", start_frame=0, end_frame=5, path=str(tiny_videos["v0"]), **base),
        Clip(video_id="gone", start_frame=0, end_frame=5, path=str(tmp_path / "gone.mp4"), **base),
        Clip(video_id="broken", start_frame=0, end_frame=5, path=str(broken), **base),
        Clip(video_id="v1", start_frame=100, end_frame=110, path=str(tiny_videos["v1"]), **base),
    ], ["a"], "partly-broken")
    manifest = build_shards(index, tmp_path / "out", BuildConfig(short_side=32, crf=12))
    assert manifest["totals"]["samples"] == 1 and manifest["complete"]
    reasons = {s["video_id"]: s["reason"] for s in manifest["skipped"]}
    assert set(reasons) == {"gone", "broken", "v1"}
    assert "not found" in reasons["gone"] and "unreadable" in reasons["broken"]
    assert "24 frames" in reasons["v1"]
    assert manifest["splits"]["train"]["skipped"] == 3
    assert "skipping clip" in caplog.text


def test_context_padding_and_whole_video_csv_through_the_cli(tiny_csv, tiny_videos, tmp_path):
    out = tmp_path / "csv_shards"
    rc = shards_cli(["build", "--format", "csv", "--index", str(tiny_csv), "--out", str(out), "--short-side", "16",
                     "--crf", "12", "--context", "2"])
    assert rc == 0
    samples = all_samples(out)
    assert len(samples) == 4
    lengths = {"v0": 30, "v1": 24, "v2": 20, "v3": 16}
    for members in samples.values():
        meta = json.loads(members["json"])
        n = lengths[meta["video_id"]]
        assert (meta["start_frame"], meta["end_frame"], meta["n_frames"]) == (0, n - 1, n)  # -1 resolved
        assert (meta["height"], meta["width"]) == (16, 22)

    # context frames around an annotated span, clipped at the video's start
    index = ClipIndex([Clip(video_id="v0", start_frame=1, end_frame=10, label=0, subject="1", split="train",
                            fps=25.0, path=str(tiny_videos["v0"]))], ["a"])
    build_shards(index, tmp_path / "ctx", BuildConfig(short_side=32, crf=12, context_frames=3))
    (members,) = all_samples(tmp_path / "ctx").values()
    meta = json.loads(members["json"])
    assert (meta["context_before"], meta["context_after"], meta["n_frames"]) == (1, 3, 1 + 10 + 3)
    assert read_time_code(decode_frames(members["mp4"])).tolist() == list(range(0, 14))


def test_plan_by_size_is_deterministic_and_keeps_videos_together(tiny_index):
    cfg = BuildConfig(short_side=128, shard_mb=0.015, est_bytes_per_pixel=0.03)  # 7-12 kB per clip: 1-2 per shard
    plan = plan_shards(tiny_index, cfg)
    assert plan == plan_shards(tiny_index, cfg)
    assert len(plan) > 4
    clips = [c for entry in plan.values() for c in entry.clips]
    assert sorted(c.clip_id for c in clips) == sorted(c.clip_id for c in tiny_index)
    for name, entry in plan.items():
        assert all(c.split == entry.split == name.split("-")[0] for c in entry.clips)
    order = [(c.video_id, c.start_frame) for entry in plan.values() if entry.split == "train" for c in entry.clips]
    assert order == sorted(order)
