"""Does a policy listen to the instruction? For unseen scenes, predict the first chunk under every
instruction variant of the same scene and print how far the chunk's final joint targets move
between variants (a policy that ignores the words gives ~0), beside the expert's own spread.

  .venv/bin/python scripts/probe_grounding.py --policy runs/X/final [--tasks press_button pick_cube]
"""

import argparse

import numpy as np
import torch

from vla.policies import Policy
from vla.sim.collect import EVAL_SEED_START
from vla.sim.experts import ScriptedExpert
from vla.sim.env import TabletopEnv
from vla.sim.tasks import TASKS


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--policy", required=True)
    ap.add_argument("--tasks", nargs="+", default=["press_button", "pick_cube", "push_cube"])
    ap.add_argument("--scenes", type=int, default=6)
    args = ap.parse_args()
    torch.set_num_threads(1)
    policy = Policy.from_pretrained(args.policy)
    for task in args.tasks:
        env = TabletopEnv(task, image_size=policy.spec["image_size"])
        model_spread, expert_spread = [], []
        for s in range(args.scenes):
            seed = EVAL_SEED_START + 500 + s
            ends, expert_ends = [], []
            for v in range(len(TASKS[task]().variants())):
                obs, _ = env.reset(seed=seed, options={"variant": v})
                policy.reset(seed)
                ends.append(policy.act_chunk(obs)[-1, :6])
                expert = ScriptedExpert(env)
                expert.reset()
                for _ in range(policy.spec["horizon"]):
                    action = expert.act()
                    env.step(action)
                expert_ends.append(np.asarray(action)[:6])
            model_spread.append(np.ptp(np.stack(ends), axis=0))
            expert_spread.append(np.ptp(np.stack(expert_ends), axis=0))
        m, e = np.mean(model_spread, 0), np.mean(expert_spread, 0)
        print(f"{task:14s} spread of chunk-end joints across instructions (rad): "
              f"model j1 {m[0]:.3f} mean {m.mean():.3f} | expert j1 {e[0]:.3f} mean {e.mean():.3f}")
        env.close()


if __name__ == "__main__":
    main()
