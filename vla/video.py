"""mp4 encoding and decoding with PyAV (FFmpeg), as LeRobot stores camera streams."""

from __future__ import annotations

from pathlib import Path

import av
import numpy as np

CODEC = "libx264"
PIX_FMT = "yuv420p"


class VideoError(Exception):
    pass


class VideoWriter:
    """Appends uint8 H x W x 3 frames to one mp4 file at a fixed fps."""

    def __init__(self, path: str | Path, fps: int, height: int, width: int, crf: int = 18, gop: int = 10):
        if height % 2 or width % 2:
            raise VideoError(f"{path}: {PIX_FMT} needs even frame sizes, got {height}x{width}")
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._container = av.open(str(self.path), mode="w")
        self._stream = self._container.add_stream(CODEC, rate=fps)
        self._stream.width, self._stream.height = width, height
        self._stream.pix_fmt = PIX_FMT
        self._stream.options = {"crf": str(crf), "g": str(gop), "preset": "veryfast", "tune": "zerolatency"}
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


def decode_video(path: str | Path) -> np.ndarray:
    """All frames of the file's first video stream as an (N, H, W, 3) uint8 array."""
    path = Path(path)
    if not path.is_file():
        raise VideoError(f"video file missing: {path}")
    try:
        with av.open(str(path)) as container:
            stream = container.streams.video[0]
            stream.thread_type = "AUTO"
            frames = [f.to_ndarray(format="rgb24") for f in container.decode(stream)]
    except (av.error.FFmpegError, IndexError) as e:
        raise VideoError(f"cannot decode video {path}: {e}") from e
    if not frames:
        raise VideoError(f"video {path} holds no frames (truncated or empty file)")
    return np.stack(frames)
