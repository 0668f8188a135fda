"""Kernels of the inference loop, each a Triton kernel beside its torch reference.

`cached_attention`, `region_change` and `denoise_update` dispatch to Triton for CUDA tensors (or
anywhere with `force="triton"`, which runs under TRITON_INTERPRET=1 on a CPU) and to the torch
reference otherwise. The references define the semantics; tests compare the two.
"""

from vla.kernels.attention import cached_attention
from vla.kernels.denoise import denoise_update
from vla.kernels.dispatch import triton_available, use_triton
from vla.kernels.frame_diff import region_change

__all__ = ["cached_attention", "denoise_update", "region_change", "triton_available", "use_triton"]
