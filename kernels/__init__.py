"""Kernels of the inference loop, each a Triton kernel beside its torch reference.

`cached_attention`, `region_change` and `denoise_update` dispatch to Triton for CUDA tensors (or
anywhere with `force="triton"`, which runs under TRITON_INTERPRET=1 on a CPU) and to the torch
reference otherwise. The references define the semantics; tests compare the two.
"""

import importlib.machinery
import importlib.util
import os
import sys

from vla.kernels.attention import cached_attention
from vla.kernels.denoise import denoise_update
from vla.kernels.dispatch import triton_available, use_triton
from vla.kernels.frame_diff import region_change

__all__ = ["cached_attention", "denoise_update", "region_change", "triton_available", "use_triton"]


def _stand_aside_for_the_installed_package() -> None:
    """This folder installs as `vla.kernels`, but Python started in the repository root (`python -m`,
    `python -c`, a REPL) has the root on sys.path and finds it as a top-level `kernels`, the name of
    HF's package that transformers imports. Put whatever `kernels` the rest of sys.path holds in its
    place, or fail as an absent module would."""
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    path = [p for p in sys.path if os.path.abspath(p or os.curdir) != root]
    spec = importlib.machinery.PathFinder.find_spec(__name__, path)
    if spec is None:
        raise ModuleNotFoundError(f"No module named {__name__!r}", name=__name__)
    installed = importlib.util.module_from_spec(spec)
    sys.modules[__name__] = installed  # the import statement returns what sys.modules holds
    spec.loader.exec_module(installed)


if __name__ != "vla.kernels":
    _stand_aside_for_the_installed_package()
