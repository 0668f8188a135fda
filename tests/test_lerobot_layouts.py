"""Any LeRobot dataset: the layouts LeRobot writes (several data and video files per chunk rolling
over at different episodes, HEVC / AV1 / h264 video, cameras stored as images in parquet, several
tasks, v2.1), a frame cache smaller than the dataset, and training on another robot's dataset with a
recipe that does not name the robot."""

import json
import shutil

import numpy as np
import pandas as pd
import pyarrow.parquet as pq
import pytest
import torch

from vla.config import TrainConfig, VLAConfig
from vla.dataset import DatasetError, DatasetWriter, LeRobotDataset, image_feature, video_feature
from vla.jobs.train import Trainer
from vla.policies import ObservationError, Policy
from vla.training import Batches
from vla.transforms import fit_frames
from vla.video import write_video

FPS = 30
TASKS = ["pick up the block", "open the gripper", "push the block left"]
TOP, GRIPPER = "observation.images.top", "observation.images.gripper"
# a recipe that describes the architecture and training only: cameras, frame size and dims come
# from the dataset
RECIPE = {
    "horizon": 4, "n_action_steps": 2,
    "backbone": {"image_size": 32, "patch_size": 8, "scale_factor": 2, "vision_hidden": 32, "vision_layers": 1,
                 "vision_heads": 2, "vision_mlp": 64, "text_hidden": 64, "text_layers": 2, "text_heads": 2,
                 "text_kv_heads": 1, "text_mlp": 128, "max_text_tokens": 8},
    "head": {"type": "l1", "hidden": 64, "layers": 1, "heads": 2, "mlp": 128},
}


def _frames(n: int, h: int, w: int, seed: int) -> np.ndarray:
    """Smooth moving patterns (what a codec keeps close), different per episode."""
    y, x = np.mgrid[0:h, 0:w]
    t = np.arange(n)[:, None, None, None]
    phase = np.array([0.0, 0.4, 0.8])[None, None, None] + seed  # mostly luma: yuv420p keeps it
    img = 128 + 90 * np.sin(x[None, ..., None] / 9.0 + y[None, ..., None] / 13.0 + t / 4.0 + phase)
    return img.astype(np.uint8)


def write_robot_dataset(root, episodes: int = 5, codec: str = "hevc", episodes_per_file: int = 2,
                        video_episodes_per_file: int = 1) -> list[dict]:
    """A 6-joint robot at 30 fps: a 48x64 'top' camera as video, a 40x40 'gripper' camera as PNG
    images in parquet, three tasks; data files of 2 episodes, video files of 1."""
    joints = [f"joint_{i}" for i in range(6)]
    feats = {TOP: video_feature(48, 64, FPS, codec), GRIPPER: image_feature(40, 40),
             "observation.state": {"dtype": "float32", "shape": [6], "names": joints},
             "action": {"dtype": "float32", "shape": [6], "names": joints}}
    writer = DatasetWriter(root, FPS, feats, robot_type="so100_like", episodes_per_file=episodes_per_file,
                           video_episodes_per_file=video_episodes_per_file)
    rng = np.random.default_rng(0)
    written = []
    for e in range(episodes):
        n = 10 + 2 * e
        state = np.cumsum(rng.normal(0, 0.05, (n, 6)), 0).astype(np.float32)
        ep = {TOP: _frames(n, 48, 64, e), GRIPPER: _frames(n, 40, 40, 10 + e),
              "observation.state": state, "action": np.roll(state, -1, 0)}
        writer.add_episode(ep, TASKS[e % 3])
        written.append(ep)
    writer.close()
    return written


@pytest.fixture(scope="module")
def robot(tmp_path_factory):
    root = tmp_path_factory.mktemp("robot") / "ds"
    return root, write_robot_dataset(root)


def test_multi_file_layout_with_video_and_parquet_images_reads_back(robot):
    root, written = robot
    ds = LeRobotDataset(root, horizon=4)
    assert ds.camera_keys == [TOP, GRIPPER] and len(ds.episodes) == 5 and len(set(ds.meta.tasks.values())) == 3
    data_files = {(e["data/chunk_index"], e["data/file_index"]) for e in ds.episodes}
    video_files = {e[f"videos/{TOP}/file_index"] for e in ds.episodes}
    assert len(data_files) == 3 and len(video_files) == 5  # video files roll over inside data files
    for j, ep in enumerate(written):
        idx = np.arange(ds.ep_start[j], ds.ep_end[j])
        assert np.array_equal(ds.state[idx], ep["observation.state"])
        assert np.array_equal(ds.frames(GRIPPER, idx), ep[GRIPPER])  # PNG: lossless
        err = np.abs(ds.frames(TOP, idx).astype(int) - ep[TOP].astype(int))
        assert err.mean() < 3.0, err.mean()  # HEVC, yuv420p
        assert ds[int(idx[0])]["task"] == TASKS[j % 3]


@pytest.mark.parametrize("codec", ["h264", "av1"])
def test_h264_and_av1_videos_read_back(tmp_path, codec):
    written = write_robot_dataset(tmp_path / codec, episodes=2, codec=codec)
    ds = LeRobotDataset(tmp_path / codec)
    assert ds.meta.features[TOP]["info"]["video.codec"] == codec
    last = np.arange(ds.ep_start[1], ds.ep_end[1])
    assert np.abs(ds.frames(TOP, last).astype(int) - written[1][TOP].astype(int)).mean() < 4.0


def write_v21(v3_root, out) -> None:
    """The same episodes in LeRobot's v2.1 layout: a parquet and an mp4 per episode, jsonl metadata,
    per-episode stats and no stats.json (as LeRobot 0.3 wrote them)."""
    ds = LeRobotDataset(v3_root)
    info = json.loads((v3_root / "meta/info.json").read_text())
    info.update(codebase_version="v2.1", data_path="data/chunk-{episode_chunk:03d}/episode_{episode_index:06d}.parquet",
                video_path="videos/chunk-{episode_chunk:03d}/{video_key}/episode_{episode_index:06d}.mp4",
                total_chunks=1, total_videos=len(ds.episodes))
    (out / "meta").mkdir(parents=True)
    (out / "meta/info.json").write_text(json.dumps(info))
    (out / "meta/tasks.jsonl").write_text("".join(json.dumps({"task_index": i, "task": t}) + "\n"
                                                  for i, t in ds.meta.tasks.items()))
    episodes, stats = [], []
    for j, e in enumerate(ds.episodes):
        i = e["episode_index"]
        rows = pq.read_table(ds.meta.data_file(e)).slice(int(ds.ep_row[j]), int(e["length"]))
        path = out / f"data/chunk-000/episode_{i:06d}.parquet"
        path.parent.mkdir(parents=True, exist_ok=True)
        pq.write_table(rows, path)
        video = out / f"videos/chunk-000/{TOP}/episode_{i:06d}.mp4"
        video.parent.mkdir(parents=True, exist_ok=True)
        write_video(video, ds.frames(TOP, np.arange(ds.ep_start[j], ds.ep_end[j])), FPS)
        episodes.append({"episode_index": i, "tasks": e["tasks"], "length": e["length"]})
        stats.append({"episode_index": i, "stats": {k: {s: e[f"stats/{k}/{s}"] for s in ("min", "max", "mean", "std", "count")}
                                                     for k in ("observation.state", "action")}})
    (out / "meta/episodes.jsonl").write_text("".join(json.dumps(r) + "\n" for r in episodes))
    (out / "meta/episodes_stats.jsonl").write_text("".join(json.dumps(r) + "\n" for r in stats))


def test_a_v21_dataset_is_read_directly_and_equals_its_v3_twin(robot, tmp_path):
    root, _ = robot
    write_v21(root, tmp_path / "v21")
    old, new = LeRobotDataset(tmp_path / "v21"), LeRobotDataset(root)
    assert old.meta.v2 and len(old) == len(new) and old.meta.tasks == new.meta.tasks
    assert np.array_equal(old.state, new.state) and np.array_equal(old.task_index, new.task_index)
    idx = np.arange(len(new))
    assert np.array_equal(old.frames(GRIPPER, idx), new.frames(GRIPPER, idx))
    assert np.abs(old.frames(TOP, idx).astype(int) - new.frames(TOP, idx).astype(int)).mean() < 3.0
    s_old, s_new = old.meta.stats["observation.state"], new.meta.stats["observation.state"]
    assert np.allclose(s_old["mean"], s_new["mean"], atol=1e-5) and np.allclose(s_old["std"], s_new["std"], atol=1e-4)


def test_a_cache_smaller_than_the_dataset_stays_bounded_and_reads_each_episode_once_per_epoch(robot):
    root, _ = robot
    whole = LeRobotDataset(root, image_size=32)
    small = LeRobotDataset(root, image_size=32, cache_mb=0.3)  # 51 of the 70 frames (both cameras)
    assert small.cache_frames < len(small) <= whole.cache_frames
    window = small.cache_frames // 2
    batches = Batches(len(small), 4, seed=0, episode_of=small.frame_episode, window=window)
    seen = []
    largest = 0
    while batches.epoch == 0:
        idx = batches.next()
        if batches.epoch:
            break
        b = small.batch(idx)
        largest = max([largest] + [v.nbytes for v in small.cache.entries.values()])
        assert small.cache.bytes <= small.cache.max_bytes + largest
        assert np.array_equal(b[TOP], whole.batch(idx)[TOP])
        seen.extend(idx.tolist())
    assert len(seen) == len(set(seen)) and len(seen) >= len(small) - 4  # each sample once (the tail batch left)
    assert small.cache.misses == 2 * len(small.episodes)  # every episode decoded once per camera


def test_trains_on_another_robot_with_a_recipe_that_does_not_name_it(robot, tmp_path):
    root, written = robot
    cfg = TrainConfig(dataset=str(root), output_dir=str(tmp_path / "run"), steps=2, batch_size=4, warmup_steps=1,
                      save_every=100, log_every=1, augment=False)
    trainer = Trainer(VLAConfig.from_dict(RECIPE), cfg, progress=False)
    m = trainer.model_cfg
    assert (m.cameras, m.state_dim, m.action_dim) == (("top", "gripper"), 6, 6)
    assert m.image_size == 32  # cameras of two sizes: the backbone's input size
    final = trainer.run()
    spec = json.loads((final / "spec.json").read_text())
    assert spec["frame_shapes"] == {"top": [48, 64], "gripper": [40, 40]} and spec["image_fit"] == "pad"
    assert spec["fps"] == FPS and spec["state_names"] == [f"joint_{i}" for i in range(6)]

    policy = Policy.from_pretrained(final)
    obs = {TOP: written[0][TOP][0], GRIPPER: written[0][GRIPPER][0], "observation.state": written[0]["observation.state"][0],
           "task": TASKS[0]}
    assert policy.act_chunk(obs).shape == (4, 6)
    # a live frame reaches the model as the same frame did in training
    native = LeRobotDataset(root).frames(TOP, [0])  # 48x64, as the camera delivers it
    images, _ = policy.prepare({**obs, TOP: native[0]})
    batch = trainer.make_batch(np.array([0]))
    assert torch.equal(images[0, 1], batch["images"][0, 1])  # gripper (lossless storage)
    top = torch.from_numpy(fit_frames(native, 32, "pad")).permute(0, 3, 1, 2) / 255
    assert torch.equal(images[0, 0], top[0]) and torch.equal(batch["images"][0, 0], top[0])
    with pytest.raises(ObservationError, match="must be uint8 32x32x3 or 48x64x3"):
        policy.act_chunk({**obs, TOP: np.zeros((50, 50, 3), np.uint8)})


@pytest.mark.parametrize("recipe, match", [
    ({"cameras": ["front", "top"]}, r"model.cameras \['front', 'top'\] are not all cameras of the dataset, which has \['top', 'gripper'\]"),
    ({"state_dim": 7}, r"model.state_dim=7 but .* gives observation.state 6 channels"),
    ({"image_fit": "stretch"}, r"image_fit must be pad, crop or resize"),
])
def test_a_recipe_that_contradicts_the_dataset_gets_one_clear_error(robot, tmp_path, recipe, match):
    root, _ = robot
    cfg = TrainConfig(dataset=str(root), output_dir=str(tmp_path / "run"), steps=1, batch_size=2)
    with pytest.raises((DatasetError, ValueError), match=match):
        Trainer(VLAConfig.from_dict({**RECIPE, **recipe}), cfg, progress=False)
    assert not (tmp_path / "run").exists()


def test_fit_frames_pads_crops_and_resizes_to_the_model_square():
    frames = np.full((1, 48, 64, 3), 200, np.uint8)
    padded = fit_frames(frames, 32, "pad")
    assert padded.shape == (1, 32, 32, 3) and padded[0, 0, 0, 0] == 0 and padded[0, 16, 16, 0] == 200  # bars top/bottom
    assert (padded[0, :, :, 0] == 200).sum() == 24 * 32
    assert (fit_frames(frames, 32, "crop") == 200).all() and (fit_frames(frames, 32, "resize") == 200).all()
    assert fit_frames(frames[:, :32, :32], 32, "pad") is not None
    same = np.zeros((2, 32, 32, 3), np.uint8)
    assert fit_frames(same, 32) is same
    with pytest.raises(ValueError, match="image_fit"):
        fit_frames(frames, 32, "stretch")


def test_a_missing_parquet_image_column_or_bad_png_is_named(robot, tmp_path):
    root, _ = robot
    copy = tmp_path / "copy"
    shutil.copytree(root, copy)
    path = copy / "data/chunk-000/file-000.parquet"
    t = pq.read_table(path)
    cells = t[GRIPPER].to_pylist()
    cells[0] = {"bytes": b"not a png", "path": None}
    df = t.to_pandas()
    df[GRIPPER] = cells
    pd.DataFrame(df).to_parquet(path, index=False)
    ds = LeRobotDataset(copy)
    with pytest.raises(DatasetError, match=rf"file-000.parquet: column '{GRIPPER}', episode 0"):
        ds.frames(GRIPPER, [0])
