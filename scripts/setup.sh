#!/usr/bin/env bash
# Sets up a fresh Debian machine: EGL/OSMesa for MuJoCo's offscreen rendering, a virtual
# environment in .venv, torch's CPU build (pinned: an unpinned torch pulls a multi-GB CUDA build),
# and this package with its dev tools and the ROS2 wheels (rclpy 9). Safe to run again.
# --metaworld also makes .venv-metaworld: MetaWorld 3.1.1 pins mujoco 3.3.0, so it gets its own
# environment (no torch), which `vla collect/eval --suite metaworld` start as an env server.
set -euo pipefail
METAWORLD=0
for arg in "$@"; do
    case "$arg" in
        --metaworld) METAWORLD=1 ;;
        *) echo "usage: bash scripts/setup.sh [--metaworld]" >&2; exit 2 ;;
    esac
done
cd "$(dirname "$0")/.."

if ! ldconfig -p | grep -q "libEGL_mesa.so.0" || ! ldconfig -p | grep -q "libOSMesa.so"; then
    SUDO=""; [ "$(id -u)" = 0 ] || SUDO="sudo"
    $SUDO apt-get update -qq
    DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq libegl1 libegl-mesa0 libgl1-mesa-dri libosmesa6 >/dev/null
fi

# pip's and setuptools' chatter (the editable-install notice among it) is shown only when a step fails
quiet() {
    local log
    log=$(mktemp)
    if ! "$@" >"$log" 2>&1; then
        cat "$log"
        rm -f "$log"
        echo "setup failed: $*" >&2
        exit 1
    fi
    rm -f "$log"
}

[ -x .venv/bin/python ] || python3 -m venv .venv
quiet .venv/bin/python -m pip install -q --upgrade pip
quiet .venv/bin/python -m pip install -q torch==2.13.0
quiet .venv/bin/python -m pip install -q -e ".[dev,ros]"
.venv/bin/python -c "import torch, mujoco, rclpy, zmq, vla.sim; print('setup ok: torch', torch.__version__, 'mujoco', mujoco.__version__)"

if [ "$METAWORLD" = 1 ]; then
    [ -x .venv-metaworld/bin/python ] || python3 -m venv .venv-metaworld
    quiet .venv-metaworld/bin/python -m pip install -q --upgrade pip
    quiet .venv-metaworld/bin/python -m pip install -q "metaworld==3.1.1" "mujoco==3.3.0" packaging pyzmq msgpack pyyaml
    quiet .venv-metaworld/bin/python -m pip install -q --no-deps -e .
    .venv-metaworld/bin/python -c "import metaworld, mujoco, vla.serving.env_server; print('metaworld ok: mujoco', mujoco.__version__)"
fi
