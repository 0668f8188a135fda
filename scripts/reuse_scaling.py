"""Where token reuse and the matmul-peak fraction start to pay: the shipped nano_l1 architecture
(random weights) at larger camera/vision image sizes, compiled, 2 threads. Per size: the backbone
step (`FastVLA.encode`) with every token recomputed, with the front camera partial beside a full
wrist camera (the common reuse step on a robot), with both cameras partial, and the backbone's
matmul floor (vla.bench.matmul_floor) as a fraction of the measured peak (docs/benchmarks-log.md, session 11).

    .venv/bin/python scripts/reuse_scaling.py [SIZE ...]     # default: 64 96 128
    .venv/bin/python scripts/reuse_scaling.py --changes       # tokens changed between frames
"""

import sys

import torch

from vla.config import FastConfig, VLAConfig
from vla.fast import FastVLA
from vla.jobs.bench import fast_full_encode, matmul_floor, matmul_peak_gflops, median_seconds, record_rollout
from vla.kernels import region_change
from vla.model import VLA
from vla.policies import Policy, shipped_policy
from vla.sim import EVAL_SEED_START


def median_ms(fn) -> float:
    return median_seconds(fn, torch.device("cpu"), repeats=90) * 1e3


def token_changes() -> None:
    """Per camera, how many of its tokens change between consecutive frames of the shipped policy's
    own rollout, by the same measure as reuse's selection (vla.kernels.region_change)."""
    policy = Policy.from_pretrained(shipped_policy("nano_l1"))
    engine = FastVLA(policy.model, FastConfig())
    for task in ("pick_cube", "stack_cubes", "open_drawer"):
        xs = [engine.preprocess(policy.prepare(o)[0][0]) for o in record_rollout(policy, task, 60, EVAL_SEED_START)]
        change = torch.stack([region_change(a, b, engine.patch * engine.scale) for a, b in zip(xs[1:], xs[:-1])])
        for threshold in (0.02, 0.05, 0.1):
            n = (change > threshold).sum(-1).float()  # (frames, cameras)
            print(f"{task} threshold {threshold}: changed tokens per frame, median of "
                  + ", ".join(f"{c} {int(n[:, i].median())}" for i, c in enumerate(policy.spec.cameras))
                  + f" (of {engine.tokens})")


def scaling(sizes: list[int]) -> None:
    peak = matmul_peak_gflops()
    shipped = Policy.from_pretrained(shipped_policy("nano_l1")).model
    base, tokenizer = shipped.cfg.to_dict(), shipped.backbone.tokenizer
    text = "pick up the red cube"
    state, noise = torch.zeros(base["state_dim"]), torch.zeros(1, base["horizon"], base["action_dim"])
    print(f"fp32 matmul peak {peak:.1f} GFLOP/s, 2 threads")
    for size in sizes:
        cfg = VLAConfig.from_dict({**base, "image_size": size, "backbone": {**base["backbone"], "image_size": size}})
        torch._dynamo.reset()  # each size compiles anew (else dynamo's per-function cache limit is hit)
        torch.manual_seed(0)
        model = VLA.build(cfg, tokenizer).eval()
        images = torch.rand(len(cfg.cameras), 3, size, size)
        engine = FastVLA(model, FastConfig(compile=True, reuse=True))
        with torch.no_grad():
            engine.step(images, text, state, noise)  # compiles every shape
            x, state_token = engine.preprocess(images), model.state_proj(state[None])
            t = engine.tokens
            b = t - int(engine.cfg.reuse_max * t)
            full = torch.arange(t)
            ms = {combo: median_ms(lambda: engine.encode(x, [full if n == t else full[:n] for n in combo], state_token))
                  for combo in [(t, t), (b, t), (b, b)]}
        floor = matmul_floor(fast_full_encode(model, images, text, state), torch.device("cpu"))
        print(f"image {size}: {t} tokens per camera; backbone full {ms[(t, t)]:.2f} ms, front {b} + wrist {t} "
              f"{ms[(b, t)]:.2f} ms ({ms[(t, t)] / ms[(b, t)]:.2f}x), both {b} {ms[(b, b)]:.2f} ms "
              f"({ms[(t, t)] / ms[(b, b)]:.2f}x); {floor['gflop'] * 1e3:.0f} MFLOP: full step at "
              f"{100 * floor['gflop'] / ms[(t, t)] * 1e3 / peak:.0f} % of the peak, its matmuls alone "
              f"{floor['ms']:.2f} ms ({100 * floor['gflop'] / floor['ms'] * 1e3 / peak:.0f} %)")


if __name__ == "__main__":
    torch.set_num_threads(2)
    if sys.argv[1:] == ["--changes"]:
        token_changes()
    else:
        scaling([int(a) for a in sys.argv[1:]] or [64, 96, 128])
