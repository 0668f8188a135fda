"""`vla train`: one YAML recipe per run; AdamW, warmup + cosine, clipping, EMA, augmentation.

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
import json
import math
import os
import re
import shutil
import sys
import time
from dataclasses import asdict
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
from safetensors.torch import load_file, save_file
from tqdm import tqdm

from vla.artifact import ArtifactError, Normalizer, save_artifact
from vla.config import TrainConfig, VLAConfig, load_recipe
from vla.dataset import DatasetError, LeRobotDataset
from vla.jobs.evaluate import evaluate
from vla.model import VLA
from vla.policies import Policy
from vla.spec import PolicySpec
from vla.tokenizer import build_tokenizer

CHECKPOINT_RE = re.compile(r"^step-(\d{6,})$")


def augment(images: torch.Tensor, pad: int = 4) -> torch.Tensor:
    """Random shift (pad by edge replication, random crop) and color jitter; images (B, n, 3, H, W) in [0, 1]."""
    b, n, c, h, w = images.shape
    x = images.reshape(b * n, c, h, w)
    x = torch.nn.functional.pad(x, (pad, pad, pad, pad), mode="replicate")
    ox = torch.randint(0, 2 * pad + 1, (b * n,))
    oy = torch.randint(0, 2 * pad + 1, (b * n,))
    rows = (oy[:, None] + torch.arange(h)[None]).to(x.device)
    cols = (ox[:, None] + torch.arange(w)[None]).to(x.device)
    x = x[torch.arange(b * n)[:, None, None], :, rows[:, :, None], cols[:, None, :]].permute(0, 3, 1, 2)
    brightness = 1 + (torch.rand(b * n, 1, 1, 1, device=x.device) - 0.5) * 0.3
    contrast = 1 + (torch.rand(b * n, 1, 1, 1, device=x.device) - 0.5) * 0.3
    mean = x.mean(dim=(1, 2, 3), keepdim=True)
    x = ((x - mean) * contrast + mean) * brightness
    return x.clamp(0, 1).reshape(b, n, c, h, w)


def _require_keypoints(ds: LeRobotDataset, path: str, size: int, hint: str) -> None:
    key = ds.env_state_key
    if key is None or tuple(ds.meta.features[key]["shape"]) != (size,):
        raise DatasetError(f"{path}: model.keypoints={size} needs an observation.environment_state "
                           f"feature of that size ({hint})")


class Batches:
    """Deterministic data order: epoch e is a permutation seeded by (seed, e); rank r of w takes
    every w-th index. The position (epoch, pos) is saved in checkpoints."""

    def __init__(self, n: int, batch_size: int, seed: int, rank: int = 0, world: int = 1,
                 pool: np.ndarray | None = None):
        """`pool`: the sample indices of one epoch (with repeats for oversampling); default range(n)."""
        self.pool = np.arange(n) if pool is None else np.asarray(pool)
        n = len(self.pool)
        self.n, self.bs, self.seed, self.rank, self.world = n, batch_size // world, seed, rank, world
        if self.bs < 1:
            raise ValueError(f"batch_size {batch_size} is smaller than the number of processes {world}")
        self.epoch, self.pos = 0, 0
        self._perm()

    def _perm(self):
        full = np.random.default_rng([self.seed, self.epoch]).permutation(self.n)
        per_rank = self.n // self.world
        self.order = full[self.rank::self.world][:per_rank]

    def next(self) -> np.ndarray:
        if self.pos + self.bs > len(self.order):
            self.epoch, self.pos = self.epoch + 1, 0
            self._perm()
        idx = self.pool[self.order[self.pos:self.pos + self.bs]]
        self.pos += self.bs
        return idx

    def state(self) -> dict:
        return {"epoch": self.epoch, "pos": self.pos}

    def load(self, s: dict):
        self.epoch, self.pos = s["epoch"], s["pos"]
        self._perm()


def lr_lambda(cfg: TrainConfig):
    def f(step: int) -> float:
        warm = min(1.0, (step + 1) / max(1, cfg.warmup_steps))
        progress = min(1.0, max(0.0, (step - cfg.warmup_steps) / max(1, cfg.steps - cfg.warmup_steps)))
        return warm * 0.5 * (1 + math.cos(math.pi * progress))
    return f


def make_spec(model_cfg: VLAConfig, ds: LeRobotDataset) -> PolicySpec:
    feats = ds.meta.features
    names = {k: tuple(feats[k]["names"]) if feats[k].get("names") else None for k in ("observation.state", "action")}
    return PolicySpec(cameras=tuple(model_cfg.cameras), image_size=model_cfg.image_size,
                      state_dim=model_cfg.state_dim, action_dim=model_cfg.action_dim, horizon=model_cfg.horizon,
                      n_action_steps=model_cfg.n_action_steps, fps=ds.meta.fps,
                      state_names=names["observation.state"], action_names=names["action"],
                      robot_type=ds.meta.info.get("robot_type"))


def _flatten_optimizer(opt: torch.optim.Optimizer) -> tuple[dict, dict]:
    sd = opt.state_dict()
    tensors = {f"opt.{i}.{k}": v for i, st in sd["state"].items() for k, v in st.items() if torch.is_tensor(v)}
    return tensors, {"param_groups": sd["param_groups"]}


def _unflatten_optimizer(tensors: dict, meta: dict) -> dict:
    state: dict = {}
    for key, v in tensors.items():
        if key.startswith("opt."):
            _, i, name = key.split(".", 2)
            state.setdefault(int(i), {})[name] = v
    return {"state": state, "param_groups": meta["param_groups"]}


def find_checkpoints(output_dir: Path) -> list[Path]:
    root = output_dir / "checkpoints"
    if not root.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in root.iterdir() if (m := CHECKPOINT_RE.match(p.name))
             and (p / "training_state.json").is_file()]
    return [p for _, p in sorted(found)]


class Trainer:
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
        self.recipe = {"model": model_cfg.to_dict(), "train": asdict(cfg)}
        self.recipe_source = source

        self.ds = LeRobotDataset(cfg.dataset, horizon=model_cfg.horizon, cameras=list(model_cfg.cameras))
        shape = self.ds.images[self.ds.video_keys[0]].shape[1:3]
        if shape != (model_cfg.image_size, model_cfg.image_size):
            raise DatasetError(f"{cfg.dataset}: camera frames are {shape[0]}x{shape[1]} but the model config "
                               f"says image_size={model_cfg.image_size}")
        stats_path = Path(cfg.dataset) / "meta" / "stats.json"
        self.train_keypoints = model_cfg.keypoints > 0
        if self.train_keypoints:
            _require_keypoints(self.ds, cfg.dataset, model_cfg.keypoints, "vla collect records one")
        self.stats = Normalizer.stats_from_dataset(json.loads(stats_path.read_text()), self.train_keypoints)
        self.norm = Normalizer(self.stats)
        self.spec = make_spec(model_cfg, self.ds)

        torch.manual_seed(cfg.seed)  # identical initial weights on every rank
        tokenizer = build_tokenizer(self.ds.meta.tasks.values()) if not model_cfg.backbone.pretrained else None
        self.model = VLA.build(model_cfg, tokenizer).to(self.device)
        if cfg.init:
            self._init_from(cfg.init)
        self.task_ids, self.task_mask = self._task_tokens(self.ds)
        self.ddp = torch.nn.parallel.DistributedDataParallel(self.model) if self.world > 1 else None

        params = [(n, p) for n, p in self.model.named_parameters() if p.requires_grad]
        groups = {}
        for n, p in params:
            lr = cfg.backbone_lr if (cfg.backbone_lr is not None and n.startswith("backbone.")) else cfg.lr
            wd = cfg.weight_decay if p.ndim >= 2 else 0.0
            groups.setdefault((lr, wd), []).append(p)
        self.opt = torch.optim.AdamW([{"params": ps, "lr": lr, "weight_decay": wd} for (lr, wd), ps in groups.items()],
                                     betas=(0.9, 0.95))
        self.sched = torch.optim.lr_scheduler.LambdaLR(self.opt, lr_lambda(cfg))
        self.ema = {k: v.detach().clone() for k, v in self.model.state_dict().items()}
        pool = None
        if cfg.early_frames > 0 and cfg.early_repeat > 1:
            early = np.flatnonzero(self.ds.frame_index < cfg.early_frames)
            pool = np.concatenate([np.arange(len(self.ds))] + [early] * (cfg.early_repeat - 1))
        self.batches = Batches(len(self.ds), cfg.batch_size, cfg.seed, self.rank, self.world, pool)
        self.kp_ds = None
        if cfg.keypoint_dataset:
            if not self.train_keypoints:
                raise ValueError("train.keypoint_dataset needs model.keypoints > 0")
            self.kp_ds = LeRobotDataset(cfg.keypoint_dataset, horizon=1, cameras=list(model_cfg.cameras))
            _require_keypoints(self.kp_ds, cfg.keypoint_dataset, model_cfg.keypoints,
                               "vla collect --scenes-only records one")
            kp_shape = self.kp_ds.images[self.kp_ds.video_keys[0]].shape[1:3]
            if kp_shape != shape:
                raise DatasetError(f"{cfg.keypoint_dataset}: frames are {kp_shape}, the demonstrations' {shape}")
            self.kp_task_ids, self.kp_task_mask = self._task_tokens(self.kp_ds)
            self.kp_batches = Batches(len(self.kp_ds), cfg.keypoint_batch, cfg.seed + 1, self.rank, self.world)
        self.step = 0

    def _task_tokens(self, ds: LeRobotDataset) -> tuple[torch.Tensor, torch.Tensor]:
        """Token ids and mask of every instruction of `ds`, indexed by task_index."""
        n_tasks = max(ds.meta.tasks) + 1
        return self.model.backbone.tokenize([ds.meta.tasks.get(i, "") for i in range(n_tasks)], self.device)

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

    # --- one optimisation step ---
    def _inputs(self, ds: LeRobotDataset, b: dict, task_ids: torch.Tensor, task_mask: torch.Tensor) -> dict:
        """The model's inputs (and keypoint targets, if trained) for rows `b` of dataset `ds`."""
        images = torch.stack([torch.from_numpy(b[k]) for k in ds.video_keys], 1)
        images = images.to(self.device).permute(0, 1, 4, 2, 3).float() / 255.0
        if self.cfg.augment:
            images = augment(images)
        t = torch.from_numpy(b["task_index"]).to(self.device)
        out = {"images": images, "input_ids": task_ids[t], "text_mask": task_mask[t],
               "state": self.norm.state(torch.from_numpy(b["observation.state"]).to(self.device))}
        if self.train_keypoints:
            out["keypoints"] = self.norm.keypoints_normalized(torch.from_numpy(b[ds.env_state_key]).to(self.device))
        return out

    def make_batch(self, idx: np.ndarray) -> dict:
        b = self.ds.batch(idx)
        batch = self._inputs(self.ds, b, self.task_ids, self.task_mask)
        batch["actions"] = self.norm.action(torch.from_numpy(b["action"]).to(self.device))
        pad = torch.from_numpy(b["action_is_pad"]).to(self.device)
        batch["action_is_pad"] = torch.zeros_like(pad) if self.cfg.pad_loss else pad
        if self.cfg.state_dropout > 0:
            batch["state_keep"] = (torch.rand(len(idx)) >= self.cfg.state_dropout).to(self.device)
        if self.train_keypoints:
            batch["keypoint_weight"] = self.cfg.keypoint_weight
        if self.kp_ds is not None:  # keypoint-only scenes, appended after the demonstration rows
            scenes = self._inputs(self.kp_ds, self.kp_ds.batch(self.kp_batches.next()),
                                  self.kp_task_ids, self.kp_task_mask)
            for k, v in scenes.items():
                batch[k] = torch.cat([batch[k], v])
            if "state_keep" in batch:  # scenes keep their state
                batch["state_keep"] = torch.cat([batch["state_keep"], torch.ones(len(scenes["state"]),
                                                                                  dtype=torch.bool, device=self.device)])
        return batch

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
        self._update_ema()
        self.step += 1
        loss = loss.detach()
        if self.world > 1:
            dist.all_reduce(loss)
            loss /= self.world
        return float(loss)

    @torch.no_grad()
    def _update_ema(self):
        decay = min(self.cfg.ema_decay, (1 + self.step) / (10 + self.step))
        for k, v in self.model.state_dict().items():
            if v.dtype.is_floating_point:
                self.ema[k].lerp_(v.detach(), 1 - decay)
            else:
                self.ema[k].copy_(v)

    # --- checkpoints ---
    def save(self) -> Path:
        path = self.out / "checkpoints" / f"step-{self.step:06d}"
        opt_tensors, opt_meta = _flatten_optimizer(self.opt)

        def extra(tmp: Path):
            tensors = {f"model.{k}": v for k, v in self.model.state_dict().items()}
            tensors.update({f"ema.{k}": v for k, v in self.ema.items()})
            tensors.update(opt_tensors)
            tensors["rng.torch"] = torch.get_rng_state()
            save_file({k: v.detach().cpu().contiguous() for k, v in tensors.items()},
                      tmp / "training_state.safetensors")
            (tmp / "training_state.json").write_text(json.dumps({
                "step": self.step, "data": self.batches.state(), "optimizer": opt_meta,
                "keypoint_data": self.kp_batches.state() if self.kp_ds is not None else None,
                "scheduler": self.sched.state_dict(), "world_size": self.world}))

        save_artifact(path, self.model, self.spec, self.stats, self.recipe, state_dict=self.ema, extra=extra,
                      recipe_note=self.recipe_source)
        for old in find_checkpoints(self.out)[:-self.cfg.keep_last]:
            shutil.rmtree(old)
        return path

    def resume(self) -> bool:
        ckpts = find_checkpoints(self.out)
        if not ckpts:
            return False
        path = ckpts[-1]
        meta = json.loads((path / "training_state.json").read_text())
        if meta.get("world_size", 1) != self.world:
            raise RuntimeError(f"{path} was written by {meta['world_size']} processes, this run has {self.world}")
        tensors = load_file(path / "training_state.safetensors")
        self.model.load_state_dict({k[6:]: v for k, v in tensors.items() if k.startswith("model.")})
        self.ema = {k[4:]: v.to(self.device) for k, v in tensors.items() if k.startswith("ema.")}
        self.opt.load_state_dict(_unflatten_optimizer(tensors, meta["optimizer"]))
        self.sched.load_state_dict(meta["scheduler"])
        torch.set_rng_state(tensors["rng.torch"])
        self.batches.load(meta["data"])
        if self.kp_ds is not None and meta.get("keypoint_data"):
            self.kp_batches.load(meta["keypoint_data"])
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
            loss = self.train_step(self.make_batch(self.batches.next()))
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
            save_artifact(final, self.model, self.spec, self.stats, self.recipe, state_dict=self.ema,
                          recipe_note=self.recipe_source)
        return final

    def _eval(self) -> str:
        policy = Policy(self._ema_model(), self.spec, self.norm)
        res = evaluate(policy, tasks=None, episodes=self.cfg.eval_episodes, workers=1, progress=False)
        return f"{res['mean_success']:.3f}"

    def _ema_model(self) -> VLA:
        m = copy.deepcopy(self.model)
        m.load_state_dict(self.ema)
        return m.eval()


def train(model_cfg: VLAConfig, cfg: TrainConfig, resume: bool = False, source: str = "",
          progress: bool = True) -> Path:
    trainer = Trainer(model_cfg, cfg, source, progress)
    if resume:
        trainer.resume()
    elif find_checkpoints(trainer.out):
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
