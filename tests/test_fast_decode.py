"""Shards encoded for decoding and the decoder that uses it (issue 41): the PyAV path decodes only what the
wanted frames need and gives decord's pixels; the encoding options and their manifest record; and the new
defaults (PyAV, fast-decode shards stored at the training size) sample the same frames, crops, flips and masks."""

from __future__ import annotations

import hashlib
import io
import json
import multiprocessing

import numpy as np
import pytest
from conftest import time_coded_frames

from mgfm.data.stream import StreamConfig, make_loader
from mgfm.data.stream import decode as decode_mod
from mgfm.shards import BuildConfig, build_shards, plan_shards
from mgfm.shards.__main__ import main as shards_cli
from mgfm.shards.plan import plan_hash
from mgfm.shards.manifest import format_manifest, load_manifest
from mgfm.sources.video_io import H264Encoding, decode_frames, encode_video

FAST = H264Encoding(crf=12, tune="fastdecode", bframes=3)
CLIP = time_coded_frames(40, 0)


def full_decode(data: bytes) -> np.ndarray:
    """Every frame, in order, by PyAV's plain sequential decoding (no skipping)."""
    import av

    with av.open(io.BytesIO(data)) as container:
        return np.stack([f.to_ndarray(format="rgb24") for f in container.decode(video=0)])


@pytest.mark.parametrize("encoding", [H264Encoding(crf=12), FAST, H264Encoding(crf=12, bframes=3, keyint=8)],
                         ids=["x264-defaults", "fastdecode-bframes3", "bframes3-keyint8"])
def test_pyav_gives_the_full_decodes_and_decords_pixels_for_any_indices(encoding):
    data = encode_video(CLIP, 25, encoding=encoding)
    every = full_decode(data)
    picks = [[0, 2, 4, 6, 8, 10, 12, 14, 16, 18, 20, 22, 24, 26, 28, 30], [9, 11, 13, 15, 17, 19, 21, 23],
             [3, 3, 3, 7, 7], [39, 50, -2], [33], [31, 17, 5]]
    for idx in picks:
        want = every[np.clip(idx, 0, len(every) - 1)]
        assert np.array_equal(decode_frames(data, idx, backend="pyav"), want), idx
        assert np.array_equal(decode_frames(data, idx, backend="decord"), want), idx
        listed = decode_frames(data, idx, backend="pyav", stacked=False)
        assert isinstance(listed, list) and np.array_equal(np.stack(listed), want)
    assert np.array_equal(decode_frames(data, None, backend="pyav"), every)


def test_bframes_makes_three_of_four_pictures_skippable_and_keyint_adds_idr_pictures():
    import av

    def pictures(data: bytes, skip: str) -> list[str]:
        with av.open(io.BytesIO(data)) as container:
            stream = container.streams.video[0]
            stream.codec_context.skip_frame = skip
            return ["?IPB"[int(f.pict_type)] for f in container.decode(stream)]  # AVPictureType I=1, P=2, B=3

    # a smooth pattern drifting a pixel a frame (the time-coded clip changes wholesale: scene cuts)
    y, x = np.mgrid[0:48, 0:64]
    smooth = np.stack([np.repeat((128 + 60 * np.sin((x + t) / 5) * np.cos(y / 7))[..., None], 3, axis=2)
                       for t in range(40)]).astype(np.uint8)
    fast = encode_video(smooth, 25, encoding=FAST)
    every = pictures(fast, "DEFAULT")
    assert every[:8] == ["I", "B", "B", "B", "P", "B", "B", "B"]
    refs = [p for p in every if p != "B"]  # every 4th, and the last: a decoder may skip the other 29
    assert pictures(fast, "NONREF") == refs and len(refs) == 11
    keyed = encode_video(smooth, 25, encoding=H264Encoding(crf=12, keyint=8))
    assert [i for i, p in enumerate(pictures(keyed, "DEFAULT")) if p == "I"] == [0, 8, 16, 24, 32]


def test_decoding_starts_at_the_last_idr_and_never_at_an_open_gop_keyframe():
    import av

    from mgfm.sources import video_io

    def start(data: bytes, first_wanted: int) -> int:
        with av.open(io.BytesIO(data)) as container:
            stream = container.streams.video[0]
            packets = list(p for p in container.demux(stream) if p.size)
            position = {pts: i for i, pts in enumerate(sorted(p.pts for p in packets))}
            at = next(k for k, p in enumerate(packets) if position[p.pts] == first_wanted)
            return position[packets[video_io._gop_start(packets, at, first_wanted, position,
                                                        stream.codec_context)].pts]

    closed = encode_video(CLIP, 25, encoding=H264Encoding(crf=12, bframes=3, keyint=8))
    assert [start(closed, i) for i in (3, 8, 30, 39)] == [0, 8, 24, 32]
    # x264's open GOPs: the keyframes after the first are not IDR pictures (their leading pictures read the
    # GOP before), so decoding starts at the clip's start, and still gives the full decode's pixels
    buffer = io.BytesIO()
    with av.open(buffer, "w", format="mp4") as container:
        stream = container.add_stream("libx264", rate=25)
        stream.height, stream.width, stream.pix_fmt = 48, 64, "yuv420p"
        stream.options = {"crf": "12", "threads": "1", "x264-params": "keyint=5:open-gop=1:bframes=2"}
        for frame in CLIP:
            for packet in stream.encode(av.VideoFrame.from_ndarray(frame, format="rgb24")):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)
    opened = buffer.getvalue()
    assert start(opened, 30) == 0
    idx = [7, 9, 21, 22, 30, 38]
    assert np.array_equal(decode_frames(opened, idx, backend="pyav"), full_decode(opened)[idx])


def _decode_in_child(data: bytes) -> tuple:
    return decode_frames(data, [0, 5, 9], backend="pyav").shape


def test_pyav_decodes_in_a_process_forked_after_the_parent_decoded():
    # swscale's own thread pool, inherited without its threads by a forked DataLoader worker, hung it
    data = encode_video(CLIP[:12], 25, encoding=H264Encoding(crf=12))
    assert decode_frames(data, [1, 2], backend="pyav").shape == (2, 48, 64, 3)
    with multiprocessing.get_context("fork").Pool(1) as pool:
        assert pool.apply_async(_decode_in_child, (data,)).get(timeout=60) == (3, 48, 64, 3)


def test_the_encoding_is_built_recorded_and_old_plans_keep_their_hash(tiny_index, tmp_path, capsys):
    config = BuildConfig(short_side=32, shard_samples=6, crf=12, tune="fastdecode", bframes=3, keyint=16)
    manifest = build_shards(tiny_index, tmp_path / "fast", config)
    enc = manifest["encoding"]
    assert (enc["codec"], enc["crf"], enc["tune"], enc["bframes"], enc["keyint"]) == ("h264", 12, "fastdecode", 3, 16)
    assert "bframes=3:b-pyramid=none:b-adapt=0" in enc["x264_options"]["x264-params"]
    assert "tune fastdecode, bframes 3, keyint 16" in format_manifest(load_manifest(tmp_path / "fast"))

    # a plan made before the encoding fields existed hashes as it did: sets built then resume
    plain = BuildConfig(short_side=32, shard_samples=6, crf=12)
    plan = plan_shards(tiny_index, plain)
    old_fields = ("short_side", "context_frames", "shard_samples", "shard_mb", "est_bytes_per_pixel", "est_aspect",
                  "est_unknown_frames", "crf", "preset", "splits", "pose_layout", "pose_fps", "pose_view")
    rows = {name: {"split": entry.split, "clips": [c.to_row() for c in entry.clips]} for name, entry in plan.items()}
    old = json.dumps({"config": {k: getattr(plain, k) for k in old_fields}, "shards": rows}, sort_keys=True, default=list)
    assert plan_hash(plan, plain) == hashlib.sha256(old.encode()).hexdigest()
    assert plan_hash(plan, config) != plan_hash(plan, plain)
    # ... and a set whose plan has no encoding record (built before it) reads as x264's defaults
    build_shards(tiny_index, tmp_path / "old", plain)
    meta = tmp_path / "old" / "_meta" / "plan.json"
    record = json.loads(meta.read_text())
    del record["encoding"]
    meta.write_text(json.dumps(record))
    assert build_shards(tiny_index, tmp_path / "old", plain).get("encoding") is None

    assert shards_cli(["build", "--format", "json", "--index", str(_index_json(tiny_index, tmp_path)), "--out",
                       str(tmp_path / "cli"), "--short-side", "32", "--bframes", "99"]) == 1
    assert "error: encoding: bframes must be in [0, 16], got 99" in capsys.readouterr().err


def _index_json(index, tmp_path):
    path = tmp_path / "index.json"
    index.save_json(path)
    return path


def _record(monkeypatch) -> dict:
    """Record what the stream draws: each sample's temporal views and each view's crop box with its frame size."""
    seen = {"views": [], "boxes": []}
    sample_views, crop = decode_mod._sample_views, decode_mod.crop_resize_planar

    def views(*args, **kwargs):
        out = sample_views(*args, **kwargs)
        seen["views"].append([v.tolist() for v in out])
        return out

    def cropped(frames, box, size, out, positions=None):
        seen["boxes"].append((box, frames[0].shape[:2]))
        return crop(frames, box, size, out, positions)

    monkeypatch.setattr(decode_mod, "_sample_views", views)
    monkeypatch.setattr(decode_mod, "crop_resize_planar", cropped)
    return seen


def _stream(shards, cfg: StreamConfig, monkeypatch) -> tuple[list[dict], dict]:
    with monkeypatch.context() as patch:
        seen = _record(patch)
        loader, skips = make_loader(shards, "train", cfg, mode="train", epoch=1, rank=0, world=1)
        batches = list(loader)
    assert skips.total == 0
    return batches, seen


def test_new_defaults_sample_the_same_frames_crops_flips_and_masks(tiny_index, tiny_shards, tmp_path, monkeypatch):
    # today: x264's default encoding, stored larger than the crop, decord; new: fast-decode shards at the crop
    # size, PyAV (the stream's default). Same seed: the same draws, view for view.
    new_shards = tmp_path / "new"
    build_shards(tiny_index, new_shards, BuildConfig(short_side=28, shard_samples=3, crf=12, tune="fastdecode",
                                                     bframes=7))
    geometry = dict(frames=4, img_size=28, tubelet=2, patch=14, mask_ratio=0.5, decoder_keep_ratio=0.5, repeats=2,
                    flip=True, batch_size=2, batches_per_epoch=6, num_workers=0, video_dtype="uint8", seed=3)
    assert StreamConfig().backend == "pyav"
    today, today_seen = _stream(tiny_shards, StreamConfig(**geometry, backend="decord"), monkeypatch)
    new, new_seen = _stream(new_shards, StreamConfig(**geometry), monkeypatch)
    same_set, _ = _stream(tiny_shards, StreamConfig(**geometry), monkeypatch)

    assert len(today) == len(new) == 6 and len(today_seen["boxes"]) == 6 * 2 * 2
    for a, b, c in zip(today, new, same_set):
        assert a["clip_id"] == b["clip_id"] == c["clip_id"]
        for key in ("encoder_mask", "decoder_mask", "label"):
            assert np.array_equal(a[key], b[key])
        # the decoder alone changes nothing: the same pixels, bit for bit
        assert np.array_equal(a["video"], c["video"])
    assert today_seen["views"] == new_seen["views"]  # the sampled frames
    for (box_a, (h_a, w_a)), (box_b, (h_b, w_b)) in zip(today_seen["boxes"], new_seen["boxes"]):
        short_a, short_b = min(h_a, w_a), min(h_b, w_b)
        assert box_a.flip == box_b.flip
        for size_a, size_b in ((box_a.h, box_b.h), (box_a.w, box_b.w)):  # the same crop scale of the frame
            assert abs(size_a / short_a - size_b / short_b) <= 0.5 / short_a + 0.5 / short_b
        for pos_a, pos_b, room_a, room_b in ((box_a.y, box_b.y, h_a - box_a.h + 1, h_b - box_b.h + 1),
                                             (box_a.x, box_b.x, w_a - box_a.w + 1, w_b - box_b.w + 1)):
            assert abs(pos_a / room_a - pos_b / room_b) <= 1 / room_a + 1 / room_b  # the same place in the room
