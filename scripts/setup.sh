#!/usr/bin/env bash
# Sets up a fresh Debian machine: EGL/OSMesa for MuJoCo's offscreen rendering, a virtual
# environment in .venv, torch's CPU build (pinned: an unpinned torch pulls a multi-GB CUDA build),
# and this package with its dev tools and the ROS2 wheels (rclpy 9). Safe to run again.
set -euo pipefail
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
