#!/usr/bin/env bash
# Installs the peer routers that the standalone-gateway benchmark compares against, from
# PyPI into a Python venv under the build directory, and prints the python to run them with
# (`<python> -m sglang_router.launch_router ...`, `<python> -m vllm_router.launch_router ...`).
# Safe to run again: when both are already importable it only prints the path.
#
#   INFERGATE_ROUTERS_VENV   where the venv goes (default: <repo>/target/venv-routers)
#   SGLANG_ROUTER_VERSION    pip version spec for sglang-router (default: 0.3.*)
#   VLLM_ROUTER_VERSION      pip version spec for vllm-router (default: 0.1.*)
#
# Both are Rust routers shipped as Python wheels (a compiled extension plus a small Python
# launcher). They get a venv of their own, apart from target/venv (Envoy), so that their
# Python dependencies cannot disturb it. Needs python3 (3.9+) with the venv module.
set -euo pipefail

repo="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
venv="${INFERGATE_ROUTERS_VENV:-$repo/target/venv-routers}"
specs=(
    "sglang-router==${SGLANG_ROUTER_VERSION:-0.3.*}"
    "vllm-router==${VLLM_ROUTER_VERSION:-0.1.*}"
)

installed() {
    [ -x "$venv/bin/python" ] \
        && "$venv/bin/python" -c 'import sglang_router.launch_router, vllm_router.launch_router' >/dev/null 2>&1
}

if installed; then
    echo "$venv/bin/python"
    exit 0
fi

command -v python3 >/dev/null || { echo "install-routers: python3 is required" >&2; exit 1; }
mkdir -p "$venv"

# Serialise concurrent installs.
exec 9>"$venv/.install.lock"
if command -v flock >/dev/null; then
    flock 9
fi
if installed; then
    echo "$venv/bin/python"
    exit 0
fi

if ! { python3 -m venv "$venv" >&2 2>/dev/null && [ -x "$venv/bin/pip" ]; }; then
    echo "install-routers: python3 -m venv failed; apt-get install python3-venv" >&2
    exit 1
fi
# pip's own chatter goes to stderr so that stdout carries only the python path.
"$venv/bin/pip" install --disable-pip-version-check --quiet "${specs[@]}" >&2

if installed; then
    echo "$venv/bin/python"
    "$venv/bin/pip" list --disable-pip-version-check 2>/dev/null \
        | grep -Ei '^(sglang-router|vllm-router|sglang_router|vllm_router) ' >&2 || true
else
    echo "install-routers: installed ${specs[*]} but cannot import sglang_router.launch_router and vllm_router.launch_router from $venv/bin/python" >&2
    exit 1
fi
