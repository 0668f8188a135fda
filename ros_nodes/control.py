"""What the policy node does between chunks, free of ROS so it is tested on its own.

`ChunkPlayer` turns action chunks (at the policy's fps, each stamped with the time of the
observation it was computed from) into a command at any control time: linear interpolation
between the chunk's steps, holding the last step past its end, and a linear cross-fade from the
old chunk's trajectory to the new one over `blend_s` when a new chunk arrives, so the command has
no jump and no pause at the boundary. `restart(position)` discards the plan (a new instruction, a
hold, an e-stop, a fault): nothing of it is played again, and the next chunk cross-fades in from
`position`, the command the robot holds.

`SafetyFilter` is always on: non-finite values never pass, every command is clamped to the joint
limits and to a maximum change per control period, and a hold (watchdog, e-stop) repeats the last
command sent.
"""

from __future__ import annotations

import numpy as np


class ChunkPlayer:
    def __init__(self, fps: float, blend_s: float = 0.2):
        self.fps, self.blend_s = float(fps), float(blend_s)
        self.chunk: np.ndarray | None = None
        self.t0 = 0.0
        self.prev: tuple[np.ndarray, float] | None = None
        self.switch_t = 0.0

    @staticmethod
    def _at(chunk: np.ndarray, t0: float, fps: float, t: float) -> np.ndarray:
        f = min(max((t - t0) * fps, 0.0), len(chunk) - 1.0)
        i = int(f)
        j = min(i + 1, len(chunk) - 1)
        w = f - i
        return (1 - w) * chunk[i] + w * chunk[j]

    def push(self, chunk: np.ndarray, t_obs: float, now: float) -> None:
        """A new chunk computed from the observation taken at t_obs; it takes over from `now`."""
        if self.chunk is not None:
            self.prev = (self.chunk, self.t0)
        self.chunk, self.t0, self.switch_t = np.asarray(chunk, dtype=np.float64), float(t_obs), float(now)

    def restart(self, position: np.ndarray | None) -> None:
        """Discard the plan; the next chunk blends in from `position` (None: from its own start)."""
        self.chunk = None
        self.prev = None if position is None else (np.asarray(position, dtype=np.float64)[None], 0.0)

    def age(self, now: float) -> float:
        """Seconds since the current chunk's observation."""
        return now - self.t0 if self.chunk is not None else float("inf")

    def command(self, t: float) -> np.ndarray | None:
        if self.chunk is None:
            return None
        new = self._at(self.chunk, self.t0, self.fps, t)
        if self.prev is None or self.blend_s <= 0 or t >= self.switch_t + self.blend_s:
            return new
        w = max(0.0, (t - self.switch_t) / self.blend_s)
        old = self._at(self.prev[0], self.prev[1], self.fps, t)
        return (1 - w) * old + w * new


class ChunkError(ValueError):
    """A chunk that cannot be played."""


def check_chunk(chunk, horizon: int, action_dim: int) -> np.ndarray:
    """A policy's chunk as float64 (horizon, action_dim), all finite; anything else raises ChunkError
    (a 1-D chunk would broadcast into every joint; a scalar or an empty one has no plan)."""
    try:
        a = np.asarray(chunk, dtype=np.float64)
    except (TypeError, ValueError) as e:
        raise ChunkError(f"chunk is not numeric: {type(chunk).__name__} ({e})") from None
    if a.shape != (horizon, action_dim):
        raise ChunkError(f"chunk of shape {a.shape}; the policy's spec says ({horizon}, {action_dim})")
    if not np.all(np.isfinite(a)):
        raise ChunkError(f"chunk has {int(np.sum(~np.isfinite(a)))} non-finite values")
    return a


class SafetyFilter:
    """Limits (lower, upper) per command channel; max_step per channel per control period."""

    def __init__(self, lower, upper, max_step):
        self.lower, self.upper = np.asarray(lower, float), np.asarray(upper, float)
        self.max_step = np.broadcast_to(np.asarray(max_step, float), self.lower.shape).copy()
        if self.lower.shape != self.upper.shape or np.any(self.lower > self.upper):
            raise ValueError("joint limits need lower <= upper, one pair per channel")
        self.last: np.ndarray | None = None
        self.clamped = 0  # commands changed by a clamp
        # per channel: how often the joint limits, and how often the rate limit, changed its value
        self.limit_hits = np.zeros(self.lower.shape, int)
        self.rate_hits = np.zeros(self.lower.shape, int)

    def start_from(self, position: np.ndarray) -> None:
        """The robot's measured position: the first command moves from here."""
        p = np.asarray(position, float)
        if p.shape == self.lower.shape and np.all(np.isfinite(p)):
            self.last = np.clip(p, self.lower, self.upper)

    def filter(self, target: np.ndarray | None) -> np.ndarray | None:
        """The command to send for `target` (None or non-finite: hold)."""
        if target is None or np.shape(target) != self.lower.shape or not np.all(np.isfinite(target)):
            return self.hold()
        target = np.asarray(target, float)
        cmd = np.clip(target, self.lower, self.upper)
        self.limit_hits += cmd != target
        if self.last is not None:
            limited = np.clip(cmd, self.last - self.max_step, self.last + self.max_step)
            self.rate_hits += limited != cmd
            cmd = limited
        if not np.allclose(cmd, target):
            self.clamped += 1
        self.last = cmd
        return cmd

    def hold(self) -> np.ndarray | None:
        return None if self.last is None else self.last.copy()
