"""How the inference server's thread settings share a 2-core CPU with other work.

    .venv/bin/python scripts/cpu_contention.py run   [--tasks press_button,open_drawer --episodes 2]
    .venv/bin/python scripts/cpu_contention.py train [--seconds 60]

`run`: `vla run` alone and beside a competing load (a torch process multiplying matrices on both
cores, as a training job does), once with the server on torch's defaults (one thread per core,
OpenMP workers spin-waiting: `server_threads: 0`) and once with the shipped setting
(`server_threads: 1`, OpenMP workers sleep when idle). Prints inference and camera-to-command
p50/p99, dropped control periods and success.

`train`: training throughput (scripts/train_throughput.py on the shipped recipe) alone, and beside a
`vla serve` kept busy by a client, with each server setting; also the client's request latency.
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import yaml

from vla.ros_nodes.inference import thread_env

ROOT = Path(__file__).resolve().parent.parent
LOAD = """
import torch, time
torch.set_num_threads(2)
a = torch.randn(512, 512)
while True:
    a = (a @ a).tanh()
"""
SETTINGS = {"torch defaults (2 threads, spin)": 0, "server_threads 1, passive": 1}


def _server_env(threads: int) -> dict:
    return dict(os.environ) if threads == 0 else thread_env(threads)


def cmd_run(args) -> dict:
    base = yaml.safe_load((ROOT / "configs" / "policy_node.yaml").read_text())
    rows = {}
    for load in (False, True):
        for name, threads in SETTINGS.items():
            params = json.loads(json.dumps(base))
            params["vla_policy"]["ros__parameters"]["server_threads"] = threads
            with tempfile.TemporaryDirectory() as tmp:
                path, out = Path(tmp) / "node.yaml", Path(tmp) / "run.json"
                path.write_text(yaml.safe_dump(params))
                loader = subprocess.Popen([sys.executable, "-c", LOAD]) if load else None
                try:
                    subprocess.run([sys.executable, "-m", "vla.cli", "run", "--tasks", args.tasks, "--episodes",
                                    str(args.episodes), "--params", str(path), "--domain-id", str(args.domain_id),
                                    "--json", str(out)], check=True, capture_output=True, timeout=1800)
                finally:
                    if loader is not None:
                        loader.kill()
                        loader.wait()
                r = json.loads(out.read_text())
            s = r["status"]
            key = f"{'with load' if load else 'alone'}; {name}"
            rows[key] = {k: s[k] for k in ("infer_ms_p50", "infer_ms_p99", "latency_ms_p50", "latency_ms_p99",
                                           "jitter_ms_p99", "dropped_periods")}
            rows[key]["success"] = f"{sum(e['success'] for e in r['episodes'])}/{len(r['episodes'])}"
            print(key, json.dumps(rows[key]), flush=True)
    return rows


HAMMER = """
import sys, time, numpy as np
from vla.ros_nodes.server import PolicyClient
c = PolicyClient(sys.argv[1], timeout_ms=30000)
s = c.spec
rng = np.random.default_rng(0)
obs = {f"observation.images.{k}": rng.integers(0, 255, (s["image_size"], s["image_size"], 3), dtype=np.uint8)
       for k in s["cameras"]}
obs["observation.state"] = np.zeros(s["state_dim"], np.float32)
obs["task"] = "press the red button"
ms, t_end = [], time.monotonic() + float(sys.argv[2])
while time.monotonic() < t_end:
    t0 = time.perf_counter()
    c.act_chunk(obs)
    ms.append((time.perf_counter() - t0) * 1e3)
print(len(ms), float(np.percentile(ms, 50)), float(np.percentile(ms, 99)))
"""


def _train_rate() -> float:
    out = subprocess.run([sys.executable, str(ROOT / "scripts" / "train_throughput.py"),
                          str(ROOT / "configs" / "nano_diffusion_narrow.yaml"), "48", "32"],
                         check=True, capture_output=True, text=True).stdout
    return float(out.rsplit(",", 1)[1].split()[0])  # "... , N demonstration samples/s"


def cmd_train(args) -> dict:
    rows = {"train alone": {"train_samples_per_s": _train_rate()}}
    print("train alone", rows["train alone"], flush=True)
    for name, threads in SETTINGS.items():
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            address = f"tcp://127.0.0.1:{s.getsockname()[1]}"
        server = subprocess.Popen([sys.executable, "-m", "vla.cli", "serve", "--bind", address],
                                  env=_server_env(threads), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        try:
            time.sleep(15)  # loaded and warmed
            hammer = subprocess.Popen([sys.executable, "-c", HAMMER, address, str(args.seconds)],
                                      stdout=subprocess.PIPE, text=True)
            time.sleep(2)
            rate = _train_rate()
            n, p50, p99 = hammer.communicate()[0].split()
        finally:
            server.terminate()
            server.wait(10)
        key = f"train beside a busy vla serve; {name}"
        rows[key] = {"train_samples_per_s": rate, "requests": int(n), "request_ms_p50": float(p50),
                     "request_ms_p99": float(p99)}
        print(key, rows[key], flush=True)
    return rows


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = ap.add_subparsers(dest="what", required=True)
    r = sub.add_parser("run")
    r.add_argument("--tasks", default="press_button,open_drawer")
    r.add_argument("--episodes", type=int, default=2)
    r.add_argument("--domain-id", type=int, default=91)
    t = sub.add_parser("train")
    t.add_argument("--seconds", type=float, default=60.0, help="how long the client keeps the server busy")
    for p in (r, t):
        p.add_argument("--json", default=None)
    args = ap.parse_args()
    rows = cmd_run(args) if args.what == "run" else cmd_train(args)
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
