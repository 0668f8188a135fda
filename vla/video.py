"""mp4 encoding and decoding with PyAV (FFmpeg), as LeRobot stores camera streams.

Decoding takes whatever FFmpeg decodes (h264, HEVC, AV1 through libdav1d: LeRobot's default is
libsvtav1); the writer's codec is a choice (libx264 by default, libx265, libsvtav1)."""

from __future__ import annotations

import os
from pathlib import Path

import av
import numpy as np

CODEC = "libx264"
PIX_FMT = "yuv420p"


class VideoError(Exception):
    pass


class VideoWriter:
    """Appends uint8 H x W x 3 frames to one mp4 file at a fixed fps."""

    def __init__(self, path: str | Path, fps: int, height: int, width: int, crf: int = 18, gop: int = 10,
                 codec: str = CODEC):
        if height % 2 or width % 2:
            raise VideoError(f"{path}: {PIX_FMT} needs even frame sizes, got {height}x{width}")
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._container = av.open(str(self.path), mode="w")
        self._stream = self._container.add_stream(codec, rate=fps)
        self._stream.width, self._stream.height = width, height
        self._stream.pix_fmt = PIX_FMT
        if codec == "libx264":
            self._stream.options = {"crf": str(crf), "g": str(gop), "preset": "veryfast", "tune": "zerolatency"}
        elif codec == "libx265":
            self._stream.options = {"crf": str(crf), "preset": "veryfast",
                                    "x265-params": f"keyint={gop}:min-keyint={gop}:log-level=error"}
        else:  # libsvtav1, as LeRobot encodes
            os.environ.setdefault("SVT_LOG", "1")  # SVT-AV1 prints its whole configuration otherwise
            self._stream.options = {"crf": str(crf + 12), "g": str(gop), "preset": "12"}
        self.frames = 0

    def write(self, frame: np.ndarray) -> None:
        frame = np.ascontiguousarray(frame, dtype=np.uint8)
        vf = av.VideoFrame.from_ndarray(frame, format="rgb24")
        vf.pts = self.frames
        for packet in self._stream.encode(vf):
            self._container.mux(packet)
        self.frames += 1

    def close(self) -> None:
        for packet in self._stream.encode():
            self._container.mux(packet)
        self._container.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


def write_video(path: str | Path, frames, fps: int) -> None:
    frames = list(frames)
    h, w = frames[0].shape[:2]
    with VideoWriter(path, fps, h, w) as vw:
        for f in frames:
            vw.write(f)


def probe_video(path: str | Path) -> tuple[int, int, float]:
    """(height, width, duration in seconds) of the first video stream, from its header: no decoding.
    A missing file or one whose header cannot be read (a truncated mp4 loses its index) is a VideoError."""
    path = Path(path)
    if not path.is_file():
        raise VideoError(f"video file missing: {path}")
    try:
        with av.open(str(path)) as container:
            stream = container.streams.video[0]
            duration = (float(stream.duration * stream.time_base) if stream.duration is not None
                        else (container.duration or 0) / 1e6)
            return stream.codec_context.height, stream.codec_context.width, duration
    except (av.error.FFmpegError, IndexError) as e:
        raise VideoError(f"cannot read video {path}: {e}") from e


def decode_segment(path: str | Path, start_s: float, n: int, fps: float) -> np.ndarray:
    """The n frames from time start_s on, (n, H, W, 3) uint8: seeks to the keyframe before start_s
    and decodes forward (an episode inside a file of many, as LeRobot v3 stores them)."""
    path = Path(path)
    half = 0.5 / fps
    frames = []
    try:
        with av.open(str(path)) as container:
            stream = container.streams.video[0]
            stream.thread_type = "AUTO"
            if start_s > half:
                container.seek(int(max(0.0, start_s - half) / stream.time_base), stream=stream, backward=True)
            for f in container.decode(stream):
                t = float(f.pts * stream.time_base) if f.pts is not None else f.time
                if t < start_s - half:
                    continue
                frames.append(f.to_ndarray(format="rgb24"))
                if len(frames) == n:
                    break
    except (av.error.FFmpegError, IndexError) as e:
        raise VideoError(f"cannot decode video {path}: {e}") from e
    if len(frames) < n:
        raise VideoError(f"{path}: needs frames {start_s * fps:.0f}..{start_s * fps + n:.0f} but decodes "
                         f"only {len(frames)} of them from {start_s:.3f} s (truncated?)")
    return np.stack(frames)
