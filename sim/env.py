"""The tabletop environment: one gymnasium.Env class, specialised by a Task (sim/tasks.py).

Observation (names as in LeRobot):
    observation.images.<camera>  uint8 H x W x 3, for each camera in `cameras` ("front", "wrist")
    observation.state            float32 [j1..j6 (rad), gripper (0 open .. 1 closed)]
    task                         the instruction string
Action (mode "joint", the default): float32 [j1..j6 absolute position targets (rad),
gripper (0 open .. 1 closed)], clipped to the joint limits.
Action (mode "ee_delta"): float32 [dx, dy, dz (m), dyaw (rad), gripper]: a change of the tool
pose (pointing down) per control step, turned into joint targets by the arm's Jacobian (IK).
"""

from __future__ import annotations

import os
import string

import gymnasium as gym
import mujoco
import numpy as np
from gymnasium import spaces

from vla.sim.camera import project
from vla.sim.ik import ARM_JOINTS, ArmIK, down_rotation, tool_yaw
from vla.sim.scene import build_model
from vla.sim.tasks import TASKS

CONTROL_HZ = 10
FINGER_OPEN = 0.04  # m, each finger's travel
HOME_TOOL_POS = np.array([0.35, 0.0, 0.22])
CAMERAS = ("front", "wrist")
INSTRUCTION_CHARS = string.ascii_letters + string.digits + " ,.'-"
EE_DELTA_LIMIT = np.array([0.05, 0.05, 0.05, 0.5])  # per control step: m, m, m, rad

_HOME_Q: np.ndarray | None = None


def home_q(model: mujoco.MjModel) -> np.ndarray:
    """Joint positions with the tool pointing down above the middle of the table (cached)."""
    global _HOME_Q
    if _HOME_Q is None:
        guess = np.array([0.0, 0.3, 1.6, 0.0, 1.2, 0.0])
        _HOME_Q = ArmIK(model).solve(guess, HOME_TOOL_POS, down_rotation(0.0), iters=200)
    return _HOME_Q.copy()


class TabletopEnv(gym.Env):
    metadata = {"render_modes": ["rgb_array"], "render_fps": CONTROL_HZ}

    def __init__(self, task, image_size: int = 96, cameras=CAMERAS, render_mode: str | None = None,
                 render_size: int = 256, action_mode: str = "joint", max_episode_steps: int | None = None):
        if isinstance(task, str):
            if task not in TASKS:
                raise ValueError(f"unknown task {task!r}; known: {sorted(TASKS)}")
            task = TASKS[task]()
        if render_mode not in (None, "rgb_array"):
            raise ValueError(f"render_mode must be None or 'rgb_array', got {render_mode!r}")
        if action_mode not in ("joint", "ee_delta"):
            raise ValueError(f"action_mode must be 'joint' or 'ee_delta', got {action_mode!r}")
        unknown = set(cameras) - set(CAMERAS)
        if unknown:
            raise ValueError(f"unknown cameras {sorted(unknown)}; known: {list(CAMERAS)}")
        self.task = task
        self.image_size = int(image_size)
        self.cameras = tuple(cameras)
        self.render_mode = render_mode
        self.render_size = int(render_size)
        self.action_mode = action_mode
        self.max_episode_steps = max_episode_steps or task.max_steps

        self.model = build_model(task.objects_xml())
        self.model.vis.global_.offwidth = max(self.image_size, self.render_size)
        self.model.vis.global_.offheight = max(self.image_size, self.render_size)
        self.data = mujoco.MjData(self.model)
        self.n_substeps = round(1.0 / (CONTROL_HZ * self.model.opt.timestep))
        self.ik = ArmIK(self.model)
        joints = [self.model.joint(n) for n in ARM_JOINTS]
        self.arm_qadr = np.array([j.qposadr[0] for j in joints])
        self.finger_qadr = np.array([self.model.joint(n).qposadr[0] for n in ("finger_left", "finger_right")])
        self.tcp = self.model.site("tcp").id
        self.home = home_q(self.model)
        self.task.bind(self)

        lo = np.append(self.ik.lo, 0.0).astype(np.float32)
        hi = np.append(self.ik.hi, 1.0).astype(np.float32)
        self.joint_low, self.joint_high = lo, hi
        if action_mode == "joint":
            self.action_space = spaces.Box(lo, hi, dtype=np.float32)
        else:
            lim = np.append(EE_DELTA_LIMIT, 1.0).astype(np.float32)
            self.action_space = spaces.Box(np.append(-EE_DELTA_LIMIT, 0.0).astype(np.float32), lim,
                                           dtype=np.float32)
        img = spaces.Box(0, 255, (self.image_size, self.image_size, 3), dtype=np.uint8)
        self.observation_space = spaces.Dict({
            **{f"observation.images.{c}": img for c in self.cameras},
            # joint limits are soft in MuJoCo: allow a little overshoot
            "observation.state": spaces.Box(lo - 0.1, hi + 0.1, dtype=np.float32),
            "task": spaces.Text(max_length=200, min_length=1, charset=INSTRUCTION_CHARS),
        })
        self._renderers: dict[int, mujoco.Renderer] = {}
        self.instruction = ""
        self.steps = 0
        self._success = False

    # --- physics helpers used by tasks and experts ---
    def body_pos(self, name: str) -> np.ndarray:
        return self.data.body(name).xpos.copy()

    def body_yaw(self, name: str) -> float:
        return tool_yaw(self.data.body(name).xmat)

    def joint_q(self, name: str) -> float:
        return float(self.data.joint(name).qpos[0])

    def tool_pos(self) -> np.ndarray:
        return self.data.site_xpos[self.tcp].copy()

    def tool_yaw(self) -> float:
        return tool_yaw(self.data.site_xmat[self.tcp])

    def gripper_state(self) -> float:
        return float(1.0 - self.data.qpos[self.finger_qadr].mean() / FINGER_OPEN)

    def arm_q(self) -> np.ndarray:
        return self.data.qpos[self.arm_qadr].copy()

    def place_free(self, name: str, x: float, y: float, yaw: float = 0.0, z: float | None = None) -> None:
        j = self.model.joint(name)
        adr = j.qposadr[0]
        self.data.qpos[adr:adr + 3] = (x, y, self.data.qpos[adr + 2] if z is None else z)
        self.data.qpos[adr + 3:adr + 7] = (np.cos(yaw / 2), 0.0, 0.0, np.sin(yaw / 2))

    def place_mocap(self, name: str, x: float, y: float) -> None:
        self.data.mocap_pos[self.model.body(name).mocapid[0]] = (x, y, 0.0)

    # --- gymnasium API ---
    def reset(self, *, seed: int | None = None, options: dict | None = None):
        super().reset(seed=seed)
        mujoco.mj_resetData(self.model, self.data)
        q = self.home + self.np_random.uniform(-0.03, 0.03, size=6)
        self.data.qpos[self.arm_qadr] = q
        self.data.qpos[self.finger_qadr] = FINGER_OPEN
        self.data.ctrl[:6] = q
        self.data.ctrl[6:8] = FINGER_OPEN
        self.instruction = self.task.reset(self.np_random, options or {})
        mujoco.mj_forward(self.model, self.data)
        # let objects settle on the table before the first observation
        mujoco.mj_step(self.model, self.data, nstep=50)
        self.steps = 0
        self._success = False
        return self._observation(), self._info()

    def step(self, action):
        a = np.asarray(action, dtype=np.float64).reshape(-1)
        if a.shape != self.action_space.shape:
            raise ValueError(f"action must have shape {self.action_space.shape}, got {a.shape}")
        if not np.all(np.isfinite(a)):
            raise ValueError(f"action contains a non-finite value: {a.tolist()}")
        a = np.clip(a, self.action_space.low, self.action_space.high)
        if self.action_mode == "ee_delta":
            a = self._ee_delta_to_joint(a)
        self.data.ctrl[:6] = a[:6]
        self.data.ctrl[6:8] = FINGER_OPEN * (1.0 - a[6])
        mujoco.mj_step(self.model, self.data, nstep=self.n_substeps)
        self.steps += 1
        self._success = self._success or bool(self.task.success())
        terminated = self._success
        truncated = self.steps >= self.max_episode_steps and not terminated
        return self._observation(), float(self._success), terminated, truncated, self._info()

    def _ee_delta_to_joint(self, a: np.ndarray) -> np.ndarray:
        # integrate on the commanded pose, not the measured one, so servo lag does not accumulate
        q_cmd = self.data.ctrl[:6].copy()
        pos, rot = self.ik.forward(q_cmd)
        target_rot = down_rotation(tool_yaw(rot) + a[3])
        q = self.ik.solve(q_cmd, pos + a[:3], target_rot, iters=20)
        return np.append(q, a[4])

    def training_targets(self) -> dict:
        """What the demonstrations record beside the observation, for training only (never a policy's
        input): `observation.environment_state`, the task's keypoints (the named object's xyz, then the
        goal's), and `observation.pixel_keypoints`, where each camera's frame shows them (x, y in
        [-1, 1], "<camera>.<target|goal>.<x|y>" for each camera in turn)."""
        keypoints = self.task.keypoints()
        pixels = [project(self.model, self.data, c, keypoints.reshape(2, 3)).reshape(-1) for c in self.cameras]
        return {"observation.environment_state": keypoints,
                "observation.pixel_keypoints": np.concatenate(pixels).astype(np.float32)}

    def _info(self) -> dict:
        return {"success": self._success, "is_success": self._success, "task": self.instruction}

    def _state(self) -> np.ndarray:
        return np.append(self.arm_q(), self.gripper_state()).astype(np.float32)

    def _renderer(self, size: int) -> mujoco.Renderer:
        r = self._renderers.get(size)
        if r is None:
            try:
                r = mujoco.Renderer(self.model, size, size)
            except Exception as e:  # mujoco raises FatalError or GLFW errors, depending on backend
                raise RuntimeError(
                    f"offscreen rendering failed with MUJOCO_GL={os.environ.get('MUJOCO_GL')!r}: {e}. "
                    "Set MUJOCO_GL=egl (or osmesa) before mujoco is first imported, and install "
                    "libegl1 (or libosmesa6); scripts/setup.sh does both.") from e
            for flag in (mujoco.mjtRndFlag.mjRND_SHADOW, mujoco.mjtRndFlag.mjRND_REFLECTION,
                         mujoco.mjtRndFlag.mjRND_SKYBOX, mujoco.mjtRndFlag.mjRND_FOG,
                         mujoco.mjtRndFlag.mjRND_HAZE):
                r.scene.flags[flag] = 0
            self._renderers[size] = r
        return r

    def render_camera(self, camera: str, size: int | None = None) -> np.ndarray:
        r = self._renderer(size or self.image_size)
        r.update_scene(self.data, camera=camera)
        return r.render()

    def _observation(self) -> dict:
        obs = {f"observation.images.{c}": self.render_camera(c) for c in self.cameras}
        obs["observation.state"] = self._state()
        obs["task"] = self.instruction
        return obs

    def render(self):
        if self.render_mode == "rgb_array":
            return self.render_camera("front", self.render_size)
        return None

    def close(self):
        for r in self._renderers.values():
            r.close()
        self._renderers.clear()
