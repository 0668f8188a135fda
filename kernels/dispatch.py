"""Which implementation a kernel call takes: Triton on CUDA tensors (or forced), the torch reference
otherwise."""

from __future__ import annotations

import functools
import os

import torch


@functools.cache
def triton_available() -> bool:
    try:
        import triton  # noqa: F401  (optional: the dev extra installs it on x86-64 Linux)
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


class LazyKernel:
    """A Triton kernel defined on first launch, so importing a kernel module never imports triton."""

    def __init__(self, define):
        self.define, self.kernel = define, None

    def __getitem__(self, grid):
        if self.kernel is None:
            self.kernel = self.define()
        return self.kernel[grid]
