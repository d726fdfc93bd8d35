"""Video encoding (PyAV, H.264) and decoding (decord from bytes, with a PyAV path).

Frames are uint8 arrays shaped (T, H, W, 3) in RGB order throughout mgfm.
"""

from __future__ import annotations

import io
from fractions import Fraction
from pathlib import Path
from typing import Iterable, Sequence

import numpy as np
from torch.utils.dlpack import from_dlpack

from mgfm.files import write_atomic

BACKENDS = ("decord", "pyav")


class VideoDecodeError(RuntimeError):
    """A video could not be decoded (corrupt, truncated, not a video)."""


class VideoWriter:
    """Streaming H.264 writer: ``with VideoWriter(path, fps, h, w) as w: w.write(frame)``.

    Encodes into memory and writes the file atomically (temp name + rename) on a clean exit, so an
    interrupted render never leaves a half-written video behind under the final name.
    """

    def __init__(self, path: str | Path | None, fps: float, height: int, width: int, crf: int = 23,
                 preset: str = "veryfast"):
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
        self.stream.options = {"crf": str(crf), "preset": preset, "threads": "1", "x264-params": "no-mbtree=1"}
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
                 crf: int = 23) -> bytes:
    """Encode RGB frames (T, H, W, 3) to H.264 mp4 bytes (and write them to ``path`` if given)."""
    frames = iter(frames)
    first = next(frames, None)
    if first is None:
        raise ValueError("cannot encode a video with no frames")
    with VideoWriter(path, fps, first.shape[0], first.shape[1], crf=crf) as writer:
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
                  backend: str = "decord", fallback: str | None = None) -> np.ndarray:
    """Decode the frames at ``indices`` (all frames when None) -> uint8 (len(indices), H, W, 3).

    ``backend="decord"`` reads from an in-memory buffer (fast random access); ``"pyav"`` decodes
    sequentially. When ``backend`` fails with :class:`VideoDecodeError`, ``fallback`` (another backend, e.g.
    PyAV for files decord mishandles) is tried; its failure is the one raised.
    """
    decoders = {"decord": _decode_decord, "pyav": _decode_pyav}
    if backend not in decoders or (fallback is not None and fallback not in decoders):
        raise ValueError(f"unknown video backend {backend!r}/{fallback!r}; expected one of {BACKENDS}")
    try:
        return decoders[backend](data, indices)
    except VideoDecodeError:
        if fallback is None or fallback == backend:
            raise
    return decoders[fallback](data, indices)


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


def _decode_pyav(data, indices):
    # deferred: only the backend in use loads its native library
    import av

    wanted = None if indices is None else sorted(set(int(i) for i in indices))
    frames: list[np.ndarray] = []
    try:
        with av.open(_as_file(data)) as container:
            stream = container.streams.video[0]
            stream.thread_type = "AUTO"
            last = wanted[-1] if wanted else None
            for i, frame in enumerate(container.decode(stream)):
                if wanted is None or i in wanted:
                    frames.append(frame.to_ndarray(format="rgb24"))
                elif last is not None and i > last:
                    break
                if last is not None and i >= last:
                    break
    except (av.error.FFmpegError, IndexError, OSError) as err:
        raise VideoDecodeError(f"PyAV could not decode the video ({err})") from err
    if not frames:
        raise VideoDecodeError("video has no frames")
    if indices is None:
        return np.stack(frames)
    # Map requested indices onto decoded ones, clamping past-the-end requests to the last frame.
    available = wanted[: len(frames)]
    lookup = {f: k for k, f in enumerate(available)}
    out = [frames[lookup.get(int(i), len(frames) - 1)] if int(i) in lookup else frames[min(
        range(len(available)), key=lambda k: abs(available[k] - int(i)))] for i in indices]
    return np.stack(out)
