"""The policy artifact: one directory that eval, the server and the ROS2 node all load unchanged.

    config.json           VLAConfig
    backbone_config.json  the Idefics3Config the weights belong to (so loading needs no hub)
    tokenizer/            the tokenizer (save_pretrained layout)
    model.safetensors     weights (the EMA weights when trained with EMA)
    stats.json            normalization: state mean/std, action min/max (+ keypoint mean/std)
    spec.json             what the policy consumes and produces (cameras, image size, dims, fps)
    recipe.yaml           the resolved training recipe that made it (`vla train` re-runs it unchanged)
Nothing in it is pickled.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import torch
import yaml
from safetensors.torch import load_file, save_file
from transformers import AutoTokenizer, Idefics3Config, Idefics3Model

from vla.config import VLAConfig
from vla.model import VLA, Backbone, add_lora
from vla.spec import PolicySpec, SpecError
from vla.transforms import Normalizer

FORMAT_VERSION = 2  # 2: backbone.instruction_pooling (1 loads with "tokens")


def save_artifact(path: str | Path, model, spec: PolicySpec, stats: dict, recipe: dict | None = None,
                  state_dict: dict | None = None, extra=None, recipe_note: str = "") -> Path:
    """Writes the artifact to a temporary sibling and renames it into place (atomic on one disk).
    recipe: the resolved {model, train} recipe (`vla train` re-runs it), recipe_note a comment above it.
    `extra(tmp_dir)` may add files (a checkpoint's training state) before the rename."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp")
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir(parents=True)
    cfg: VLAConfig = model.cfg
    (tmp / "config.json").write_text(json.dumps({"format_version": FORMAT_VERSION, **cfg.to_dict()}, indent=2))
    model.backbone.vlm.config.to_json_file(tmp / "backbone_config.json")
    model.backbone.tokenizer.save_pretrained(tmp / "tokenizer")
    weights = state_dict if state_dict is not None else model.state_dict()
    save_file({k: v.detach().cpu().contiguous() for k, v in weights.items()}, tmp / "model.safetensors")
    (tmp / "stats.json").write_text(json.dumps(stats, indent=2))
    (tmp / "spec.json").write_text(json.dumps(spec.to_dict(), indent=2))
    if recipe is not None:
        note = "".join(f"# {line}\n" for line in recipe_note.splitlines())
        (tmp / "recipe.yaml").write_text(note + yaml.safe_dump(recipe, sort_keys=False))
    if extra is not None:
        extra(tmp)
    if path.exists():
        old = path.with_name(f".{path.name}.old")
        os.replace(path, old)
        os.replace(tmp, path)
        shutil.rmtree(old)
    else:
        os.replace(tmp, path)
    return path


class ArtifactError(Exception):
    pass


def load_artifact(path: str | Path, device: str | torch.device = "cpu"):
    """-> (model in eval mode, spec dict, Normalizer)."""
    path = Path(path)
    for name in ("config.json", "backbone_config.json", "model.safetensors", "stats.json", "spec.json"):
        if not (path / name).is_file():
            raise ArtifactError(f"{path} is not a policy artifact: {name} is missing")
    raw = json.loads((path / "config.json").read_text())
    version = raw.pop("format_version", None)
    if version == 1:  # trained before backbone.instruction_pooling: the token-embedding mean
        raw["backbone"] = {**raw.get("backbone", {}), "instruction_pooling": "tokens"}
    elif version != FORMAT_VERSION:
        raise ArtifactError(f"{path / 'config.json'}: format_version {version} is not {FORMAT_VERSION} (or 1)")
    cfg = VLAConfig.from_dict(raw)
    vlm_config = Idefics3Config.from_json_file(path / "backbone_config.json")
    vlm_config._attn_implementation = "sdpa"
    tokenizer = AutoTokenizer.from_pretrained(path / "tokenizer")
    model = VLA(cfg, Backbone(Idefics3Model(vlm_config), tokenizer, cfg.backbone))
    if cfg.backbone.lora_rank > 0:
        add_lora(model.backbone, cfg.backbone.lora_rank)
    weights = load_file(path / "model.safetensors", device="cpu")
    missing, unexpected = model.load_state_dict(weights, strict=False)
    if missing or unexpected:
        raise ArtifactError(f"{path / 'model.safetensors'} does not match config.json: "
                            f"missing {missing[:5]}, unexpected {unexpected[:5]}")
    model.to(device).eval()
    try:
        spec = PolicySpec.from_dict(json.loads((path / "spec.json").read_text()))
    except SpecError as e:
        raise ArtifactError(f"{path / 'spec.json'}: {e}") from None
    stats = json.loads((path / "stats.json").read_text())
    return model, spec, Normalizer(stats)
