"""The policy node's inference server: `vla serve` in a child process on a private ipc address,
given its ServeConfig as JSON on stdin (`python -m vla.jobs.serve`).

The model runs outside the node's process, so its many small torch calls never hold the node's
GIL against the control timer. The child is started with the thread count of `thread_env`;
`start()` waits for its hello (the server warms its engine before it answers); when it dies or
stops answering, the node calls `restart()`, which waits its backoff first.
"""

from __future__ import annotations

import dataclasses
import os
import subprocess
import sys
import tempfile
import time
import uuid

from vla.config import ServeConfig
from vla.serving import PolicyClient


def thread_env(threads: int) -> dict:
    """Environment for the server process: `threads` torch (OpenMP) threads; 0 keeps torch's
    defaults (one per core). One thread leaves the other core to the node, the sim or a training
    job: beside a competing load, inference p99 fell from 560 to 43 ms here, and a training job
    beside a busy server kept 39 instead of 26 samples/s (BENCHMARKS.md, scripts/cpu_contention.py)."""
    env = dict(os.environ)
    if threads > 0:
        env["OMP_NUM_THREADS"] = str(threads)
    return env


class LocalInferenceServer:
    def __init__(self, config: ServeConfig, startup_timeout_s: float = 180.0,
                 backoff_s: tuple[float, ...] = (1.0, 2.0, 4.0, 8.0, 16.0)):
        """config: what the server runs; its bind address is replaced by a private ipc one."""
        self.config = config
        self.startup_timeout_s, self.backoff_s = startup_timeout_s, backoff_s
        self.process: subprocess.Popen | None = None
        self.address = ""
        self.restarts = 0  # restarts that brought a server up

    def start(self) -> PolicyClient:
        """A new server process and a client of it; raises RuntimeError / TimeoutError if it does not come up."""
        self.stop()
        self.address = f"ipc://{tempfile.gettempdir()}/vla-policy-{uuid.uuid4().hex[:12]}"
        config = dataclasses.replace(self.config, bind=self.address)
        self.process = subprocess.Popen([sys.executable, "-m", "vla.jobs.serve"], stdin=subprocess.PIPE,
                                        env=thread_env(config.threads), text=True)
        self.process.stdin.write(config.to_json())
        self.process.stdin.close()
        deadline = time.monotonic() + self.startup_timeout_s
        while True:
            try:
                return PolicyClient(self.address, timeout_ms=2000)
            except TimeoutError:
                if self.process.poll() is not None:
                    raise RuntimeError(f"the inference server exited with {self.process.returncode}") from None
                if time.monotonic() > deadline:
                    self.stop()
                    raise

    def exited(self) -> int | None:
        """The exit code of a server that has died, else None."""
        return None if self.process is None else self.process.poll()

    def restart(self, attempt: int, keep_going=lambda: True) -> PolicyClient:
        """Attempt `attempt` (0-based) after waiting its backoff; raises when it fails or gives up."""
        if attempt >= len(self.backoff_s):
            raise RuntimeError(f"the inference server did not come back after {attempt} restarts")
        deadline = time.monotonic() + self.backoff_s[attempt]
        while time.monotonic() < deadline and keep_going():
            time.sleep(0.05)
        if not keep_going():
            raise RuntimeError("the node is shutting down")
        client = self.start()
        self.restarts += 1
        return client

    def stop(self) -> None:
        if self.process is None:
            return
        if self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(10)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(5)
        self.process = None
