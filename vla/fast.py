"""The real-time control step: one call maps camera frames + state to a normalized action chunk.

What it does once instead of every step:
  - per instruction: the text tokens' keys/values in every language-model layer (the text comes
    first in the causal prefix, so it never depends on the images), their rows of the head's
    cross-attention cache, and the FiLM parameters of the vision layers;
  - per model: the time conditioning of every denoising step and the sampler's coefficients.
Per step it runs the vision encoder and the language model only over the visual tokens (and the
state token), writes their keys/values into per-layer caches, and runs the denoising loop on the
head's cached cross-attention keys/values, ending each step in the fused output + update kernel.

Cross-frame token reuse (VLA-Cache): tokens whose pixel region barely changed since the frame
their cache entries came from keep their keys/values; only the others, plus the tokens the state
token attended to most at the previous step, are recomputed, in the vision encoder (their patches)
and in the language model. The number recomputed is fixed (static shapes); a step with more
changed tokens than that, every `refresh_every`-th step, a new episode and a new instruction run
the full recompute. With reuse off the step equals `VLA.encode` + `VLA.sample`.

Token reduction (FastV): after language-model layer `prune_layer`, keep only the `prune_keep`
most attended visual tokens per camera; later layers and the head see only those.

Attention runs through a function registered in transformers' AttentionInterface, so the
model's own SigLIP and Llama layers (projections, RoPE, MLPs) serve this path unchanged.
"""

from __future__ import annotations

import functools
import itertools
import math
import time

import torch
import torch.nn.functional as F
from transformers import AttentionInterface
from transformers.integrations.sdpa_attention import sdpa_attention_forward
from transformers.masking_utils import AttentionMaskInterface, sdpa_mask
from transformers.models.idefics3.modeling_idefics3 import Idefics3Connector

from vla.config import FastConfig
from vla.kernels import cached_attention, denoise_update, region_change
from vla.kernels.attention import update_cache
from vla.model import VLA

ATTN_NAME = "vla_cached"


class _Clock:
    """Records stage boundaries into `timings` (seconds), synchronizing CUDA first; a no-op without."""

    def __init__(self, timings: dict | None, device: torch.device):
        self.timings, self.device = timings, device
        self.t = time.perf_counter() if timings is not None else 0.0

    def __call__(self, stage: str) -> None:
        if self.timings is None:
            return
        if self.device.type == "cuda":
            torch.cuda.synchronize()
        now = time.perf_counter()
        self.timings[stage] = now - self.t
        self.t = now


class KVSlot:
    """The keys/values cache of one attention layer, and where this call's queries sit in it."""

    def __init__(self, batch: int, heads: int, length: int, head_dim: int, force: str | None):
        self.k = torch.zeros(batch, heads, length, head_dim)
        self.v = torch.zeros_like(self.k)
        self.index: torch.Tensor | None = None  # (B, n) positions of this call's tokens
        self.mask: torch.Tensor | None = None  # (B, 1, n, P) bool or None (all visible)
        self.force = force
        self.active = False
        self.last_query: torch.Tensor | None = None
        # vision only, cameras of different token counts in one sequence (batch 1): per camera
        # (camera, its first query row, its rows' positions in that camera's cache (1, rows))
        self.parts: list[tuple[int, int, torch.Tensor]] | None = None

    def to(self, device):
        self.k = self.k.to(device)
        self.v = self.v.to(device)
        return self


def _slot_attention(module, query, key, value, attention_mask, scaling=None, dropout=0.0, **kwargs):
    slot = getattr(module, "vla_slot", None)
    if slot is None or not slot.active:
        return sdpa_attention_forward(module, query, key, value, attention_mask, scaling=scaling,
                                      dropout=dropout, **kwargs)
    if slot.parts is not None:  # each camera's rows attend over that camera's cache only
        outs = []
        for c, start, index in slot.parts:
            n, k, v = index.shape[1], slot.k[c:c + 1], slot.v[c:c + 1]
            update_cache(k, index, key[:, :, start:start + n].to(k.dtype))
            update_cache(v, index, value[:, :, start:start + n].to(v.dtype))
            outs.append(cached_attention(query[:, :, start:start + n], k, v, None, scaling, force=slot.force))
        return torch.cat(outs, 2).transpose(1, 2).contiguous(), None
    update_cache(slot.k, slot.index, key.to(slot.k.dtype))
    update_cache(slot.v, slot.index, value.to(slot.v.dtype))
    slot.last_query = query[:, :, -1:]
    out = cached_attention(query, slot.k, slot.v, slot.mask, scaling, force=slot.force)
    return out.transpose(1, 2).contiguous(), None


@functools.cache
def _register_attention() -> None:
    """Adds the cached attention to transformers' registry (once, when an engine is first built; a
    layer with no active slot, as on the plain path, runs SDPA with SDPA's masks)."""
    AttentionInterface.register(ATTN_NAME, _slot_attention)
    AttentionMaskInterface.register(ATTN_NAME, sdpa_mask)


def visual_tokens_per_camera(model: VLA) -> int:
    """Tokens one camera contributes to the prefix: patches / pixel-shuffle scale squared."""
    vlm = model.backbone.vlm
    return (model.backbone.vision_size // vlm.config.vision_config.patch_size) ** 2 // vlm.config.scale_factor ** 2


def shuffle_groups(side: int, scale: int) -> torch.Tensor:
    """(tokens, scale**2): the patches pixel shuffle concatenates into each token, in channel order."""
    idx = torch.arange(side * side, dtype=torch.float32)[None, :, None]
    return Idefics3Connector.pixel_shuffle(None, idx, scale)[0].long()


class FastVLA:
    def __init__(self, model: VLA, cfg: FastConfig = FastConfig(), device: str | torch.device = "cpu"):
        self.model = model.eval()
        self.cfg = cfg
        self.device = torch.device(device)
        bb = model.backbone
        vlm = bb.vlm
        vc, tc = vlm.config.vision_config, vlm.config.text_config
        self.n_cam = len(model.cfg.cameras)
        self.patch = vc.patch_size
        self.scale = vlm.config.scale_factor
        self.side = bb.vision_size // self.patch
        self.n_patch = self.side * self.side
        self.tokens = visual_tokens_per_camera(model)
        self.text_len = bb.cfg.max_text_tokens
        self.prefix = self.text_len + self.n_cam * self.tokens + 1
        self.groups = shuffle_groups(self.side, self.scale).to(self.device)
        self.kept = cfg.kept_tokens(self.tokens)  # FastV's tokens per camera (0: off)
        if self.kept and not (self.kept <= self.tokens and 0 <= cfg.prune_layer < tc.num_hidden_layers - 1):
            raise ValueError(f"prune_keep must be in 1..{self.tokens} or a fraction, and prune_layer < "
                             f"{tc.num_hidden_layers - 1}")

        vm, lm = vlm.vision_model, vlm.text_model
        self.vision_layers, self.lm_layers = list(vm.encoder.layers), list(lm.layers)
        # the hooks this engine installs on the model until `close()`: a cache slot on each
        # attention module and the attention implementation that reads it
        _register_attention()
        self._saved_attn = (vc._attn_implementation, tc._attn_implementation)
        for layer in self.vision_layers:
            layer.self_attn.vla_slot = KVSlot(self.n_cam, vc.num_attention_heads, self.n_patch,
                                              vc.hidden_size // vc.num_attention_heads, cfg.kernels).to(self.device)
        head_dim = getattr(tc, "head_dim", None) or tc.hidden_size // tc.num_attention_heads
        for layer in self.lm_layers:
            layer.self_attn.vla_slot = KVSlot(1, tc.num_key_value_heads, self.prefix, head_dim,
                                              cfg.kernels).to(self.device)
        vc._attn_implementation = ATTN_NAME
        tc._attn_implementation = ATTN_NAME
        w = vm.embeddings.patch_embedding.weight
        self.patch_w, self.patch_b = w.reshape(w.shape[0], -1), vm.embeddings.patch_embedding.bias
        self.pos_emb = vm.embeddings.position_embedding.weight[: self.n_patch]

        head = model.head
        self.head_kv = [(torch.zeros(1, blk.heads, self.prefix, head.d // blk.heads, device=self.device),
                         torch.zeros(1, blk.heads, self.prefix, head.d // blk.heads, device=self.device))
                        for blk in head.blocks]
        self._precompute_sampler()
        self.instruction: str | None = None
        # persistent tensors a captured graph reads: changed in place, never rebound
        self.key_valid = torch.ones(1, self.prefix, dtype=torch.bool, device=self.device)
        self.film = None
        if bb.film is not None:
            self.film = torch.zeros(1, vc.num_hidden_layers, 2, 1, vc.hidden_size, device=self.device)
        self.spatial_film = None  # the spatial maps' FiLM of the instruction (model.pixel_keypoints)
        if model.spatial is not None and model.spatial.film is not None:
            self.spatial_film = torch.zeros(1, model.spatial.film.out_features, device=self.device)
        self.kp_instruction = None  # keypoint_input "maps": the instruction's embedding it reads
        if model.keypoint_norm is not None:
            self.kp_instruction = torch.zeros(1, bb.hidden, device=self.device)
        self.state_pos = torch.tensor([self.prefix - 1], device=self.device)
        self.kp_mods = None  # per head block, ada(cond) of this step's VLA.head_condition
        if model.cfg.keypoint_cond or model.spatial is not None:
            self.kp_mods = torch.zeros(len(head.blocks), 1, 1, 6 * head.d, device=self.device)
        # the keypoint head reads the last visual token (VLA.keypoints_from_memory): reuse and
        # pruning always keep it, so it is the row before the state token's
        self.keep_last_visual = model.cfg.keypoint_cond and model.cfg.keypoint_input == "vision"
        self.encode, self.denoise = self._encode, self._denoise
        if cfg.compile:
            # on the CPU the step is hundreds of small kernels: calling them from inductor's C++
            # wrapper instead of its Python one takes 7.3 -> 6.0 ms off the shipped step (docs/benchmarks-log.md, session 9)
            options = {"cpp_wrapper": True} if self.device.type == "cpu" else None
            self.encode = torch.compile(self._encode, dynamic=False, options=options)
            self.denoise = torch.compile(self._denoise, dynamic=False, options=options)
        if cfg.cuda_graph:
            if self.device.type != "cuda":
                raise ValueError("cuda_graph needs a CUDA device")
            self.graphs = _StepGraphs(self)
            self.encode, self.denoise = self.graphs.encode, self.graphs.denoise
        self.timings: dict[str, float] | None = None  # set to {} to have step() record its stages (s)
        self._warm = False
        self.owner = None  # the Policy whose frames the caches hold (policies/policy.py)
        self.reset()

    def close(self) -> None:
        """Takes this engine's hooks off the model (its cache slots, the attention implementation):
        the model is then as it was before the engine was built."""
        for layer in self.vision_layers + self.lm_layers:
            if hasattr(layer.self_attn, "vla_slot"):
                del layer.self_attn.vla_slot
        vc, tc = self.model.backbone.vlm.config.vision_config, self.model.backbone.vlm.config.text_config
        vc._attn_implementation, tc._attn_implementation = self._saved_attn

    # --- once per model ---
    @torch.no_grad()
    def _precompute_sampler(self):
        """The model's sampler on this device, and per denoising step the blocks' adaLN modulation
        of that step's time (the part of the conditioning that never changes)."""
        head, sampler = self.model.head, self.model.sampler
        self.coefs = sampler.coefs.to(self.device)
        self.mods = []  # per step, per block: (1, 1, 6 d)
        for t in sampler.times:
            cond = head.time_condition(torch.tensor([t], device=self.device))
            self.mods.append([blk.modulation(cond) for blk in head.blocks])

    # --- once per instruction / episode ---
    @torch.no_grad()
    def reset(self) -> None:
        """A new episode: every cache is zeroed (nothing an earlier call computed, a NaN included,
        can reach a later one through a masked-out entry) and the instruction is encoded again."""
        for layer in self.vision_layers + self.lm_layers:
            layer.self_attn.vla_slot.k.zero_()
            layer.self_attn.vla_slot.v.zero_()
        for k, v in self.head_kv:
            k.zero_()
            v.zero_()
        self.instruction = None
        self._forget_frames()

    def _forget_frames(self) -> None:
        self.steps_since_full = 0
        self.ref_images: torch.Tensor | None = None  # the pixels the caches were computed from
        self.relevance: torch.Tensor | None = None
        self.stats = {"full": 0, "partial": 0, "recomputed_tokens": 0}

    @torch.no_grad()
    def set_instruction(self, text: str) -> None:
        bb = self.model.backbone
        ids, mask = bb.tokenize([text], self.device)
        if not mask.any():  # every text row of the prefix would attend to nothing: NaN in every cache
            raise ValueError(f"the instruction {text[:80]!r} has no tokens")
        self.key_valid.fill_(True)
        self.key_valid[:, : self.text_len] = mask
        instruction = self.model.instruction_embedding(ids, mask)
        if bb.film is not None:
            self.film.copy_(bb.film_params(instruction))
        if self.spatial_film is not None:
            self.spatial_film.copy_(self.model.spatial_film(instruction))
        if self.kp_instruction is not None:
            self.kp_instruction.copy_(self.model.keypoint_instruction(instruction))
        pos = torch.arange(self.text_len, device=self.device)[None]
        h = bb.vlm.get_input_embeddings()(ids)
        self._run_lm(h, pos, self.key_valid)
        self._write_head_rows(h_final=self._last_lm_out, pos=pos)
        self.instruction = text
        self._forget_frames()

    # --- per step ---
    def _lm_mask(self, pos: torch.Tensor, key_valid: torch.Tensor) -> torch.Tensor:
        causal = torch.arange(self.prefix, device=self.device)[None, None, :] <= pos[:, :, None]
        return (causal & key_valid[:, None, :])[:, None]

    def _run_lm(self, h, pos, key_valid, prune=None):
        lm = self.model.backbone.vlm.text_model
        mask = self._lm_mask(pos, key_valid)
        cos_sin = lm.rotary_emb(h, pos)
        for i, layer in enumerate(self.lm_layers):
            slot = layer.self_attn.vla_slot
            slot.index, slot.mask, slot.active = pos, mask, True
            h = layer(h, attention_mask=None, position_ids=pos, position_embeddings=cos_sin)
            slot.active = False
            if prune is not None and i == prune:
                keep = self._prune(slot)  # (n_cam, keep) token indices
                rows = torch.cat([(keep + torch.arange(self.n_cam, device=self.device)[:, None] * self.tokens).flatten(),
                                  torch.tensor([h.shape[1] - 1], device=self.device)])
                h, pos = h[:, rows], pos[:, rows]
                key_valid = key_valid.clone()
                vis = torch.zeros(self.n_cam, self.tokens, dtype=torch.bool, device=self.device)
                vis.scatter_(1, keep, True)
                key_valid[:, self.text_len: self.text_len + self.n_cam * self.tokens] = vis.flatten()
                mask = self._lm_mask(pos, key_valid)
                cos_sin = lm.rotary_emb(h, pos)
        self._last_lm_out = lm.norm(h)
        self._last_key_valid = key_valid
        return pos

    def _attention_to_visual(self, slot: KVSlot) -> torch.Tensor:
        """(n_cam, tokens): how much the state token (the last query) attends to each visual token."""
        q, k = slot.last_query, slot.k
        rep = q.shape[1] // k.shape[1]
        k = k.repeat_interleave(rep, 1) if rep > 1 else k
        s = (q @ k.transpose(-1, -2))[:, :, 0] / math.sqrt(q.shape[-1])  # (1, H, P)
        s = s.masked_fill(~self.key_valid[:, None], float("-inf")).softmax(-1).mean(1)[0]
        return s[self.text_len: self.text_len + self.n_cam * self.tokens].view(self.n_cam, self.tokens)

    def _prune(self, slot: KVSlot) -> torch.Tensor:
        score = self._attention_to_visual(slot)
        if self.keep_last_visual:
            score[-1, -1] = float("inf")
        return score.topk(self.kept, dim=1).indices.sort(dim=1).values

    def _write_head_rows(self, h_final, pos):
        m = self.model.head.memory_proj(h_final.float())
        for blk, (k, v) in zip(self.model.head.blocks, self.head_kv):
            nk, nv = blk.prefix_kv(m)
            update_cache(k, pos, nk)
            update_cache(v, pos, nv)

    def _vision_layers(self, h: torch.Tensor, index: torch.Tensor | None = None,
                       parts: list[tuple[int, int, torch.Tensor]] | None = None) -> torch.Tensor:
        """The model's vision encoder (FiLM, SigLIP's layers, the final LayerNorm) over patch
        embeddings h, each layer's keys/values written into its cache at `index` (cameras batched)
        or per camera (`parts`)."""
        slots = [layer.self_attn.vla_slot for layer in self.vision_layers]
        for slot in slots:
            slot.index, slot.parts, slot.mask, slot.active = index, parts, None, True
        h = self.model.backbone.vision_encoder(h, self.film)
        for slot in slots:
            slot.parts, slot.active = None, False
        return h

    def _vision(self, x: torch.Tensor, tok: torch.Tensor) -> torch.Tensor:
        """x (n_cam, 3, S, S) normalized frames; tok (n_cam, R) the tokens to compute (the same number
        per camera: one batched pass) -> the tokens' features (n_cam, R, D)."""
        n = x.shape[0]
        pidx = self.groups[tok].flatten(1)  # (n, R * scale^2) patches, in the connector's channel order
        patches = F.unfold(x, self.patch, stride=self.patch).transpose(1, 2)  # (n, Np, 3 p p)
        sel = patches.gather(1, pidx[..., None].expand(-1, -1, patches.shape[-1]))
        h = self._vision_layers(F.linear(sel, self.patch_w, self.patch_b) + self.pos_emb[pidx], index=pidx)
        return self.model.backbone.vlm.connector.modality_projection(h.reshape(n, tok.shape[1], -1))

    def _vision_mixed(self, x: torch.Tensor, toks: list[torch.Tensor]) -> list[torch.Tensor]:
        """`_vision` for cameras with different token counts (the wrist camera, which moves with the
        arm, recomputed whole beside a still front camera reusing most of its tokens): all their
        patches in one sequence, so each layer's projections and MLP run once instead of once per
        camera; attention stays per camera, over that camera's cache. Returns per camera (R_c, D)."""
        pidx = [self.groups[t].flatten() for t in toks]  # per camera, its patches in connector order
        patches = F.unfold(x, self.patch, stride=self.patch).transpose(1, 2)  # (n_cam, Np, 3 p p)
        h = F.linear(torch.cat([patches[c, p] for c, p in enumerate(pidx)])[None], self.patch_w, self.patch_b)
        parts, start = [], 0
        for c, p in enumerate(pidx):
            parts.append((c, start, p[None]))
            start += len(p)
        h = self._vision_layers(h + self.pos_emb[torch.cat(pidx)], parts=parts)
        h = h.reshape(sum(len(t) for t in toks), -1)  # a token's patches are adjacent
        return list(self.model.backbone.vlm.connector.modality_projection(h).split([len(t) for t in toks]))

    def _encode(self, x: torch.Tensor, toks: list[torch.Tensor], state_token: torch.Tensor) -> torch.Tensor:
        """The backbone over the tokens `toks[c]` of each camera c (+ the state token); updates every
        cache. Returns the head's cross-attention mask."""
        if len({len(t) for t in toks}) == 1:  # one batched pass
            feats = list(self._vision(x, torch.stack(toks)))
        else:  # a camera refreshed in full beside one reusing tokens
            feats = self._vision_mixed(x, toks)
        pos_img = torch.cat([self.text_len + c * self.tokens + t for c, t in enumerate(toks)])
        h = torch.cat([torch.cat(feats), state_token.to(feats[0].dtype)])[None]
        pos = torch.cat([pos_img, self.state_pos])[None]
        full = all(len(t) == self.tokens for t in toks)
        prune = self.cfg.prune_layer if (self.kept and full) else None
        pos = self._run_lm(h, pos, self.key_valid, prune)
        self._write_head_rows(self._last_lm_out, pos)
        if self.kp_mods is not None:  # ada is linear: ada(time + cond) = ada(time) + W cond
            m = self.model
            spatial = m.spatial_coordinates(x, 1, self.spatial_film)
            cond = m.head_condition(self._last_lm_out, spatial, self.kp_instruction)  # last row: the state token
            for i, blk in enumerate(m.head.blocks):
                self.kp_mods[i].copy_(blk.modulation(cond, bias=False))
        return self._last_key_valid[:, None, None, :]

    def _denoise(self, x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """The model's sampling loop (`VLA.sample`) over the cached prefix, its cross-attention the
        cached kernel and each step's output layer fused with the sampler's update."""
        head = self.model.head
        if self.model.sampler.from_zeros:
            x = torch.zeros_like(x)  # regression from a fixed input; no noise
        for mods, coef in zip(self.mods, self.coefs):
            if self.kp_mods is not None:
                mods = [mod + kp for mod, kp in zip(mods, self.kp_mods)]
            h = head.features(head.embed(x), mods, self.head_kv, mask, self._cross_attention)
            x = denoise_update(h, head.out_norm.weight, head.out_norm.bias, head.out.weight, head.out.bias,
                               x, coef, force=self.cfg.kernels)
        return x

    def _cross_attention(self, q, k, v, mask):
        return cached_attention(q, k, v, mask, 1 / math.sqrt(q.shape[-1]), force=self.cfg.kernels)

    def preprocess(self, images: torch.Tensor) -> torch.Tensor:
        """(n_cam, 3, S, S) in [0, 1] -> normalized at the vision encoder's size."""
        return self.model.backbone.preprocess(images)

    def select(self, x: torch.Tensor) -> list[torch.Tensor]:
        """Per camera, the tokens to recompute this step: all of them, or (reuse) a fixed number."""
        cfg = self.cfg
        all_tokens = torch.arange(self.tokens, device=self.device)
        if (not cfg.reuse or self.ref_images is None or self.relevance is None
                or self.steps_since_full + 1 >= cfg.refresh_every):
            return [all_tokens] * self.n_cam
        budget = self.tokens - int(cfg.reuse_max * self.tokens)
        change = region_change(x, self.ref_images, self.patch * self.scale, force=cfg.kernels)
        must = change > cfg.reuse_threshold
        if self.keep_last_visual:
            must[-1, -1] = True
        if cfg.reuse_keep_relevant:
            must.scatter_(1, self.relevance.topk(cfg.reuse_keep_relevant, dim=1).indices, True)
        partial = (must.float() * 1e3 + change).topk(budget, dim=1).indices.sort(dim=1).values
        too_many = (must.sum(1) > budget).tolist()  # that camera changed too much: recompute it all
        return [all_tokens if too_many[c] else partial[c] for c in range(self.n_cam)]

    @torch.no_grad()
    def warmup(self, images: torch.Tensor, text: str, state: torch.Tensor, noise: torch.Tensor) -> None:
        """Runs every static shape the step can take once (with compile: compiles them all now; with
        cuda_graph: captures them all now, not in the middle of an episode), then forgets the caches."""

        self.set_instruction(text)
        x = self.preprocess(images.to(self.device))
        state_token = self.model.state_proj(state.to(self.device)[None])
        full = torch.arange(self.tokens, device=self.device)
        sizes = [self.tokens, self.tokens - int(self.cfg.reuse_max * self.tokens)] if self.cfg.reuse else [self.tokens]
        for combo in itertools.product(sizes, repeat=self.n_cam):
            # full cameras share one index tensor, as `select` gives them: dynamo guards on aliasing
            mask = self.encode(x, [full if n == self.tokens else full[:n] for n in combo], state_token)
        self.denoise(noise.to(self.device), mask)
        self.set_instruction(text)
        self._warm = True

    @torch.no_grad()
    def step(self, images: torch.Tensor, text: str, state: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
        """images (n_cam, 3, S, S) in [0, 1]; state normalized (state_dim,); noise (1, H, A).
        Returns the normalized chunk (1, H, A)."""
        if (self.cfg.compile or self.cfg.cuda_graph) and not self._warm:
            self.warmup(images, text, state, noise)
        if text != self.instruction:
            self.set_instruction(text)
        clock = _Clock(self.timings, self.device)
        x = self.preprocess(images.to(self.device))
        toks = self.select(x)
        clock("preprocess")
        full = all(len(t) == self.tokens for t in toks)
        mask = self.encode(x, toks, self.model.state_proj(state.to(self.device)[None]))
        clock("backbone")
        chunk = self.denoise(noise.to(self.device), mask)
        clock("head")
        if full:
            self.ref_images = x.clone()
            self.steps_since_full = 0
            self.stats["full"] += 1
        else:
            region = self.patch * self.scale
            grid = torch.zeros(self.n_cam, self.tokens, device=self.device)
            for c, t in enumerate(toks):
                grid[c, t] = 1.0
            upd = grid.view(self.n_cam, 1, self.side // self.scale, -1).repeat_interleave(region, 2)
            upd = upd.repeat_interleave(region, 3).bool()
            self.ref_images = torch.where(upd, x, self.ref_images)
            self.steps_since_full += 1
            self.stats["partial"] += 1
        self.stats["recomputed_tokens"] += sum(len(t) for t in toks)
        if self.cfg.reuse:
            self.relevance = self._attention_to_visual(self.lm_layers[-1].self_attn.vla_slot)
        return chunk


class _StepGraphs:
    """CUDA graphs of the step: one per combination of per-camera token counts (one without reuse),
    plus one of the denoising loop. Inputs are copied into static buffers and the graphs replayed:
    one launch each instead of hundreds of small kernels. Everything they read between calls (the
    text rows of the caches, key_valid, FiLM) is updated in place by `set_instruction`."""

    def __init__(self, fast: FastVLA):
        self.fast = fast
        self.pool = None
        self.encoders: dict[tuple, tuple] = {}  # sizes -> (graph, static token index buffers)
        self.denoiser = None
        # static inputs, allocated at the first call (their shapes come from it)
        self.x = self.state_token = self.mask = self.noise = None

    def _capture(self, fn):
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            for _ in range(2):
                fn()
        torch.cuda.current_stream().wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, pool=self.pool):
            out = fn()
        self.pool = graph.pool()
        return graph, out

    def encode(self, x: torch.Tensor, toks: list[torch.Tensor], state_token: torch.Tensor) -> torch.Tensor:
        f = self.fast
        key = tuple(len(t) for t in toks)
        if self.x is None:
            self.x, self.state_token = x.clone(), state_token.clone()
            self.mask = torch.zeros(1, 1, 1, f.prefix, dtype=torch.bool, device=f.device)
        self.x.copy_(x)
        self.state_token.copy_(state_token)
        if key not in self.encoders:
            bufs = [t.clone() for t in toks]
            graph, _ = self._capture(lambda: self.mask.copy_(f._encode(self.x, bufs, self.state_token)))
            self.encoders[key] = (graph, bufs)
        graph, bufs = self.encoders[key]
        for b, t in zip(bufs, toks):
            b.copy_(t)
        graph.replay()
        return self.mask

    def denoise(self, noise: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        if self.denoiser is None:
            self.noise = noise.clone()
            self.denoiser = self._capture(lambda: self.fast._denoise(self.noise, self.mask))
        self.noise.copy_(noise)
        graph, out = self.denoiser
        graph.replay()
        return out.clone()
