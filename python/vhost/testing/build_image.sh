#!/usr/bin/env bash
# Build the Linux guest that vhost.testing boots under QEMU (part of the pyvhost package;
# vhost.testing runs it on first use, scripts/build_guest.sh and `python -m vhost.testing
# image` run it by hand):
#
#   bash build_image.sh [--force]
#
# Outputs, in ${PYVHOST_GUEST_DIR:-~/.cache/pyvhost/guest}/image-HASH, HASH being the
# first 16 hex digits of this script's SHA-256 (so checkouts of different versions
# share the cache without rebuilding over each other's image):
#   vmlinuz    Debian's bookworm-backports 6.12 kernel (it has vhost_net, vhost_vsock,
#              vhost_vdpa and vduse as modules; bookworm's 6.1 has no vDPA at all)
#   initrd.gz  busybox-static, the modules below with their dependencies, and /init
#   KVER       the kernel release (uname -r in the guest)
#   STAMP      hash of this script + the kernel package version
# Nothing is done when STAMP matches (the script's hash is in it, so editing the
# module list or /init builds a new image). The kernel .deb is kept in the cache's
# deb/ for rebuilds.
#
# Needs: apt (bookworm-backports in the sources: scripts/setup.sh adds it), dpkg,
# busybox-static, cpio, kmod (depmod/modprobe), xz-utils, gzip.
set -euo pipefail

# Modules loaded at boot, in this order; dependencies come from modules.dep.
# virtio_vdpa is deliberately absent: a vDPA device must bind to vhost_vdpa.
MODULES=(
    netfs 9pnet 9pnet_virtio 9p
    virtio_blk virtio_net virtio_rng
    fuse virtiofs
    tun
    vhost_iotlb vhost vhost_net
    vsock vmw_vsock_virtio_transport vhost_vsock
    vdpa vhost_vdpa vduse
)

CACHE=${PYVHOST_GUEST_DIR:-$HOME/.cache/pyvhost/guest}
FORCE=0
for arg in "$@"; do
    case "$arg" in
        --force) FORCE=1 ;;
        *) echo "usage: $0 [--force]" >&2; exit 2 ;;
    esac
done

log() { printf '== build_guest: %s\n' "$*"; }
die() { printf '== build_guest: ERROR: %s\n' "$*" >&2; exit 1; }

SELF_HASH=$(sha256sum "${BASH_SOURCE[0]}" | cut -d' ' -f1)
OUT=$CACHE/image-${SELF_HASH:0:16}

up_to_date() {
    [[ -s "$OUT/vmlinuz" && -s "$OUT/initrd.gz" && -s "$OUT/KVER" && -f "$OUT/STAMP" ]] &&
        [[ "$(head -n1 "$OUT/STAMP")" == "script $SELF_HASH" ]]
}

if ((!FORCE)) && up_to_date; then
    log "up to date: $OUT ($(cat "$OUT/KVER"))"
    exit 0
fi

# Which Debian package brings each tool (the message names what to install).
declare -A TOOL_PACKAGE=([apt-cache]=apt [apt-get]=apt [dpkg-deb]=dpkg [depmod]=kmod
    [modprobe]=kmod [busybox]=busybox-static [cpio]=cpio [xz]=xz-utils [gzip]=gzip)
for tool in apt-cache apt-get dpkg-deb depmod modprobe busybox cpio xz gzip; do
    command -v "$tool" >/dev/null ||
        die "$tool not found on \$PATH: install the Debian package ${TOOL_PACKAGE[$tool]}" \
            "(apt-get install busybox-static cpio kmod xz-utils); the guest is built from" \
            "Debian's kernel package, so apt and dpkg are needed too"
done
# busybox must be the static one: it runs inside the initramfs with no libc.
BUSYBOX=/bin/busybox
[[ -x "$BUSYBOX" ]] || BUSYBOX=$(command -v busybox)
if LC_ALL=C ldd "$BUSYBOX" 2>&1 | grep -q '=>'; then
    die "$BUSYBOX is dynamically linked: apt-get install busybox-static"
fi

# --- 1. which 6.12 kernel package -----------------------------------------------
find_meta_version() {
    apt-cache madison linux-image-amd64 2>/dev/null |
        awk -F'|' '{gsub(/ /, "", $2); if ($2 ~ /^6\.12\./) print $2}' |
        sort -V | tail -n1
}
META_VERSION=$(find_meta_version)
if [[ -z "$META_VERSION" ]]; then
    if [[ $(id -u) -ne 0 ]]; then
        die "the guest kernel package (Debian's linux-image-amd64 6.12, from bookworm-backports)" \
            "is not in apt's lists: add bookworm-backports to the apt sources and run" \
            "apt-get update as root (scripts/setup.sh does both)"
    fi
    log "no 6.12 linux-image-amd64 known to apt; apt-get update"
    apt-get update -q
    META_VERSION=$(find_meta_version)
    [[ -n "$META_VERSION" ]] ||
        die "still no 6.12 linux-image-amd64: is bookworm-backports in /etc/apt/sources.list.d? (scripts/setup.sh adds it)"
fi
PKG=$(apt-cache depends "linux-image-amd64=$META_VERSION" |
    awk '$1 == "Depends:" && $2 ~ /^linux-image-6\.12\./ {print $2; exit}')
[[ -n "$PKG" ]] || die "cannot find the kernel package linux-image-amd64=$META_VERSION depends on"
log "kernel package: $PKG (linux-image-amd64 $META_VERSION)"

# --- 2. download (kept between builds) ---------------------------------------------
mkdir -p "$CACHE/deb"
DEB=$(find "$CACHE/deb" -maxdepth 1 -name "${PKG}_*.deb" | sort -V | tail -n1)
if [[ -z "$DEB" ]]; then
    log "apt-get download $PKG"
    sandbox=()
    [[ $(id -u) -eq 0 ]] && sandbox=(-o APT::Sandbox::User=root)
    (cd "$CACHE/deb" && apt-get download -q "${sandbox[@]}" "$PKG")
    DEB=$(find "$CACHE/deb" -maxdepth 1 -name "${PKG}_*.deb" | sort -V | tail -n1)
    [[ -n "$DEB" ]] || die "apt-get download $PKG left no .deb in $CACHE/deb"
    # Only the newest kernel is worth keeping.
    find "$CACHE/deb" -maxdepth 1 -name '*.deb' ! -path "$DEB" -print -delete
fi
PKG_VERSION=$(dpkg-deb -f "$DEB" Version)
log "using $(basename "$DEB")"

WORK=$(mktemp -d "${TMPDIR:-/tmp}/pyvhost-guest.XXXXXX")
trap 'rm -rf "$WORK"' EXIT

# --- 3. kernel and modules ----------------------------------------------------------
log "extracting the kernel package"
dpkg-deb -x "$DEB" "$WORK/pkg"
KVER=$(ls "$WORK/pkg/lib/modules")
[[ $(wc -w <<<"$KVER") -eq 1 ]] || die "expected one kernel release in the package, got: $KVER"
[[ -f "$WORK/pkg/boot/vmlinuz-$KVER" ]] || die "no boot/vmlinuz-$KVER in $DEB"
log "kernel release $KVER; depmod over the whole tree (about 10 s)"
depmod -b "$WORK/pkg" "$KVER"

ROOT="$WORK/initramfs"
MODDIR="lib/modules/$KVER"
mkdir -p "$ROOT/$MODDIR"
# Every module to load plus its dependencies, in load order, without repeats.
declare -A seen=()
ordered=()
for m in "${MODULES[@]}"; do
    deps=$(modprobe -d "$WORK/pkg" -S "$KVER" --show-depends "$m") ||
        die "module $m: not found in $KVER"
    while read -r verb path _; do
        case "$verb" in
            insmod) ;;
            builtin) continue ;;
            *) die "module $m: unexpected modprobe output: $verb $path" ;;
        esac
        rel=${path#"$WORK/pkg/"}
        [[ -n "${seen[$rel]:-}" ]] && continue
        seen[$rel]=1
        ordered+=("$rel")
    done <<<"$deps"
done
log "${#ordered[@]} modules (${MODULES[*]} and their dependencies)"
for rel in "${ordered[@]}"; do
    dest="$ROOT/${rel%.xz}"
    mkdir -p "$(dirname "$dest")"
    case "$rel" in
        *.ko.xz) xz -dc "$WORK/pkg/$rel" >"$dest" ;;
        *.ko) cp "$WORK/pkg/$rel" "$dest" ;;
        *) die "unexpected module file $rel" ;;
    esac
    printf '%s\n' "${rel#"$MODDIR/"}" | sed 's/\.xz$//' >>"$ROOT/$MODDIR/modules.order"
done
cp "$WORK/pkg/$MODDIR/modules.builtin" "$WORK/pkg/$MODDIR/modules.builtin.modinfo" "$ROOT/$MODDIR/"
depmod -b "$ROOT" "$KVER"
printf '%s\n' "${MODULES[@]}" >"$WORK/modules.list"

# --- 4. busybox and /init ---------------------------------------------------------------
log "initramfs: busybox $("$BUSYBOX" | head -n1 | awk '{print $2}'), /init"
mkdir -p "$ROOT"/{bin,sbin,usr/bin,usr/sbin,etc,proc,sys,dev,host,tmp,run,mnt,root,var/tmp}
cp "$BUSYBOX" "$ROOT/bin/busybox"
"$BUSYBOX" --list-full | while read -r applet; do
    [[ -e "$ROOT/$applet" ]] || ln -s /bin/busybox "$ROOT/$applet"
done
cp "$WORK/modules.list" "$ROOT/etc/pyvhost-modules"
printf '%s\n' "$KVER" >"$ROOT/etc/pyvhost-kver"

cat >"$ROOT/init" <<'INIT'
#!/bin/sh
# pyvhost guest /init (written by vhost/testing/build_image.sh; driven by vhost.testing).
# Kernel command line:
#   pyvhost.mode=busybox|host  busybox: run commands in this initramfs;
#                               host: chroot into the host's root (9p, read-only)
#   pyvhost.run=DIR            host directory shared read-write as 9p tag "pvrun" and
#                               mounted at the same path DIR; commands run there
#   pyvhost.agent=1            run commands sent on /dev/ttyS1 (see below) instead of
#                               DIR/script.sh, until "exit" arrives
#   pyvhost.keep=DIR           host mode: a host directory (the checkout) that must stay
#                               visible even when it lies under /tmp or /run, which the
#                               guest covers with its own tmpfs
# Command channel (agent): the host writes DIR/cmd-N.sh, then the line "N" on ttyS1;
# the guest runs it with stdout in DIR/out-N, stderr in DIR/err-N, writes its exit
# status in DIR/status-N and answers "done N" on ttyS1.
# Markers on the console (vhost.testing parses them):
#   PYVHOST-GUEST-START mode=M [agent]         ready: script about to run / commands accepted
#   PYVHOST-GUEST-END status=N                 script (or agent) finished with exit status N
#   PYVHOST-GUEST-SETUP-FAILED: WHY            the guest could not run the script
export PATH=/sbin:/bin:/usr/sbin:/usr/bin
mount -t proc proc /proc
mount -t sysfs sysfs /sys
mount -t devtmpfs devtmpfs /dev
exec </dev/console >/dev/console 2>&1

fail() {
    printf '\n'
    echo "PYVHOST-GUEST-SETUP-FAILED: $*"
    poweroff -f
    sleep 10
}

for m in $(cat /etc/pyvhost-modules); do
    modprobe "$m" || echo "pyvhost-guest: modprobe $m failed"
done

MODE=busybox
RUN=
KEEP=
AGENT=0
for arg in $(cat /proc/cmdline); do
    case "$arg" in
        pyvhost.mode=*) MODE=${arg#*=} ;;
        pyvhost.run=*) RUN=${arg#*=} ;;
        pyvhost.keep=*) KEEP=${arg#*=} ;;
        pyvhost.agent=*) AGENT=${arg#*=} ;;
    esac
done
[ -n "$RUN" ] || fail "no pyvhost.run= on the kernel command line"

P9="trans=virtio,version=9p2000.L,msize=512000"
mount -t 9p -o "$P9,ro,cache=loose" hostroot /host || fail "cannot mount the host root (9p tag hostroot)"

case "$MODE" in
    busybox)
        mkdir -p /dev/pts /dev/shm
        mount -t devpts devpts /dev/pts
        mount -t tmpfs tmpfs /dev/shm
        mount -t tmpfs tmpfs /tmp
        mkdir -p "$RUN"
        mount -t 9p -o "$P9" pvrun "$RUN" || fail "cannot mount $RUN (9p tag pvrun)"
        RUNP=$RUN
        ;;
    host)
        H=/host
        mount -t proc proc $H/proc || fail "mount proc in $H"
        mount -t sysfs sysfs $H/sys || fail "mount sysfs in $H"
        mount -t devtmpfs devtmpfs $H/dev || fail "mount devtmpfs in $H"
        mkdir -p $H/dev/pts $H/dev/shm
        mount -t devpts devpts $H/dev/pts || fail "mount devpts in $H"
        mount -t tmpfs tmpfs $H/dev/shm || fail "mount /dev/shm in $H"
        if [ -n "$KEEP" ]; then
            mkdir -p /keep
            mount -o bind "$H$KEEP" /keep || fail "cannot hold $KEEP"
        fi
        mount -t tmpfs tmpfs $H/tmp || fail "mount /tmp in $H"
        mount -t tmpfs tmpfs $H/run || fail "mount /run in $H"
        # A checkout under /tmp or /run is hidden by the tmpfs just mounted: put it back.
        if [ -n "$KEEP" ] && [ ! -d "$H$KEEP" ]; then
            mkdir -p "$H$KEEP" && mount -o bind /keep "$H$KEEP" || fail "cannot restore $KEEP"
        fi
        [ -d "$H$RUN" ] || mkdir -p "$H$RUN" || fail "no directory $RUN in the host root"
        mount -t 9p -o "$P9" pvrun "$H$RUN" || fail "cannot mount $RUN (9p tag pvrun)"
        RUNP=$H$RUN
        ;;
    *)
        fail "unknown pyvhost.mode=$MODE"
        ;;
esac

# run_script NAME: run $RUN/NAME with /bin/sh in $RUN, in the initramfs or the host root.
run_script() {
    if [ "$MODE" = host ]; then
        env -i PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin \
            HOME=/root TERM=dumb LANG=C.UTF-8 PYTHONDONTWRITEBYTECODE=1 \
            PYVHOST_GUEST=host PYVHOST_RUN_DIR="$RUN" \
            chroot /host /bin/sh -c 'cd "$1" && exec /bin/sh "./$2"' sh "$RUN" "$1"
    else
        (cd "$RUN" && PYVHOST_GUEST=busybox PYVHOST_RUN_DIR="$RUN" HOME=/root sh "./$1")
    fi
}

if [ "$AGENT" = 1 ]; then
    exec 3<>/dev/ttyS1 || fail "cannot open /dev/ttyS1 (the command channel)"
    stty raw -echo <&3 || fail "cannot make /dev/ttyS1 raw"
    printf '\nPYVHOST-GUEST-START mode=%s agent\n' "$MODE"
    status=0
    while read -r n <&3; do
        case "$n" in
            exit) break ;;
            ''|*[!0-9]*) echo "pyvhost-guest: ignored '$n' on the command channel"; continue ;;
        esac
        run_script "cmd-$n.sh" </dev/null >"$RUNP/out-$n" 2>"$RUNP/err-$n"
        echo "$?" >"$RUNP/status-$n"
        echo "pyvhost-guest: command $n exited with status $(cat "$RUNP/status-$n")"
        printf 'done %s\n' "$n" >&3
    done
else
    printf '\nPYVHOST-GUEST-START mode=%s\n' "$MODE"
    run_script script.sh
    status=$?
fi
sync
printf '\nPYVHOST-GUEST-END status=%s\n' "$status"
poweroff -f
sleep 10
INIT
chmod 755 "$ROOT/init"

# --- 5. pack ---------------------------------------------------------------------------
mkdir -p "$OUT"
(cd "$ROOT" && find . -print0 | LC_ALL=C sort -z | cpio --null -o -H newc --quiet) |
    gzip -9n >"$WORK/initrd.gz"
cp "$WORK/pkg/boot/vmlinuz-$KVER" "$WORK/vmlinuz"
mv -f "$WORK/vmlinuz" "$OUT/vmlinuz"
mv -f "$WORK/initrd.gz" "$OUT/initrd.gz"
printf '%s\n' "$KVER" >"$OUT/KVER"
printf 'script %s\npackage %s %s\n' "$SELF_HASH" "$PKG" "$PKG_VERSION" >"$OUT/STAMP"
log "wrote $OUT/vmlinuz ($(du -h "$OUT/vmlinuz" | cut -f1)), $OUT/initrd.gz ($(du -h "$OUT/initrd.gz" | cut -f1)), KVER=$KVER"
log "modules: $(printf '%s\n' "${ordered[@]}" | xargs -n1 basename | sed 's/\.ko.*//' | tr '\n' ' ')"
