"""Expert demonstrations into a LeRobotDataset v3, rolled out by worker processes.

Episode seeds are `seed + k` per task; only successful expert episodes are kept (a failed seed is
replaced by the next one). Each episode row records `sim_task`, `sim_seed` and `sim_variant`, so a
second run on the same directory collects only what is missing to reach `episodes` per task: an
interrupted run resumes, a finished one is a no-op. Evaluation uses seeds from EVAL_SEED_START,
never used here.

With `variants_per_seed` k > 1 each seed's scene is collected under k different instructions (the
layout is the same, the named target differs): contrastive pairs that make the instruction the
only way to tell the trajectories apart.
"""

from __future__ import annotations

import json
import multiprocessing as mp
import sys
import time
from pathlib import Path

import numpy as np
from tqdm import tqdm

from vla.dataset import DatasetError, DatasetWriter, video_feature
from vla.sim import make_env
from vla.sim.env import CAMERAS, CONTROL_HZ
from vla.sim.experts import run_expert_episode
from vla.sim.ik import ARM_JOINTS
from vla.sim.tasks import TASKS, resolve_task, resolve_tasks

STATE_NAMES = [f"{j}.pos" for j in ARM_JOINTS] + ["gripper.pos"]
KEYPOINT_NAMES = ["target.x", "target.y", "target.z", "goal.x", "goal.y", "goal.z"]
_ENVS: dict = {}


def dataset_features(image_size: int, cameras=CAMERAS) -> dict:
    feats = {f"observation.images.{c}": video_feature(image_size, image_size, CONTROL_HZ) for c in cameras}
    feats["observation.state"] = {"dtype": "float32", "shape": [7], "names": STATE_NAMES}
    feats["action"] = {"dtype": "float32", "shape": [7], "names": STATE_NAMES}
    feats["observation.environment_state"] = {"dtype": "float32", "shape": [6], "names": KEYPOINT_NAMES}
    return feats


def _rollout(job):
    """Worker: one expert episode -> arrays, or None if the expert failed. A scene-only job records
    just the first frame (arm at home) with its keypoints; its action repeats the state."""

    task, seed, variant, image_size, cameras, scenes_only = job
    key = (task, image_size, cameras)
    if key not in _ENVS:
        _ENVS[key] = make_env(task, image_size=image_size, cameras=cameras)
    env = _ENVS[key]
    options = None if variant < 0 else {"variant": variant}
    if scenes_only:
        obs, _ = env.reset(seed=seed, options=options)
        obs = {**obs, "observation.environment_state": env.task.keypoints()}
        success, frames = True, [(obs, obs["observation.state"].copy())]
    else:
        success, length, frames = run_expert_episode(env, seed, record=True, options=options)
    if not success:
        return task, seed, variant, None
    out = {f"observation.images.{c}": np.stack([o[f"observation.images.{c}"] for o, _ in frames])
           for c in cameras}
    for key in ("observation.state", "observation.environment_state"):
        out[key] = np.stack([o[key] for o, _ in frames])
    out["action"] = np.stack([a for _, a in frames])
    return task, seed, variant, (out, frames[0][0]["task"])


def _seed_jobs(task: str, seed: int, k: int) -> list[tuple[int, int]]:
    """(seed, variant) pairs for one seed: variant -1 lets the env draw it; k > 1 takes k distinct
    variants in an order fixed by the seed."""
    if k <= 1:
        return [(seed, -1)]
    n = len(TASKS[task]().variants())
    return [(seed, int(v)) for v in np.random.default_rng(seed).permutation(n)[:k]]


def collect(out: str | Path, tasks: list[str], episodes: int, workers: int = 2, image_size: int = 96,
            cameras=CAMERAS, seed: int = 0, episodes_per_file: int = 100, progress: bool = True,
            variants_per_seed: int = 1, scenes_only: bool = False) -> dict:
    """Collect `episodes` successful expert episodes per task into `out`. Returns a summary.

    `scenes_only`: one-frame episodes of the start scene instead (no expert), cheap enough to have
    thousands of layouts; for the keypoint loss only (`train.keypoint_dataset`), never for actions."""
    tasks = [resolve_task(t) for t in tasks]
    cameras = tuple(cameras)
    writer = DatasetWriter(out, CONTROL_HZ, dataset_features(image_size, cameras), robot_type="vla_arm6",
                           episodes_per_file=episodes_per_file)
    done = {t: set() for t in tasks}
    for e in writer.episodes:
        if e.get("sim_task") in done:
            variant = e.get("sim_variant")
            done[e["sim_task"]].add((e["sim_seed"], -1 if variant is None else int(variant)))
    next_seed = {t: seed for t in tasks}
    failed = {t: 0 for t in tasks}
    todo = sum(max(0, episodes - len(done[t])) for t in tasks)
    frames_written, t0 = 0, time.perf_counter()
    ctx = mp.get_context("spawn")
    bar = tqdm(total=todo, desc="collect", unit="ep", disable=not progress)
    with ctx.Pool(workers) as pool:
        while True:
            jobs = []
            for t in tasks:
                need = episodes - len(done[t])
                while need > 0:
                    for s, v in _seed_jobs(t, next_seed[t], variants_per_seed):
                        if (s, v) not in done[t] and need > 0:
                            jobs.append((t, s, v, image_size, cameras, scenes_only))
                            need -= 1
                    next_seed[t] += 1
            if not jobs:
                break
            for task, s, v, result in pool.imap(_rollout, jobs):
                if result is None:
                    failed[task] += 1
                    continue
                arrays, instruction = result
                writer.add_episode(arrays, instruction, extra={"sim_task": task, "sim_seed": s, "sim_variant": v,
                                                               "sim_scene_only": scenes_only})
                done[task].add((s, v))
                frames_written += len(arrays["action"])
                bar.update(1)
                bar.set_postfix(frames=frames_written)
    writer.close()
    bar.close()
    elapsed = time.perf_counter() - t0
    return {"episodes_written": todo, "frames": frames_written, "seconds": elapsed,
            "frames_per_s": frames_written / elapsed if elapsed > 0 else 0.0, "expert_failures": failed,
            "total_episodes": writer.info["total_episodes"]}


# --- `vla collect` ---
def cmd_collect(args) -> int:
    try:
        summary = collect(args.out, resolve_tasks(args.tasks), args.episodes, workers=args.workers,
                          image_size=args.image_size, cameras=args.cameras.split(","), seed=args.seed,
                          variants_per_seed=args.variants_per_seed, scenes_only=args.scenes_only)
    except (DatasetError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(json.dumps(summary, indent=2))
    return 0
