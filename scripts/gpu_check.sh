#!/usr/bin/env bash
# Issue 4's GPU checks in one call of a lent GPU machine (the `device` tool's H100/H200 image: python3
# with CUDA torch and Triton, no internet). What this project needs beyond that image travels with the
# call: wheels in .whl/ (mujoco, mujoco-core, glfw, pyopengl, gymnasium, farama-notifications, diffusers,
# pyzmq, transformers) and the EGL loader debs in .gl/ (MuJoCo renders the rollout with MUJOCO_GL=egl).
# Made here (both folders listed in .git/info/exclude, carried with the call):
#   pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
#     --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 -d .whl mujoco==4.0.0 \
#     mujoco-core==4.0.0 glfw==2.11.0 PyOpenGL==3.1.10 gymnasium==1.4.0 farama-notifications \
#     diffusers==0.42.1 pyzmq==27.3.0 transformers==5.23.0
#   (cd .gl && apt-get download libvulkan1 libegl1 libglvnd0 libopengl0 libgl1 libglx0 libgles2)
# Usage there: bash scripts/gpu_check.sh [setup] [tests] [kernels] [bench:POLICY_DIR ...]
# Everything it measures lands in $OUT (logs and JSON), the tables at the end of its output.
set -u
REPO=$(pwd)
OUT=${OUT:-/tmp/gpu_out}
mkdir -p "$OUT"
# commands run from /tmp: in the repo root, python -m would import the source folders (vla/, kernels/) as
# top-level packages instead of the installed vla.* layout
export MUJOCO_GL=egl TRITON_INTERPRET=0 PYTHONUNBUFFERED=1 PYTHONPATH=/tmp/vla:/tmp/site

setup() {
    for f in .gl/*.deb; do dpkg -x "$f" /; done
    ldconfig
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
    python3 -m pip install -q --no-index --no-deps --no-build-isolation --no-cache-dir --target /tmp/vla . 2>&1 | tail -3
    nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.sm,clocks.max.sm --format=csv
    python3 -c "import torch, transformers, triton, mujoco, diffusers, sys; print('python', sys.version.split()[0],
'torch', torch.__version__, 'transformers', transformers.__version__, 'triton', triton.__version__,
'mujoco', mujoco.__version__, 'diffusers', diffusers.__version__, torch.cuda.get_device_name())"
}

for step in "$@"; do
    case "$step" in
        setup) setup 2>&1 | tee "$OUT/setup.log" ;;
        tests)
            (cd /tmp && timeout 400 python3 -m pytest -q -p no:cacheprovider --rootdir "$REPO" \
                "$REPO/tests/test_kernels.py" "$REPO/tests/test_fast.py") 2>&1 \
                | tee "$OUT/pytest_gpu.log" | tail -15 ;;
        kernels)
            (cd /tmp && timeout 200 /tmp/vla/bin/vla bench --kernels --device cuda) 2>&1 | tee "$OUT/kernels.log" ;;
        bench:*)
            policy=${step#bench:}
            name=$(basename "$policy")
            (cd /tmp && timeout 400 /tmp/vla/bin/vla bench --device cuda --policy "$REPO/$policy" --steps 200 --json \
                > "$OUT/bench_cuda_$name.json" 2> "$OUT/bench_cuda_$name.err")
            (cd /tmp && python3 -c "import json, sys; from vla.jobs.bench import format_bench
print(format_bench(json.load(open(sys.argv[1]))))" "$OUT/bench_cuda_$name.json") 2>&1 \
                || tail -20 "$OUT/bench_cuda_$name.err" ;;
        *) echo "unknown step $step" >&2; exit 2 ;;
    esac
done
