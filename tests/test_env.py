"""The gymnasium environments: API contract, determinism, bad input, action modes."""

import warnings

import gymnasium as gym
import mujoco
import numpy as np
import pytest
from gymnasium.utils.env_checker import check_env

from vla.sim import TASKS, make_env
from vla.sim.camera import OFF_FRAME, project
from vla.sim.experts import ScriptedExpert

TASK_NAMES = list(TASKS)


@pytest.mark.parametrize("name", TASK_NAMES)
def test_check_env_passes(name):
    env = gym.make(TASKS[name].env_id, image_size=48)
    with warnings.catch_warnings():
        # our actions are physical joint targets, not a normalized [-1, 1] box, by design
        warnings.filterwarnings("ignore", message=".*symmetric and normalized space.*")
        check_env(env.unwrapped)
    assert env.spec.max_episode_steps == TASKS[name].max_steps


@pytest.mark.parametrize("name", TASK_NAMES)
def test_same_seed_same_episode_bit_for_bit(name):
    def rollout(seed):
        env = make_env(name, image_size=48)
        obs, _ = env.reset(seed=seed)
        expert = ScriptedExpert(env)
        expert.reset()
        trace = [obs]
        for _ in range(8):
            trace.append(env.step(expert.act())[0])
        return trace

    a, b, c = rollout(3), rollout(3), rollout(4)
    for oa, ob in zip(a, b):
        assert oa["task"] == ob["task"]
        for k in oa:
            if k != "task":
                assert np.array_equal(oa[k], ob[k]), k
    assert not np.array_equal(a[0]["observation.images.front"], c[0]["observation.images.front"])


def test_observation_contract_and_caller_image_size():
    env = make_env("pick_cube", image_size=64)
    obs, info = env.reset(seed=0)
    assert set(obs) == {"observation.images.front", "observation.images.wrist", "observation.state", "task"}
    for cam in ("front", "wrist"):
        img = obs[f"observation.images.{cam}"]
        assert img.shape == (64, 64, 3) and img.dtype == np.uint8 and img.std() > 5
    assert obs["observation.state"].shape == (7,) and obs["observation.state"].dtype == np.float32
    assert obs["task"].startswith("pick up the ") and info["success"] is False
    assert env.render() is None
    env = make_env("pick_cube", image_size=64, cameras=("front",), render_mode="rgb_array", render_size=128)
    obs, _ = env.reset(seed=0)
    assert "observation.images.wrist" not in obs and env.render().shape == (128, 128, 3)


def test_instruction_names_the_target_among_competing_objects():
    env = make_env("stack_cubes", image_size=32)
    seen = set()
    for variant in range(len(env.task.variants())):
        obs, _ = env.reset(seed=0, options={"variant": variant})
        top, bottom = env.task.variant
        assert obs["task"] == f"stack the {top} cube on the {bottom} cube"
        assert env.task.target == f"cube_{top}" and env.task.goal == f"cube_{bottom}"
        seen.add(obs["task"])
    assert len(seen) == 6
    with pytest.raises(ValueError, match="variant"):
        env.reset(seed=0, options={"variant": 99})


@pytest.mark.parametrize("name", TASK_NAMES)
def test_not_solved_at_reset_nor_by_holding_still(name):
    env = make_env(name, image_size=32, cameras=())
    env.reset(seed=5)
    hold = np.append(env.data.ctrl[:6], 0.0).astype(np.float32)
    for _ in range(10):
        _, reward, terminated, _, info = env.step(hold)
    assert not info["success"] and not terminated and reward == 0.0


def test_time_limit_truncates():
    env = gym.make("vla/PressButton-v0", image_size=32, max_episode_steps=5)
    env.reset(seed=0)
    hold = np.append(env.unwrapped.data.ctrl[:6], 0.0).astype(np.float32)
    results = [env.step(hold) for _ in range(5)]
    assert [r[3] for r in results] == [False] * 4 + [True]


def test_bad_actions_are_rejected_with_a_clear_error():
    env = make_env("pick_cube", image_size=32)
    env.reset(seed=0)
    with pytest.raises(ValueError, match="non-finite"):
        env.step(np.full(7, np.nan, dtype=np.float32))
    with pytest.raises(ValueError, match="shape"):
        env.step(np.zeros(6, dtype=np.float32))
    with pytest.raises(ValueError, match="unknown task"):
        make_env("fold_laundry")
    with pytest.raises(ValueError, match="unknown cameras"):
        make_env("pick_cube", cameras=("top",))


def test_ee_delta_mode_moves_the_tool_by_the_asked_delta():
    env = make_env("pick_cube", image_size=32, cameras=(), action_mode="ee_delta")
    env.reset(seed=0)
    start = env.tool_pos()
    for _ in range(4):
        env.step(np.array([0.0, 0.03, 0.02, 0.0, 0.0], dtype=np.float32))
    moved = env.tool_pos() - start
    assert moved[1] > 0.08 and moved[2] > 0.05 and abs(moved[0]) < 0.02


def test_grasped_cube_is_held_by_friction():
    """Physics check: after the expert lifts a cube, it stays between the fingers while the arm moves."""
    env = make_env("pick_cube", image_size=32, cameras=(), max_episode_steps=200)
    env.reset(seed=2)
    expert = ScriptedExpert(env)
    expert.reset()
    while not env.step(expert.act())[2]:
        pass
    z_before = env.body_pos(env.task.target)[2]
    for _ in range(10):  # keep holding, wave the base joint
        action = expert.act()
        action[0] += 0.3
        env.step(action)
    cube, tool = env.body_pos(env.task.target), env.tool_pos()
    assert cube[2] > 0.08 and np.linalg.norm(cube - tool) < 0.03 and abs(cube[2] - z_before) < 0.1


@pytest.mark.parametrize("name", ["pick_cube", "press_button", "stack_cubes"])
def test_choosing_a_variant_keeps_the_seeds_layout(name):
    """Contrastive collection relies on this: one seed, several instructions, one scene."""
    env = make_env(name, image_size=32, cameras=())
    layouts, texts = [], []
    for v in range(3):
        obs, _ = env.reset(seed=11, options={"variant": v})
        layouts.append(env.data.qpos.copy())
        texts.append(obs["task"])
    assert len(set(texts)) == 3
    assert all(np.array_equal(layouts[0], q) for q in layouts[1:])


@pytest.mark.parametrize("name", ["place_on_plate", "place_in_bin", "stack_cubes"])
def test_pixel_keypoints_are_where_each_camera_draws_the_object_and_the_goal(name):
    """training_targets()' observation.pixel_keypoints: in both cameras (the wrist one moves with the
    arm) the target's and the goal's points sit on the pixels MuJoCo's segmentation renders for those
    bodies, near their centres."""
    size = 96
    env = make_env(name, image_size=size)
    renderer = mujoco.Renderer(env.model, size, size)
    renderer.enable_segmentation_rendering()
    centred = 0
    for seed, moves in ((0, 0), (1, 6)):
        env.reset(seed=seed)
        expert = ScriptedExpert(env)
        expert.reset()
        for _ in range(moves):  # the arm away from home: the wrist camera's pose changes
            env.step(expert.act())
        points = env.training_targets()["observation.pixel_keypoints"].reshape(len(env.cameras), 2, 2)
        for cam, cam_points in zip(env.cameras, points):
            renderer.update_scene(env.data, camera=cam)
            geoms = renderer.render()[..., 0]
            bodies = np.where(geoms >= 0, env.model.geom_bodyid[np.clip(geoms, 0, None)], -1)
            for body, (x, y) in zip((env.task.target, env.task.goal), cam_points):
                if max(abs(x), abs(y)) > 1:  # off the frame (the wrist camera, near the table)
                    continue
                rows, cols = np.nonzero(bodies == env.model.body(body).id)
                px, py = (x + 1) / 2 * size, (y + 1) / 2 * size
                assert len(rows) and np.hypot(cols + 0.5 - px, rows + 0.5 - py).min() < 1.0, (cam, body, px, py)
                if min(rows.min(), cols.min()) > 0 and max(rows.max(), cols.max()) < size - 1:  # wholly in view
                    assert abs(cols.mean() + 0.5 - px) < 2 and abs(rows.mean() + 0.5 - py) < 2, (cam, body, px, py)
                    centred += 1
    assert centred >= 4
    renderer.close()
    env.close()


def test_points_behind_or_beside_a_camera_read_as_off_the_frame():
    """vla.sim.camera.project: a point behind the camera would project through the centre's mirror
    image; it and a point far to the side read as off the frame (|x|, |y| > 1), clipped to OFF_FRAME."""
    env = make_env("pick_cube", image_size=48)
    env.reset(seed=0)
    cam = env.model.camera("front").id
    pos, rot = env.data.cam_xpos[cam], env.data.cam_xmat[cam].reshape(3, 3)
    ahead, right = -rot[:, 2], rot[:, 0]  # the camera looks along its -z; +x is the frame's right
    points = np.stack([pos + ahead, pos - ahead, pos + 0.01 * ahead + right])
    xy = project(env.model, env.data, "front", points)
    assert np.allclose(xy[0], 0, atol=1e-6)
    assert np.array_equal(xy[1], [OFF_FRAME, OFF_FRAME])
    assert xy[2, 0] == OFF_FRAME and abs(xy[2, 1]) < 1e-6
    env.close()
