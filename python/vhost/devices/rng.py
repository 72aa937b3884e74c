"""virtio-rng (entropy source) written in Python: the example device for
:mod:`vhost.daemon`.

The whole device is :class:`RngDevice`: it says what it is (device id 4, one queue, no
config space) and fills each buffer the driver offers with random bytes. QEMU exposes it
to a guest as ``vhost-user-rng-pci``, whose driver feeds ``/dev/hwrng``::

    from vhost.daemon import Daemon
    from vhost.devices.rng import RngDevice

    with Daemon(RngDevice(), "/run/rng.sock") as daemon:
        daemon.serve_forever()

    # qemu-system-x86_64 ... -chardev socket,id=r0,path=/run/rng.sock \\
    #     -device vhost-user-rng-pci,chardev=r0

Write your own device the same way: subclass :class:`vhost.daemon.Device`, set
``device_type`` (and ``features``, ``num_queues``, ``config()`` if the device has them),
and implement ``process``.
"""

from __future__ import annotations

import os
from collections.abc import Callable

from .. import _core
from ..daemon import Device

__all__ = ["RNG_DEVICE_ID", "RngDevice"]

RNG_DEVICE_ID = 4


class RngDevice(Device):
    """Fills every device-writable buffer with bytes from ``source`` (default
    :func:`os.urandom`). ``max_bytes`` caps one request, as a real device may."""

    device_type = RNG_DEVICE_ID

    def __init__(
        self, source: Callable[[int], bytes] = os.urandom, max_bytes: int = 64 * 1024
    ) -> None:
        self.source = source
        self.max_bytes = max_bytes
        self.bytes_served = 0

    def process(self, queue: int, batch: _core.Batch) -> None:
        for chain in batch:
            want = min(chain.writable_len, self.max_bytes)
            written = batch.write(chain, self.source(want))
            batch.complete(chain, written)
            self.bytes_served += written
