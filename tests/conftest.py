import os

os.environ.setdefault("MUJOCO_GL", "egl")
# Triton kernels run under the interpreter on a CPU; must be set before anything imports triton.
os.environ.setdefault("TRITON_INTERPRET", "1")
