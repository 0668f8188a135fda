"""Training speed of a recipe's model without its datasets: forward + backward + AdamW on random
batches of DEMO demonstration rows + SCENE keypoint-only rows, median seconds per step over 9 steps.
For sizing a run before spending hours on it.

    .venv/bin/python scripts/train_throughput.py configs/nano_diffusion_2h.yaml 32 32 [key=value ...]
"""
import dataclasses
import sys
import time

import torch

from vla.config import load_recipe
from vla.model import VLA
from vla.tokenizer import build_tokenizer


def main(recipe: str, demo: int, scene: int, overrides: list[str]) -> None:
    torch.set_num_threads(2)
    mc, _ = load_recipe(recipe, overrides)
    # the robot the recipe leaves to its dataset: the project's sim arm (two cameras, 7 channels)
    mc = dataclasses.replace(mc, cameras=mc.cameras or ("front", "wrist"), state_dim=mc.state_dim or 7,
                             action_dim=mc.action_dim or 7, image_size=mc.image_size or mc.backbone.image_size)
    torch.manual_seed(0)
    model = VLA.build(mc, build_tokenizer(["pick up the red cube"]))
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
    rows = demo + scene
    ids, mask = model.backbone.tokenize(["pick up the red cube"] * rows, torch.device("cpu"))
    times = []
    for _ in range(12):
        batch = dict(images=torch.rand(rows, len(mc.cameras), 3, mc.image_size, mc.image_size),
                     input_ids=ids, text_mask=mask, state=torch.randn(rows, mc.state_dim),
                     actions=torch.randn(demo, mc.horizon, mc.action_dim),
                     action_is_pad=torch.zeros(demo, mc.horizon, dtype=torch.bool),
                     state_keep=torch.ones(rows, dtype=torch.bool),
                     keypoints=torch.randn(rows, mc.keypoints) if mc.keypoints else None)
        t0 = time.perf_counter()
        loss = model(**batch)
        opt.zero_grad()
        loss.backward()
        opt.step()
        times.append(time.perf_counter() - t0)
    step = sorted(times[3:])[4]
    params = sum(p.numel() for p in model.parameters())
    print(f"{recipe} {' '.join(overrides)} demo {demo} + scene {scene}: {step:.3f} s/step, "
          f"{params / 1e6:.2f} M params, {demo / step:.1f} demonstration samples/s")


if __name__ == "__main__":
    main(sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), sys.argv[4:])
