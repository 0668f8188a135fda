"""What a policy consumes and produces: its cameras and image size, state and action channels, the
rate and the chunk. Written to an artifact's spec.json from the training dataset, sent by the server
on `hello`, read by the ROS2 node and the evaluator. Free of torch, so the network client carries it.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass


class SpecError(ValueError):
    """A spec.json (or a server's hello) that does not describe a policy."""


@dataclass(frozen=True)
class PolicySpec:
    cameras: tuple[str, ...]  # observation.images.<camera>, in the model's order
    image_size: int  # every camera's frames, square, uint8 HxWx3
    state_dim: int
    action_dim: int
    horizon: int  # rows of a chunk
    n_action_steps: int  # rows of a chunk executed before re-planning (the queue)
    fps: float  # the rate of a chunk's rows (the dataset's)
    state_names: tuple[str, ...] | None = None
    action_names: tuple[str, ...] | None = None
    robot_type: str | None = None

    def __post_init__(self):
        if not self.cameras or len(set(self.cameras)) != len(self.cameras):
            raise SpecError(f"cameras must be distinct names, at least one: {list(self.cameras)}")
        for name in ("image_size", "state_dim", "action_dim", "horizon", "n_action_steps"):
            value = getattr(self, name)
            if type(value) is not int or value <= 0:
                raise SpecError(f"{name} must be a positive int, got {value!r}")
        if self.n_action_steps > self.horizon:
            raise SpecError(f"n_action_steps {self.n_action_steps} exceeds the horizon {self.horizon}")
        if not isinstance(self.fps, (int, float)) or isinstance(self.fps, bool) or not self.fps > 0:
            raise SpecError(f"fps must be a positive number, got {self.fps!r}")
        for names, dim in ((self.state_names, self.state_dim), (self.action_names, self.action_dim)):
            if names is not None and len(names) != dim:
                raise SpecError(f"{len(names)} channel names for {dim} channels: {list(names)}")

    @classmethod
    def from_dict(cls, d: dict) -> PolicySpec:
        if not isinstance(d, dict):
            raise SpecError(f"a spec is a map, got {type(d).__name__}")
        fields = {f.name for f in dataclasses.fields(cls)}
        unknown, missing = set(d) - fields, {f.name for f in dataclasses.fields(cls)
                                             if f.default is dataclasses.MISSING} - set(d)
        if unknown or missing:
            raise SpecError(f"spec keys: unknown {sorted(unknown)}, missing {sorted(missing)}")
        d = dict(d)
        for key in ("cameras", "state_names", "action_names"):
            if d.get(key) is not None:
                if not isinstance(d[key], (list, tuple)) or not all(isinstance(n, str) for n in d[key]):
                    raise SpecError(f"{key} must be a list of names, got {d[key]!r}")
                d[key] = tuple(d[key])
        return cls(**d)

    def to_dict(self) -> dict:
        """JSON-ready (lists for tuples): spec.json and the wire."""
        return {k: list(v) if isinstance(v, tuple) else v for k, v in dataclasses.asdict(self).items()}

    def observation_keys(self) -> set[str]:
        return {f"observation.images.{c}" for c in self.cameras} | {"observation.state", "task"}
