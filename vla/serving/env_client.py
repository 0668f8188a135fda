"""A suite's env in its own process (`vla.serving.env_server`, run by that suite's Python), seen here
as a gymnasium env with the project's observation keys: what `vla collect` and `vla eval` use for
MetaWorld. Torch-free; the server is started on a private ipc address and stopped with `close()`."""

from __future__ import annotations

import os
import subprocess
import tempfile
import uuid
from pathlib import Path

import gymnasium as gym
import numpy as np
import zmq

from vla.serving.protocol import decode, encode

ROOT = Path(__file__).resolve().parents[2]  # the checkout (the package is installed editable)
SUITE_PYTHON = {"metaworld": ("VLA_METAWORLD_PYTHON", ROOT / ".venv-metaworld" / "bin" / "python")}


class EnvServerError(RuntimeError):
    """The env server refused a request, died, or its suite's environment is not installed."""


def suite_python(suite: str) -> Path:
    """The Python of the environment that has the suite (env var, else the checkout's .venv-<suite>)."""
    var, default = SUITE_PYTHON[suite]
    path = Path(os.environ.get(var) or default)
    if not path.is_file():
        raise EnvServerError(f"the {suite} suite needs its own environment: {path} is missing "
                             f"(make it with `bash scripts/setup.sh --{suite}`, or set {var})")
    return path


class RemoteEnv(gym.Env):
    """obs / action / info as the suite's env gives them; `expert_action()` its scripted expert;
    `render_camera(name, size)` the last observed frame (for videos)."""

    def __init__(self, suite: str, task: str, image_size: int = 96, timeout_s: float = 120.0):
        self.suite, self.task, self.image_size = suite, task, image_size
        address = f"ipc://{tempfile.gettempdir()}/vla-env-{uuid.uuid4().hex[:12]}"
        env = {**os.environ, "OMP_NUM_THREADS": "1"}  # the sim beside a policy: one thread
        self.process = subprocess.Popen([str(suite_python(suite)), "-m", "vla.serving.env_server", "--suite", suite,
                                         "--bind", address], env=env)
        self.ctx = zmq.Context.instance()
        self.sock = self.ctx.socket(zmq.REQ)
        self.sock.setsockopt(zmq.LINGER, 0)
        self.sock.setsockopt(zmq.RCVTIMEO, int(timeout_s * 1000))
        self.sock.connect(address)
        info = self._call({"cmd": "make", "task": task, "image_size": image_size})
        self.cameras = tuple(info["cameras"])
        self.max_episode_steps = info["max_steps"]
        self.instruction = info["instruction"]
        self.action_space = gym.spaces.Box(-1.0, 1.0, (info["action_dim"],), np.float32)
        self.observation_space = gym.spaces.Dict({
            **{f"observation.images.{c}": gym.spaces.Box(0, 255, (image_size, image_size, 3), np.uint8)
               for c in self.cameras},
            "observation.state": gym.spaces.Box(-np.inf, np.inf, (info["state_dim"],), np.float32)})
        self.steps, self._obs = 0, None

    def _call(self, msg: dict) -> dict:
        try:
            self.sock.send(encode(msg))
            reply = decode(self.sock.recv())
        except zmq.Again:
            code = self.process.poll()
            raise EnvServerError(f"the {self.suite} env server did not answer {msg['cmd']!r}"
                                 + (f" (it exited with {code})" if code is not None else "")) from None
        if not reply.get("ok"):
            raise EnvServerError(f"{self.suite} env server: {reply.get('error')}")
        return reply

    def reset(self, *, seed: int | None = None, options=None):
        super().reset(seed=seed)
        self._obs = self._call({"cmd": "reset", "seed": 0 if seed is None else int(seed)})["obs"]
        self.steps = 0
        return self._obs, {"success": False}

    def step(self, action):
        r = self._call({"cmd": "step", "action": np.asarray(action, dtype=np.float32)})
        self._obs, self.steps = r["obs"], self.steps + 1
        return self._obs, r["reward"], r["terminated"], r["truncated"], {"success": r["success"]}

    def expert_action(self) -> np.ndarray:
        return self._call({"cmd": "expert"})["action"]

    def render_camera(self, name: str, size: int | None = None) -> np.ndarray:
        return self._obs[f"observation.images.{name}"]

    def close(self):
        if self.process.poll() is None:
            try:
                self.sock.setsockopt(zmq.RCVTIMEO, 5000)
                self._call({"cmd": "close"})
            except EnvServerError:
                pass
            try:
                self.process.wait(10)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(5)
        self.sock.close()
