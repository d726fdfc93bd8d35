"""Video encoding (PyAV, H.264) and decoding (PyAV, only what the wanted frames need; or decord).

Frames are uint8 arrays shaped (T, H, W, 3) in RGB order throughout mgfm.
"""

from __future__ import annotations

import io
import os
from dataclasses import asdict, dataclass
from fractions import Fraction
from pathlib import Path
from typing import Iterable, Sequence

import numpy as np
from torch.utils.dlpack import from_dlpack

from mgfm.files import write_atomic

BACKENDS = ("decord", "pyav")
X264_TUNES = ("film", "animation", "grain", "stillimage", "fastdecode", "zerolatency")
MAX_BFRAMES = 16  # x264's limit


class VideoDecodeError(RuntimeError):
    """A video could not be decoded (corrupt, truncated, not a video)."""


@dataclass(frozen=True)
class H264Encoding:
    """How clips are encoded: libx264, yuv420p, one thread, no MB-tree (see :class:`VideoWriter`), plus what
    trades bytes for decoding cost (BENCHMARKS.md "Loader", the bytes-for-speed table):

    * ``tune="fastdecode"``: x264's fast-decode tuning (CAVLC instead of CABAC, no deblocking filter, no
      weighted prediction);
    * ``bframes=N``: a fixed pattern of N B-frames between reference frames, none of them a reference
      (no B-pyramid, no adaptive placement), so a decoder that wants only some frames skips the B-frames
      it does not want (:func:`decode_frames` with PyAV does); None: x264's own choice for the preset;
    * ``keyint=N``: a keyframe (IDR) every N frames, so a decoder starts at the last one before the first
      wanted frame; None: x264's default (250, i.e. one per clip).
    """

    crf: int = 23
    preset: str = "veryfast"
    tune: str | None = None
    bframes: int | None = None
    keyint: int | None = None

    def __post_init__(self) -> None:
        if self.tune is not None and self.tune not in X264_TUNES:
            raise ValueError(f"unknown x264 tune {self.tune!r}; expected one of {', '.join(X264_TUNES)}")
        if self.bframes is not None and not 0 <= self.bframes <= MAX_BFRAMES:
            raise ValueError(f"bframes must be in [0, {MAX_BFRAMES}], got {self.bframes}")
        if self.keyint is not None and self.keyint < 1:
            raise ValueError(f"keyint must be >= 1, got {self.keyint}")
        if not 0 <= self.crf <= 51:
            raise ValueError(f"crf must be in [0, 51], got {self.crf}")

    def x264_options(self) -> dict[str, str]:
        """The libx264 encoder options (PyAV ``stream.options``)."""
        params = ["no-mbtree=1"]
        if self.bframes is not None:
            params.append(f"bframes={self.bframes}:b-pyramid=none:b-adapt=0")
        if self.keyint is not None:
            params.append(f"keyint={self.keyint}:min-keyint={self.keyint}:scenecut=0")
        options = {"crf": str(self.crf), "preset": self.preset, "threads": "1", "x264-params": ":".join(params)}
        if self.tune is not None:
            options["tune"] = self.tune
        return options

    def record(self) -> dict:
        """What a shard set's manifest says about its videos (``encoding``)."""
        return {"codec": "h264", "encoder": "libx264", "pix_fmt": "yuv420p", **asdict(self),
                "x264_options": self.x264_options()}


class VideoWriter:
    """Streaming H.264 writer: ``with VideoWriter(path, fps, h, w) as w: w.write(frame)``.

    Encodes into memory and writes the file atomically (temp name + rename) on a clean exit, so an
    interrupted render never leaves a half-written video behind under the final name.
    """

    def __init__(self, path: str | Path | None, fps: float, height: int, width: int,
                 encoding: H264Encoding = H264Encoding()):
        # deferred: only the backend in use loads its native library
        import av

        if height % 2 or width % 2:
            raise ValueError(f"H.264 with yuv420p needs even frame sizes, got {height}x{width}")
        self.path = Path(path) if path is not None else None
        self.buffer = io.BytesIO()
        self.container = av.open(self.buffer, mode="w", format="mp4")
        self.stream = self.container.add_stream("libx264", rate=Fraction(fps).limit_denominator(1001))
        self.stream.height, self.stream.width = height, width
        self.stream.pix_fmt = "yuv420p"
        # Same frames -> same bytes (the synthetic benchmark and shard rebuilds rely on it): one thread, as
        # parallelism comes from processes and threaded x264 changes output; and no MB-tree, whose
        # lookahead reads uninitialised memory on some frame sizes (measured: 80x64 and 96x64 frames
        # encoded 80 times gave up to 6 different files with it, 1 without).
        self.stream.codec_context.thread_count = 1
        self.stream.options = encoding.x264_options()
        self.frames = 0
        self.data = b""

    def write(self, frame: np.ndarray) -> None:
        # deferred: only the backend in use loads its native library
        import av

        video_frame = av.VideoFrame.from_ndarray(np.ascontiguousarray(frame), format="rgb24")
        for packet in self.stream.encode(video_frame):
            self.container.mux(packet)
        self.frames += 1

    def close(self) -> bytes:
        for packet in self.stream.encode():
            self.container.mux(packet)
        self.container.close()
        data = self.data = self.buffer.getvalue()
        if self.path is not None:
            write_atomic(self.path, data)
        return data

    def __enter__(self) -> "VideoWriter":
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is None:
            self.close()


def encode_video(frames: Iterable[np.ndarray] | np.ndarray, fps: float, path: str | Path | None = None,
                 encoding: H264Encoding = H264Encoding()) -> bytes:
    """Encode RGB frames (T, H, W, 3) to H.264 mp4 bytes (and write them to ``path`` if given)."""
    frames = iter(frames)
    first = next(frames, None)
    if first is None:
        raise ValueError("cannot encode a video with no frames")
    with VideoWriter(path, fps, first.shape[0], first.shape[1], encoding) as writer:
        writer.write(first)
        for frame in frames:
            writer.write(frame)
    return writer.data


def probe(data: bytes | str | Path) -> dict:
    """Frame count, fps, height and width of a video (PyAV; reads the whole stream for an exact count)."""
    # deferred: only the backend in use loads its native library
    import av

    try:
        with av.open(_as_file(data)) as container:
            stream = container.streams.video[0]
            fps = float(stream.average_rate or stream.guessed_rate or 25)
            n = 0
            height = width = 0
            for frame in container.decode(stream):
                height, width = frame.height, frame.width
                n += 1
    except (av.error.FFmpegError, IndexError, OSError) as err:
        raise VideoDecodeError(f"not a decodable video ({err})") from err
    if n == 0:
        raise VideoDecodeError("video has no frames")
    return {"n_frames": n, "fps": fps, "height": height, "width": width}


def decode_frames(data: bytes | str | Path, indices: Sequence[int] | None = None,
                  backend: str = "pyav", fallback: str | None = None,
                  stacked: bool = True) -> np.ndarray | list[np.ndarray]:
    """Decode the frames at ``indices`` (all frames when None) -> uint8 (len(indices), H, W, 3); indices past
    the end are the last frame.

    ``backend="pyav"`` decodes only the pictures the wanted frames need (see :func:`_decode_pyav`); decord
    (``"decord"``) decodes every picture up to the last one wanted: the same pixels, ~1.5x slower on x264's
    default encoding and ~3x on shards encoded for decoding (BENCHMARKS.md "Loader"). When ``backend`` fails with :class:`VideoDecodeError`, ``fallback`` (the other backend) is
    tried where it is installed; its failure is the one raised. ``stacked=False`` may return a list of
    (H, W, 3) frames instead of one array (PyAV's pictures as they are, without copying them into one array).
    """
    decoders = {"decord": _decode_decord, "pyav": _decode_pyav}
    if backend not in decoders or (fallback is not None and fallback not in decoders):
        raise ValueError(f"unknown video backend {backend!r}/{fallback!r}; expected one of {BACKENDS}")
    try:
        frames = decoders[backend](data, indices)
    except VideoDecodeError as err:
        if fallback is None or fallback == backend:
            raise
        try:
            frames = decoders[fallback](data, indices)
        except ImportError:  # the fallback's library is not installed (e.g. no decord on a GPU box)
            raise err from None
    return np.stack(frames) if stacked and isinstance(frames, list) else frames


def _as_file(data: bytes | str | Path):
    return io.BytesIO(data) if isinstance(data, (bytes, bytearray, memoryview)) else str(data)


def _decode_decord(data, indices):
    # deferred: only the backend in use loads its native library
    import decord

    try:
        reader = decord.VideoReader(_as_file(data), num_threads=1)
        n = len(reader)
        if n == 0:
            raise VideoDecodeError("video has no frames")
        idx = list(range(n)) if indices is None else [min(max(int(i), 0), n - 1) for i in indices]
        frames = from_decord(reader.get_batch(idx))
    except decord.DECORDError as err:
        raise VideoDecodeError(f"decord could not decode the video ({str(err).splitlines()[0]})") from err
    except RuntimeError as err:
        raise VideoDecodeError(f"decord could not decode the video ({str(err).splitlines()[0][:200]})") from err
    return frames


def from_decord(batch) -> np.ndarray:
    """A decord NDArray as a numpy array over the same memory (DLPack), not ``asnumpy()``'s copy: the copy
    of a 16-frame 256-px batch is ~5% of its decode time (BENCHMARKS "Loader")."""
    return from_dlpack(batch.to_dlpack()).numpy()


def _decode_pyav(data, indices) -> list[np.ndarray]:
    """The frames at ``indices`` (display order; all when None) decoded with PyAV, doing only the work they need.

    Packets are fed in decode order up to the last one a wanted frame needs, then the decoder is drained; a
    packet whose frame is not wanted is decoded only when it is a reference picture (``skip_frame="NONREF"``
    for it: the decoder drops a non-reference picture, which no other picture reads, so every frame it does
    output is bit-identical to a full decode, and to decord's). Frame ``i`` is the packet with the ``i``-th
    smallest presentation time, as decord counts. Stream probing skips non-key pictures
    (``options={"skip_frame": "nonkey"}``): it would otherwise decode the start of the clip once more just to
    learn parameters the mp4 header already has (measured: 1.2 -> 0.3 ms per open)."""
    # deferred: only the backend in use loads its native library
    import av

    try:
        with av.open(_as_file(data), options=_PROBE_OPTIONS) as container:
            stream = container.streams.video[0]
            codec = stream.codec_context
            codec.thread_count = 1  # parallelism comes from processes; a frame thread would apply skips late
            packets = [p for p in container.demux(stream) if p.size]
            if not packets:
                raise VideoDecodeError("video has no frames")
            stamps = [p.pts for p in packets]
            if None in stamps or len(set(stamps)) < len(stamps):  # no display order to go by: decode it all
                return _decode_in_output_order(packets, codec, indices)
            position = {pts: i for i, pts in enumerate(sorted(stamps))}
            n = len(packets)
            wanted = np.arange(n) if indices is None else np.clip(np.asarray(indices, dtype=np.int64), 0, n - 1)
            unique, inverse = np.unique(wanted, return_inverse=True)
            slot = {int(i): k for k, i in enumerate(unique)}
            at = [k for k, p in enumerate(packets) if position[p.pts] in slot]
            first = _gop_start(packets, at[0], int(unique[0]), position, codec)
            out: list = [None] * len(unique)

            def keep(frames) -> None:
                for frame in frames:
                    k = slot.get(position.get(frame.pts, -1))
                    if k is not None:
                        if (frame.height, frame.width) != (codec.height, codec.width):
                            raise VideoDecodeError(f"picture size changes within the video ({codec.height}x"
                                                   f"{codec.width} -> {frame.height}x{frame.width})")
                        out[k] = _rgb(frame)

            for packet in packets[first:at[-1] + 1]:
                codec.skip_frame = "DEFAULT" if position[packet.pts] in slot else "NONREF"
                keep(codec.decode(packet))
            codec.skip_frame = "DEFAULT"
            keep(codec.decode(None))
    except (av.error.FFmpegError, IndexError, OSError) as err:
        raise VideoDecodeError(f"PyAV could not decode the video ({err})") from err
    missing = [int(unique[k]) for k, frame in enumerate(out) if frame is None]
    if missing:
        raise VideoDecodeError(f"PyAV decoded no picture for frames {missing[:5]} of {n}")
    return out if np.array_equal(unique, wanted) else [out[k] for k in inverse.ravel()]


def _rgb(frame) -> np.ndarray:
    """A decoded picture as uint8 (H, W, 3) RGB (a view of the converted picture), converted on one thread by this
    process's own converter: PyAV's shared one (``frame.to_ndarray``) keeps swscale's thread pool, which a
    process forked from one that used it (a DataLoader worker) inherits without its threads, and hangs on."""
    # deferred: only the backend in use loads its native library
    from av.video.reformatter import VideoReformatter

    pid = os.getpid()
    if _CONVERTER.get("pid") != pid:
        _CONVERTER.update(pid=pid, converter=VideoReformatter())
    return _CONVERTER["converter"].reformat(frame, format="rgb24", threads=1).to_ndarray()


_CONVERTER: dict = {}  # this process's colour converter (see _rgb)


def _gop_start(packets, wanted_at: int, first_wanted: int, position: dict, codec) -> int:
    """Where decoding starts: the last H.264 IDR picture at or before the first packet a wanted frame needs
    (decode order) and not shown after the first wanted frame; 0 (the clip's start) when there is none. An IDR
    picture clears every reference, so nothing before it is needed; any other keyframe may leave references
    behind and is not used."""
    if codec.name != "h264" or not codec.extradata or len(codec.extradata) < 5 or codec.extradata[0] != 1:
        return 0  # only avcC-framed H.264 (mp4) is read here
    size = (codec.extradata[4] & 3) + 1  # bytes of each NAL unit's length prefix
    for k in range(wanted_at, 0, -1):
        packet = packets[k]
        if packet.is_keyframe and position[packet.pts] <= first_wanted and _is_idr(bytes(packet), size):
            return k
    return 0


def _is_idr(data: bytes, size: int) -> bool:
    """Whether the first picture slice of an avcC-framed access unit is an IDR slice (NAL type 5)."""
    pos = 0
    while pos + size < len(data):
        kind = data[pos + size] & 0x1F
        if kind in (1, 5):
            return kind == 5
        pos += size + int.from_bytes(data[pos:pos + size], "big")
    return False


# Codec options for stream probing (``avformat_find_stream_info``) only, not for the decoder that reads frames.
_PROBE_OPTIONS = {"skip_frame": "nonkey"}


def _decode_in_output_order(packets, codec, indices) -> list[np.ndarray]:
    """Every packet decoded; frames numbered in the order the decoder outputs them (past-the-end clamps)."""
    frames = [_rgb(f) for p in [*packets, None] for f in codec.decode(p)]
    if not frames:
        raise VideoDecodeError("video has no frames")
    if indices is None:
        return frames
    return [frames[min(max(int(i), 0), len(frames) - 1)] for i in indices]
