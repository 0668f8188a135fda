"""MetaWorld as a suite: its env in its own environment (mujoco 3.3.0) behind the env server, its
scripted experts into a LeRobot dataset, and `vla eval --suite metaworld` on a handful of seeds.
Skipped where `.venv-metaworld` is not made (`bash scripts/setup.sh --metaworld`; CI makes it)."""

import json
import subprocess
import textwrap

import numpy as np
import pytest

from vla.config import TrainConfig, VLAConfig
from vla.dataset import LeRobotDataset
from vla.jobs.collect import collect
from vla.jobs.evaluate import evaluate
from vla.jobs.suites import suite_tasks
from vla.jobs.train import train
from vla.serving.env_client import EnvServerError, RemoteEnv, suite_python
from vla.sim.metaworld_tasks import GROUPS, MT10, MT50

try:
    suite_python("metaworld")
    MISSING = ""
except EnvServerError as e:
    MISSING = str(e)
needs_metaworld = pytest.mark.skipif(bool(MISSING), reason=MISSING)
CAMERA = "observation.images.corner2"


def tiny_recipe(film: bool = False, **model) -> VLAConfig:
    """A 32-px nano model with 3 spatial maps, 2 trained on the pixel keypoints; `model` adds fields."""
    backbone = {"image_size": 32, "patch_size": 8, "vision_hidden": 32, "vision_layers": 1, "vision_heads": 2,
                "vision_mlp": 64, "text_hidden": 64, "text_layers": 1, "text_heads": 2, "text_kv_heads": 1,
                "text_mlp": 128, "max_text_tokens": 8, "film": film}
    return VLAConfig.from_dict({"horizon": 4, "n_action_steps": 2, "spatial_keypoints": 3, "pixel_keypoints": 2,
                                "backbone": backbone, "head": {"type": "l1", "hidden": 64, "layers": 1, "heads": 2,
                                                               "mlp": 128}, **model})


def test_task_sets_follow_lerobot_s_selection():
    assert len(MT10) == 10 and len(MT50) == 50 == len(set(MT50))
    assert {k: len(v) for k, v in GROUPS.items()} == {"easy": 28, "medium": 11, "hard": 6, "very_hard": 5}
    assert suite_tasks("metaworld", "MT10") == MT10
    assert suite_tasks("metaworld", "reach,drawer-close-v3,reach-v3") == ["reach-v3", "drawer-close-v3"]
    with pytest.raises(ValueError, match="unknown MetaWorld task 'fold-laundry'"):
        suite_tasks("metaworld", "fold-laundry")


@needs_metaworld
def test_the_env_is_seeded_by_the_episode_seed_and_its_expert_succeeds():
    env = RemoteEnv("metaworld", "reach-v3", image_size=64)
    try:
        assert env.cameras == ("corner2",) and env.max_episode_steps == 500 and env.action_space.shape == (4,)
        a, _ = env.reset(seed=3)
        b, _ = env.reset(seed=3)
        c, _ = env.reset(seed=4)
        assert a[CAMERA].shape == (64, 64, 3) and a[CAMERA].dtype == np.uint8 and a["observation.state"].shape == (4,)
        assert np.array_equal(a[CAMERA], b[CAMERA]) and not np.array_equal(a[CAMERA], c[CAMERA])  # the goal moved
        assert a["task"] == "reach the goal position"
        keypoints = a["observation.environment_state"]  # object xyz, goal xyz: a training target only
        assert keypoints.shape == (6,) and not np.allclose(keypoints[3:], c["observation.environment_state"][3:])
        env.reset(seed=3)
        for _ in range(env.max_episode_steps):
            obs, _, terminated, truncated, info = env.step(env.expert_action())
            if terminated or truncated:
                break
        assert info["success"] and terminated and env.steps < 200
        assert np.linalg.norm(obs["observation.state"][:3] - keypoints[3:]) < 0.05  # MetaWorld's reach threshold
        with pytest.raises(EnvServerError, match="action must be finite with shape"):
            env.step(np.array([np.nan, 0, 0, 0], np.float32))
        env.step(np.zeros(4, np.float32))  # the server goes on after a refused request
    finally:
        env.close()
    assert env.process.poll() == 0


@needs_metaworld
def test_the_first_frame_draws_the_goal_where_the_episode_put_it():
    """MetaWorld moves the goal site after its reset's last forward pass: the first frame showed the
    goal where an earlier layout had it (reach, push, pick-place), and every later frame elsewhere."""
    script = textwrap.dedent("""
        import mujoco, numpy as np
        from vla.sim.metaworld_env import MetaWorldEnv
        for task in ("reach-v3", "push-v3", "pick-place-v3"):
            env = MetaWorldEnv(task, image_size=64)
            for seed in (3, 4):
                first = env.reset(seed=seed)[0]["observation.images.corner2"]
                assert np.allclose(env.env.data.site("goal").xpos, env.env._target_pos), (task, seed)
                mujoco.mj_forward(env.env.model, env.env.data)
                assert np.array_equal(first, env._obs()["observation.images.corner2"]), (task, seed)
            env.close()
        print("ok")
    """)
    run = subprocess.run([str(suite_python("metaworld")), "-c", script], capture_output=True, text=True, timeout=300)
    assert run.returncode == 0 and run.stdout.strip().endswith("ok"), run.stderr[-2000:]


@needs_metaworld
def test_pixel_keypoints_are_where_the_frame_draws_the_puck_and_the_goal():
    """observation.pixel_keypoints: between two layouts of push the frames differ at the puck and the
    goal dot, and the projected points sit at the centres of those changes (to 1.5 px at 96 px)."""
    script = textwrap.dedent("""
        import numpy as np
        from vla.sim.metaworld_env import MetaWorldEnv
        env = MetaWorldEnv("push-v3", image_size=96)
        a, b = (env.reset(seed=s)[0] for s in (3, 4))
        changed = np.abs(a["observation.images.corner2"].astype(int) - b["observation.images.corner2"]).sum(-1) > 40
        rows, cols = np.nonzero(changed)
        for obs in (a, b):
            for x, y in obs["observation.pixel_keypoints"].reshape(2, 2):
                px, py = (x + 1) / 2 * 96, (y + 1) / 2 * 96
                near = (np.abs(cols + 0.5 - px) <= 4) & (np.abs(rows + 0.5 - py) <= 4)
                assert near.sum() >= 2, (x, y)
                centre = np.array([cols[near].mean() + 0.5, rows[near].mean() + 0.5])
                assert np.abs(centre - [px, py]).max() < 1.5, (centre, px, py)
        env.close()
        print("ok")
    """)
    run = subprocess.run([str(suite_python("metaworld")), "-c", script], capture_output=True, text=True, timeout=300)
    assert run.returncode == 0 and run.stdout.strip().endswith("ok"), run.stderr[-2000:]


@needs_metaworld
def test_expert_demos_train_a_policy_that_vla_eval_runs_on_pinned_seeds(tmp_path):
    summary = collect(tmp_path / "mw", ["reach"], episodes=2, workers=1, image_size=32, suite="metaworld",
                      progress=False)
    assert summary["total_episodes"] == 2
    ds = LeRobotDataset(tmp_path / "mw")
    assert ds.camera_keys == [CAMERA] and ds.meta.fps == 80 and ds.state.shape[1] == 4 and ds.action.shape[1] == 4
    assert ds.meta.features["observation.environment_state"]["names"][3:] == ["goal.x", "goal.y", "goal.z"]
    assert ds.meta.features["observation.pixel_keypoints"]["names"] == ["corner2.object.x", "corner2.object.y",
                                                                        "corner2.goal.x", "corner2.goal.y"]
    assert [e["sim_seed"] for e in ds.meta.episodes] == [0, 1] and ds.meta.tasks == {0: "reach the goal position"}
    final = train(tiny_recipe(), TrainConfig(dataset=str(tmp_path / "mw"), output_dir=str(tmp_path / "run"),
                                             steps=2, batch_size=4, warmup_steps=1, save_every=100),
                  progress=False)
    result = evaluate(final, ["reach-v3"], episodes=2, workers=1, out=tmp_path / "eval", suite="metaworld",
                      videos=1, progress=False)
    assert result["suite"] == "metaworld" and result["seed_start"] == 1_000_000
    assert result["tasks"]["reach-v3"]["episodes"] == 2 and len(result["tasks"]["reach-v3"]["ci95"]) == 2
    saved = json.loads((tmp_path / "eval/results.json").read_text())
    assert saved["tasks"]["reach-v3"]["episodes"] == 2 and list((tmp_path / "eval/videos").glob("*.mp4"))


@needs_metaworld
def test_scene_only_collection_records_the_first_frame_and_trains_the_maps_keypoints(tmp_path):
    """`vla collect --suite metaworld --scenes-only`: one frame per seed, the same first frame and targets
    an expert episode from that seed records, and the data of train.keypoint_dataset."""
    collect(tmp_path / "scenes", ["reach"], episodes=2, workers=1, image_size=32, suite="metaworld", seed=7,
            scenes_only=True, progress=False)
    collect(tmp_path / "demos", ["reach"], episodes=1, workers=1, image_size=32, suite="metaworld", seed=7,
            progress=False)
    scenes, demos = LeRobotDataset(tmp_path / "scenes"), LeRobotDataset(tmp_path / "demos")
    assert len(scenes) == 2 and [e["sim_seed"] for e in scenes.meta.episodes] == [7, 8]
    assert all(e["sim_scene_only"] for e in scenes.meta.episodes)
    assert np.array_equal(scenes.env_state[0], demos.env_state[0])
    first, demo = scenes.batch(np.array([0])), demos.batch(np.array([0]))
    for key in ("observation.pixel_keypoints", "observation.state"):
        assert np.array_equal(first[key], demo[key]), key
    # each dataset's video encodes the frame on its own: the same picture up to the codec
    assert np.abs(first[CAMERA].astype(float) - demo[CAMERA].astype(float)).mean() < 0.02 * first[CAMERA].max()
    final = train(tiny_recipe(film=True, keypoints=6, keypoint_cond=True, keypoint_input="maps"),
                  TrainConfig(dataset=str(tmp_path / "demos"), output_dir=str(tmp_path / "run"), steps=2, batch_size=4,
                              warmup_steps=1, save_every=100, keypoint_dataset=str(tmp_path / "scenes"),
                              keypoint_batch=2), progress=False)
    assert (final / "model.safetensors").is_file()
