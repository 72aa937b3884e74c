#!/usr/bin/env bash
# The wheel as a pip user gets it: install dist/'s manylinux2014 wheel (scripts/wheel.sh,
# `make wheel`) into a fresh virtual environment outside the checkout and run
# tests/smoke_installed.py there, copied out beside it, with that environment's pytest:
# no source tree on sys.path (the first test proves it).
#
#   bash scripts/smoke.sh [WHEEL]
#
# The environment is made with .venv's base interpreter. All of it lives in a temporary
# folder under $TMPDIR, removed at the end.
set -euo pipefail

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
VENV=${VENV:-$ROOT/.venv}
export PIP_DISABLE_PIP_VERSION_CHECK=1
fail() { printf 'error: %s\n' "$*" >&2; exit 1; }

if (($#)); then
    whl=$1
else
    shopt -s nullglob
    wheels=("$ROOT"/dist/pyvhost-*-abi3-manylinux*.whl)
    ((${#wheels[@]} == 1)) ||
        fail "expected one manylinux wheel in $ROOT/dist, found ${#wheels[@]}: run make wheel"
    whl=${wheels[0]}
fi
[[ -f "$whl" ]] || fail "no wheel at $whl"
[[ -x "$VENV/bin/python" ]] || fail "no $VENV: run make setup (or make demo) first"

TMP=$(mktemp -d "${TMPDIR:-/tmp}/pyvhost-smoke.XXXXXX")
trap 'rm -rf "$TMP"' EXIT
case "$TMP/" in "$ROOT"/*) fail "the smoke environment $TMP is inside the checkout $ROOT" ;; esac
FRESH=$TMP/venv
start=$SECONDS
printf '== smoke: fresh environment %s\n' "$FRESH"
# No pip of its own (ensurepip takes seconds): .venv's pip installs into it (--python).
"$VENV/bin/python" -m venv --without-pip "$FRESH"
# The test tools at the versions .venv has, so pip takes them from its cache.
mapfile -t tools < <("$VENV/bin/python" -m pip freeze --all 2>/dev/null |
    grep -iE '^(pytest|pytest-timeout|mypy)==')
((${#tools[@]} == 3)) || fail "$VENV lacks pytest, pytest-timeout or mypy: run make setup"
# The wheel needs nothing else: it declares no dependencies.
"$VENV/bin/python" -m pip --python "$FRESH/bin/python" install -q --no-compile "${tools[@]}" "$whl"
printf '== smoke: installed %s and %s in %d s\n' "$(basename "$whl")" "${tools[*]}" \
    $((SECONDS - start))

mkdir "$TMP/tests"
cp "$ROOT/tests/smoke_installed.py" "$TMP/tests/test_installed.py"
printf '[pytest]\naddopts = -ra --strict-markers -p no:cacheprovider\nfilterwarnings = error\n' \
    >"$TMP/tests/pytest.ini"
cd "$TMP/tests"
env -u PYTHONPATH -u MYPYPATH PYVHOST_SMOKE_VENV="$FRESH" PYVHOST_CHECKOUT="$ROOT" \
    timeout 600 "$FRESH/bin/python" -m pytest -c pytest.ini --rootdir . --timeout=300 \
    test_installed.py
