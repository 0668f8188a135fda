"""`vla train`: one YAML recipe per run; the loop over vla.training's data, optimizer, EMA and checkpoints.

Many GPUs (or CPU processes) through torchrun: the same script under `torchrun --nproc_per_node N
-m vla.jobs.train ...` runs DDP (nccl on CUDA, gloo on CPU); `batch_size` is the global batch.

Checkpoints (`<output_dir>/checkpoints/step-XXXXXX/`) are full policy artifacts (EMA weights) plus
`training_state.safetensors` / `training_state.json` (raw weights, EMA, optimizer, scheduler, RNG,
data position), written to a temporary directory and renamed into place. `--resume` continues from
the newest one with the same step, optimizer, scheduler, EMA and data order.
"""

from __future__ import annotations

import argparse
import copy
import csv
import os
import sys
import time
from dataclasses import asdict
from pathlib import Path

import torch
import torch.distributed as dist
from safetensors.torch import load_file
from tqdm import tqdm

from vla.artifact import ArtifactError, save_artifact
from vla.config import TrainConfig, VLAConfig, load_recipe
from vla.dataset import DatasetError
from vla.jobs.evaluate import evaluate
from vla.model import VLA
from vla.policies import Policy
from vla.training import EMA, Checkpoints, TrainingData, make_optimizer


class Trainer:
    """The loop: the data, optimizer and schedule, EMA and checkpoints of vla.training, and one DDP
    model over them."""

    def __init__(self, model_cfg: VLAConfig, cfg: TrainConfig, source: str = "", progress: bool = True):
        """source: how the run was asked for (the command line), kept as a comment above the resolved
        recipe each artifact stores (which `vla train` re-runs unchanged)."""
        self.model_cfg, self.cfg, self.progress = model_cfg, cfg, progress
        self.world = int(os.environ.get("WORLD_SIZE", "1"))
        self.rank = int(os.environ.get("RANK", "0"))
        self.device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0"))) if torch.cuda.is_available() \
            else torch.device("cpu")
        if self.world > 1 and not dist.is_initialized():
            dist.init_process_group("nccl" if self.device.type == "cuda" else "gloo")
        if cfg.threads:
            torch.set_num_threads(cfg.threads)
        self.out = Path(cfg.output_dir)
        self.data = TrainingData(model_cfg, cfg, self.device, self.rank, self.world)
        self.model_cfg = model_cfg = self.data.model_cfg  # the robot fields resolved from the dataset
        recipe = {"model": model_cfg.to_dict(), "train": asdict(cfg)}
        self.ds, self.spec, self.norm = self.data.ds, self.data.spec, self.data.norm
        self.artifact = {"spec": self.spec, "stats": self.data.stats, "recipe": recipe, "recipe_note": source}
        torch.manual_seed(cfg.seed)  # identical initial weights on every rank
        self.model = VLA.build(model_cfg, None if model_cfg.backbone.pretrained else self.data.tokenizer())
        self.model.to(self.device)
        if cfg.init:
            self._init_from(cfg.init)
        self.data.tokenize_tasks(self.model.backbone)
        self.ddp = torch.nn.parallel.DistributedDataParallel(self.model) if self.world > 1 else None
        self.opt, self.sched = make_optimizer(self.model, cfg)
        self.ema = EMA(self.model, cfg.ema_decay)
        self.checkpoints = Checkpoints(self.out, cfg.keep_last)
        self.step = 0

    def _init_from(self, path: str) -> None:
        weights = Path(path) / "model.safetensors"
        if not weights.is_file():
            raise ArtifactError(f"train.init: {weights} does not exist")
        missing, unexpected = self.model.load_state_dict(load_file(str(weights), device=str(self.device)),
                                                         strict=False)
        # the one module a config may add to an artifact: zero-initialized, so the model starts unchanged
        missing = [k for k in missing if not k.startswith("head.keypoint_cond.")]
        if missing or unexpected:
            raise ArtifactError(f"train.init: {path} does not fit this model config "
                                f"(missing {missing[:3]}, unexpected {unexpected[:3]})")

    def make_batch(self, idx):
        return self.data.make_batch(idx)

    def train_step(self, batch: dict) -> float:
        self.model.train()
        net = self.ddp or self.model
        with torch.autocast("cuda", dtype=torch.bfloat16, enabled=self.device.type == "cuda"):
            loss = net(**batch)
        self.opt.zero_grad(set_to_none=True)
        loss.backward()
        if self.cfg.grad_clip:
            torch.nn.utils.clip_grad_norm_(self.model.parameters(), self.cfg.grad_clip)
        self.opt.step()
        self.sched.step()
        self.ema.update(self.model, self.step)
        self.step += 1
        loss = loss.detach()
        if self.world > 1:
            dist.all_reduce(loss)
            loss /= self.world
        return float(loss)

    def save(self) -> Path:
        return self.checkpoints.save(self.step, self.model, self.ema, self.opt, self.sched, self.data.state(),
                                     self.world, self.artifact)

    def resume(self) -> bool:
        meta = self.checkpoints.load_latest(self.model, self.ema, self.opt, self.sched, self.world, self.device)
        if meta is None:
            return False
        self.data.load(meta)
        self.step = meta["step"]
        return True

    # --- the loop ---
    def run(self) -> Path:
        cfg = self.cfg
        main = self.rank == 0
        log_path = self.out / "metrics.csv"
        if main:
            self.out.mkdir(parents=True, exist_ok=True)
            new_log = not log_path.exists()
            log = open(log_path, "a", newline="")
            writer = csv.writer(log)
            if new_log:
                writer.writerow(["step", "loss", "lr", "samples_per_s", "elapsed_s", "eval_success"])
        bar = tqdm(total=cfg.steps, initial=self.step, desc="train", disable=not (main and self.progress),
                   dynamic_ncols=True)
        t0, t_log, n_log = time.perf_counter(), time.perf_counter(), 0
        while self.step < cfg.steps:
            loss = self.train_step(self.make_batch(self.data.batches.next()))
            n_log += cfg.batch_size
            bar.update(1)
            if main and (self.step % cfg.log_every == 0 or self.step == cfg.steps):
                sps = n_log / (time.perf_counter() - t_log)
                bar.set_postfix(loss=f"{loss:.4f}", samples_s=f"{sps:.0f}")
                success = self._eval() if cfg.eval_every and self.step % cfg.eval_every == 0 else ""
                writer.writerow([self.step, f"{loss:.6f}", f"{self.sched.get_last_lr()[0]:.3e}", f"{sps:.1f}",
                                 f"{time.perf_counter() - t0:.1f}", success])
                log.flush()
                t_log, n_log = time.perf_counter(), 0
            if self.step % cfg.save_every == 0 or self.step == cfg.steps:
                if main:
                    self.save()
                if self.world > 1:
                    dist.barrier()
        bar.close()
        final = self.out / "final"
        if main:
            log.close()
            save_artifact(final, self.model, state_dict=self.ema.weights, **self.artifact)
        return final

    def _eval(self) -> str:
        policy = Policy(self._ema_model(), self.spec, self.norm)
        res = evaluate(policy, tasks=None, episodes=self.cfg.eval_episodes, workers=1, progress=False)
        return f"{res['mean_success']:.3f}"

    def _ema_model(self) -> VLA:
        m = copy.deepcopy(self.model)
        m.load_state_dict(self.ema.weights)
        return m.eval()


def train(model_cfg: VLAConfig, cfg: TrainConfig, resume: bool = False, source: str = "",
          progress: bool = True) -> Path:
    trainer = Trainer(model_cfg, cfg, source, progress)
    if resume:
        trainer.resume()
    elif trainer.checkpoints.find():
        raise FileExistsError(f"{trainer.out} already holds checkpoints: pass --resume to continue, "
                           "or choose another output_dir")
    return trainer.run()


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="vla train")
    p.add_argument("recipe", help="YAML recipe (configs/*.yaml)")
    p.add_argument("overrides", nargs="*", help="key.sub=value, e.g. train.steps=100 model.head.type=flow")
    p.add_argument("--resume", action="store_true")
    args = p.parse_args(argv)
    model_cfg, cfg = load_recipe(args.recipe, args.overrides)
    source = " ".join(["vla train", args.recipe, *args.overrides])
    final = train(model_cfg, cfg, resume=args.resume, source=source)
    if int(os.environ.get("RANK", "0")) == 0:
        print(f"artifact: {final}")
    if dist.is_initialized():
        dist.destroy_process_group()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())


# --- `vla train` ---
def cmd_train(args) -> int:
    try:
        return main([args.recipe, *args.overrides] + (["--resume"] if args.resume else []))
    except (DatasetError, ValueError, OSError) as e:  # a bad recipe, dataset, init artifact or output_dir
        print(f"error: {e}", file=sys.stderr)
        return 2
