"""The task suite: scene objects, randomised initial states, instructions and success tests.

Each task draws its layout and its instruction from the env's seeded generator, so a seed fixes
the episode. Scenes hold competing objects of several colors so that only the instruction tells
which one to act on. `options={"variant": i}` in reset picks instruction variant i instead of a
random one (see `variants()`).
"""

from __future__ import annotations

import itertools

import numpy as np

from vla.sim import scene
from vla.sim.scene import CUBE_HALF

CUBE_COLORS = ("red", "green", "blue")
# The suite's seeds: demonstrations are collected from seed 0 up, evaluation (`vla eval`, `vla run`,
# `vla bench`) uses seeds from here up, so the two never meet.
EVAL_SEED_START = 1_000_000


def sample_positions(rng: np.random.Generator, n: int, x: tuple, y: tuple, min_dist: float) -> np.ndarray:
    """n points uniformly in the box, pairwise at least min_dist apart (rejection sampling)."""
    for _ in range(1000):
        p = np.column_stack([rng.uniform(*x, size=n), rng.uniform(*y, size=n)])
        d = np.linalg.norm(p[:, None] - p[None], axis=-1) + np.eye(n) * 1e9
        if d.min() >= min_dist:
            return p
    raise RuntimeError("could not place objects without overlap")


class Task:
    name: str = ""
    env_id: str = ""
    max_steps: int = 100
    target: str = ""  # the body the instruction names
    goal: str | None = None  # where it goes, for tasks with a separate goal

    def bind(self, env) -> None:
        self.env = env

    def objects_xml(self) -> str:
        raise NotImplementedError

    def variants(self) -> list:
        return [None]

    def reset(self, rng: np.random.Generator, options: dict) -> str:
        variants = self.variants()
        i = options.get("variant")
        if i is None:
            i = int(rng.integers(len(variants)))
        elif not 0 <= int(i) < len(variants):
            raise ValueError(f"variant must be in [0, {len(variants)}), got {i}")
        self.variant = variants[int(i)]
        return self.setup(rng, self.variant)

    def setup(self, rng: np.random.Generator, variant) -> str:
        raise NotImplementedError

    def success(self) -> bool:
        raise NotImplementedError

    def keypoints(self) -> np.ndarray:
        """Where the instruction sends the arm, for training only (LeRobot's
        `observation.environment_state`): the named object's xyz, then the goal's xyz (the object
        again where there is no separate goal). Never given to a policy as input."""
        return np.concatenate([self.target_pos(), self.goal_pos()]).astype(np.float32)

    def target_pos(self) -> np.ndarray:
        return self.env.body_pos(self.target)

    def goal_pos(self) -> np.ndarray:
        return self.env.body_pos(self.goal) if self.goal else self.target_pos()

    # helpers
    def released(self) -> bool:
        return self.env.gripper_state() < 0.5

    def place_cubes(self, rng, names, x=(0.3, 0.5), y=(-0.18, 0.18), min_dist=0.09, yaw=np.pi / 4):
        pts = sample_positions(rng, len(names), x, y, min_dist)
        for name, (px, py) in zip(names, pts):
            self.env.place_free(name, px, py, rng.uniform(-yaw, yaw), z=CUBE_HALF)
        return pts


class PickCube(Task):
    name, env_id, max_steps = "pick_cube", "vla/PickCube-v0", 80

    def objects_xml(self):
        return "".join(scene.cube(f"cube_{c}", c) for c in CUBE_COLORS)

    def variants(self):
        return list(CUBE_COLORS)

    def setup(self, rng, color):
        self.place_cubes(rng, [f"cube_{c}" for c in CUBE_COLORS])
        self.target = f"cube_{color}"
        return f"pick up the {color} cube"

    def success(self):
        return self.env.body_pos(self.target)[2] > 0.08


class _PlaceTask(Task):
    """Shared by the tasks that carry a cube somewhere and let go of it."""

    cube_colors = ("red", "blue")

    def cube_names(self):
        return [f"cube_{c}" for c in self.cube_colors]


class PlaceOnPlate(_PlaceTask):
    name, env_id, max_steps = "place_on_plate", "vla/PlaceOnPlate-v0", 150
    plate_colors = ("green", "yellow")

    def objects_xml(self):
        return ("".join(scene.cube(f"cube_{c}", c) for c in self.cube_colors)
                + "".join(scene.plate(f"plate_{c}", c) for c in self.plate_colors))

    def variants(self):
        return list(itertools.product(self.cube_colors, self.plate_colors))

    def setup(self, rng, variant):
        cube, plate = variant
        pts = sample_positions(rng, 4, (0.3, 0.52), (-0.2, 0.2), 0.13)
        for c, (px, py) in zip(self.cube_colors, pts[:2]):
            self.env.place_free(f"cube_{c}", px, py, rng.uniform(-np.pi / 4, np.pi / 4), z=CUBE_HALF)
        for c, (px, py) in zip(self.plate_colors, pts[2:]):
            self.env.place_mocap(f"plate_{c}", px, py)
        self.target, self.goal = f"cube_{cube}", f"plate_{plate}"
        return f"put the {cube} cube on the {plate} plate"

    def success(self):
        c, g = self.env.body_pos(self.target), self.env.body_pos(self.goal)
        return np.linalg.norm(c[:2] - g[:2]) < 0.05 and c[2] < 0.05 and self.released()


class PlaceInBin(_PlaceTask):
    name, env_id, max_steps = "place_in_bin", "vla/PlaceInBin-v0", 150
    cube_colors = ("red", "green", "blue")

    def objects_xml(self):
        return "".join(scene.cube(f"cube_{c}", c) for c in self.cube_colors) + scene.bin_("bin")

    def variants(self):
        return list(self.cube_colors)

    def setup(self, rng, color):
        side = rng.choice([-1.0, 1.0])
        bx, by = rng.uniform(0.36, 0.48), side * rng.uniform(0.14, 0.2)
        self.env.place_mocap("bin", bx, by)
        self.place_cubes(rng, self.cube_names(), x=(0.3, 0.5), y=sorted([-side * 0.2, side * 0.03]))
        self.target, self.goal = f"cube_{color}", "bin"
        return f"put the {color} cube in the bin"

    def success(self):
        c, g = self.env.body_pos(self.target), self.env.body_pos(self.goal)
        return bool(np.all(np.abs(c[:2] - g[:2]) < 0.06) and c[2] < 0.05 and self.released())


class PushCube(Task):
    name, env_id, max_steps = "push_cube", "vla/PushCube-v0", 100
    cube_colors = ("red", "green", "blue")
    REGION_Y = 0.14  # the cube's center must pass this |y| on the named side

    def objects_xml(self):
        return ("".join(scene.cube(f"cube_{c}", c) for c in self.cube_colors)
                + scene.strip("strip_left", 0.16) + scene.strip("strip_right", -0.16))

    def variants(self):
        return list(itertools.product(self.cube_colors, ("left", "right")))

    def setup(self, rng, variant):
        color, side = variant
        xs = rng.permutation(np.array([0.31, 0.42, 0.53]) + rng.uniform(-0.01, 0.01, 3))
        for c, x in zip(self.cube_colors, xs):
            self.env.place_free(f"cube_{c}", x, rng.uniform(-0.04, 0.04), rng.uniform(-0.3, 0.3), z=CUBE_HALF)
        self.target, self.side = f"cube_{color}", 1.0 if side == "left" else -1.0
        return f"push the {color} cube to the {side}"

    def success(self):
        return self.side * self.env.body_pos(self.target)[1] > self.REGION_Y

    def goal_pos(self):  # past the strip on the named side, in line with the cube
        target = self.target_pos()
        return np.array([target[0], self.side * (self.REGION_Y + 0.03), target[2]])


class StackCubes(Task):
    name, env_id, max_steps = "stack_cubes", "vla/StackCubes-v0", 150
    cube_colors = ("red", "green", "blue")

    def objects_xml(self):
        return "".join(scene.cube(f"cube_{c}", c) for c in self.cube_colors)

    def variants(self):
        return list(itertools.permutations(self.cube_colors, 2))

    def setup(self, rng, variant):
        top, bottom = variant
        self.place_cubes(rng, [f"cube_{c}" for c in self.cube_colors], min_dist=0.1)
        self.target, self.goal = f"cube_{top}", f"cube_{bottom}"
        return f"stack the {top} cube on the {bottom} cube"

    def success(self):
        a, b = self.env.body_pos(self.target), self.env.body_pos(self.goal)
        return (np.linalg.norm(a[:2] - b[:2]) < 0.025 and abs(a[2] - b[2] - 2 * CUBE_HALF) < 0.01
                and self.released())


class _DrawerTask(Task):
    def objects_xml(self):
        return scene.cabinet("cabinet") + scene.cube("cube_red", "red")

    def place_cabinet(self, rng, opening: float):
        self.env.place_mocap("cabinet", rng.uniform(0.58, 0.62), rng.uniform(-0.12, 0.12))
        adr = self.env.model.joint("cabinet").qposadr[0]
        self.env.data.qpos[adr] = opening
        # a distractor cube beside the cabinet
        cab = self.env.data.mocap_pos[self.env.model.body("cabinet").mocapid[0]]
        side = -np.sign(cab[1]) or 1.0
        self.env.place_free("cube_red", rng.uniform(0.3, 0.4), cab[1] + side * rng.uniform(0.17, 0.22),
                            rng.uniform(-0.5, 0.5), z=CUBE_HALF)

    def opening(self) -> float:
        return self.env.joint_q("cabinet")

    def target_pos(self):  # the handle, where the gripper pushes or pulls
        return self.env.data.geom("cabinet_handle").xpos.copy()


class OpenDrawer(_DrawerTask):
    name, env_id, max_steps = "open_drawer", "vla/OpenDrawer-v0", 120

    def variants(self):
        return ["open the drawer", "pull the drawer open"]

    def setup(self, rng, text):
        self.place_cabinet(rng, rng.uniform(0.0, 0.01))
        return text

    def success(self):
        return self.opening() > 0.1


class CloseDrawer(_DrawerTask):
    name, env_id, max_steps = "close_drawer", "vla/CloseDrawer-v0", 120

    def variants(self):
        return ["close the drawer", "push the drawer shut"]

    def setup(self, rng, text):
        self.place_cabinet(rng, rng.uniform(0.12, 0.15))
        return text

    def success(self):
        return self.opening() < 0.02


class PressButton(Task):
    name, env_id, max_steps = "press_button", "vla/PressButton-v0", 80
    colors = ("red", "green", "blue")

    def objects_xml(self):
        return "".join(scene.button(f"button_{c}", c) for c in self.colors)

    def variants(self):
        return list(self.colors)

    def setup(self, rng, color):
        pts = sample_positions(rng, 3, (0.33, 0.5), (-0.2, 0.2), 0.11)
        for c, (px, py) in zip(self.colors, pts):
            self.env.place_mocap(f"button_{c}", px, py)
        self.target = f"button_{color}"
        return f"press the {color} button"

    def success(self):
        return self.env.joint_q(self.target) < -0.7 * scene.BUTTON_TRAVEL


TASKS: dict[str, type[Task]] = {t.name: t for t in (
    PickCube, PlaceOnPlate, PlaceInBin, PushCube, StackCubes, OpenDrawer, CloseDrawer, PressButton)}
ENV_IDS = {t.env_id: name for name, t in TASKS.items()}


def resolve_task(name: str) -> str:
    """Accepts a task name ("pick_cube") or a gymnasium id ("vla/PickCube-v0")."""
    if name in TASKS:
        return name
    if name in ENV_IDS:
        return ENV_IDS[name]
    raise ValueError(f"unknown task {name!r}; known: {', '.join(sorted(TASKS))} "
                     f"(or ids {', '.join(sorted(ENV_IDS))})")


def resolve_tasks(value: str) -> list[str]:
    """"all", or a comma-separated list of task names / ids."""
    if value == "all":
        return list(TASKS)
    return [resolve_task(t.strip()) for t in value.split(",") if t.strip()]
