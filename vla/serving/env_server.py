"""A simulator in its own process and Python environment, served over zmq with the policy server's
wire format (msgpack maps, arrays as dtype + shape + bytes): how MetaWorld (mujoco 3.3.0) runs beside
this project's mujoco 4 and torch, as LeRobot keeps simulator dependencies out of the policy's.

    python -m vla.serving.env_server --suite metaworld --bind ipc:///tmp/x   (in .venv-metaworld)

Requests (one client, REQ/REP), each answered {"ok": true, ...} or {"ok": false, "error": "..."}:
  {"cmd": "make", "task": str, "image_size": int} -> {"cameras", "state_dim", "action_dim", "max_steps", "instruction"}
  {"cmd": "reset", "seed": int}                    -> {"obs"}
  {"cmd": "step", "action": array}                 -> {"obs", "reward", "terminated", "truncated", "success"}
  {"cmd": "expert"}                                -> {"action"}: the suite's scripted expert, for demonstrations
  {"cmd": "close"}                                 -> {}, and the server exits
"""

from __future__ import annotations

import argparse
import os
import sys

import numpy as np
import zmq

from vla.errors import brief
from vla.serving.protocol import ProtocolError, decode, encode

SUITES = ("metaworld",)


def make_suite_env(suite: str, task: str, image_size: int):
    if suite == "metaworld":
        from vla.sim.metaworld_env import MetaWorldEnv  # optional: metaworld lives in .venv-metaworld only
        return MetaWorldEnv(task, image_size=image_size)
    raise ValueError(f"unknown suite {suite!r} (known: {list(SUITES)})")


def handle(state: dict, msg: dict) -> dict:
    cmd = msg.get("cmd")
    if cmd == "make":
        if state.get("env") is not None:
            state["env"].close()
        env = state["env"] = make_suite_env(state["suite"], str(msg["task"]), int(msg["image_size"]))
        return {"cameras": list(env.cameras), "state_dim": int(env.observation_space["observation.state"].shape[0]),
                "action_dim": int(env.action_space.shape[0]), "max_steps": int(env.max_steps),
                "instruction": env.instruction}
    env = state.get("env")
    if env is None:
        raise ValueError(f"{brief(cmd)} before make")
    if cmd == "reset":
        obs, _ = env.reset(seed=int(msg["seed"]))
        return {"obs": obs}
    if cmd == "step":
        action = np.asarray(msg["action"], dtype=np.float32)
        if action.shape != env.action_space.shape or not np.all(np.isfinite(action)):
            raise ValueError(f"action must be finite with shape {env.action_space.shape}, got {brief(action.tolist())}")
        obs, reward, terminated, truncated, info = env.step(action)
        return {"obs": obs, "reward": float(reward), "terminated": bool(terminated), "truncated": bool(truncated),
                "success": bool(info["success"])}
    if cmd == "expert":
        return {"action": env.expert_action()}
    raise ValueError(f"unknown command {brief(cmd)}")


def serve(suite: str, bind: str) -> int:
    ctx = zmq.Context()
    sock = ctx.socket(zmq.REP)
    sock.bind(bind)
    state = {"suite": suite, "env": None}
    parent = os.getppid()
    try:
        while True:
            if not sock.poll(1000):
                if os.getppid() != parent:  # the process that started this server is gone: so is its client
                    return 0
                continue
            try:
                msg = decode(sock.recv())
                if msg.get("cmd") == "close":
                    sock.send(encode({"ok": True}))
                    return 0
                reply = {"ok": True, **handle(state, msg)}
            except (ProtocolError, ValueError, KeyError, TypeError) as e:
                reply = {"ok": False, "error": f"{type(e).__name__}: {brief(str(e))}"}
            sock.send(encode(reply))
    finally:
        if state["env"] is not None:
            state["env"].close()
        sock.close(linger=0)
        ctx.term()


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m vla.serving.env_server")
    p.add_argument("--suite", choices=SUITES, required=True)
    p.add_argument("--bind", required=True)
    args = p.parse_args(argv)
    return serve(args.suite, args.bind)


if __name__ == "__main__":
    sys.exit(main())
