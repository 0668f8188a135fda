"""How the inference server's thread settings share a 2-core CPU with other work.

    .venv/bin/python scripts/cpu_contention.py run   [--tasks press_button,open_drawer,push_cube,close_drawer --episodes 3]
    .venv/bin/python scripts/cpu_contention.py train [--seconds 60]

`run`: `vla run` alone and beside a competing load (a torch process multiplying matrices on both
cores, as a training job does), once with the server on torch's defaults (one thread per core:
`server_threads: 0`) and once with the shipped setting (`server_threads: 1`). Prints inference and
camera-to-command p50/p99, dropped control periods, success, and the load's own rate.

`train`: training throughput (scripts/train_throughput.py on the shipped recipe) alone, and beside a
`vla serve` kept busy by a client, with each server setting, and once more with the training
process's OpenMP threads sleeping when idle (OMP_WAIT_POLICY=PASSIVE); also the client's request
latency.
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
import signal, sys, time, torch
torch.set_num_threads(2)
a, n, t0 = torch.randn(512, 512), 0, time.monotonic()
def done(*_):
    print(n / (time.monotonic() - t0), flush=True)
    sys.exit(0)
signal.signal(signal.SIGTERM, done)
while True:
    a = (a @ a).tanh()
    n += 1
"""
SETTINGS = {"server on torch defaults (2 threads)": 0, "server_threads 1": 1}


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
                loader = subprocess.Popen([sys.executable, "-c", LOAD], stdout=subprocess.PIPE, text=True) if load else None
                try:
                    subprocess.run([sys.executable, "-m", "vla.cli", "run", "--tasks", args.tasks, "--episodes",
                                    str(args.episodes), "--params", str(path), "--domain-id", str(args.domain_id),
                                    "--json", str(out)], check=True, capture_output=True, timeout=1800)
                finally:
                    if loader is not None:
                        loader.terminate()
                        load_rate = float(loader.communicate(timeout=30)[0].split()[-1])
                r = json.loads(out.read_text())
            s = r["status"]
            key = f"{'with load' if load else 'alone'}; {name}"
            rows[key] = {k: s[k] for k in ("infer_ms_p50", "infer_ms_p99", "latency_ms_p50", "latency_ms_p99",
                                           "jitter_ms_p99", "dropped_periods")}
            rows[key]["success"] = f"{sum(e['success'] for e in r['episodes'])}/{len(r['episodes'])}"
            if load:
                rows[key]["load_matmuls_per_s"] = round(load_rate, 1)
            print(key, json.dumps(rows[key]), flush=True)
    return rows


HAMMER = """
import sys, time, numpy as np
from vla.serving import PolicyClient
c = PolicyClient(sys.argv[1], timeout_ms=30000)
s = c.spec
rng = np.random.default_rng(0)
obs = {f"observation.images.{k}": rng.integers(0, 255, (s.image_size, s.image_size, 3), dtype=np.uint8)
       for k in s.cameras}
obs["observation.state"] = np.zeros(s.state_dim, np.float32)
obs["task"] = "press the red button"
ms, t_end = [], time.monotonic() + float(sys.argv[2])
while time.monotonic() < t_end:
    t0 = time.perf_counter()
    c.act_chunk(obs)
    ms.append((time.perf_counter() - t0) * 1e3)
print(len(ms), float(np.percentile(ms, 50)), float(np.percentile(ms, 99)))
"""


def _train_rate(env: dict | None = None) -> float:
    out = subprocess.run([sys.executable, str(ROOT / "scripts" / "train_throughput.py"),
                          str(ROOT / "configs" / "nano_diffusion_narrow.yaml"), "48", "32"],
                         check=True, capture_output=True, text=True, env=env).stdout
    return float(out.rsplit(",", 1)[1].split()[0])  # "... , N demonstration samples/s"


def cmd_train(args) -> dict:
    rows = {"train alone": {"train_samples_per_s": _train_rate()},
            "train alone (OMP_WAIT_POLICY=PASSIVE)": {"train_samples_per_s": _train_rate(
                dict(os.environ, OMP_WAIT_POLICY="PASSIVE"))}}
    for key in list(rows):
        print(key, rows[key], flush=True)
    passive = dict(os.environ, OMP_WAIT_POLICY="PASSIVE")
    for (name, threads), train_env in [*((item, None) for item in SETTINGS.items()),
                                       (("server_threads 1", 1), passive)]:
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            address = f"tcp://127.0.0.1:{s.getsockname()[1]}"
        server = subprocess.Popen([sys.executable, "-m", "vla.cli", "serve", "--bind", address],
                                  env=thread_env(threads), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        try:
            time.sleep(15)  # loaded and warmed
            hammer = subprocess.Popen([sys.executable, "-c", HAMMER, address, str(args.seconds)],
                                      stdout=subprocess.PIPE, text=True)
            time.sleep(2)
            rate = _train_rate(train_env)
            n, p50, p99 = hammer.communicate()[0].split()
        finally:
            server.terminate()
            server.wait(10)
        key = f"train{' (OMP_WAIT_POLICY=PASSIVE)' if train_env else ''} beside a busy vla serve; {name}"
        rows[key] = {"train_samples_per_s": rate, "requests": int(n), "request_ms_p50": float(p50),
                     "request_ms_p99": float(p99)}
        print(key, rows[key], flush=True)
    return rows


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = ap.add_subparsers(dest="what", required=True)
    r = sub.add_parser("run")
    r.add_argument("--tasks", default="press_button,open_drawer,push_cube,close_drawer")
    r.add_argument("--episodes", type=int, default=3)
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
