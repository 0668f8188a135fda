"""How well can one MetaWorld camera place a goal or the puck at all? For each fixed camera,
projects 20,000 positions drawn uniformly from reach's / pick-place's goal box and from the puck's
box into the 96-px image (to whole pixels: multisampling is off), and estimates each position as
the mean of the 40 others whose pixels are nearest (what a perfect detector on one frame could
answer: one image loses depth along the ray). Prints the image span and that estimate's error. Runs in the MetaWorld environment:

    PYTHONPATH=. .venv-metaworld/bin/python scripts/camera_ambiguity.py
"""

from __future__ import annotations

import numpy as np
from scipy.spatial import cKDTree

from vla.sim.metaworld_env import MetaWorldEnv

BOXES = {"reach/pick-place goal": ((-0.1, 0.8, 0.05), (0.1, 0.9, 0.3)),  # metaworld/envs/sawyer_reach_v3.py
         "puck": ((-0.1, 0.6, 0.02), (0.1, 0.7, 0.02))}
SIZE = 96


def main() -> None:
    env = MetaWorldEnv("reach-v3", image_size=SIZE)
    env.reset(seed=0)
    model, data = env.env.model, env.env.data
    rng = np.random.default_rng(0)
    for cam in range(model.ncam):
        if model.cam_mode[cam] != 0:  # the cameras on the gripper move with it
            continue
        pos, rot = data.cam_xpos[cam], data.cam_xmat[cam].reshape(3, 3)
        focal = (SIZE / 2) / np.tan(np.radians(model.cam_fovy[cam]) / 2)
        parts = []
        for name, (low, high) in BOXES.items():
            points = rng.uniform(low, high, (20000, 3))
            local = (points - pos) @ rot
            pixels = np.round(focal * local[:, :2] / -local[:, 2:3])
            _, nearest = cKDTree(pixels).query(pixels, k=41)
            error = np.linalg.norm(points[nearest[:, 1:]].mean(1) - points, axis=1)
            span = np.ptp(pixels, 0)
            parts.append(f"{name}: spans {span[0]:.0f} x {span[1]:.0f} px, error median {100 * np.median(error):.1f} cm, "
                         f"< 5 cm {np.mean(error < 0.05):.0%}, < 7 cm {np.mean(error < 0.07):.0%}")
        print(f"{model.camera(cam).name}: " + " | ".join(parts))
    env.close()


if __name__ == "__main__":
    main()
