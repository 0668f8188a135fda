"""LeRobotDataset v3.0 on disk: a writer for collected episodes and a reader for training.

Layout (LeRobot's field names and path templates):
    meta/info.json                      features, fps, totals, path templates, codebase_version "v3.0"
    meta/stats.json                     min/max/mean/std/count (+ q01/q99 for vectors) per feature
    meta/tasks.parquet                  instruction (index "task") -> task_index
    meta/episodes/chunk-XXX/file-XXX.parquet   one row per episode: length, tasks, offsets, stats
    data/chunk-XXX/file-XXX.parquet     frame rows of many episodes
    videos/<camera key>/chunk-XXX/file-XXX.mp4 frames of many episodes per file

The writer commits in batches: a batch's data, videos and episode rows are written under new file
indices first and meta/info.json last (atomically), so a crash leaves at most files that info.json
does not count, which the next run overwrites. The reader decodes every video once into memory.
"""

from __future__ import annotations

import json
import os
from collections import defaultdict
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq

from vla.video import VideoError, VideoWriter, decode_video

CODEBASE_VERSION = "v3.0"
CHUNKS_SIZE = 1000
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


def video_feature(height: int, width: int, fps: int) -> dict:
    return {"dtype": "video", "shape": [height, width, 3], "names": ["height", "width", "channels"],
            "info": {"video.height": height, "video.width": width, "video.codec": "h264",
                     "video.pix_fmt": "yuv420p", "video.is_depth_map": False, "video.fps": fps,
                     "video.channels": 3, "has_audio": False}}


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


def _merge_image_stats(parts: list[dict]) -> dict:
    counts = np.array([p["count"][0] for p in parts], dtype=np.float64)
    means = np.stack([np.asarray(p["mean"]) for p in parts])
    w = (counts / counts.sum()).reshape(-1, 1, 1, 1)
    mean = (w * means).sum(0)
    var = (w * (np.stack([np.asarray(p["std"]) for p in parts]) ** 2 + (means - mean) ** 2)).sum(0)
    return {"min": np.min([p["min"] for p in parts], 0), "max": np.max([p["max"] for p in parts], 0),
            "mean": mean, "std": np.sqrt(var), "count": np.array([int(counts.sum())])}


def _tolist(d: dict) -> dict:
    return {k: np.asarray(v).tolist() for k, v in d.items()}


class DatasetWriter:
    """Writes episodes to a new dataset, or appends to an existing one with the same features.

    `features` holds the non-index features: "observation.state"/"action" as
    {"dtype": "float32", "shape": [n], "names": [...]} and cameras as `video_feature(...)`.
    """

    def __init__(self, root: str | Path, fps: int, features: dict, robot_type: str | None = None,
                 episodes_per_file: int = 100):
        self.root = Path(root)
        self.fps = fps
        self.features = {**features, **INDEX_FEATURES}
        self.video_keys = [k for k, f in features.items() if f["dtype"] == "video"]
        self.vector_keys = [k for k, f in features.items() if f["dtype"] != "video"]
        self.episodes_per_file = episodes_per_file
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
            }
            self.tasks = {}
            self.episodes = []

    @property
    def num_episodes(self) -> int:
        return len(self.episodes) + len(self.pending)

    def add_episode(self, frames: dict[str, np.ndarray], task: str, extra: dict | None = None) -> None:
        """frames: feature key -> array with one row per frame (images T x H x W x 3 uint8)."""
        lengths = {k: len(frames[k]) for k in self.video_keys + self.vector_keys}
        if len(set(lengths.values())) != 1 or 0 in lengths.values():
            raise DatasetError(f"episode arrays must share one non-zero length, got {lengths}")
        for k in self.video_keys + self.vector_keys:
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
        writers = {k: VideoWriter(self._tmp(VIDEO_PATH.format(video_key=k, **cf)), self.fps,
                                  *self.features[k]["shape"][:2]) for k in self.video_keys}
        global_index = start_index
        for ep in self.pending:
            frames, n = ep["frames"], len(ep["frames"][self.vector_keys[0]])
            task_index = self.tasks.setdefault(ep["task"], len(self.tasks))
            row = {"episode_index": ep_index, "tasks": [ep["task"]], "length": n,
                   "data/chunk_index": cf["chunk_index"], "data/file_index": cf["file_index"],
                   "dataset_from_index": global_index, "dataset_to_index": global_index + n}
            for k, w in writers.items():
                from_ts = w.frames / self.fps
                for f in frames[k]:
                    w.write(f)
                row[f"videos/{k}/chunk_index"] = cf["chunk_index"]
                row[f"videos/{k}/file_index"] = cf["file_index"]
                row[f"videos/{k}/from_timestamp"] = from_ts
                row[f"videos/{k}/to_timestamp"] = w.frames / self.fps
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
        for k, w in writers.items():
            w.close()
            os.replace(w.path, self.root / VIDEO_PATH.format(video_key=k, **cf))

        arrays = {}
        for k in self.vector_keys:
            dim = self.features[k]["shape"][0]
            flat = pa.array(np.stack(columns[k]).reshape(-1), type=pa.float32())
            arrays[k] = pa.FixedSizeListArray.from_arrays(flat, dim)
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
        table = pa.concat_tables([pq.read_table(self.root / f) for f in files])
        stats = {}
        for k in self.vector_keys:
            stats[k] = _tolist(_vector_stats(np.stack(table[k].to_numpy(zero_copy_only=False))))
        for k in INDEX_FEATURES:
            s = _vector_stats(table[k].to_numpy().reshape(-1, 1))
            stats[k] = _tolist({n: v for n, v in s.items() if n in ("min", "max", "mean", "std", "count")})
        for k in self.video_keys:
            parts = [{s: np.asarray(e[f"stats/{k}/{s}"]) for s in ("min", "max", "mean", "std", "count")}
                     for e in self.episodes]
            stats[k] = _tolist(_merge_image_stats(parts))
        return stats

    def close(self) -> None:
        self.flush()


class DatasetMeta:
    """meta/ of a v3 dataset, validated: info, tasks and the episode rows info.json counts."""

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
        if not str(self.info["codebase_version"]).startswith("v3"):
            raise DatasetError(f"{info_path}: codebase_version {self.info['codebase_version']!r} is not "
                               "v3.x (convert v2.1 datasets with LeRobot's converter first)")
        self.fps = self.info["fps"]
        self.features = self.info["features"]
        self.video_keys = [k for k, f in self.features.items() if f.get("dtype") == "video"]

        tasks_path = self.root / "meta" / "tasks.parquet"
        tasks = _read_parquet(tasks_path)
        if "task_index" not in tasks.column_names:
            raise DatasetError(f"{tasks_path}: no 'task_index' column")
        text_col = next((c for c in ("task", "__index_level_0__") if c in tasks.column_names), None)
        if text_col is None:
            raise DatasetError(f"{tasks_path}: no task text column ('task' index)")
        self.task_to_index = dict(zip(tasks[text_col].to_pylist(), tasks["task_index"].to_pylist()))
        self.tasks = {i: t for t, i in self.task_to_index.items()}

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
        # rows past info.json's total belong to an interrupted write that was never committed
        self.episodes = sorted((r for r in rows if r["episode_index"] < self.info["total_episodes"]),
                               key=lambda r: r["episode_index"])
        if len(self.episodes) != self.info["total_episodes"]:
            raise DatasetError(f"{info_path}: total_episodes={self.info['total_episodes']} but "
                               f"meta/episodes holds {len(self.episodes)} of them")


def _read_parquet(path: Path) -> pa.Table:
    if not path.is_file():
        raise DatasetError(f"file missing: {path}")
    try:
        return pq.read_table(path)
    except (pa.ArrowException, OSError) as e:
        raise DatasetError(f"cannot read parquet {path}: {e}") from e


class LeRobotDataset:
    """Training samples from a v3 dataset: images, state, instruction and the next `horizon`
    actions with a padding mask where the chunk runs past the episode's end.

    A sample is a dict: `observation.images.<cam>` (H x W x 3 uint8), `observation.state`
    (float32), `task` (str), `action` (horizon x A float32; past the end the last action repeats),
    `action_is_pad` (horizon bool), `episode_index`, `frame_index`, `index`.
    """

    def __init__(self, root: str | Path, horizon: int = 16, cameras: list[str] | None = None,
                 episodes: list[int] | None = None):
        self.meta = DatasetMeta(root)
        self.root = self.meta.root
        self.horizon = horizon
        feats = self.meta.features
        for key in ("observation.state", "action"):
            if key not in feats:
                raise DatasetError(f"{self.root / 'meta/info.json'}: features lack {key!r}")
        self.video_keys = self.meta.video_keys if cameras is None else [f"observation.images.{c}" for c in cameras]
        for k in self.video_keys:
            if k not in feats:
                raise DatasetError(f"{self.root / 'meta/info.json'}: no camera feature {k!r} "
                                   f"(has {self.meta.video_keys})")
        eps = self.meta.episodes if episodes is None else [self.meta.episodes[i] for i in episodes]
        self.episodes = eps

        # optional: privileged sim keypoints, a training target only (never a policy input)
        self.env_state_key = "observation.environment_state" if "observation.environment_state" in feats else None
        vector_keys = ["observation.state", "action"] + ([self.env_state_key] if self.env_state_key else [])
        data_files = sorted({(e["data/chunk_index"], e["data/file_index"]) for e in eps})
        tables = []
        for c, f in data_files:
            path = self.root / self.meta.info["data_path"].format(chunk_index=c, file_index=f)
            t = _read_parquet(path)
            for key in vector_keys + ["index", "episode_index", "frame_index", "task_index"]:
                if key not in t.column_names:
                    raise DatasetError(f"{path}: column {key!r} declared in meta/info.json is missing")
            tables.append((path, t))
        vector_parts: dict[str, list] = {k: [] for k in vector_keys}
        task_parts, ep_parts, frame_parts = [], [], []
        self.ep_start = np.zeros(len(eps), dtype=np.int64)
        self.ep_end = np.zeros(len(eps), dtype=np.int64)
        by_index = {}
        for path, t in tables:
            idx = t["index"].to_numpy()
            by_index[path] = (t, {int(v): i for i, v in enumerate(idx)} if len(idx) else {})
        offset = 0
        for j, e in enumerate(eps):
            path = self.root / self.meta.info["data_path"].format(chunk_index=e["data/chunk_index"],
                                                                  file_index=e["data/file_index"])
            t, pos = by_index[path]
            first = pos.get(int(e["dataset_from_index"]))
            n = int(e["length"])
            if first is None or first + n > t.num_rows:
                raise DatasetError(f"{path}: rows of episode {e['episode_index']} (index "
                                   f"{e['dataset_from_index']}..{e['dataset_to_index']}) are missing")
            sl = t.slice(first, n)
            for key, parts in vector_parts.items():
                arr = np.stack(sl[key].to_numpy(zero_copy_only=False)).astype(np.float32)
                want = tuple(feats[key]["shape"])
                if arr.shape[1:] != want:
                    raise DatasetError(f"{path}: column {key!r} has shape {arr.shape[1:]} per frame but "
                                       f"meta/info.json features[{key!r}].shape is {list(want)}")
                parts.append(arr)
            task_parts.append(sl["task_index"].to_numpy())
            ep_parts.append(sl["episode_index"].to_numpy())
            frame_parts.append(sl["frame_index"].to_numpy())
            self.ep_start[j], self.ep_end[j] = offset, offset + n
            offset += n
        self.state = np.concatenate(vector_parts["observation.state"])
        self.action = np.concatenate(vector_parts["action"])
        self.env_state = np.concatenate(vector_parts[self.env_state_key]) if self.env_state_key else None
        self.task_index = np.concatenate(task_parts)
        self.episode_index = np.concatenate(ep_parts)
        self.frame_index = np.concatenate(frame_parts)
        unknown = sorted(set(np.unique(self.task_index).tolist()) - set(self.meta.tasks))
        if unknown:
            raise DatasetError(f"{self.root}: data rows use task_index {unknown} that meta/tasks.parquet "
                               "does not define")
        self.frame_episode = np.repeat(np.arange(len(eps)), self.ep_end - self.ep_start)
        self.images = {k: self._decode(k) for k in self.video_keys}

    def _decode(self, key: str) -> np.ndarray:
        shape = tuple(self.meta.features[key]["shape"])
        out = np.empty((len(self.state), *shape), dtype=np.uint8)
        cache: dict[Path, np.ndarray] = {}
        fps = self.meta.fps
        for j, e in enumerate(self.episodes):
            path = self.root / self.meta.info["video_path"].format(
                video_key=key, chunk_index=e[f"videos/{key}/chunk_index"],
                file_index=e[f"videos/{key}/file_index"])
            if path not in cache:
                cache.clear()  # files are read in order; keep one decoded file at a time
                try:
                    cache[path] = decode_video(path)
                except VideoError as err:
                    raise DatasetError(str(err)) from err
                if cache[path].shape[1:] != shape:
                    raise DatasetError(f"{path}: frames are {cache[path].shape[1:]} but meta/info.json "
                                       f"features[{key!r}].shape is {list(shape)}")
            frames = cache[path]
            first = int(round(e[f"videos/{key}/from_timestamp"] * fps))
            n = int(self.ep_end[j] - self.ep_start[j])
            if first + n > len(frames):
                raise DatasetError(f"{path}: episode {e['episode_index']} needs frames {first}..{first + n} "
                                   f"but the file decodes to {len(frames)} (truncated?)")
            out[self.ep_start[j]:self.ep_end[j]] = frames[first:first + n]
        return out

    def __len__(self) -> int:
        return len(self.state)

    def batch(self, indices) -> dict:
        """Samples for many frame indices at once, stacked (the training path)."""
        idx = np.asarray(indices, dtype=np.int64)
        end = self.ep_end[self.frame_episode[idx]]
        steps = idx[:, None] + np.arange(self.horizon)[None]
        out = {k: self.images[k][idx] for k in self.video_keys}
        out.update({
            "observation.state": self.state[idx],
            "action": self.action[np.minimum(steps, end[:, None] - 1)],
            "action_is_pad": steps >= end[:, None],
            "task_index": self.task_index[idx],
            "episode_index": self.episode_index[idx],
            "frame_index": self.frame_index[idx],
            "index": idx,
        })
        if self.env_state is not None:
            out[self.env_state_key] = self.env_state[idx]
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
