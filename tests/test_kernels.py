"""Each Triton kernel against its torch reference (under TRITON_INTERPRET=1 on a CPU, compiled on a
CUDA GPU where one is present and the interpreter is off: `TRITON_INTERPRET=0 pytest tests/test_kernels.py`),
on random and edge-case shapes; and the dispatch rule (torch on CPU tensors unless forced)."""

import math
import os

import pytest
import torch

from vla.kernels import cached_attention, denoise_update, region_change, triton_available
from vla.kernels.attention import cached_attention_ref, cached_attention_sdpa, update_cache

needs_triton = pytest.mark.skipif(not triton_available(), reason="triton not installed")
# the interpreter cannot run on CUDA tensors, and compiled Triton needs a GPU
DEVICES = ["cuda"] if torch.cuda.is_available() and os.environ.get("TRITON_INTERPRET") != "1" else ["cpu"]
TOL = 1e-4 if DEVICES == ["cuda"] else 1e-5  # a GPU sums in another order


@needs_triton
@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("b,hq,hkv,n,p,d", [(1, 4, 2, 9, 45, 32), (2, 2, 2, 1, 7, 16), (3, 4, 1, 5, 64, 24),
                                            (1, 1, 1, 1, 1, 8)])
def test_cached_attention_matches_reference(b, hq, hkv, n, p, d, device):
    g = torch.Generator().manual_seed(p * 7 + n)
    q = torch.randn(b, hq, n, d, generator=g).to(device)
    k, v = torch.randn(b, hkv, p, d, generator=g).to(device), torch.randn(b, hkv, p, d, generator=g).to(device)
    # queries sit at random positions; each may see keys at or before its own position (causal)
    pos = torch.stack([torch.randperm(p, generator=g)[:n] for _ in range(b)])
    mask = (torch.arange(p)[None, None, :] <= pos[:, :, None])[:, None].to(device)
    scale = 1 / math.sqrt(d)
    ref = cached_attention(q, k, v, mask, scale, force="torch")
    out = cached_attention(q, k, v, mask, scale, force="triton")
    assert torch.allclose(out, ref, atol=TOL)
    assert torch.allclose(cached_attention(q, k, v, None, scale, force="triton"),
                          cached_attention_ref(q, k, v, None, scale), atol=TOL)
    # the reference itself equals torch's SDPA
    sdpa = torch.nn.functional.scaled_dot_product_attention(
        q, k.repeat_interleave(hq // hkv, 1), v.repeat_interleave(hq // hkv, 1), attn_mask=mask)
    assert torch.allclose(ref, sdpa, atol=TOL)


@pytest.mark.parametrize("b,hq,hkv,n,p,d", [(1, 4, 2, 9, 45, 32), (2, 9, 3, 64, 300, 64), (1, 12, 12, 20, 1024, 64)])
def test_the_torch_dispatch_is_the_reference(b, hq, hkv, n, p, d):
    """Off CUDA large score matrices go through torch's fused SDPA: it must equal the explicit reference."""
    g = torch.Generator().manual_seed(n)
    q, k, v = torch.randn(b, hq, n, d, generator=g), torch.randn(b, hkv, p, d, generator=g), torch.randn(b, hkv, p, d, generator=g)
    pos = torch.stack([torch.randperm(p, generator=g)[:n] for _ in range(b)])
    mask = (torch.arange(p)[None, None, :] <= pos[:, :, None])[:, None]
    for m in (mask, None):
        torch.testing.assert_close(cached_attention(q, k, v, m, 0.125, force="torch"),
                                   cached_attention_ref(q, k, v, m, 0.125), atol=1e-5, rtol=1e-4)
        torch.testing.assert_close(cached_attention_sdpa(q, k, v, m, 0.125),
                                   cached_attention_ref(q, k, v, m, 0.125), atol=1e-5, rtol=1e-4)


def test_update_cache_writes_only_the_given_positions():
    cache = torch.zeros(2, 3, 6, 4)
    new = torch.ones(2, 3, 2, 4)
    update_cache(cache, torch.tensor([[1, 4], [0, 5]]), new)
    assert cache[0, :, [1, 4]].eq(1).all() and cache[1, :, [0, 5]].eq(1).all()
    assert cache.sum() == new.sum()


@needs_triton
@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("n,c,s,region", [(2, 3, 64, 16), (1, 3, 32, 8), (3, 1, 30, 10)])
def test_region_change_matches_reference(n, c, s, region, device):
    g = torch.Generator().manual_seed(s)
    a = torch.rand(n, c, s, s, generator=g).to(device)
    b = a.clone()
    b[0, :, :region, :region] += 0.5  # only the first token of the first image changes
    ref = region_change(a, b, region, force="torch")
    assert ref.shape == (n, (s // region) ** 2)
    assert torch.isclose(ref[0, 0].cpu(), torch.tensor(0.5)) and ref.flatten()[1:].abs().max() < 1e-6
    b += torch.rand(b.shape, generator=g).to(device) * 0.1
    assert torch.allclose(region_change(a, b, region, force="triton"), region_change(a, b, region, force="torch"),
                          atol=1e-6)


def test_region_change_rejects_mismatched_frames():
    with pytest.raises(ValueError, match="equal square images"):
        region_change(torch.zeros(1, 3, 64, 64), torch.zeros(1, 3, 32, 32), 16)


@needs_triton
@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("b,h,d,a", [(1, 16, 128, 7), (2, 4, 64, 3), (1, 1, 100, 1)])
def test_denoise_update_matches_reference(b, h, d, a, device):
    g = torch.Generator().manual_seed(d + a)
    hs, x = torch.randn(b, h, d, generator=g).to(device), torch.randn(b, h, a, generator=g).to(device) * 2
    ln_w, ln_b = torch.rand(d, generator=g).to(device) + 0.5, torch.randn(d, generator=g).to(device) * 0.1
    w, bias = torch.randn(a, d, generator=g).to(device) * 0.1, torch.randn(a, generator=g).to(device) * 0.1
    for coef in ([1.25, -0.75, 0.0, 1.0, 0.9, 0.43589, 1.0], [0.0, 1.0, 1.6667, -1.3333, 0.9, 0.43589, 1.0],
                 [1.0, -0.1, 0.0, 0.0, 1.0, 0.0, float("inf")]):
        c = torch.tensor(coef, device=device)
        ref = denoise_update(hs, ln_w, ln_b, w, bias, x, c, force="torch")
        out = denoise_update(hs, ln_w, ln_b, w, bias, x, c, force="triton")
        assert torch.allclose(out, ref, atol=TOL)
    # the flow coefficients are a plain Euler step
    eps = torch.nn.functional.linear(torch.nn.functional.layer_norm(hs, (d,), ln_w, ln_b), w, bias)
    assert torch.allclose(ref, x - 0.1 * eps, atol=TOL)


def test_dispatch_uses_torch_on_cpu_tensors():
    from vla.kernels import use_triton

    assert not use_triton(torch.zeros(1), None)
    assert not use_triton(torch.zeros(1), "torch")
