#!/usr/bin/env bash
# Install everything pyvhost's build and tests need, then build the extension.
#
#   bash scripts/setup.sh [--no-build]
#
# Idempotent and quick when already done:
#   0. scripts/venv.sh, the light half that `make demo` runs alone: checks the Python and
#      Rust versions (one line and exit 1 if one is missing or too old), makes .venv with
#      maturin in it.
#   1. Debian packages (as root, only if missing): QEMU, all of it from
#      bookworm-backports (qemu-utils 10.x from there is preinstalled on the
#      project's machines, and apt will not mix it with bookworm's 7.2), plus
#      libseccomp-dev, libcap-ng-dev and gcc for the virtiofsd build.
#   2. virtiofsd (Rust, crates.io) into ~/.cache/pyvhost/virtiofsd, only if its
#      binary is missing. It is a test peer only; none of its code is committed.
#   2c. cargo-fuzz (crates.io) into ~/.cache/pyvhost/cargo-fuzz, only if missing: the
#      driver of scripts/fuzz.sh, which `make test` runs (the nightly toolchain it
#      uses is preinstalled on the project's machines).
#   2d. rust-vmm's vhost-device-rng (crates.io) into ~/.cache/pyvhost/vhost-device-rng,
#      only if missing: a peer of `vhost check`'s tests (tests/test_check.py).
#   2e. rust-vmm's vhost-device-vsock (crates.io) into ~/.cache/pyvhost/vhost-device-vsock,
#      only if missing: the vsock back-end of vhost.testing's tests (tests/test_testing.py).
#   3. .venv in the checkout with the Python dev tools.
#   4. `maturin develop --release` into .venv (skipped with --no-build).
# Peers are installed before the build, so a broken build still leaves them.
set -euo pipefail

VIRTIOFSD_VERSION=1.14.0   # builds with rustc 1.95 (checked); bump deliberately
CARGO_FUZZ_VERSION=0.13.2  # builds with rustc 1.95 in about a minute (checked)
VHOST_DEVICE_RNG_VERSION=0.1.0  # what `cargo install --locked` took here; builds with rustc 1.95
VHOST_DEVICE_VSOCK_VERSION=0.3.0  # newest on crates.io; builds with rustc 1.95 (checked)
PY_DEV_TOOLS=(
    "maturin>=1.7,<2"
    "pytest>=8"
    "pytest-timeout>=2.3"
    "mypy>=1.10"
    "ruff>=0.5"
    "hypothesis>=6"
    # The documentation site (`make docs`, mkdocs.yml), pinned: a new release can add
    # warnings, and the build treats every warning as an error.
    "mkdocs==1.6.1" "mkdocstrings==1.0.8" "mkdocstrings-python==2.0.11"
    "mkdocs-autorefs==1.4.5" "griffelib==2.4.1" "mkdocs-material==9.8.1"
    "pymdown-extensions==13.1.2"
    "uvloop>=0.19"   # tests/test_aio.py runs the orchestrator on uvloop too
)
APT_PACKAGES=(qemu-system-x86 qemu-utils libseccomp-dev libcap-ng-dev gcc
    busybox-static cpio kmod xz-utils iproute2   # 2nd line: the test guest (build_guest.sh)
    dpdk-dev)   # testpmd: the DPDK vhost-user net back-end tests/test_probe_dpdk.py probes

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cd "$ROOT"
BUILD=1
for arg in "$@"; do
    case "$arg" in
        --no-build) BUILD=0 ;;
        *) echo "usage: $0 [--no-build]" >&2; exit 2 ;;
    esac
done

log() { printf '== setup: %s\n' "$*"; }
export DEBIAN_FRONTEND=noninteractive

# --- 0. Python, Rust, .venv ---------------------------------------------------------
VENV="$ROOT/.venv" bash "$ROOT/scripts/venv.sh"

# --- 1. Debian packages ---------------------------------------------------------
missing_apt=()
for p in "${APT_PACKAGES[@]}"; do
    if ! dpkg-query -W -f='${db:Status-Status}' "$p" 2>/dev/null | grep -qx installed; then
        missing_apt+=("$p")
    fi
done
for b in qemu-system-x86_64 qemu-storage-daemon; do
    command -v "$b" >/dev/null || missing_apt+=(qemu-system-x86)
done

ensure_backports_source() {
    if grep -rqs 'bookworm-backports' /etc/apt/sources.list /etc/apt/sources.list.d/; then
        return
    fi
    # Same mirror and keyring as the existing Debian source.
    local uris="" key=""
    if [[ -f /etc/apt/sources.list.d/debian.sources ]]; then
        uris=$(awk '/^URIs:/ && $2 ~ /debian\/?$/ {print $2; exit}' /etc/apt/sources.list.d/debian.sources)
        key=$(awk '/^Signed-By:/ {print $2; exit}' /etc/apt/sources.list.d/debian.sources)
    fi
    if [[ -z "$uris" && -f /etc/apt/sources.list ]]; then
        uris=$(awk '$1 == "deb" && $0 ~ / bookworm / {for (i = 2; i <= NF; i++) if ($i ~ /^(https?|file):/) {print $i; exit}}' /etc/apt/sources.list)
    fi
    : "${uris:=http://deb.debian.org/debian}"
    : "${key:=/usr/share/keyrings/debian-archive-keyring.gpg}"
    log "adding bookworm-backports source ($uris)"
    cat > /etc/apt/sources.list.d/backports.sources <<EOF
Types: deb
URIs: $uris
Suites: bookworm-backports
Components: main
Signed-By: $key
EOF
}

if ((${#missing_apt[@]})); then
    if [[ $(id -u) -eq 0 ]]; then
        log "installing Debian packages (missing: ${missing_apt[*]})"
        ensure_backports_source
        apt-get update -q
        apt-get install -y -q -t bookworm-backports "${APT_PACKAGES[@]}"
    else
        log "WARNING: missing Debian packages ${missing_apt[*]} and not root;" \
            "install them with: apt-get install -t bookworm-backports ${APT_PACKAGES[*]}"
    fi
fi

# --- 2. virtiofsd -----------------------------------------------------------------
VFSD_ROOT="$HOME/.cache/pyvhost/virtiofsd"
VFSD="$VFSD_ROOT/bin/virtiofsd"
if [[ ! -x "$VFSD" ]]; then
    log "building virtiofsd $VIRTIOFSD_VERSION from crates.io (about a minute)"
    start=$SECONDS
    CARGO_TARGET_DIR="$HOME/.cache/pyvhost/virtiofsd-target" \
        cargo install --locked virtiofsd --version "$VIRTIOFSD_VERSION" --root "$VFSD_ROOT"
    rm -rf "$HOME/.cache/pyvhost/virtiofsd-target"
    log "virtiofsd built in $((SECONDS - start)) s"
fi

# --- 2b. test guest: 6.12 kernel + busybox initramfs (vhost.testing) ------------
# scripts/build_guest.sh runs the package's builder (python/vhost/testing/build_image.sh),
# which does nothing when ~/.cache/pyvhost/guest/image-HASH/STAMP matches (HASH: the
# builder's); otherwise it downloads the bookworm-backports kernel .deb (kept in the
# cache's deb/) and builds (~20 s). vhost.testing would build it on first use anyway.
if [[ $(id -u) -eq 0 ]]; then
    ensure_backports_source   # no-op when present; build_guest.sh runs apt-get update if needed
fi
if ! bash "$ROOT/scripts/build_guest.sh"; then
    log "ERROR: scripts/build_guest.sh failed: guest tests will fail until it succeeds"
    exit 1
fi

# --- 2c. cargo-fuzz -----------------------------------------------------------------
FUZZ_ROOT="$HOME/.cache/pyvhost/cargo-fuzz"
if [[ "$("$FUZZ_ROOT/bin/cargo-fuzz" --version 2>/dev/null)" != "cargo-fuzz $CARGO_FUZZ_VERSION" ]]; then
    log "building cargo-fuzz $CARGO_FUZZ_VERSION from crates.io (about a minute)"
    start=$SECONDS
    CARGO_TARGET_DIR="$HOME/.cache/pyvhost/cargo-fuzz-target" \
        cargo install --locked --force cargo-fuzz --version "$CARGO_FUZZ_VERSION" --root "$FUZZ_ROOT"
    rm -rf "$HOME/.cache/pyvhost/cargo-fuzz-target"
    log "cargo-fuzz built in $((SECONDS - start)) s"
fi
if ! rustup toolchain list 2>/dev/null | grep -q '^nightly'; then
    log "WARNING: no nightly toolchain: scripts/fuzz.sh needs one (rustup toolchain install nightly)"
fi

# --- 2d. vhost-device-rng (rust-vmm) ---------------------------------------------
RNG_ROOT="$HOME/.cache/pyvhost/vhost-device-rng"
if [[ ! -x "$RNG_ROOT/bin/vhost-device-rng" ]]; then
    log "building vhost-device-rng $VHOST_DEVICE_RNG_VERSION from crates.io (a few minutes)"
    start=$SECONDS
    CARGO_TARGET_DIR="$HOME/.cache/pyvhost/vhost-device-rng-target" \
        cargo install --locked vhost-device-rng --version "$VHOST_DEVICE_RNG_VERSION" \
        --root "$RNG_ROOT"
    rm -rf "$HOME/.cache/pyvhost/vhost-device-rng-target"
    log "vhost-device-rng built in $((SECONDS - start)) s"
fi

# --- 2e. vhost-device-vsock (rust-vmm) -------------------------------------------
VSOCK_ROOT="$HOME/.cache/pyvhost/vhost-device-vsock"
if [[ ! -x "$VSOCK_ROOT/bin/vhost-device-vsock" ]]; then
    log "building vhost-device-vsock $VHOST_DEVICE_VSOCK_VERSION from crates.io (a few minutes)"
    start=$SECONDS
    CARGO_TARGET_DIR="$HOME/.cache/pyvhost/vhost-device-vsock-target" \
        cargo install --locked vhost-device-vsock --version "$VHOST_DEVICE_VSOCK_VERSION" \
        --root "$VSOCK_ROOT"
    rm -rf "$HOME/.cache/pyvhost/vhost-device-vsock-target"
    log "vhost-device-vsock built in $((SECONDS - start)) s"
fi

# --- 3. Python virtual environment ---------------------------------------------
VENV="$ROOT/.venv"   # made by scripts/venv.sh (step 0)
# A stamp of the tool list keeps reruns from touching pip at all.
stamp="$VENV/.pyvhost-dev-tools"
want=$(printf '%s\n' "${PY_DEV_TOOLS[@]}")
if [[ ! -f "$stamp" || "$(cat "$stamp")" != "$want" ]]; then
    log "installing dev tools into .venv"
    "$VENV/bin/python" -m pip install -q "${PY_DEV_TOOLS[@]}"
    printf '%s\n' "$want" > "$stamp"
fi

# --- 4. the extension -----------------------------------------------------------
build_rc=0
if ((BUILD)); then
    log "maturin develop --release"
    if ! VIRTUAL_ENV="$VENV" PYO3_PYTHON="$VENV/bin/python" "$VENV/bin/maturin" develop -r; then
        build_rc=1
        log "ERROR: maturin develop failed (peers and tools are installed)"
    fi
fi

# --- versions -------------------------------------------------------------------
ver() { "$@" --version 2>&1 | head -n1 || echo "$1: not runnable"; }
log "versions:"
echo "  $(ver qemu-system-x86_64)"
echo "  qemu-storage-daemon: $(ver qemu-storage-daemon)"
echo "  $(ver "$VFSD") [$VFSD]"
echo "  $(ver "$FUZZ_ROOT/bin/cargo-fuzz") [$FUZZ_ROOT]"
echo "  $(ver "$VENV/bin/python") [.venv]"
exit "$build_rc"
