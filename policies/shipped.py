"""The policies trained here and committed with the package (docs/benchmarks-log.md says how)."""

from __future__ import annotations

from importlib.resources import files
from pathlib import Path


def shipped_policy(name: str = "nano_l1") -> Path:
    """`nano_l1`, the default (one head pass: the fastest step, 91 % on the suite), or
    `nano_diffusion` (the diffusion head predicting the chunk, 10 DDIM steps, trained in 100 min: 82 %)."""
    return Path(str(files("vla.policies") / "shipped" / name))
