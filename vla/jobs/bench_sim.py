"""Figures for BENCHMARKS.md: expert success, sim step and render time, collect and reader speed."""

from __future__ import annotations

import copy
import json
import multiprocessing as mp
import tempfile
import time
from pathlib import Path

import mujoco
import numpy as np

from vla.dataset import LeRobotDataset
from vla.jobs.collect import collect
from vla.sim import make_env, resolve_tasks
from vla.sim.experts import ScriptedExpert, run_expert_episode


def _expert_job(job):
    task, seeds = job
    env = make_env(task, cameras=())
    return task, [run_expert_episode(env, s)[:2] for s in seeds]


def expert_table(tasks: list[str], episodes: int, workers: int = 2, seed: int = 0) -> list[dict]:
    """Expert success over seeds seed..seed+episodes-1 per task (no rendering)."""
    per_job = max(1, episodes // (2 * workers))
    jobs = [(t, list(range(s, min(s + per_job, seed + episodes)))) for t in tasks
            for s in range(seed, seed + episodes, per_job)]
    results = {t: [] for t in tasks}
    with mp.get_context("spawn").Pool(workers) as pool:
        for task, res in pool.imap_unordered(_expert_job, jobs):
            results[task].extend(res)
    rows = []
    for t in tasks:
        ok = [s for s, _ in results[t]]
        rows.append({"task": t, "episodes": len(ok), "successes": int(sum(ok)), "rate": float(np.mean(ok)),
                     "mean_length": float(np.mean([n for _, n in results[t]]))})
    return rows


def _median_ms(fn, n: int) -> float:
    times = []
    for _ in range(n):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return float(np.median(times) * 1e3)


def bench_sim(tasks: list[str], workers: int = 2, episodes: int = 10) -> dict:
    env = make_env("stack_cubes", image_size=96)
    env.reset(seed=0)
    expert = ScriptedExpert(env)
    expert.reset()
    env.data.ctrl[:] = np.append(expert.act()[:6], [0.04, 0.04])
    step_ms = _median_ms(lambda: mujoco.mj_step(env.model, env.data, nstep=env.n_substeps), 200)
    render_ms = {}
    for size in (64, 96, 128):
        env.render_camera("front", size)
        render_ms[str(size)] = _median_ms(lambda: env.render_camera("front", size), 200)
    # the same frame with MuJoCo's defaults (shadow-casting light, 4096 px shadow map), for the ratio
    shadowed = copy.copy(env.model)
    shadowed.vis.quality.shadowsize = 4096
    shadowed.light_castshadow[:] = 1
    r = mujoco.Renderer(shadowed, 96, 96)

    def render_shadowed():
        r.update_scene(env.data, camera="front")
        r.render()

    render_ms["96+shadows"] = _median_ms(render_shadowed, 50)
    r.close()
    env.reset(seed=1)
    expert.reset()
    env_step_ms = _median_ms(lambda: env.step(expert.act()), 40)

    with tempfile.TemporaryDirectory() as tmp:
        summary = collect(f"{tmp}/ds", tasks, episodes, workers=workers, image_size=96, progress=False)
        t0 = time.perf_counter()
        ds = LeRobotDataset(f"{tmp}/ds", horizon=16)
        ds.batch(np.arange(len(ds)))  # decodes every episode once into the frame cache
        load_s = time.perf_counter() - t0
        rng = np.random.default_rng(0)
        idx = rng.integers(len(ds), size=20000)
        t0 = time.perf_counter()
        for i in idx:
            ds[int(i)]
        samples_per_s = len(idx) / (time.perf_counter() - t0)
    return {
        "substeps": env.n_substeps, "step_ms": step_ms, "render_ms": render_ms, "env_step_ms": env_step_ms,
        "collect": {"frames": summary["frames"], "frames_per_s": summary["frames_per_s"], "workers": workers,
                    "tasks": tasks, "episodes_per_task": episodes},
        "reader": {"frames": len(ds), "load_s": load_s, "samples_per_s": samples_per_s},
    }


# --- `vla experts`, `vla bench-sim` ---
def cmd_experts(args) -> int:
    rows = expert_table(resolve_tasks(args.tasks), args.episodes, args.workers, args.seed)
    print(f"{'task':16s} {'successes':>10s} {'rate':>6s} {'mean length':>12s}")
    for r in rows:
        print(f"{r['task']:16s} {r['successes']:>4d}/{r['episodes']:<5d} {r['rate']:6.2f} {r['mean_length']:12.1f}")
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=2))
    return 0


def cmd_bench_sim(args) -> int:
    result = bench_sim(resolve_tasks(args.tasks), workers=args.workers, episodes=args.episodes)
    print(json.dumps(result, indent=2) if args.json else format_bench_sim(result))
    return 0


def format_bench_sim(r: dict) -> str:
    lines = [f"physics step (0.1 s of sim, {r['substeps']} substeps): {r['step_ms']:.3f} ms median"]
    for size, ms in r["render_ms"].items():
        lines.append(f"render {size} px, one camera: {ms:.3f} ms median")
    lines.append(f"shadows off saves {r['render_ms']['96+shadows'] / r['render_ms']['96']:.1f}x at 96 px")
    lines.append(f"env.step with 2 cameras at 96 px: {r['env_step_ms']:.3f} ms median")
    lines.append(f"collect: {r['collect']['frames_per_s']:.0f} frames/s "
                 f"({r['collect']['frames']} frames, {r['collect']['workers']} workers)")
    lines.append(f"reader: {r['reader']['samples_per_s']:.0f} samples/s from the frame cache after "
                 f"{r['reader']['load_s']:.2f} s opening and decoding {r['reader']['frames']} frames")
    return "\n".join(lines)
