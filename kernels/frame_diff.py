"""Per-token frame difference: how much each visual token's pixel region changed since the last frame.

Images are the preprocessed frames the vision encoder sees, (N, C, S, S); a token covers a
`region` x `region` square (patch size x pixel-shuffle scale), in row-major token order. The score
is the mean absolute difference over the region; the token-reuse path recomputes tokens whose
score is above a threshold and reuses the cached keys/values of the rest.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from vla.kernels.dispatch import LazyKernel, use_triton


def region_change_ref(cur: torch.Tensor, prev: torch.Tensor, region: int) -> torch.Tensor:
    d = (cur.float() - prev.float()).abs().mean(1, keepdim=True)
    return F.avg_pool2d(d, region).flatten(1)


def region_change(cur: torch.Tensor, prev: torch.Tensor, region: int, force: str | None = None) -> torch.Tensor:
    """(N, C, S, S) x2 -> (N, (S // region) ** 2) mean absolute difference per token region."""
    if cur.shape != prev.shape or cur.shape[-1] % region or cur.shape[-2] != cur.shape[-1]:
        raise ValueError(f"region_change needs equal square images divisible by {region}, got "
                         f"{tuple(cur.shape)} and {tuple(prev.shape)}")
    if not use_triton(cur, force):
        return region_change_ref(cur, prev, region)
    import triton  # optional: only where a kernel is launched (CUDA, or TRITON_INTERPRET=1)

    n, c, s, _ = cur.shape
    side = s // region
    cur, prev = cur.contiguous(), prev.contiguous()
    out = torch.empty(n, side * side, device=cur.device, dtype=torch.float32)
    _diff_kernel[(n * side * side,)](cur, prev, out, c, s, side, region,
                                     BLOCK=triton.next_power_of_2(region))
    return out


def _define_kernel():
    import triton  # optional: only where a kernel is launched (CUDA, or TRITON_INTERPRET=1)
    import triton.language as tl  # optional, as above

    @triton.jit
    def kernel(a_ptr, b_ptr, o_ptr, C, S, SIDE, R, BLOCK: tl.constexpr):
        pid = tl.program_id(0)
        t = pid % (SIDE * SIDE)
        n = pid // (SIDE * SIDE)
        row0, col0 = (t // SIDE) * R, (t % SIDE) * R
        ry, rx = tl.arange(0, BLOCK), tl.arange(0, BLOCK)
        m = (ry[:, None] < R) & (rx[None, :] < R)
        acc = tl.zeros((BLOCK, BLOCK), dtype=tl.float32)
        for ch in range(C):
            base = (n * C + ch) * S * S + (row0 + ry[:, None]) * S + col0 + rx[None, :]
            a = tl.load(a_ptr + base, mask=m, other=0.0).to(tl.float32)
            b = tl.load(b_ptr + base, mask=m, other=0.0).to(tl.float32)
            acc += tl.abs(a - b)
        total = tl.sum(tl.sum(acc, axis=1), axis=0)
        tl.store(o_ptr + pid, total / (C * R * R))

    return kernel


_diff_kernel = LazyKernel(_define_kernel)
