"""One MetaWorld task as this project's env: the observation a policy gets, MetaWorld's own success
and its scripted expert. Needs metaworld 3.1.1 (and so mujoco 3.3.0): it runs in `.venv-metaworld`
(`bash scripts/setup.sh --metaworld`), behind `vla.serving.env_server`; the policy's environment
reaches it through `vla.serving.env_client.RemoteEnv`.

Conventions, as LeRobot's MetaWorld env: the env is MetaWorld's `Meta-World/MT1` for the task, its
object and goal positions drawn from the episode seed (`seed()` then `reset()`, MetaWorld's seeded
random vector instead of its 50 fixed task variants); the `corner2` camera (moved as LeRobot moves
it) rendered and flipped upright; the state is the hand's xyz and the gripper opening (obs[:4]);
the first object's and the goal's xyz are `observation.environment_state` (the keypoint aid's training
target: a policy never gets it as input) and where they appear in the upright frame
`observation.pixel_keypoints` (x, y in [-1, 1], pinhole projection through the camera's pose and
fovy: the spatial maps' training target, `model.pixel_keypoints`);
actions are 4-d in [-1, 1]; success is `info["success"]`, an episode ends at success or 500 steps.
"""

from __future__ import annotations

import gymnasium as gym
import metaworld  # noqa: F401  (registers the Meta-World/* ids)
import metaworld.policies as experts
import mujoco
import numpy as np

from vla.sim.camera import project
from vla.sim.metaworld_tasks import CAMERA, INSTRUCTIONS, MAX_STEPS

EXPERT_NAMES = {"peg-insert-side-v3": "SawyerPegInsertionSideV3Policy"}  # the one irregular class name


def expert_for(task: str):
    name = EXPERT_NAMES.get(task, "Sawyer" + "".join(w.capitalize() for w in task[:-3].split("-")) + "V3Policy")
    return getattr(experts, name)()


class MetaWorldEnv(gym.Env):
    """obs: observation.images.corner2 (uint8 S x S x 3, upright), observation.state (float32 (4,):
    hand xyz, gripper), observation.environment_state (float32 (6,): object xyz, goal xyz),
    observation.pixel_keypoints (float32 (4,): object x, y, goal x, y in the frame, [-1, 1] from the
    left / top edge to the right / bottom one), task (the instruction); action float32 (4,) in [-1, 1]."""

    metadata = {"render_modes": ["rgb_array"], "render_fps": 80}

    def __init__(self, task: str, image_size: int = 96, camera: str = CAMERA):
        if task not in INSTRUCTIONS:
            raise ValueError(f"unknown MetaWorld task {task!r}")
        self.task, self.instruction, self.camera = task, INSTRUCTIONS[task], camera
        self.image_size, self.max_steps = image_size, MAX_STEPS
        self.cameras = (camera,)
        self._gym = gym.make("Meta-World/MT1", env_name=task, seed=0, render_mode="rgb_array", camera_name=camera,
                             width=image_size, height=image_size)
        self._gym.reset()  # MetaWorld sets one of its task variants here
        env = self._gym.unwrapped
        if camera == "corner2":
            env.model.cam_pos[env.model.camera(camera).id] = [0.75, 0.075, 0.7]
        # software rendering: no shadows, reflections or multisampling (20 -> 12.5 ms a frame here)
        env.model.light_castshadow[:] = 0
        env.model.mat_reflectance[:] = 0
        env.model.vis.quality.offsamples = 0
        env._freeze_rand_vec, env.seeded_rand_vec = False, True  # layouts from the episode seed
        self.env = env
        self.expert = expert_for(task)
        self.observation_space = gym.spaces.Dict({
            f"observation.images.{camera}": gym.spaces.Box(0, 255, (image_size, image_size, 3), np.uint8),
            "observation.state": gym.spaces.Box(-np.inf, np.inf, (4,), np.float32),
            "observation.environment_state": gym.spaces.Box(-np.inf, np.inf, (6,), np.float32),
            "observation.pixel_keypoints": gym.spaces.Box(-np.inf, np.inf, (4,), np.float32)})
        self.action_space = gym.spaces.Box(-1.0, 1.0, (4,), np.float32)
        self._raw = None
        self._steps = 0

    def _obs(self) -> dict:
        image = self.env.render()
        if self.camera == "corner2":
            image = image[::-1, ::-1]  # rendered upside down and mirrored
        keypoints = np.concatenate([self._raw[4:7], self.env._target_pos])  # object xyz, goal xyz
        return {f"observation.images.{self.camera}": np.ascontiguousarray(image),
                "observation.state": self._raw[:4].astype(np.float32),
                "observation.environment_state": keypoints.astype(np.float32),
                "observation.pixel_keypoints": self.project(keypoints.reshape(2, 3)).reshape(-1),
                "task": self.instruction}

    def project(self, points: np.ndarray) -> np.ndarray:
        """World points (N, 3) -> where the frame this env returns shows them (`vla.sim.camera.project`)."""
        return project(self.env.model, self.env.data, self.camera, points, upside_down=self.camera == "corner2")

    def reset(self, *, seed: int | None = None, options=None):
        super().reset(seed=seed)
        self.env.seed(0 if seed is None else int(seed))
        self._raw, _ = self.env.reset()
        # MetaWorld's reset_model moves the goal site (model.site_pos) after its last forward pass, so
        # without one here the first frame draws the goal where an earlier layout put it
        mujoco.mj_forward(self.env.model, self.env.data)
        self._steps = 0
        return self._obs(), {"success": False, "task": self.task}

    def step(self, action):
        action = np.clip(np.asarray(action, dtype=np.float64), -1.0, 1.0)
        self._raw, reward, _, _, info = self.env.step(action)
        self._steps += 1
        success = bool(info.get("success", 0))
        return self._obs(), float(reward), success, self._steps >= MAX_STEPS, {"success": success, "task": self.task}

    def expert_action(self) -> np.ndarray:
        """MetaWorld's scripted policy's action for the current state (the demonstrations)."""
        return np.asarray(self.expert.get_action(self._raw), dtype=np.float32)

    def close(self):
        self._gym.close()
