"""How well a policy locates the object and the goal on a dataset's frames, per task, beside the
error of always answering the task's mean position (what no vision gives):
- the keypoint head (model.keypoints): mean |error| in cm against observation.environment_state
  (object xyz, goal xyz);
- the trained spatial maps (model.pixel_keypoints): median error in pixels of the model's frame
  against observation.pixel_keypoints (points off the frame left out).

    .venv/bin/python scripts/keypoint_error.py runs/mt10_px/final data/mt10_heldout --frames 400
"""

from __future__ import annotations

import argparse

import numpy as np
import torch

from vla.artifact import load_artifact
from vla.dataset import LeRobotDataset
from vla.training import fitted_pixel_keypoints, pixel_keypoint_columns
from vla.transforms import model_inputs


def readings(model, norm, ds: LeRobotDataset, rows: np.ndarray, instruction: str):
    """The policy on dataset rows of one instruction, in batches of 64: (the keypoint head's keypoints
    (N, keypoints) or None, the spatial maps' coordinates (N, cameras, maps, 2) or None)."""
    cfg = model.cfg
    kps, coords = [], []
    for chunk in np.array_split(rows, max(1, len(rows) // 64)):
        images, state = model_inputs(ds.batch(chunk), cfg.cameras, norm, "cpu")
        ids, mask = model.backbone.tokenize([instruction] * len(chunk), "cpu")
        with torch.no_grad():
            _, memory, spatial, _, instruction = model.encode(images, ids, mask, state, return_memory=True)
            if model.keypoint_head is not None:
                raw = model.keypoints_from_memory(memory, spatial, instruction)
                kps.append(norm.keypoints(raw).numpy())
            if spatial is not None:
                coords.append(spatial.view(len(chunk), len(cfg.cameras), -1, 2).numpy())
    return (np.concatenate(kps) if kps else None), (np.concatenate(coords) if coords else None)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("policy")
    p.add_argument("dataset")
    p.add_argument("--frames", type=int, default=400, help="frames per task, drawn at random")
    p.add_argument("--first-frames", action="store_true", help="each episode's first frame only")
    args = p.parse_args()

    model, _, norm = load_artifact(args.policy)
    cfg = model.cfg
    ds = LeRobotDataset(args.dataset, horizon=1, cameras=list(cfg.cameras), image_size=cfg.image_size,
                        image_fit=cfg.image_fit)
    heads = model.keypoint_head is not None and ds.env_state is not None
    pixels = cfg.pixel_keypoints > 0 and "observation.pixel_keypoints" in ds.meta.features
    if not heads and not pixels:
        raise SystemExit(f"{args.policy} on {args.dataset}: neither a keypoint head with observation.environment_state "
                         "nor trained spatial maps with observation.pixel_keypoints to compare")
    columns = pixel_keypoint_columns(ds.meta, cfg.cameras, cfg.pixel_keypoints) if pixels else None
    names = dict(ds.meta.tasks)  # task_index -> instruction
    rng = np.random.default_rng(0)
    print(f"{'task':44s}" + (f" {'object cm':>10s} {'(mean)':>7s} {'goal cm':>8s} {'(mean)':>7s}" if heads else "")
          + (f" {'object px':>10s} {'(mean)':>7s} {'goal px':>8s} {'(mean)':>7s}" if pixels else ""))
    for t in sorted(np.unique(ds.task_index)):
        rows = np.flatnonzero(ds.task_index == t)
        if args.first_frames:
            rows = rows[ds.frame_index[rows] == 0]
        rows = rng.choice(rows, min(args.frames, len(rows)), replace=False)
        kps, coords = readings(model, norm, ds, rows, names[t])
        line = f"{names[t][:44]:44s}"
        if heads:
            true = ds.env_state[rows].reshape(len(rows), -1, 3)
            err = np.linalg.norm(kps.reshape(true.shape) - true, axis=-1).mean(0) * 100
            base = np.linalg.norm(true - true.mean(0), axis=-1).mean(0) * 100
            line += f" {err[0]:10.1f} {base[0]:7.1f} {err[1]:8.1f} {base[1]:7.1f}"
        if pixels:
            true = fitted_pixel_keypoints(ds.meta, ds.batch(rows)["observation.pixel_keypoints"], columns, cfg)
            pred = coords[:, :, :cfg.pixel_keypoints]
            on = (np.abs(true) <= 1).all(-1)
            px = cfg.image_size / 2
            err = np.linalg.norm(pred - true, axis=-1) * px
            base = np.linalg.norm(true - true.mean(0), axis=-1) * px
            e = [np.median(err[:, :, k][on[:, :, k]]) if on[:, :, k].any() else np.nan for k in range(2)]
            m = [np.median(base[:, :, k][on[:, :, k]]) if on[:, :, k].any() else np.nan for k in range(2)]
            line += f" {e[0]:10.1f} {m[0]:7.1f} {e[1]:8.1f} {m[1]:7.1f}"
        print(line)


if __name__ == "__main__":
    main()
