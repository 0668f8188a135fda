"""Does the keypoint head read the trained spatial maps well? Per task, fits the object's and the
goal's xyz as a quadratic in the first camera's map (x, y) on a training set's first frames (a readout that can
only use the pixel), then scores it on held-out first frames beside the keypoint head's own error
and the task mean's (cm; the share within 5 cm, MetaWorld reach's success radius, in brackets):

    .venv/bin/vla collect --suite metaworld --tasks reach-v3,pick-place-v3 --episodes 50 --seed 1000000 \\
        --image-size 96 --out data/mt10_heldout50
    .venv/bin/python scripts/keypoint_readout.py runs/mt10_px/final data/mt10_96 data/mt10_heldout50
"""

from __future__ import annotations

import argparse

import numpy as np
from keypoint_error import readings  # scripts/ is on the path when run as a script

from vla.artifact import load_artifact
from vla.dataset import LeRobotDataset


def first_frames(model, norm, path: str) -> dict:
    """instruction -> (the first camera's first P map coordinates (N, P, 2), head keypoints (N, 2, 3),
    true keypoints (N, 2, 3)) on each episode's first frame."""
    cfg = model.cfg
    ds = LeRobotDataset(path, horizon=1, cameras=list(cfg.cameras), image_size=cfg.image_size,
                        image_fit=cfg.image_fit)
    names = dict(ds.meta.tasks)  # task_index -> instruction
    out = {}
    for t in sorted(np.unique(ds.task_index)):
        instruction = names[t]
        rows = np.flatnonzero((ds.task_index == t) & (ds.frame_index == 0))
        head, coords = readings(model, norm, ds, rows, instruction)
        out[instruction] = (coords[:, 0, :cfg.pixel_keypoints], head.reshape(len(rows), 2, 3),
                            ds.env_state[rows].reshape(len(rows), 2, 3))
    return out


def quadratic(xy: np.ndarray) -> np.ndarray:
    x, y = xy[:, 0], xy[:, 1]
    return np.stack([np.ones_like(x), x, y, x * x, x * y, y * y], 1)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("policy", help="an artifact with a keypoint head and model.pixel_keypoints=2")
    p.add_argument("train", help="the dataset it trained on")
    p.add_argument("heldout", help="the same tasks at other seeds")
    args = p.parse_args()
    model, _, norm = load_artifact(args.policy)
    if model.keypoint_head is None or model.cfg.pixel_keypoints < 2:
        raise SystemExit(f"{args.policy}: needs model.keypoints and model.pixel_keypoints >= 2")
    train, test = first_frames(model, norm, args.train), first_frames(model, norm, args.heldout)
    print(f"{'task':40s} {'point':6s} {'n':>3s} {'readout cm':>15s} {'head cm':>15s} {'mean cm':>8s}")
    for task, (coords, head, true) in test.items():
        if task not in train:
            continue
        for k, point in enumerate(("object", "goal")):
            w, *_ = np.linalg.lstsq(quadratic(train[task][0][:, k]), train[task][2][:, k], rcond=None)
            fit = np.linalg.norm(quadratic(coords[:, k]) @ w - true[:, k], axis=-1) * 100
            own = np.linalg.norm(head[:, k] - true[:, k], axis=-1) * 100
            mean = np.linalg.norm(train[task][2][:, k].mean(0) - true[:, k], axis=-1) * 100
            print(f"{task[:40]:40s} {point:6s} {len(true):3d} {fit.mean():6.1f} ({np.mean(fit < 5):4.0%})"
                  f" {own.mean():6.1f} ({np.mean(own < 5):4.0%}) {mean.mean():8.1f}")


if __name__ == "__main__":
    main()
