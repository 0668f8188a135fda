"""How well a policy with the keypoint aid locates the object and the goal: its keypoint head's
mean |error| per task, in cm, on a dataset's frames (observation.environment_state: object xyz,
goal xyz), beside the error of always answering the task's mean position (what no vision gives).

    .venv/bin/python scripts/keypoint_error.py runs/mt10_sp/final data/mt10_96 --frames 400
"""

from __future__ import annotations

import argparse

import numpy as np
import torch

from vla.artifact import load_artifact
from vla.dataset import LeRobotDataset
from vla.transforms import model_inputs


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("policy")
    p.add_argument("dataset")
    p.add_argument("--frames", type=int, default=400, help="frames per task, drawn at random")
    p.add_argument("--first-frames", action="store_true", help="each episode's first frame only")
    args = p.parse_args()

    model, _, norm = load_artifact(args.policy)
    if model.keypoint_head is None:
        raise SystemExit(f"{args.policy}: the model has no keypoint head (model.keypoints=0)")
    cfg = model.cfg
    ds = LeRobotDataset(args.dataset, horizon=1, cameras=list(cfg.cameras), image_size=cfg.image_size,
                        image_fit=cfg.image_fit)
    if ds.env_state is None:
        raise SystemExit(f"{args.dataset}: no observation.environment_state to compare with")
    names = dict(ds.meta.tasks)  # task_index -> instruction
    rng = np.random.default_rng(0)
    print(f"{'task':60s} {'object cm':>10s} {'(mean)':>8s} {'goal cm':>8s} {'(mean)':>8s}")
    for t in sorted(np.unique(ds.task_index)):
        rows = np.flatnonzero(ds.task_index == t)
        if args.first_frames:
            rows = rows[ds.frame_index[rows] == 0]
        rows = rng.choice(rows, min(args.frames, len(rows)), replace=False)
        preds = []
        for chunk in np.array_split(rows, max(1, len(rows) // 64)):
            b = ds.batch(chunk)
            images, state = model_inputs(b, cfg.cameras, norm, "cpu")
            ids, mask = model.backbone.tokenize([names[t]] * len(chunk), "cpu")
            with torch.no_grad():
                _, memory, spatial = model.encode(images, ids, mask, state, return_memory=True)
                preds.append(norm.keypoints(model.keypoints_from_memory(memory, spatial)).numpy())
        pred = np.concatenate(preds)
        true = ds.env_state[rows]
        err = np.linalg.norm((pred - true).reshape(len(rows), -1, 3), axis=-1).mean(0) * 100
        base = np.linalg.norm((true - true.mean(0)).reshape(len(rows), -1, 3), axis=-1).mean(0) * 100
        print(f"{names[t][:60]:60s} {err[0]:10.1f} {base[0]:8.1f} {err[1]:8.1f} {base[1]:8.1f}")


if __name__ == "__main__":
    main()
