"""A small virtio-blk back-end written with our own device-side API, for tests.

:class:`BlkBackend` is a :class:`~vhost.user.BackendHandler` over an in-memory image (a
``bytearray``). On ``SET_VRING_KICK`` it starts a worker that builds a
:class:`~vhost.virtio.DeviceQueue` (split or packed, EVENT_IDX as acked), pops request
chains, performs them against the image and returns them with ``add_used_batch``.
``GET_VRING_BASE`` (or :meth:`BlkBackend.stop`) stops the worker.
"""

from __future__ import annotations

import struct
import threading

from vhost import EventFd, GuestMemory
from vhost.codes import ProtocolFeature
from vhost.types import VringAddrs
from vhost.user import BackendHandler
from vhost.virtio import BlkFeature, DescriptorChain, DeviceQueue, VirtioFeature

SECTOR = 512
SEG_MAX = 126
MAX_DISCARD_SECTORS = 1 << 16
MAX_WRITE_ZEROES_SECTORS = 1 << 16
DEVICE_ID = b"pyvhost-test-blk"

T_IN, T_OUT, T_FLUSH, T_GET_ID, T_DISCARD, T_WRITE_ZEROES = 0, 1, 4, 8, 11, 13
S_OK, S_IOERR, S_UNSUPP = 0, 1, 2

_OUTHDR = struct.Struct("<IIQ")
_SEG = struct.Struct("<QII")

FEATURES = int(
    VirtioFeature.VERSION_1
    | VirtioFeature.PROTOCOL_FEATURES
    | VirtioFeature.RING_EVENT_IDX
    | VirtioFeature.RING_PACKED
    | VirtioFeature.RING_INDIRECT_DESC
    | BlkFeature.FLUSH
    | BlkFeature.BLK_SIZE
    | BlkFeature.SEG_MAX
    | BlkFeature.WRITE_ZEROES
    | BlkFeature.DISCARD
)
PROTOCOL_FEATURES = int(
    ProtocolFeature.MQ
    | ProtocolFeature.REPLY_ACK
    | ProtocolFeature.CONFIG
    | ProtocolFeature.CONFIGURE_MEM_SLOTS
)


def blk_config(capacity_sectors: int) -> bytes:
    """The first 60 bytes of ``struct virtio_blk_config``."""
    cfg = bytearray(60)
    struct.pack_into("<Q", cfg, 0, capacity_sectors)
    struct.pack_into("<I", cfg, 12, SEG_MAX)
    struct.pack_into("<I", cfg, 20, SECTOR)
    struct.pack_into("<H", cfg, 34, 1)  # num_queues
    struct.pack_into("<III", cfg, 36, MAX_DISCARD_SECTORS, 1, 1)
    struct.pack_into("<II", cfg, 48, MAX_WRITE_ZEROES_SECTORS, 1)
    cfg[56] = 1  # write_zeroes_may_unmap
    return bytes(cfg)


class BlkBackend(BackendHandler):
    """A one-queue virtio-blk device over ``image``."""

    def __init__(self, image: bytearray, *, read_only: bool = False) -> None:
        if len(image) % SECTOR:
            raise ValueError("image size is not a multiple of 512")
        self.image = image
        self.read_only = read_only
        self.features = 0
        self.memory: GuestMemory | None = None
        self.num = 0
        self.addr: tuple[int, int, int] = (0, 0, 0)
        self.base = 0
        self.kick: EventFd | None = None
        self.call: EventFd | None = None
        self.queue: DeviceQueue | None = None
        self.worker: threading.Thread | None = None
        self.stop_event = threading.Event()
        self.errors: list[BaseException] = []
        self.requests: list[int] = []  # request types, in the order served
        self.notifications = 0

    # -- negotiation ----------------------------------------------------------------------

    def get_features(self) -> int:
        return FEATURES | (int(BlkFeature.RO) if self.read_only else 0)

    def set_features(self, features: int) -> None:
        self.features = features

    def get_protocol_features(self) -> int:
        return PROTOCOL_FEATURES

    def get_max_mem_slots(self) -> int:
        return 8

    def get_config(self, offset: int, size: int, flags: int) -> bytes:
        cfg = blk_config(len(self.image) // SECTOR)
        return cfg[offset : offset + size].ljust(size, b"\0")

    def set_mem_table(self, memory: GuestMemory) -> None:
        self.memory = memory
        if self.queue is not None:
            self.queue.set_memory(memory)

    # -- rings ----------------------------------------------------------------------------

    def set_vring_num(self, index: int, num: int) -> None:
        self.num = num

    def set_vring_addr(self, index: int, addrs: VringAddrs) -> None:
        self.addr = (addrs.desc_table_addr, addrs.avail_ring_addr, addrs.used_ring_addr)

    def set_vring_base(self, index: int, base: int) -> None:
        self.base = base

    def set_vring_call(self, index: int, fd: EventFd | None) -> None:
        self.call = fd

    def set_vring_kick(self, index: int, fd: EventFd | None) -> None:
        self.stop()
        self.kick = fd
        if fd is None or self.memory is None:
            return
        queue = DeviceQueue.from_user(
            self.memory,
            self.num,
            *self.addr,
            packed=bool(self.features & VirtioFeature.RING_PACKED),
            event_idx=bool(self.features & VirtioFeature.RING_EVENT_IDX),
            indirect=bool(self.features & VirtioFeature.RING_INDIRECT_DESC),
        )
        queue.base = self.base
        self.queue = queue
        self.stop_event = threading.Event()
        self.worker = threading.Thread(
            target=self._run, args=(queue, fd, self.stop_event), name="blk-backend", daemon=True
        )
        self.worker.start()

    def get_vring_base(self, index: int) -> int:
        self.stop()
        return self.queue.base if self.queue is not None else self.base

    def stop(self) -> None:
        """Stops the worker (idempotent)."""
        self.stop_event.set()
        if self.worker is not None:
            self.worker.join(10)
            self.worker = None

    # -- the worker -----------------------------------------------------------------------

    def _run(self, queue: DeviceQueue, kick: EventFd, stop: threading.Event) -> None:
        try:
            while not stop.is_set():
                if not kick.wait(0.05):
                    continue
                kick.try_read()
                while not stop.is_set():
                    chains = queue.pop_batch()
                    if not chains:
                        break
                    used = [(c.head, self._serve(queue, c)) for c in chains]
                    queue.add_used_batch(used)
                    if queue.needs_notification() and self.call is not None:
                        self.notifications += 1
                        self.call.write(1)
        except BaseException as exc:  # reported through self.errors
            self.errors.append(exc)

    def _serve(self, queue: DeviceQueue, chain: DescriptorChain) -> int:
        """Performs one request; returns the bytes written into the chain."""
        if chain.writable_len < 1 or chain.readable_len < _OUTHDR.size:
            return 0  # no room for a status byte: a malformed request
        kind, _reserved, sector = _OUTHDR.unpack(queue.read_chain(chain, 0, _OUTHDR.size))
        self.requests.append(kind)
        data_in = chain.writable_len - 1
        status, reply = self._perform(queue, chain, kind, sector, data_in)
        written = queue.write_chain(chain, reply) if reply else 0
        queue.write_chain(chain, bytes([status]), data_in)
        return written + 1

    def _range_ok(self, sector: int, length: int) -> bool:
        return sector * SECTOR + length <= len(self.image)

    def _perform(
        self, queue: DeviceQueue, chain: DescriptorChain, kind: int, sector: int, data_in: int
    ) -> tuple[int, bytes]:
        payload_len = chain.readable_len - _OUTHDR.size
        if kind == T_IN:
            if not self._range_ok(sector, data_in):
                return S_IOERR, b""
            at = sector * SECTOR
            return S_OK, bytes(self.image[at : at + data_in])
        if kind == T_OUT:
            if self.read_only:
                return S_IOERR, b""
            if not self._range_ok(sector, payload_len):
                return S_IOERR, b""
            at = sector * SECTOR
            self.image[at : at + payload_len] = queue.read_chain(chain, _OUTHDR.size, payload_len)
            return S_OK, b""
        if kind == T_FLUSH:
            return S_OK, b""
        if kind == T_GET_ID:
            return S_OK, DEVICE_ID.ljust(20, b"\0")[: min(20, data_in)]
        if kind in {T_DISCARD, T_WRITE_ZEROES}:
            if self.read_only:
                return S_IOERR, b""
            if payload_len % _SEG.size or not payload_len:
                return S_IOERR, b""
            body = queue.read_chain(chain, _OUTHDR.size, payload_len)
            ranges = [_SEG.unpack_from(body, i) for i in range(0, payload_len, _SEG.size)]
            for start, count, _flags in ranges:
                if not self._range_ok(start, count * SECTOR):
                    return S_IOERR, b""
            for start, count, _flags in ranges:
                # Discard and write-zeroes alike leave zeroes (discarded blocks read as 0).
                self.image[start * SECTOR : (start + count) * SECTOR] = bytes(count * SECTOR)
            return S_OK, b""
        return S_UNSUPP, b""


__all__ = ["BlkBackend", "blk_config"]
