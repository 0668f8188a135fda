"""The pieces of a training run, each readable alone; `vla.jobs.train.Trainer` is the loop over them.

    resolve_model_config   the recipe's robot fields (cameras, frame size, dims) from the dataset
    TrainingData    the dataset (and keypoint-only scenes), checked against the recipe; normalization
                    stats, the policy spec, the data order and the model's batches
    Batches         a deterministic, resumable data order (in windows of episodes when the frame
                    cache cannot hold the whole dataset)
    make_optimizer  AdamW with per-group learning rate / weight decay, warmup + cosine schedule
    EMA             the exponential moving average of the weights (what artifacts store)
    Checkpoints     checkpoint directories: a full artifact (EMA weights) + the training state
"""

from __future__ import annotations

import dataclasses
import json
import math
import re
import shutil
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import load_file, save_file

from vla.artifact import save_artifact
from vla.config import TrainConfig, VLAConfig
from vla.dataset import PIXEL_KEYPOINTS, DatasetError, DatasetMeta, LeRobotDataset
from vla.spec import PolicySpec
from vla.tokenizer import build_tokenizer
from vla.transforms import Normalizer, augment, fit_points, model_inputs

CHECKPOINT_RE = re.compile(r"^step-(\d{6,})$")


class Batches:
    """Deterministic data order: epoch e is a permutation seeded by (seed, e); rank r of w takes
    every w-th index. The position (epoch, pos) is saved in checkpoints."""

    def __init__(self, n: int, batch_size: int, seed: int, rank: int = 0, world: int = 1,
                 pool: np.ndarray | None = None, episode_of: np.ndarray | None = None, window: int = 0):
        """`pool`: the sample indices of one epoch (with repeats for oversampling); default range(n).
        `window` > 0 (with `episode_of`, each sample's episode): the epoch visits episodes in a
        shuffled order, `window` frames' worth at a time, shuffling samples within each window, so
        a frame cache of that size decodes every episode once per epoch."""
        self.pool = np.arange(n) if pool is None else np.asarray(pool)
        n = len(self.pool)
        self.n, self.bs, self.seed, self.rank, self.world = n, batch_size // world, seed, rank, world
        if self.bs < 1:
            raise ValueError(f"batch_size {batch_size} is smaller than the number of processes {world}")
        self.episode_of, self.window = episode_of, window
        self.epoch, self.pos = 0, 0
        self._perm()

    def _windowed(self, rng: np.random.Generator) -> np.ndarray:
        eps = self.episode_of[self.pool]
        n_eps = int(eps.max()) + 1
        by_episode = np.argsort(eps, kind="stable")  # positions in the pool, grouped by episode
        bounds = np.searchsorted(eps[by_episode], np.arange(n_eps + 1))
        windows, size = [[]], 0
        for e in rng.permutation(n_eps):
            m = by_episode[bounds[e]:bounds[e + 1]]
            if not len(m):
                continue
            if size and size + len(m) > self.window:
                windows.append([])
                size = 0
            windows[-1].append(m)
            size += len(m)
        return np.concatenate([rng.permutation(np.concatenate(w)) for w in windows])

    def _perm(self):
        rng = np.random.default_rng([self.seed, self.epoch])
        full = self._windowed(rng) if self.window and self.episode_of is not None else rng.permutation(self.n)
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


def _require_keypoints(ds: LeRobotDataset, path: str, size: int, hint: str) -> None:
    key = ds.env_state_key
    if key is None or tuple(ds.meta.features[key]["shape"]) != (size,):
        raise DatasetError(f"{path}: model.keypoints={size} needs an observation.environment_state "
                           f"feature of that size ({hint})")


def pixel_keypoint_columns(meta: DatasetMeta, cameras, points: int) -> np.ndarray:
    """The columns of the dataset's observation.pixel_keypoints holding the first `points` points of
    each camera, (n_cam, points, 2 (x, y)), from its names "<camera>.<point>.<x|y>"; one DatasetError
    where it lacks one."""
    info = meta.root / "meta" / "info.json"
    feature = meta.features.get(PIXEL_KEYPOINTS)
    if feature is None:
        raise DatasetError(f"{info}: model.pixel_keypoints={points} needs an {PIXEL_KEYPOINTS} feature "
                           "(where each camera's frame shows each point; vla collect records one in both suites)")
    names = _channel_names(feature)
    if names is None:
        raise DatasetError(f"{info}: {PIXEL_KEYPOINTS} needs names, one '<camera>.<point>.<x|y>' per channel")
    cols = np.zeros((len(cameras), points, 2), dtype=np.int64)
    for c, cam in enumerate(cameras):
        found: dict[str, dict[str, int]] = {}
        for i, name in enumerate(names):
            cam_name, _, rest = name.partition(".")
            point, _, axis = rest.rpartition(".")
            if cam_name == cam and point and axis in ("x", "y"):
                found.setdefault(point, {})[axis] = i
        pts = [p for p, axes in found.items() if len(axes) == 2]
        if len(pts) < points:
            raise DatasetError(f"{info}: model.pixel_keypoints={points} but {PIXEL_KEYPOINTS} has {len(pts)} "
                               f"points (x and y) of camera {cam!r}: {names}")
        for k, p in enumerate(pts[:points]):
            cols[c, k] = found[p]["x"], found[p]["y"]
    return cols


def fitted_pixel_keypoints(meta: DatasetMeta, values: np.ndarray, columns: np.ndarray,
                           model_cfg: VLAConfig) -> np.ndarray:
    """Rows of observation.pixel_keypoints (B, channels) -> (B, n_cam, P, 2) float32: where each model
    camera's frame, fitted to the model's size as the reader fits it, shows each point."""
    points = np.asarray(values, dtype=np.float32)[:, columns]
    for i, cam in enumerate(model_cfg.cameras):
        h, w = meta.features[f"observation.images.{cam}"]["shape"][:2]
        points[:, i] = fit_points(points[:, i], h, w, model_cfg.image_size, model_cfg.image_fit)
    return points


def _channel_names(feature: dict) -> tuple[str, ...] | None:
    """LeRobot writes names as a list, or as {"motors": [...]} (older datasets)."""
    names = feature.get("names")
    if isinstance(names, dict):
        names = next(iter(names.values()), None)
    return tuple(names) if isinstance(names, list) and len(names) == feature["shape"][0] else None


def make_spec(model_cfg: VLAConfig, ds: LeRobotDataset) -> PolicySpec:
    feats = ds.meta.features
    names = {k: _channel_names(feats[k]) for k in ("observation.state", "action")}
    recorded = {c: tuple(feats[f"observation.images.{c}"]["shape"][:2]) for c in model_cfg.cameras}
    recorded = {c: s for c, s in recorded.items() if s != (model_cfg.image_size, model_cfg.image_size)}
    return PolicySpec(cameras=tuple(model_cfg.cameras), image_size=model_cfg.image_size,
                      state_dim=model_cfg.state_dim, action_dim=model_cfg.action_dim, horizon=model_cfg.horizon,
                      n_action_steps=model_cfg.n_action_steps, fps=ds.meta.fps,
                      state_names=names["observation.state"], action_names=names["action"],
                      robot_type=ds.meta.info.get("robot_type"), frame_shapes=recorded or None,
                      image_fit=model_cfg.image_fit, ros_contract=ds.meta.info.get("ros_contract"))


def _camera_sizes(meta: DatasetMeta, keys) -> set[tuple[int, int]]:
    return {tuple(meta.features[k]["shape"][:2]) for k in keys}


def resolve_model_config(model_cfg: VLAConfig, meta: DatasetMeta) -> VLAConfig:
    """The recipe with its robot fields taken from the dataset where it leaves them (None), and one
    DatasetError where it names what the dataset lacks or contradicts."""
    info = meta.root / "meta" / "info.json"
    feats = meta.features
    for key in ("observation.state", "action"):
        if key not in feats:
            raise DatasetError(f"{info}: features lack {key!r}")
    names = [k.removeprefix("observation.images.") for k in meta.camera_keys]
    cameras = tuple(model_cfg.cameras) if model_cfg.cameras is not None else tuple(names)
    missing = [c for c in cameras if c not in names]
    if missing or not cameras:
        raise DatasetError(f"{info}: the recipe's model.cameras {list(cameras)} are not all cameras of the "
                           f"dataset, which has {names}")
    dims = {}
    for field, key in (("state_dim", "observation.state"), ("action_dim", "action")):
        shape = feats[key]["shape"]
        if len(shape) != 1:
            raise DatasetError(f"{info}: {key} has shape {shape}; a vector is expected")
        given = getattr(model_cfg, field)
        if given is not None and given != shape[0]:
            raise DatasetError(f"the recipe's model.{field}={given} but {info} gives {key} {shape[0]} "
                               "channels: remove it from the recipe (it is read from the dataset) or fix it")
        dims[field] = shape[0]
    image_size = model_cfg.image_size
    if image_size is None:
        sizes = _camera_sizes(meta, [f"observation.images.{c}" for c in cameras])
        h, w = next(iter(sizes))
        image_size = h if len(sizes) == 1 and h == w else model_cfg.backbone.image_size
    return dataclasses.replace(model_cfg, cameras=cameras, image_size=image_size, **dims)


class TrainingData:
    """The recipe's data: read and checked once, then `make_batch(idx)` gives the model's inputs for
    rows idx (and, with train.keypoint_dataset, keypoint-only scenes appended)."""

    def __init__(self, model_cfg: VLAConfig, cfg: TrainConfig, device: torch.device, rank: int = 0, world: int = 1):
        """model_cfg as the recipe gives it; `self.model_cfg` is it resolved against the dataset."""
        self.cfg, self.device = cfg, device
        meta = DatasetMeta(cfg.dataset)
        self.model_cfg = model_cfg = resolve_model_config(model_cfg, meta)
        self.ds = self._open(cfg.dataset, model_cfg.horizon, meta)
        self.train_keypoints = model_cfg.keypoints > 0
        if self.train_keypoints:
            _require_keypoints(self.ds, cfg.dataset, model_cfg.keypoints, "vla collect records one")
        self.pixel_columns = self.kp_pixel_columns = None
        if model_cfg.pixel_keypoints > 0:
            self.pixel_columns = pixel_keypoint_columns(self.ds.meta, model_cfg.cameras, model_cfg.pixel_keypoints)
        self.stats = Normalizer.stats_from_dataset(self.ds.meta.stats, self.train_keypoints)
        self.norm = Normalizer(self.stats)
        self.spec = make_spec(model_cfg, self.ds)
        pool = None
        if cfg.early_frames > 0 and cfg.early_repeat > 1:
            early = np.flatnonzero(self.ds.frame_index < cfg.early_frames)
            pool = np.concatenate([np.arange(len(self.ds))] + [early] * (cfg.early_repeat - 1))
        # a dataset the frame cache cannot hold is visited in windows of episodes it can
        window = 0 if self.ds.cache_frames >= len(self.ds) else max(1, self.ds.cache_frames // 2)
        self.batches = Batches(len(self.ds), cfg.batch_size, cfg.seed, rank, world, pool,
                               episode_of=self.ds.frame_episode, window=window)
        self.kp_ds = None
        if cfg.keypoint_dataset:
            if not self.train_keypoints:
                raise ValueError("train.keypoint_dataset needs model.keypoints > 0")
            self.kp_ds = self._open(cfg.keypoint_dataset, 1)
            _require_keypoints(self.kp_ds, cfg.keypoint_dataset, model_cfg.keypoints,
                               "vla collect --scenes-only records one")
            self.kp_batches = Batches(len(self.kp_ds), cfg.keypoint_batch, cfg.seed + 1, rank, world)
            if self.pixel_columns is not None and PIXEL_KEYPOINTS in self.kp_ds.meta.features:
                # scenes that record where each frame shows the points train the maps' heatmaps too
                self.kp_pixel_columns = pixel_keypoint_columns(self.kp_ds.meta, model_cfg.cameras,
                                                               model_cfg.pixel_keypoints)
        self._tokens: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}

    def _open(self, root: str, horizon: int, meta: DatasetMeta | None = None) -> LeRobotDataset:
        c = self.model_cfg
        return LeRobotDataset(root, horizon=horizon, cameras=list(c.cameras), image_size=c.image_size,
                              image_fit=c.image_fit, cache_mb=self.cfg.cache_mb, meta=meta)

    def tokenizer(self):
        """A tokenizer of the dataset's instructions, for a backbone trained from scratch."""
        return build_tokenizer(self.ds.meta.tasks.values())

    def tokenize_tasks(self, backbone) -> None:
        """Token ids and mask of every instruction of each dataset, indexed by task_index."""
        for ds in [self.ds] + ([self.kp_ds] if self.kp_ds is not None else []):
            n_tasks = max(ds.meta.tasks) + 1
            self._tokens[id(ds)] = backbone.tokenize([ds.meta.tasks.get(i, "") for i in range(n_tasks)], self.device)

    def _inputs(self, ds: LeRobotDataset, b: dict) -> dict:
        """The model's inputs (and keypoint targets, if trained) for rows `b` of dataset `ds`."""
        images, state = model_inputs(b, self.model_cfg.cameras, self.norm, self.device)
        columns = self.pixel_columns if ds is self.ds else self.kp_pixel_columns
        points = None if columns is None else self._pixel_points(ds, b, columns)
        if self.cfg.augment:
            if points is None:
                images = augment(images, self.cfg.augment_shift)
            else:
                images, points = augment(images, self.cfg.augment_shift, points)
        ids, mask = self._tokens[id(ds)]
        t = torch.from_numpy(b["task_index"]).to(self.device)
        out = {"images": images, "input_ids": ids[t], "text_mask": mask[t], "state": state}
        if points is not None:
            out["pixel_keypoints"] = points
        if self.train_keypoints:
            out["keypoints"] = self.norm.keypoints_normalized(torch.from_numpy(b[ds.env_state_key]).to(self.device))
        return out

    def _pixel_points(self, ds: LeRobotDataset, b: dict, columns: np.ndarray) -> torch.Tensor:
        """(B, n_cam, P, 2): where each model camera's fitted frame shows each point."""
        points = fitted_pixel_keypoints(ds.meta, b[PIXEL_KEYPOINTS], columns, self.model_cfg)
        return torch.from_numpy(points).to(self.device)

    def make_batch(self, idx: np.ndarray) -> dict:
        cfg = self.cfg
        b = self.ds.batch(idx)
        batch = self._inputs(self.ds, b)
        batch["actions"] = self.norm.action(torch.from_numpy(b["action"]).to(self.device))
        pad = torch.from_numpy(b["action_is_pad"]).to(self.device)
        batch["action_is_pad"] = torch.zeros_like(pad) if cfg.pad_loss else pad
        if cfg.state_dropout > 0:
            batch["state_keep"] = (torch.rand(len(idx)) >= cfg.state_dropout).to(self.device)
        if self.train_keypoints:
            batch["keypoint_weight"] = cfg.keypoint_weight
        if self.pixel_columns is not None:
            batch["pixel_keypoint_weight"] = cfg.pixel_keypoint_weight
        if self.kp_ds is not None:  # keypoint-only scenes, appended after the demonstration rows
            scenes = self._inputs(self.kp_ds, self.kp_ds.batch(self.kp_batches.next()))
            for k, v in scenes.items():
                batch[k] = torch.cat([batch[k], v])
            if "state_keep" in batch:  # scenes keep their state
                keep = torch.ones(len(scenes["state"]), dtype=torch.bool, device=self.device)
                batch["state_keep"] = torch.cat([batch["state_keep"], keep])
        return batch

    def state(self) -> dict:
        return {"data": self.batches.state(),
                "keypoint_data": self.kp_batches.state() if self.kp_ds is not None else None}

    def load(self, state: dict) -> None:
        self.batches.load(state["data"])
        if self.kp_ds is not None and state.get("keypoint_data"):
            self.kp_batches.load(state["keypoint_data"])


def lr_lambda(cfg: TrainConfig):
    def f(step: int) -> float:
        warm = min(1.0, (step + 1) / max(1, cfg.warmup_steps))
        progress = min(1.0, max(0.0, (step - cfg.warmup_steps) / max(1, cfg.steps - cfg.warmup_steps)))
        return warm * 0.5 * (1 + math.cos(math.pi * progress))
    return f


def make_optimizer(model: torch.nn.Module, cfg: TrainConfig):
    """AdamW (betas 0.9 / 0.95; no weight decay on vectors; train.backbone_lr for the backbone) and
    its warmup + cosine schedule."""
    groups: dict[tuple[float, float], list] = {}
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        lr = cfg.backbone_lr if (cfg.backbone_lr is not None and name.startswith("backbone.")) else cfg.lr
        wd = cfg.weight_decay if p.ndim >= 2 else 0.0
        groups.setdefault((lr, wd), []).append(p)
    opt = torch.optim.AdamW([{"params": ps, "lr": lr, "weight_decay": wd} for (lr, wd), ps in groups.items()],
                            betas=(0.9, 0.95))
    return opt, torch.optim.lr_scheduler.LambdaLR(opt, lr_lambda(cfg))


class EMA:
    """weights <- decay * weights + (1 - decay) * model's, with the decay warmed up over the first
    steps (min(decay, (1 + step) / (10 + step))); integer buffers are copied."""

    def __init__(self, model: torch.nn.Module, decay: float):
        self.decay = decay
        self.weights = {k: v.detach().clone() for k, v in model.state_dict().items()}

    @torch.no_grad()
    def update(self, model: torch.nn.Module, step: int) -> None:
        decay = min(self.decay, (1 + step) / (10 + step))
        for k, v in model.state_dict().items():
            if v.dtype.is_floating_point:
                self.weights[k].lerp_(v.detach(), 1 - decay)
            else:
                self.weights[k].copy_(v)


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


class Checkpoints:
    """`<output_dir>/checkpoints/step-XXXXXX/`: a full policy artifact (EMA weights) plus
    training_state.safetensors / .json (raw weights, EMA, optimizer, RNG; step, data position,
    scheduler), written to a temporary directory and renamed into place; the newest `keep_last` kept."""

    def __init__(self, output_dir: str | Path, keep_last: int):
        self.root, self.keep_last = Path(output_dir) / "checkpoints", keep_last

    def find(self) -> list[Path]:
        if not self.root.is_dir():
            return []
        found = [(int(m.group(1)), p) for p in self.root.iterdir() if (m := CHECKPOINT_RE.match(p.name))
                 and (p / "training_state.json").is_file()]
        return [p for _, p in sorted(found)]

    def save(self, step: int, model, ema: EMA, opt, sched, data_state: dict, world: int, artifact: dict) -> Path:
        """artifact: save_artifact's spec, stats, recipe and recipe_note."""
        path = self.root / f"step-{step:06d}"
        opt_tensors, opt_meta = _flatten_optimizer(opt)

        def extra(tmp: Path):
            tensors = {f"model.{k}": v for k, v in model.state_dict().items()}
            tensors.update({f"ema.{k}": v for k, v in ema.weights.items()})
            tensors.update(opt_tensors)
            tensors["rng.torch"] = torch.get_rng_state()
            save_file({k: v.detach().cpu().contiguous() for k, v in tensors.items()},
                      tmp / "training_state.safetensors")
            (tmp / "training_state.json").write_text(json.dumps({
                "step": step, **data_state, "optimizer": opt_meta, "scheduler": sched.state_dict(),
                "world_size": world}))

        save_artifact(path, model, state_dict=ema.weights, extra=extra, **artifact)
        for old in self.find()[:-self.keep_last]:
            shutil.rmtree(old)
        return path

    def load_latest(self, model, ema: EMA, opt, sched, world: int, device) -> dict | None:
        """Restores the newest checkpoint into model / ema / opt / sched and the torch RNG; returns its
        training_state.json (step, data position), or None when there is none."""
        ckpts = self.find()
        if not ckpts:
            return None
        path = ckpts[-1]
        meta = json.loads((path / "training_state.json").read_text())
        if meta.get("world_size", 1) != world:
            raise RuntimeError(f"{path} was written by {meta['world_size']} processes, this run has {world}")
        tensors = load_file(path / "training_state.safetensors")
        model.load_state_dict({k[6:]: v for k, v in tensors.items() if k.startswith("model.")})
        ema.weights = {k[4:]: v.to(device) for k, v in tensors.items() if k.startswith("ema.")}
        opt.load_state_dict(_unflatten_optimizer(tensors, meta["optimizer"]))
        sched.load_state_dict(meta["scheduler"])
        torch.set_rng_state(tensors["rng.torch"])
        return meta
