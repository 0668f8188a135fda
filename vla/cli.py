"""The `vla` command: one subcommand per job."""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys
from importlib.resources import files
from pathlib import Path

import torch
import yaml
import zmq

from vla.dataset import DatasetError
from vla.fast import FastConfig
from vla.jobs.bench import CONFIGS, format_bench, kernel_bench, run_bench
from vla.jobs.bench_sim import bench_sim, expert_table
from vla.jobs.collect import collect
from vla.jobs.evaluate import evaluate, fast_config, format_table
from vla.jobs.train import main as train_main
from vla.policies import Policy, SpecMismatchError
from vla.serving import PolicyServer, load_authorized_keys, parse_bind
from vla.sim import EVAL_SEED_START, make_env
from vla.sim.experts import ScriptedExpert
from vla.sim.tasks import TASKS, resolve_task
from vla.video import write_video


def _tasks(value: str) -> list[str]:
    if value == "all":
        return list(TASKS)
    try:
        return [resolve_task(t.strip()) for t in value.split(",") if t.strip()]
    except ValueError as e:
        raise argparse.ArgumentTypeError(str(e)) from e


def shipped_policy(name: str = "nano_l1") -> Path:
    """A policy trained here and committed with the package (see BENCHMARKS.md for how): `nano_l1`,
    the default (one head pass: the fastest step, 91 % on the suite), or `nano_diffusion`
    (the diffusion head predicting the chunk, 10 DDIM steps, trained in 100 min: 82 %)."""

    return Path(str(files("vla.policies") / "shipped" / name))


def cmd_demo(args) -> int:
    """The main job: the shipped policy drives the simulated arm through every task (or, with
    --expert, the scripted experts do); success table and mp4 videos in --out."""
    if args.expert:
        return _demo_experts(args)

    policy = Path(args.policy) if args.policy else shipped_policy()
    print(f"policy: {policy}")
    summary = evaluate(policy, args.tasks, args.episodes, workers=args.workers, out=args.out, videos=1)
    print(format_table(summary))
    print(f"videos: {Path(args.out) / 'videos'}  results: {Path(args.out) / 'results.json'}")
    return 0


def _demo_experts(args) -> int:
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    wins = 0
    print(f"{'task':16s} {'instruction':42s} {'success':>7s} {'steps':>5s}  video")
    for task in args.tasks:
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
    print(f"expert success: {wins}/{len(args.tasks)}")
    return 0 if wins == len(args.tasks) else 1


def cmd_collect(args) -> int:
    try:
        summary = collect(args.out, args.tasks, args.episodes, workers=args.workers,
                          image_size=args.image_size, cameras=args.cameras.split(","), seed=args.seed,
                          variants_per_seed=args.variants_per_seed, scenes_only=args.scenes_only)
    except DatasetError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(json.dumps(summary, indent=2))
    return 0


def cmd_experts(args) -> int:
    rows = expert_table(args.tasks, args.episodes, args.workers, args.seed)
    print(f"{'task':16s} {'successes':>10s} {'rate':>6s} {'mean length':>12s}")
    for r in rows:
        print(f"{r['task']:16s} {r['successes']:>4d}/{r['episodes']:<5d} {r['rate']:6.2f} {r['mean_length']:12.1f}")
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=2))
    return 0


def cmd_bench_sim(args) -> int:
    result = bench_sim(args.tasks, workers=args.workers, episodes=args.episodes)
    print(json.dumps(result, indent=2) if args.json else _format_bench(result))
    return 0


def cmd_train(args) -> int:
    try:
        return train_main([args.recipe, *args.overrides] + (["--resume"] if args.resume else []))
    except (DatasetError, ValueError, OSError) as e:  # a bad recipe, dataset, init artifact or output_dir
        print(f"error: {e}", file=sys.stderr)
        return 2


FAST_PRESETS = {"off": None, "on": {}, "reuse": {"reuse": True}, "prune": {"prune_keep": 8}}


def _fast_opts(pairs: list[str]) -> dict:
    """--fast-opt KEY=VALUE pairs (YAML values) -> FastConfig keyword arguments."""
    known = sorted(f.name for f in dataclasses.fields(FastConfig))
    opts = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep or key not in known:
            raise ValueError(f"--fast-opt {pair!r}: expected KEY=VALUE with KEY one of {known}")
        opts[key] = yaml.safe_load(value)
    FastConfig(**opts)  # a bad value or combination fails here, with FastConfig's own message
    return opts


def _fast(name: str):
    return fast_config(FAST_PRESETS[name])


def cmd_eval(args) -> int:
    fast = FAST_PRESETS[args.fast]
    try:
        if args.fast_opt:
            if fast is None:
                raise ValueError("--fast-opt sets options of the real-time step: give --fast on, reuse or prune")
            fast = {**fast, **_fast_opts(args.fast_opt)}
            fast_config(fast)  # a bad combination with the preset fails here, before the workers start
        summary = evaluate(args.policy, args.tasks, args.episodes, workers=args.workers, out=args.out,
                           videos=args.videos, ensemble=args.ensemble, fast=fast)
    except (SpecMismatchError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(format_table(summary))
    if args.out:
        print(f"results: {Path(args.out) / 'results.json'}, plot: {Path(args.out) / 'success.png'}, "
              f"videos: {Path(args.out) / 'videos'}")
    return 0


def cmd_bench(args) -> int:
    if args.kernels:
        rows = kernel_bench(args.device)
        if args.json:
            print(json.dumps(rows, indent=2))
        for r in rows if not args.json else []:
            print(f"{r['kernel']:44s} triton {r['triton_us']:8.1f} us  torch {r['torch_eager_us']:8.1f} us  "
                  f"{r['speedup']:5.2f}x  max diff {r['max_abs_diff']:.1e}")
        return 0
    configs = None
    if args.configs:
        configs = [c.strip() for c in args.configs.split(";")]
        unknown = [c for c in configs if c not in CONFIGS]
        if unknown:
            print(f"error: unknown configurations {unknown}; known: {list(CONFIGS)}", file=sys.stderr)
            return 2
    try:
        opts = _fast_opts(args.fast_opt)
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    r = run_bench(args.policy or shipped_policy(), task=args.task, steps=args.steps, threads=args.threads,
                  configs=configs, device=args.device, fast_opts=opts)
    print(json.dumps(r, indent=2) if args.json else format_bench(r))
    return 0


def cmd_serve(args) -> int:
    try:
        parse_bind(args.bind)
        key = Path(args.curve_secret_key_file).read_text().strip().encode() if args.curve_secret_key_file else None
        allowed = load_authorized_keys(args.curve_authorized_keys) if args.curve_authorized_keys else None
    except (ValueError, OSError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    if args.threads:
        torch.set_num_threads(args.threads)
    path = args.policy or shipped_policy()
    policy = Policy.from_pretrained(path, fast=_fast(args.fast))
    policy.warmup()  # compile before the first client is told the server is up
    try:
        server = PolicyServer(policy, args.bind, curve_secret_key=key, authorized_keys=allowed)
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    clients = f"the {len(allowed)} clients of {args.curve_authorized_keys}" if allowed else "any client"
    print(f"serving {path} on {server.address} to {clients} (Ctrl-C stops)", flush=True)
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        pass
    finally:
        server.close()
    return 0


def cmd_keygen(args) -> int:
    """A CURVE key pair: NAME.key (public, for the other side) and NAME.key_secret (mode 0600)."""
    public, secret = zmq.curve_keypair()
    base = Path(args.name)
    base.parent.mkdir(parents=True, exist_ok=True)
    pub, sec = base.with_name(base.name + ".key"), base.with_name(base.name + ".key_secret")
    if (pub.exists() or sec.exists()) and not args.force:
        print(f"error: {pub} or {sec} exists (--force replaces them)", file=sys.stderr)
        return 2
    pub.write_text(public.decode() + "\n")
    fd = os.open(sec, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write(secret.decode() + "\n")
    print(f"public key {pub}: {public.decode()}\nsecret key {sec} (keep it on this machine)")
    return 0


def cmd_node(args) -> int:
    """The policy node alone, for a real arm: ROS arguments as `ros2 run` takes them."""
    try:
        from vla.ros_nodes.policy_node import main as node_main  # optional: the ros extra (rclpy)
    except ImportError as e:
        print(f"error: ROS2 is not installed ({e}); pip install -e '.[ros]'", file=sys.stderr)
        return 2
    return node_main(args.ros_args)


def cmd_run(args) -> int:
    """The shipped policy (or --policy) drives the simulated arm through real ROS2."""
    try:
        from vla.ros_nodes.run import format_run, node_parameters, run  # optional: the ros extra (rclpy)
    except ImportError as e:
        print(f"error: ROS2 is not installed ({e}); pip install -e '.[ros]'", file=sys.stderr)
        return 2
    params = node_parameters(args.params)
    if args.policy:
        params["policy"] = args.policy
    if args.fast:
        params["fast"] = args.fast
    if args.remote:
        params["remote"] = args.remote
    params = {k: v for k, v in params.items() if v != ""}
    r = run(args.tasks, episodes=args.episodes, seed=args.seed, params=params, domain_id=args.domain_id,
            duration_s=args.duration)
    print(format_run(r))
    if args.json:
        Path(args.json).write_text(json.dumps(r, indent=2))
    return 0


def _format_bench(r: dict) -> str:
    lines = [f"physics step (0.1 s of sim, {r['substeps']} substeps): {r['step_ms']:.3f} ms median"]
    for size, ms in r["render_ms"].items():
        lines.append(f"render {size} px, one camera: {ms:.3f} ms median")
    lines.append(f"shadows off saves {r['render_ms']['96+shadows'] / r['render_ms']['96']:.1f}x at 96 px")
    lines.append(f"env.step with 2 cameras at 96 px: {r['env_step_ms']:.3f} ms median")
    lines.append(f"collect: {r['collect']['frames_per_s']:.0f} frames/s "
                 f"({r['collect']['frames']} frames, {r['collect']['workers']} workers)")
    lines.append(f"reader: {r['reader']['samples_per_s']:.0f} samples/s after a {r['reader']['load_s']:.2f} s load")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="vla", description=__doc__)
    sub = p.add_subparsers(dest="command", required=True)

    d = sub.add_parser("demo", help="the shipped policy (or --expert) on every sim task, with videos")
    d.add_argument("--policy", default=None, help="artifact directory (default: the shipped policy)")
    d.add_argument("--expert", action="store_true", help="run the scripted experts instead")
    d.add_argument("--tasks", type=_tasks, default="all")
    d.add_argument("--episodes", type=int, default=3, help="episodes per task")
    d.add_argument("--workers", type=int, default=2)
    d.add_argument("--out", default="outputs/demo")
    d.add_argument("--seed", type=int, default=0, help="--expert: episode seed")
    d.set_defaults(func=cmd_demo)

    c = sub.add_parser("collect", help="expert demonstrations -> LeRobotDataset v3")
    c.add_argument("--tasks", type=_tasks, default="all")
    c.add_argument("--episodes", type=int, required=True, help="successful episodes per task")
    c.add_argument("--out", required=True)
    c.add_argument("--workers", type=int, default=2)
    c.add_argument("--image-size", type=int, default=96)
    c.add_argument("--cameras", default="front,wrist")
    c.add_argument("--seed", type=int, default=0, help="first episode seed of each task")
    c.add_argument("--variants-per-seed", type=int, default=1,
                   help="collect each seed's scene under this many different instructions")
    c.add_argument("--scenes-only", action="store_true",
                   help="one frame per seed (the start scene and its keypoints, no expert): data for "
                        "train.keypoint_dataset")
    c.set_defaults(func=cmd_collect)

    e = sub.add_parser("experts", help="scripted expert success table")
    e.add_argument("--tasks", type=_tasks, default="all")
    e.add_argument("--episodes", type=int, default=100)
    e.add_argument("--workers", type=int, default=2)
    e.add_argument("--seed", type=int, default=0)
    e.add_argument("--json", help="also write the table as JSON here")
    e.set_defaults(func=cmd_experts)

    b = sub.add_parser("bench-sim", help="sim step, render, collect and reader speed")
    b.add_argument("--tasks", type=_tasks, default="pick_cube,open_drawer")
    b.add_argument("--episodes", type=int, default=10, help="episodes per task for the collect figure")
    b.add_argument("--workers", type=int, default=2)
    b.add_argument("--json", action="store_true")
    b.set_defaults(func=cmd_bench_sim)

    bp = sub.add_parser("bench", help="control-step speed per stage and configuration, on a real rollout")
    bp.add_argument("--policy", default=None, help="artifact directory (default: the shipped policy)")
    bp.add_argument("--task", default="pick_cube")
    bp.add_argument("--steps", type=int, default=60, help="consecutive frames timed per configuration")
    bp.add_argument("--threads", type=int, default=2)
    bp.add_argument("--configs", default=None, help="';'-separated subset of the configurations")
    bp.add_argument("--device", default="cpu", help="cpu or cuda (the CUDA-graph configurations run there only)")
    bp.add_argument("--kernels", action="store_true", help="time each Triton kernel against its torch reference")
    bp.add_argument("--fast-opt", action="append", default=[], metavar="KEY=VALUE",
                    help="a FastConfig option for every fast configuration, e.g. reuse_threshold=0.05 (repeatable)")
    bp.add_argument("--json", action="store_true")
    bp.set_defaults(func=cmd_bench)

    sv = sub.add_parser("serve", help="serve a policy over zmq (msgpack request/reply)")
    sv.add_argument("--policy", default=None, help="artifact directory (default: the shipped policy)")
    sv.add_argument("--bind", default="tcp://127.0.0.1:5555", help="loopback unless CURVE keys are given")
    sv.add_argument("--curve-secret-key-file", default=None,
                    help="the server's Z85 CURVE secret key (required off loopback; `vla keygen` makes one)")
    sv.add_argument("--curve-authorized-keys", default=None,
                    help="file of client public keys, one per line: only those clients are served")
    sv.add_argument("--fast", choices=list(FAST_PRESETS), default="on")
    sv.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's choice)")
    sv.set_defaults(func=cmd_serve)

    kg = sub.add_parser("keygen", help="a CURVE key pair for `vla serve` and its clients")
    kg.add_argument("name", help="writes NAME.key (public) and NAME.key_secret (secret, mode 0600)")
    kg.add_argument("--force", action="store_true", help="replace existing files")
    kg.set_defaults(func=cmd_keygen)

    nd = sub.add_parser("node", help="the ROS2 policy node alone, to drive a real arm",
                        description="Starts the policy node as `ros2 run` would; everything after `node` "
                                    "goes to ROS, e.g. vla node --ros-args --params-file "
                                    "configs/policy_node.yaml -p policy:=runs/x/final")
    nd.set_defaults(func=cmd_node, ros_args=[])

    r = sub.add_parser("run", help="the policy drives the simulated arm through real ROS2 nodes")
    r.add_argument("--policy", default=None, help="artifact directory (default: the shipped policy)")
    r.add_argument("--tasks", type=_tasks, default="all")
    r.add_argument("--episodes", type=int, default=1, help="episodes per task")
    r.add_argument("--seed", type=int, default=EVAL_SEED_START)
    r.add_argument("--params", default=None, help="policy node YAML (default: configs/policy_node.yaml)")
    r.add_argument("--fast", choices=list(FAST_PRESETS), default=None)
    r.add_argument("--remote", default=None, help="use a running `vla serve` (tcp://host:port) for inference")
    r.add_argument("--domain-id", type=int, default=None, help="ROS_DOMAIN_ID for this run")
    r.add_argument("--duration", type=float, default=None,
                   help="a soak: cycle through the tasks (new seeds each round) for this many seconds")
    r.add_argument("--json", default=None, help="also write the results here")
    r.set_defaults(func=cmd_run)

    t = sub.add_parser("train", help="train a policy from a YAML recipe (torchrun for many processes)")
    t.add_argument("recipe")
    t.add_argument("overrides", nargs="*", help="key.sub=value, e.g. train.steps=100 model.head.type=flow")
    t.add_argument("--resume", action="store_true")
    t.set_defaults(func=cmd_train)

    v = sub.add_parser("eval", help="policy success in the sim tasks, with 95%% intervals")
    v.add_argument("--policy", required=True, help="artifact directory")
    v.add_argument("--tasks", type=_tasks, default="all")
    v.add_argument("--episodes", type=int, default=50, help="episodes per task")
    v.add_argument("--workers", type=int, default=2)
    v.add_argument("--out", default=None, help="results.json, success.png and videos go here")
    v.add_argument("--videos", type=int, default=2, help="episodes per task recorded as mp4")
    v.add_argument("--ensemble", choices=["queue", "temporal", "adaptive"], default="queue")
    v.add_argument("--fast", choices=list(FAST_PRESETS), default="off",
                   help="the real-time step (vla.fast): on, with token reuse, or with FastV pruning to 8 tokens")
    v.add_argument("--fast-opt", action="append", default=[], metavar="KEY=VALUE",
                   help="a FastConfig option on top of --fast, e.g. reuse_threshold=0.05 (repeatable)")
    v.set_defaults(func=cmd_eval)

    argv = sys.argv[1:] if argv is None else list(argv)
    if argv[:1] == ["node"] and not set(argv[1:2]) & {"-h", "--help"}:  # the rest belongs to ROS
        return cmd_node(argparse.Namespace(ros_args=argv[1:]))
    args = p.parse_args(argv)
    if isinstance(getattr(args, "tasks", None), str):
        args.tasks = _tasks(args.tasks)
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
