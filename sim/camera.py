"""Where a MuJoCo camera's frame shows world points: the pinhole projection behind
`observation.pixel_keypoints` in both suites."""

from __future__ import annotations

import mujoco
import numpy as np

OFF_FRAME = 2.0  # |x| or |y| beyond 1 is off the frame; coordinates are clipped to this, and a point
#                  behind the camera reads as (OFF_FRAME, OFF_FRAME)


def project(model: mujoco.MjModel, data: mujoco.MjData, camera: str, points: np.ndarray,
            upside_down: bool = False) -> np.ndarray:
    """World points (N, 3) -> (N, 2) float32: x, y in [-1, 1] from the left / top edge of the
    rendered square frame to the right / bottom one, through the camera's pose (after the last
    forward pass) and fovy. `upside_down`: the frame is shown rotated by 180 degrees (MetaWorld's
    corner2, flipped upright)."""
    cam = model.camera(camera).id
    local = (np.asarray(points, dtype=np.float64) - data.cam_xpos[cam]) @ data.cam_xmat[cam].reshape(3, 3)
    depth = -local[:, 2:3]  # MuJoCo's camera looks along its -z
    half = np.tan(np.radians(model.cam_fovy[cam]) / 2)
    with np.errstate(divide="ignore", invalid="ignore"):
        xy = local[:, :2] / (np.where(depth > 0, depth, np.nan) * half)  # +x right, +y up
    xy[:, 1] = -xy[:, 1]  # image rows grow downwards
    if upside_down:
        xy = -xy
    return np.clip(np.nan_to_num(xy, nan=OFF_FRAME), -OFF_FRAME, OFF_FRAME).astype(np.float32)
