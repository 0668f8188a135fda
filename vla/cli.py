"""The `vla` command: one subcommand per job.

This module only declares the command line: each subcommand names the function of its job's module
(`vla.jobs.*`, `vla.ros_nodes.*`) that runs it, imported once it is asked for, so `vla --help`
does not load torch, MuJoCo or ROS.
"""

from __future__ import annotations

import argparse
import importlib
import sys

from vla.config import FAST_PRESETS  # torch-free

SUITES = ["tabletop", "metaworld"]  # vla.jobs.suites.SUITES (a test keeps the two equal)
JOB_OF_NODE = "vla.ros_nodes.policy_node:cmd_node"
EVAL_SEED_START = 1_000_000  # vla.sim.EVAL_SEED_START (a test keeps the two equal)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="vla", description=__doc__)
    sub = p.add_subparsers(dest="command", required=True)

    d = sub.add_parser("demo", help="the shipped policy (or --expert) on every sim task, with videos")
    d.add_argument("--policy", default=None, help="artifact directory (default: the shipped policy)")
    d.add_argument("--expert", action="store_true", help="run the scripted experts instead")
    d.add_argument("--tasks", default="all", help="all, or task names / ids, comma-separated")
    d.add_argument("--episodes", type=int, default=3, help="episodes per task")
    d.add_argument("--workers", type=int, default=2)
    d.add_argument("--out", default="outputs/demo")
    d.add_argument("--seed", type=int, default=0, help="--expert: episode seed")
    d.set_defaults(job="vla.jobs.evaluate:cmd_demo")

    c = sub.add_parser("collect", help="expert demonstrations -> LeRobotDataset v3")
    c.add_argument("--suite", choices=SUITES, default="tabletop",
                   help="tabletop (this project's sim) or metaworld (its own environment: setup.sh --metaworld)")
    c.add_argument("--tasks", default="all",
                   help="tabletop: all, or task names / ids; metaworld: MT10, MT50, easy / medium / hard / "
                        "very_hard, or task names (reach-v3); comma-separated")
    c.add_argument("--episodes", type=int, required=True, help="successful episodes per task")
    c.add_argument("--out", required=True)
    c.add_argument("--workers", type=int, default=2)
    c.add_argument("--image-size", type=int, default=96)
    c.add_argument("--cameras", default="front,wrist", help="tabletop cameras (metaworld: its corner2 camera)")
    c.add_argument("--seed", type=int, default=0, help="first episode seed of each task")
    c.add_argument("--variants-per-seed", type=int, default=1,
                   help="collect each seed's scene under this many different instructions")
    c.add_argument("--scenes-only", action="store_true",
                   help="one frame per seed (the start scene and its keypoints, no expert): data for "
                        "train.keypoint_dataset")
    c.set_defaults(job="vla.jobs.collect:cmd_collect")

    e = sub.add_parser("experts", help="scripted expert success table")
    e.add_argument("--tasks", default="all", help="all, or task names / ids, comma-separated")
    e.add_argument("--episodes", type=int, default=100)
    e.add_argument("--workers", type=int, default=2)
    e.add_argument("--seed", type=int, default=0)
    e.add_argument("--json", help="also write the table as JSON here")
    e.set_defaults(job="vla.jobs.bench_sim:cmd_experts")

    b = sub.add_parser("bench-sim", help="sim step, render, collect and reader speed")
    b.add_argument("--tasks", default="pick_cube,open_drawer", help="task names / ids, comma-separated")
    b.add_argument("--episodes", type=int, default=10, help="episodes per task for the collect figure")
    b.add_argument("--workers", type=int, default=2)
    b.add_argument("--json", action="store_true")
    b.set_defaults(job="vla.jobs.bench_sim:cmd_bench_sim")

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
    bp.set_defaults(job="vla.jobs.bench:cmd_bench")

    br = sub.add_parser("bench-record", help="recording overhead at a robot's rate (CPU, dropped frames) and "
                                             "bag import throughput")
    br.add_argument("--rate", type=int, default=50, help="Hz of the cameras, joints, commands and frames")
    br.add_argument("--seconds", type=float, default=20.0)
    br.add_argument("--size", default="96x96", help="camera frames, WIDTHxHEIGHT (e.g. 640x480)")
    br.add_argument("--domain-id", type=int, default=77, help="ROS_DOMAIN_ID")
    br.set_defaults(job="vla.ros_nodes.bench:cmd_bench_record")

    sv = sub.add_parser("serve", help="serve a policy over zmq (msgpack request/reply)")
    sv.add_argument("--policy", default=None, help="artifact directory (default: the shipped policy)")
    sv.add_argument("--bind", default="tcp://127.0.0.1:5555", help="loopback unless CURVE keys are given")
    sv.add_argument("--curve-secret-key-file", default=None,
                    help="the server's Z85 CURVE secret key (required off loopback; `vla keygen` makes one)")
    sv.add_argument("--curve-authorized-keys", default=None,
                    help="file of client public keys, one per line: only those clients are served")
    sv.add_argument("--fast", choices=list(FAST_PRESETS), default="on")
    sv.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's choice)")
    sv.set_defaults(job="vla.jobs.serve:cmd_serve")

    kg = sub.add_parser("keygen", help="a CURVE key pair for `vla serve` and its clients")
    kg.add_argument("name", help="writes NAME.key (public) and NAME.key_secret (secret, mode 0600)")
    kg.add_argument("--force", action="store_true", help="replace existing files")
    kg.set_defaults(job="vla.jobs.serve:cmd_keygen")

    nd = sub.add_parser("node", help="the ROS2 policy node alone, to drive a real arm",
                        description="Starts the policy node as `ros2 run` would; everything after `node` "
                                    "goes to ROS, e.g. vla node --ros-args --params-file "
                                    "configs/policy_node.yaml -p policy:=runs/x/final")
    nd.set_defaults(job=JOB_OF_NODE, ros_args=[])

    r = sub.add_parser("run", help="the policy drives the simulated arm through real ROS2 nodes")
    r.add_argument("--policy", default=None, help="artifact directory (default: the shipped policy)")
    r.add_argument("--tasks", default="all", help="all, or task names / ids, comma-separated")
    r.add_argument("--episodes", type=int, default=1, help="episodes per task")
    r.add_argument("--seed", type=int, default=EVAL_SEED_START)
    r.add_argument("--params", default=None, help="policy node YAML (default: configs/policy_node.yaml)")
    r.add_argument("--fast", choices=list(FAST_PRESETS), default=None)
    r.add_argument("--remote", default=None, help="use a running `vla serve` (tcp://host:port) for inference")
    r.add_argument("--domain-id", type=int, default=None, help="ROS_DOMAIN_ID for this run")
    r.add_argument("--duration", type=float, default=None,
                   help="a soak: cycle through the tasks (new seeds each round) for this many seconds")
    r.add_argument("--json", default=None, help="also write the results here")
    r.set_defaults(job="vla.ros_nodes.run:cmd_run")

    rec = sub.add_parser("record", help="record a ROS2 robot's topics (a topic contract) as a LeRobotDataset v3")
    rec.add_argument("--contract", required=True, help="topic contract YAML (configs/ros_contract_sim.yaml)")
    rec.add_argument("--out", required=True, help="dataset directory (new, or one recorded with this contract)")
    rec.add_argument("--episodes", type=int, default=None, help="stop after this many episodes (default: Ctrl-C)")
    rec.add_argument("--task", default=None, help="the task prompt (default: the contract's instruction topic)")
    rec.add_argument("--start-now", action="store_true",
                     help="an episode starts at once (else at the contract's start marker or the ~/start service)")
    rec.add_argument("--timeout", type=float, default=None, help="stop after this many seconds")
    rec.add_argument("--domain-id", type=int, default=None, help="ROS_DOMAIN_ID")
    rec.set_defaults(job="vla.ros_nodes.recorder:cmd_record")

    ib = sub.add_parser("import-bag", help="rosbag2 directories (sqlite3 or MCAP) -> a LeRobotDataset v3")
    ib.add_argument("bags", nargs="+", help="bag directories (with metadata.yaml)")
    ib.add_argument("--contract", required=True, help="topic contract YAML (configs/ros_contract_sim.yaml)")
    ib.add_argument("--out", required=True, help="a new dataset directory")
    ib.add_argument("--split", choices=["bag", "marker"], default="bag",
                    help="one episode per bag, or split at the contract's episodes.end_topic")
    ib.add_argument("--task", default=None, help="the task prompt (default: the contract's instruction topic)")
    ib.set_defaults(job="vla.ros_nodes.bags:cmd_import_bag")

    tl = sub.add_parser("teleop", help="the scripted expert drives the sim robot over ROS2 (a teleoperation "
                                       "stand-in, the robot side of `vla record`)")
    tl.add_argument("--tasks", default="all", help="all, or task names / ids, comma-separated")
    tl.add_argument("--episodes", type=int, default=1, help="episodes per task")
    tl.add_argument("--seed", type=int, default=0, help="the first episode's seed")
    tl.add_argument("--image-size", type=int, default=96)
    tl.add_argument("--cameras", default="front,wrist")
    tl.add_argument("--speed", type=float, default=1.0,
                    help="sim control periods per 0.1 s of wall time (2: twice real time; the contract clocks frames "
                         "by the camera's messages)")
    tl.add_argument("--domain-id", type=int, default=None, help="ROS_DOMAIN_ID")
    tl.set_defaults(job="vla.ros_nodes.teleop:cmd_teleop")

    t = sub.add_parser("train", help="train a policy from a YAML recipe (torchrun for many processes)")
    t.add_argument("recipe")
    t.add_argument("overrides", nargs="*", help="key.sub=value, e.g. train.steps=100 model.head.type=flow")
    t.add_argument("--resume", action="store_true")
    t.set_defaults(job="vla.jobs.train:cmd_train")

    v = sub.add_parser("eval", help="policy success in a suite's tasks, with 95%% intervals")
    v.add_argument("--policy", required=True, help="artifact directory")
    v.add_argument("--suite", choices=SUITES, default="tabletop", help="tabletop, or metaworld (setup.sh --metaworld)")
    v.add_argument("--tasks", default=None,
                   help="tabletop: all (default), or task names / ids; metaworld: MT10 (default), MT50, a "
                        "difficulty group, or task names; comma-separated")
    v.add_argument("--episodes", type=int, default=50, help="episodes per task")
    v.add_argument("--workers", type=int, default=2)
    v.add_argument("--out", default=None, help="results.json, success.png and videos go here")
    v.add_argument("--videos", type=int, default=2, help="episodes per task recorded as mp4")
    v.add_argument("--ensemble", choices=["queue", "temporal", "adaptive"], default="queue")
    v.add_argument("--fast", choices=list(FAST_PRESETS), default="off",
                   help="the real-time step (vla.fast): on, with token reuse, or with FastV pruning to half the tokens")
    v.add_argument("--fast-opt", action="append", default=[], metavar="KEY=VALUE",
                   help="a FastConfig option on top of --fast, e.g. reuse_threshold=0.05 (repeatable)")
    v.set_defaults(job="vla.jobs.evaluate:cmd_eval")

    argv = sys.argv[1:] if argv is None else list(argv)
    if argv[:1] == ["node"] and not set(argv[1:2]) & {"-h", "--help"}:  # the rest belongs to ROS
        args = argparse.Namespace(job=JOB_OF_NODE, ros_args=argv[1:])
    else:
        args = p.parse_args(argv)
    module, _, function = args.job.partition(":")
    try:
        job = importlib.import_module(module)  # the job's module, only once it is the one asked for
    except ImportError as e:
        if module.startswith("vla.ros_nodes"):
            print(f"error: ROS2 is not installed ({e}); pip install -e '.[ros]'", file=sys.stderr)
            return 2
        raise
    return getattr(job, function)(args)


if __name__ == "__main__":
    sys.exit(main())
