#!/usr/bin/env bash
# Build what is published: an abi3 wheel for manylinux2014 (manylinux_2_17: glibc 2.17,
# so pip on Debian 11, Ubuntu 20.04 or RHEL 8 installs it) and an sdist; check the wheel's
# tag with auditwheel.
#
#   bash scripts/wheel.sh [--out DIR]     (default: dist/ in the checkout)
#
# The wheel is linked by zig (`maturin build --zig --compatibility manylinux2014`): zig
# links against glibc 2.17's symbol versions whatever this machine's glibc is. zig comes
# from the `ziglang` package on PyPI (its binary sits in the package's folder, which goes
# first on PATH); it and auditwheel are installed into .venv here on first use.
#
# Cargo builds the wheel's target (x86_64-unknown-linux-gnu, named explicitly by maturin
# for zig) under target/x86_64-unknown-linux-gnu/, beside `make build`'s target/release/:
# each build is incremental on its own, and a rerun with no source change only repackages.
set -euo pipefail

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cd "$ROOT"
OUT=$ROOT/dist
while (($#)); do
    case "$1" in
        --out) OUT=$(mkdir -p "$2" && cd "$2" && pwd); shift 2 ;;
        *) echo "usage: $0 [--out DIR]" >&2; exit 2 ;;
    esac
done
VENV=${VENV:-$ROOT/.venv}
PY=$VENV/bin/python
DIST_TOOLS=("ziglang==0.17.1" "auditwheel>=6.8,<7")   # 0.17.1 links the wheel here (checked)
export PIP_DISABLE_PIP_VERSION_CHECK=1

log() { printf '== wheel: %s\n' "$*"; }
fail() { printf 'error: %s\n' "$*" >&2; exit 1; }

VENV="$VENV" bash "$ROOT/scripts/venv.sh"
stamp="$VENV/.pyvhost-dist-tools"
want=$(printf '%s\n' "${DIST_TOOLS[@]}")
if [[ ! -f "$stamp" || "$(cat "$stamp")" != "$want" ]]; then
    log "installing ${DIST_TOOLS[*]} into $VENV"
    "$PY" -m pip install -q "${DIST_TOOLS[@]}" || fail "pip could not install ${DIST_TOOLS[*]}"
    printf '%s\n' "$want" >"$stamp"
fi
ZIG_DIR=$("$PY" -c 'import os, ziglang; print(os.path.dirname(ziglang.__file__))')
[[ -x "$ZIG_DIR/zig" ]] || fail "the ziglang package has no zig binary in $ZIG_DIR"
export PATH="$ZIG_DIR:$PATH"

mkdir -p "$OUT"
rm -f "$OUT"/pyvhost-*.whl "$OUT"/pyvhost-*.tar.gz
start=$SECONDS
log "maturin build --release --zig --compatibility manylinux2014 (zig $(zig version))"
VIRTUAL_ENV="$VENV" PYO3_PYTHON="$PY" "$VENV/bin/maturin" build --release --zig \
    --compatibility manylinux2014 --interpreter "$PY" --out "$OUT"
log "wheel built in $((SECONDS - start)) s"
VIRTUAL_ENV="$VENV" "$VENV/bin/maturin" sdist --out "$OUT"

# --- the wheel's tags ------------------------------------------------------------
shopt -s nullglob
wheels=("$OUT"/pyvhost-*.whl)
((${#wheels[@]} == 1)) || fail "expected one wheel in $OUT, found ${#wheels[@]}: ${wheels[*]}"
whl=${wheels[0]}
name=$(basename "$whl")
[[ "$name" == *-abi3-* ]] || fail "$name: not an abi3 wheel"
[[ "$name" == *manylinux_2_17_x86_64* ]] || fail "$name: not tagged manylinux_2_17_x86_64"
# auditwheel reads the extension's symbol versions: the tag the wheel really satisfies.
report=$("$VENV/bin/auditwheel" show "$whl" 2>&1) || fail "auditwheel show $name: $report"
tag=$(tr '\n' ' ' <<<"$report" | sed -n 's/.*consistent with the following platform tag: *"\([^"]*\)".*/\1/p')
glibc=${tag#manylinux_}
glibc=${glibc%_x86_64}
[[ "$tag" == manylinux_2_*_x86_64 && "${glibc#2_}" -le 17 ]] ||
    fail "auditwheel show $name: consistent with '${tag:-nothing}', not manylinux_2_17 or older"
log "auditwheel: $name is consistent with $tag"
sdists=("$OUT"/pyvhost-*.tar.gz)
((${#sdists[@]} == 1)) || fail "expected one sdist in $OUT, found ${#sdists[@]}"
log "built $whl"
log "built ${sdists[0]}"
