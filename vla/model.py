"""The VLA: an Idefics3 (SmolVLM) backbone encodes the prefix once per control step; an action
transformer attends to it to produce a chunk of actions with a diffusion, flow or L1 head.

Prefix, in this order: instruction tokens, then each camera's visual tokens (vision encoder +
SmolVLM's pixel-shuffle connector), then one token for the robot state. The language model runs
over it once. The head's cross-attention keys/values of that prefix (`PrefixCache`) are computed
once and reused by every denoising step: no step re-runs the backbone or re-projects the prefix.
Inputs and outputs of this module are normalized; `policies/` converts to and from raw units.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from diffusers import DDIMScheduler, DDPMScheduler
from peft import LoraConfig, inject_adapter_in_model
from torch import nn
from transformers import AutoTokenizer, Idefics3Config, Idefics3Model

from vla.config import BackboneConfig, HeadConfig, VLAConfig
from vla.kernels.denoise import sampler_update
from vla.transforms import normalize_images


def nano_idefics3_config(b: BackboneConfig, vocab_size: int, pad_id: int, image_token_id: int) -> Idefics3Config:
    return Idefics3Config(
        vision_config={
            "hidden_size": b.vision_hidden, "intermediate_size": b.vision_mlp,
            "num_hidden_layers": b.vision_layers, "num_attention_heads": b.vision_heads,
            "image_size": b.image_size, "patch_size": b.patch_size, "num_channels": 3,
        },
        text_config={
            "model_type": "llama", "vocab_size": vocab_size, "hidden_size": b.text_hidden,
            "intermediate_size": b.text_mlp, "num_hidden_layers": b.text_layers,
            "num_attention_heads": b.text_heads, "num_key_value_heads": b.text_kv_heads,
            "max_position_embeddings": 512, "pad_token_id": pad_id, "rms_norm_eps": 1e-5,
            "tie_word_embeddings": False,
        },
        scale_factor=b.scale_factor, image_token_id=image_token_id, pad_token_id=pad_id,
        tie_word_embeddings=False,
    )


class Backbone(nn.Module):
    """A transformers Idefics3Model used as an encoder of the VLA prefix."""

    def __init__(self, vlm: Idefics3Model, tokenizer, cfg: BackboneConfig):
        super().__init__()
        self.vlm = vlm
        self.tokenizer = tokenizer
        self.cfg = cfg
        self.hidden = vlm.config.text_config.hidden_size
        self.vision_size = vlm.config.vision_config.image_size
        self.pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
        vc = vlm.config.vision_config
        self.film = None
        if cfg.film:
            # One (scale, shift) pair per vision layer from the pooled instruction embedding; zero-init
            # so training starts from the unconditioned encoder (and a pretrained one is unchanged).
            self.film = nn.Linear(self.hidden, 2 * vc.hidden_size * vc.num_hidden_layers)
            nn.init.zeros_(self.film.weight)
            nn.init.zeros_(self.film.bias)

    @classmethod
    def nano(cls, cfg: BackboneConfig, tokenizer) -> Backbone:
        config = nano_idefics3_config(cfg, len(tokenizer), tokenizer.pad_token_id,
                                      tokenizer.convert_tokens_to_ids("<image>"))
        config._attn_implementation = "sdpa"
        return cls(Idefics3Model(config), tokenizer, cfg)

    @classmethod
    def pretrained(cls, cfg: BackboneConfig) -> Backbone:
        """Any Idefics3 / SmolVLM checkpoint: a local directory, or a hub id where a hub is reachable."""
        vlm = Idefics3Model.from_pretrained(cfg.pretrained, attn_implementation="sdpa")
        tokenizer = AutoTokenizer.from_pretrained(cfg.pretrained)
        if tokenizer.pad_token_id is None:
            tokenizer.pad_token = tokenizer.eos_token or tokenizer.unk_token
        return cls(vlm, tokenizer, cfg)

    def tokenize(self, texts: list[str], device=None) -> tuple[torch.Tensor, torch.Tensor]:
        """Fixed-length ids and mask (static shapes: max_text_tokens)."""
        enc = self.tokenizer(list(texts), padding="max_length", truncation=True,
                             max_length=self.cfg.max_text_tokens, return_tensors="pt")
        return enc["input_ids"].to(device), enc["attention_mask"].to(device).bool()

    def instruction_embedding(self, input_ids: torch.Tensor, text_mask: torch.Tensor) -> torch.Tensor:
        """(B, hidden), by `backbone.instruction_pooling`: "lm", the masked mean of the language
        model's last hidden states over the instruction alone (the prefix puts the text first, so these
        are its text rows); "tokens", the masked mean of the token embeddings. Causal attention makes
        "lm" depend on word order, which "tokens" does not: "stack the red cube on the blue cube" and
        "stack the blue cube on the red cube" had one embedding, and the maps and the keypoint head
        could not tell which cube to lift."""
        if self.cfg.instruction_pooling == "tokens":
            h = self.vlm.get_input_embeddings()(input_ids)
        else:
            h = self.vlm.text_model(input_ids=input_ids, attention_mask=text_mask.long(),
                                    use_cache=False).last_hidden_state
        m = text_mask[..., None].to(h.dtype)
        return (h * m).sum(1) / m.sum(1).clamp(min=1)

    def preprocess(self, x: torch.Tensor) -> torch.Tensor:
        """(N, 3, S, S) frames in [0, 1] -> normalized, at the vision encoder's input size."""
        x = normalize_images(x)
        if x.shape[-1] != self.vision_size:
            x = F.interpolate(x, size=(self.vision_size, self.vision_size), mode="bilinear",
                              align_corners=False, antialias=True)
        return x

    def film_params(self, instruction: torch.Tensor) -> torch.Tensor:
        """(B, hidden) instruction embedding -> (B, vision layers, 2 (scale, shift), 1, vision hidden)."""
        vc = self.vlm.config.vision_config
        return self.film(instruction).view(len(instruction), vc.num_hidden_layers, 2, 1, vc.hidden_size)

    def image_tokens(self, images: torch.Tensor, instruction: torch.Tensor | None = None) -> torch.Tensor:
        """images: (B, n_cam, 3, S, S) in [0, 1] -> (B, n_cam * tokens_per_image, hidden).

        Runs SigLIP's layers directly (every patch is valid: square images of the encoder's size),
        which equals `vision_model(...)` and lets FiLM modulate each layer's input."""
        b, n = images.shape[:2]
        x = self.preprocess(images.flatten(0, 1))
        vm = self.vlm.vision_model
        emb = vm.embeddings
        h = emb.patch_embedding(x).flatten(2).transpose(1, 2)
        h = h + emb.position_embedding.weight[: h.shape[1]]
        film = None
        if self.film is not None and instruction is not None:
            film = self.film_params(instruction).repeat_interleave(n, 0).to(h.dtype)
        feats = self.vlm.connector(self.vision_encoder(h, film))
        return feats.reshape(b, n * feats.shape[1], feats.shape[2])

    def vision_encoder(self, h: torch.Tensor, film: torch.Tensor | None) -> torch.Tensor:
        """SigLIP's layers over patch embeddings h (N, patches, D), each layer's input modulated by
        FiLM (film: (N or 1, layers, 2, 1, D) or None), then the final LayerNorm."""
        vm = self.vlm.vision_model
        for i, layer in enumerate(vm.encoder.layers):
            if film is not None:
                h = h * (1 + film[:, i, 0]) + film[:, i, 1]
            h = layer(h, None)
        return vm.post_layernorm(h)

    def forward(self, input_ids, text_mask, images, state_token,
                instruction: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """`instruction`: `instruction_embedding` where the caller has it (computed here if FiLM needs it)."""
        text = self.vlm.get_input_embeddings()(input_ids)
        if instruction is None and self.film is not None:
            instruction = self.instruction_embedding(input_ids, text_mask)
        img = self.image_tokens(images, instruction).to(text.dtype)
        embeds = torch.cat([text, img, state_token[:, None].to(text.dtype)], dim=1)
        mask = torch.cat([text_mask, torch.ones(embeds.shape[0], embeds.shape[1] - text_mask.shape[1],
                                                dtype=torch.bool, device=embeds.device)], dim=1)
        out = self.vlm.text_model(inputs_embeds=embeds, attention_mask=mask.long(), use_cache=False)
        return out.last_hidden_state, mask


def timestep_embedding(t: torch.Tensor, dim: int) -> torch.Tensor:
    half = dim // 2
    freqs = torch.exp(-math.log(10000.0) * torch.arange(half, device=t.device, dtype=torch.float32) / half)
    args = t.float()[:, None] * freqs[None]
    return torch.cat([torch.cos(args), torch.sin(args)], dim=-1)


@dataclass
class PrefixCache:
    """Per head layer: keys and values of the prefix for cross-attention, plus the prefix mask."""

    kv: list[tuple[torch.Tensor, torch.Tensor]]
    mask: torch.Tensor  # (B, 1, 1, P) bool, True where attention is allowed
    cond: torch.Tensor | None = None  # (B, d): the keypoint conditioning added to the time embedding

    def repeat(self, n: int) -> PrefixCache:
        cond = None if self.cond is None else self.cond.repeat_interleave(n, 0)
        return PrefixCache([(k.repeat_interleave(n, 0), v.repeat_interleave(n, 0)) for k, v in self.kv],
                           self.mask.repeat_interleave(n, 0), cond)

    def first(self, n: int) -> PrefixCache:
        cond = None if self.cond is None else self.cond[:n]
        return PrefixCache([(k[:n], v[:n]) for k, v in self.kv], self.mask[:n], cond)


class Block(nn.Module):
    """Self-attention over the action tokens, cross-attention to the prefix, MLP; adaLN-zero on time."""

    def __init__(self, d: int, heads: int, mlp: int):
        super().__init__()
        self.heads = heads
        self.norm1 = nn.LayerNorm(d, elementwise_affine=False)
        self.qkv = nn.Linear(d, 3 * d)
        self.proj = nn.Linear(d, d)
        self.norm2 = nn.LayerNorm(d)
        self.q_cross = nn.Linear(d, d)
        self.kv_cross = nn.Linear(d, 2 * d)
        self.proj_cross = nn.Linear(d, d)
        self.norm3 = nn.LayerNorm(d, elementwise_affine=False)
        self.mlp = nn.Sequential(nn.Linear(d, mlp), nn.GELU(approximate="tanh"), nn.Linear(mlp, d))
        self.ada = nn.Linear(d, 6 * d)
        nn.init.zeros_(self.ada.weight)
        nn.init.zeros_(self.ada.bias)

    def _split(self, x):
        b, n, d = x.shape
        return x.view(b, n, self.heads, d // self.heads).transpose(1, 2)

    def prefix_kv(self, memory: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        k, v = self.kv_cross(memory).chunk(2, dim=-1)
        return self._split(k), self._split(v)

    def modulation(self, cond: torch.Tensor, bias: bool = True) -> torch.Tensor:
        """adaLN's (B, 1, 6 d) shifts, scales and gates for a conditioning (B, d). It is linear in
        cond: a constant part (the time of a denoising step) can be computed once, and another
        (the keypoints) added without the bias."""
        return (self.ada(cond) if bias else F.linear(cond, self.ada.weight))[:, None]

    def forward(self, x, mod, kv, mask, cross_attention=None):
        """x (B, n, d) action tokens; mod from `modulation`; kv the prefix's keys and values;
        cross_attention(q, k, v, mask) replaces SDPA over the prefix (the fast path's cached kernel)."""
        b, n, d = x.shape
        shift1, scale1, gate1, shift3, scale3, gate3 = mod.chunk(6, dim=-1)
        h = self.norm1(x) * (1 + scale1) + shift1
        q, k, v = (self._split(t) for t in self.qkv(h).chunk(3, dim=-1))
        a = F.scaled_dot_product_attention(q, k, v).transpose(1, 2).reshape(b, n, d)
        x = x + gate1 * self.proj(a)
        q = self._split(self.q_cross(self.norm2(x)))
        attend = cross_attention or (lambda q, k, v, m: F.scaled_dot_product_attention(q, k, v, attn_mask=m))
        a = attend(q, kv[0], kv[1], mask).transpose(1, 2).reshape(b, n, d)
        x = x + self.proj_cross(a)
        h = self.norm3(x) * (1 + scale3) + shift3
        return x + gate3 * self.mlp(h)


class ActionTransformer(nn.Module):
    """Maps (noisy) action tokens + a time to an output per token, attending to the prefix."""

    def __init__(self, cfg: HeadConfig, action_dim: int, horizon: int, prefix_dim: int, keypoints: int = 0):
        super().__init__()
        d = cfg.hidden
        self.d = d
        self.in_proj = nn.Linear(action_dim, d)
        self.pos = nn.Parameter(torch.randn(horizon, d) * 0.02)
        self.time = nn.Sequential(nn.Linear(d, d), nn.SiLU(), nn.Linear(d, d))
        self.memory_proj = nn.Sequential(nn.LayerNorm(prefix_dim), nn.Linear(prefix_dim, d))
        self.blocks = nn.ModuleList(Block(d, cfg.heads, cfg.mlp) for _ in range(cfg.layers))
        self.out_norm = nn.LayerNorm(d)
        self.out = nn.Linear(d, action_dim)
        self.keypoint_cond = None
        if keypoints:  # zero-init: a model trained without it starts out unchanged
            self.keypoint_cond = nn.Linear(keypoints, d)
            nn.init.zeros_(self.keypoint_cond.weight)
            nn.init.zeros_(self.keypoint_cond.bias)

    def prefix_cache(self, memory: torch.Tensor, mask: torch.Tensor,
                     cond: torch.Tensor | None = None) -> PrefixCache:
        """cond (B, d): this prefix's part of the adaLN conditioning (`VLA.head_condition`), or None."""
        m = self.memory_proj(memory)
        return PrefixCache([blk.prefix_kv(m) for blk in self.blocks], mask[:, None, None, :], cond)

    def time_condition(self, t: torch.Tensor) -> torch.Tensor:
        return self.time(timestep_embedding(t, self.d))

    def embed(self, x: torch.Tensor) -> torch.Tensor:
        return self.in_proj(x) + self.pos

    def features(self, h: torch.Tensor, mods, kv, mask, cross_attention=None) -> torch.Tensor:
        """The blocks over embedded tokens h, block i with modulation mods[i] and prefix kv[i]."""
        for blk, mod, blk_kv in zip(self.blocks, mods, kv):
            h = blk(h, mod, blk_kv, mask, cross_attention)
        return h

    def forward(self, x: torch.Tensor, t: torch.Tensor, cache: PrefixCache) -> torch.Tensor:
        cond = self.time_condition(t)
        if cache.cond is not None:
            cond = cond + cache.cond
        h = self.features(self.embed(x), [blk.modulation(cond) for blk in self.blocks], cache.kv, cache.mask)
        return self.out(self.out_norm(h))


@dataclass(frozen=True)
class Sampler:
    """The head's inference loop: at step i the head sees time `times[i]`, then the sample moves by
    `sampler_update(x, out, coefs[i])` (kernels/denoise.py: DDIM with clipping, a flow Euler step,
    or the L1 head's single pass, as one 7-coefficient formula). The plain path, the fast path and
    its fused kernel all read it."""

    times: tuple[float, ...]
    coefs: torch.Tensor  # (steps, 7) float32
    from_zeros: bool  # the L1 head regresses from a fixed zero input, not from noise

    @classmethod
    def for_head(cls, h: HeadConfig, scheduler: DDIMScheduler | None = None) -> Sampler:
        if h.type == "diffusion":
            ac = scheduler.alphas_cumprod
            stride = scheduler.config.num_train_timesteps // scheduler.num_inference_steps
            clip = scheduler.config.clip_sample_range
            times, coefs = [], []
            for t in scheduler.timesteps.tolist():
                a_t = float(ac[t])
                a_prev = float(ac[t - stride] if t - stride >= 0 else scheduler.final_alpha_cumprod)
                s, r = math.sqrt(a_t), math.sqrt(1 - a_t)
                to_x0_eps = [1 / s, -r / s, 0.0, 1.0] if h.prediction_type == "epsilon" else [0.0, 1.0, 1 / r, -s / r]
                times.append(float(t))
                coefs.append(to_x0_eps + [math.sqrt(a_prev), math.sqrt(1 - a_prev), clip])
        elif h.type == "flow":  # pi0's convention: t = 1 is noise, x <- x - dt * v
            dt = 1.0 / h.inference_steps
            times = [(1.0 - i * dt) * 1000.0 for i in range(h.inference_steps)]
            coefs = [[1.0, -dt, 0.0, 0.0, 1.0, 0.0, math.inf]] * h.inference_steps
        else:  # l1: one pass from zeros; the output is the chunk
            times, coefs = [0.0], [[0.0, 1.0, 0.0, 0.0, 1.0, 0.0, math.inf]]
        return cls(tuple(times), torch.tensor(coefs, dtype=torch.float32), h.type == "l1")


KEYPOINT_INPUTS = ("prefix", "vision", "maps")


class SpatialKeypoints(nn.Module):
    """A small conv net's feature maps read out as expected image coordinates (spatial softmax,
    Levine et al. 2016): `maps` (x, y) pairs in [-1, 1] per frame, from a grid at half the input's
    resolution. The vision encoder's 8-px patches (16-px tokens after the connector) leave a 2-4 px
    puck or goal dot to be placed by learned position embeddings from a few dozen layouts; these
    coordinates follow the object by construction.

    With `instruction_dim` the hidden features are FiLM-modulated by the instruction embedding (which
    object a map finds depends on the task) and `heatmap_loss` trains maps directly on where the
    frame shows a point (`model.pixel_keypoints`): a local detector, every pixel a labelled example,
    so it generalizes across layouts where a regression from a few dozen of them memorizes.

    With `instructed_weights` each map's 1x1 output weights are the fixed ones plus a function of the
    instruction, so each map picks its own features by the words: "stack the red cube on the blue
    cube" needs one map on the red cube and another on the blue, objects told apart by the words'
    order alone, which one FiLM shared by all maps left the second map 5-15 cm off."""

    def __init__(self, maps: int, channels: int = 32, instruction_dim: int = 0, instructed_weights: bool = False):
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, channels, 5, stride=2, padding=2), nn.GELU(),
                                  nn.Conv2d(channels, channels, 3, padding=1), nn.GELU(),
                                  nn.Conv2d(channels, channels, 3, padding=1))  # a 13-px receptive field
        self.out = nn.Sequential(nn.GELU(), nn.Conv2d(channels, maps, 1))
        if instructed_weights and not instruction_dim:
            raise ValueError("instructed map weights are computed from the instruction: give instruction_dim")
        self.film = None
        self.instructed_weights = instructed_weights
        if instruction_dim:  # zero-init: starts as the unconditioned net
            n_weights = maps * (channels + 1) if instructed_weights else 0
            self.film = nn.Linear(instruction_dim, 2 * channels + n_weights)
            nn.init.zeros_(self.film.weight)
            nn.init.zeros_(self.film.bias)
        self.log_temperature = nn.Parameter(torch.zeros(()))

    def film_params(self, instruction: torch.Tensor) -> torch.Tensor | None:
        """(B, instruction_dim) -> (B, 2 * channels: the FiLM, then with `instructed_weights` maps *
        (channels + 1): each map's added weights and bias), or None without FiLM. The embedding is
        detached: the maps' loss does not move the language model's embeddings."""
        return None if self.film is None else self.film(instruction.detach().float())

    def log_probs(self, frames: torch.Tensor, film: torch.Tensor | None = None) -> torch.Tensor:
        """frames (N, 3, S, S), normalized as the vision encoder's input; film (N, `film_params` width)
        or None -> each map's log-softmax over its grid, (N, maps, S / 2, S / 2)."""
        h = self.stem(frames)
        c = h.shape[1]
        if film is not None:
            scale, shift = film[:, :2 * c, None, None].to(h.dtype).chunk(2, dim=1)
            h = h * (1 + scale) + shift
        hidden = self.out[0](h)
        logits = self.out[1](hidden)
        if film is not None and self.instructed_weights:  # plus a per-frame 1x1 conv
            weights = film[:, 2 * c:].to(h.dtype).view(len(h), logits.shape[1], c + 1)
            logits = logits + torch.einsum("nchw,nkc->nkhw", hidden, weights[..., :c]) + weights[..., c, None, None]
        n, k, gh, gw = logits.shape
        return torch.log_softmax(logits.flatten(2).float() * self.log_temperature.exp(), dim=-1).view(n, k, gh, gw)

    @staticmethod
    def grid(size: int, device) -> torch.Tensor:
        """The normalized coordinate of each cell's centre along one axis of a `size`-cell grid."""
        return (torch.arange(size, device=device, dtype=torch.float32) + 0.5) / size * 2 - 1

    def coordinates(self, log_probs: torch.Tensor) -> torch.Tensor:
        """(N, maps, h, w) log-probabilities -> expected (x, y) per map, flattened (N, 2 * maps)."""
        p = log_probs.exp()
        xs, ys = self.grid(p.shape[-1], p.device), self.grid(p.shape[-2], p.device)
        return torch.stack([(p.sum(2) * xs).sum(-1), (p.sum(3) * ys).sum(-1)], dim=-1).flatten(1)

    def forward(self, frames: torch.Tensor, film: torch.Tensor | None = None) -> torch.Tensor:
        """frames (N, 3, S, S) -> (N, 2 * maps)."""
        return self.coordinates(self.log_probs(frames, film))

    def heatmap_loss(self, log_probs: torch.Tensor, points: torch.Tensor, sigma: float = 1.0) -> torch.Tensor:
        """Cross-entropy of the first P maps' distributions (log_probs (N, maps, h, w)) against a
        Gaussian of `sigma` cells at each point (points (N, P, 2), x and y in [-1, 1]); a point off
        the frame (or not finite) is left out. A mean over the points left."""
        lp = log_probs[:, :points.shape[1]]
        gh, gw = lp.shape[-2:]
        valid = torch.isfinite(points).all(-1) & (points.abs() <= 1).all(-1)
        pts = torch.where(valid[..., None], points, torch.zeros_like(points)).float()
        xs, ys = self.grid(gw, lp.device), self.grid(gh, lp.device)
        dx = (xs[None, None] - pts[..., 0:1]) * gw / 2  # in cells
        dy = (ys[None, None] - pts[..., 1:2]) * gh / 2
        target = torch.exp(-(dy[..., :, None] ** 2 + dx[..., None, :] ** 2) / (2 * sigma ** 2))
        target = target / target.sum((-1, -2), keepdim=True)
        ce = -(target * lp).sum((-1, -2))
        return (ce * valid).sum() / valid.sum().clamp(min=1)


def add_lora(backbone: Backbone, rank: int) -> None:
    """LoRA adapters (peft) on the language model's attention projections; base weights frozen."""

    lora = LoraConfig(r=rank, lora_alpha=2 * rank, target_modules=["q_proj", "k_proj", "v_proj", "o_proj"])
    inject_adapter_in_model(lora, backbone.vlm.text_model)
    for name, p in backbone.vlm.named_parameters():
        p.requires_grad_("lora_" in name)


class VLA(nn.Module):
    def __init__(self, cfg: VLAConfig, backbone: Backbone):
        super().__init__()
        self.cfg = cfg
        self.backbone = backbone
        self.state_proj = nn.Linear(cfg.state_dim, backbone.hidden)
        if cfg.keypoint_cond and cfg.keypoints <= 0:
            raise ValueError("model.keypoint_cond needs model.keypoints > 0 (the keypoints it conditions on)")
        if cfg.keypoint_input not in KEYPOINT_INPUTS:
            raise ValueError(f"model.keypoint_input must be one of {KEYPOINT_INPUTS}, not {cfg.keypoint_input!r}")
        self.head = ActionTransformer(cfg.head, cfg.action_dim, cfg.horizon, backbone.hidden,
                                      cfg.keypoints if cfg.keypoint_cond else 0)
        self.keypoint_head = None
        n_spatial = len(cfg.cameras) * 2 * cfg.spatial_keypoints  # (x, y) per map per camera
        if cfg.keypoints > 0 and cfg.keypoint_input == "maps" and not n_spatial:
            raise ValueError("model.keypoint_input=maps reads the spatial maps: it needs model.spatial_keypoints > 0")
        self.keypoint_norm = None
        if cfg.keypoints > 0 and cfg.keypoint_input == "maps":  # the coordinates as they are (keypoints_from_memory)
            d = backbone.hidden
            self.keypoint_norm = nn.LayerNorm(d)  # the instruction's only: the coordinates keep their scale
            self.keypoint_head = nn.Sequential(nn.Linear(n_spatial + d, d), nn.GELU(), nn.Linear(d, d), nn.GELU(),
                                               nn.Linear(d, cfg.keypoints))
        elif cfg.keypoints > 0:  # read from one token of the causal LM's output (keypoints_from_memory)
            d, n_in = backbone.hidden, backbone.hidden + n_spatial
            self.keypoint_head = nn.Sequential(nn.LayerNorm(n_in), nn.Linear(n_in, d), nn.GELU(),
                                               nn.Linear(d, cfg.keypoints))
        self.spatial = self.spatial_cond = None
        if cfg.pixel_keypoints > cfg.spatial_keypoints:
            raise ValueError(f"model.pixel_keypoints={cfg.pixel_keypoints} trains that many of each camera's "
                             f"spatial maps: model.spatial_keypoints={cfg.spatial_keypoints} must be at least that")
        if cfg.instructed_map_weights and not cfg.pixel_keypoints:
            raise ValueError("model.instructed_map_weights conditions the maps that model.pixel_keypoints trains: "
                             "set model.pixel_keypoints > 0, or model.instructed_map_weights=false on data "
                             "without observation.pixel_keypoints")
        if n_spatial:  # every camera's coordinates -> the head's adaLN conditioning
            self.spatial = SpatialKeypoints(cfg.spatial_keypoints,
                                            instruction_dim=backbone.hidden if cfg.pixel_keypoints else 0,
                                            instructed_weights=cfg.instructed_map_weights)
            self.spatial_cond = nn.Sequential(nn.Linear(n_spatial, cfg.head.hidden), nn.SiLU(),
                                              nn.Linear(cfg.head.hidden, cfg.head.hidden))
        h = cfg.head
        if h.type == "diffusion":
            common = dict(num_train_timesteps=h.train_timesteps, beta_schedule=h.beta_schedule,
                          clip_sample=True, clip_sample_range=1.0, prediction_type=h.prediction_type)
            self.train_scheduler = DDPMScheduler(**common)
            self.infer_scheduler = DDIMScheduler(**common, set_alpha_to_one=True, steps_offset=0)
            self.infer_scheduler.set_timesteps(h.inference_steps)
        self.sampler = Sampler.for_head(h, getattr(self, "infer_scheduler", None))

    @classmethod
    def build(cls, cfg: VLAConfig, tokenizer=None) -> VLA:
        if cfg.unresolved():
            raise ValueError(f"model config leaves {cfg.unresolved()} to the dataset: train it with vla train "
                             "(which reads them from meta/info.json) or set them")
        if cfg.backbone.pretrained:
            backbone = Backbone.pretrained(cfg.backbone)
        else:
            if tokenizer is None:
                raise ValueError("a nano backbone needs the tokenizer built from the dataset's instructions")
            backbone = Backbone.nano(cfg.backbone, tokenizer)
        model = cls(cfg, backbone)
        if cfg.backbone.freeze:
            backbone.requires_grad_(False)
        if cfg.backbone.lora_rank > 0:
            add_lora(backbone, cfg.backbone.lora_rank)
        return model

    # --- the prefix: once per control step ---
    def encode(self, images: torch.Tensor, input_ids: torch.Tensor, text_mask: torch.Tensor,
               state: torch.Tensor, state_keep: torch.Tensor | None = None, return_memory: bool = False):
        """images (B, n_cam, 3, H, W) in [0, 1]; state normalized (B, state_dim). `state_keep` (B,)
        bool, training only: where False the state token is zero (no state), not a projection of one."""
        state_token = self.state_proj(state)
        if state_keep is not None:
            state_token = state_token * state_keep[:, None].to(state_token.dtype)
        instruction = self.instruction_embedding(input_ids, text_mask)
        memory, mask = self.backbone(input_ids, text_mask, images, state_token, instruction)
        spatial, spatial_lp = self.spatial_maps(images, instruction)
        kp_instruction = self.keypoint_instruction(instruction)
        cache = self.head.prefix_cache(memory.float(), mask, self.head_condition(memory, spatial, kp_instruction))
        return (cache, memory, spatial, spatial_lp, kp_instruction) if return_memory else cache

    def instruction_embedding(self, input_ids: torch.Tensor, text_mask: torch.Tensor) -> torch.Tensor | None:
        """`Backbone.instruction_embedding` (B, hidden), once per prefix for all that read it (the vision
        encoder's FiLM, the spatial maps' FiLM, keypoint_input "maps"); None where nothing does."""
        if self.backbone.film is None and self.spatial_film_net() is None and self.keypoint_norm is None:
            return None
        return self.backbone.instruction_embedding(input_ids, text_mask)

    def spatial_film_net(self) -> nn.Linear | None:
        return None if self.spatial is None else self.spatial.film

    def keypoint_instruction(self, instruction: torch.Tensor | None) -> torch.Tensor | None:
        """What keypoint_input "maps" reads beside the coordinates (B, hidden): `instruction_embedding`,
        detached (the keypoint loss leaves the language model alone); else None."""
        if self.keypoint_norm is None:
            return None
        return instruction.detach()

    def spatial_film(self, instruction: torch.Tensor | None) -> torch.Tensor | None:
        """The spatial maps' FiLM parameters of each `instruction_embedding` (B, 2 * channels), or None."""
        if self.spatial_film_net() is None:
            return None
        return self.spatial.film_params(instruction)

    def spatial_log_probs(self, images: torch.Tensor, instruction: torch.Tensor | None) -> torch.Tensor | None:
        """images (B, n_cam, 3, S, S) in [0, 1], `instruction_embedding` -> the spatial maps
        (B * n_cam, maps, h, w), or None without spatial_keypoints."""
        if self.spatial is None:
            return None
        film = self.spatial_film(instruction)
        if film is not None:
            film = film.repeat_interleave(images.shape[1], 0)
        return self.spatial.log_probs(self.backbone.preprocess(images.flatten(0, 1)), film)

    def spatial_maps(self, images: torch.Tensor, instruction: torch.Tensor | None):
        """`spatial_log_probs` and their coordinates (B, cameras * 2 * maps), or (None, None)."""
        spatial_lp = self.spatial_log_probs(images, instruction)
        if spatial_lp is None:
            return None, None
        return self.spatial.coordinates(spatial_lp).view(len(images), -1), spatial_lp

    def spatial_coordinates(self, frames: torch.Tensor, batch: int, film: torch.Tensor | None = None
                            ) -> torch.Tensor | None:
        """frames (batch * cameras, 3, S, S) preprocessed (film: one row per frame, or one for all)
        -> (batch, cameras * 2 * maps), or None without spatial_keypoints."""
        if self.spatial is None:
            return None
        if film is not None and len(film) != len(frames):
            film = film.expand(len(frames), -1)
        return self.spatial(frames, film).view(batch, -1)

    def head_condition(self, memory: torch.Tensor, spatial: torch.Tensor | None,
                       instruction: torch.Tensor | None = None) -> torch.Tensor | None:
        """What the prefix adds to the head's time embedding (adaLN), (B, head hidden), or None:
        with keypoint_cond the predicted keypoints, detached so the action loss leaves the keypoint
        head to its own supervision (what it reads at inference is what it trained on); with
        spatial_keypoints the frames' spatial-softmax coordinates."""
        cond = None
        if self.cfg.keypoint_cond:
            cond = self.head.keypoint_cond(self.keypoints_from_memory(memory, spatial, instruction).detach())
        if spatial is not None:
            cond = self.spatial_cond(spatial) if cond is None else cond + self.spatial_cond(spatial)
        return cond

    # --- training ---
    def forward(self, **batch) -> torch.Tensor:
        """The training loss (so DDP's gradient hooks see the call)."""
        return self.loss(**batch)

    def loss(self, images, input_ids, text_mask, state, actions, action_is_pad, state_keep=None,
             keypoints=None, keypoint_weight: float = 1.0, pixel_keypoints=None,
             pixel_keypoint_weight: float = 1.0) -> torch.Tensor:
        """The action loss, plus `keypoint_weight` x the keypoint loss where `keypoints` (normalized
        (B, keypoints) targets) are given and the model has a keypoint head, plus
        `pixel_keypoint_weight` x the spatial maps' heatmap loss where `pixel_keypoints` ((B, n_cam,
        P, 2): where each camera's frame, as augmented, shows each point) are given. Rows past
        len(actions) are keypoint-only samples: they share the backbone pass (under keypoint_input "maps"
        only the maps' pass), not the action loss."""
        n = len(actions)
        # keypoint_input "maps" reads no backbone token: keypoint-only rows need only their maps
        maps_only = len(images) > n and self.keypoint_norm is not None
        rows = slice(None, n) if maps_only else slice(None)
        cache, memory, spatial, spatial_lp, instruction = self.encode(
            images[rows], input_ids[rows], text_mask[rows], state[rows],
            None if state_keep is None else state_keep[rows], return_memory=True)
        if maps_only:
            extra = self.instruction_embedding(input_ids[n:], text_mask[n:])
            extra_spatial, extra_lp = self.spatial_maps(images[n:], extra)
            spatial = torch.cat([spatial, extra_spatial])
            spatial_lp = torch.cat([spatial_lp, extra_lp])
            instruction = torch.cat([instruction, self.keypoint_instruction(extra)])
        elif len(images) > n:
            cache = cache.first(n)
        loss = self._action_loss(cache, actions, action_is_pad)
        if keypoints is not None and self.keypoint_head is not None:
            pred = self.keypoints_from_memory(memory, spatial, instruction)
            loss = loss + keypoint_weight * F.smooth_l1_loss(pred, keypoints.float(), beta=0.1)
        if pixel_keypoints is not None and spatial_lp is not None:  # the demonstration rows come first
            points = pixel_keypoints.flatten(0, 1)
            loss = loss + pixel_keypoint_weight * self.spatial.heatmap_loss(spatial_lp[:len(points)], points)
        return loss

    def keypoints_from_memory(self, memory: torch.Tensor, spatial: torch.Tensor | None = None,
                              instruction: torch.Tensor | None = None) -> torch.Tensor:
        """Normalized keypoints (B, keypoints) from the backbone's output and the spatial
        coordinates (`encode(..., return_memory=True)`); with spatial_keypoints the keypoint loss
        trains the coordinates' conv net too (where the puck and the goal are). The prefix is
        [text, visual tokens, state]: the last token sees everything, the one before it (the last
        visual token) everything but the state (keypoint_input "vision"). keypoint_input "maps"
        reads no token: the coordinates unnormalized beside the instruction (`keypoint_instruction`),
        where a LayerNorm shared with a 128-d token rescaled them by that token's spread and the
        head placed the puck 4 cm off what its own map gave to 1 cm (docs/benchmarks-log.md)."""
        if self.keypoint_norm is not None:
            if instruction is None or spatial is None:
                raise ValueError("keypoint_input maps needs the spatial coordinates and keypoint_instruction(...)")
            return self.keypoint_head(torch.cat([spatial.float(), self.keypoint_norm(instruction.float())], -1))
        token = memory[:, -1 if self.cfg.keypoint_input == "prefix" else -2].float()
        return self.keypoint_head(token if spatial is None else torch.cat([token, spatial.float()], -1))

    def _action_loss(self, cache: PrefixCache, actions, action_is_pad) -> torch.Tensor:
        h = self.cfg.head
        valid = (~action_is_pad).float()[..., None]

        def masked_mean(err: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
            return (err * valid).sum() / (valid.sum() * err.shape[-1]).clamp(min=1)

        if h.type == "l1":
            pred = self.head(torch.zeros_like(actions), torch.zeros(len(actions), device=actions.device), cache)
            return masked_mean((pred - actions).abs(), valid)
        k = h.noise_samples
        cache = cache.repeat(k)
        x0 = actions.repeat_interleave(k, 0)
        valid = valid.repeat_interleave(k, 0)
        noise = torch.randn_like(x0)
        b = x0.shape[0]
        if h.type == "diffusion":
            t = torch.randint(0, h.train_timesteps, (b,), device=x0.device)
            xt = self.train_scheduler.add_noise(x0, noise, t)
            target = noise if h.prediction_type == "epsilon" else x0
        else:  # flow matching, pi0's convention: t=1 is noise, t=0 data; t ~ Beta(1.5, 1)
            t = torch.distributions.Beta(1.5, 1.0).sample((b,)).to(x0.device) * 0.999 + 0.001
            xt = t[:, None, None] * noise + (1 - t[:, None, None]) * x0
            target = noise - x0
            t = t * 1000.0  # same embedding scale as diffusion timesteps
        pred = self.head(xt, t, cache)
        return masked_mean((pred - target).abs() if h.loss == "l1" else (pred - target) ** 2, valid)

    # --- inference ---
    @torch.no_grad()
    def sample(self, cache: PrefixCache, noise: torch.Tensor | None = None,
               generator: torch.Generator | None = None) -> torch.Tensor:
        """A normalized action chunk (B, horizon, action_dim) from the prefix cache."""
        b = cache.mask.shape[0]
        shape = (b, self.cfg.horizon, self.cfg.action_dim)
        device = cache.mask.device
        sampler = self.sampler
        if sampler.from_zeros:
            x = torch.zeros(shape, device=device)
        else:
            x = noise if noise is not None else torch.randn(shape, generator=generator, device=device)
        for t, coef in zip(sampler.times, sampler.coefs.to(device)):
            x = sampler_update(x, self.head(x, torch.full((b,), t, device=device), cache), coef)
        return x
