"""Can the nano backbone learn to find the object an instruction names, given enough samples?

Renders first frames of the multi-object tasks (arm at home: only the images and the words say
where to go), then trains the backbone + keypoint head alone on the keypoint loss and prints, on
held-out scenes, the target's xy error against the scene-blind error (predicting the mean) as
training goes on. A model that binds the color word to the object gets far below blind; one that
does not stays near it (the drawer, a single object, is the control).

  python scripts/probe_binding.py --scenes 20000 --steps 6000 --batch 256 --device cuda
"""

import argparse
import multiprocessing as mp
import time

import numpy as np
import torch

TASKS = ["pick_cube", "press_button", "push_cube", "stack_cubes", "place_in_bin", "place_on_plate", "close_drawer"]


def _render(job):
    from vla.sim import make_env

    task, seeds = job
    env = make_env(task, image_size=96)
    out = []
    for s in seeds:
        obs, _ = env.reset(seed=int(s))
        out.append((np.stack([obs["observation.images.front"], obs["observation.images.wrist"]]),
                    obs["observation.state"], obs["task"], env.task.keypoints(), task))
    env.close()
    return out


def render(n: int, seed0: int, workers: int):
    per = n // len(TASKS)
    jobs = [(t, range(seed0 + i, seed0 + per, workers)) for t in TASKS for i in range(workers)]
    with mp.get_context("spawn").Pool(workers) as pool:
        rows = [r for part in pool.imap_unordered(_render, jobs) for r in part]
    return rows


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--scenes", type=int, default=20000)
    ap.add_argument("--steps", type=int, default=6000)
    ap.add_argument("--batch", type=int, default=256)
    ap.add_argument("--lr", type=float, default=3e-4)
    ap.add_argument("--workers", type=int, default=14)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--minutes", type=float, default=5.0, help="stop training after this long")
    ap.add_argument("--recipe", default="configs/nano_diffusion.yaml")
    args = ap.parse_args()

    from vla.config import load_recipe
    from vla.model import VLA
    from vla.tokenizer import build_tokenizer

    t0 = time.time()
    train = render(args.scenes, 0, args.workers)
    test = render(max(len(TASKS) * 40, args.scenes // 10), 500_000, args.workers)
    print(f"rendered {len(train)} + {len(test)} scenes in {time.time() - t0:.0f} s", flush=True)

    texts = sorted({r[2] for r in train + test})
    model_cfg, _ = load_recipe(args.recipe, ["model.keypoints=6"])
    dev = torch.device(args.device)
    torch.manual_seed(0)
    model = VLA.build(model_cfg, build_tokenizer(texts)).to(dev)
    ids_all, mask_all = model.backbone.tokenize(texts, dev)
    text_index = {t: i for i, t in enumerate(texts)}

    def tensors(rows):
        img = torch.from_numpy(np.stack([r[0] for r in rows])).permute(0, 1, 4, 2, 3).contiguous()
        state = torch.from_numpy(np.stack([r[1] for r in rows]))
        kp = torch.from_numpy(np.stack([r[3] for r in rows]))
        ti = torch.tensor([text_index[r[2]] for r in rows])
        return img.to(dev), state.to(dev), kp.to(dev), ti.to(dev)

    tr, te = tensors(train), tensors(test)
    kmean, kstd = tr[2].mean(0), tr[2].std(0).clamp(min=1e-3)
    smean, sstd = tr[1].mean(0), tr[1].std(0).clamp(min=1e-3)
    test_tasks = np.array([r[4] for r in test])
    params = [p for n, p in model.named_parameters() if not n.startswith("head.")]
    opt = torch.optim.AdamW(params, lr=args.lr, weight_decay=1e-4)

    def predict(img, state, ti):
        _, mem = model.encode(img.float() / 255, ids_all[ti], mask_all[ti], (state - smean) / sstd, return_memory=True)
        return model.keypoints_from_memory(mem) * kstd + kmean

    def report(step):
        model.eval()
        with torch.no_grad():
            pred = torch.cat([predict(te[0][i:i + 512], te[1][i:i + 512], te[3][i:i + 512])
                              for i in range(0, len(te[0]), 512)])
        model.train()
        err = (pred - te[2]).abs()[:, :2].mean(1).cpu().numpy()
        blind = (te[2] - kmean).abs()[:, :2].mean(1).cpu().numpy()
        cells = [f"{t.split('_')[0]}_{t.split('_')[1][:4]} {err[test_tasks == t].mean() * 100:4.1f}/{blind[test_tasks == t].mean() * 100:4.1f}"
                 for t in TASKS]
        print(f"step {step:6d} ({step * args.batch / 1e3:6.0f}k samples, {time.time() - t0:4.0f} s) target xy err/blind cm: "
              + "  ".join(cells), flush=True)

    t0 = time.time()
    g = torch.Generator(device="cpu").manual_seed(0)
    for step in range(args.steps + 1):
        if step % 500 == 0:
            report(step)
        if time.time() - t0 > args.minutes * 60:
            report(step)
            break
        idx = torch.randint(0, len(tr[0]), (args.batch,), generator=g).to(dev)
        with torch.autocast("cuda", dtype=torch.bfloat16, enabled=dev.type == "cuda"):
            pred = predict(tr[0][idx], tr[1][idx], tr[3][idx])
        loss = torch.nn.functional.smooth_l1_loss((pred.float() - kmean) / kstd, (tr[2][idx] - kmean) / kstd, beta=0.1)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()


if __name__ == "__main__":
    main()
