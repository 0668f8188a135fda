"""Scripted experts: waypoint plans on the sim's true state, tracked through the arm's IK.

A plan is a generator of Waypoints; it reads the state when it yields the next one, so a plan can
look at where a cube ended up and retry a failed grasp. The expert moves a commanded tool pose
toward the current waypoint at a capped speed and turns it into joint targets with IK, so its
actions are absolute joint positions + gripper, exactly the env's action space.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from vla.sim.env import CONTROL_HZ, TabletopEnv
from vla.sim.ik import down_rotation
from vla.sim.scene import BUTTON_CAP_TOP, CUBE_HALF, DRAWER_HANDLE_GAP_X

OPEN, CLOSED = 0.0, 1.0
SAFE_Z = 0.15  # travel height of the tool point
GRASP_Z = CUBE_HALF + 0.006  # tool point height when grasping a cube on the table
FINGER_BELOW_TCP = 0.02  # the fingertips reach this far below the tool point


@dataclass
class Waypoint:
    pos: np.ndarray
    yaw: float
    grip: float
    speed: float = 0.3  # m/s of the commanded tool point
    settle: int = 1  # control steps to hold once reached


def grasp_yaw(cube_yaw: float) -> float:
    """The tool yaw closest to 0 that puts the fingers across a pair of the cube's faces."""
    return float((cube_yaw + np.pi / 4) % (np.pi / 2) - np.pi / 4)


def at(x, y, z) -> np.ndarray:
    return np.array([x, y, z], dtype=np.float64)


def pick(env: TabletopEnv, cube: str, attempts: int = 3):
    """Grasp `cube` and lift it to the travel height; retries while the cube stays behind."""
    for _ in range(attempts):
        p, yaw = env.body_pos(cube), grasp_yaw(env.body_yaw(cube))
        yield Waypoint(at(p[0], p[1], SAFE_Z), yaw, OPEN)
        yield Waypoint(at(p[0], p[1], GRASP_Z), yaw, OPEN, speed=0.2, settle=2)
        yield Waypoint(at(p[0], p[1], GRASP_Z), yaw, CLOSED, settle=3)
        yield Waypoint(at(p[0], p[1], SAFE_Z), yaw, CLOSED, speed=0.25)
        if env.body_pos(cube)[2] > SAFE_Z - 0.06:
            return
        yield Waypoint(at(p[0], p[1], SAFE_Z), yaw, OPEN, settle=2)


def place(env: TabletopEnv, xy, release_z: float, yaw: float):
    yield Waypoint(at(xy[0], xy[1], SAFE_Z), yaw, CLOSED)
    yield Waypoint(at(xy[0], xy[1], release_z), yaw, CLOSED, speed=0.15, settle=2)
    yield Waypoint(at(xy[0], xy[1], release_z), yaw, OPEN, settle=3)
    yield Waypoint(at(xy[0], xy[1], SAFE_Z), yaw, OPEN)


def plan_pick_cube(env):
    yield from pick(env, env.task.target)
    p = env.tool_pos()
    yield Waypoint(at(p[0], p[1], SAFE_Z + 0.03), env.tool_yaw(), CLOSED, settle=5)


def plan_place(env, release_height: float):
    def plan():
        yield from pick(env, env.task.target)
        goal = env.body_pos(env.task.goal)
        yield from place(env, goal[:2], goal[2] + release_height, env.tool_yaw())
    return plan()


def plan_place_on_plate(env):
    return plan_place(env, 0.006 + CUBE_HALF + 0.012)


def plan_place_in_bin(env):
    return plan_place(env, 0.1)


def plan_stack_cubes(env):
    def plan():
        yield from pick(env, env.task.target)
        goal = env.body_pos(env.task.goal)
        yaw = grasp_yaw(env.body_yaw(env.task.goal))
        yield from place(env, goal[:2], goal[2] + 2 * CUBE_HALF + 0.012, yaw)
    return plan()


def plan_push_cube(env):
    task = env.task
    p, s = env.body_pos(task.target), task.side
    # the gripper is turned so the two partly closed fingers both touch the cube's face
    yaw, grip, z = np.pi / 2, 0.7, 0.03
    yield Waypoint(at(p[0], p[1] - s * 0.075, SAFE_Z), yaw, grip)
    yield Waypoint(at(p[0], p[1] - s * 0.075, z), yaw, grip, speed=0.2, settle=1)
    yield Waypoint(at(p[0], s * 0.17, z), yaw, grip, speed=0.12, settle=1)
    yield Waypoint(at(p[0], s * 0.17, SAFE_Z), yaw, grip)


def _cabinet(env):
    return env.data.mocap_pos[env.model.body("cabinet").mocapid[0]].copy()


def plan_open_drawer(env):
    cab = _cabinet(env)
    x = cab[0] + DRAWER_HANDLE_GAP_X - env.task.opening()
    z = 0.07
    yield Waypoint(at(x, cab[1], SAFE_Z), 0.0, CLOSED)
    yield Waypoint(at(x, cab[1], z), 0.0, CLOSED, speed=0.15, settle=1)
    yield Waypoint(at(x - 0.145, cab[1], z), 0.0, CLOSED, speed=0.12, settle=1)
    yield Waypoint(at(x - 0.145, cab[1], SAFE_Z), 0.0, CLOSED)


def plan_close_drawer(env):
    cab = _cabinet(env)
    front = cab[0] - 0.106 - env.task.opening()
    y = cab[1] + 0.08 * (1 if cab[1] < 0 else -1)
    z = 0.06
    yield Waypoint(at(front - 0.035, y, SAFE_Z), 0.0, CLOSED)
    yield Waypoint(at(front - 0.035, y, z), 0.0, CLOSED, speed=0.15, settle=1)
    yield Waypoint(at(cab[0] - 0.106 - 0.01, y, z), 0.0, CLOSED, speed=0.12, settle=2)
    yield Waypoint(at(cab[0] - 0.16, y, SAFE_Z), 0.0, CLOSED)


def plan_press_button(env):
    p = env.body_pos(env.task.target)
    press_z = BUTTON_CAP_TOP - 0.011 + FINGER_BELOW_TCP
    yield Waypoint(at(p[0], p[1], 0.12), 0.0, CLOSED)
    yield Waypoint(at(p[0], p[1], press_z), 0.0, CLOSED, speed=0.1, settle=2)
    yield Waypoint(at(p[0], p[1], 0.12), 0.0, CLOSED)


PLANS = {
    "pick_cube": plan_pick_cube,
    "place_on_plate": plan_place_on_plate,
    "place_in_bin": plan_place_in_bin,
    "push_cube": plan_push_cube,
    "stack_cubes": plan_stack_cubes,
    "open_drawer": plan_open_drawer,
    "close_drawer": plan_close_drawer,
    "press_button": plan_press_button,
}


class ScriptedExpert:
    """Call reset() after env.reset(), then act() once per control step."""

    max_yaw_rate = 2.0  # rad/s

    def __init__(self, env: TabletopEnv):
        self.env = env.unwrapped
        self.dt = 1.0 / CONTROL_HZ

    def reset(self) -> None:
        env = self.env
        self.plan = PLANS[env.task.name](env)
        self.q_cmd = env.data.ctrl[:6].copy()
        self.pos = env.ik.forward(self.q_cmd)[0]
        self.yaw = env.tool_yaw()
        self.grip = OPEN
        self.waypoint: Waypoint | None = None
        self.hold = 0
        self.done = False

    def act(self) -> np.ndarray:
        if self.waypoint is None and not self.done:
            self.waypoint = next(self.plan, None)
            self.done = self.waypoint is None
            self.hold = self.waypoint.settle if self.waypoint else 0
        wp = self.waypoint
        if wp is not None:
            delta = wp.pos - self.pos
            dist, step = np.linalg.norm(delta), wp.speed * self.dt
            self.pos = wp.pos.copy() if dist <= step else self.pos + delta * (step / dist)
            dyaw = (wp.yaw - self.yaw + np.pi) % (2 * np.pi) - np.pi
            max_dyaw = self.max_yaw_rate * self.dt
            self.yaw = wp.yaw if abs(dyaw) <= max_dyaw else self.yaw + np.sign(dyaw) * max_dyaw
            self.grip = wp.grip
            self.q_cmd = self.env.ik.solve(self.q_cmd, self.pos, down_rotation(self.yaw))
            if dist <= step and abs(dyaw) <= max_dyaw:
                if self.hold <= 0:
                    self.waypoint = None
                self.hold -= 1
        return np.append(self.q_cmd, self.grip).astype(np.float32)


def run_expert_episode(env: TabletopEnv, seed: int, record: bool = False, options: dict | None = None):
    """One expert episode. Returns (success, length, frames) where frames (if record) is a list of
    (observation, action) pairs: the observation the action was chosen on, with the env's
    `training_targets()` (privileged: the keypoints and where the frames show them)."""
    obs, _ = env.reset(seed=seed, options=options)
    expert = ScriptedExpert(env)
    expert.reset()
    frames = []
    for _ in range(env.max_episode_steps):
        action = expert.act()
        if record:
            frames.append(({**obs, **env.unwrapped.training_targets()}, action))
        obs, _, terminated, truncated, info = env.step(action)
        if terminated or truncated:
            break
    return bool(info["success"]), env.steps, frames
