"""Frozen configs of the model and of a training recipe, read from YAML and stored as JSON."""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from vla.spec import check_image_fit

INSTRUCTION_POOLING = ("lm", "tokens")


@dataclass(frozen=True)
class BackboneConfig:
    """The vision-language backbone. With `pretrained` unset a nano Idefics3 (SmolVLM's classes) is
    built from the sizes below and trained from scratch; with `pretrained` a local directory (or hub
    id, where a hub is reachable) of any Idefics3 / SmolVLM checkpoint is loaded instead."""

    pretrained: str | None = None
    image_size: int = 64  # the vision encoder's input size; camera frames are resized to it
    patch_size: int = 8
    scale_factor: int = 2  # SmolVLM's pixel shuffle: tokens per image / scale_factor**2
    vision_hidden: int = 64
    vision_layers: int = 3
    vision_heads: int = 4
    vision_mlp: int = 256
    text_hidden: int = 128
    text_layers: int = 4
    text_heads: int = 4
    text_kv_heads: int = 2
    text_mlp: int = 384
    max_text_tokens: int = 12
    film: bool = False  # condition every vision layer on the instruction (FiLM, as RT-1 does)
    # what the FiLMs and keypoint_input "maps" read of the instruction: "lm", the language model's
    # hidden states over it (word order counts), or "tokens", the mean of its token embeddings (a bag
    # of words: "red on blue" = "blue on red"; the artifacts of format_version 1 were trained with it)
    instruction_pooling: str = "lm"
    freeze: bool = False  # freeze the pretrained backbone (the head and state projection still train)
    lora_rank: int = 0  # >0: LoRA adapters (peft) on the language model's attention projections


@dataclass(frozen=True)
class HeadConfig:
    type: str = "diffusion"  # diffusion | flow | l1
    hidden: int = 128
    layers: int = 3
    heads: int = 4
    mlp: int = 512
    train_timesteps: int = 100  # diffusion: DDPM steps in training
    inference_steps: int = 10  # diffusion: DDIM steps; flow: Euler steps
    beta_schedule: str = "squaredcos_cap_v2"
    prediction_type: str = "epsilon"  # diffusion: what the head predicts, "epsilon" (the noise) or
    #                                   "sample" (the clean chunk, as RDT-1B; trains like L1 at high noise)
    noise_samples: int = 4  # noisy copies per sample in training (the head is cheap next to the backbone)
    loss: str = "mse"  # diffusion / flow: "mse", or "l1" on the same target (SR3 / Palette train
    #                    diffusion with L1); the l1 head's loss is always L1


@dataclass(frozen=True)
class VLAConfig:
    backbone: BackboneConfig = field(default_factory=BackboneConfig)
    head: HeadConfig = field(default_factory=HeadConfig)
    # The robot: None takes it from the training dataset's meta/info.json (`vla train` stores the
    # resolved values); a value the dataset contradicts is an error, never dropped or padded.
    cameras: tuple[str, ...] | None = None  # None: every camera of the dataset, in its order
    image_size: int | None = None  # the model's square frames; None: the dataset's frames where they
    #                                are all one square size, else the backbone's input size
    image_fit: str = "pad"  # frames of another size or aspect: "pad" (letterbox), "crop" (centre), "resize"
    state_dim: int | None = None
    action_dim: int | None = None
    horizon: int = 16  # actions per chunk
    n_action_steps: int = 8  # actions executed before re-planning
    keypoints: int = 0  # >0: an auxiliary head predicts the dataset's observation.environment_state
    #                     (sim keypoints of the named target and goal) from the prefix
    keypoint_cond: bool = False  # the action head is conditioned on the predicted keypoints (adaLN)
    keypoint_input: str = "prefix"  # what the keypoint head reads: "prefix", the last prefix token (it
    #                                 sees the state too), or "vision", the last visual token and the
    #                                 spatial coordinates, blind to the state: the hand's position then
    #                                 cannot stand in for finding the target in the pixels; or
    #                                 "maps", only the spatial maps' coordinates and the instruction
    spatial_keypoints: int = 0  # >0: that many spatial-softmax (x, y) readouts of each camera's frame
    #                             (a small conv net, model.SpatialKeypoints) condition the head (adaLN)
    pixel_keypoints: int = 0  # >0: the first that many spatial maps of each camera are trained on where
    #                           the frame shows each point (the dataset's observation.pixel_keypoints,
    #                           a heatmap loss), and the conv net is FiLM-conditioned on the instruction
    instructed_map_weights: bool = False  # with pixel_keypoints: each map's output weights also come from
    #                                       the instruction, so two maps can find two objects told apart
    #                                       only by the words' order ("stack the red cube on the blue cube")

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> VLAConfig:
        d = dict(d)
        unknown = set(d) - {f.name for f in dataclasses.fields(cls)}
        if unknown:
            raise ValueError(f"unknown model config keys: {sorted(unknown)}")
        backbone = _build(BackboneConfig, d.pop("backbone", {}), "backbone")
        head = _build(HeadConfig, d.pop("head", {}), "head")
        if "cameras" in d:
            d["cameras"] = tuple(d["cameras"])
        cfg = cls(backbone=backbone, head=head, **d)
        if cfg.backbone.instruction_pooling not in INSTRUCTION_POOLING:
            raise ValueError(f"backbone.instruction_pooling must be one of {INSTRUCTION_POOLING}, "
                             f"got {cfg.backbone.instruction_pooling!r}")
        if cfg.head.type not in ("diffusion", "flow", "l1"):
            raise ValueError(f"head.type must be diffusion, flow or l1, got {cfg.head.type!r}")
        if cfg.head.prediction_type not in ("epsilon", "sample"):
            raise ValueError(f"head.prediction_type must be epsilon or sample, got {cfg.head.prediction_type!r}")
        if cfg.head.loss not in ("mse", "l1"):
            raise ValueError(f"head.loss must be mse or l1, got {cfg.head.loss!r}")
        if cfg.n_action_steps > cfg.horizon:
            raise ValueError(f"n_action_steps {cfg.n_action_steps} > horizon {cfg.horizon}")
        check_image_fit(cfg.image_fit)
        return cfg

    def unresolved(self) -> list[str]:
        """The robot fields still left to the dataset (a model cannot be built before they are set)."""
        return [k for k in ("cameras", "image_size", "state_dim", "action_dim") if getattr(self, k) is None]


@dataclass(frozen=True)
class FastConfig:
    reuse: bool = False
    reuse_threshold: float = 0.02  # mean |change| of a token's normalized pixels under which it may be reused
    reuse_max: float = 0.75  # cap: at most this fraction of a camera's tokens reused in one step
    reuse_keep_relevant: int = 2  # per camera, the most attended tokens are recomputed anyway
    refresh_every: int = 8  # a full recompute every K steps bounds the drift
    prune_keep: float = 0  # FastV: visual tokens kept per camera after layer prune_layer: a count
    #                        (8), or a fraction of them below 1 (0.5, for any backbone); 0 = off
    prune_layer: int = 1
    compile: bool = False  # torch.compile the step
    cuda_graph: bool = False  # CUDA only: capture each static shape of the step as a CUDA graph and replay it
    kernels: str | None = None  # None: Triton on CUDA, torch elsewhere; "torch" / "triton" force one

    def __post_init__(self):
        if self.reuse and self.prune_keep:
            raise ValueError("token reuse and FastV pruning are exclusive: pick one")
        if self.prune_keep < 0 or (self.prune_keep >= 1 and self.prune_keep != int(self.prune_keep)):
            raise ValueError(f"prune_keep must be a token count or a fraction in (0, 1), got {self.prune_keep}")
        if not 0 <= self.reuse_max < 1:
            raise ValueError(f"reuse_max must be in [0, 1), got {self.reuse_max}")
        if self.cuda_graph and (self.compile or self.prune_keep):
            raise ValueError("cuda_graph replays the eager step (Triton kernels included): without compile "
                             "or FastV pruning")

    def kept_tokens(self, tokens: int) -> int:
        """FastV's visual tokens kept per camera out of `tokens` (0: pruning off)."""
        return max(1, round(self.prune_keep * tokens)) if 0 < self.prune_keep < 1 else int(self.prune_keep)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> FastConfig:
        return _build(cls, d, "fast")


# the real-time step's presets (`--fast` of vla eval / serve / run, the node's `fast` parameter)
FAST_PRESETS = {"off": None, "on": FastConfig(), "reuse": FastConfig(reuse=True), "prune": FastConfig(prune_keep=0.5)}


def parse_fast_options(pairs) -> dict:
    """KEY=VALUE pairs (YAML values, `--fast-opt`) -> FastConfig fields; a bad key or value raises ValueError."""
    known = sorted(f.name for f in dataclasses.fields(FastConfig))
    opts = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep or key not in known:
            raise ValueError(f"--fast-opt {pair!r}: expected KEY=VALUE with KEY one of {known}")
        opts[key] = yaml.safe_load(value)
    FastConfig(**opts)  # a bad value or combination fails here, with FastConfig's own message
    return opts


def fast_config(preset: str = "on", pairs=()) -> FastConfig | None:
    """A preset of FAST_PRESETS with `--fast-opt` pairs on top; None for "off"."""
    if preset not in FAST_PRESETS:
        raise ValueError(f"fast preset {preset!r} is not one of {list(FAST_PRESETS)}")
    cfg = FAST_PRESETS[preset]
    if pairs and cfg is None:
        raise ValueError("--fast-opt sets options of the real-time step: give --fast on, reuse or prune")
    return dataclasses.replace(cfg, **parse_fast_options(pairs)) if pairs else cfg


@dataclass(frozen=True)
class ServeConfig:
    """What a policy server runs: `vla serve` builds it from its options, and the policy node hands
    it (as JSON, `to_json` / `from_json`) to the server process it starts."""

    policy: str | None = None  # an artifact directory; None: the shipped policy
    bind: str = "tcp://127.0.0.1:5555"
    fast: FastConfig | None = field(default_factory=FastConfig)  # None: the model's plain path
    threads: int = 0  # torch threads; 0 keeps torch's choice
    curve_secret_key_file: str | None = None
    curve_authorized_keys: str | None = None

    def to_json(self) -> str:
        return json.dumps(dataclasses.asdict(self))

    @classmethod
    def from_json(cls, text: str) -> ServeConfig:
        d = json.loads(text)
        if not isinstance(d, dict):
            raise ValueError("a serve config is a JSON object")
        fast = d.pop("fast", None)
        cfg = _build(cls, d, "serve")
        return dataclasses.replace(cfg, fast=None if fast is None else FastConfig.from_dict(fast))


@dataclass(frozen=True)
class TrainConfig:
    dataset: str = "data/suite96"
    output_dir: str = "runs/nano"
    steps: int = 20000
    batch_size: int = 64
    lr: float = 3e-4
    backbone_lr: float | None = None  # defaults to lr
    weight_decay: float = 1e-4
    warmup_steps: int = 500
    grad_clip: float = 1.0
    ema_decay: float = 0.999
    seed: int = 0
    log_every: int = 50
    save_every: int = 1000
    keep_last: int = 3
    eval_every: int = 0  # >0: sim success on a few episodes per task every that many steps
    eval_episodes: int = 2
    augment: bool = True
    augment_shift: int = 4  # px each way of the augmentation's random shift (0: colour jitter only).
    #                         Where a target's absolute image position is the cue (a 2-3 px goal dot
    #                         whose whole range is a few px), a shift as large as that range hides it
    early_frames: int = 0  # >0: the first early_frames frames of every episode are drawn early_repeat times
    early_repeat: int = 1  # as often per epoch (where the instruction decides what to do; later frames
    #                        can be told from the arm's own motion, and would drown out the instruction)
    init: str | None = None  # start from this artifact's weights (same model config and dataset)
    keypoint_weight: float = 1.0  # weight of the keypoint loss (model.keypoints > 0)
    keypoint_dataset: str | None = None  # scenes (`vla collect --scenes-only`) that train the keypoint
    #                                      loss alone: thousands of layouts where demos have hundreds
    keypoint_batch: int = 64  # its samples per step, beside batch_size demonstration samples
    pixel_keypoint_weight: float = 0.1  # weight of the spatial maps' heatmap loss (model.pixel_keypoints > 0)
    state_dropout: float = 0.0  # fraction of samples trained without the robot state: the target must
    #                             then come from the images, not from where the arm already went
    pad_loss: bool = False  # also train the chunk steps past an episode's end, on its last action
    #                         repeated (Diffusion Policy's way); off masks them out (ACT's). Demos end
    #                         at success, so masked, what a chunk does after "let go" is never taught
    threads: int = 0  # torch threads on CPU; 0 keeps torch's default
    cache_mb: float = 4096  # decoded camera frames kept in memory; a larger dataset is read in windows

    def __post_init__(self):
        if self.augment_shift < 0:
            raise ValueError(f"train.augment_shift is pixels each way, >= 0, got {self.augment_shift}")

    @classmethod
    def from_dict(cls, d: dict) -> TrainConfig:
        return _build(cls, d, "train")


def _build(cls, d: dict, where: str):
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = set(d) - names
    if unknown:
        raise ValueError(f"unknown {where} config keys: {sorted(unknown)}")
    d = dict(d)
    for f in dataclasses.fields(cls):  # YAML reads 2e-4 (no dot) as a string: take it as the float it is
        if isinstance(d.get(f.name), str) and str(f.type).startswith("float"):
            try:
                d[f.name] = float(d[f.name])
            except ValueError:
                raise ValueError(f"{where}.{f.name} must be a number, got {d[f.name]!r}") from None
    return cls(**d)


def load_recipe(path: str | Path, overrides: list[str] = ()) -> tuple[VLAConfig, TrainConfig]:
    """A YAML recipe {model: ..., train: ...}; overrides like `train.steps=100` or
    `model.head.type=flow` (values parsed as YAML)."""
    recipe = yaml.safe_load(Path(path).read_text()) or {}
    for item in overrides:
        if "=" not in item:
            raise ValueError(f"override must look like key.sub=value, got {item!r}")
        key, value = item.split("=", 1)
        node = recipe
        parts = key.split(".")
        for p in parts[:-1]:
            node = node.setdefault(p, {})
        node[parts[-1]] = yaml.safe_load(value)
    unknown = set(recipe) - {"model", "train"}
    if unknown:
        raise ValueError(f"{path}: unknown top-level keys {sorted(unknown)} (expected model, train)")
    return VLAConfig.from_dict(recipe.get("model", {})), TrainConfig.from_dict(recipe.get("train", {}))
