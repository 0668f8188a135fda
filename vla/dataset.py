"""LeRobotDataset v3.0 on disk: a writer for collected episodes and a reader for training.

Layout (LeRobot's field names and path templates):
    meta/info.json                      features, fps, totals, path templates, codebase_version "v3.0"
    meta/stats.json                     min/max/mean/std/count (+ q01/q99 for vectors) per feature
    meta/tasks.parquet                  instruction (index "task") -> task_index
    meta/episodes/chunk-XXX/file-XXX.parquet   one row per episode: length, tasks, offsets, stats
    data/chunk-XXX/file-XXX.parquet     frame rows of many episodes
    videos/<camera key>/chunk-XXX/file-XXX.mp4 frames of many episodes per file (h264, HEVC or AV1);
                                        or a camera of dtype "image": PNG bytes in the data parquet

The writer commits in batches: a batch's data, videos and episode rows are written under new file
indices first and meta/info.json last (atomically), so a crash leaves at most files that info.json
does not count, which the next run overwrites.

The reader takes v3.x datasets and LeRobot v2.0 / v2.1 ones directly (one parquet and one mp4 per
episode, meta/episodes.jsonl, tasks.jsonl, episodes_stats.jsonl): no conversion step. It holds the
vectors in memory and decodes camera frames on demand, an episode at a time, into a cache bounded
in bytes (`cache_mb`), brought to the model's frame size as they are decoded (`image_size`,
`image_fit`: vla.transforms.fit_frames, the function a policy applies to live frames).
"""

from __future__ import annotations

import io
import json
import os
from collections import OrderedDict, defaultdict
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
from PIL import Image

from vla.spec import check_image_fit
from vla.transforms import fit_frames
from vla.video import VideoError, VideoWriter, decode_segment, probe_video

CODEBASE_VERSION = "v3.0"
CHUNKS_SIZE = 1000
# optional per-frame training targets from a simulator, never policy inputs:
#   observation.environment_state  the named object's and goal's xyz (LeRobot's key)
#   observation.pixel_keypoints    where each camera's frame shows them, names "<camera>.<point>.<x|y>",
#                                  x and y in [-1, 1] from the left / top edge to the right / bottom one
ENV_STATE = "observation.environment_state"
PIXEL_KEYPOINTS = "observation.pixel_keypoints"
DATA_PATH = "data/chunk-{chunk_index:03d}/file-{file_index:03d}.parquet"
VIDEO_PATH = "videos/{video_key}/chunk-{chunk_index:03d}/file-{file_index:03d}.mp4"
EPISODES_PATH = "meta/episodes/chunk-{chunk_index:03d}/file-{file_index:03d}.parquet"
INDEX_FEATURES = {
    "timestamp": {"dtype": "float32", "shape": [1], "names": None},
    "frame_index": {"dtype": "int64", "shape": [1], "names": None},
    "episode_index": {"dtype": "int64", "shape": [1], "names": None},
    "index": {"dtype": "int64", "shape": [1], "names": None},
    "task_index": {"dtype": "int64", "shape": [1], "names": None},
}
REQUIRED_INFO = ("codebase_version", "fps", "features", "total_episodes", "total_frames", "data_path")
CAMERA_DTYPES = ("video", "image")
ENCODERS = {"h264": "libx264", "hevc": "libx265", "av1": "libsvtav1"}  # info's video.codec -> FFmpeg encoder
REQUIRED_EPISODE_COLUMNS = ("episode_index", "length", "dataset_from_index", "dataset_to_index",
                            "data/chunk_index", "data/file_index")


class DatasetError(Exception):
    """A dataset on disk that cannot be read or appended to, with the file or field at fault."""


def _write_atomic(path: Path, write) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    write(tmp)
    os.replace(tmp, path)


def _write_json(path: Path, obj) -> None:
    _write_atomic(path, lambda p: p.write_text(json.dumps(obj, indent=2)))


def _chunk_file(file_index: int) -> dict:
    return {"chunk_index": file_index // CHUNKS_SIZE, "file_index": file_index % CHUNKS_SIZE}


def video_feature(height: int, width: int, fps: int, codec: str = "h264") -> dict:
    if codec not in ENCODERS:
        raise DatasetError(f"video codec {codec!r} is not one of {sorted(ENCODERS)}")
    return {"dtype": "video", "shape": [height, width, 3], "names": ["height", "width", "channels"],
            "info": {"video.height": height, "video.width": width, "video.codec": codec,
                     "video.pix_fmt": "yuv420p", "video.is_depth_map": False, "video.fps": fps,
                     "video.channels": 3, "has_audio": False}}


def image_feature(height: int, width: int) -> dict:
    """A camera stored as PNG bytes in the data parquet (LeRobot's dtype "image")."""
    return {"dtype": "image", "shape": [height, width, 3], "names": ["height", "width", "channels"]}


def _png(frame: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(np.ascontiguousarray(frame, dtype=np.uint8)).save(buf, format="PNG", compress_level=1)
    return buf.getvalue()


def _vector_stats(x: np.ndarray) -> dict:
    x = x.astype(np.float64)
    return {"min": x.min(0), "max": x.max(0), "mean": x.mean(0), "std": x.std(0),
            "count": np.array([len(x)]), "q01": np.quantile(x, 0.01, axis=0),
            "q99": np.quantile(x, 0.99, axis=0)}


def _image_stats(frames: np.ndarray) -> dict:
    """Per-channel stats of uint8 frames scaled to [0, 1], shaped (3, 1, 1) as LeRobot does."""
    x = frames.reshape(-1, 3).astype(np.float64) / 255.0
    s = {"min": x.min(0), "max": x.max(0), "mean": x.mean(0), "std": x.std(0)}
    s = {k: v.reshape(3, 1, 1) for k, v in s.items()}
    s["count"] = np.array([len(frames)])
    return s


def merge_stats(parts: list[dict]) -> dict:
    """min / max / mean / std / count of the union of parts (per-episode stats of any shape)."""
    counts = np.array([np.asarray(p["count"]).reshape(-1)[0] for p in parts], dtype=np.float64)
    means = np.stack([np.asarray(p["mean"], dtype=np.float64) for p in parts])
    w = (counts / counts.sum()).reshape((-1,) + (1,) * (means.ndim - 1))
    mean = (w * means).sum(0)
    var = (w * (np.stack([np.asarray(p["std"], dtype=np.float64) for p in parts]) ** 2 + (means - mean) ** 2)).sum(0)
    return {"min": np.min([p["min"] for p in parts], 0), "max": np.max([p["max"] for p in parts], 0),
            "mean": mean, "std": np.sqrt(var), "count": np.array([int(counts.sum())])}


def _tolist(d: dict) -> dict:
    return {k: np.asarray(v).tolist() for k, v in d.items()}


class DatasetWriter:
    """Writes episodes to a new dataset, or appends to an existing one with the same features.

    `features` holds the non-index features: "observation.state"/"action" as
    {"dtype": "float32", "shape": [n], "names": [...]} and cameras as `video_feature(...)` (mp4) or
    `image_feature(...)` (PNG in parquet). A data file holds `episodes_per_file` episodes; a video
    file `video_episodes_per_file` (default the same; fewer rolls video files over inside a data
    file, as LeRobot's separate size limits do). `extra_info`: more keys for meta/info.json (the
    ROS topic contract a recording followed).
    """

    def __init__(self, root: str | Path, fps: int, features: dict, robot_type: str | None = None,
                 episodes_per_file: int = 100, video_episodes_per_file: int | None = None,
                 extra_info: dict | None = None):
        self.root = Path(root)
        self.fps = fps
        self.features = {**features, **INDEX_FEATURES}
        self.video_keys = [k for k, f in features.items() if f["dtype"] == "video"]
        self.image_keys = [k for k, f in features.items() if f["dtype"] == "image"]
        self.vector_keys = [k for k, f in features.items() if f["dtype"] not in CAMERA_DTYPES]
        self.episodes_per_file = episodes_per_file
        self.video_episodes_per_file = video_episodes_per_file or episodes_per_file
        self.pending: list[dict] = []
        info_path = self.root / "meta" / "info.json"
        if info_path.exists():
            meta = DatasetMeta(self.root)
            if meta.info["features"] != json.loads(json.dumps(self.features)):
                raise DatasetError(
                    f"refusing to append to {self.root}: its meta/info.json features differ from this "
                    f"run's (existing: {sorted(meta.info['features'])}, shapes "
                    f"{ {k: v['shape'] for k, v in meta.info['features'].items()} }); "
                    "use another --out directory")
            if meta.info["fps"] != fps:
                raise DatasetError(f"refusing to append to {self.root}: fps {meta.info['fps']} != {fps}")
            for key, value in (extra_info or {}).items():
                if meta.info.get(key) != json.loads(json.dumps(value)):
                    raise DatasetError(f"refusing to append to {self.root}: its meta/info.json {key} differs "
                                       "from this run's; use another --out directory")
            self.info = meta.info
            self.tasks = dict(meta.task_to_index)
            self.episodes = meta.episodes  # committed episode rows (list of dicts)
        elif self.root.exists() and any(self.root.iterdir()):
            raise DatasetError(f"refusing to write into {self.root}: not empty and not a dataset "
                               "(no meta/info.json)")
        else:
            self.info = {
                "codebase_version": CODEBASE_VERSION, "robot_type": robot_type, "total_episodes": 0,
                "total_frames": 0, "total_tasks": 0, "chunks_size": CHUNKS_SIZE,
                "data_files_size_in_mb": 100, "video_files_size_in_mb": 500, "fps": fps,
                "splits": {"train": "0:0"}, "data_path": DATA_PATH,
                "video_path": VIDEO_PATH if self.video_keys else None, "features": self.features,
                **(extra_info or {}),
            }
            self.tasks = {}
            self.episodes = []

    @property
    def num_episodes(self) -> int:
        return len(self.episodes) + len(self.pending)

    def add_episode(self, frames: dict[str, np.ndarray], task: str, extra: dict | None = None) -> None:
        """frames: feature key -> array with one row per frame (images T x H x W x 3 uint8)."""
        keys = self.video_keys + self.image_keys + self.vector_keys
        lengths = {k: len(frames[k]) for k in keys}
        if len(set(lengths.values())) != 1 or 0 in lengths.values():
            raise DatasetError(f"episode arrays must share one non-zero length, got {lengths}")
        for k in keys:
            want = tuple(self.features[k]["shape"])
            if frames[k].shape[1:] != want:
                raise DatasetError(f"feature {k!r}: frame shape {frames[k].shape[1:]} != {want}")
        self.pending.append({"frames": frames, "task": task, "extra": extra or {}})
        if len(self.pending) >= self.episodes_per_file:
            self.flush()

    def flush(self) -> None:
        if not self.pending:
            return
        file_index = max((e["data/file_index"] + CHUNKS_SIZE * e["data/chunk_index"]
                          for e in self.episodes), default=-1) + 1
        cf = _chunk_file(file_index)
        start_index = self.info["total_frames"]
        ep_index = self.info["total_episodes"]
        columns = defaultdict(list)
        rows = []
        video_index = {k: max((e[f"videos/{k}/file_index"] + CHUNKS_SIZE * e[f"videos/{k}/chunk_index"]
                               for e in self.episodes), default=-1) for k in self.video_keys}
        writers: dict[str, VideoWriter] = {}  # camera -> its open video file
        where: dict[str, dict] = {}  # camera -> that file's chunk and file index
        done: list[tuple[VideoWriter, Path]] = []
        global_index = start_index
        for n_ep, ep in enumerate(self.pending):
            if n_ep % self.video_episodes_per_file == 0:  # the next video file of every camera
                for k in self.video_keys:
                    if k in writers:
                        done.append((writers[k], self.root / VIDEO_PATH.format(video_key=k, **where[k])))
                    video_index[k] += 1
                    where[k] = _chunk_file(video_index[k])
                    feature = self.features[k]
                    codec = ENCODERS[feature.get("info", {}).get("video.codec", "h264")]
                    writers[k] = VideoWriter(self._tmp(VIDEO_PATH.format(video_key=k, **where[k])), self.fps,
                                             *feature["shape"][:2], codec=codec)
            frames, n = ep["frames"], len(ep["frames"][self.vector_keys[0]])
            task_index = self.tasks.setdefault(ep["task"], len(self.tasks))
            row = {"episode_index": ep_index, "tasks": [ep["task"]], "length": n,
                   "data/chunk_index": cf["chunk_index"], "data/file_index": cf["file_index"],
                   "dataset_from_index": global_index, "dataset_to_index": global_index + n}
            for k, w in writers.items():
                from_ts = w.frames / self.fps
                for f in frames[k]:
                    w.write(f)
                row[f"videos/{k}/chunk_index"] = where[k]["chunk_index"]
                row[f"videos/{k}/file_index"] = where[k]["file_index"]
                row[f"videos/{k}/from_timestamp"] = from_ts
                row[f"videos/{k}/to_timestamp"] = w.frames / self.fps
                for s, v in _image_stats(frames[k]).items():
                    row[f"stats/{k}/{s}"] = v.tolist()
            for k in self.image_keys:
                columns[k].extend({"bytes": _png(f), "path": None} for f in frames[k])
                for s, v in _image_stats(frames[k]).items():
                    row[f"stats/{k}/{s}"] = v.tolist()
            for k in self.vector_keys:
                columns[k].extend(np.asarray(frames[k], dtype=np.float32))
                for s, v in _vector_stats(np.asarray(frames[k])).items():
                    row[f"stats/{k}/{s}"] = v.tolist()
            columns["timestamp"].extend(np.arange(n, dtype=np.float32) / self.fps)
            columns["frame_index"].extend(range(n))
            columns["episode_index"].extend([ep_index] * n)
            columns["index"].extend(range(global_index, global_index + n))
            columns["task_index"].extend([task_index] * n)
            row["meta/episodes/chunk_index"] = cf["chunk_index"]
            row["meta/episodes/file_index"] = cf["file_index"]
            row.update(ep["extra"])
            rows.append(row)
            ep_index += 1
            global_index += n
        done += [(w, self.root / VIDEO_PATH.format(video_key=k, **where[k])) for k, w in writers.items()]
        for w, final in done:
            w.close()
            os.replace(w.path, final)

        arrays = {}
        for k in self.vector_keys:
            dim = self.features[k]["shape"][0]
            flat = pa.array(np.stack(columns[k]).reshape(-1), type=pa.float32())
            arrays[k] = pa.FixedSizeListArray.from_arrays(flat, dim)
        for k in self.image_keys:  # HF datasets' Image feature: {bytes, path}
            arrays[k] = pa.array(columns[k], type=pa.struct([("bytes", pa.binary()), ("path", pa.string())]))
        arrays["timestamp"] = pa.array(columns["timestamp"], type=pa.float32())
        for k in ("frame_index", "episode_index", "index", "task_index"):
            arrays[k] = pa.array(columns[k], type=pa.int64())
        data_path = self.root / DATA_PATH.format(**cf)
        _write_atomic(data_path, lambda p: pq.write_table(pa.table(arrays), p))
        _write_atomic(self.root / EPISODES_PATH.format(**cf),
                      lambda p: pd.DataFrame(rows).to_parquet(p, index=False))

        self.episodes.extend(rows)
        self.pending = []
        self._commit_meta()

    def _tmp(self, rel: str) -> Path:
        p = self.root / rel
        p.parent.mkdir(parents=True, exist_ok=True)
        return p.with_name(f".{p.name}.tmp.mp4")

    def _commit_meta(self) -> None:
        tasks = pd.DataFrame({"task_index": list(self.tasks.values())},
                             index=pd.Index(list(self.tasks), name="task"))
        _write_atomic(self.root / "meta" / "tasks.parquet", lambda p: tasks.to_parquet(p))
        _write_json(self.root / "meta" / "stats.json", self._stats())
        total_frames = sum(e["length"] for e in self.episodes)
        self.info.update(total_episodes=len(self.episodes), total_frames=total_frames,
                         total_tasks=len(self.tasks), splits={"train": f"0:{len(self.episodes)}"})
        _write_json(self.root / "meta" / "info.json", self.info)

    def _stats(self) -> dict:
        """Vector stats exactly, over every committed data file; image stats merged per episode."""
        files = sorted({DATA_PATH.format(chunk_index=e["data/chunk_index"], file_index=e["data/file_index"])
                        for e in self.episodes})
        table = pa.concat_tables([pq.read_table(self.root / f, columns=self.vector_keys + list(INDEX_FEATURES))
                                  for f in files])
        stats = {}
        for k in self.vector_keys:
            stats[k] = _tolist(_vector_stats(np.stack(table[k].to_numpy(zero_copy_only=False))))
        for k in INDEX_FEATURES:
            s = _vector_stats(table[k].to_numpy().reshape(-1, 1))
            stats[k] = _tolist({n: v for n, v in s.items() if n in ("min", "max", "mean", "std", "count")})
        for k in self.video_keys + self.image_keys:
            parts = [{s: np.asarray(e[f"stats/{k}/{s}"]) for s in ("min", "max", "mean", "std", "count")}
                     for e in self.episodes]
            stats[k] = _tolist(merge_stats(parts))
        return stats

    def close(self) -> None:
        self.flush()


class DatasetMeta:
    """meta/ of a dataset, validated: info, tasks, stats and the episode rows info.json counts, with
    each episode's data file and per camera its video file and start time. v3.x as written; v2.0 /
    v2.1 (a file per episode, jsonl metadata) mapped onto the same rows."""

    def __init__(self, root: str | Path):
        self.root = Path(root)
        info_path = self.root / "meta" / "info.json"
        if not info_path.is_file():
            raise DatasetError(f"not a LeRobot dataset: {info_path} is missing")
        try:
            self.info = json.loads(info_path.read_text())
        except json.JSONDecodeError as e:
            raise DatasetError(f"{info_path}: invalid JSON ({e})") from e
        missing = [k for k in REQUIRED_INFO if k not in self.info]
        if missing:
            raise DatasetError(f"{info_path}: missing field(s) {missing}")
        version = str(self.info["codebase_version"])
        if not (version.startswith("v3") or version in ("v2.0", "v2.1")):
            raise DatasetError(f"{info_path}: codebase_version {version!r} is not v3.x, v2.1 or v2.0")
        self.v2 = version.startswith("v2")
        self.fps = self.info["fps"]
        self.features = self.info["features"]
        self.video_keys = [k for k, f in self.features.items() if f.get("dtype") == "video"]
        self.camera_keys = [k for k, f in self.features.items() if f.get("dtype") in CAMERA_DTYPES]
        if self.video_keys and not self.info.get("video_path"):
            raise DatasetError(f"{info_path}: video features {self.video_keys} but no video_path")
        self.task_to_index = self._read_v2_tasks() if self.v2 else self._read_tasks()
        self.tasks = {i: t for t, i in self.task_to_index.items()}
        rows = self._read_v2_episodes() if self.v2 else self._read_episodes()
        # rows past info.json's total belong to an interrupted write that was never committed
        self.episodes = sorted((r for r in rows if r["episode_index"] < self.info["total_episodes"]),
                               key=lambda r: r["episode_index"])
        if len(self.episodes) != self.info["total_episodes"]:
            raise DatasetError(f"{info_path}: total_episodes={self.info['total_episodes']} but "
                               f"meta/episodes holds {len(self.episodes)} of them")

    def _read_tasks(self) -> dict[str, int]:
        tasks_path = self.root / "meta" / "tasks.parquet"
        tasks = _read_parquet(tasks_path)
        if "task_index" not in tasks.column_names:
            raise DatasetError(f"{tasks_path}: no 'task_index' column")
        text_col = next((c for c in ("task", "__index_level_0__") if c in tasks.column_names), None)
        if text_col is None:
            raise DatasetError(f"{tasks_path}: no task text column ('task' index)")
        return dict(zip(tasks[text_col].to_pylist(), tasks["task_index"].to_pylist()))

    def _read_episodes(self) -> list[dict]:
        ep_files = sorted((self.root / "meta" / "episodes").glob("chunk-*/file-*.parquet"))
        if not ep_files:
            raise DatasetError(f"{self.root / 'meta' / 'episodes'}: no episode metadata files")
        rows = []
        for f in ep_files:
            t = _read_parquet(f)
            missing = [c for c in REQUIRED_EPISODE_COLUMNS if c not in t.column_names]
            missing += [c for k in self.video_keys for c in (f"videos/{k}/chunk_index", f"videos/{k}/file_index",
                        f"videos/{k}/from_timestamp", f"videos/{k}/to_timestamp") if c not in t.column_names]
            if missing:
                raise DatasetError(f"{f}: missing column(s) {missing}")
            rows.extend(t.to_pylist())
        return rows

    def _jsonl(self, name: str) -> list[dict]:
        path = self.root / "meta" / name
        if not path.is_file():
            raise DatasetError(f"file missing: {path}")
        try:
            return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
        except json.JSONDecodeError as e:
            raise DatasetError(f"{path}: invalid JSON line ({e})") from e

    def _read_v2_tasks(self) -> dict[str, int]:
        return {r["task"]: r["task_index"] for r in self._jsonl("tasks.jsonl")}

    def _read_v2_episodes(self) -> list[dict]:
        """v2: episode i lies in its own files; its rows follow the episodes before it in `index`."""
        chunks = int(self.info.get("chunks_size", CHUNKS_SIZE))
        rows, start = [], 0
        for r in sorted(self._jsonl("episodes.jsonl"), key=lambda r: r["episode_index"]):
            i, n = int(r["episode_index"]), int(r["length"])
            row = {**r, "dataset_from_index": start, "dataset_to_index": start + n,
                   "data/chunk_index": i // chunks, "data/file_index": i}
            for k in self.video_keys:
                row[f"videos/{k}/from_timestamp"], row[f"videos/{k}/to_timestamp"] = 0.0, n / self.fps
            rows.append(row)
            start += n
        return rows

    def data_file(self, e: dict) -> Path:
        if self.v2:
            return self.root / self.info["data_path"].format(episode_chunk=e["data/chunk_index"],
                                                            episode_index=e["episode_index"])
        return self.root / self.info["data_path"].format(chunk_index=e["data/chunk_index"],
                                                        file_index=e["data/file_index"])

    def video_file(self, e: dict, key: str) -> Path:
        if self.v2:
            return self.root / self.info["video_path"].format(episode_chunk=e["data/chunk_index"], video_key=key,
                                                             episode_index=e["episode_index"])
        return self.root / self.info["video_path"].format(video_key=key, chunk_index=e[f"videos/{key}/chunk_index"],
                                                         file_index=e[f"videos/{key}/file_index"])

    @property
    def stats(self) -> dict:
        """meta/stats.json; for v2.1, which keeps per-episode stats only, their union."""
        path = self.root / "meta" / "stats.json"
        if path.is_file():
            return json.loads(path.read_text())
        if not self.v2:
            raise DatasetError(f"file missing: {path}")
        per_episode = [r["stats"] for r in self._jsonl("episodes_stats.jsonl")]
        return {k: _tolist(merge_stats([s[k] for s in per_episode])) for k in per_episode[0]}


def _read_parquet(path: Path, columns: list[str] | None = None) -> pa.Table:
    if not path.is_file():
        raise DatasetError(f"file missing: {path}")
    try:
        if columns is None:
            return pq.read_table(path)
        present = set(pq.read_schema(path).names)
        return pq.read_table(path, columns=[c for c in columns if c in present])
    except (pa.ArrowException, OSError) as e:
        raise DatasetError(f"cannot read parquet {path}: {e}") from e


def _decode_image(cell: dict, root: Path) -> np.ndarray:
    """One HF datasets Image cell ({bytes, path}): embedded bytes, or a file under the dataset root."""
    data = cell.get("bytes") if isinstance(cell, dict) else None
    source = io.BytesIO(data) if data else root / str((cell or {}).get("path"))
    with Image.open(source) as im:
        return np.asarray(im.convert("RGB"))


class FrameCache:
    """Decoded frames per (camera, episode), least recently used first out, bounded in bytes."""

    def __init__(self, max_bytes: int):
        self.max_bytes, self.bytes = max_bytes, 0
        self.entries: OrderedDict[tuple, np.ndarray] = OrderedDict()
        self.hits = self.misses = 0

    def get(self, key: tuple, load) -> np.ndarray:
        if key in self.entries:
            self.hits += 1
            self.entries.move_to_end(key)
            return self.entries[key]
        self.misses += 1
        value = load()
        self.entries[key] = value
        self.bytes += value.nbytes
        while self.bytes > self.max_bytes and len(self.entries) > 1:
            _, old = self.entries.popitem(last=False)
            self.bytes -= old.nbytes
        return value


class LeRobotDataset:
    """Training samples from a LeRobot dataset (v3.x, or v2.0 / v2.1 read directly): images, state,
    instruction and the next `horizon` actions with a padding mask where the chunk runs past the
    episode's end.

    A sample is a dict: `observation.images.<cam>` (S x S x 3 uint8, or the camera's own size when
    `image_size` is None), `observation.state` (float32), `task` (str), `action` (horizon x A
    float32; past the end the last action repeats), `action_is_pad` (horizon bool),
    `episode_index`, `frame_index`, `index`. Camera frames are decoded on demand into a cache of
    `cache_mb` MB; `cache_frames` says how many frames (all cameras) it holds.
    """

    def __init__(self, root: str | Path, horizon: int = 16, cameras: list[str] | None = None,
                 episodes: list[int] | None = None, image_size: int | None = None, image_fit: str = "pad",
                 cache_mb: float = 4096, meta: DatasetMeta | None = None):
        """meta: the root's DatasetMeta where the caller has read it already."""
        self.meta = meta if meta is not None else DatasetMeta(root)
        self.root = self.meta.root
        self.horizon = horizon
        feats = self.meta.features
        for key in ("observation.state", "action"):
            if key not in feats:
                raise DatasetError(f"{self.root / 'meta/info.json'}: features lack {key!r}")
        self.camera_keys = self.meta.camera_keys if cameras is None else [f"observation.images.{c}" for c in cameras]
        for k in self.camera_keys:
            if k not in feats:
                raise DatasetError(f"{self.root / 'meta/info.json'}: no camera feature {k!r} "
                                   f"(has {self.meta.camera_keys})")
        self.image_size, self.image_fit = image_size, image_fit
        check_image_fit(image_fit)
        eps = self.meta.episodes if episodes is None else [self.meta.episodes[i] for i in episodes]
        self.episodes = eps

        # optional: privileged sim keypoints, a training target only (never a policy input)
        self.env_state_key = ENV_STATE if ENV_STATE in feats else None
        self.targets = [k for k in (ENV_STATE, PIXEL_KEYPOINTS) if k in feats]
        vector_keys = ["observation.state", "action"] + self.targets
        self._vectors_from_data(eps, vector_keys)
        self.state = self._vectors["observation.state"]
        self.action = self._vectors["action"]
        self.env_state = self._vectors.get(self.env_state_key)
        unknown = sorted(set(np.unique(self.task_index).tolist()) - set(self.meta.tasks))
        if unknown:
            raise DatasetError(f"{self.root}: data rows use task_index {unknown} that meta/tasks.parquet "
                               "does not define")
        self.frame_episode = np.repeat(np.arange(len(eps)), self.ep_end - self.ep_start)
        for k in self.camera_keys:
            if feats[k]["dtype"] == "video":
                self._check_videos(k)
        frame_bytes = sum(int(np.prod(self.frame_shape(k))) * 3 for k in self.camera_keys)
        longest = int((self.ep_end - self.ep_start).max())
        # the cache holds whole episodes: at least two of the longest, or a batch would thrash it
        self.cache = FrameCache(max(int(cache_mb * 2 ** 20), 2 * longest * frame_bytes))
        self.cache_frames = self.cache.max_bytes // max(1, frame_bytes)
        self._column: tuple | None = None  # (data file, camera key, its image column): the last one read

    def _vectors_from_data(self, eps: list[dict], vector_keys: list[str]) -> None:
        feats = self.meta.features
        index_keys = ["index", "episode_index", "frame_index", "task_index"]
        tables = {}
        for e in eps:
            path = self.meta.data_file(e)
            if path not in tables:
                t = _read_parquet(path, vector_keys + index_keys)
                for key in vector_keys + index_keys:
                    if key not in t.column_names:
                        raise DatasetError(f"{path}: column {key!r} declared in meta/info.json is missing")
                idx = t["index"].to_numpy()
                tables[path] = (t, {int(v): i for i, v in enumerate(idx)} if len(idx) else {})
        parts: dict[str, list] = {k: [] for k in vector_keys + index_keys[1:]}
        self.ep_start = np.zeros(len(eps), dtype=np.int64)
        self.ep_end = np.zeros(len(eps), dtype=np.int64)
        self.ep_row = np.zeros(len(eps), dtype=np.int64)  # the episode's first row in its data file
        offset = 0
        for j, e in enumerate(eps):
            path = self.meta.data_file(e)
            t, pos = tables[path]
            first = pos.get(int(e["dataset_from_index"]))
            n = int(e["length"])
            if first is None or first + n > t.num_rows:
                raise DatasetError(f"{path}: rows of episode {e['episode_index']} (index "
                                   f"{e['dataset_from_index']}..{e['dataset_to_index']}) are missing")
            sl = t.slice(first, n)
            for key in vector_keys:
                arr = np.stack(sl[key].to_numpy(zero_copy_only=False)).astype(np.float32)
                want = tuple(feats[key]["shape"])
                if arr.shape[1:] != want:
                    raise DatasetError(f"{path}: column {key!r} has shape {arr.shape[1:]} per frame but "
                                       f"meta/info.json features[{key!r}].shape is {list(want)}")
                parts[key].append(arr)
            for key in index_keys[1:]:
                parts[key].append(sl[key].to_numpy())
            self.ep_start[j], self.ep_end[j], self.ep_row[j] = offset, offset + n, first
            offset += n
        self._vectors = {k: np.concatenate(parts[k]) for k in vector_keys}
        self.task_index = np.concatenate(parts["task_index"])
        self.episode_index = np.concatenate(parts["episode_index"])
        self.frame_index = np.concatenate(parts["frame_index"])

    def _check_videos(self, key: str) -> None:
        """Every video file the episodes use exists, has a readable header, frames of the declared
        size and lasts as long as its episodes need (a truncated or missing file is named now, not
        in the middle of training)."""
        need: dict[Path, float] = {}
        for e in self.episodes:
            path = self.meta.video_file(e, key)
            need[path] = max(need.get(path, 0.0), float(e[f"videos/{key}/to_timestamp"]))
        want = tuple(self.meta.features[key]["shape"][:2])
        for path, until in need.items():
            try:
                h, w, duration = probe_video(path)
            except VideoError as err:
                raise DatasetError(str(err)) from err
            if (h, w) != want:
                raise DatasetError(f"{path}: frames are {h}x{w} but meta/info.json features[{key!r}].shape "
                                   f"is {list(self.meta.features[key]['shape'])}")
            if duration and duration + 1.5 / self.meta.fps < until:
                raise DatasetError(f"{path}: lasts {duration:.2f} s but its episodes need {until:.2f} s (truncated?)")

    def frame_shape(self, key: str) -> tuple[int, int]:
        """(H, W) of the frames this reader returns for a camera."""
        if self.image_size:
            return self.image_size, self.image_size
        return tuple(self.meta.features[key]["shape"][:2])

    def _decode_episode(self, key: str, j: int) -> np.ndarray:
        e = self.episodes[j]
        n = int(self.ep_end[j] - self.ep_start[j])
        if self.meta.features[key]["dtype"] == "video":
            path = self.meta.video_file(e, key)
            try:
                frames = decode_segment(path, float(e[f"videos/{key}/from_timestamp"]), n, self.meta.fps)
            except VideoError as err:
                raise DatasetError(str(err)) from err
        else:
            path = self.meta.data_file(e)
            if self._column is None or self._column[:2] != (path, key):
                self._column = (path, key, _read_parquet(path, [key])[key])
            cells = self._column[2].slice(int(self.ep_row[j]), n).to_pylist()
            try:
                frames = np.stack([_decode_image(c, self.root) for c in cells])
            except (OSError, ValueError) as err:
                raise DatasetError(f"{path}: column {key!r}, episode {e['episode_index']}: {err}") from err
        if frames.shape[1:] != tuple(self.meta.features[key]["shape"]):
            raise DatasetError(f"{path}: frames are {frames.shape[1:]} but meta/info.json "
                               f"features[{key!r}].shape is {list(self.meta.features[key]['shape'])}")
        return fit_frames(frames, self.image_size, self.image_fit) if self.image_size else frames

    def frames(self, key: str, indices) -> np.ndarray:
        """Camera `key`'s frames at sample indices, (n, H, W, 3) uint8."""
        idx = np.asarray(indices, dtype=np.int64)
        out = np.empty((len(idx), *self.frame_shape(key), 3), dtype=np.uint8)
        episodes = self.frame_episode[idx]
        for j in np.unique(episodes):
            rows = episodes == j
            frames = self.cache.get((key, int(j)), lambda: self._decode_episode(key, int(j)))
            out[rows] = frames[idx[rows] - self.ep_start[j]]
        return out

    def __len__(self) -> int:
        return len(self.state)

    def batch(self, indices) -> dict:
        """Samples for many frame indices at once, stacked (the training path)."""
        idx = np.asarray(indices, dtype=np.int64)
        end = self.ep_end[self.frame_episode[idx]]
        steps = idx[:, None] + np.arange(self.horizon)[None]
        out = {k: self.frames(k, idx) for k in self.camera_keys}
        out.update({
            "observation.state": self.state[idx],
            "action": self.action[np.minimum(steps, end[:, None] - 1)],
            "action_is_pad": steps >= end[:, None],
            "task_index": self.task_index[idx],
            "episode_index": self.episode_index[idx],
            "frame_index": self.frame_index[idx],
            "index": idx,
        })
        for k in self.targets:
            out[k] = self._vectors[k][idx]
        return out

    def __getitem__(self, i: int) -> dict:
        if not -len(self) <= i < len(self):
            raise IndexError(i)
        b = self.batch([i % len(self)])
        sample = {k: v[0] for k, v in b.items()}
        sample["task"] = self.meta.tasks[int(sample.pop("task_index"))]
        for k in ("episode_index", "frame_index", "index"):
            sample[k] = int(sample[k])
        return sample
