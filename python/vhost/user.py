"""vhost-user, both sides.

- :class:`Frontend` is the VMM side (the seed's ``Master``): it owns guest memory and the
  virtqueues and shares them with a back-end over a Unix socket, in client mode
  (:meth:`Frontend.connect`) or server mode (:meth:`Frontend.accept`).
- :class:`BackendHandler` is the device side (the seed's ``VhostUserSlaveReqHandler``):
  subclass it, override the requests your device supports, and serve a
  :class:`BackendSession` with it. The session (in Rust) validates every message first.
- :class:`FrontendRequestHandler` answers what a back-end sends on its request channel
  (the seed's ``VhostUserMasterReqHandler``); :class:`BackendChannel` sends them.
- Live migration: :meth:`Frontend.start_dirty_log` makes any back-end with ``LOG_SHMFD``
  and ``VHOST_F_LOG_ALL`` record its writes to guest memory in a :class:`vhost.DirtyLog`,
  which the front-end reads and clears with :meth:`~vhost.DirtyLog.take`;
  :meth:`Frontend.save_device_state` and :meth:`Frontend.load_device_state` carry a
  back-end's internal state (``DEVICE_STATE``) from the source to the destination.
  Postcopy: :meth:`Frontend.postcopy_advise` returns a back-end's userfaultfd, and
  :class:`vhost.postcopy.FaultResolver` resolves the back-end's page faults on it.
"""

from __future__ import annotations

import abc
import logging
import os
import threading
import uuid as _uuid
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from types import MappingProxyType
from typing import Any, Self, cast

from . import _core
from ._closing import Closing
from .backend import EventFdLike, _NativeBackend, _region_tuple
from .codes import MAX_SHMEM_REGIONS, ProtocolFeature
from .dirty_log import DirtyLog
from .errors import (
    ClosedError,
    InactiveFeatureError,
    InvalidMemoryError,
    InvalidParamError,
    InvalidQueueError,
    NotSupportedError,
)
from .postcopy import PostcopyRegion
from .types import (
    DirtyLogRegion,
    IotlbMessage,
    MemoryRegion,
    VringAddrFlag,
    VringAddrs,
    VringConfig,
)
from .virtio import DeviceStatus, VirtioFeature

__all__ = [
    "BackendChannel",
    "BackendHandler",
    "BackendListener",
    "BackendSession",
    "Frontend",
    "FrontendChannel",
    "FrontendRequestHandler",
    "InflightArea",
    "InflightInfo",
    "Listener",
    "SharedObject",
    "ShmemConfig",
    "regions_of",
    "serve_in_thread",
]

log = logging.getLogger("vhost.user")

BackendSession = _core.BackendSession
BackendChannel = _core.BackendChannel
FrontendChannel = _core.FrontendChannel
Listener = _core.Listener
FileDescriptor = _core.FileDescriptor
GuestMemory = _core.GuestMemory
EventFd = _core.EventFd

FdLike = int | EventFdLike


_LOG_ALL = int(VirtioFeature.LOG_ALL)
#: A ``features`` mask as the wire takes it: Python's ``~bit`` is negative.
_U64_MASK = (1 << 64) - 1


def regions_of(memory: GuestMemory) -> list[MemoryRegion]:
    """The shareable regions of guest memory allocated on this side."""
    return memory.regions()


class InflightInfo:
    """The inflight-tracking area a back-end handed out (GET_INFLIGHT_FD)."""

    __slots__ = ("fd", "mmap_offset", "mmap_size", "num_queues", "queue_size")

    def __init__(
        self,
        mmap_size: int,
        mmap_offset: int,
        num_queues: int,
        queue_size: int,
        fd: _core.FileDescriptor,
    ) -> None:
        self.mmap_size = mmap_size
        self.mmap_offset = mmap_offset
        self.num_queues = num_queues
        self.queue_size = queue_size
        self.fd = fd

    def __repr__(self) -> str:
        return (
            f"InflightInfo(mmap_size={self.mmap_size:#x}, mmap_offset={self.mmap_offset:#x}, "
            f"num_queues={self.num_queues}, queue_size={self.queue_size}, fd={self.fd!r})"
        )


@dataclass(frozen=True, slots=True)
class InflightArea:
    """The inflight-tracking area a back-end hands out, what
    :meth:`BackendHandler.get_inflight_fd` returns: ``mmap_size`` bytes of ``fd`` from
    ``mmap_offset``. The session duplicates ``fd`` to send it, so it stays the handler's
    (keep it: the same area comes back with ``SET_INFLIGHT_FD`` after a reconnect)."""

    mmap_size: int
    mmap_offset: int
    fd: FdLike


@dataclass(frozen=True, slots=True)
class SharedObject:
    """A found object, as :meth:`FrontendRequestHandler.shared_object_lookup` answers
    when it sends the object's dma-buf ``fd`` with the answer (status 0). The channel
    duplicates ``fd`` to send it, so it stays the handler's."""

    fd: FdLike


@dataclass(frozen=True, slots=True)
class ShmemConfig:
    """A device's VIRTIO Shared Memory Regions (``GET_SHMEM_CONFIG``).

    ``regions`` maps each shared memory id in use (0-255) to its size in bytes; a VMM
    exposes a region of that size to the guest for each, and the back-end maps files
    into them with ``SHMEM_MAP``. Ids the device does not use are absent (the protocol
    sends them as size 0). Built from a plain dict, kept read-only.
    """

    regions: Mapping[int, int]

    def __post_init__(self) -> None:
        for shmid, size in self.regions.items():
            if not 0 <= shmid < MAX_SHMEM_REGIONS:
                raise InvalidParamError(f"shared memory id {shmid} is not in 0..255")
            if not 0 < size < 1 << 64:
                raise InvalidParamError(
                    f"shared memory region {shmid}: size {size} is not a u64 above 0"
                )
        object.__setattr__(self, "regions", MappingProxyType(dict(sorted(self.regions.items()))))

    def __hash__(self) -> int:
        return hash(tuple(self.regions.items()))


class _ClosedConnection:
    """Stands in for a closed front-end's native connection: any use raises."""

    def __getattr__(self, name: str) -> Any:
        raise ClosedError("the vhost-user front-end connection is closed")


class Frontend(_NativeBackend):
    """A vhost-user front-end connection; every method is one request.

    Calls that need a protocol feature raise :class:`~vhost.errors.InactiveFeatureError`
    locally when it was not negotiated. With ``REPLY_ACK`` negotiated, every request that
    has no reply of its own waits for the back-end's ack, and a refusal raises
    :class:`~vhost.errors.RequestRefusedError`. A malformed reply closes the connection
    (later calls raise :class:`~vhost.errors.ClosedError`).
    """

    def __init__(self, native: _core.Frontend) -> None:
        self._native = native
        self._closed = False
        # Dirty logging: the log the back-end writes, and the last SET_VRING_ADDR of each
        # running queue (re-sent with VHOST_VRING_F_LOG when logging starts or stops).
        self._dirty_log: DirtyLog | None = None
        self._vring_configs: dict[int, VringConfig] = {}
        # Guest-physical end of each region the back-end was given, by start address: a
        # log must cover the highest one.
        self._region_ends: dict[int, int] = {}

    @classmethod
    def connect(cls, path: str | os.PathLike[str], *, timeout: float | None = 10.0) -> Self:
        """Client mode: connect to a back-end listening at ``path``.

        ``timeout`` bounds the connect itself (a back-end that stopped accepting) and then
        every reply; ``None`` waits forever, and Ctrl-C interrupts any wait. A failure is
        an ``OSError`` of the matching kind that is also a :class:`~vhost.errors.VhostError`
        (``FileNotFoundError``, ``ConnectionRefusedError``, ``PermissionError``,
        :class:`~vhost.errors.VhostTimeoutError`...) with ``filename`` set to ``path``.
        """
        return cls(_core.Frontend.connect(os.fspath(path), timeout))

    @classmethod
    def accept(
        cls,
        path: str | os.PathLike[str],
        *,
        timeout: float | None = None,
        reply_timeout: float | None = 10.0,
    ) -> Self:
        """Server mode: listen at ``path`` until one back-end connects (Ctrl-C interrupts
        the wait; the socket path is removed either way)."""
        with _core.Listener(os.fspath(path)) as listener:
            return cls(listener.accept_frontend(timeout, reply_timeout))

    @property
    def native(self) -> _core.Frontend:
        """The native connection, for calls the facade does not wrap."""
        return self._native

    def fileno(self) -> int:
        """The connection's socket fd, for a poll loop; owned by the connection (closed by
        :meth:`close`)."""
        return self._native.fileno()

    def set_timeout(self, timeout: float | None) -> None:
        """Bounds every wait for a reply; ``None`` waits forever."""
        self._native.set_timeout(timeout)

    @property
    def broken(self) -> bool:
        """True after a protocol or I/O error closed the connection for good."""
        return self._closed or self._native.broken

    @property
    def acked_features(self) -> int:
        """The virtio feature bits last sent with ``SET_FEATURES`` (0 before): what the back-end
        was told the driver uses."""
        return self._native.acked_features

    @property
    def acked_protocol_features(self) -> ProtocolFeature:
        """The protocol features last sent with ``SET_PROTOCOL_FEATURES``: every gated request
        checks them first and raises :class:`~vhost.errors.InactiveFeatureError` without
        sending when its feature is missing."""
        return ProtocolFeature(self._native.acked_protocol_features)

    @property
    def offered_features(self) -> int | None:
        """What the back-end offered in its last ``GET_FEATURES`` reply (``None`` until
        asked): :meth:`negotiate` asks once, and a caller reporting the offer reads it
        here instead of asking again."""
        return self._native.offered_features

    @property
    def offered_protocol_features(self) -> ProtocolFeature | None:
        """What the back-end offered in its last ``GET_PROTOCOL_FEATURES`` reply
        (``None`` until asked, or when it offers no protocol features)."""
        proto = self._native.offered_protocol_features
        return None if proto is None else ProtocolFeature(proto)

    def close(self) -> None:
        """Shuts the connection down and closes its socket; later calls raise
        :class:`~vhost.errors.ClosedError`."""
        if self._closed:
            return
        self._closed = True
        native, self._native = self._native, cast(_core.Frontend, _ClosedConnection())
        # Shut the socket down first (the core does it without the lock a thread waiting
        # for a reply holds), so the peer sees the disconnect at once even if another
        # thread still holds the native object; dropping our reference closes the fd.
        native.shutdown()
        del native

    # -- VhostBackend (beyond the shared calls: the dirty log's bookkeeping) --------

    @property
    def _vhost(self) -> _core.Frontend:
        return self._native

    def set_mem_table(self, regions: Sequence[MemoryRegion]) -> None:
        """``SET_MEM_TABLE``: 1 to :data:`~vhost.codes.MAX_MEM_TABLE_REGIONS` (32) regions,
        as rust-vmm accepts (QEMU sends at most 8; more regions, up to the back-end's
        :meth:`get_max_mem_slots`, go one by one with :meth:`add_mem_region`). While dirty
        logging is on, memory the log does not cover is refused before it is sent (hand
        over a larger log with :meth:`start_dirty_log` first, as QEMU resizes its log)."""
        ends = {r.guest_phys_addr: r.guest_phys_addr + r.memory_size for r in regions}
        self._check_log_covers(max(ends.values(), default=0), "SET_MEM_TABLE")
        super().set_mem_table(regions)
        self._region_ends = ends

    def _vring_addr_flags(self, index: int, config: VringConfig) -> int:
        if self._dirty_log is not None and config.log_addr is not None:
            return config.flags | int(VringAddrFlag.LOG)
        return config.flags

    def set_vring_addr(self, index: int, config: VringConfig) -> None:
        """``SET_VRING_ADDR``. While dirty logging is on (:meth:`start_dirty_log`), a
        config with a ``log_addr`` is sent with ``VHOST_VRING_F_LOG`` set, as QEMU does,
        so the back-end logs its used-ring writes; the config is remembered so that
        starting or stopping the log re-sends it."""
        super().set_vring_addr(index, config)
        self._vring_configs[index] = config

    def get_vring_base(self, index: int) -> int:
        """``GET_VRING_BASE``: stops the ring (it is no longer re-sent by
        :meth:`start_dirty_log`) and returns its next available index."""
        base = super().get_vring_base(index)
        self._vring_configs.pop(index, None)
        return base

    # -- beyond the base interface ------------------------------------------------------

    def get_protocol_features(self) -> ProtocolFeature:
        """``GET_PROTOCOL_FEATURES``: the protocol extensions the back-end supports (asked only
        when it offers ``VHOST_USER_F_PROTOCOL_FEATURES``, bit 30 of :meth:`get_features`)."""
        return ProtocolFeature(self._native.get_protocol_features())

    def set_protocol_features(self, features: int) -> None:
        """``SET_PROTOCOL_FEATURES``: the extensions this connection uses, a subset of
        :meth:`get_protocol_features`; gated requests are allowed from then on."""
        self._native.set_protocol_features(int(features))

    #: Protocol features this front-end implements: a method or the back-end request
    #: channel (:meth:`set_backend_req_fd`) speaks each one. Not here: ``XEN_MMAP`` (another
    #: memory-region layout), ``GPA_ADDRESSES`` (:func:`~vhost.virtio.setup_queue` and the
    #: memory table send front-end virtual addresses), ``GET_VRING_BASE_INFLIGHT`` and
    #: ``GET_VRING_BASE_SKIP_DRAIN`` (they change what ``GET_VRING_BASE`` means), and every
    #: bit from 24 up (unassigned when this was written). The core's constant.
    IMPLEMENTED_PROTOCOL_FEATURES = ProtocolFeature(_core.Frontend.IMPLEMENTED_PROTOCOL_FEATURES)

    #: What :meth:`negotiate` acks by default: the implemented protocol features that ask
    #: nothing more of the caller. ``INFLIGHT_SHMFD`` is left out: once it is acked, a
    #: back-end expects an inflight area (``GET_INFLIGHT_FD``/``SET_INFLIGHT_FD``) before
    #: its rings start, so only a caller that sets one up should ask for it.
    DEFAULT_PROTOCOL_FEATURES = ProtocolFeature(_core.Frontend.DEFAULT_PROTOCOL_FEATURES)

    def negotiate(
        self,
        features: int | None = None,
        protocol_features: int | None = None,
        *,
        packed: bool = False,
        event_idx: bool = True,
        log_all: bool = False,
    ) -> tuple[int, ProtocolFeature]:
        """The usual opening: GET_FEATURES, SET_OWNER, protocol features, SET_FEATURES.

        Acks only what this package implements and what the caller's rings allow, so the
        back-end never runs a ring format or a protocol extension the caller cannot (the
        rule is the core's ``Frontend::negotiate``, the one every caller uses):

        - ``packed`` is the ring format the caller will hand over (:class:`~vhost.virtio.
          Virtqueue`'s ``packed``): ``VIRTIO_F_RING_PACKED`` is acked exactly when it is
          true (:class:`~vhost.errors.NotSupportedError` if the back-end does not offer
          it, :class:`~vhost.errors.InvalidParamError` if ``features`` excludes it).
        - ``event_idx``: ack ``VIRTIO_F_EVENT_IDX`` when offered (and ``features`` allows
          it); build the ring with ``event_idx=bool(acked & VirtioFeature.EVENT_IDX)``.
        - ``features`` masks the other bits (any int: ``~VirtioFeature.X`` works, only the
          low 64 bits count); ``None`` allows every device-specific bit the back-end
          offers (bits 0-23 and 50-63: the caller's driver knows its device).
          Of the transport bits (24-49) only those the rings of :mod:`vhost.virtio`
          implement are ever acked: ``VERSION_1``, ``INDIRECT_DESC`` and the two above.
          ``VHOST_USER_F_PROTOCOL_FEATURES`` (bit 30) is acked whenever offered, as QEMU
          does: protocol features are negotiated then, and the bit decides how rings start
          (disabled until ``SET_VRING_ENABLE``). Use :meth:`set_features` to ack anything
          else on purpose.
        - ``log_all``: also ack ``VHOST_F_LOG_ALL`` (bit 26;
          :class:`~vhost.errors.NotSupportedError` if not offered), for a front-end that
          takes over a back-end in the middle of a migration. The back-end then logs every
          write from the start, so hand it the log first; :meth:`start_dirty_log` does
          all of it, in QEMU's order, on a negotiated connection.
        - ``protocol_features`` masks the protocol features; ``None`` means
          :attr:`DEFAULT_PROTOCOL_FEATURES`. Only :attr:`IMPLEMENTED_PROTOCOL_FEATURES`
          are ever acked; asking for another bit raises
          :class:`~vhost.errors.InvalidParamError` before anything is sent.

        The :class:`~vhost.errors.NotSupportedError` names the missing feature and has
        ``request == "SET_FEATURES"``; it comes after ``GET_FEATURES`` only, so the
        connection stays usable. Returns what was acked: ``(features, protocol features)``.
        """
        mask = None if features is None else int(features) & _U64_MASK
        proto = None if protocol_features is None else int(protocol_features)
        acked, acked_proto = self._native.negotiate(
            mask, proto, packed=packed, event_idx=event_idx, log_all=log_all
        )
        return acked, ProtocolFeature(acked_proto)

    # -- dirty logging (live migration) ----------------------------------------------

    @property
    def dirty_log(self) -> DirtyLog | None:
        """The log the back-end writes while logging is on (:meth:`start_dirty_log`)."""
        return self._dirty_log

    def start_dirty_log(self, log: DirtyLog) -> None:
        """Makes the back-end log every write it makes to guest memory into ``log``, in
        QEMU's order: ``SET_LOG_BASE`` with the log's fd (the back-end's reply is awaited),
        ``SET_FEATURES`` with the acked features plus ``VHOST_F_LOG_ALL``, then
        ``SET_VRING_ADDR`` again, with ``VHOST_VRING_F_LOG`` and the used ring's guest
        address, for every queue set up on this connection that is still running. Queues
        set up later get the flag from :meth:`set_vring_addr` on their own.

        ``log`` must cover the guest memory (:meth:`DirtyLog.allocate` on it does); it
        stays the caller's: :meth:`DirtyLog.take` collects the dirty pages. Called again
        while logging, it hands over the new log (QEMU does this when memory grows).

        Raises, before anything is sent: :class:`~vhost.errors.InactiveFeatureError` when
        ``ProtocolFeature.LOG_SHMFD`` was not negotiated (no fd-based log without it),
        :class:`~vhost.errors.NotSupportedError` when the back-end does not offer
        ``VHOST_F_LOG_ALL``, :class:`~vhost.errors.InvalidParamError` for a log without
        an fd (an adopted one), :class:`~vhost.errors.InvalidMemoryError` for a log that
        does not cover the memory table sent on this connection,
        :class:`~vhost.errors.InvalidQueueError` for a running
        queue whose ``VringConfig`` has no ``log_addr``
        (:func:`~vhost.virtio.setup_queue` always gives one).
        """
        region = self._check_dirty_log(log)
        if self._dirty_log is None:
            self._check_log_all(self.get_features())
        self.set_log_base(0, region)
        if self._dirty_log is not None:
            self._dirty_log = log
            return
        self.set_features(self.acked_features | _LOG_ALL)
        self._dirty_log = log
        for index, config in list(self._vring_configs.items()):
            self.set_vring_addr(index, config)

    def _check_dirty_log(self, log: DirtyLog) -> DirtyLogRegion:
        """:meth:`start_dirty_log`'s checks before anything is sent (shared with
        :class:`vhost.aio.Frontend`); returns the log's region."""
        if not self.acked_protocol_features & ProtocolFeature.LOG_SHMFD:
            raise InactiveFeatureError(
                "SET_LOG_BASE",
                "LOG_SHMFD",
                "start_dirty_log: protocol feature LOG_SHMFD was not negotiated "
                f"(acked {self.acked_protocol_features!r}); the back-end cannot map a log",
            )
        region = log.region
        self._check_log_covers(max(self._region_ends.values(), default=0), "SET_LOG_BASE", log)
        return region

    def _check_log_all(self, offered: int) -> None:
        """:meth:`start_dirty_log`'s checks of a first log once the back-end's ``offered``
        features are known."""
        if not offered & _LOG_ALL:
            raise NotSupportedError(
                "start_dirty_log: the back-end does not offer VHOST_F_LOG_ALL "
                f"(offered {offered:#x}): it cannot log its writes",
                "SET_FEATURES",
            )
        for index, config in self._vring_configs.items():
            if config.log_addr is None:
                raise InvalidQueueError(
                    f"start_dirty_log: queue {index} was set up without a log_addr "
                    "(the used ring's guest address); set it in its VringConfig",
                    index,
                )

    def _check_log_covers(self, end: int, request: str, log: DirtyLog | None = None) -> None:
        """A back-end cannot log a write past the end of its log, so the page would be
        missing from the migration: refuse memory the log (the current one, or ``log``
        about to replace it) does not cover."""
        if log is None:
            log = self._dirty_log
        if log is not None and end > log.covers:
            raise InvalidMemoryError(
                f"{request}: the dirty log covers guest addresses below {log.covers:#x}, but "
                f"guest memory would end at {end:#x}; hand over a larger log "
                "(start_dirty_log(DirtyLog.allocate(memory))) first",
                end,
            )

    def stop_dirty_log(self) -> None:
        """Turns logging off: ``SET_FEATURES`` without ``VHOST_F_LOG_ALL``, then
        ``SET_VRING_ADDR`` without ``VHOST_VRING_F_LOG`` for the running queues (QEMU's
        order). Pages written before are still in the log: :meth:`DirtyLog.take` them
        afterwards. Does nothing when logging is off."""
        if self._dirty_log is None:
            return
        self.set_features(self.acked_features & ~_LOG_ALL)
        self._dirty_log = None
        for index, config in list(self._vring_configs.items()):
            self.set_vring_addr(index, config)

    def get_queue_num(self) -> int:
        """``GET_QUEUE_NUM`` (needs ``MQ``): how many queues the back-end has, to size a
        multi-queue device."""
        return self._native.get_queue_num()

    def set_vring_enable(self, index: int, enable: bool) -> None:
        """``SET_VRING_ENABLE``: starts or pauses ring ``index`` (with ``PROTOCOL_FEATURES``
        acked, rings start disabled). An index beyond the back-end's queues is refused by it."""
        self._native.set_vring_enable(index, enable)

    def set_vring_endian(self, index: int, big_endian: bool) -> None:
        """``SET_VRING_ENDIAN`` (needs ``CROSS_ENDIAN``): the byte order of legacy (pre-1.0) ring
        ``index``; modern devices are little-endian."""
        self._native.set_vring_endian(index, big_endian)

    def vring_kick(self, index: int) -> None:
        """In-band kick (needs INBAND_NOTIFICATIONS)."""
        self._native.vring_kick(index)

    def get_config(self, offset: int, size: int, flags: int = 0) -> bytes:
        """``GET_CONFIG`` (needs ``CONFIG``): ``size`` bytes of the device config space
        from ``offset``, as :meth:`vhost.vdpa.VhostVdpa.get_config`; ``flags`` is the
        request's (``VHOST_SET_CONFIG_TYPE_*``)."""
        return self._native.get_config(offset, size, flags)

    def set_config(self, offset: int, data: bytes | bytearray | memoryview, flags: int = 0) -> None:
        """``SET_CONFIG`` (needs ``CONFIG``): writes ``data`` at ``offset``."""
        self._native.set_config(offset, bytes(data), flags)

    def set_backend_req_fd(self) -> FrontendChannel:
        """Opens the back-end request channel; serve the returned end with a handler."""
        return self._native.set_backend_req_fd()

    def get_inflight_fd(self, num_queues: int, queue_size: int) -> InflightInfo:
        """``GET_INFLIGHT_FD`` (needs ``INFLIGHT_SHMFD``): the back-end allocates the area that
        tracks requests in flight on ``num_queues`` rings of ``queue_size`` entries; keep the
        returned :class:`InflightInfo` to hand it back with :meth:`set_inflight_fd` after a
        back-end restart."""
        return InflightInfo(*self._native.get_inflight_fd(num_queues, queue_size))

    def set_inflight_fd(self, info: InflightInfo) -> None:
        """``SET_INFLIGHT_FD``: hands a reconnected back-end the inflight area it gave out
        before, so it resubmits what was in flight instead of losing it. ``info.fd`` stays the
        caller's."""
        self._native.set_inflight_fd(
            info.mmap_size, info.mmap_offset, info.num_queues, info.queue_size, info.fd
        )

    def get_max_mem_slots(self) -> int:
        """``GET_MAX_MEM_SLOTS`` (needs ``CONFIGURE_MEM_SLOTS``): how many regions the
        back-end holds at once through :meth:`add_mem_region` (509 for our daemon, as
        rust-vmm); one more is refused."""
        return self._native.get_max_mem_slots()

    def add_mem_region(self, region: MemoryRegion) -> None:
        """``ADD_MEM_REG``; checked against the dirty log as :meth:`set_mem_table` is."""
        end = region.guest_phys_addr + region.memory_size
        self._check_log_covers(end, "ADD_MEM_REG")
        self._native.add_mem_region(_region_tuple(region))
        self._region_ends[region.guest_phys_addr] = end

    def remove_mem_region(self, region: MemoryRegion) -> None:
        """``REM_MEM_REG`` (needs ``CONFIGURE_MEM_SLOTS``): the back-end unmaps the region at
        these addresses (no fd is sent); a region it does not have is refused."""
        self._native.remove_mem_region(
            region.guest_phys_addr, region.memory_size, region.userspace_addr, region.mmap_offset
        )
        self._region_ends.pop(region.guest_phys_addr, None)

    def reset_device(self) -> None:
        """``RESET_DEVICE`` (needs ``RESET_DEVICE``): resets the device to its initial state
        without dropping the connection, as a driver reset does."""
        self._native.reset_device()

    def set_status(self, status: int) -> None:
        """``SET_STATUS`` (needs ``STATUS``): the virtio device status byte
        (:class:`~vhost.virtio.DeviceStatus` bits), as a driver writes it."""
        self._native.set_status(int(status))

    def get_status(self) -> DeviceStatus:
        """``GET_STATUS`` (needs ``STATUS``): the device status, as vDPA's."""
        return DeviceStatus(self._native.get_status())

    def net_set_mtu(self, mtu: int) -> None:
        """``NET_SET_MTU`` (needs ``MTU``): the MTU in bytes a virtio-net back-end should
        use."""
        self._native.net_set_mtu(mtu)

    def send_rarp(self, mac: bytes) -> None:
        """``SEND_RARP`` (needs ``RARP``): asks a net back-end to announce ``mac`` (6 bytes, else
        :class:`~vhost.errors.InvalidParamError`) after a migration, so switches learn the
        guest's new port."""
        if len(mac) != 6:
            raise InvalidParamError("a MAC address is 6 bytes")
        self._native.send_rarp(list(mac))

    def gpu_set_socket(self, fd: FdLike) -> None:
        """``GPU_SET_SOCKET``: hands a vhost-user-gpu back-end the socket of its display protocol
        (borrowed: the back-end gets a duplicate)."""
        self._native.gpu_set_socket(fd)

    def send_iotlb_msg(self, msg: IotlbMessage) -> None:
        """``IOTLB_MSG`` (needs ``VIRTIO_F_IOMMU_PLATFORM``): one IOTLB update or
        invalidation, answered once the back-end has applied it. The name and argument
        are the kernel's (:meth:`vhost.kern.IotlbBackend.send_iotlb_msg`)."""
        self._native.iotlb_msg(msg.iova, msg.size, msg.uaddr, int(msg.perm), int(msg.type))

    def get_shared_object(self, uuid: _uuid.UUID) -> _core.FileDescriptor:
        """``GET_SHARED_OBJECT`` (needs ``SHARED_OBJECT``): the dma-buf a back-end exports under
        ``uuid``, as a :class:`FileDescriptor` the caller owns."""
        return self._native.get_shared_object(list(uuid.bytes))

    def set_device_state_fd(
        self, direction: int, phase: int, fd: FdLike
    ) -> _core.FileDescriptor | None:
        """``SET_DEVICE_STATE_FD`` (needs ``DEVICE_STATE``): starts a state transfer in
        ``direction`` (:class:`~vhost.codes.TransferDirection`) at ``phase`` over ``fd``;
        returns the back-end's own fd when it prefers to use that one.
        :meth:`save_device_state` and :meth:`load_device_state` do the whole exchange."""
        return self._native.set_device_state_fd(int(direction), int(phase), fd)

    def get_shmem_config(self) -> ShmemConfig:
        """``GET_SHMEM_CONFIG`` (needs ``ProtocolFeature.SHMEM`` negotiated, else
        :class:`~vhost.errors.InactiveFeatureError` before anything is sent): the sizes of
        the back-end's VIRTIO Shared Memory Regions. A malformed reply (wrong size, a count
        that is not the number of non-zero sizes) raises
        :class:`~vhost.errors.ProtocolError` and closes the connection."""
        return ShmemConfig(dict(self._native.get_shmem_config()))

    def check_device_state(self) -> None:
        """``CHECK_DEVICE_STATE``: asks whether the last state transfer succeeded; a refusal
        raises :class:`~vhost.errors.RequestRefusedError`."""
        self._native.check_device_state()

    def save_device_state(self) -> bytes:
        """The back-end's whole internal state, for a live migration's source (needs
        ``DEVICE_STATE``).

        A VMM migrating a device carries the back-end's state in its own stream, so the
        destination back-end resumes without the driver noticing. This makes the pipe,
        sends ``SET_DEVICE_STATE_FD`` (save, phase stopped), reads the state to its end
        (through the back-end's own channel if it returns one) and asks
        ``CHECK_DEVICE_STATE``, the back-end's only way to say that saving failed
        (:class:`~vhost.errors.RequestRefusedError`). Stop every ring first
        (:meth:`get_vring_base`): the spec's only phase is the device stopped. A back-end
        silent for the reply timeout is :class:`~vhost.errors.VhostTimeoutError`; one
        writing more than 64 MiB is :class:`~vhost.errors.ProtocolError`.
        """
        return self._native.save_device_state()

    def load_device_state(self, state: bytes) -> None:
        """Loads ``state`` (from :meth:`save_device_state` on the source) into the
        back-end, for a live migration's destination, before its rings start.

        Sends ``SET_DEVICE_STATE_FD`` (load, phase stopped), writes the state and closes
        the pipe, then asks ``CHECK_DEVICE_STATE``: a back-end that cannot use the state
        (garbage, another device's) refuses it there
        (:class:`~vhost.errors.RequestRefusedError`).
        """
        self._native.load_device_state(bytes(state))

    def postcopy_advise(self) -> _core.FileDescriptor:
        """``POSTCOPY_ADVISE`` (needs ``ProtocolFeature.PAGEFAULT``): the back-end opens a
        userfaultfd and returns it; resolve its faults with
        :class:`vhost.postcopy.FaultResolver`."""
        return self._native.postcopy_advise()

    def postcopy_listen(self) -> None:
        """``POSTCOPY_LISTEN``: the back-end registers its guest memory with the
        userfaultfd, so a device touching a missing page waits for it. Memory tables sent
        from now on take postcopy's form (the back-end answers with its mapping bases:
        :meth:`postcopy_regions`)."""
        self._native.postcopy_listen()

    def postcopy_end(self) -> None:
        """``POSTCOPY_END``: the back-end unregisters its memory (waking any waiter) and
        closes its userfaultfd; a non-zero status raises
        :class:`~vhost.errors.RequestRefusedError`."""
        self._native.postcopy_end()

    def postcopy_regions(self) -> list[PostcopyRegion]:
        """Where the back-end mapped each region, from its answers to ``SET_MEM_TABLE``
        and ``ADD_MEM_REG`` sent while postcopy listens (empty otherwise): what a
        :class:`vhost.postcopy.FaultResolver` translates fault addresses with."""
        return [PostcopyRegion(*r) for r in self._native.postcopy_regions()]

    def create_crypto_session(self, params: bytes) -> bytes:
        """``CREATE_CRYPTO_SESSION`` (needs ``CRYPTO_SESSION``): sends the session parameters of
        a virtio-crypto back-end and returns its answer (the session id in its layout)."""
        return self._native.create_crypto_session(bytes(params))

    def close_crypto_session(self, session_id: int) -> None:
        """``CLOSE_CRYPTO_SESSION``: closes crypto session ``session_id``."""
        self._native.close_crypto_session(session_id)

    def __repr__(self) -> str:
        if self._closed:
            return "<vhost.user.Frontend closed>"
        return f"<vhost.user.Frontend fd={self._native.fileno()}>"


def _refuse(request: str) -> NotSupportedError:
    return NotSupportedError(f"this back-end does not implement {request}", request)


class BackendHandler(abc.ABC):
    """The device side: one method per front-end request.

    Subclass it and override what your device supports; :meth:`get_features` and
    :meth:`get_vring_base` are abstract (as in the core's handler trait): every front-end
    asks the first, and stopping a ring needs the second. The session calls a method only
    after validating the message: ring indexes are below :attr:`max_queues`, ring sizes
    are valid, features were offered, gated requests were negotiated. Defaults accept the
    bookkeeping requests and refuse the rest with :class:`~vhost.errors.NotSupportedError`
    (sent to the front-end as a NACK when it asked for an ack; otherwise the connection
    closes, since the reply could not say "failed").

    Fds arrive as owned objects: :class:`~vhost.EventFd` for kick/call/err, and
    :class:`~vhost.user.FileDescriptor` for the rest; keep or close them.
    """

    #: Number of queues the device has.
    max_queues: int = 1
    #: Largest ring size the device accepts.
    max_queue_size: int = 32768

    # -- negotiation ---------------------------------------------------------------------

    @abc.abstractmethod
    def get_features(self) -> int:
        """``GET_FEATURES``: the virtio feature bits the device offers (with
        ``VHOST_USER_F_PROTOCOL_FEATURES``, bit 30, to negotiate protocol features)."""

    def set_features(self, features: int) -> None:
        """``SET_FEATURES``: the feature bits the driver acked (a subset of :meth:`get_features`;
        the session checked). Accepted by default."""

    def get_protocol_features(self) -> int:
        """``GET_PROTOCOL_FEATURES``: the protocol extensions the device supports; a device
        offering bit 30 in :meth:`get_features` must answer. Refused by default."""
        raise _refuse("GET_PROTOCOL_FEATURES")

    def set_protocol_features(self, features: int) -> None:
        """``SET_PROTOCOL_FEATURES``: the extensions the front-end uses; the session gates
        requests on them. Accepted by default."""

    def set_owner(self) -> None:
        """``SET_OWNER``: a front-end claims the device; the first request of a session. Accepted
        by default."""

    def reset_owner(self) -> None:
        """``RESET_OWNER``: the front-end gives the device up (deprecated; reset your state).
        Accepted by default."""

    def get_queue_num(self) -> int:
        """``GET_QUEUE_NUM`` (``MQ``): how many queues the device has; :attr:`max_queues` by
        default."""
        return self.max_queues

    # -- memory ---------------------------------------------------------------------------

    def set_mem_table(self, memory: GuestMemory) -> None:
        """The memory table was replaced; ``memory`` is mapped and ready to use."""

    def add_mem_region(self, memory: GuestMemory, region: MemoryRegion) -> None:
        """``ADD_MEM_REG``: ``region`` was mapped into ``memory`` (its ``fd`` is borrowed
        from ``memory``: duplicate it to keep it)."""

    def remove_mem_region(self, memory: GuestMemory, region: MemoryRegion) -> None:
        """``REM_MEM_REG``: ``region`` was removed from ``memory`` (its ``fd`` is -1; views
        of it stay valid until dropped)."""

    def get_max_mem_slots(self) -> int:
        """``GET_MAX_MEM_SLOTS`` (``CONFIGURE_MEM_SLOTS``): how many regions the device can map
        at once. Refused by default."""
        raise _refuse("GET_MAX_MEM_SLOTS")

    def set_log_base(self, mmap_size: int, mmap_offset: int, fd: _core.FileDescriptor) -> None:
        """The dirty log (``LOG_SHMFD``): map it with ``vhost.DirtyLog.adopt(fd, mmap_size,
        mmap_offset, memory)``, which checks it against the memory table, and
        :meth:`~vhost.DirtyLog.mark` every write to guest memory while ``VHOST_F_LOG_ALL``
        is acked. Refused by default."""
        raise _refuse("SET_LOG_BASE")

    def set_log_fd(self, fd: _core.FileDescriptor) -> None:
        """``SET_LOG_FD``: an eventfd to signal after logging dirty pages (legacy). Refused by
        default."""
        raise _refuse("SET_LOG_FD")

    # -- rings ----------------------------------------------------------------------------

    def set_vring_num(self, index: int, num: int) -> None:
        """``SET_VRING_NUM``: ring ``index`` has ``num`` descriptors (checked against
        :attr:`max_queue_size`). Ignored by default."""

    def set_vring_addr(self, index: int, addrs: VringAddrs) -> None:
        """``SET_VRING_ADDR``: where ring ``index`` lives, in front-end virtual addresses
        (translate with :meth:`GuestMemory.user_to_gpa`). Ignored by default."""

    def set_vring_base(self, index: int, base: int) -> None:
        """``SET_VRING_BASE``: ring ``index`` starts at ``base`` (the next avail index; packed
        rings add the wrap counter in bit 15): where a migrated or restarted ring resumes.
        Ignored by default."""

    @abc.abstractmethod
    def get_vring_base(self, index: int) -> int:
        """``GET_VRING_BASE``: stop ring ``index`` and return where it stopped (the next
        available index for a split ring; see :meth:`vhost.VhostBackend.set_vring_base`)."""

    def set_vring_kick(self, index: int, fd: _core.EventFd | None) -> None:
        """``SET_VRING_KICK``: the eventfd the driver signals when ring ``index`` has buffers
        (None: poll the ring); start processing the ring on it. Yours to keep or close.
        Ignored by default."""

    def set_vring_call(self, index: int, fd: _core.EventFd | None) -> None:
        """``SET_VRING_CALL``: the eventfd to signal after returning buffers on ring ``index``
        (None: no interrupts). Ignored by default."""

    def set_vring_err(self, index: int, fd: _core.EventFd | None) -> None:
        """``SET_VRING_ERR``: the eventfd to signal when ring ``index`` breaks. Ignored by
        default."""

    def set_vring_enable(self, index: int, enable: bool) -> None:
        """``SET_VRING_ENABLE``: ring ``index`` may (or may no longer) be processed. Ignored by
        default."""

    def set_vring_endian(self, index: int, big_endian: bool) -> None:
        """``SET_VRING_ENDIAN`` (``CROSS_ENDIAN``): the byte order of a legacy ring. Refused by
        default."""
        raise _refuse("SET_VRING_ENDIAN")

    def vring_kick(self, index: int) -> None:
        """``VRING_KICK`` (``INBAND_NOTIFICATIONS``): an in-band kick of ring ``index``. Refused
        by default."""
        raise _refuse("VRING_KICK")

    # -- device ---------------------------------------------------------------------------

    def get_config(self, offset: int, size: int, flags: int) -> bytes:
        """``GET_CONFIG`` (``CONFIG``): ``size`` bytes of the config space from ``offset``;
        return exactly ``size`` bytes (the front-end refuses a shorter answer). Refused by
        default."""
        raise _refuse("GET_CONFIG")

    def set_config(self, offset: int, data: bytes, flags: int) -> None:
        """``SET_CONFIG`` (``CONFIG``): the driver writes ``data`` at ``offset`` of the config
        space. Refused by default."""
        raise _refuse("SET_CONFIG")

    def set_backend_channel(self, channel: BackendChannel) -> None:
        """The front-end opened the back-end request channel."""

    def get_inflight_fd(self, num_queues: int, queue_size: int) -> InflightArea:
        """``GET_INFLIGHT_FD`` (``INFLIGHT_SHMFD``): allocate the area that tracks requests
        in flight for ``num_queues`` rings of ``queue_size`` entries, so a restarted
        back-end can finish them. Refused by default."""
        raise _refuse("GET_INFLIGHT_FD")

    def set_inflight_fd(self, info: InflightInfo) -> None:
        """``SET_INFLIGHT_FD``: the area a previous :meth:`get_inflight_fd` handed out,
        back after a reconnect (``info.fd`` is yours to keep or close). Refused by
        default."""
        raise _refuse("SET_INFLIGHT_FD")

    def send_rarp(self, mac: bytes) -> None:
        """``SEND_RARP`` (``RARP``): announce the 6-byte ``mac`` (a net device, after migration).
        Refused by default."""
        raise _refuse("SEND_RARP")

    def net_set_mtu(self, mtu: int) -> None:
        """``NET_SET_MTU`` (``MTU``): use ``mtu`` bytes. Refused by default."""
        raise _refuse("NET_SET_MTU")

    def iotlb_msg(self, message: IotlbMessage) -> None:
        """``IOTLB_MSG`` (``IOMMU_PLATFORM``): the front-end updates or invalidates an
        IOTLB entry, so ring and buffer addresses are I/O virtual addresses. Refused by
        default."""
        raise _refuse("IOTLB_MSG")

    def reset_device(self) -> None:
        """``RESET_DEVICE``: return to the initial state (stop rings, forget features); the
        connection stays. Accepted by default."""

    def set_status(self, status: int) -> None:
        """``SET_STATUS`` (``STATUS``): the driver's virtio status byte. Ignored by default."""

    def get_status(self) -> int:
        """``GET_STATUS`` (``STATUS``): the device status byte. Refused by default."""
        raise _refuse("GET_STATUS")

    def gpu_set_socket(self, fd: _core.FileDescriptor) -> None:
        """``GPU_SET_SOCKET``: the socket of the vhost-user-gpu display protocol. Refused by
        default."""
        raise _refuse("GPU_SET_SOCKET")

    def get_shared_object(self, uuid: bytes) -> FdLike:
        """``GET_SHARED_OBJECT`` (``SHARED_OBJECT``): the dma-buf exported under ``uuid``
        (duplicated to send: it stays yours). Refused by default."""
        raise _refuse("GET_SHARED_OBJECT")

    def get_shmem_config(self) -> Mapping[int, int]:
        """The device's VIRTIO Shared Memory Regions, shared memory id (0-255) to size in
        bytes (``ShmemConfig.regions`` fits). Asked only once ``SHMEM`` is negotiated, so
        offer it in :meth:`get_protocol_features` too. Refused by default."""
        raise _refuse("GET_SHMEM_CONFIG")

    def set_device_state_fd(
        self, direction: int, phase: int, fd: _core.FileDescriptor
    ) -> FdLike | None:
        """``SET_DEVICE_STATE_FD`` (``DEVICE_STATE``): write (save) or read (load) the device
        state over ``fd`` in ``direction`` at ``phase``; return another fd to use instead, or
        None. Refused by default."""
        raise _refuse("SET_DEVICE_STATE_FD")

    def check_device_state(self) -> None:
        """``CHECK_DEVICE_STATE``: raise if the last state transfer failed (the front-end's only
        way to learn it). Refused by default."""
        raise _refuse("CHECK_DEVICE_STATE")

    def postcopy_advise(self) -> FdLike:
        """``POSTCOPY_ADVISE`` (``PAGEFAULT``): open a userfaultfd and return it. Refused by
        default."""
        raise _refuse("POSTCOPY_ADVISE")

    def postcopy_listen(self) -> None:
        """``POSTCOPY_LISTEN``: register guest memory with the userfaultfd. Refused by default."""
        raise _refuse("POSTCOPY_LISTEN")

    def postcopy_end(self) -> None:
        """``POSTCOPY_END``: unregister memory and close the userfaultfd. Refused by default."""
        raise _refuse("POSTCOPY_END")

    def create_crypto_session(self, params: bytes) -> bytes:
        """``CREATE_CRYPTO_SESSION`` (``CRYPTO_SESSION``): open a session with ``params`` and
        return the answer payload. Refused by default."""
        raise _refuse("CREATE_CRYPTO_SESSION")

    def close_crypto_session(self, session_id: int) -> None:
        """``CLOSE_CRYPTO_SESSION``: close session ``session_id``. Refused by default."""
        raise _refuse("CLOSE_CRYPTO_SESSION")

    # -- errors ---------------------------------------------------------------------------

    def on_request_error(self, error: BaseException) -> None:
        """A request failed and was NACKed; the connection goes on. Logs by default."""
        log.info("request refused: %s", error)


class FrontendRequestHandler:
    """Answers the requests a back-end sends on its request channel.

    Return 0 (or None) for success; raise to refuse (the back-end gets a NACK when it
    asked for an ack). Defaults refuse.
    """

    def config_change(self) -> int | None:
        """``CONFIG_CHANGE_MSG``: the device's config space changed; re-read it (``get_config``)
        and tell the driver. Refused by default."""
        raise _refuse("CONFIG_CHANGE_MSG")

    def vring_host_notifier(
        self, index: int, size: int, offset: int, fd: _core.FileDescriptor | None
    ) -> int | None:
        """``VRING_HOST_NOTIFIER_MSG``: the back-end offers ``size`` bytes of ``fd`` at
        ``offset`` as ring ``index``'s doorbell, for the guest to kick it directly (None:
        withdraw it). Refused by default."""
        raise _refuse("VRING_HOST_NOTIFIER_MSG")

    def vring_call(self, index: int) -> int | None:
        """``VRING_CALL``: an in-band interrupt for ring ``index``; inject it into the guest.
        Refused by default."""
        raise _refuse("VRING_CALL")

    def vring_err(self, index: int) -> int | None:
        """``VRING_ERR``: ring ``index`` failed in the back-end. Refused by default."""
        raise _refuse("VRING_ERR")

    def iotlb_msg(self, message: IotlbMessage) -> int | None:
        """``IOTLB_MSG`` from the back-end: a miss (translate ``message.iova`` and answer
        with an update on the front-end's own ``iotlb_msg``) or an access failure."""
        raise _refuse("IOTLB_MSG")

    def shared_object_add(self, uuid: bytes) -> int | None:
        """``SHARED_OBJECT_ADD``: the back-end exports an object under ``uuid`` (16 bytes).
        Refused by default."""
        raise _refuse("SHARED_OBJECT_ADD")

    def shared_object_remove(self, uuid: bytes) -> int | None:
        """``SHARED_OBJECT_REMOVE``: the back-end withdraws ``uuid``. Refused by default."""
        raise _refuse("SHARED_OBJECT_REMOVE")

    def shared_object_lookup(self, uuid: bytes) -> int | SharedObject | None:
        """``SHARED_OBJECT_LOOKUP``: 0 (or None) when the object is known, another status
        when not; a :class:`SharedObject` sends its dma-buf with the answer. Refused by
        default."""
        raise _refuse("SHARED_OBJECT_LOOKUP")

    def shmem_map(  # noqa: PLR0917 - the order of BackendChannel.shmem_map
        self,
        shmid: int,
        fd_offset: int,
        shm_offset: int,
        length: int,
        fd: _core.FileDescriptor,
        flags: int,
    ) -> int | None:
        """Map ``length`` bytes of ``fd`` at ``fd_offset`` into shared memory region
        ``shmid`` at ``shm_offset`` (SHMEM_MAP; the seed's virtio-fs ``fs_slave_map``,
        whose DAX window is region 0). ``flags`` bit 0: writable. The arguments come in
        the order :meth:`BackendChannel.shmem_map` takes them."""
        raise _refuse("SHMEM_MAP")

    def shmem_unmap(self, shmid: int, shm_offset: int, length: int) -> int | None:
        """Undo a :meth:`shmem_map` (SHMEM_UNMAP; the seed's ``fs_slave_unmap``)."""
        raise _refuse("SHMEM_UNMAP")

    def unknown_request(self, name: str) -> int | None:
        """A request this package does not decode, by ``name``; refused (a NACK) by default."""
        raise _refuse(name)


class BackendListener(Closing):
    """A back-end in server mode: listens at ``path`` and accepts front-ends.

    The socket path is unlinked on :meth:`close` (or when the context exits).
    """

    def __init__(self, path: str | os.PathLike[str], *, replace_stale: bool = True) -> None:
        self._listener = _core.Listener(os.fspath(path), replace_stale)

    @property
    def path(self) -> Path:
        """The socket's path (unlinked on :meth:`close`)."""
        return Path(self._listener.path)

    def fileno(self) -> int:
        """The listening fd, for a poll loop that accepts when it is readable."""
        return self._listener.fileno()

    def accept(self, timeout: float | None = None) -> BackendSession:
        """Waits for a front-end (``None``: forever). Ctrl-C interrupts the wait and the
        listener keeps accepting afterwards."""
        return self._listener.accept_backend(timeout)

    def serve_forever(
        self,
        make_handler: type[BackendHandler] | None = None,
        handler: BackendHandler | None = None,
    ) -> None:
        """Serves one front-end after another until interrupted: Ctrl-C raises
        ``KeyboardInterrupt`` promptly, whether waiting for a front-end or serving one (whose
        session is closed). Each front-end gets ``handler``, or a new ``make_handler()``;
        one of the two is required."""
        if handler is None and make_handler is None:
            raise InvalidParamError("serve_forever needs a handler or a make_handler class")
        while True:
            session = self.accept()
            h = handler if handler is not None else cast(type[BackendHandler], make_handler)()
            try:
                session.serve(h)
            except Exception as exc:  # one bad front-end must not stop us
                log.warning("front-end session ended with an error: %s", exc)

    def close(self) -> None:
        """Stops listening and unlinks the path; a thread blocked in :meth:`accept` wakes up with
        :class:`~vhost.errors.ClosedError`."""
        self._listener.close()


@contextmanager
def serve_in_thread(session: BackendSession, handler: BackendHandler) -> Iterator[threading.Thread]:
    """Runs ``session.serve(handler)`` in a daemon thread for the duration of the block;
    the session is closed and the thread joined on exit. The thread's exception, if
    any, is re-raised on exit."""
    errors: list[BaseException] = []

    def run() -> None:
        try:
            session.serve(handler)
        except BaseException as exc:  # handed to the caller
            errors.append(exc)

    t = threading.Thread(target=run, name="vhost-user-backend", daemon=True)
    t.start()
    try:
        yield t
    finally:
        session.close()
        t.join(10)
    if errors and not isinstance(errors[0], OSError | ConnectionError):
        raise errors[0]
