"""QEMU for the test guest: finding the binary, choosing KVM or TCG, and the command-line
arguments of vhost-user devices (:class:`Device`).
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import functools
import os
import select
import shutil
import subprocess
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Literal, get_args

from .errors import GuestSetupError
from .image import GuestImage, ensure_image

__all__ = [
    "QEMU_INSTALL_HINT",
    "Accel",
    "Device",
    "DeviceKind",
    "choose_accel",
    "find_qemu",
    "kvm_usable",
    "program_version",
    "qemu_escape",
    "qemu_version",
    "shared_memory_args",
]

Accel = Literal["auto", "kvm", "tcg"]
"""``auto`` is KVM when :func:`kvm_usable`, TCG (emulation) otherwise."""

DeviceKind = Literal["blk", "rng", "net", "fs", "vsock"]
"""The vhost-user device types :class:`Device` knows how to attach."""

QEMU_NAME = "qemu-system-x86_64"
"""The QEMU binary looked for on ``$PATH`` (the guest is x86-64)."""
QEMU_INSTALL_HINT = (
    "install QEMU (Debian/Ubuntu: apt-get install qemu-system-x86; Fedora: dnf install "
    "qemu-system-x86-core) or name the binary with $PYVHOST_QEMU"
)
"""How to get QEMU, appended to the error when it is missing."""

_KVM_GET_API_VERSION = 0xAE00
_KVM_API_VERSION = 12
KVM_PROBE_TIMEOUT = 30.0
"""Seconds the KVM probe boot may take before KVM counts as unusable."""
STOP_TIMEOUT = 10.0


def find_qemu(qemu: str | os.PathLike[str] | None = None) -> Path:
    """The QEMU binary: ``qemu``, else ``$PYVHOST_QEMU``, else ``qemu-system-x86_64`` on
    ``$PATH``. Raises :class:`GuestSetupError` naming what was looked for and how to
    install it."""
    configured = os.fspath(qemu) if qemu is not None else os.environ.get("PYVHOST_QEMU")
    if configured:
        path = Path(configured)
        found = shutil.which(configured) if path.parent == Path() else str(path)
        source = "qemu=" if qemu is not None else "$PYVHOST_QEMU="
        if found is None or not os.path.isfile(found) or not os.access(found, os.X_OK):
            raise GuestSetupError(
                f"QEMU binary {source}{configured} not found or not executable; "
                + QEMU_INSTALL_HINT
            )
        return Path(found)
    found = shutil.which(QEMU_NAME)
    if found is None:
        raise GuestSetupError(f"{QEMU_NAME} not found on $PATH; {QEMU_INSTALL_HINT}")
    return Path(found)


def program_version(path: Path) -> str:
    """First line of ``path --version`` (for reports and cache keys), or why it cannot be
    had: a report should name the version it ran against, never fail for want of it."""
    try:
        out = subprocess.run(
            [str(path), "--version"],
            capture_output=True,
            text=True,
            timeout=10,
            check=False,
            stdin=subprocess.DEVNULL,
        )
    except (OSError, subprocess.TimeoutExpired) as exc:
        return f"{path}: cannot run ({exc})"
    lines = (out.stdout or out.stderr).strip().splitlines()
    return lines[0] if lines else f"{path}: no version output (exit {out.returncode})"


@functools.cache
def qemu_version(qemu: Path) -> str:
    """:func:`program_version` of a QEMU binary, asked once per binary."""
    return program_version(qemu)


def _kvm_device_ok(path: str) -> bool:
    try:
        fd = os.open(path, os.O_RDWR | os.O_CLOEXEC)
    except OSError:
        return False
    try:
        return fcntl.ioctl(fd, _KVM_GET_API_VERSION) == _KVM_API_VERSION
    except OSError as exc:
        if exc.errno in (errno.ENOTTY, errno.EINVAL, errno.EPERM, errno.EACCES):
            return False
        raise
    finally:
        os.close(fd)


def _boot_id() -> str:
    try:
        return Path("/proc/sys/kernel/random/boot_id").read_text().strip()
    except OSError:
        return "unknown"


def _probe_boots(argv: list[str]) -> bool:
    """Run the probe QEMU: True when it powers off cleanly; False as soon as it reports
    a KVM internal error (it would pause there), exits otherwise, or times out."""
    with subprocess.Popen(
        argv, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.STDOUT
    ) as proc:
        assert proc.stdout is not None
        output = b""
        deadline = time.monotonic() + KVM_PROBE_TIMEOUT
        try:
            while time.monotonic() < deadline:
                ready, _, _ = select.select([proc.stdout], [], [], 0.2)
                chunk = os.read(proc.stdout.fileno(), 65536) if ready else b""
                output += chunk
                if b"KVM internal error" in output:
                    return False
                if ready and not chunk:  # end of output: QEMU exited
                    return proc.wait(STOP_TIMEOUT) == 0
            return False
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait()


@functools.cache
def _kvm_boots(qemu: Path, image: GuestImage) -> bool:
    # Nested or emulated KVM may open fine and still fail on the first unusual
    # instruction ("KVM internal error ... emulation failure", QEMU then pauses), or
    # refuse the CPU model's MSRs: only booting the guest's own kernel tells. The answer
    # is cached beside the image, per QEMU, kernel and host boot.
    key = f"{qemu_version(qemu)}|{qemu}|{image.kver}|{_boot_id()}|{os.getuid()}"
    cache = image.vmlinuz.parent / "kvm-probe"
    with contextlib.suppress(OSError, ValueError):
        cached_key, answer = cache.read_text().rsplit("\n", 1)
        if cached_key == key:
            return answer == "yes"
    argv = [
        str(qemu), "-accel", "kvm", "-m", "256", "-nographic", "-nodefaults", "-no-reboot",
        "-serial", "stdio", "-kernel", str(image.vmlinuz), "-initrd", str(image.initrd),
        "-append", "console=ttyS0 quiet panic=-1 rdinit=/bin/poweroff -- -f",
    ]  # fmt: skip
    ok = _probe_boots(argv)
    with contextlib.suppress(OSError):
        cache.write_text(f"{key}\n{'yes' if ok else 'no'}")
    return ok


def kvm_usable(
    qemu: str | os.PathLike[str] | None = None,
    image: GuestImage | None = None,
    device: str = "/dev/kvm",
) -> bool:
    """True when KVM really runs the guest: ``device`` opens read-write, answers API
    version 12, and QEMU boots the guest kernel under KVM to power-off (a probe of a
    few seconds, done once per QEMU, kernel and host boot and cached with the image)."""
    if not _kvm_device_ok(device):
        return False
    return _kvm_boots(find_qemu(qemu), image or ensure_image())


def choose_accel(
    accel: Accel | None = None,
    *,
    qemu: str | os.PathLike[str] | None = None,
    image: GuestImage | None = None,
) -> Literal["kvm", "tcg"]:
    """Resolve ``accel`` (default ``$PYVHOST_ACCEL``, else ``auto``) to ``kvm`` or ``tcg``.

    ``auto`` is ``kvm`` when :func:`kvm_usable`; an explicit ``kvm`` is used as asked."""
    chosen = accel or os.environ.get("PYVHOST_ACCEL") or "auto"
    if chosen not in get_args(Accel):
        raise GuestSetupError(f"accel must be one of auto, kvm, tcg, not {chosen!r}")
    if chosen == "auto":
        return "kvm" if kvm_usable(qemu, image) else "tcg"
    return "kvm" if chosen == "kvm" else "tcg"


def qemu_escape(value: str | os.PathLike[str]) -> str:
    """A value inside a QEMU ``key=value,...`` option (commas doubled)."""
    return os.fspath(value).replace(",", ",,")


def shared_memory_args(memory_mb: int) -> list[str]:
    """QEMU's RAM from a shared memfd, which vhost-user back-ends map."""
    return [
        "-M",
        "q35,memory-backend=mem",
        "-m",
        f"{memory_mb}M",
        "-object",
        f"memory-backend-memfd,id=mem,size={memory_mb}M,share=on",
    ]


@dataclass(frozen=True)
class Device:
    """A vhost-user device for the guest: a back-end listening on ``socket``, shown to
    the guest as a virtio PCI device of type ``kind``.

    * ``blk``: ``/dev/vda`` (``vdb``... for the next ones); ``queues`` is num-queues;
    * ``rng``: ``/dev/hwrng`` (the guest's ``virtio_rng``);
    * ``net``: an ``eth`` interface (``virtio_net``); ``queues`` queue pairs;
    * ``fs``: mount it with ``mount -t virtiofs TAG /mnt`` (``tag``);
    * ``vsock``: AF_VSOCK; the guest's CID is the back-end's (QEMU's
      ``vhost-user-vsock-pci`` reads it from the back-end's config space and has no
      property for it), e.g. vhost-device-vsock's ``--vm guest-cid=N,...``.

    ``reconnect`` makes QEMU reconnect to a back-end that restarts. ``properties`` are
    appended to the ``-device`` option as they are (``"bootindex=1"``...).
    """

    kind: DeviceKind
    socket: str | os.PathLike[str]
    queues: int = 1
    reconnect: bool = False
    tag: str = "vhostfs"
    properties: str = ""

    def __post_init__(self) -> None:
        if self.kind not in get_args(DeviceKind):
            raise GuestSetupError(
                f"unknown device kind {self.kind!r}; one of {', '.join(get_args(DeviceKind))}"
            )
        if self.queues < 1:
            raise GuestSetupError(f"{self.kind} device on {self.socket}: queues must be >= 1")

    def qemu_args(self, index: int = 0) -> list[str]:
        """The ``-chardev``/``-netdev``/``-device`` arguments; ``index`` keeps the ids of
        several devices apart."""
        chardev_id = f"c{index}" if index else "c0"
        chardev = f"socket,id={chardev_id},path={qemu_escape(self.socket)}"
        if self.reconnect:
            chardev += ",reconnect-ms=200"
        extra = f",{self.properties}" if self.properties else ""
        args = ["-chardev", chardev]
        if self.kind == "blk":
            device = f"vhost-user-blk-pci,chardev={chardev_id},num-queues={self.queues}"
        elif self.kind == "rng":
            device = f"vhost-user-rng-pci,chardev={chardev_id}"
        elif self.kind == "net":
            netdev = f"n{index}"
            args += ["-netdev", f"vhost-user,id={netdev},chardev={chardev_id},queues={self.queues}"]
            device = f"virtio-net-pci,netdev={netdev}"
            if self.queues > 1:
                device += f",mq=on,vectors={2 * self.queues + 2}"
        elif self.kind == "fs":
            device = f"vhost-user-fs-pci,chardev={chardev_id},tag={qemu_escape(self.tag)}"
        else:
            device = f"vhost-user-vsock-pci,chardev={chardev_id}"
        return [*args, "-device", device + extra]


def devices_args(devices: Sequence[Device]) -> list[str]:
    """The QEMU arguments of several devices, with distinct ids."""
    return [arg for i, dev in enumerate(devices) for arg in dev.qemu_args(i)]
