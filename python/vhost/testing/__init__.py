"""A real Linux guest for vhost-user back-end authors, under QEMU.

Attach your back-end by socket path and device type, boot a small guest (KVM when
``/dev/kvm`` works, TCG otherwise) and check, from inside, what the guest's own virtio
driver sees::

    from vhost.testing import Device, boot

    with boot(Device("rng", "/tmp/rng.sock")) as guest:
        result = guest.run("head -c 64 /dev/hwrng | od -An -tx1")
        print(result.status, result.stdout)

The kernel and initramfs are built on first use from Debian's kernel package and busybox
and cached (:mod:`vhost.testing.image`). With pytest, the ``vhost_guest`` fixture
(:mod:`vhost.testing.pytest_plugin`, registered as a pytest plugin) boots guests that
are stopped after the test and whose console is added to the report of a failing test.
``docs/testing.md`` is the guide.
"""

from __future__ import annotations

from .errors import CommandFailed, GuestError, GuestFailed, GuestSetupError
from .image import GuestImage, build_image, ensure_image, image_dir
from .machine import (
    CommandResult,
    Guest,
    GuestResult,
    Mode,
    boot,
    boot_args,
    run_script,
    start_script,
)
from .qemu import (
    Accel,
    Device,
    DeviceKind,
    choose_accel,
    find_qemu,
    kvm_usable,
    qemu_version,
    shared_memory_args,
)

__all__ = [
    "Accel",
    "CommandFailed",
    "CommandResult",
    "Device",
    "DeviceKind",
    "Guest",
    "GuestError",
    "GuestFailed",
    "GuestImage",
    "GuestResult",
    "GuestSetupError",
    "Mode",
    "boot",
    "boot_args",
    "build_image",
    "choose_accel",
    "ensure_image",
    "find_qemu",
    "image_dir",
    "kvm_usable",
    "qemu_version",
    "run_script",
    "shared_memory_args",
    "start_script",
]
