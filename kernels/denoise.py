"""The head's output layer fused with the sampler's update.

Per action token: out = LayerNorm(h) @ W.T + b (the head's output), then
  x0 = clamp(c[0] * x + c[1] * out, -c[6], c[6]);  eps = c[2] * x + c[3] * out;
  x_next = c[4] * x0 + c[5] * eps.
With s = sqrt(a_t), r = sqrt(1 - a_t): DDIM (eta 0, clipped x0) predicting epsilon is
c = (1/s, -r/s, 0, 1, sqrt(a_prev), sqrt(1 - a_prev), clip), predicting the sample
c = (0, 1, 1/r, -s/r, sqrt(a_prev), sqrt(1 - a_prev), clip) (diffusers derives eps from the
unclipped sample); a flow Euler step x - dt * v is (1, -dt, 0, 0, 1, 0, inf); the L1 head's
output itself is (0, 1, 0, 0, 1, 0, inf).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from vla.kernels.dispatch import LazyKernel, use_triton


def sampler_update(x: torch.Tensor, out: torch.Tensor, coef: torch.Tensor) -> torch.Tensor:
    """One step of the sampler from the head's output (the formula above)."""
    x0 = (coef[0] * x + coef[1] * out).clamp(-coef[6], coef[6])
    return coef[4] * x0 + coef[5] * (coef[2] * x + coef[3] * out)


def denoise_update_ref(h, ln_w, ln_b, w, b, x, coef):
    return sampler_update(x, F.linear(F.layer_norm(h.float(), (h.shape[-1],), ln_w, ln_b, 1e-5), w, b), coef)


def denoise_update(h: torch.Tensor, ln_w: torch.Tensor, ln_b: torch.Tensor, w: torch.Tensor, b: torch.Tensor,
                   x: torch.Tensor, coef: torch.Tensor, force: str | None = None) -> torch.Tensor:
    """h (B, H, D) head features, x (B, H, A) current sample, w (A, D), coef (7,) float32 tensor."""
    if not use_triton(h, force):
        return denoise_update_ref(h, ln_w, ln_b, w, b, x, coef)
    import triton  # optional: only where a kernel is launched (CUDA, or TRITON_INTERPRET=1)

    bsz, hor, d = h.shape
    a = w.shape[0]
    h2, x2 = h.reshape(-1, d).contiguous(), x.reshape(-1, a).contiguous()
    out = torch.empty_like(x2)
    _denoise_kernel[(h2.shape[0],)](h2, ln_w, ln_b, w.contiguous(), b, x2, coef, out, d, a,
                                    BLOCK_D=triton.next_power_of_2(d), BLOCK_A=triton.next_power_of_2(a))
    return out.view(bsz, hor, a)


def _define_kernel():
    import triton  # optional: only where a kernel is launched (CUDA, or TRITON_INTERPRET=1)
    import triton.language as tl  # optional, as above

    @triton.jit
    def kernel(h_ptr, lnw_ptr, lnb_ptr, w_ptr, b_ptr, x_ptr, c_ptr, o_ptr, D, A,
               BLOCK_D: tl.constexpr, BLOCK_A: tl.constexpr):
        row = tl.program_id(0)
        od, oa = tl.arange(0, BLOCK_D), tl.arange(0, BLOCK_A)
        dm, am = od < D, oa < A
        h = tl.load(h_ptr + row * D + od, mask=dm, other=0.0).to(tl.float32)
        mean = tl.sum(h, axis=0) / D
        hc = tl.where(dm, h - mean, 0.0)
        var = tl.sum(hc * hc, axis=0) / D
        hn = hc / tl.sqrt(var + 1e-5) * tl.load(lnw_ptr + od, mask=dm, other=0.0) \
            + tl.load(lnb_ptr + od, mask=dm, other=0.0)
        w = tl.load(w_ptr + oa[:, None] * D + od[None, :], mask=am[:, None] & dm[None, :], other=0.0)
        out = tl.sum(w * hn[None, :], axis=1) + tl.load(b_ptr + oa, mask=am, other=0.0)
        x = tl.load(x_ptr + row * A + oa, mask=am, other=0.0)
        c0, c1, c2, c3 = tl.load(c_ptr), tl.load(c_ptr + 1), tl.load(c_ptr + 2), tl.load(c_ptr + 3)
        c4, c5, c6 = tl.load(c_ptr + 4), tl.load(c_ptr + 5), tl.load(c_ptr + 6)
        x0 = tl.minimum(tl.maximum(c0 * x + c1 * out, -c6), c6)
        tl.store(o_ptr + row * A + oa, c4 * x0 + c5 * (c2 * x + c3 * out), mask=am)

    return kernel


_denoise_kernel = LazyKernel(_define_kernel)
