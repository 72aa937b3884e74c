"""The package's own guest tests on the public rig, :mod:`vhost.testing`.

A thin layer: the guest (kernel, initramfs, QEMU command line, console, command channel)
is :mod:`vhost.testing`'s (docs/testing.md); this module fixes what the project's tests
share and adds what only they need:

* run dirs under ``target/guest-runs/`` of this checkout, and this checkout kept
  visible in ``mode="host"`` guests (``pyvhost.keep``), whose ``VENV_PYTHON`` is this
  checkout's ``.venv`` Python with the built extension;
* :class:`Guest` with :meth:`Guest.qmp`, a QMP client from ``tests/peers.py``;
* :func:`start_guest` / :func:`run_guest`: a guest that runs one shell script and powers
  off (``mode="host"`` by default, 1 GiB, 2 CPUs), as the older tests are written;
  newer tests boot a command-taking guest with :func:`vhost.testing.boot` or the
  ``vhost_guest`` fixture;
* :func:`vhost_user_blk_args`, the QEMU arguments README.md shows
  (``tests/test_readme.py`` checks that they are the same);
* :func:`viommu_blk_args` and :data:`VIOMMU_KERNEL_ARGS`: a vhost-user-blk device
  behind QEMU's emulated Intel IOMMU, as docs/iommu.md shows.

A missing QEMU or image fails the test (a :class:`vhost.testing.GuestSetupError`), never
skips it; ``scripts/setup.sh`` installs QEMU and builds the image.
"""

from __future__ import annotations

import functools
import os
from collections.abc import Mapping, Sequence
from pathlib import Path

import peers
from vhost import testing
from vhost.testing import GuestImage, GuestResult, Mode, image_dir, shared_memory_args
from vhost.testing.machine import SCRIPT_TIMEOUT, tail
from vhost.testing.qemu import qemu_escape

__all__ = [
    "CHECKOUT",
    "DEFAULT_TIMEOUT",
    "GUEST_DIR",
    "RUNS_DIR",
    "VENV_PYTHON",
    "VIOMMU_KERNEL_ARGS",
    "Guest",
    "GuestImage",
    "GuestResult",
    "Mode",
    "boot_args",
    "guest_image",
    "qemu_binary",
    "qemu_version",
    "run_guest",
    "shared_memory_args",
    "start_guest",
    "vhost_user_blk_args",
    "viommu_blk_args",
]

GUEST_DIR = image_dir()
CHECKOUT = Path(__file__).resolve().parent.parent
VENV_PYTHON = CHECKOUT / ".venv" / "bin" / "python"
RUNS_DIR = CHECKOUT / "target" / "guest-runs"
DEFAULT_TIMEOUT = SCRIPT_TIMEOUT

_tail = tail


class Guest(testing.Guest):
    """:class:`vhost.testing.Guest` with a QMP client of the tests' own."""

    def qmp(self, timeout: float = 30.0) -> peers.Qmp:
        """A new QMP connection to this QEMU (use it as a context manager)."""
        return peers.Qmp(self.qmp_path, timeout)


def guest_image() -> GuestImage:
    """The guest image (built on first use)."""
    return testing.ensure_image()


def qemu_binary() -> Path:
    """The QEMU binary the guests run."""
    return testing.find_qemu()


@functools.cache
def qemu_version() -> str:
    """First line of ``qemu-system-x86_64 --version`` (for reports)."""
    try:
        return testing.qemu_version(testing.find_qemu())
    except testing.GuestSetupError as exc:
        return str(exc)


def vhost_user_blk_args(
    socket: str | os.PathLike[str], *, queues: int = 1, reconnect: bool = False
) -> list[str]:
    """A vhost-user-blk device on the back-end at ``socket`` (README.md shows these)."""
    return testing.Device("blk", socket, queues=queues, reconnect=reconnect).qemu_args()


#: The guest kernel's side of :func:`viommu_blk_args`: the Intel IOMMU driver on, and
#: strict invalidation (each unmap is invalidated at once, so the back-end sees
#: invalidations and misses again; ``iommu=strict`` is not the option for that on 6.12:
#: the kernel stays in lazy mode).
VIOMMU_KERNEL_ARGS = ("intel_iommu=on", "iommu.strict=1")


def viommu_blk_args(socket: str | os.PathLike[str], *, iommu_platform: bool = True) -> list[str]:
    """A vhost-user-blk device on the back-end at ``socket`` behind QEMU's emulated
    Intel IOMMU (TCG needs nothing more): ``device-iotlb=on`` with the device's
    ``ats=on`` gives the device an IOTLB of its own, which the guest invalidates as it
    unmaps and QEMU passes on as ``IOTLB_MSG`` invalidations (issue 14's set-up); ATS
    needs a PCIe device, hence the root port (on the root bus the device is a plain PCI
    one, and legacy virtio, which refuses ``iommu_platform``). The IOMMU comes before
    the device, which takes its DMA address space when it is created.
    ``iommu_platform=False`` is the same machine with the device outside the IOMMU (a
    control)."""
    escaped = qemu_escape(socket)
    device = "vhost-user-blk-pci,bus=rp0,chardev=vblk0,num-queues=1"
    if iommu_platform:
        device += ",iommu_platform=on,ats=on"
    return [
        "-device",
        "intel-iommu,intremap=off,device-iotlb=on",
        "-device",
        "pcie-root-port,id=rp0,bus=pcie.0,chassis=1",
        "-chardev",
        f"socket,id=vblk0,path={escaped}",
        "-device",
        device,
    ]


def boot_args(
    *, initrd: Path, append: Sequence[str], memory_mb: int, smp: int, qmp_path: Path
) -> list[str]:
    """QEMU's command line for the guest kernel with ``initrd``, without any device (see
    :func:`vhost.testing.boot_args`); a migrating guest (``tests/migration.py``) cannot
    have 9p shares and brings its own initramfs segment."""
    return testing.boot_args(
        initrd=initrd, append=append, memory_mb=memory_mb, smp=smp, qmp_path=qmp_path
    )


def start_guest(
    script: str,
    *,
    mode: Mode = "host",
    qemu_args: Sequence[str] = (),
    memory_mb: int = 1024,
    smp: int = 2,
    files: Mapping[str, str | bytes] | None = None,
    run_dir: Path | None = None,
    kernel_args: Sequence[str] = (),
) -> Guest:
    """Boot the guest in the background; it runs ``script`` (``/bin/sh``) and powers off.

    Without ``run_dir`` the run dir is a fresh folder under ``target/guest-runs/``,
    removed when the :class:`Guest` closes.
    """
    RUNS_DIR.mkdir(parents=True, exist_ok=True)
    guest = testing.start_script(
        script,
        mode=mode,
        qemu_args=qemu_args,
        memory_mb=memory_mb,
        smp=smp,
        files=files,
        run_dir=run_dir,
        runs_parent=RUNS_DIR,
        kernel_args=kernel_args,
        keep=CHECKOUT,
        guest_class=Guest,
    )
    assert isinstance(guest, Guest)
    return guest


def run_guest(
    script: str,
    *,
    mode: Mode = "host",
    qemu_args: Sequence[str] = (),
    memory_mb: int = 1024,
    smp: int = 2,
    timeout: float = DEFAULT_TIMEOUT,
    files: Mapping[str, str | bytes] | None = None,
    run_dir: Path | None = None,
    kernel_args: Sequence[str] = (),
) -> GuestResult:
    """Boot the guest, run ``script`` in it, wait for power-off (at most ``timeout`` s).

    Does not raise on failure: call :meth:`GuestResult.check` (or look at ``status``).
    """
    with start_guest(
        script,
        mode=mode,
        qemu_args=qemu_args,
        memory_mb=memory_mb,
        smp=smp,
        files=files,
        run_dir=run_dir,
        kernel_args=kernel_args,
    ) as guest:
        return guest.wait(timeout)
