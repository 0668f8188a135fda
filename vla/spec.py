"""What a policy consumes and produces: its cameras and image size, state and action channels, the
rate and the chunk. Written to an artifact's spec.json from the training dataset, sent by the server
on `hello`, read by the ROS2 node and the evaluator. Free of torch, so the network client carries it.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

# how frames of another size or aspect are brought to the model's square (vla.transforms.fit_frames)
IMAGE_FITS = ("pad", "crop", "resize")


def check_image_fit(fit: str) -> None:
    if fit not in IMAGE_FITS:
        raise ValueError(f"image_fit must be {', '.join(IMAGE_FITS[:-1])} or {IMAGE_FITS[-1]}, got {fit!r}")


class SpecError(ValueError):
    """A spec.json (or a server's hello) that does not describe a policy."""


@dataclass(frozen=True)
class PolicySpec:
    cameras: tuple[str, ...]  # observation.images.<camera>, in the model's order
    image_size: int  # the model's frames, square, uint8 HxWx3
    state_dim: int
    action_dim: int
    horizon: int  # rows of a chunk
    n_action_steps: int  # rows of a chunk executed before re-planning (the queue)
    fps: float  # the rate of a chunk's rows (the dataset's)
    state_names: tuple[str, ...] | None = None
    action_names: tuple[str, ...] | None = None
    robot_type: str | None = None
    frame_shapes: dict[str, tuple[int, int]] | None = None  # camera -> (H, W) it was recorded at, where
    #                                                          not image_size x image_size: fitted to it
    image_fit: str = "pad"  # how such frames are fitted: vla.transforms.fit_frames
    ros_contract: dict | None = None  # the topic contract the training data was recorded with (its
    #                                   signature: vla.ros_nodes.contract); the node refuses another

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
        try:
            check_image_fit(self.image_fit)
        except ValueError as e:
            raise SpecError(str(e)) from None
        if self.frame_shapes is not None:
            ok = (isinstance(self.frame_shapes, dict) and set(self.frame_shapes) <= set(self.cameras)
                  and all(len(v) == 2 and all(type(x) is int and x > 0 for x in v) for v in self.frame_shapes.values()))
            if not ok:
                raise SpecError(f"frame_shapes must map cameras to [height, width], got {self.frame_shapes!r}")
        if self.ros_contract is not None and not isinstance(self.ros_contract, dict):
            raise SpecError(f"ros_contract must be a map, got {type(self.ros_contract).__name__}")
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
        if isinstance(d.get("frame_shapes"), dict):
            d["frame_shapes"] = {k: tuple(v) if isinstance(v, (list, tuple)) else v for k, v in d["frame_shapes"].items()}
        return cls(**d)

    def to_dict(self) -> dict:
        """JSON-ready (lists for tuples): spec.json and the wire."""
        d = {k: list(v) if isinstance(v, tuple) else v for k, v in dataclasses.asdict(self).items()}
        if self.frame_shapes is not None:
            d["frame_shapes"] = {k: list(v) for k, v in self.frame_shapes.items()}
        return d

    def frame_sizes(self, camera: str) -> list[tuple[int, int]]:
        """The (H, W) a camera's frames may arrive at: the model's square, and the size recorded in
        training where that differs (fitted by the policy as the reader fitted it)."""
        sizes = [(self.image_size, self.image_size)]
        recorded = (self.frame_shapes or {}).get(camera)
        return sizes + [tuple(recorded)] if recorded and tuple(recorded) not in sizes else sizes

    def observation_keys(self) -> set[str]:
        return {f"observation.images.{c}" for c in self.cameras} | {"observation.state", "task"}
