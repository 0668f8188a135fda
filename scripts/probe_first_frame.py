"""Where does a policy go before the arm has moved? At the first frame only the images and the words
say where the target is; later the arm's own motion also tells it.

Prints, per task:
  - chunk error (rad, mean over the 16 steps and 6 arm joints) against the dataset's expert chunk,
    at frames 0, 5 and 10 of training episodes, beside the scene-blind error (the mean chunk);
  - with a keypoint head (model.keypoints): its target xy error (cm) on unseen evaluation scenes,
    beside the scene-blind error.

  .venv/bin/python scripts/probe_first_frame.py --policy DIR --dataset data/suite96_v3
"""

import argparse

import numpy as np
import torch

from vla.artifact import normalizer_with_dataset_keypoints
from vla.dataset import LeRobotDataset
from vla.policies import Policy
from vla.sim import make_env
from vla.sim.collect import EVAL_SEED_START

TASKS = ["pick_cube", "press_button", "place_on_plate", "close_drawer"]


def chunk_errors(policy, ds, task, frames=(0, 5, 10), episodes=24):
    js = [j for j, e in enumerate(ds.meta.episodes) if e["sim_task"] == task][:episodes]
    out = []
    for f in frames:
        pred, truth = [], []
        for j in js:
            s = ds[int(ds.ep_start[j]) + f]
            obs = {k: v for k, v in s.items() if k.startswith("observation.") and "environment" not in k}
            obs["task"] = s["task"]
            policy.reset(0)
            pred.append(policy.act_chunk(obs)[:, :6])
            truth.append(s["action"][:, :6])
        pred, truth = np.stack(pred), np.stack(truth)
        out.append((f, np.abs(pred - truth).mean(), np.abs(truth - truth.mean(0)).mean()))
    return out


def keypoint_errors(policy, task, scenes=16):
    env = make_env(task, image_size=policy.spec["image_size"])
    pred, truth = [], []
    for s in range(scenes):
        obs, _ = env.reset(seed=EVAL_SEED_START + s)
        pred.append(policy.keypoints(obs))
        truth.append(env.task.keypoints())
    env.close()
    pred, truth = np.stack(pred), np.stack(truth)
    return np.abs(pred - truth)[:, :2].mean() * 100, np.abs(truth - truth.mean(0))[:, :2].mean() * 100


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--policy", required=True)
    ap.add_argument("--dataset", required=True, help="the training dataset (its episodes and keypoint stats)")
    ap.add_argument("--tasks", nargs="+", default=TASKS)
    args = ap.parse_args()
    torch.set_num_threads(1)
    policy = Policy.from_pretrained(args.policy)
    ds = LeRobotDataset(args.dataset, horizon=policy.horizon)
    keypoints = policy.model.keypoint_head is not None and ds.env_state_key is not None
    if keypoints and policy.norm.keypoint_mean is None:  # an artifact from before session 6
        policy.norm = normalizer_with_dataset_keypoints(args.policy, args.dataset)
    for task in args.tasks:
        cells = [f"frame {f}: {e:.3f} (blind {b:.3f})" for f, e, b in chunk_errors(policy, ds, task)]
        line = f"{task:15s} chunk error rad " + ", ".join(cells)
        if keypoints:
            e, b = keypoint_errors(policy, task)
            line += f" | unseen scenes: target xy error {e:.1f} cm (blind {b:.1f})"
        print(line, flush=True)


if __name__ == "__main__":
    main()
