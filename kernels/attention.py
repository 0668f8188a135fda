"""Attention of a few query tokens over a cached prefix whose entries are partly updated in place.

The token-reuse path recomputes only changed tokens: their new keys/values are written into the
layer's cache (`update_cache`), then their queries attend over the whole cache (`cached_attention`).
Grouped-query attention: query head h reads key/value head h // (Hq // Hkv).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from vla.kernels.dispatch import LazyKernel, use_triton


def update_cache(cache: torch.Tensor, index: torch.Tensor, new: torch.Tensor) -> None:
    """cache (B, H, P, d)[b, :, index[b, i]] = new[b, :, i], in place. index (B, n) long."""
    cache.scatter_(2, index[:, None, :, None].expand(-1, cache.shape[1], -1, cache.shape[3]), new)


def cached_attention_ref(q, k, v, mask, scale):
    rep = q.shape[1] // k.shape[1]
    if rep > 1:
        k, v = k.repeat_interleave(rep, 1), v.repeat_interleave(rep, 1)
    s = (q.float() @ k.float().transpose(-1, -2)) * scale
    if mask is not None:
        s = s.masked_fill(~mask, float("-inf"))
    return (s.softmax(-1) @ v.float()).to(q.dtype)


def cached_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None,
                     scale: float, force: str | None = None) -> torch.Tensor:
    """q (B, Hq, n, d) over k, v (B, Hkv, P, d); mask (B, 1, n, P) bool, True = may attend (every
    query row must allow at least one key). Returns (B, Hq, n, d)."""
    if use_triton(q, force):
        return _cached_attention_triton(q, k, v, mask, scale)
    if q.shape[-2] * k.shape[-2] > SDPA_MIN_SCORES:
        return cached_attention_sdpa(q, k, v, mask, scale)
    return cached_attention_ref(q, k, v, mask, scale)


# Off CUDA: below this many scores per head (queries x prefix) the explicit form, which inductor
# fuses with its neighbours (the nano model's compiled step: 3.0 ms against 3.4 through SDPA); above
# it torch's fused SDPA, which never holds the score matrix (at SmolVLM's 1024 patches per camera
# the explicit form made the fast path 40 % slower than the model's own SDPA). BENCHMARKS.md.
SDPA_MIN_SCORES = 16384


def cached_attention_sdpa(q, k, v, mask, scale):
    """`cached_attention_ref` through torch's fused attention."""
    return F.scaled_dot_product_attention(q, k.to(q.dtype), v.to(q.dtype), attn_mask=mask, scale=scale,
                                          enable_gqa=q.shape[1] != k.shape[1])


def _cached_attention_triton(q, k, v, mask, scale):
    import triton  # optional: only where a kernel is launched (CUDA, or TRITON_INTERPRET=1)

    b, hq, n, d = q.shape
    hkv, p = k.shape[1], k.shape[2]
    out = torch.empty_like(q)
    if mask is None:
        mask_t, ms = q.new_ones((1, 1, 1, 1), dtype=torch.int8), (0, 0, 0, 0)
    else:
        mask_t = mask.to(torch.int8).expand(b, 1, n, p)
        ms = mask_t.stride()
    _attn_kernel[(b * hq * n,)](
        q, k, v, out, mask_t, float(scale), hq, hkv, n, p, d,
        *q.stride(), *k.stride(), *v.stride(), *out.stride(), ms[0], ms[2], ms[3],
        BLOCK_P=triton.next_power_of_2(p), BLOCK_D=triton.next_power_of_2(d))
    return out


def _define_kernel():
    import triton  # optional: only where a kernel is launched (CUDA, or TRITON_INTERPRET=1)
    import triton.language as tl  # optional, as above

    @triton.jit
    def kernel(q_ptr, k_ptr, v_ptr, o_ptr, m_ptr, scale, HQ, HKV, N, P, D,
               sqb, sqh, sqn, sqd, skb, skh, skp, skd, svb, svh, svp, svd, sob, soh, son, sod,
               smb, smn, smp, BLOCK_P: tl.constexpr, BLOCK_D: tl.constexpr):
        pid = tl.program_id(0)
        i = pid % N
        h = (pid // N) % HQ
        b = pid // (N * HQ)
        hk = h // (HQ // HKV)
        offs_p = tl.arange(0, BLOCK_P)
        offs_d = tl.arange(0, BLOCK_D)
        pm, dm = offs_p < P, offs_d < D
        q = tl.load(q_ptr + b * sqb + h * sqh + i * sqn + offs_d * sqd, mask=dm, other=0.0).to(tl.float32)
        kv_mask = pm[:, None] & dm[None, :]
        k = tl.load(k_ptr + b * skb + hk * skh + offs_p[:, None] * skp + offs_d[None, :] * skd,
                    mask=kv_mask, other=0.0).to(tl.float32)
        s = tl.sum(k * q[None, :], axis=1) * scale
        allowed = tl.load(m_ptr + b * smb + i * smn + offs_p * smp, mask=pm, other=0) != 0
        s = tl.where(allowed & pm, s, float("-inf"))
        s = s - tl.max(s, axis=0)
        w = tl.exp(s)
        w = w / tl.sum(w, axis=0)
        v = tl.load(v_ptr + b * svb + hk * svh + offs_p[:, None] * svp + offs_d[None, :] * svd,
                    mask=kv_mask, other=0.0).to(tl.float32)
        o = tl.sum(v * w[:, None], axis=0)
        tl.store(o_ptr + b * sob + h * soh + i * son + offs_d * sod, o.to(o_ptr.dtype.element_ty), mask=dm)

    return kernel


_attn_kernel = LazyKernel(_define_kernel)
