"""MuJoCo tabletop tasks as gymnasium environments (ids under the `vla/` namespace)."""

import gymnasium as gym

from vla.sim.env import CAMERAS, CONTROL_HZ, TabletopEnv
from vla.sim.tasks import EVAL_SEED_START, TASKS, resolve_task, resolve_tasks


def make_env(task: str, **kwargs) -> TabletopEnv:
    """The env for a task name or id, without gymnasium's wrappers (the episode limit is inside)."""
    return TabletopEnv(resolve_task(task), **kwargs)


for _name, _task in TASKS.items():
    if _task.env_id not in gym.registry:
        gym.register(_task.env_id, entry_point="vla.sim.env:TabletopEnv", kwargs={"task": _name},
                     max_episode_steps=_task.max_steps, disable_env_checker=True)

__all__ = ["CAMERAS", "CONTROL_HZ", "EVAL_SEED_START", "TASKS", "TabletopEnv", "make_env", "resolve_task", "resolve_tasks"]
