"""The simulated suites `vla collect` and `vla eval` run: the project's own tabletop tasks (MuJoCo 4,
in this process) and MetaWorld (mujoco 3.3.0, in its own environment behind
`vla.serving.env_client.RemoteEnv`). What differs between them lives here: task names, the env, the
expert, the dataset's features."""

from __future__ import annotations

import numpy as np

from vla.dataset import PIXEL_KEYPOINTS, video_feature
from vla.serving.env_client import RemoteEnv
from vla.sim import make_env
from vla.sim.env import CAMERAS, CONTROL_HZ
from vla.sim.experts import run_expert_episode
from vla.sim.ik import ARM_JOINTS
from vla.sim.metaworld_tasks import CAMERA as METAWORLD_CAMERA
from vla.sim.metaworld_tasks import resolve_metaworld_tasks
from vla.sim.tasks import resolve_tasks

SUITES = ("tabletop", "metaworld")
STATE_NAMES = [f"{j}.pos" for j in ARM_JOINTS] + ["gripper.pos"]
KEYPOINT_NAMES = ["target.x", "target.y", "target.z", "goal.x", "goal.y", "goal.z"]
METAWORLD_FPS = 80  # MetaWorld's control rate (5 substeps of 2.5 ms)
METAWORLD_STATE = ["hand.x", "hand.y", "hand.z", "gripper"]
METAWORLD_ACTION = ["hand.dx", "hand.dy", "hand.dz", "gripper"]
METAWORLD_KEYPOINTS = ["object.x", "object.y", "object.z", "goal.x", "goal.y", "goal.z"]
# where the camera's frame shows them: "<camera>.<point>.<x|y>", [-1, 1] across the frame
METAWORLD_PIXEL_KEYPOINTS = [f"{METAWORLD_CAMERA}.{p}.{a}" for p in ("object", "goal") for a in "xy"]


def check_suite(suite: str) -> None:
    if suite not in SUITES:
        raise ValueError(f"unknown suite {suite!r}: one of {list(SUITES)}")


def suite_tasks(suite: str, spec) -> list[str]:
    """Task names: for tabletop 'all' or names / ids; for metaworld MT10, MT50, a difficulty group
    or task names. A list passes through each name's resolution."""
    check_suite(suite)
    if not isinstance(spec, str):
        spec = ",".join(spec)
    if suite == "metaworld":
        return resolve_metaworld_tasks(spec)
    return resolve_tasks(spec)


def suite_cameras(suite: str) -> tuple[str, ...]:
    return (METAWORLD_CAMERA,) if suite == "metaworld" else tuple(CAMERAS)


def make_suite_env(suite: str, task: str, image_size: int, cameras=None):
    check_suite(suite)
    if suite == "metaworld":
        return RemoteEnv("metaworld", task, image_size)
    return make_env(task, image_size=image_size, cameras=tuple(cameras or CAMERAS))


def suite_dataset(suite: str, image_size: int, cameras=None) -> tuple[int, dict, str]:
    """(fps, features, robot_type) of the suite's demonstrations."""
    if suite == "metaworld":
        feats = {f"observation.images.{METAWORLD_CAMERA}": video_feature(image_size, image_size, METAWORLD_FPS),
                 "observation.state": {"dtype": "float32", "shape": [4], "names": METAWORLD_STATE},
                 "action": {"dtype": "float32", "shape": [4], "names": METAWORLD_ACTION},
                 "observation.environment_state": {"dtype": "float32", "shape": [6], "names": METAWORLD_KEYPOINTS},
                 PIXEL_KEYPOINTS: {"dtype": "float32", "shape": [4], "names": METAWORLD_PIXEL_KEYPOINTS}}
        return METAWORLD_FPS, feats, "sawyer"
    feats = {f"observation.images.{c}": video_feature(image_size, image_size, CONTROL_HZ) for c in cameras or CAMERAS}
    feats["observation.state"] = {"dtype": "float32", "shape": [7], "names": STATE_NAMES}
    feats["action"] = {"dtype": "float32", "shape": [7], "names": STATE_NAMES}
    feats["observation.environment_state"] = {"dtype": "float32", "shape": [6], "names": KEYPOINT_NAMES}
    names = [f"{c}.{p}.{a}" for c in cameras or CAMERAS for p in ("target", "goal") for a in "xy"]
    feats[PIXEL_KEYPOINTS] = {"dtype": "float32", "shape": [len(names)], "names": names}
    return CONTROL_HZ, feats, "vla_arm6"


def start_scene(suite: str, env, seed: int, options: dict | None = None) -> dict:
    """The first observation from `seed` with the training targets an expert episode records beside
    it (the tabletop env keeps them out of its observation; MetaWorld's carries them)."""
    obs, _ = env.reset(seed=seed, options=options)
    return {**obs, **env.training_targets()} if suite == "tabletop" else obs


def expert_episode(suite: str, env, seed: int, options: dict | None = None):
    """(success, [(observation, action), ...]) of the suite's scripted expert from `seed`."""
    if suite == "tabletop":
        success, _, frames = run_expert_episode(env, seed, record=True, options=options)
        return success, frames
    obs, _ = env.reset(seed=seed)
    frames, success = [], False
    for _ in range(env.max_episode_steps):
        action = np.clip(env.expert_action(), -1.0, 1.0).astype(np.float32)
        frames.append((obs, action))
        obs, _, terminated, truncated, info = env.step(action)
        success = info["success"]
        if terminated or truncated:
            break
    return bool(success), frames
