"""A compact vision-language-action control stack: model, policies, sim, ROS2 nodes, kernels."""

__version__ = "0.1.0"

import os as _os

# MuJoCo picks its OpenGL backend when `mujoco` is first imported; headless machines need EGL
# (or OSMesa). Set the default here, before any module of this package imports mujoco.
_os.environ.setdefault("MUJOCO_GL", "egl")
