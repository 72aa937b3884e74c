"""The interface every vhost back-end family implements: :class:`VhostBackend`.

Three families drive a virtio data plane outside the VMM: kernel vhost (ioctls on
``/dev/vhost-net``, ``/dev/vhost-vsock``), vhost-user (a Unix socket protocol, here the
front-end side) and vDPA (``/dev/vhost-vdpa-N``). They share one control-plane shape,
which this abstract class fixes: negotiate features, claim ownership, hand over the memory
map, then configure each virtqueue (size, addresses, base index, notification fds). Code
written against :class:`VhostBackend` runs unchanged on all three.

Names of the rust-vmm ``vhost`` crate, and the Python names that do their job:

=================================================  =========================================
rust-vmm (seed) name                               Python name
=================================================  =========================================
``VhostBackend`` (trait)                           :class:`vhost.VhostBackend`
``VhostUserBackend`` (trait), ``Master``,          ``vhost.user.Frontend``
``Frontend``
``MasterReqHandler``, ``FrontendReqHandler``       ``vhost.user.FrontendChannel`` (serves the
                                                   back-end channel on the front-end side)
``VhostUserMasterReqHandler``,                     ``vhost.user.FrontendRequestHandler``
``VhostUserFrontendReqHandler`` (trait)            (what a front-end does with each request)
``SlaveReqHandler``, ``BackendReqHandler``         ``vhost.user.BackendSession`` (one
                                                   connection, decoding and dispatching)
``VhostUserSlaveReqHandler``,                      ``vhost.user.BackendHandler`` (the
``VhostUserBackendReqHandler`` (traits)            callbacks a back-end implements)
``SlaveListener``, ``BackendListener``             ``vhost.user.BackendListener``
``Slave``, ``SlaveFsCacheReq``, ``Backend``        ``vhost.user.BackendChannel`` (requests
                                                   from the back-end to the front-end)
``Endpoint``, ``Listener``, ``connection``         internals of ``vhost.user`` (not public)
``VhostKernBackend`` (trait)                       ``vhost.kern.KernelBackend``
``vhost_kern::net::Net``                           ``vhost.kern.VhostNet``
``vhost_kern::vsock::Vsock``                       ``vhost.kern.VhostVsock``
``vhost_kern::vdpa::VhostVdpa``                    ``vhost.vdpa.VhostVdpa``
``VhostIotlbBackend`` (trait)                      ``vhost.kern.IotlbBackend``
``VringConfigData``                                :class:`vhost.types.VringConfig`
``VhostUserMemoryRegionInfo``                      :class:`vhost.types.MemoryRegion`
``VhostUserDirtyLogRegion``                        :class:`vhost.types.DirtyLogRegion`
``VhostIotlbMsg``                                  :class:`vhost.types.IotlbMessage`
``Error`` (each layer's enum)                      :class:`vhost.VhostError` and subclasses
                                                   (:mod:`vhost.errors`)
=================================================  =========================================

File descriptors passed to these methods are borrowed: the back-end duplicates what it
keeps, and the caller may close its own copy once the call returns. Notification fds may be
given as an ``int`` or as any object with ``fileno()`` (:class:`EventFdLike`).
"""

from __future__ import annotations

import abc
from collections.abc import Sequence
from typing import TYPE_CHECKING, Protocol, TypeVar, runtime_checkable

from .errors import ClosedError, InvalidParamError
from .types import DirtyLogRegion, MemoryRegion, VringConfig

if TYPE_CHECKING:
    from types import TracebackType

    from ._core import _VhostBackend

__all__ = ["EventFdLike", "VhostBackend", "as_fd"]

_BackendT = TypeVar("_BackendT", bound="VhostBackend")


@runtime_checkable
class EventFdLike(Protocol):
    """Anything that wraps a file descriptor and tells it through ``fileno()``.

    An eventfd wrapper, a ``socket.socket``, a file object, a ``vhost`` eventfd: the
    back-end only reads the number; it never closes the object.
    """

    def fileno(self) -> int:
        """The file descriptor number."""
        ...


def as_fd(fd: int | EventFdLike) -> int:
    """The descriptor number of ``fd``: the int itself, or ``fd.fileno()``.

    Raises ``TypeError`` for anything else and :class:`~vhost.errors.InvalidParamError`
    for a negative number.
    """
    if isinstance(fd, bool):
        raise TypeError("a file descriptor cannot be a bool")
    number = fd if isinstance(fd, int) else _fileno(fd)
    if number < 0:
        raise InvalidParamError(f"{number} is not a file descriptor")
    return number


def _fileno(obj: object) -> int:
    if not isinstance(obj, EventFdLike):
        raise TypeError(f"expected an int or an object with fileno(), not {type(obj).__name__}")
    number = obj.fileno()
    if isinstance(number, bool) or not isinstance(number, int):
        raise TypeError(f"{type(obj).__name__}.fileno() did not return an int")
    return number


class VhostBackend(abc.ABC):
    """A vhost back-end: the control plane of a virtio data plane that runs elsewhere.

    The methods follow the order a front-end calls them in: :meth:`get_features`,
    :meth:`set_features`, :meth:`set_owner`, :meth:`set_mem_table`, then for each queue
    :meth:`set_vring_num`, :meth:`set_vring_addr`, :meth:`set_vring_base`,
    :meth:`set_vring_call`, :meth:`set_vring_kick`; :meth:`get_vring_base` stops a queue.

    Failures raise :class:`~vhost.errors.VhostError` subclasses:
    :class:`~vhost.errors.KernelError` for a failed ioctl (with its ``errno``),
    :class:`~vhost.errors.ProtocolError` and friends on a vhost-user connection,
    :class:`~vhost.errors.InvalidQueueError` for a queue index the device does not have,
    and :class:`~vhost.errors.ClosedError` after :meth:`close`.

    This is the typed face of the core's ``vhost_core::backend::VhostBackend`` trait, which
    ``vhost.user.Frontend``, ``vhost.kern.KernelBackend`` and ``vhost.vdpa.VhostVdpa``
    reach through the same fourteen native methods.

    A back-end owns its device fd or connection and releases it in :meth:`close`; it is a
    context manager that closes on exit. Subclasses put their release in
    :meth:`_release`, which :meth:`close` calls exactly once.
    """

    _closed: bool = False

    # ---- features and ownership ------------------------------------------------------

    @abc.abstractmethod
    def get_features(self) -> int:
        """The virtio feature bits the device offers, as a u64 mask.

        ``VHOST_GET_FEATURES`` / vhost-user ``GET_FEATURES``. Test bits with the masks in
        :mod:`vhost.virtio` (``VirtioFeature.VERSION_1``...).
        """

    @abc.abstractmethod
    def set_features(self, features: int) -> None:
        """Enable ``features`` (a u64 mask, a subset of :meth:`get_features`).

        ``VHOST_SET_FEATURES`` / vhost-user ``SET_FEATURES``. Setting
        ``VirtioFeature.LOG_ALL`` starts dirty logging of every write to guest memory.
        Bits the device never offered raise :class:`~vhost.errors.InvalidParamError`.
        """

    @abc.abstractmethod
    def set_owner(self) -> None:
        """Claim the device for this process (or connection); call once, first.

        ``VHOST_SET_OWNER`` / vhost-user ``SET_OWNER``. A second call fails (``EBUSY`` from
        the kernel).
        """

    @abc.abstractmethod
    def reset_owner(self) -> None:
        """Give up ownership and reset the device to its state before :meth:`set_owner`.

        ``VHOST_RESET_OWNER`` / vhost-user ``RESET_OWNER``, which the vhost-user
        specification deprecates: back-ends may ignore it or only disable the rings.
        """

    # ---- memory ----------------------------------------------------------------------

    @abc.abstractmethod
    def set_mem_table(self, regions: Sequence[MemoryRegion]) -> None:
        """Install the guest memory map, replacing any earlier one.

        ``VHOST_SET_MEM_TABLE`` / vhost-user ``SET_MEM_TABLE``. Every later address (ring
        addresses, descriptors) is translated through these regions. The table must not be
        empty, regions must not overlap (:func:`vhost.types.check_memory_table`), and a
        family may limit the count (32 for vhost-user here, as rust-vmm, where QEMU sends
        at most 8; the ``max_mem_regions`` module parameter for the kernel): too many raise
        :class:`~vhost.errors.InvalidParamError`. vhost-user needs each region's ``fd``;
        kernel vhost uses ``userspace_addr`` in this process and ignores it.
        """

    @abc.abstractmethod
    def set_log_base(self, base: int, region: DirtyLogRegion | None = None) -> None:
        """Set where the dirty log lives.

        Kernel vhost and vDPA: ``base`` is the log's address in this process
        (``VHOST_SET_LOG_BASE``) and ``region`` is ``None``. vhost-user with
        ``ProtocolFeature.LOG_SHMFD``: the log is the shared memory ``region`` and ``base``
        is ignored (send 0). The log must cover every guest address of the memory map
        (:func:`vhost.types.dirty_log_size`).
        """

    @abc.abstractmethod
    def set_log_fd(self, fd: int | EventFdLike) -> None:
        """Set the eventfd the back-end signals after it wrote to the dirty log.

        ``VHOST_SET_LOG_FD`` / vhost-user ``SET_LOG_FD``. ``fd`` is borrowed.
        """

    # ---- virtqueues ------------------------------------------------------------------

    @abc.abstractmethod
    def set_vring_num(self, index: int, num: int) -> None:
        """Set the size (number of descriptors) of queue ``index``.

        ``VHOST_SET_VRING_NUM`` / vhost-user ``SET_VRING_NUM``. ``num`` is 1 to 32768, a
        power of two for split rings. A bad index raises
        :class:`~vhost.errors.InvalidQueueError`.
        """

    @abc.abstractmethod
    def set_vring_addr(self, index: int, config: VringConfig) -> None:
        """Set the ring addresses (and the used ring log address) of queue ``index``.

        ``VHOST_SET_VRING_ADDR`` / vhost-user ``SET_VRING_ADDR``. ``config`` has already
        checked sizes and alignment; the back-end checks that each ring part lies inside
        one region of the memory map (:class:`~vhost.errors.InvalidMemoryError`).
        """

    @abc.abstractmethod
    def set_vring_base(self, index: int, base: int) -> None:
        """Set the index of the next available descriptor the device will process.

        ``VHOST_SET_VRING_BASE`` / vhost-user ``SET_VRING_BASE``. For a split ring the low
        16 bits are the next available index; for a packed ring the u32 also carries the
        wrap counters and the used index, as the vhost-user specification lays out.
        """

    @abc.abstractmethod
    def get_vring_base(self, index: int) -> int:
        """Stop queue ``index`` and return its base (see :meth:`set_vring_base`).

        ``VHOST_GET_VRING_BASE`` / vhost-user ``GET_VRING_BASE``. Passing the value to
        :meth:`set_vring_base` later resumes the queue where it stopped.
        """

    @abc.abstractmethod
    def set_vring_call(self, index: int, fd: int | EventFdLike | None) -> None:
        """Set the eventfd the device signals when it has used buffers of queue ``index``.

        ``VHOST_SET_VRING_CALL`` / vhost-user ``SET_VRING_CALL``. ``None`` detaches the
        fd: no interrupts (kernel), or the front-end polls (vhost-user "no fd" flag).
        ``fd`` is borrowed.
        """

    @abc.abstractmethod
    def set_vring_kick(self, index: int, fd: int | EventFdLike | None) -> None:
        """Set the eventfd the driver signals when it has made buffers of ``index`` available.

        ``VHOST_SET_VRING_KICK`` / vhost-user ``SET_VRING_KICK``; for vhost-user the first
        kick starts the ring. ``None`` detaches the fd: the device stops waiting for kicks
        (kernel) or polls the ring (vhost-user "no fd" flag). ``fd`` is borrowed.
        """

    @abc.abstractmethod
    def set_vring_err(self, index: int, fd: int | EventFdLike | None) -> None:
        """Set the eventfd the device signals when queue ``index`` hits an error.

        ``VHOST_SET_VRING_ERR`` / vhost-user ``SET_VRING_ERR``. ``None`` detaches it.
        ``fd`` is borrowed.
        """

    # ---- lifetime --------------------------------------------------------------------

    @property
    def closed(self) -> bool:
        """Whether :meth:`close` has been called."""
        return self._closed

    def close(self) -> None:
        """Release the device fd or the connection. Safe to call more than once.

        Every later call raises :class:`~vhost.errors.ClosedError`. Borrowed fds
        (memory regions, eventfds) are the caller's and stay open.
        """
        if self._closed:
            return
        self._closed = True
        self._release()

    def _release(self) -> None:  # noqa: B027
        """Free what the back-end owns; :meth:`close` calls it once.

        Optional, hence not abstract: the default releases nothing.
        """

    def _check_open(self) -> None:
        """Raise :class:`~vhost.errors.ClosedError` if the back-end was closed."""
        if self._closed:
            raise ClosedError(f"{type(self).__name__} is closed")

    def __enter__(self: _BackendT) -> _BackendT:
        self._check_open()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        self.close()


class _NativeBackend(VhostBackend):
    """:class:`VhostBackend` over a native object that implements it (the core's
    ``VhostBackend`` trait): each method makes the one native call. The families only
    override what they add (vhost-user's dirty-log bookkeeping, the kernel's memory-table
    check). Integers are checked once, by the native call: a negative or too large one is
    :class:`~vhost.errors.InvalidParamError` naming the method and the argument."""

    @property
    @abc.abstractmethod
    def _vhost(self) -> _VhostBackend:
        """The native object for the shared calls; raises ClosedError once closed."""

    def get_features(self) -> int:
        return self._vhost.get_features()

    def set_features(self, features: int) -> None:
        self._vhost.set_features(features)

    def set_owner(self) -> None:
        self._vhost.set_owner()

    def reset_owner(self) -> None:
        self._vhost.reset_owner()

    def set_mem_table(self, regions: Sequence[MemoryRegion]) -> None:
        self._vhost.set_mem_table([_region_tuple(r) for r in regions])

    def set_log_base(self, base: int, region: DirtyLogRegion | None = None) -> None:
        log = None if region is None else (region.mmap_size, region.mmap_offset, region.fd)
        self._vhost.set_log_base(base, log)

    def set_log_fd(self, fd: int | EventFdLike | None) -> None:
        self._vhost.set_log_fd(fd)

    def set_vring_num(self, index: int, num: int) -> None:
        self._vhost.set_vring_num(index, num)

    def _vring_addr_flags(self, index: int, config: VringConfig) -> int:
        """The ``flags`` sent with ``config`` (vhost-user adds ``LOG`` while logging)."""
        return config.flags

    def set_vring_addr(self, index: int, config: VringConfig) -> None:
        self._vhost.set_vring_addr(
            index,
            config.desc_table_addr,
            config.used_ring_addr,
            config.avail_ring_addr,
            self._vring_addr_flags(index, config),
            config.log_addr or 0,
        )

    def set_vring_base(self, index: int, base: int) -> None:
        self._vhost.set_vring_base(index, base)

    def get_vring_base(self, index: int) -> int:
        return self._vhost.get_vring_base(index)

    def set_vring_call(self, index: int, fd: int | EventFdLike | None) -> None:
        self._vhost.set_vring_call(index, fd)

    def set_vring_kick(self, index: int, fd: int | EventFdLike | None) -> None:
        self._vhost.set_vring_kick(index, fd)

    def set_vring_err(self, index: int, fd: int | EventFdLike | None) -> None:
        self._vhost.set_vring_err(index, fd)


def _region_tuple(r: MemoryRegion) -> tuple[int, int, int, int, int]:
    """A region as the native ``set_mem_table``/``add_mem_region`` take it."""
    return (r.guest_phys_addr, r.memory_size, r.userspace_addr, r.mmap_offset, r.fd)
