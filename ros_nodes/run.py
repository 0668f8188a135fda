"""`vla run`: the sim robot node and the policy node on one ROS2 graph; episodes, success, latency.

Both nodes spin in this process on one single-threaded executor (every callback takes well under a
millisecond: the model runs in the policy node's inference server process, and rclpy's
multi-threaded executor measured 10x the jitter here), talking over real ROS2 topics through DDS.
"""

from __future__ import annotations

import itertools
import json
import os
import resource
import sys
import time
from importlib.resources import files
from pathlib import Path

import rclpy
import yaml
from rclpy.executors import SingleThreadedExecutor

from vla.ros_nodes.policy_node import PolicyNode
from vla.ros_nodes.sim_node import SimRobotNode
from vla.sim import EVAL_SEED_START, resolve_tasks


def node_parameters(path: str | Path | None) -> dict:
    """The `vla_policy: ros__parameters:` map of a ROS2 parameter YAML (configs/policy_node.yaml)."""
    if path is None:
        path = Path(str(files("vla.configs") / "policy_node.yaml"))
    doc = yaml.safe_load(Path(path).read_text()) or {}
    try:
        return dict(doc["vla_policy"]["ros__parameters"])
    except (KeyError, TypeError):
        raise ValueError(f"{path}: expected vla_policy: ros__parameters: {{...}}") from None


def rss_mb(pid: int) -> float | None:
    """Resident memory of a process in MB (Linux /proc), or None."""
    try:
        with open(f"/proc/{pid}/status") as f:
            return next(int(line.split()[1]) / 1024 for line in f if line.startswith("VmRSS:"))
    except (OSError, StopIteration):
        return None


def run(tasks: list[str], episodes: int = 1, seed: int = EVAL_SEED_START, params: dict | None = None,
        policy=None, timeout_s: float = 600.0, domain_id: int | None = None, progress: bool = True,
        duration_s: float | None = None) -> dict:
    """Each task's episodes in turn; with duration_s, the tasks cycle (new seeds each round) until
    that many seconds have passed (a soak), and memory is reported after the first round and at the end."""
    params = dict(params or {})
    if domain_id is not None:
        os.environ["ROS_DOMAIN_ID"] = str(domain_id)
    rclpy.init()
    results, statuses = [], []
    def cpu_s():  # this process and its finished children (the policy node's inference server)
        u, c = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
        return u.ru_utime + u.ru_stime + c.ru_utime + c.ru_stime

    cpu0, wall0 = cpu_s(), time.perf_counter()
    path = params.pop("policy", "")  # the `policy` parameter (an artifact directory) shares the name
    try:
        node = PolicyNode(policy=policy if policy is not None else (path or None), **params)
    except BaseException:
        rclpy.shutdown()  # a bad parameter leaves ROS as it found it
        raise
    policy_path = node.get_parameter("policy").value  # "" for the shipped one or an object passed in
    pids = {"node": os.getpid()}
    if node._local is not None:
        pids["server"] = node._local.process.pid
    memory = {"start": {k: rss_mb(p) for k, p in pids.items()}}
    t_stop = time.monotonic() + duration_s if duration_s else float("inf")
    sims = {}  # task -> its sim robot node, kept across a soak's rounds
    try:
        spec = node.policy.spec
        rounds = itertools.count() if duration_s else range(1)
        for round_, task in ((n, t) for n in rounds for t in tasks):
            if time.monotonic() >= t_stop:
                break
            if round_ == 1 and "first_round" not in memory:
                memory["first_round"] = {k: rss_mb(p) for k, p in pids.items()}
            if task in sims:  # a soak's next round: the same sim robot, new seeds
                sim = sims[task]
                sim.begin(seed + round_ * episodes, episodes)
            else:
                sim = sims[task] = SimRobotNode(task, seed=seed, episodes=episodes, image_size=spec.image_size,
                                                cameras=spec.cameras, command_type=node.command_type,
                                                joint_names=node.joint_names,
                                                node_name=f"vla_sim_robot_{task}")  # one name per live node
            executor = SingleThreadedExecutor()
            executor.add_node(node)
            executor.add_node(sim)
            t_end = min(time.monotonic() + timeout_s, t_stop)
            while not sim.done and time.monotonic() < t_end:
                executor.spin_once(timeout_sec=0.1)
            if progress:
                wins = sum(r["success"] for r in sim.results)
                print(f"{task:16s} {wins}/{len(sim.results)} success", flush=True)
            results.extend(sim.results)
            statuses.append(node.status())
            executor.remove_node(sim)
            executor.shutdown()
        if node._local is not None:
            pids["server"] = node._local.process.pid  # restarted, perhaps
        memory["end"] = {k: rss_mb(p) for k, p in pids.items()}
    finally:
        for sim in sims.values():
            sim.destroy_node()
        node.destroy_node()
        rclpy.shutdown()
    wall = time.perf_counter() - wall0
    cpu = (cpu_s() - cpu0) / wall
    final = statuses[-1] if statuses else {}
    return {"policy": policy_path, "episodes": results,
            "success_rate": sum(r["success"] for r in results) / max(1, len(results)),
            "status": final, "wall_s": wall, "cpu_cores_used": cpu, "rss_mb": memory}


def format_run(r: dict) -> str:
    s = r["status"]

    def f(x):
        return "n/a" if x is None else f"{x:.1f}"

    return "\n".join([
        f"success {sum(e['success'] for e in r['episodes'])}/{len(r['episodes'])} ({100 * r['success_rate']:.0f} %)",
        f"inference ms p50 {f(s.get('infer_ms_p50'))} p99 {f(s.get('infer_ms_p99'))}; camera-to-command ms "
        f"p50 {f(s.get('latency_ms_p50'))} p99 {f(s.get('latency_ms_p99'))}",
        f"control jitter ms p50 {f(s.get('jitter_ms_p50'))} p99 {f(s.get('jitter_ms_p99'))}; dropped periods "
        f"{s.get('dropped_periods')}; commands {s.get('commands')}; clamped {s.get('clamped')}; "
        f"rejected {json.dumps(s.get('rejected'))}",
        f"clamped per channel: joint limits {json.dumps(s.get('limit_hits'))}, rate {json.dumps(s.get('rate_hits'))}",
        f"wall {r['wall_s']:.0f} s, CPU {r['cpu_cores_used']:.2f} cores; memory MB "
        + "; ".join(f"{when} " + ", ".join(f"{k} {v:.0f}" for k, v in m.items() if v is not None)
                    for when, m in r.get("rss_mb", {}).items()),
    ])


# --- `vla run` ---
def cmd_run(args) -> int:
    """The shipped policy (or --policy) drives the simulated arm through real ROS2."""
    try:
        tasks, params = resolve_tasks(args.tasks), node_parameters(args.params)
        if args.policy:
            params["policy"] = args.policy
        if args.fast:
            params["fast"] = args.fast
        if args.remote:
            params["remote"] = args.remote
        params = {k: v for k, v in params.items() if v != ""}
        r = run(tasks, episodes=args.episodes, seed=args.seed, params=params, domain_id=args.domain_id,
                duration_s=args.duration)
    except (ValueError, OSError) as e:  # a bad task, parameter file or artifact
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(format_run(r))
    if args.json:
        Path(args.json).write_text(json.dumps(r, indent=2))
    return 0
