"""`vla eval`: policy rollouts in a suite's tasks (the tabletop sim, or MetaWorld), success with 95 %
Wilson intervals.

Seeds are pinned: episode k of a task uses seed EVAL_SEED_START + k, disjoint from the training
seeds `vla collect` uses. Episodes of a task can run in parallel processes (each loads the artifact).
"""

from __future__ import annotations

import json
import math
import multiprocessing as mp
import sys
import time
from pathlib import Path

import numpy as np
import torch
from matplotlib.figure import Figure
from tqdm import tqdm

from vla.artifact import ArtifactError
from vla.config import FastConfig, fast_config
from vla.jobs.suites import make_suite_env, suite_tasks
from vla.policies import Policy, SpecMismatchError, shipped_policy
from vla.serving.env_client import EnvServerError
from vla.sim import make_env
from vla.sim.env import CAMERAS
from vla.sim.experts import ScriptedExpert
from vla.sim.metaworld_tasks import MT10
from vla.sim.tasks import EVAL_SEED_START, TASKS, resolve_tasks
from vla.video import write_video


def wilson_interval(successes: int, n: int, z: float = 1.96) -> tuple[float, float]:
    if n == 0:
        return 0.0, 1.0
    p = successes / n
    denom = 1 + z * z / n
    center = (p + z * z / (2 * n)) / denom
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / denom
    return max(0.0, center - half), min(1.0, center + half)


def run_episode(policy, env, seed: int, record: bool = False, video_size: int = 256):
    """One rollout: (success, steps, inference ms list, frames)."""
    obs, info = env.reset(seed=seed)
    policy.reset(seed)
    camera = "front" if "front" in env.cameras else env.cameras[0]  # the video's
    frames = [env.render_camera(camera, video_size)] if record else []
    infer_ms = []
    for _ in range(env.max_episode_steps):
        action = policy.act(obs)
        if getattr(policy, "last_infer_ms", None) is not None:  # this step ran the model
            infer_ms.append(policy.last_infer_ms)
        obs, _, terminated, truncated, info = env.step(action)
        if record:
            frames.append(env.render_camera(camera, video_size))
        if terminated or truncated:
            break
    return bool(info["success"]), env.steps, infer_ms, frames


def _worker(job):
    policy_path, task, seeds, record_seeds, threads, ensemble, fast, suite = job
    torch.set_num_threads(threads)
    policy = Policy.from_pretrained(policy_path, ensemble=ensemble, fast=fast)
    return _rollouts(policy, task, seeds, record_seeds, suite)


def _rollouts(policy, task, seeds, record_seeds, suite="tabletop"):
    spec = policy.spec
    missing = [c for c in spec.cameras if c not in CAMERAS]
    if suite == "tabletop" and missing:
        raise SpecMismatchError(f"policy spec does not match the environment: cameras {missing} "
                                f"are not in the sim (it has {list(CAMERAS)})")
    env = make_suite_env(suite, task, spec.image_size, spec.cameras)
    policy.check_compatible(env.cameras, env.image_size, env.action_space.shape[0],
                            env.observation_space["observation.state"].shape[0])
    out = []
    for s in seeds:
        ok, steps, ms, frames = run_episode(policy, env, s, record=s in record_seeds)
        out.append({"task": task, "seed": s, "success": ok, "steps": steps, "infer_ms": ms,
                    "frames": frames or None, "instruction": env.instruction})
    env.close()
    return out


def evaluate(policy, tasks=None, episodes: int = 50, workers: int = 1, out: str | Path | None = None,
             videos: int = 2, seed_start: int = EVAL_SEED_START, progress: bool = True,
             ensemble: str = "queue", fast: FastConfig | None = None, suite: str = "tabletop") -> dict:
    """`policy`: an artifact path (required for workers > 1) or a Policy object. `fast`: the
    real-time step's FastConfig instead of the plain model path. `tasks`: the suite's names
    (default: every tabletop task, MetaWorld's MT10)."""

    tasks = suite_tasks(suite, tasks or (MT10 if suite == "metaworld" else list(TASKS)))
    seeds = list(range(seed_start, seed_start + episodes))
    record = set(seeds[:videos]) if out else set()
    t0 = time.perf_counter()
    results = []
    bar = tqdm(total=len(tasks) * episodes, desc="eval", unit="ep", disable=not progress)
    if workers > 1:
        if not isinstance(policy, (str, Path)):
            raise ValueError("parallel evaluation needs the policy's artifact path")
        # at least two jobs per worker, so that short tasks do not leave a worker idle
        chunks_per_task = max(1, math.ceil(2 * workers / len(tasks)))
        per_job = max(1, math.ceil(episodes / chunks_per_task))
        jobs = [(str(policy), t, seeds[i:i + per_job], record, 1, ensemble, fast, suite)
                for t in tasks for i in range(0, episodes, per_job)]
        with mp.get_context("spawn").Pool(workers) as pool:
            for res in pool.imap_unordered(_worker, jobs):
                results.extend(res)
                bar.update(len(res))
    else:
        if isinstance(policy, (str, Path)):
            policy = Policy.from_pretrained(policy, ensemble=ensemble, fast=fast)
        for t in tasks:
            for s in seeds:
                results.extend(_rollouts(policy, t, [s], record, suite))
                bar.update(1)
    bar.close()
    wall = time.perf_counter() - t0

    summary = {"suite": suite, "episodes_per_task": episodes, "seed_start": seed_start, "wall_s": wall, "tasks": {}}
    for t in tasks:
        rs = [r for r in results if r["task"] == t]
        k = sum(r["success"] for r in rs)
        lo, hi = wilson_interval(k, len(rs))
        summary["tasks"][t] = {"successes": k, "episodes": len(rs), "success_rate": k / max(1, len(rs)),
                               "ci95": [lo, hi], "mean_steps": float(np.mean([r["steps"] for r in rs]))}
    rates = [v["success_rate"] for v in summary["tasks"].values()]
    summary["mean_success"] = float(np.mean(rates))
    ms = [m for r in results for m in r["infer_ms"]]
    summary["inference_ms"] = {"median": float(np.median(ms)), "p99": float(np.percentile(ms, 99))} if ms else {}
    if out:
        _write_outputs(Path(out), summary, results)
    return summary


def format_table(summary: dict) -> str:
    w = max([16] + [len(t) for t in summary["tasks"]])  # MetaWorld's names are longer
    lines = [f"{'task':{w}s} {'success':>9s} {'rate':>6s} {'95% CI':>15s} {'mean steps':>11s}"]
    for t, v in summary["tasks"].items():
        lo, hi = v["ci95"]
        lines.append(f"{t:{w}s} {v['successes']:>4d}/{v['episodes']:<4d} {v['success_rate']:6.2f} "
                     f"  [{lo:.2f}, {hi:.2f}] {v['mean_steps']:11.1f}")
    lines.append(f"{'mean':{w}s} {'':9s} {summary['mean_success']:6.2f}")
    if summary.get("inference_ms"):
        lines.append(f"inference per chunk: median {summary['inference_ms']['median']:.1f} ms, "
                     f"p99 {summary['inference_ms']['p99']:.1f} ms")
    return "\n".join(lines)


def _write_outputs(out: Path, summary: dict, results: list) -> None:
    out.mkdir(parents=True, exist_ok=True)
    episodes = [{k: v for k, v in r.items() if k != "frames"} for r in results]
    (out / "results.json").write_text(json.dumps({**summary, "episodes": episodes}, indent=2))
    for r in results:
        if r["frames"]:
            tag = "success" if r["success"] else "failure"
            write_video(out / "videos" / f"{r['task']}_seed{r['seed']}_{tag}.mp4", r["frames"], fps=10)
    names = list(summary["tasks"])
    rates = np.array([summary["tasks"][t]["success_rate"] for t in names])
    lo = np.array([summary["tasks"][t]["ci95"][0] for t in names])
    hi = np.array([summary["tasks"][t]["ci95"][1] for t in names])
    fig = Figure(figsize=(max(6, len(names) * 0.9), 4))  # matplotlib's object API: no pyplot, no backend
    ax = fig.subplots()
    ax.bar(names, rates, yerr=[rates - lo, hi - rates], capsize=4, color="#4a7ab5")
    ax.set_ylim(0, 1.05)
    ax.set_ylabel("success rate (95% Wilson CI)")
    ax.set_title(f"{summary['episodes_per_task']} episodes per task, mean {summary['mean_success']:.2f}")
    ax.tick_params(axis="x", labelrotation=30)
    for label in ax.get_xticklabels():
        label.set_horizontalalignment("right")
    fig.tight_layout()
    fig.savefig(out / "success.png", dpi=100)


# --- `vla eval`, `vla demo` ---
def cmd_eval(args) -> int:
    try:
        fast = fast_config(args.fast, args.fast_opt)
        summary = evaluate(args.policy, args.tasks, args.episodes, workers=args.workers, out=args.out,
                           videos=args.videos, ensemble=args.ensemble, fast=fast, suite=args.suite)
    except (SpecMismatchError, ArtifactError, ValueError, EnvServerError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(format_table(summary))
    if args.out:
        print(f"results: {Path(args.out) / 'results.json'}, plot: {Path(args.out) / 'success.png'}, "
              f"videos: {Path(args.out) / 'videos'}")
    return 0


def cmd_demo(args) -> int:
    """The main job: the shipped policy drives the simulated arm through every task (or, with
    --expert, the scripted experts do); success table and mp4 videos in --out."""
    if args.expert:
        return _demo_experts(args, resolve_tasks(args.tasks))

    policy = Path(args.policy) if args.policy else shipped_policy()
    tasks = resolve_tasks(args.tasks)
    print(f"policy: {policy}")
    summary = evaluate(policy, tasks, args.episodes, workers=args.workers, out=args.out, videos=1)
    print(format_table(summary))
    print(f"videos: {Path(args.out) / 'videos'}  results: {Path(args.out) / 'results.json'}")
    return 0


def _demo_experts(args, tasks: list[str]) -> int:
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    wins = 0
    print(f"{'task':16s} {'instruction':42s} {'success':>7s} {'steps':>5s}  video")
    for task in tasks:
        env = make_env(task, cameras=(), render_mode="rgb_array", render_size=256)
        env.reset(seed=args.seed)
        expert = ScriptedExpert(env)
        expert.reset()
        frames = [env.render()]
        info = {"success": False}
        for _ in range(env.max_episode_steps):
            _, _, terminated, truncated, info = env.step(expert.act())
            frames.append(env.render())
            if terminated or truncated:
                break
        path = out / f"{task}.mp4"
        write_video(path, frames, fps=env.metadata["render_fps"])
        wins += info["success"]
        print(f"{task:16s} {env.instruction:42s} {str(info['success']):>7s} {env.steps:5d}  {path}")
        env.close()
    print(f"expert success: {wins}/{len(tasks)}")
    return 0 if wins == len(tasks) else 1
