"""A virtio-blk driver over vhost-user: this process plays the guest.

:class:`BlkDriver` connects to any vhost-user-blk back-end (qemu-storage-daemon, ours),
negotiates, shares one memfd region of "guest RAM" holding the virtqueue and the I/O
buffers, sets queue 0 up with kick and call eventfds, and then moves real blocks through
the ring, the way the Linux ``virtio_blk`` driver does in a guest::

    with BlkDriver.connect("/run/blk.sock") as disk:
        disk.write(0, b"\\xab" * 4096)
        disk.flush()
        assert disk.read(0, 4096) == b"\\xab" * 4096

Each request is a descriptor chain: the 16-byte ``struct virtio_blk_outhdr`` (type,
reserved, sector), the data segments (device-readable for a write, device-writable for a
read), and a 1-byte device-writable status. A status other than ``VIRTIO_BLK_S_OK``
raises :class:`BlkIOError`, which carries it.

For queue depth above one, :meth:`BlkDriver.submit` places many requests on the ring with
one publish and (at most) one kick, and :meth:`BlkDriver.wait` collects completions,
sleeping on the call eventfd (with EVENT_IDX, the device only signals when asked to).

Offsets and lengths are bytes and must be multiples of 512 (the virtio-blk sector), or
:class:`~vhost.errors.InvalidParamError` is raised before anything is sent; so is I/O of
the one-call methods (:meth:`BlkDriver.read`, ``write``, ``discard``, ``write_zeroes``)
that runs past the end of the disk, whose capacity the driver read at connect
(:meth:`BlkDriver.submit` sends what it is given, so a device's own checks can be tested).

While it waits for completions the driver also watches the vhost-user socket: a back-end
that exits or closes the connection fails the wait at once with
:class:`~vhost.errors.DisconnectedError` instead of after the timeout.
"""

from __future__ import annotations

import enum
import math
import os
import select
import struct
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Self

from .. import _core
from .._closing import Closing
from ..codes import ProtocolFeature
from ..errors import (
    ClosedError,
    DisconnectedError,
    InvalidParamError,
    NotSupportedError,
    VhostError,
    VhostTimeoutError,
)
from ..user import Frontend, GuestMemory, regions_of
from ..virtio import (
    BlkFeature,
    DeviceId,
    VirtioFeature,
    Virtqueue,
    place_rings,
    ring_sizes,
    setup_queue,
)
from .config import decode_config

__all__ = [
    "READ_ONLY_REASON",
    "SECTOR_SIZE",
    "BlkCompletion",
    "BlkDriver",
    "BlkIOError",
    "BlkRequest",
    "BlkRequestType",
    "BlkStatus",
]

SECTOR_SIZE = 512
"""virtio-blk addresses the disk in 512-byte sectors, whatever its ``blk_size``."""

CONFIG_SIZE = 60
"""Bytes of ``struct virtio_blk_config`` read at connect (up to ``write_zeroes_may_unmap``)."""

ID_BYTES = 20
"""``VIRTIO_BLK_ID_BYTES``: the length of the device id string."""

_OUTHDR = struct.Struct("<IIQ")
_DISCARD_SEG = struct.Struct("<QII")
_WRITE_ZEROES_F_UNMAP = 1

#: Guest-physical layout of the shared region: rings at 0, then per-slot metadata (header
#: and status), then per-slot data windows.
_RING_BASE = 0
_META_STRIDE = 32  # 16-byte header, status byte at 16, padding
_PAGE = 4096
_HANGUP = select.POLLRDHUP | select.POLLHUP | select.POLLERR | select.POLLNVAL


class BlkRequestType(enum.IntEnum):
    """``VIRTIO_BLK_T_*``: the request types this driver sends."""

    IN = 0
    OUT = 1
    FLUSH = 4
    GET_ID = 8
    DISCARD = 11
    WRITE_ZEROES = 13


class BlkStatus(enum.IntEnum):
    """``VIRTIO_BLK_S_*``: the status byte the device writes last."""

    OK = 0
    IOERR = 1
    UNSUPP = 2


_NO_SECTOR = frozenset(
    {
        BlkRequestType.FLUSH,
        BlkRequestType.GET_ID,
        BlkRequestType.DISCARD,
        BlkRequestType.WRITE_ZEROES,
    }
)
"""Requests whose header sector is 0 (the spec: the driver sets it to 0, the device ignores it)."""


def status_name(status: int) -> str:
    """``"IOERR"`` for 1; ``"status 0x7f"`` for a value the spec does not define."""
    try:
        return BlkStatus(status).name
    except ValueError:
        return f"status {status:#x}"


READ_ONLY_REASON = "the device is read-only (VIRTIO_BLK_F_RO); nothing was sent"
"""Why a write to a device that offered ``VIRTIO_BLK_F_RO`` fails without being sent
(the message of that :class:`BlkIOError`, and of the CLI's checks before a load runs)."""


class BlkIOError(VhostError):
    """The device completed a request with a status other than ``VIRTIO_BLK_S_OK``.

    ``status`` is the status byte (a :class:`BlkStatus` value where the spec defines
    it), ``request`` the request type. A write to a device that offered
    ``VIRTIO_BLK_F_RO`` is refused locally with ``IOERR`` (``local`` is then true and
    nothing was sent), as the Linux driver does.
    """

    status: int
    request: int
    local: bool

    def __init__(
        self, status: int, request: int, message: str | None = None, local: bool = False
    ) -> None:
        if message is None:
            message = (
                f"virtio-blk {_request_name(request)} failed: VIRTIO_BLK_S_{status_name(status)}"
            )
        super().__init__(message)
        self.status = status
        self.request = request
        self.local = local

    @property
    def status_name(self) -> str:
        """``"IOERR"``, ``"UNSUPP"``... (the ``VIRTIO_BLK_S_`` suffix)."""
        return status_name(self.status)

    def __reduce__(self) -> tuple[object, ...]:
        return (
            type(self),
            (self.status, self.request, str(self), self.local),
            self.__dict__,
        )


def _request_name(kind: int) -> str:
    try:
        return BlkRequestType(kind).name
    except ValueError:
        return f"request type {kind}"


@dataclass(frozen=True, slots=True)
class BlkRequest:
    """One request for :meth:`BlkDriver.submit`.

    ``offset`` is in bytes (a multiple of 512). ``data`` is what an ``OUT`` request
    writes; ``length`` is how many bytes an ``IN`` request reads (``GET_ID``: 20).
    ``DISCARD``/``WRITE_ZEROES`` cover ``length`` bytes from ``offset``.
    """

    type: BlkRequestType
    offset: int = 0
    length: int = 0
    data: bytes | bytearray | memoryview | None = None
    unmap: bool = False

    @classmethod
    def read(cls, offset: int, length: int) -> BlkRequest:
        """An ``IN`` request: read ``length`` bytes at byte ``offset`` (both multiples of 512)."""
        return cls(BlkRequestType.IN, offset, length)

    @classmethod
    def write(cls, offset: int, data: bytes | bytearray | memoryview) -> BlkRequest:
        """An ``OUT`` request: write ``data`` at byte ``offset`` (both multiples of 512)."""
        return cls(BlkRequestType.OUT, offset, len(data), data)

    @classmethod
    def flush(cls) -> BlkRequest:
        """A ``FLUSH`` request: make earlier writes durable (needs ``VIRTIO_BLK_F_FLUSH``)."""
        return cls(BlkRequestType.FLUSH)


@dataclass(frozen=True, slots=True)
class BlkCompletion:
    """A completed request: its tag (from :meth:`BlkDriver.submit`), the status byte,
    the bytes the device reported writing into the chain, and the data an ``IN`` or
    ``GET_ID`` request read (``None`` for the others)."""

    tag: int
    type: BlkRequestType
    status: int
    used_len: int
    data: bytes | None

    @property
    def ok(self) -> bool:
        """Whether the device answered ``VIRTIO_BLK_S_OK``."""
        return self.status == BlkStatus.OK

    def check(self) -> Self:
        """Returns ``self``, or raises :class:`BlkIOError` when the status is not OK."""
        if self.status != BlkStatus.OK:
            raise BlkIOError(self.status, self.type)
        return self


@dataclass(slots=True)
class _Slot:
    index: int
    meta: int  # gpa of header (status at +16)
    data: int  # gpa of the data window
    kind: BlkRequestType = BlkRequestType.IN
    read_len: int = 0
    tag: int = 0


def _check_sector_multiple(what: str, value: int) -> None:
    if value < 0 or value % SECTOR_SIZE:
        raise InvalidParamError(f"{what} must be a non-negative multiple of {SECTOR_SIZE}: {value}")


class BlkDriver(Closing):
    """A virtio-blk driver on queue 0 of a vhost-user-blk back-end.

    Use :meth:`connect`. ``slots`` requests can be in flight at once, each with a data
    window of ``max_request`` bytes; :meth:`read` and :meth:`write` split larger I/O into
    several requests. Each request's data is handed to the device in segments of at most
    ``segment_size`` bytes (fewer if the device's ``seg_max``/``size_max`` say so), so a
    large request is a multi-descriptor chain.

    ``iommu=True`` (``bench blk --iommu``) also acks ``VIRTIO_F_ACCESS_PLATFORM`` and
    ``BACKEND_REQ`` (:class:`~vhost.errors.NotSupportedError` when the back-end offers
    either not) and leaves queue 0 unset: only :meth:`native_load` drives it, playing the
    IOMMU and handing the ring over at I/O virtual addresses.
    """

    SUPPORTED_FEATURES = (
        VirtioFeature.VERSION_1
        | VirtioFeature.PROTOCOL_FEATURES
        | VirtioFeature.RING_INDIRECT_DESC
        | BlkFeature.SIZE_MAX
        | BlkFeature.SEG_MAX
        | BlkFeature.BLK_SIZE
        | BlkFeature.FLUSH
        | BlkFeature.DISCARD
        | BlkFeature.WRITE_ZEROES
        | BlkFeature.RO
        | BlkFeature.MQ
    )
    """Feature bits the driver acks when offered (plus EVENT_IDX and PACKED on request)."""

    PROTOCOL_FEATURES = (
        ProtocolFeature.MQ
        | ProtocolFeature.REPLY_ACK
        | ProtocolFeature.CONFIG
        | ProtocolFeature.CONFIGURE_MEM_SLOTS
        | ProtocolFeature.LOG_SHMFD
    )
    """Acked when offered; ``LOG_SHMFD`` lets ``frontend.start_dirty_log`` run on the
    driver's connection (``bench blk --dirty-log``) and changes nothing until then."""

    def __init__(
        self,
        frontend: Frontend,
        *,
        queue_size: int = 128,
        packed: bool = False,
        event_idx: bool = True,
        slots: int = 32,
        max_request: int = 128 * 1024,
        segment_size: int = 32 * 1024,
        timeout: float = 10.0,
        iommu: bool = False,
    ) -> None:
        self._fe = frontend
        self._closed = False
        self.timeout = timeout
        _check_sector_multiple("max_request", max_request)
        if max_request == 0 or segment_size <= 0 or slots <= 0:
            raise InvalidParamError("slots, max_request and segment_size must be positive")
        want = int(self.SUPPORTED_FEATURES)
        if event_idx:
            want |= int(VirtioFeature.RING_EVENT_IDX)
        if packed:
            want |= int(VirtioFeature.RING_PACKED)
        self._offered = frontend.get_features()
        wanted_proto = self.PROTOCOL_FEATURES | (ProtocolFeature.BACKEND_REQ if iommu else 0)
        features, proto = frontend.negotiate(
            features=want,
            protocol_features=int(wanted_proto),
            packed=packed,  # NotSupportedError if the back-end has no packed rings
            event_idx=event_idx,
        )
        if not features & VirtioFeature.VERSION_1:
            raise NotSupportedError("the back-end does not offer VIRTIO_F_VERSION_1")
        if not proto & ProtocolFeature.CONFIG:
            raise NotSupportedError(
                "the back-end does not offer VHOST_USER_PROTOCOL_F_CONFIG: no capacity"
            )
        if iommu:
            features = self._ack_access_platform(features, proto)
        self._iommu = iommu
        self._features = features
        self._protocol_features = proto
        self.packed = bool(features & VirtioFeature.RING_PACKED)
        self.event_idx = bool(features & VirtioFeature.RING_EVENT_IDX)
        self.num_queues = frontend.get_queue_num() if proto & ProtocolFeature.MQ else 1
        self._raw_config = frontend.get_config(0, CONFIG_SIZE)
        self.config = decode_config(DeviceId.BLOCK, self._raw_config)

        seg = segment_size
        if features & BlkFeature.SIZE_MAX and self._cfg("size_max"):
            seg = min(seg, self._cfg("size_max"))
        seg = max(SECTOR_SIZE, seg - seg % SECTOR_SIZE)
        self._segment_size = seg
        max_segs = max(1, queue_size - 2)
        if features & BlkFeature.SEG_MAX and self._cfg("seg_max"):
            max_segs = min(max_segs, self._cfg("seg_max"))
        self._max_request = min(max_request, max_segs * seg)
        self.queue_size = queue_size

        # Memory: rings, metadata for every slot, data windows, page-aligned.
        desc, avail, used = place_rings(_RING_BASE, queue_size, packed=self.packed)
        ring_end = max(
            a + n
            for a, n in zip((desc, avail, used), ring_sizes(queue_size, self.packed), strict=True)
        )
        meta_base = _align(ring_end, _PAGE)
        data_base = _align(meta_base + slots * _META_STRIDE, _PAGE)
        window = _align(self._max_request, _PAGE)
        total = _align(data_base + slots * window, 1 << 21)
        self.memory = GuestMemory.allocate([(0, total)])
        self._slots = [
            _Slot(i, meta_base + i * _META_STRIDE, data_base + i * window) for i in range(slots)
        ]
        self._free_slots = list(reversed(self._slots))
        self._inflight: dict[int, _Slot] = {}
        self._done: list[BlkCompletion] = []
        self._next_tag = 0
        self._unpublished = False
        frontend.set_mem_table(regions_of(self.memory))
        self.queue = Virtqueue(
            self.memory, queue_size, desc, avail, used, packed=self.packed, event_idx=self.event_idx
        )
        self.kick = _core.EventFd()
        self.call = _core.EventFd()
        if not iommu:  # behind the IOMMU, native_load sets the queue up at I/O addresses
            setup_queue(frontend, 0, self.memory, self.queue, self.kick, self.call)
        self.kicks = 0
        self.wakeups = 0
        self._handed_off = False
        # Completions wake us through the call eventfd; a hang-up of the socket means the
        # back-end is gone and nothing will ever complete.
        self._waiter = select.poll()
        self._waiter.register(self.call.fileno(), select.POLLIN)
        self._socket_fd = frontend.fileno()
        self._waiter.register(self._socket_fd, select.POLLRDHUP)

    def _ack_access_platform(self, features: int, proto: int) -> int:
        """``iommu``: acks ``VIRTIO_F_ACCESS_PLATFORM`` (``negotiate`` acks only the ring
        bits of the Python rings) and checks the channel misses come on; returns the
        features acked."""
        if not self._offered & VirtioFeature.ACCESS_PLATFORM:
            raise NotSupportedError(
                "the back-end does not offer VIRTIO_F_ACCESS_PLATFORM: it cannot work behind "
                "an IOMMU"
            )
        if not proto & ProtocolFeature.BACKEND_REQ:
            raise NotSupportedError(
                "the back-end does not offer VHOST_USER_PROTOCOL_F_BACKEND_REQ: it cannot "
                "send IOTLB misses"
            )
        features |= int(VirtioFeature.ACCESS_PLATFORM)
        self._fe.set_features(features)
        return features

    # -- construction ---------------------------------------------------------------------

    @classmethod
    def connect(
        cls,
        socket_path: str | os.PathLike[str],
        *,
        queue_size: int = 128,
        packed: bool = False,
        event_idx: bool = True,
        timeout: float = 10.0,
        slots: int = 32,
        max_request: int = 128 * 1024,
        segment_size: int = 32 * 1024,
    ) -> BlkDriver:
        """Connects to the back-end at ``socket_path`` and sets queue 0 up.

        ``packed=True`` requires the back-end to offer ``VIRTIO_F_RING_PACKED``
        (:class:`~vhost.errors.NotSupportedError` otherwise); ``event_idx`` acks
        ``VIRTIO_F_RING_EVENT_IDX`` when offered. ``timeout`` bounds every wait for a
        vhost-user reply and for a completion.
        """
        fe = Frontend.connect(socket_path, timeout=timeout)
        try:
            return cls(
                fe,
                queue_size=queue_size,
                packed=packed,
                event_idx=event_idx,
                timeout=timeout,
                slots=slots,
                max_request=max_request,
                segment_size=segment_size,
            )
        except BaseException:
            fe.close()
            raise

    # -- properties -----------------------------------------------------------------------

    def _cfg(self, name: str) -> int:
        value = self.config.get(name, 0)
        return value if isinstance(value, int) else 0

    @property
    def frontend(self) -> Frontend:
        """The vhost-user connection under the driver, for requests it does not wrap."""
        return self._fe

    @property
    def features(self) -> int:
        """The feature bits acked to the back-end."""
        return self._features

    @property
    def offered_features(self) -> int:
        """The feature bits the back-end offered, before this driver chose its subset
        (:attr:`features`)."""
        return self._offered

    @property
    def protocol_features(self) -> ProtocolFeature:
        """The protocol features negotiated with the back-end."""
        return self._protocol_features

    @property
    def capacity(self) -> int:
        """Size of the disk in 512-byte sectors (``virtio_blk_config.capacity``)."""
        return self._cfg("capacity")

    @property
    def size(self) -> int:
        """Size of the disk in bytes."""
        return self.capacity * SECTOR_SIZE

    @property
    def block_size(self) -> int:
        """The device's logical block size (``blk_size`` with BLK_SIZE, else 512)."""
        if self._features & BlkFeature.BLK_SIZE and self._cfg("blk_size"):
            return self._cfg("blk_size")
        return SECTOR_SIZE

    @property
    def read_only(self) -> bool:
        """Whether the device is read-only (``VIRTIO_BLK_F_RO``): writes raise before anything is
        sent."""
        return bool(self._features & BlkFeature.RO)

    @property
    def max_request(self) -> int:
        """Largest data length of one request."""
        return self._max_request

    @property
    def segment_size(self) -> int:
        """Bytes of one data segment: the device's ``size_max`` (or 32 KiB) in whole sectors."""
        return self._segment_size

    @property
    def in_flight(self) -> int:
        """Requests submitted and not yet completed."""
        return len(self._inflight)

    @property
    def slots(self) -> int:
        """How many requests may be in flight at once (each slot has its own header, status byte
        and data window)."""
        return len(self._slots)

    def has_feature(self, feature: int) -> bool:
        """Whether ``feature`` (a :class:`~vhost.virtio.BlkFeature` bit) was negotiated, to check
        before a request that needs it."""
        return bool(self._features & feature)

    # -- the batched interface ------------------------------------------------------------

    def _check_request(self, req: BlkRequest) -> None:
        kind = req.type
        if kind in (
            BlkRequestType.IN,
            BlkRequestType.OUT,
            BlkRequestType.DISCARD,
            BlkRequestType.WRITE_ZEROES,
        ):
            _check_sector_multiple("offset", req.offset)
            _check_sector_multiple("length", req.length)
            if kind in (BlkRequestType.IN, BlkRequestType.OUT) and req.length == 0:
                raise InvalidParamError("a read or write needs a non-zero length")
        if kind in (BlkRequestType.IN, BlkRequestType.OUT) and req.length > self._max_request:
            raise InvalidParamError(
                f"one request carries at most {self._max_request} bytes: {req.length}"
            )
        if kind == BlkRequestType.OUT and (req.data is None or len(req.data) != req.length):
            raise InvalidParamError("an OUT request needs data of exactly its length")
        if kind == BlkRequestType.DISCARD:
            self._require(BlkFeature.DISCARD, "DISCARD")
        if kind == BlkRequestType.WRITE_ZEROES:
            self._require(BlkFeature.WRITE_ZEROES, "WRITE_ZEROES")
        if kind == BlkRequestType.FLUSH:
            self._require(BlkFeature.FLUSH, "FLUSH")

    def _require(self, feature: BlkFeature, name: str) -> None:
        if not self._features & feature:
            raise NotSupportedError(
                f"the device does not offer VIRTIO_BLK_F_{name}", f"VIRTIO_BLK_T_{name}"
            )

    def _segments(self, gpa: int, length: int) -> list[tuple[int, int]]:
        seg = self._segment_size
        return [(gpa + o, min(seg, length - o)) for o in range(0, length, seg)]

    def _descriptors_needed(self, req: BlkRequest) -> int:
        if req.type in (BlkRequestType.IN, BlkRequestType.OUT):
            return 2 + -(-req.length // self._segment_size)
        if req.type == BlkRequestType.FLUSH:
            return 2
        return 3

    def submit(self, requests: Iterable[BlkRequest], *, kick: bool = True) -> list[int]:
        """Places ``requests`` on the ring, publishes them together and kicks if the
        device wants it; returns one tag per request (for :meth:`wait`). With
        ``kick=False`` they are published by the next :meth:`submit` or :meth:`wait`.

        Every request is checked before any is placed. When slots or descriptors run
        out, completions are collected first (those are kept for :meth:`wait`).
        """
        if self._handed_off:
            raise ClosedError("queue 0 was handed to a native load loop (native_load)")
        if self._iommu:
            raise ClosedError("queue 0 is behind an IOMMU: only native_load drives it")
        reqs = list(requests)
        for r in reqs:
            self._check_request(r)
            if self._descriptors_needed(r) > self.queue_size:
                raise InvalidParamError("request needs more descriptors than the queue has")
        tags: list[int] = []
        for r in reqs:
            while not self._free_slots or self.queue.num_free < self._descriptors_needed(r):
                if not self._inflight:
                    raise InvalidParamError("request does not fit an empty queue")
                self._publish_and_kick()
                self._reap(block=True, timeout=self.timeout)
            tags.append(self._place(r))
        if kick:
            self._publish_and_kick()
        else:
            self._unpublished = True
        return tags

    def _place(self, req: BlkRequest) -> int:
        slot = self._free_slots.pop()
        mem = self.memory
        kind = req.type
        sector = 0 if kind in _NO_SECTOR else req.offset // SECTOR_SIZE
        mem.write(slot.meta, _OUTHDR.pack(int(kind), 0, sector) + b"\xff")
        status = [(slot.meta + 16, 1)]
        readable = [(slot.meta, 16)]
        writable: list[tuple[int, int]]
        read_len = 0
        if kind == BlkRequestType.IN:
            read_len = req.length
            writable = [*self._segments(slot.data, req.length), *status]
        elif kind == BlkRequestType.OUT:
            assert req.data is not None
            mem.write(slot.data, req.data)
            readable += self._segments(slot.data, req.length)
            writable = status
        elif kind == BlkRequestType.GET_ID:
            read_len = ID_BYTES
            writable = [(slot.data, ID_BYTES), *status]
        elif kind in (BlkRequestType.DISCARD, BlkRequestType.WRITE_ZEROES):
            flags = _WRITE_ZEROES_F_UNMAP if req.unmap else 0
            mem.write(
                slot.data,
                _DISCARD_SEG.pack(req.offset // SECTOR_SIZE, req.length // SECTOR_SIZE, flags),
            )
            readable.append((slot.data, _DISCARD_SEG.size))
            writable = status
        else:
            writable = status
        try:
            head = self.queue.add(readable, writable)
        except BaseException:
            self._free_slots.append(slot)
            raise
        slot.kind = kind
        slot.read_len = read_len
        slot.tag = self._next_tag
        self._next_tag += 1
        self._inflight[head] = slot
        return slot.tag

    def _publish_and_kick(self) -> None:
        self._unpublished = False
        self.queue.publish()
        if self.queue.kick_needed():
            self.kicks += 1
            self.kick.write(1)

    def _complete(self, head: int, used_len: int) -> BlkCompletion:
        slot = self._inflight.pop(head)
        mem = self.memory
        status = mem.read(slot.meta + 16, 1)[0]
        data = None
        if slot.read_len:
            data = mem.read(slot.data, slot.read_len)
        self._free_slots.append(slot)
        return BlkCompletion(slot.tag, slot.kind, status, used_len, data)

    def _reap(self, *, block: bool, timeout: float | None) -> list[BlkCompletion]:
        deadline = None if timeout is None else time.monotonic() + timeout
        while True:
            used = self.queue.poll_used()
            if used:
                out = [self._complete(h, n) for h, n in used]
                self._done.extend(out)
                return out
            if not block:
                return []
            # Ask for a call, then look once more: the device may have finished between
            # our poll and the request (set_used_notification reports that).
            if self.queue.set_used_notification(True):
                continue
            remaining = None if deadline is None else deadline - time.monotonic()
            if remaining is not None and remaining <= 0:
                raise VhostTimeoutError(
                    f"the device completed none of {len(self._inflight)} request(s) in flight "
                    f"within {timeout} s"
                )
            if self._sleep(remaining):
                self.wakeups += 1
                self.call.try_read()

    def _sleep(self, timeout: float | None) -> bool:
        """Sleeps on the call eventfd for up to ``timeout`` seconds (``None``: for ever);
        true when it was signalled. Signal handlers run meanwhile (Ctrl-C raises
        ``KeyboardInterrupt`` at once). A hang-up of the vhost-user socket raises
        :class:`~vhost.errors.DisconnectedError`."""
        ms = None if timeout is None else max(0, math.ceil(timeout * 1000))
        events = self._waiter.poll(ms)
        for fd, mask in events:
            if fd == self._socket_fd and mask & _HANGUP:
                raise DisconnectedError(
                    f"the back-end closed the connection ({len(self._inflight)} request(s) "
                    "in flight)"
                )
        return bool(events)

    def wait(
        self, timeout: float | None = -1.0, *, min_completions: int = 1
    ) -> list[BlkCompletion]:
        """Collects completions: at least ``min_completions`` (or every request in
        flight, if fewer), sleeping on the call eventfd. ``timeout`` (seconds; the
        default is the driver's ``timeout``, ``None`` waits forever) raises
        :class:`~vhost.errors.VhostTimeoutError` when the device does not answer."""
        if timeout is not None and timeout < 0:
            timeout = self.timeout
        if self._unpublished:
            self._publish_and_kick()
        deadline = None if timeout is None else time.monotonic() + timeout
        want = min(min_completions, len(self._done) + len(self._inflight))
        if len(self._done) < want or not self._done:
            self._reap(block=False, timeout=0)
        while len(self._done) < want:
            remaining = None if deadline is None else max(0.0, deadline - time.monotonic())
            self._reap(block=True, timeout=remaining)
        done, self._done = self._done, []
        return done

    def _run(self, requests: Sequence[BlkRequest]) -> list[BlkCompletion]:
        """Submits ``requests`` and waits for all of them; raises for the first failure
        (after all completed), in submission order."""
        tags = self.submit(requests)
        pending = set(tags)
        got: dict[int, BlkCompletion] = {}
        # Completions of earlier batched submits stay queued for wait().
        keep: list[BlkCompletion] = []
        while pending:
            for c in self.wait(min_completions=1):
                if c.tag in pending:
                    pending.discard(c.tag)
                    got[c.tag] = c
                else:
                    keep.append(c)
        self._done = keep + self._done
        out = [got[t] for t in tags]
        for c in out:
            c.check()
        return out

    # -- handing the queue to the native load loop ----------------------------------------

    def native_load(
        self, *, iommu_page: int = 4096, iommu_prefill: str = "none", iommu_strict: bool = False
    ) -> _core.BlkLoad:
        """Hands queue 0 to a native load loop (:class:`vhost._core.BlkLoad`, what
        ``python -m vhost bench blk`` runs): the same ring, memory, eventfds and request
        slots (one per ``slots``, ``max_request`` bytes each), driven from Rust without the
        GIL. Only a driver that has sent no request yet can do this, once; its own I/O
        methods raise :class:`~vhost.errors.ClosedError` afterwards (``close`` still
        works).

        A driver made with ``iommu=True`` has only this (its queue is not set up): the
        loop plays the IOMMU with pages of ``iommu_page`` bytes, maps ``iommu_prefill``
        (``none`` or ``all``) up front, unmaps each request's data when ``iommu_strict``,
        and hands the queue to the back-end at I/O virtual addresses itself (``bench blk
        --iommu``)."""
        if self._closed or self._handed_off:
            raise ClosedError("the driver is closed or its queue was already handed off")
        if self._next_tag or self._inflight:
            raise InvalidParamError("only a driver that has sent no request can hand off its queue")
        load = _core.BlkLoad(
            self.memory,
            self.queue_size,
            self.queue.desc,
            self.queue.avail,
            self.queue.used,
            self.kick,
            self.call,
            [(s.meta, s.data) for s in self._slots],
            self._max_request,
            packed=self.packed,
            event_idx=self.event_idx,
            segment_size=self._segment_size,
            socket=self._fe,
            frontend=self._fe.native if self._iommu else None,
            iommu_page=iommu_page if self._iommu else None,
            iommu_prefill=iommu_prefill,
            iommu_strict=iommu_strict,
        )
        self._handed_off = True
        return load

    # -- one-call operations --------------------------------------------------------------

    def _chunks(self, offset: int, length: int) -> list[tuple[int, int]]:
        step = self._max_request
        return [(offset + o, min(step, length - o)) for o in range(0, length, step)]

    def _check_range(self, offset: int, length: int, what: str = "I/O") -> None:
        _check_sector_multiple("offset", offset)
        _check_sector_multiple("length", length)
        if offset + length > self.size:
            raise InvalidParamError(
                f"{what} of {length} bytes at offset {offset} runs past the end of the disk "
                f"({self.size} bytes, {self.capacity} sectors): not sent"
            )

    def read(self, offset: int, length: int) -> bytes:
        """Reads ``length`` bytes at byte ``offset`` (both multiples of 512)."""
        self._check_range(offset, length, "a read")
        if length == 0:
            return b""
        out = bytearray()
        for group in _groups(self._chunks(offset, length), len(self._slots)):
            for c in self._run([BlkRequest.read(o, n) for o, n in group]):
                assert c.data is not None
                out += c.data
        return bytes(out)

    def write(self, offset: int, data: bytes | bytearray | memoryview) -> None:
        """Writes ``data`` at byte ``offset`` (both multiples of 512)."""
        view = memoryview(data).cast("B")
        _check_sector_multiple("offset", offset)
        _check_sector_multiple("length", len(view))
        if self.read_only:
            raise BlkIOError(
                BlkStatus.IOERR,
                BlkRequestType.OUT,
                READ_ONLY_REASON,
                local=True,
            )
        self._check_range(offset, len(view), "a write")
        if not len(view):
            return
        chunks = self._chunks(offset, len(view))
        for group in _groups(chunks, len(self._slots)):
            self._run([BlkRequest.write(o, view[o - offset : o - offset + n]) for o, n in group])

    def flush(self) -> None:
        """``VIRTIO_BLK_T_FLUSH`` (needs VIRTIO_BLK_F_FLUSH)."""
        self._run([BlkRequest.flush()])

    def get_id(self) -> bytes:
        """``VIRTIO_BLK_T_GET_ID``: the device's 20-byte id string (NUL-padded)."""
        (c,) = self._run([BlkRequest(BlkRequestType.GET_ID)])
        assert c.data is not None
        return c.data

    def discard(self, offset: int, length: int) -> None:
        """``VIRTIO_BLK_T_DISCARD`` of ``length`` bytes at ``offset`` (needs DISCARD)."""
        self._check_range(offset, length, "a discard")
        self._run([BlkRequest(BlkRequestType.DISCARD, offset, length)])

    def write_zeroes(self, offset: int, length: int, unmap: bool = False) -> None:
        """``VIRTIO_BLK_T_WRITE_ZEROES`` (needs WRITE_ZEROES); ``unmap`` lets the device
        deallocate the range."""
        self._check_range(offset, length, "write-zeroes")
        self._run([BlkRequest(BlkRequestType.WRITE_ZEROES, offset, length, unmap=unmap)])

    # -- lifetime -------------------------------------------------------------------------

    @property
    def closed(self) -> bool:
        """Whether :meth:`close` ran; every other call then raises
        :class:`~vhost.errors.ClosedError`."""
        return self._closed

    def close(self) -> None:
        """Closes the connection, the eventfds and the shared memory (requests in flight
        are abandoned); the driver cannot be used afterwards."""
        if self._closed:
            return
        self._closed = True
        try:
            self._fe.close()
        finally:
            self.kick.close()
            self.call.close()
            # Drop the ring and the memory (the memfd closes with the last reference).
            self._inflight.clear()
            self._done.clear()
            del self.queue
            del self.memory

    def __repr__(self) -> str:
        state = "closed" if self._closed else f"{self.capacity} sectors"
        return f"<vhost.devices.blk.BlkDriver {state}>"


def _align(value: int, to: int) -> int:
    return (value + to - 1) // to * to


def _groups(items: list[tuple[int, int]], n: int) -> list[list[tuple[int, int]]]:
    return [items[i : i + n] for i in range(0, len(items), n)]
