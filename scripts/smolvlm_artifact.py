"""A policy artifact on the SmolVLM-256M architecture with random weights, built locally (no hub):
what `vla bench --policy` measures to see the real-time path at a real backbone's size.

    .venv/bin/python scripts/smolvlm_artifact.py runs/smolvlm256m_random
    .venv/bin/vla bench --policy runs/smolvlm256m_random --steps 12

The backbone is SmolVLM-256M-Instruct's Idefics3 configuration (SigLIP base: 12 layers of 768 at
512 px, patch 16; SmolLM2-135M: 30 layers of 576, 9 query and 3 key/value heads; pixel shuffle
scale 4: 64 tokens per camera), saved with `save_pretrained` and loaded back through
`model.backbone.pretrained`, the path any SmolVLM checkpoint takes. Two differences, both
immaterial to the step's time: the vocabulary is this project's word-level tokenizer (a few hundred
words instead of 49,280) and the weights are random. The action head is the shipped L1 head's
shape; normalization is the identity. Every figure it gives is speed, not success.
"""

import sys
from pathlib import Path

import torch
from transformers import Idefics3Config, Idefics3Model

from vla.artifact import save_artifact
from vla.config import VLAConfig
from vla.model import VLA
from vla.spec import PolicySpec
from vla.tokenizer import build_tokenizer

CAMERAS = ("front", "wrist")
STATE_NAMES = tuple(f"j{i}.pos" for i in range(1, 7)) + ("gripper.pos",)


def smolvlm_256m_config(vocab_size: int, pad_id: int, image_token_id: int) -> Idefics3Config:
    return Idefics3Config(
        vision_config={"hidden_size": 768, "intermediate_size": 3072, "num_hidden_layers": 12,
                       "num_attention_heads": 12, "image_size": 512, "patch_size": 16, "num_channels": 3},
        text_config={"model_type": "llama", "vocab_size": vocab_size, "hidden_size": 576, "intermediate_size": 1536,
                     "num_hidden_layers": 30, "num_attention_heads": 9, "num_key_value_heads": 3, "head_dim": 64,
                     "max_position_embeddings": 8192, "rope_theta": 100000.0, "rms_norm_eps": 1e-5,
                     "pad_token_id": pad_id, "tie_word_embeddings": True},
        scale_factor=4, image_token_id=image_token_id, pad_token_id=pad_id, tie_word_embeddings=True,
    )


def main(out: Path) -> None:
    torch.manual_seed(0)
    tokenizer = build_tokenizer([])  # the project's base vocabulary covers the suite's instructions
    backbone_dir = out.with_name(out.name + "_backbone")
    vlm = Idefics3Model(smolvlm_256m_config(len(tokenizer), tokenizer.pad_token_id,
                                            tokenizer.convert_tokens_to_ids("<image>")))
    vlm.save_pretrained(backbone_dir)
    tokenizer.save_pretrained(backbone_dir)
    cfg = VLAConfig.from_dict({
        "cameras": list(CAMERAS), "image_size": 96, "horizon": 16, "n_action_steps": 8,
        "backbone": {"pretrained": str(backbone_dir), "max_text_tokens": 12},
        "head": {"type": "l1", "hidden": 128, "layers": 3, "heads": 4, "mlp": 256},
    })
    model = VLA.build(cfg)
    spec = PolicySpec(cameras=CAMERAS, image_size=96, state_dim=7, action_dim=7, horizon=16, n_action_steps=8,
                      fps=10, state_names=STATE_NAMES, action_names=STATE_NAMES, robot_type="vla_arm6")
    identity = {"observation.state": {"mean": [0.0] * 7, "std": [1.0] * 7},
                "action": {"min": [-3.0] * 6 + [0.0], "max": [3.0] * 6 + [1.0]}}
    save_artifact(out, model, spec, identity)
    params = sum(p.numel() for p in model.parameters())
    print(f"{out}: {params / 1e6:.1f} M parameters (backbone weights in {backbone_dir})")


if __name__ == "__main__":
    main(Path(sys.argv[1] if len(sys.argv) > 1 else "runs/smolvlm256m_random"))
