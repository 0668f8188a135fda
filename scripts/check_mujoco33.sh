#!/usr/bin/env bash
# The sim must keep working on MuJoCo 3.3 (users keep older pins for other benchmarks): run the
# env and expert tests in a second environment with mujoco==3.3.0 (no torch needed there).
set -euo pipefail
cd "$(dirname "$0")/.."
[ -x .venv-mujoco33/bin/python ] || python3 -m venv .venv-mujoco33
.venv-mujoco33/bin/python -m pip install -q "mujoco==3.3.0" "gymnasium>=1.0" av pyarrow pandas pyyaml tqdm numpy pytest 2>&1 | grep -v "^WARNING: Location" || true
.venv-mujoco33/bin/python -m pip install -q --no-deps -e . 2>&1 | grep -v "^WARNING: Location" || true
.venv-mujoco33/bin/python -m pytest -q -p no:cacheprovider tests/test_env.py tests/test_experts.py
