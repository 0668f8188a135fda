"""`vla run`: the sim robot node and the policy node on one ROS2 graph; episodes, success, latency.

Both nodes spin in this process on one single-threaded executor (every callback takes well under a
millisecond: the model runs in the policy node's inference server process, and rclpy's
multi-threaded executor measured 10x the jitter here), talking over real ROS2 topics through DDS.
"""

from __future__ import annotations

import json
import os
import resource
import time
from pathlib import Path

import yaml


def node_parameters(path: str | Path | None) -> dict:
    """The `vla_policy: ros__parameters:` map of a ROS2 parameter YAML (configs/policy_node.yaml)."""
    if path is None:
        from importlib.resources import files

        path = Path(str(files("vla.configs") / "policy_node.yaml"))
    doc = yaml.safe_load(Path(path).read_text()) or {}
    try:
        return dict(doc["vla_policy"]["ros__parameters"])
    except (KeyError, TypeError):
        raise ValueError(f"{path}: expected vla_policy: ros__parameters: {{...}}") from None


def run(tasks: list[str], episodes: int = 1, seed: int = 1_000_000, params: dict | None = None,
        policy=None, timeout_s: float = 600.0, domain_id: int | None = None, progress: bool = True) -> dict:
    import rclpy
    from rclpy.executors import SingleThreadedExecutor

    from vla.ros_nodes.policy_node import PolicyNode
    from vla.ros_nodes.sim_node import SimRobotNode

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
    try:
        spec = node.policy.spec
        for task in tasks:
            sim = SimRobotNode(task, seed=seed, episodes=episodes, image_size=spec["image_size"],
                               cameras=spec["cameras"], command_type=node.command_type,
                               joint_names=node.joint_names)
            executor = SingleThreadedExecutor()
            executor.add_node(node)
            executor.add_node(sim)
            t_end = time.monotonic() + timeout_s
            while not sim.done and time.monotonic() < t_end:
                executor.spin_once(timeout_sec=0.1)
            if progress:
                wins = sum(r["success"] for r in sim.results)
                print(f"{task:16s} {wins}/{len(sim.results)} success", flush=True)
            results.extend(sim.results)
            statuses.append(node.status())
            executor.remove_node(sim)
            executor.shutdown()
            sim.destroy_node()
    finally:
        node.destroy_node()
        rclpy.shutdown()
    wall = time.perf_counter() - wall0
    cpu = (cpu_s() - cpu0) / wall
    final = statuses[-1] if statuses else {}
    return {"policy": policy_path, "episodes": results,
            "success_rate": sum(r["success"] for r in results) / max(1, len(results)),
            "status": final, "wall_s": wall, "cpu_cores_used": cpu}


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
        f"wall {r['wall_s']:.0f} s, CPU {r['cpu_cores_used']:.2f} cores",
    ])
