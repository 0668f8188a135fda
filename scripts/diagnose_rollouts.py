"""Where rollouts of a carry-and-place task fail: per episode, the named object's highest point,
its closest approach to the goal while lifted, where it ends, whether the gripper let go, and the
keypoint head's error on the first and the last frame.

    .venv/bin/python scripts/diagnose_rollouts.py POLICY TASK EPISODES [DATASET]

Needs an artifact with a keypoint head. The keypoint normalization comes from its stats.json (the
shipped ones, and artifacts trained since session 6), else from DATASET (default data/suite96_v3).
Runs `--fast on`, on the evaluation seeds, one line of JSON per episode.
"""

import json
import sys

import numpy as np
import torch

from vla.artifact import normalizer_with_dataset_keypoints
from vla.fast import FastConfig
from vla.policies import Policy
from vla.sim import make_env
from vla.sim.collect import EVAL_SEED_START


def main(path, task, episodes, dataset="data/suite96_v3"):
    torch.set_num_threads(1)
    policy = Policy.from_pretrained(path, fast=FastConfig())
    if policy.norm.keypoint_mean is None:  # an artifact from before session 6
        policy.norm = normalizer_with_dataset_keypoints(path, dataset)
    env = make_env(task, image_size=policy.spec["image_size"], cameras=tuple(policy.spec["cameras"]))
    for seed in range(EVAL_SEED_START, EVAL_SEED_START + int(episodes)):
        obs, info = env.reset(seed=seed)
        policy.reset(seed)
        t = env.task
        kp0, true0 = policy.keypoints(obs), t.keypoints()
        max_z, closest = 0.0, float("inf")
        for _ in range(env.max_episode_steps):
            obs, _, terminated, truncated, info = env.step(policy.act(obs))
            c, g = t.target_pos(), t.goal_pos()
            max_z = max(max_z, float(c[2]))
            if c[2] > 0.04:
                closest = min(closest, float(np.linalg.norm(c[:2] - g[:2])))
            if terminated or truncated:
                break
        kp1 = policy.keypoints(obs)
        c, g = t.target_pos(), t.goal_pos()
        print(json.dumps({
            "seed": seed, "success": bool(info["success"]), "max_z": round(max_z, 3),
            "closest_xy_lifted": round(closest, 3) if np.isfinite(closest) else None,
            "final_xy": round(float(np.linalg.norm(c[:2] - g[:2])), 3), "final_z": round(float(c[2]), 3),
            "released": bool(t.released()),
            "target_kp_err_first": round(float(np.linalg.norm(kp0[:3] - true0[:3])), 3),
            "goal_kp_err_first": round(float(np.linalg.norm(kp0[3:] - true0[3:])), 3),
            "goal_kp_err_last": round(float(np.linalg.norm(kp1[3:] - g)), 3),
        }), flush=True)


if __name__ == "__main__":
    main(*sys.argv[1:])
