"""Observation -> model inputs and model output -> actions: the one set of transforms that training
(`vla.jobs.train`) and inference (`Policy`, the fast engine, the bench) all run.

    camera frames   uint8 (..., H, W, 3)  --frames_to_unit-->  float (..., 3, H, W) in [0, 1]
                    (training only: `augment`)  --Backbone.preprocess (SigLIP's mean/std, the
                    encoder's size)-->  the vision encoder
    state           raw  --Normalizer.state-->  (x - mean) / std
    action chunk    raw  <--Normalizer.unaction--  the model's [-1, 1]

`model_inputs` applies the first two to a batch of observations keyed as LeRobot names them.
A camera's frames of another size or aspect are first brought to the model's square frame size by
`fit_frames` (the recipe's `image_fit`), in the dataset reader for training and in the policy for
inference: the same function on the same uint8 frames.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F

from vla.spec import check_image_fit

ENV_STATE = "observation.environment_state"  # LeRobot's key; the keypoint head's targets
IMAGE_MEAN, IMAGE_STD = 0.5, 0.5  # SigLIP's normalization, as SmolVLM's processor uses


def fit_frames(frames: np.ndarray, size: int, fit: str = "pad") -> np.ndarray:
    """uint8 (N, H, W, 3) -> uint8 (N, size, size, 3). "pad": scaled to fit, centred on black (the
    whole view, aspect kept: openpi's resize_with_pad); "crop": the centred square, scaled; "resize":
    scaled to the square (aspect changed). Frames already size x size come back unchanged."""
    check_image_fit(fit)
    n, h, w = frames.shape[:3]
    if (h, w) == (size, size):
        return frames
    x = torch.from_numpy(np.ascontiguousarray(frames)).permute(0, 3, 1, 2).float()
    if fit == "crop":
        side = min(h, w)
        top, left = (h - side) // 2, (w - side) // 2
        x = x[:, :, top:top + side, left:left + side]
        h = w = side
    if fit == "pad":
        scale = size / max(h, w)
        nh, nw = max(1, round(h * scale)), max(1, round(w * scale))
    else:
        nh = nw = size
    if (nh, nw) != (h, w):
        x = F.interpolate(x, size=(nh, nw), mode="bilinear", align_corners=False, antialias=True)
    if (nh, nw) != (size, size):
        top, left = (size - nh) // 2, (size - nw) // 2
        x = F.pad(x, (left, size - nw - left, top, size - nh - top))
    return x.round().clamp(0, 255).to(torch.uint8).permute(0, 2, 3, 1).numpy()


def fit_points(points: np.ndarray, h: int, w: int, size: int, fit: str = "pad") -> np.ndarray:
    """Where `fit_frames` puts what an H x W frame shows at `points` (..., 2: x, y in [-1, 1] across
    the frame): the same in the fitted size x size frame."""
    check_image_fit(fit)
    px = (np.asarray(points, dtype=np.float32) + 1) / 2 * np.array([w, h], dtype=np.float32)  # pixels
    if fit == "crop":
        side = min(h, w)
        px = px - np.array([(w - side) // 2, (h - side) // 2], dtype=np.float32)
        h = w = side
    if fit == "pad":
        scale = size / max(h, w)
        nh, nw = max(1, round(h * scale)), max(1, round(w * scale))
        px = px * np.array([nw / w, nh / h], dtype=np.float32) + np.array([(size - nw) // 2, (size - nh) // 2],
                                                                          dtype=np.float32)
    else:
        px = px * np.array([size / w, size / h], dtype=np.float32)
    return px / size * 2 - 1


class Normalizer:
    """State: (x - mean) / std. Action: min/max -> [-1, 1] (the diffusion head clips to that range)."""

    def __init__(self, stats: dict):
        s, a = stats["observation.state"], stats["action"]
        self.state_mean = torch.tensor(s["mean"], dtype=torch.float32)
        self.state_std = torch.tensor(s["std"], dtype=torch.float32).clamp(min=1e-3)
        self.action_min = torch.tensor(a["min"], dtype=torch.float32)
        self.action_scale = (torch.tensor(a["max"], dtype=torch.float32) - self.action_min).clamp(min=1e-4)
        k = stats.get(ENV_STATE)  # keypoint head's targets; artifacts before session 6 lack it
        self.keypoint_mean = None if k is None else torch.tensor(k["mean"], dtype=torch.float32)
        self.keypoint_std = None if k is None else torch.tensor(k["std"], dtype=torch.float32).clamp(min=1e-3)

    @staticmethod
    def stats_from_dataset(dataset_stats: dict, keypoints: bool = False) -> dict:
        out = {"observation.state": {k: dataset_stats["observation.state"][k] for k in ("mean", "std")},
               "action": {k: dataset_stats["action"][k] for k in ("min", "max")}}
        if keypoints and ENV_STATE in dataset_stats:
            out[ENV_STATE] = {k: dataset_stats[ENV_STATE][k] for k in ("mean", "std")}
        return out

    def state(self, x: torch.Tensor) -> torch.Tensor:
        return (x - self.state_mean.to(x.device)) / self.state_std.to(x.device)

    def action(self, x: torch.Tensor) -> torch.Tensor:
        return 2 * (x - self.action_min.to(x.device)) / self.action_scale.to(x.device) - 1

    def unaction(self, x: torch.Tensor) -> torch.Tensor:
        return (x + 1) / 2 * self.action_scale.to(x.device) + self.action_min.to(x.device)

    def keypoints(self, x: torch.Tensor) -> torch.Tensor:
        return x * self.keypoint_std.to(x.device) + self.keypoint_mean.to(x.device)

    def keypoints_normalized(self, x: torch.Tensor) -> torch.Tensor:
        return (x - self.keypoint_mean.to(x.device)) / self.keypoint_std.to(x.device)


def frames_to_unit(frames: torch.Tensor) -> torch.Tensor:
    """uint8 (..., H, W, 3) -> float (..., 3, H, W) in [0, 1]."""
    return frames.movedim(-1, -3).float() / 255.0


def normalize_images(x: torch.Tensor) -> torch.Tensor:
    """[0, 1] -> the vision encoder's input range."""
    return (x - IMAGE_MEAN) / IMAGE_STD


def model_inputs(batch: dict, cameras, normalizer: Normalizer, device) -> tuple[torch.Tensor, torch.Tensor]:
    """A batch of observations ('observation.images.<camera>' uint8 (B, H, W, 3) and 'observation.state'
    (B, state_dim) in raw units, numpy arrays) -> images (B, n_cam, 3, H, W) in [0, 1] and the
    normalized state (B, state_dim), on `device`."""
    frames = torch.stack([torch.from_numpy(np.ascontiguousarray(batch[f"observation.images.{c}"])) for c in cameras], 1)
    state = torch.from_numpy(np.asarray(batch["observation.state"], dtype=np.float32))
    return frames_to_unit(frames.to(device)), normalizer.state(state.to(device))


def augment(images: torch.Tensor, pad: int = 4, points: torch.Tensor | None = None):
    """Training only: random shift by up to `pad` px each way (pad by edge replication, random crop;
    0: none) and color jitter; images (B, n, 3, H, W) in [0, 1]. With `points` (B, n, P, 2: x, y in
    [-1, 1] across each camera's frame, as observation.pixel_keypoints) returns (images, points)
    with the points moved as their frames were."""
    b, n, c, h, w = images.shape
    x = images.reshape(b * n, c, h, w)
    if pad > 0:
        x = torch.nn.functional.pad(x, (pad, pad, pad, pad), mode="replicate")
        ox = torch.randint(0, 2 * pad + 1, (b * n,))
        oy = torch.randint(0, 2 * pad + 1, (b * n,))
        rows = (oy[:, None] + torch.arange(h)[None]).to(x.device)
        cols = (ox[:, None] + torch.arange(w)[None]).to(x.device)
        x = x[torch.arange(b * n)[:, None, None], :, rows[:, :, None], cols[:, None, :]].permute(0, 3, 1, 2)
        if points is not None:  # what stood at column c now stands at c + pad - ox
            move = torch.stack([(pad - ox) * 2.0 / w, (pad - oy) * 2.0 / h], -1).view(b, n, 1, 2)
            points = points + move.to(points.device, points.dtype)
    brightness = 1 + (torch.rand(b * n, 1, 1, 1, device=x.device) - 0.5) * 0.3
    contrast = 1 + (torch.rand(b * n, 1, 1, 1, device=x.device) - 0.5) * 0.3
    mean = x.mean(dim=(1, 2, 3), keepdim=True)
    x = ((x - mean) * contrast + mean) * brightness
    x = x.clamp(0, 1).reshape(b, n, c, h, w)
    return x if points is None else (x, points)
