"""LeRobotDataset v3: collect -> read round trip, LeRobot's field names, resume, and bad input."""

import hashlib
import json
import shutil
import subprocess
import sys

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from vla.dataset import DatasetError, DatasetWriter, LeRobotDataset
from vla.jobs.collect import _rollout, collect, dataset_features

SIZE = 48
TASKS = ["pick_cube", "press_button"]


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    root = tmp_path_factory.mktemp("ds") / "demo"
    summary = collect(root, TASKS, episodes=2, workers=1, image_size=SIZE, seed=10, progress=False)
    assert summary["total_episodes"] == 4
    return root


def _copy(dataset, tmp_path):
    dst = tmp_path / "copy"
    shutil.copytree(dataset, dst)
    return dst


def _digest(root):
    return {p.relative_to(root).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*")) if p.is_file()}


def test_round_trip_equals_the_rollout(dataset):
    ds = LeRobotDataset(dataset, horizon=8)
    assert len(ds.episodes) == 4
    for j, ep in enumerate(ds.meta.episodes):
        task, seed, variant, (arrays, instruction) = _rollout(
            (ep["sim_task"], ep["sim_seed"], ep["sim_variant"], SIZE, ("front", "wrist"), False, "tabletop"))
        sl = slice(ds.ep_start[j], ds.ep_end[j])
        assert ep["tasks"] == [instruction]
        assert np.array_equal(ds.state[sl], arrays["observation.state"])
        assert np.array_equal(ds.action[sl], arrays["action"])
        assert np.array_equal(ds.env_state[sl], arrays["observation.environment_state"])
        for cam in ("front", "wrist"):
            key = f"observation.images.{cam}"
            err = np.abs(ds.frames(key, np.arange(sl.start, sl.stop)).astype(int) - arrays[key].astype(int))
            assert err.mean() < 4.0, (key, err.mean())  # h264 / yuv420p tolerance
            assert np.percentile(err, 95) < 20


def test_samples_have_action_chunks_with_end_padding(dataset):
    ds = LeRobotDataset(dataset, horizon=8)
    end = int(ds.ep_end[0])
    s = ds[end - 3]
    assert s["action"].shape == (8, 7) and s["action_is_pad"].tolist() == [False] * 3 + [True] * 5
    assert np.array_equal(s["action"][:3], ds.action[end - 3:end])
    assert np.array_equal(s["action"][3:], np.repeat(ds.action[end - 1][None], 5, 0))
    first = ds[0]
    assert not first["action_is_pad"].any() and first["frame_index"] == 0
    assert first["task"] == ds.meta.episodes[0]["tasks"][0]
    assert first["observation.images.front"].shape == (SIZE, SIZE, 3)


def test_metadata_uses_lerobot_v3_names(dataset):
    info = json.loads((dataset / "meta/info.json").read_text())
    assert info["codebase_version"] == "v3.0"
    for key in ("robot_type", "total_episodes", "total_frames", "total_tasks", "chunks_size",
                "data_files_size_in_mb", "video_files_size_in_mb", "fps", "splits", "data_path",
                "video_path", "features"):
        assert key in info, key
    assert info["data_path"] == "data/chunk-{chunk_index:03d}/file-{file_index:03d}.parquet"
    assert info["video_path"] == "videos/{video_key}/chunk-{chunk_index:03d}/file-{file_index:03d}.mp4"
    assert info["total_episodes"] == 4 and info["splits"] == {"train": "0:4"}
    feats = info["features"]
    for key in ("timestamp", "frame_index", "episode_index", "index", "task_index"):
        assert feats[key]["shape"] == [1]
    front = feats["observation.images.front"]
    assert front["dtype"] == "video" and front["shape"] == [SIZE, SIZE, 3]
    assert front["names"] == ["height", "width", "channels"] and front["info"]["video.fps"] == 10
    assert (dataset / "videos/observation.images.front/chunk-000/file-000.mp4").is_file()

    tasks = pd.read_parquet(dataset / "meta/tasks.parquet")
    assert tasks.index.name == "task" and list(tasks.columns) == ["task_index"]
    eps = pd.read_parquet(dataset / "meta/episodes/chunk-000/file-000.parquet")
    for col in ("episode_index", "tasks", "length", "dataset_from_index", "dataset_to_index",
                "data/chunk_index", "data/file_index", "meta/episodes/chunk_index", "meta/episodes/file_index",
                "videos/observation.images.front/from_timestamp", "videos/observation.images.front/to_timestamp",
                "stats/observation.state/mean", "stats/action/std"):
        assert col in eps.columns, col
    assert (eps["dataset_to_index"] - eps["dataset_from_index"] == eps["length"]).all()
    data = pq.read_table(dataset / "data/chunk-000/file-000.parquet")
    assert {"observation.state", "action", "timestamp", "frame_index", "episode_index", "index",
            "task_index"} <= set(data.column_names)
    stats = json.loads((dataset / "meta/stats.json").read_text())
    state = np.stack(data["observation.state"].to_numpy(zero_copy_only=False))
    assert np.allclose(stats["observation.state"]["mean"], state.mean(0), atol=1e-5)
    assert stats["observation.state"]["count"] == [len(state)]
    assert np.array(stats["observation.images.front"]["mean"]).shape == (3, 1, 1)


def test_second_run_resumes_without_duplicates_or_rewrites(dataset, tmp_path):
    root = _copy(dataset, tmp_path)
    before = _digest(root)
    collect(root, TASKS, episodes=2, workers=1, image_size=SIZE, seed=10, progress=False)
    assert _digest(root) == before  # nothing missing: nothing written
    collect(root, TASKS, episodes=3, workers=1, image_size=SIZE, seed=10, progress=False)
    after = _digest(root)
    for path in ("data/chunk-000/file-000.parquet", "videos/observation.images.front/chunk-000/file-000.mp4"):
        assert after[path] == before[path]
    assert "data/chunk-000/file-001.parquet" in after
    ds = LeRobotDataset(root)
    pairs = [(e["sim_task"], e["sim_seed"]) for e in ds.meta.episodes]
    assert len(pairs) == 6 and len(set(pairs)) == 6
    assert [e["episode_index"] for e in ds.meta.episodes] == list(range(6))
    assert ds.meta.episodes[4]["dataset_from_index"] == ds.meta.episodes[3]["dataset_to_index"]


def test_interrupted_flush_leaves_a_readable_dataset(dataset, tmp_path, monkeypatch):
    """Fault injected on purpose: the meta commit of the second batch raises, as a crash would."""
    root = _copy(dataset, tmp_path)
    arrays, instruction = _rollout(("pick_cube", 50, -1, SIZE, ("front", "wrist"), False, "tabletop"))[3]
    writer = DatasetWriter(root, 10, dataset_features(SIZE))
    monkeypatch.setattr(DatasetWriter, "_commit_meta", lambda self: (_ for _ in ()).throw(OSError("disk died")))
    writer.add_episode(arrays, instruction)
    with pytest.raises(OSError):
        writer.flush()
    monkeypatch.undo()
    assert len(LeRobotDataset(root).meta.episodes) == 4  # the uncommitted batch is invisible
    writer = DatasetWriter(root, 10, dataset_features(SIZE))
    writer.add_episode(arrays, instruction)
    writer.close()
    assert len(LeRobotDataset(root).meta.episodes) == 5


def test_append_with_other_features_is_refused_and_writes_nothing(dataset, tmp_path):
    root = _copy(dataset, tmp_path)
    before = _digest(root)
    with pytest.raises(DatasetError, match="features differ"):
        collect(root, TASKS, episodes=3, workers=1, image_size=SIZE + 16, progress=False)
    assert _digest(root) == before
    other = tmp_path / "notes"
    other.mkdir()
    (other / "todo.txt").write_text("mine")
    with pytest.raises(DatasetError, match="not empty"):
        DatasetWriter(other, 10, dataset_features(SIZE))
    assert (other / "todo.txt").read_text() == "mine"


@pytest.mark.parametrize("damage, match", [
    (lambda r: (r / "data/chunk-000/file-000.parquet").unlink(), r"file missing: .*data/chunk-000/file-000.parquet"),
    (lambda r: _truncate(r / "data/chunk-000/file-000.parquet"), r"cannot read parquet .*file-000.parquet"),
    (lambda r: (r / "videos/observation.images.wrist/chunk-000/file-000.mp4").unlink(),
     r"video file missing: .*observation.images.wrist"),
    (lambda r: _truncate(r / "videos/observation.images.front/chunk-000/file-000.mp4"),
     r"observation.images.front/chunk-000/file-000.mp4"),
    (lambda r: _edit_info(r, lambda i: i["features"]["observation.state"].update(shape=[9])),
     r"features\['observation.state'\].shape"),
    (lambda r: _edit_info(r, lambda i: i["features"]["observation.images.front"].update(shape=[64, 64, 3])),
     r"features\['observation.images.front'\].shape"),
    (lambda r: _edit_info(r, lambda i: i.pop("fps")), r"missing field\(s\) \['fps'\]"),
    (lambda r: _edit_info(r, lambda i: i.update(codebase_version="v1.6")), r"not v3.x, v2.1 or v2.0"),
    (lambda r: _edit_info(r, lambda i: i.update(codebase_version="v2.1")), r"file missing: .*tasks.jsonl"),
    (lambda r: (r / "meta/info.json").write_text("{oops"), r"info.json: invalid JSON"),
    (lambda r: pd.DataFrame({"task_index": [0]}, index=pd.Index(["only one"], name="task"))
     .to_parquet(r / "meta/tasks.parquet"), r"data rows use task_index \[[1-9][0-9, ]*\] that meta/tasks.parquet does not define"),
])
def test_bad_dataset_gives_one_clear_error_naming_the_culprit(dataset, tmp_path, damage, match):
    root = _copy(dataset, tmp_path)
    damage(root)
    with pytest.raises(DatasetError, match=match):
        LeRobotDataset(root)


def _truncate(path):
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 3])


def _edit_info(root, edit):
    info = json.loads((root / "meta/info.json").read_text())
    edit(info)
    (root / "meta/info.json").write_text(json.dumps(info))


def test_reads_a_dataset_laid_out_the_way_lerobot_writes_it(dataset, tmp_path):
    """LeRobot writes vectors as variable-length lists (HF datasets), adds its own columns and
    writes tasks.parquet from a pandas frame; the reader must take that unchanged."""
    root = _copy(dataset, tmp_path)
    path = root / "data/chunk-000/file-000.parquet"
    t = pq.read_table(path)
    cols = {}
    for name in t.column_names:
        col = t[name]
        if pa.types.is_fixed_size_list(col.type):
            col = col.cast(pa.list_(pa.float32()))
        cols[name] = col
    cols["next.done"] = pa.array(np.zeros(t.num_rows, dtype=bool))
    pq.write_table(pa.table(cols).replace_schema_metadata({b"huggingface": b"{}"}), path)
    ds = LeRobotDataset(root)
    assert ds.state.shape[1] == 7 and len(ds) == t.num_rows


def test_collect_cli_rejects_an_unknown_task_id(tmp_path):
    out = tmp_path / "never"
    r = subprocess.run([sys.executable, "-m", "vla.cli", "collect", "--tasks", "pick_cube,fold_laundry",
                        "--episodes", "1", "--out", str(out)], capture_output=True, text=True)
    assert r.returncode == 2 and "unknown task 'fold_laundry'" in r.stderr
    assert not out.exists()


def test_variants_per_seed_gives_the_same_scene_under_different_instructions(tmp_path):
    root = tmp_path / "contrastive"
    collect(root, ["press_button"], episodes=3, workers=1, image_size=SIZE, seed=7, progress=False,
            variants_per_seed=3)
    ds = LeRobotDataset(root)
    eps = ds.meta.episodes
    assert [e["sim_seed"] for e in eps] == [7, 7, 7] and sorted(e["sim_variant"] for e in eps) == [0, 1, 2]
    assert len({e["tasks"][0] for e in eps}) == 3
    starts = [int(s) for s in ds.ep_start]
    front = ds.frames("observation.images.front", np.arange(len(ds))).astype(int)
    for i in starts[1:]:  # same layout: equal start state, first frames equal up to the video codec
        assert np.array_equal(ds.state[starts[0]], ds.state[i])
        assert np.abs(front[starts[0]] - front[i]).mean() < 3.0
    ends = [ds.action[int(e) - 1] for e in ds.ep_end]
    assert np.abs(ends[0][:6] - ends[1][:6]).max() > 0.05  # different targets, different motions
    collect(root, ["press_button"], episodes=3, workers=1, image_size=SIZE, seed=7, progress=False,
            variants_per_seed=3)
    assert len(LeRobotDataset(root).meta.episodes) == 3  # resume knows (seed, variant) pairs
