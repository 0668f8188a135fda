"""Kernels of the inference loop, each a Triton kernel beside its torch reference.

`cached_attention`, `region_change` and `denoise_update` dispatch to Triton for CUDA tensors (or
anywhere with `force="triton"`, which runs under TRITON_INTERPRET=1 on a CPU) and to the torch
reference otherwise. The references define the semantics; tests compare the two.
"""

from __future__ import annotations

import functools
import os

import torch


@functools.cache
def triton_available() -> bool:
    try:
        import triton  # noqa: F401
    except Exception:
        return False
    return True


def use_triton(t: torch.Tensor, force: str | None) -> bool:
    if force == "torch":
        return False
    if force == "triton":
        if not triton_available():
            raise RuntimeError("force='triton' but triton is not installed")
        if not t.is_cuda and os.environ.get("TRITON_INTERPRET") != "1":
            raise RuntimeError("Triton on CPU tensors needs TRITON_INTERPRET=1 (set before triton is imported)")
        return True
    return t.is_cuda and triton_available()


from vla.kernels.attention import cached_attention  # noqa: E402
from vla.kernels.denoise import denoise_update  # noqa: E402
from vla.kernels.frame_diff import region_change  # noqa: E402

__all__ = ["cached_attention", "denoise_update", "region_change", "triton_available", "use_triton"]
