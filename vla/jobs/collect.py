"""Expert demonstrations into a LeRobotDataset v3, rolled out by worker processes.

Episode seeds are `seed + k` per task; only successful expert episodes are kept (a failed seed is
replaced by the next one). Each episode row records `sim_task`, `sim_seed` and `sim_variant`, so a
second run on the same directory collects only what is missing to reach `episodes` per task: an
interrupted run resumes, a finished one is a no-op. Evaluation uses seeds from EVAL_SEED_START,
never used here.

With `variants_per_seed` k > 1 each seed's scene is collected under k different instructions (the
layout is the same, the named target differs): contrastive pairs that make the instruction the
only way to tell the trajectories apart.

`suite="metaworld"` rolls out MetaWorld's own scripted experts instead (in its environment, see
vla.jobs.suites): one camera, the 4-d hand state, 4-d actions, 80 fps.
"""

from __future__ import annotations

import json
import multiprocessing as mp
import sys
import time
from pathlib import Path

import numpy as np
from tqdm import tqdm

from vla.dataset import PIXEL_KEYPOINTS, DatasetError, DatasetWriter
from vla.jobs.suites import expert_episode, make_suite_env, start_scene, suite_cameras, suite_dataset, suite_tasks
from vla.serving.env_client import EnvServerError
from vla.sim.env import CAMERAS
from vla.sim.tasks import TASKS

_ENVS: dict = {}  # a worker's envs, one per (suite, task, image size, cameras)


def dataset_features(image_size: int, cameras=CAMERAS) -> dict:
    """The tabletop suite's features (cameras, 7-d state and action, the keypoints)."""
    return suite_dataset("tabletop", image_size, cameras)[1]


def _rollout(job):
    """Worker: one expert episode -> arrays, or None if the expert failed. A scene-only job records
    just the first frame (arm at home) with its keypoints; its action repeats the state."""

    task, seed, variant, image_size, cameras, scenes_only, suite = job
    key = (suite, task, image_size, cameras)
    if key not in _ENVS:
        _ENVS[key] = make_suite_env(suite, task, image_size, cameras)
    env = _ENVS[key]
    options = None if variant < 0 else {"variant": variant}
    if scenes_only:
        obs = start_scene(suite, env, seed, options)
        success, frames = True, [(obs, obs["observation.state"].copy())]
    else:
        success, frames = expert_episode(suite, env, seed, options)
    if not success:
        return task, seed, variant, None
    out = {f"observation.images.{c}": np.stack([o[f"observation.images.{c}"] for o, _ in frames])
           for c in cameras}
    for key in ("observation.state", "observation.environment_state", PIXEL_KEYPOINTS):
        if key in frames[0][0]:
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
            variants_per_seed: int = 1, scenes_only: bool = False, suite: str = "tabletop") -> dict:
    """Collect `episodes` successful expert episodes per task into `out`. Returns a summary.

    `scenes_only`: one-frame episodes of the start scene instead (no expert), cheap enough to have
    thousands of layouts; for the keypoint loss only (`train.keypoint_dataset`), never for actions."""
    tasks = suite_tasks(suite, tasks)
    if suite != "tabletop" and variants_per_seed > 1:
        raise ValueError("--variants-per-seed is the tabletop suite's")
    cameras = tuple(cameras) if suite == "tabletop" else suite_cameras(suite)
    fps, features, robot_type = suite_dataset(suite, image_size, cameras)
    writer = DatasetWriter(out, fps, features, robot_type=robot_type, episodes_per_file=episodes_per_file)
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
                            jobs.append((t, s, v, image_size, cameras, scenes_only, suite))
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
        summary = collect(args.out, args.tasks, args.episodes, workers=args.workers,
                          image_size=args.image_size, cameras=args.cameras.split(","), seed=args.seed,
                          variants_per_seed=args.variants_per_seed, scenes_only=args.scenes_only,
                          suite=args.suite)
    except (DatasetError, ValueError, EnvServerError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(json.dumps(summary, indent=2))
    return 0
