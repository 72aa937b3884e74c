"""Kernel vhost: the in-kernel virtio back-ends, driven by ioctls on a character device.

- :class:`KernelBackend` is any vhost device (the seed's ``VhostKernBackend``): every
  request of :class:`~vhost.VhostBackend` is one ``VHOST_*`` ioctl, plus the backend
  features, vring endianness and busy-loop timeout, and the IOTLB messages
  (:class:`IotlbBackend`).
- :class:`VhostNet` is ``/dev/vhost-net``: attach each queue to a tap fd with
  :meth:`VhostNet.set_backend`.
- :class:`VhostVsock` is ``/dev/vhost-vsock``: :meth:`~VhostVsock.set_guest_cid`, then
  :meth:`~VhostVsock.start` / :meth:`~VhostVsock.stop`.

Addresses are this process's own: a memory region's ``userspace_addr`` (and a ring
address) is where the memory is mapped here, for example the ``userspace_addr`` of a
:class:`~vhost.GuestMemory` region. The kernel worker reads and writes it on our behalf,
so the process that calls :meth:`~KernelBackend.set_owner` must be the one that maps it.

A failed ioctl raises :class:`~vhost.errors.KernelError` (an ``OSError``) whose ``errno``
is the kernel's (``ENOTTY`` for a node that is not a vhost device, ``EBUSY`` for a second
``set_owner``, ``ENOBUFS`` for a queue index the device does not have); a value the ABI
cannot carry raises :class:`~vhost.errors.InvalidParamError` before any syscall; calls
after :meth:`~vhost.VhostBackend.close` raise :class:`~vhost.errors.ClosedError`.
"""

from __future__ import annotations

import abc
import enum
import os
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from typing import ClassVar, Self

from . import _core
from .backend import EventFdLike, _NativeBackend, as_fd
from .errors import InvalidParamError
from .types import IotlbAccess, IotlbMessage, IotlbType, MemoryRegion
from .types import check_memory_table as _check_memory_table

__all__ = [
    "VHOST_NET_F_VIRTIO_NET_HDR",
    "BackendFeature",
    "IotlbBackend",
    "KernelBackend",
    "VhostNet",
    "VhostVsock",
]

FdLike = int | EventFdLike

VHOST_NET_F_VIRTIO_NET_HDR = 1 << 27
"""vhost-net feature: the kernel adds the virtio-net header on RX and strips it on TX, so
the tap carries bare Ethernet frames (without it, the tap must have ``IFF_VNET_HDR``)."""


class BackendFeature(enum.IntFlag):
    """``VHOST_BACKEND_F_*`` bits of ``VHOST_GET/SET_BACKEND_FEATURES`` (as masks)."""

    IOTLB_MSG_V2 = 1 << 0x1
    """IOTLB messages use ``struct vhost_msg_v2``."""
    IOTLB_BATCH = 1 << 0x2
    """``VHOST_IOTLB_BATCH_BEGIN``/``END`` are understood."""
    IOTLB_ASID = 1 << 0x3
    """The ``asid`` of a v2 message selects the address space (vDPA)."""
    SUSPEND = 1 << 0x4
    """``VHOST_VDPA_SUSPEND``."""
    RESUME = 1 << 0x5
    """``VHOST_VDPA_RESUME``."""
    ENABLE_AFTER_DRIVER_OK = 1 << 0x6
    """Queues may be enabled after ``DRIVER_OK``."""
    DESC_ASID = 1 << 0x7
    """Descriptor tables can have their own address space group."""
    IOTLB_PERSIST = 1 << 0x8
    """IOTLB mappings survive a device reset."""


class IotlbBackend(abc.ABC):
    """A device with an IOTLB driven by messages (the seed's ``VhostIotlbBackend``).

    :meth:`send_iotlb_msg` writes an update, an invalidation or a batch marker;
    :meth:`recv_iotlb_msg` returns what the kernel reports (a ``MISS`` for an I/O virtual
    address no update covered, an ``ACCESS_FAIL``).
    """

    @abc.abstractmethod
    def send_iotlb_msg(self, msg: IotlbMessage) -> None:
        """Write one ``struct vhost_msg_v2`` to the device."""

    @abc.abstractmethod
    def recv_iotlb_msg(self, timeout: float | None = None) -> IotlbMessage | None:
        """Wait up to ``timeout`` seconds (``None``: forever) for a message from the
        device; ``None`` when none came."""


class KernelBackend(_NativeBackend, IotlbBackend):
    """A vhost character device: every call is one ioctl on its fd.

    ``KernelBackend(path)`` opens ``path`` (or the class's :attr:`DEFAULT_PATH`) and
    checks with ``VHOST_GET_FEATURES`` that it is a vhost device; anything else fails at
    once with :class:`~vhost.errors.KernelError` (``ENOTTY``, or ``ENOENT`` for a
    missing node) and leaves no fd open. Close it with :meth:`close` or a ``with`` block.
    """

    DEFAULT_PATH: ClassVar[str | None] = None
    """The node opened when no path is given."""

    def __init__(self, path: str | os.PathLike[str] | None = None) -> None:
        if path is None:
            if self.DEFAULT_PATH is None:
                raise InvalidParamError(f"{type(self).__name__} needs a device path")
            path = self.DEFAULT_PATH
        self._native = self._open(os.fspath(path))
        self._closed = False

    def _open(self, path: str) -> _core.KernelDevice:
        return _core.KernelDevice.open(path)

    @classmethod
    def from_fd(cls, fd: FdLike) -> Self:
        """Adopts a duplicate of an already open vhost fd (the caller keeps its own)."""
        obj = cls.__new__(cls)
        obj._native = _core.KernelDevice.from_fd(as_fd(fd))
        obj._closed = False
        return obj

    @property
    def native(self) -> _core.KernelDevice:
        """The native device, for calls the facade does not wrap."""
        self._check_open()
        return self._native

    def fileno(self) -> int:
        """The device fd (owned by this object; do not close it)."""
        return self.native.fileno()

    def _release(self) -> None:
        self._native.close()

    @property
    def _vhost(self) -> _core._VhostBackend:
        return self.native

    def set_mem_table(self, regions: Sequence[MemoryRegion]) -> None:
        """``VHOST_SET_MEM_TABLE``: guest addresses to addresses in this process.

        Each region's ``userspace_addr`` must be mapped in this process; ``fd`` and
        ``mmap_offset`` are not used. The kernel limits the count (``max_mem_regions``,
        64 by default: ``E2BIG`` beyond).
        """
        _check_memory_table(regions)
        super().set_mem_table(regions)

    # -- beyond the base interface -----------------------------------------------------

    def get_backend_features(self) -> BackendFeature:
        """``VHOST_GET_BACKEND_FEATURES``."""
        return BackendFeature(self.native.get_backend_features())

    def set_backend_features(self, features: int) -> None:
        """``VHOST_SET_BACKEND_FEATURES``: bits the kernel does not offer are ``EOPNOTSUPP``."""
        self.native.set_backend_features(features)

    def set_vring_endian(self, index: int, big_endian: bool) -> None:
        """``VHOST_SET_VRING_ENDIAN`` (legacy rings; kernels without cross-endian support
        answer ``ENOIOCTLCMD``/``ENOTTY``)."""
        self.native.set_vring_endian(index, big_endian)

    def get_vring_endian(self, index: int) -> bool:
        """Whether ring ``index`` is big-endian (``VHOST_GET_VRING_ENDIAN``; legacy cross-endian
        rings, needs the kernel's ``CONFIG_VHOST_CROSS_ENDIAN_LEGACY``)."""
        return self.native.get_vring_endian(index)

    def set_vring_busyloop_timeout(self, index: int, usecs: int) -> None:
        """How long the kernel worker polls queue ``index`` before sleeping (µs)."""
        self.native.set_vring_busyloop_timeout(index, usecs)

    def get_vring_busyloop_timeout(self, index: int) -> int:
        """How long (µs) the kernel worker polls ring ``index`` before sleeping."""
        return self.native.get_vring_busyloop_timeout(index)

    # -- IotlbBackend ------------------------------------------------------------------

    def send_iotlb_msg(self, msg: IotlbMessage) -> None:
        self.native.send_iotlb(
            msg.iova, msg.size, msg.uaddr, int(msg.perm), int(msg.type), msg.asid
        )

    def recv_iotlb_msg(self, timeout: float | None = None) -> IotlbMessage | None:
        got = self.native.recv_iotlb(timeout)
        if got is None:
            return None
        iova, size, uaddr, perm, kind, asid = got
        return IotlbMessage(
            iova=iova,
            size=size,
            uaddr=uaddr,
            perm=IotlbAccess(perm),
            type=IotlbType(kind),
            asid=asid,
        )

    @contextmanager
    def iotlb_batch(self, asid: int = 0) -> Iterator[None]:
        """Brackets updates in ``BATCH_BEGIN``/``BATCH_END`` (needs
        :attr:`BackendFeature.IOTLB_BATCH` acked); the end is sent even on error."""
        self.send_iotlb_msg(_batch(IotlbType.BATCH_BEGIN, asid))
        try:
            yield
        finally:
            self.send_iotlb_msg(_batch(IotlbType.BATCH_END, asid))

    def __repr__(self) -> str:
        if self._closed:
            return f"<vhost.kern.{type(self).__name__} closed>"
        return f"<vhost.kern.{type(self).__name__} fd={self._native.fileno()}>"


def _batch(kind: IotlbType, asid: int) -> IotlbMessage:
    return IotlbMessage(iova=0, size=0, uaddr=0, perm=IotlbAccess(0), type=kind, asid=asid)


class VhostNet(KernelBackend):
    """``/dev/vhost-net``: virtio-net queues served by the kernel, attached to a tap.

    Queue :attr:`RX` (0) receives what the tap's interface transmits; queue :attr:`TX`
    (1) sends frames in through the tap, as if its interface received them. Negotiate
    :data:`VHOST_NET_F_VIRTIO_NET_HDR` for a tap opened without ``IFF_VNET_HDR``.
    """

    DEFAULT_PATH: ClassVar[str | None] = "/dev/vhost-net"
    RX: ClassVar[int] = 0
    TX: ClassVar[int] = 1

    def set_backend(self, index: int, fd: FdLike | None) -> None:
        """``VHOST_NET_SET_BACKEND``: attach queue ``index`` to a tap (or packet socket)
        fd, or detach it with ``None`` (which stops the queue). A file that is neither is
        ``ENOTSOCK``; an index of 2 or more is ``ENOBUFS``. ``fd`` is borrowed: the kernel
        takes its own reference."""
        self.native.net_set_backend(index, fd)


class VhostVsock(KernelBackend):
    """``/dev/vhost-vsock``: the host side of a virtio-vsock device.

    Queue 0 carries packets to the guest, queue 1 packets from it (the event queue stays
    with the VMM). Set the guest's context id, set the queues up, then :meth:`start`.
    """

    DEFAULT_PATH: ClassVar[str | None] = "/dev/vhost-vsock"

    def set_guest_cid(self, cid: int) -> None:
        """``VHOST_VSOCK_SET_GUEST_CID``. CIDs 0 to 2 and above ``2**32 - 1`` are
        ``EINVAL``; a CID another device already has is ``EADDRINUSE``."""
        self.native.vsock_set_guest_cid(cid)

    def start(self) -> None:
        """``VHOST_VSOCK_SET_RUNNING`` 1: the kernel starts moving packets."""
        self.native.vsock_set_running(True)

    def stop(self) -> None:
        """``VHOST_VSOCK_SET_RUNNING`` 0."""
        self.native.vsock_set_running(False)
