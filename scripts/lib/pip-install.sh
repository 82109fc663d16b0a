# Sourced by the install-*.sh scripts: installs a PyPI package into a folder, as a venv
# when `python3 -m venv` works, else with `pip install --target <folder>/site`.
#
#   pip_install_into TAG VENV SPEC   (TAG prefixes the log lines; returns non-zero on failure)
#
# pip's own chatter goes to stderr so that the caller's stdout carries only its result.
pip_install_into() {
    local tag="$1" venv="$2" spec="$3"
    command -v python3 >/dev/null || { echo "$tag: python3 not found" >&2; return 1; }
    if python3 -m venv "$venv" >&2 2>/dev/null && [ -x "$venv/bin/pip" ]; then
        "$venv/bin/pip" install --disable-pip-version-check --quiet "$spec" >&2
        return
    fi
    echo "$tag: python3 -m venv unavailable, using pip install --target" >&2
    rm -rf "$venv/bin" "$venv/lib" "$venv/pyvenv.cfg"
    local pip
    if python3 -m pip --version >/dev/null 2>&1; then
        pip=(python3 -m pip)
    elif command -v pip3 >/dev/null; then
        pip=(pip3)
    else
        echo "$tag: neither the venv module nor pip is available; apt-get install python3-venv (or python3-pip)" >&2
        return 1
    fi
    # --break-system-packages is needed on Debian 12+ (PEP 668) even with --target;
    # older pips do not know the flag, so try without it second.
    "${pip[@]}" install --disable-pip-version-check --quiet --target "$venv/site" "$spec" --break-system-packages >&2 \
        || "${pip[@]}" install --disable-pip-version-check --quiet --target "$venv/site" "$spec" >&2
}
