"""vDPA through ``/dev/vhost-vdpa-N``: :class:`VhostVdpa`.

A vDPA device is a virtio device whose data path runs in hardware or in a kernel or
userspace driver (VDUSE), configured through the vhost-vdpa character device. Beyond the
generic vhost requests of :class:`~vhost.kern.KernelBackend`, this is the virtio
transport: device id, status, config space, queue enable, and DMA mapping.

The device sees memory through I/O virtual addresses (IOVAs): :meth:`VhostVdpa.dma_map`
maps a range of this process's memory at an IOVA with an IOTLB update. With
:meth:`~VhostVdpa.map_memory`, a :class:`~vhost.GuestMemory` is mapped with IOVA equal to
the guest physical address, so descriptors and ring addresses written by a
:class:`~vhost.virtio.Virtqueue` (guest addresses) are what the device reads; rings are set
up with :meth:`~VhostVdpa.setup_queue`, which passes guest addresses, not user ones.

The status handshake, as a virtio driver does it::

    with VhostVdpa("/dev/vhost-vdpa-0") as dev:
        dev.set_owner()
        dev.set_status(DeviceStatus.ACKNOWLEDGE | DeviceStatus.DRIVER)
        dev.set_features(dev.get_features() & wanted)
        dev.set_status(dev.get_status() | DeviceStatus.FEATURES_OK)
        dev.map_memory(memory)
        dev.setup_queue(0, memory, queue, kick, call)
        dev.set_status(dev.get_status() | DeviceStatus.DRIVER_OK)
"""

from __future__ import annotations

import os
from typing import NamedTuple, Self

from . import _core
from .errors import InvalidParamError
from .kern import FdLike, KernelBackend
from .virtio import DeviceStatus

__all__ = ["IovaRange", "VhostVdpa"]


class IovaRange(NamedTuple):
    """The I/O virtual addresses a device can map, both ends inclusive."""

    first: int
    last: int


class VhostVdpa(KernelBackend):
    """A ``/dev/vhost-vdpa-N`` device. The kernel allows one open at a time (``EBUSY``).

    Opening resets the device. Ring addresses given to ``set_vring_addr`` are IOVAs (use
    :meth:`setup_queue`, not :func:`vhost.virtio.setup_queue`, which passes this process's
    addresses as kernel vhost wants). :meth:`set_mem_table` maps the regions with
    :meth:`dma_map` (IOVA = guest address) after unmapping every earlier mapping;
    ``set_log_base``/``set_log_fd`` are not supported by vhost-vdpa (``ENOTTY``).
    """

    def __init__(self, path: str | os.PathLike[str]) -> None:
        self._vdpa = _core.VdpaDevice.open(os.fspath(path))
        super().__init__(path)

    def _open(self, path: str) -> _core.KernelDevice:
        return self._vdpa.device()

    @classmethod
    def from_fd(cls, fd: FdLike) -> Self:
        raise InvalidParamError("open a vDPA device by path: VhostVdpa(path)")

    @property
    def vdpa(self) -> _core.VdpaDevice:
        """The native vDPA device."""
        self._check_open()
        return self._vdpa

    @property
    def _vhost(self) -> _core.VdpaDevice:
        # The shared requests go to the vDPA device, whose memory table is DMA mappings
        # (IOVA = guest address) made by the core after unmapping the previous ones.
        return self.vdpa

    def _release(self) -> None:
        self._vdpa.close()
        super()._release()

    # -- identification, status, config ------------------------------------------------

    def get_device_id(self) -> int:
        """The virtio device id (``vhost.virtio.DeviceId``: 1 net, 2 block...)."""
        return self.vdpa.get_device_id()

    def get_status(self) -> DeviceStatus:
        """The virtio device status, as :class:`~vhost.virtio.DeviceStatus` bits: what a driver
        checks after setting ``FEATURES_OK``."""
        return DeviceStatus(self.vdpa.get_status())

    def set_status(self, status: int) -> None:
        """Set the device status; bits can only be added, except by a reset to 0
        (the kernel answers ``EINVAL``)."""
        self.vdpa.set_status(status)

    def reset_device(self) -> None:
        """Status 0: the device forgets features and queues (the name of vhost-user's
        :meth:`vhost.user.Frontend.reset_device`)."""
        self.set_status(0)

    def get_config(self, offset: int, size: int) -> bytes:
        """``size`` bytes of the device config space from ``offset``. A range that
        overflows u32 is :class:`~vhost.errors.InvalidParamError`; one beyond the config
        space is the kernel's ``EINVAL``."""
        return self.vdpa.get_config(offset, size)

    def set_config(self, offset: int, data: bytes | bytearray | memoryview) -> None:
        """Writes ``data`` into the device config space at byte ``offset`` (a u32); the kernel
        refuses a range past :meth:`get_config_size`."""
        self.vdpa.set_config(offset, bytes(data))

    def get_config_size(self) -> int:
        """Bytes of the device config space: the limit of :meth:`get_config` and
        :meth:`set_config`."""
        return self.vdpa.get_config_size()

    def set_config_call(self, fd: FdLike | None) -> None:
        """The eventfd signalled when the config space changes (``None`` detaches)."""
        self.vdpa.set_config_call(fd)

    # -- queues --------------------------------------------------------------------------

    def get_vqs_count(self) -> int:
        """The number of virtqueues; larger indexes are ``ENOBUFS``."""
        return self.vdpa.get_vqs_count()

    def get_vring_num(self) -> int:
        """The largest queue size the device supports."""
        return self.vdpa.get_vring_num()

    def get_vring_size(self, index: int) -> int:
        """The size the device wants for queue ``index`` (kernels since 6.9)."""
        return self.vdpa.get_vring_size(index)

    def set_vring_enable(self, index: int, enable: bool) -> None:
        """Starts or stops ring ``index`` (after its address and kick are set)."""
        self.vdpa.set_vring_enable(index, enable)

    def setup_queue(
        self,
        index: int,
        queue: _core.Virtqueue,
        kick: FdLike,
        call: FdLike,
        *,
        enable: bool = True,
    ) -> None:
        """Hand ``queue`` to the device: size, addresses (guest addresses, which are
        IOVAs after :meth:`map_memory`), base 0 (split) or the packed wrap bit, call and
        kick eventfds, then enable it."""
        self.set_vring_num(index, queue.size)
        self.native.set_vring_addr(index, queue.desc, queue.used, queue.avail)
        self.set_vring_base(index, 1 << 15 if queue.packed else 0)
        self.set_vring_call(index, call)
        self.set_vring_kick(index, kick)
        if enable:
            self.set_vring_enable(index, True)

    # -- groups and address spaces -------------------------------------------------------

    def get_group_num(self) -> int:
        """How many virtqueue groups the device has (groups share an address space)."""
        return self.vdpa.get_group_num()

    def get_as_num(self) -> int:
        """How many address spaces (ASIDs) the device supports."""
        return self.vdpa.get_as_num()

    def get_vring_group(self, index: int) -> int:
        """The group ring ``index`` belongs to, to bind with :meth:`set_group_asid`."""
        return self.vdpa.get_vring_group(index)

    def get_vring_desc_group(self, index: int) -> int:
        """Needs :attr:`~vhost.kern.BackendFeature.DESC_ASID` acked."""
        return self.vdpa.get_vring_desc_group(index)

    def set_group_asid(self, group: int, asid: int) -> None:
        """Binds virtqueue ``group`` to address space ``asid``, so its DMA goes through that
        space's mappings (a shadow virtqueue setup)."""
        self.vdpa.set_group_asid(group, asid)

    def suspend(self) -> None:
        """Needs :attr:`~vhost.kern.BackendFeature.SUSPEND` offered (else the kernel
        answers ``EOPNOTSUPP``)."""
        self.vdpa.suspend()

    def resume(self) -> None:
        """Needs :attr:`~vhost.kern.BackendFeature.RESUME` offered."""
        self.vdpa.resume()

    # -- DMA -----------------------------------------------------------------------------

    def get_iova_range(self) -> IovaRange:
        """The I/O virtual addresses the device can use (inclusive); :meth:`dma_map` outside it
        is refused."""
        first, last = self.vdpa.get_iova_range()
        return IovaRange(first, last)

    def dma_map(
        self, iova: int, size: int, vaddr: int, readonly: bool = False, *, asid: int = 0
    ) -> None:
        """Map ``size`` bytes at ``vaddr`` in this process to ``iova`` for the device
        (read-only for it when ``readonly``). The kernel pins the pages and refuses, with
        ``EFAULT``, a range outside :meth:`get_iova_range`, one overlapping a mapping, or
        addresses not mapped here."""
        self.vdpa.dma_map(iova, size, vaddr, readonly, asid)

    def dma_unmap(self, iova: int, size: int, *, asid: int = 0) -> None:
        """Unmap the :meth:`dma_map` mappings inside ``[iova, iova + size)``. A range with
        none is :class:`~vhost.errors.InvalidMemoryError`; one that would split a mapping is
        :class:`~vhost.errors.InvalidParamError`."""
        self.vdpa.dma_unmap(iova, size, asid)

    def mappings(self) -> list[tuple[int, int, int]]:
        """The mappings made by :meth:`dma_map` and not unmapped: ``(asid, iova, size)``."""
        return self.vdpa.mappings()

    def map_memory(self, memory: _core.GuestMemory, readonly: bool = False) -> None:
        """Map every region of ``memory`` at IOVA = guest physical address."""
        for r in memory.regions():
            self.dma_map(r.guest_phys_addr, r.memory_size, r.userspace_addr, readonly)

    def unmap_memory(self, memory: _core.GuestMemory) -> None:
        """Undoes :meth:`map_memory`: unmaps each region of ``memory`` at its guest-physical
        address."""
        for r in memory.regions():
            self.dma_unmap(r.guest_phys_addr, r.memory_size)

    def __repr__(self) -> str:
        if self._closed:
            return "<vhost.vdpa.VhostVdpa closed>"
        return f"<vhost.vdpa.VhostVdpa fd={self._native.fileno()}>"
