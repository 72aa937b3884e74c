#!/usr/bin/env bash
# The light half of the set-up: check Python and Rust, make the virtual environment and put
# the build backend (maturin) in it. Nothing else: no apt, no QEMU, no test guest, no peers.
# `make demo` runs it before it builds and runs the demo; scripts/setup.sh (what `make test`
# runs) runs it before it adds the peers and the dev tools.
#
#   bash scripts/venv.sh
#
#   PYTHON=python3.12   the interpreter to make the environment with (default: python3)
#   VENV=DIR            the environment (default: .venv in the checkout)
#
# A missing or too old tool is one line on stderr naming it and what to do, and exit 1.
# The minimum versions are read from where they are declared: requires-python in
# pyproject.toml, rust-version in Cargo.toml; maturin's requirement from pyproject's
# [build-system] requires.
set -euo pipefail

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
PYTHON=${PYTHON:-python3}
VENV=${VENV:-$ROOT/.venv}
export PIP_DISABLE_PIP_VERSION_CHECK=1

fail() {
    printf 'error: %s\n' "$*" >&2
    exit 1
}

# "3.11" from `requires-python = ">=3.11"`, "1.80" from `rust-version = "1.80"`.
declared() {
    sed -n "s/^$1 *= *\"[>=]*\([0-9][0-9.]*\)\".*/\1/p" "$2" | head -n1
}
# Is version $1 at least version $2 (dotted numbers)?
at_least() {
    [[ "$(printf '%s\n%s\n' "$2" "$1" | sort -V | head -n1)" == "$2" ]]
}
# The X.Y.Z of a Python interpreter; any Python, 2.7 included, can print it.
py_version() {
    "$1" -c 'import sys; print("%d.%d.%d" % sys.version_info[:3])' 2>/dev/null
}

MIN_PYTHON=$(declared requires-python "$ROOT/pyproject.toml")
MIN_RUST=$(declared rust-version "$ROOT/Cargo.toml")
[[ -n "$MIN_PYTHON" && -n "$MIN_RUST" ]] ||
    fail "scripts/venv.sh: no requires-python in pyproject.toml or rust-version in Cargo.toml"

# --- Python ---------------------------------------------------------------------
if [[ -x "$VENV/bin/python" ]]; then
    have=$(py_version "$VENV/bin/python") ||
        fail "$VENV/bin/python does not run: remove $VENV (rm -rf $VENV) and rerun"
    at_least "$have" "$MIN_PYTHON" ||
        fail "$VENV was made with Python $have, older than $MIN_PYTHON:" \
            "remove it (rm -rf $VENV) and rerun with PYTHON=python$MIN_PYTHON or newer"
else
    command -v "$PYTHON" >/dev/null ||
        fail "$PYTHON not found on PATH: install Python $MIN_PYTHON or newer," \
            "or name one with PYTHON=/path/to/python3"
    have=$(py_version "$PYTHON") || fail "$PYTHON does not run (tried: $PYTHON -c 'import sys')"
    at_least "$have" "$MIN_PYTHON" ||
        fail "$PYTHON is Python $have; pyvhost needs Python $MIN_PYTHON or newer:" \
            "name one with PYTHON=/path/to/python$MIN_PYTHON"
    "$PYTHON" -c 'import ensurepip, venv' 2>/dev/null ||
        fail "$PYTHON has no venv/ensurepip module to make $VENV with" \
            "(Debian and Ubuntu: apt-get install python3-venv)"
fi

# --- Rust -----------------------------------------------------------------------
command -v cargo >/dev/null ||
    fail "cargo not found on PATH: install Rust $MIN_RUST or newer (rustup), then open a new" \
        "shell or run: source ~/.cargo/env"
command -v rustc >/dev/null || fail "rustc not found on PATH although cargo is: reinstall Rust"
# rustup brings no linker: rustc links through the system's C compiler.
command -v cc >/dev/null ||
    fail "no C compiler (cc) on PATH: Rust links through it (Debian and Ubuntu: apt-get install gcc)"
rust=$(rustc --version | awk '{print $2}')
at_least "${rust%%-*}" "$MIN_RUST" ||
    fail "rustc is $rust; pyvhost needs Rust $MIN_RUST or newer (rustup update)"

# --- the environment and maturin --------------------------------------------------
if [[ ! -x "$VENV/bin/python" ]]; then
    printf '== venv: creating %s with %s (Python %s)\n' "$VENV" "$PYTHON" "$have"
    "$PYTHON" -m venv "$VENV" || fail "$PYTHON -m venv $VENV failed (its message is above)"
fi
if ! "$VENV/bin/maturin" --version >/dev/null 2>&1; then
    # The build backend pyproject.toml declares, with its version bounds.
    req=$("$VENV/bin/python" -c 'import sys, tomllib
with open(sys.argv[1], "rb") as f:
    print(*tomllib.load(f)["build-system"]["requires"], sep="\n")' "$ROOT/pyproject.toml")
    mapfile -t reqs <<<"$req"
    printf '== venv: installing %s into %s\n' "${reqs[*]}" "$VENV"
    "$VENV/bin/python" -m pip install -q "${reqs[@]}" ||
        fail "pip could not install ${reqs[*]} into $VENV (its message is above)"
fi
