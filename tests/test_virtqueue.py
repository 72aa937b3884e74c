"""Virtqueues end to end: the driver side (`Virtqueue`) and the device side (`DeviceQueue`)
on one shared guest memory, split and packed, moving real bytes both ways; notification
suppression; wrap-around; corrupt rings; and a ring handed to our own vhost-user back-end
with `setup_queue`."""

from __future__ import annotations

import gc
import struct
import threading
from pathlib import Path

import pytest

from vhost import EventFd, GuestMemory, _core
from vhost.errors import (
    InvalidMemoryError,
    InvalidParamError,
    InvalidQueueError,
    QueueError,
    QueueFullError,
    VhostError,
)
from vhost.types import VringAddrs
from vhost.user import BackendHandler, BackendListener, Frontend, regions_of, serve_in_thread
from vhost.virtio import (
    DescriptorChain,
    DeviceQueue,
    VirtioFeature,
    Virtqueue,
    gpa_to_user,
    place_rings,
    ring_sizes,
    setup_queue,
)

MEM_SIZE = 1 << 20
RING_BASE = 0x1000
DATA = 0x40000
TIMEOUT = 10.0

DESC_F_NEXT = 1
DESC_F_WRITE = 2
DESC_F_INDIRECT = 4
DESC_F_AVAIL = 1 << 7


def pair(
    mem: GuestMemory, size: int, *, packed: bool, event_idx: bool = False
) -> tuple[Virtqueue, DeviceQueue]:
    desc, avail, used = place_rings(RING_BASE, size, packed)
    vq = Virtqueue(mem, size, desc, avail, used, packed=packed, event_idx=event_idx)
    dq = DeviceQueue(mem, size, desc, avail, used, packed=packed, event_idx=event_idx)
    return vq, dq


@pytest.fixture
def mem() -> GuestMemory:
    return GuestMemory.allocate([(0, MEM_SIZE)])


FORMATS = [pytest.param(False, id="split"), pytest.param(True, id="packed")]


# --------------------------------------------------------------------------------------
# Layout helpers
# --------------------------------------------------------------------------------------


def test_ring_sizes_and_placement() -> None:
    assert ring_sizes(256) == (4096, 6 + 512, 6 + 2048)
    assert ring_sizes(3, packed=True) == (48, 4, 4)
    desc, avail, used = place_rings(0x1001, 4)
    assert (desc, avail) == (0x1010, 0x1010 + 64)
    assert used % 4 == 0 and used >= avail + ring_sizes(4)[1]
    with pytest.raises(InvalidParamError):
        ring_sizes(3)  # split sizes are powers of two
    with pytest.raises(InvalidParamError):
        ring_sizes(0, packed=True)


def test_gpa_to_user(mem: GuestMemory) -> None:
    (region,) = mem.regions()
    gpa, size, uaddr = region.guest_phys_addr, region.memory_size, region.userspace_addr
    assert gpa_to_user(mem, 0x1234) == uaddr + 0x1234
    assert mem.user_to_gpa(gpa_to_user(mem, 0x1234)) == 0x1234
    with pytest.raises(InvalidMemoryError):
        gpa_to_user(mem, gpa + size)


def test_ring_placement_is_the_cores_and_refuses_what_does_not_fit(mem: GuestMemory) -> None:
    """The facade's helpers are the core's layout (``RingLayout::place``, ``area_sizes``)
    and translation (``GuestMemory::gpa_to_user``), so a front-end and a back-end read the
    same ring in the same place; a ring past the end of the 64-bit space is refused (it
    used to come back with addresses no u64 holds)."""
    for packed in (False, True):
        rings = place_rings(0x1001, 8, packed)
        assert rings == _core.place_rings(0x1001, 8, packed)
        vq = Virtqueue(mem, 8, *rings, packed=packed)  # the core accepts what it placed
        assert (vq.desc, vq.avail, vq.used) == rings
    with pytest.raises(InvalidMemoryError, match="overflows"):
        place_rings((1 << 64) - 16, 64)
    with pytest.raises(InvalidParamError, match="out of range"):
        place_rings(-1, 64)
    with pytest.raises(InvalidParamError, match=r"invalid queue size 3: .* power of two"):
        ring_sizes(3)
    (region,) = mem.regions()
    assert mem.gpa_to_user(0x10) == region.userspace_addr + 0x10
    with pytest.raises(InvalidMemoryError, match="guest physical address 0x") as raised:
        gpa_to_user(mem, region.guest_end)
    assert raised.value.address == region.guest_end


# --------------------------------------------------------------------------------------
# Bytes both ways
# --------------------------------------------------------------------------------------


@pytest.mark.parametrize("packed", FORMATS)
@pytest.mark.parametrize("nsegs", [1, 2, 3])
def test_bytes_both_ways(mem: GuestMemory, packed: bool, nsegs: int) -> None:
    vq, dq = pair(mem, 8, packed=packed)
    # nsegs readable and nsegs writable segments of distinct sizes.
    readable = [(DATA + 0x1000 * i, 10 + i) for i in range(nsegs)]
    writable = [(DATA + 0x10000 + 0x1000 * i, 20 + i) for i in range(nsegs)]
    request = bytes(range(256))[: sum(n for _, n in readable)]
    at = 0
    for gpa, n in readable:
        mem.write(gpa, request[at : at + n])
        at += n

    head = vq.add(readable, writable)
    assert vq.num_free == 8 - 2 * nsegs
    assert dq.pop_batch() == []  # nothing published yet
    vq.publish()

    (chain,) = dq.pop_batch()
    assert isinstance(chain, DescriptorChain)
    assert chain.head == head
    assert chain.segments == [(g, n, False) for g, n in readable] + [
        (g, n, True) for g, n in writable
    ]
    assert len(chain) == 2 * nsegs
    assert chain.readable_len == len(request)
    assert chain.writable_len == sum(n for _, n in writable)
    got = b"".join(mem.read(g, n) for g, n, w in chain.segments if not w)
    assert got == request

    reply = bytes(reversed(request))[: chain.writable_len - 1]  # not quite full
    at = 0
    for g, n, w in chain.segments:
        if w and at < len(reply):
            k = min(n, len(reply) - at)
            mem.write(g, reply[at : at + k])
            at += k
    dq.add_used(chain.head, len(reply))

    assert vq.poll_used() == [(head, len(reply))]
    assert vq.poll_used() == []
    out = b"".join(mem.read(g, n) for g, n in writable)[: len(reply)]
    assert out == reply
    assert vq.num_free == 8
    assert vq.in_flight == 0


@pytest.mark.parametrize("packed", FORMATS)
def test_only_writable_and_batches(mem: GuestMemory, packed: bool) -> None:
    vq, dq = pair(mem, 16, packed=packed)
    heads = [vq.add([], [(DATA + 0x100 * i, 64)]) for i in range(16)]
    assert vq.num_free == 0
    with pytest.raises(QueueFullError):
        vq.add([], [(DATA, 1)])
    vq.publish()
    first = dq.pop_batch(5)
    rest = dq.pop_batch(100)  # > 16: runs with the GIL released
    chains = first + rest
    assert [c.head for c in chains] == heads
    for i, c in enumerate(chains):
        assert c.readable_len == 0 and c.writable_len == 64
        mem.write(c.segments[0][0], bytes([i]) * 8)
    dq.add_used_batch([(c.head, 8) for c in chains])
    assert vq.poll_used() == [(h, 8) for h in heads]
    for i in range(16):
        assert mem.read(DATA + 0x100 * i, 8) == bytes([i]) * 8
    assert vq.num_free == 16


# --------------------------------------------------------------------------------------
# Notifications
# --------------------------------------------------------------------------------------


def offer(vq: Virtqueue) -> int:
    head = vq.add([(DATA, 8)], [(DATA + 0x100, 8)])
    vq.publish()
    return head


@pytest.mark.parametrize("packed", FORMATS)
@pytest.mark.parametrize("event_idx", [False, True], ids=["flags", "event_idx"])
def test_kick_suppression(mem: GuestMemory, packed: bool, event_idx: bool) -> None:
    vq, dq = pair(mem, 16, packed=packed, event_idx=event_idx)
    assert not vq.kick_needed()  # nothing published
    offer(vq)
    assert vq.kick_needed()
    assert not vq.kick_needed()  # nothing new since the last decision
    assert len(dq.pop_batch()) == 1

    # The device is busy polling: no kicks.
    assert dq.set_notification(False) is False
    offer(vq)
    # Split EVENT_IDX has no "off" switch: the avail_event written at the last pop still
    # asks for the very next buffer, and only later ones are suppressed.
    assert vq.kick_needed() == (event_idx and not packed)
    offer(vq)
    assert not vq.kick_needed()
    # Re-enabling reports the buffers that arrived meanwhile.
    assert dq.set_notification(True) is True
    assert len(dq.pop_batch()) == 2
    offer(vq)
    assert vq.kick_needed()

    # Two buffers published together need one kick decision.
    assert len(dq.pop_batch()) == 1
    offer(vq)
    offer(vq)
    assert vq.kick_needed()
    assert not vq.kick_needed()


@pytest.mark.parametrize("packed", FORMATS)
@pytest.mark.parametrize("event_idx", [False, True], ids=["flags", "event_idx"])
def test_interrupt_suppression(mem: GuestMemory, packed: bool, event_idx: bool) -> None:
    vq, dq = pair(mem, 8, packed=packed, event_idx=event_idx)
    for _ in range(3):
        offer(vq)
    a, b, c = dq.pop_batch()
    dq.add_used(a.head, 0)
    assert dq.needs_notification()
    assert not dq.needs_notification()  # nothing new since

    # The driver polls: no interrupts.
    assert len(vq.poll_used()) == 1
    assert vq.set_used_notification(False) is False
    dq.add_used(b.head, 1)
    assert not dq.needs_notification()
    assert vq.poll_used() == [(b.head, 1)]

    # Re-enabled: the next used buffer interrupts.
    assert vq.set_used_notification(True) is False  # nothing waiting
    dq.add_used(c.head, 2)
    assert dq.needs_notification()
    assert vq.poll_used() == [(c.head, 2)]


def test_set_used_notification_reports_waiting_buffers(mem: GuestMemory) -> None:
    vq, dq = pair(mem, 4, packed=False)
    offer(vq)
    vq.set_used_notification(False)
    (chain,) = dq.pop_batch()
    dq.add_used(chain.head, 3)
    assert vq.set_used_notification(True) is True
    assert vq.poll_used() == [(chain.head, 3)]


# --------------------------------------------------------------------------------------
# Wrap-around
# --------------------------------------------------------------------------------------


@pytest.mark.parametrize(("packed", "size"), [(False, 4), (True, 3)], ids=["split4", "packed3"])
def test_wraparound(mem: GuestMemory, packed: bool, size: int) -> None:
    """70000 requests: the 16-bit indexes (split) and wrap counters (packed) wrap."""
    vq, dq = pair(mem, size, packed=packed)
    total = 70000
    sent = 0
    done = 0
    slots = [DATA + 0x100 * i for i in range(size)]
    while done < total:
        # Fill: alternate one- and two-segment buffers while they fit.
        batch: dict[int, int] = {}
        while sent < total:
            nseg = 1 + sent % 2
            if vq.num_free < nseg:
                break
            gpa = slots[len(batch)]
            mem.write(gpa, struct.pack("<I", sent))
            writable = [(gpa + 0x80, 4)] if nseg == 2 else []
            head = vq.add([(gpa, 4)], writable)
            batch[head] = sent
            sent += 1
        vq.publish()
        chains = dq.pop_batch()
        assert [c.head for c in chains] == list(batch)
        used = []
        for c in chains:
            (n,) = struct.unpack("<I", mem.read(c.segments[0][0], 4))
            assert n == batch[c.head]
            if c.writable_len:
                mem.write(c.segments[1][0], struct.pack("<I", n ^ 0xFFFFFFFF))
            used.append((c.head, c.writable_len))
        dq.add_used_batch(used)
        got = vq.poll_used()
        assert got == used
        for head, length in got:
            if length:
                gpa = slots[list(batch).index(head)] + 0x80
                assert struct.unpack("<I", mem.read(gpa, 4))[0] == batch[head] ^ 0xFFFFFFFF
        done += len(got)
    assert vq.num_free == size
    if packed:
        # Position = slot | wrap << 15; 70000 buffers of 1.5 descriptors on average.
        pos = dq.next_avail
        assert pos & 0x7FFF < size
        assert dq.next_used == pos
    else:
        assert dq.next_avail == total % 65536
        assert dq.next_used == total % 65536


# --------------------------------------------------------------------------------------
# Corrupt rings and bad arguments
# --------------------------------------------------------------------------------------


def split_desc(addr: int, length: int, flags: int, nxt: int) -> bytes:
    return struct.pack("<QIHH", addr, length, flags, nxt)


def packed_desc(addr: int, length: int, buf_id: int, flags: int) -> bytes:
    return struct.pack("<QIHH", addr, length, buf_id, flags)


def test_split_descriptor_loop_breaks_the_queue(mem: GuestMemory) -> None:
    desc, avail, used = place_rings(RING_BASE, 4)
    dq = DeviceQueue(mem, 4, desc, avail, used)
    mem.write(desc, split_desc(DATA, 8, DESC_F_NEXT, 1) + split_desc(DATA, 8, DESC_F_NEXT, 0))
    mem.write(avail, struct.pack("<HHH", 0, 1, 0))  # flags, idx = 1, ring[0] = head 0
    with pytest.raises(QueueError, match="loop"):
        dq.pop_batch()
    assert dq.broken
    # Stays broken, whatever the ring says now.
    mem.write(desc, split_desc(DATA, 8, 0, 0))
    with pytest.raises(QueueError):
        dq.pop_batch()
    with pytest.raises(QueueError):
        dq.add_used(0, 0)
    with pytest.raises(QueueError):
        dq.needs_notification()


def test_packed_nested_indirect_breaks_the_queue(mem: GuestMemory) -> None:
    desc, driver, device = place_rings(RING_BASE, 4, packed=True)
    dq = DeviceQueue(mem, 4, desc, driver, device, packed=True)
    table = DATA
    mem.write(table, packed_desc(DATA + 0x100, 16, 0, DESC_F_INDIRECT))
    mem.write(desc, packed_desc(table, 16, 0, DESC_F_INDIRECT | DESC_F_AVAIL))
    with pytest.raises(QueueError):
        dq.pop_batch()
    assert dq.broken
    with pytest.raises(QueueError):
        dq.pop_batch()


def test_indirect_refused_when_not_negotiated(mem: GuestMemory) -> None:
    desc, avail, used = place_rings(RING_BASE, 4)
    dq = DeviceQueue(mem, 4, desc, avail, used, indirect=False)
    mem.write(DATA, split_desc(DATA + 0x100, 8, 0, 0))
    mem.write(desc, split_desc(DATA, 16, DESC_F_INDIRECT, 0))
    mem.write(avail, struct.pack("<HHH", 0, 1, 0))
    with pytest.raises(QueueError, match="INDIRECT"):
        dq.pop_batch()


def test_indirect_chain_is_walked(mem: GuestMemory) -> None:
    desc, avail, used = place_rings(RING_BASE, 4)
    dq = DeviceQueue(mem, 4, desc, avail, used)
    mem.write(
        DATA,
        split_desc(DATA + 0x100, 8, DESC_F_NEXT, 1) + split_desc(DATA + 0x200, 16, DESC_F_WRITE, 0),
    )
    mem.write(desc + 16 * 2, split_desc(DATA, 32, DESC_F_INDIRECT, 0))
    mem.write(avail, struct.pack("<HHH", 0, 1, 2))
    (chain,) = dq.pop_batch()
    assert chain.head == 2
    assert chain.segments == [(DATA + 0x100, 8, False), (DATA + 0x200, 16, True)]
    dq.add_used(2, 16)
    assert not dq.broken


def test_read_chain_is_bounded_by_memory() -> None:
    """A hostile chain repeating one segment: reading it all is an error, not a huge
    allocation."""
    small = GuestMemory.allocate([(0, 0x10000)])
    desc, avail, used = place_rings(0, 4)
    dq = DeviceQueue(small, 4, desc, avail, used)
    table = 0x1000
    small.write(table, split_desc(0x2000, 0x8000, 0, 0) * 4)
    # Four entries with NEXT 1, 2, 3: each reads the same 32 KiB, 128 KiB in all.
    for i in range(3):
        small.write(table + 16 * i, split_desc(0x2000, 0x8000, DESC_F_NEXT, i + 1))
    small.write(desc, split_desc(table, 64, DESC_F_INDIRECT, 0))
    small.write(avail, struct.pack("<HHH", 0, 1, 0))
    (chain,) = dq.pop_batch()
    assert chain.readable_len == 0x20000
    with pytest.raises(InvalidMemoryError):
        dq.read_chain(chain)
    assert len(dq.read_chain(chain, 0x1000, 0x8000)) == 0x8000


def test_buffer_outside_memory_breaks_the_device_queue(mem: GuestMemory) -> None:
    desc, avail, used = place_rings(RING_BASE, 4)
    dq = DeviceQueue(mem, 4, desc, avail, used)
    mem.write(desc, split_desc(MEM_SIZE - 4, 8, 0, 0))  # runs off the end of memory
    mem.write(avail, struct.pack("<HHH", 0, 1, 0))
    with pytest.raises(InvalidMemoryError):
        dq.pop_batch()
    assert dq.broken
    with pytest.raises(QueueError):
        dq.pop_batch()


def test_driver_refuses_a_corrupt_used_ring(mem: GuestMemory) -> None:
    vq, _ = pair(mem, 4, packed=False)
    used = vq.used
    offer(vq)
    mem.write(used + 2, struct.pack("<H", 3))  # used.idx jumps by 3 with one in flight
    with pytest.raises(QueueError):
        vq.poll_used()
    assert vq.broken
    with pytest.raises(QueueError):
        vq.add([(DATA, 1)], [])


def test_driver_refuses_a_used_length_beyond_the_buffer(mem: GuestMemory) -> None:
    vq, _ = pair(mem, 4, packed=False)
    head = offer(vq)  # 8 writable bytes
    mem.write(vq.used + 4, struct.pack("<II", head, 9))
    mem.write(vq.used + 2, struct.pack("<H", 1))
    with pytest.raises(QueueError):
        vq.poll_used()


@pytest.mark.parametrize("packed", FORMATS)
def test_rings_outside_memory(mem: GuestMemory, packed: bool) -> None:
    size = 4
    desc, avail, used = place_rings(MEM_SIZE - 0x40, size, packed)
    with pytest.raises(InvalidMemoryError):
        DeviceQueue(mem, size, desc, avail, used, packed=packed)
    with pytest.raises(InvalidMemoryError):
        Virtqueue(mem, size, desc, avail, used, packed=packed)
    uaddr = mem.regions()[0].userspace_addr
    with pytest.raises(InvalidMemoryError):
        DeviceQueue.from_user(mem, size, uaddr + MEM_SIZE, uaddr, uaddr + 0x800, packed=packed)


def test_layout_errors(mem: GuestMemory) -> None:
    with pytest.raises(InvalidQueueError):
        DeviceQueue(mem, 3, 0x1000, 0x2000, 0x3000)  # split sizes are powers of two
    with pytest.raises(InvalidQueueError):
        DeviceQueue(mem, 0, 0x1000, 0x2000, 0x3000, packed=True)
    with pytest.raises(InvalidQueueError):
        Virtqueue(mem, 4, 0x1008, 0x2000, 0x3000)  # descriptor table not 16-aligned
    with pytest.raises(InvalidQueueError):
        Virtqueue(mem, 4, 0x1000, 0x2000, 0x3002)  # used ring not 4-aligned
    with pytest.raises(InvalidQueueError):
        Virtqueue(mem, 40000, 0x1000, 0x2000, 0x3000, packed=True)


@pytest.mark.parametrize("packed", FORMATS)
def test_caller_errors_leave_queues_usable(mem: GuestMemory, packed: bool) -> None:
    vq, dq = pair(mem, 4, packed=packed)
    with pytest.raises(InvalidMemoryError):
        vq.add([(MEM_SIZE - 2, 4)], [])
    with pytest.raises(InvalidParamError):
        vq.add([], [])
    head = offer(vq)
    (chain,) = dq.pop_batch()
    with pytest.raises(InvalidParamError):
        dq.add_used(head, 9)  # more than the 8 writable bytes
    with pytest.raises(InvalidParamError):
        dq.add_used((head + 1) % 4, 0)  # not in flight
    with pytest.raises(InvalidParamError):
        dq.add_used(70000, 0)
    with pytest.raises(InvalidParamError):
        dq.add_used_batch([(head, 1), (head, 1)])  # twice in one batch
    assert not dq.broken and not vq.broken
    dq.add_used(chain.head, 8)
    assert vq.poll_used() == [(head, 8)]


def test_errors_are_vhost_errors() -> None:
    assert issubclass(QueueError, VhostError)
    assert issubclass(QueueFullError, QueueError)


def test_set_memory_rebinds(mem: GuestMemory) -> None:
    vq, dq = pair(mem, 4, packed=False)
    other = GuestMemory.allocate([(0, 0x1000)])
    with pytest.raises(InvalidMemoryError):
        dq.set_memory(other)  # the ring is not inside it
    with pytest.raises(InvalidMemoryError):
        vq.set_memory(other)
    dq.set_memory(mem)
    offer(vq)
    assert len(dq.pop_batch()) == 1


def test_base_is_the_vring_base(mem: GuestMemory) -> None:
    _, dq = pair(mem, 4, packed=False)
    # Restoring a split base re-reads the used index from the ring (the driver saw
    # none completed), as the native daemon does: used does not follow avail.
    dq.base = 7
    assert (dq.base, dq.next_avail, dq.next_used) == (7, 7, 0)
    with pytest.raises(InvalidParamError):
        dq.base = 1 << 16
    with pytest.raises(InvalidParamError):
        dq.base = -1
    _, pdq = pair(mem, 4, packed=True)
    # Fresh packed ring: avail and used at slot 0 with wrap counters 1.
    assert pdq.base == 0x8000_8000
    assert (pdq.next_avail, pdq.next_used) == (1 << 15, 1 << 15)
    pdq.base = 2  # the avail half only: used follows avail
    assert (pdq.base, pdq.next_avail, pdq.next_used) == (0x0002_0002, 2, 2)
    pdq.base = 3 | (1 << 15) | (1 << 16)  # avail slot 3 wrap 1, used slot 1 wrap 0
    assert (pdq.next_avail, pdq.next_used) == (3 | 1 << 15, 1)
    with pytest.raises(InvalidParamError):
        pdq.base = 5  # slot beyond the ring


@pytest.mark.parametrize("packed", FORMATS)
def test_read_and_write_chain(mem: GuestMemory, packed: bool) -> None:
    vq, dq = pair(mem, 8, packed=packed)
    request = bytes(range(30))
    mem.write(DATA, request[:10])
    mem.write(DATA + 0x100, request[10:11])
    mem.write(DATA + 0x200, request[11:])
    readable = [(DATA, 10), (DATA + 0x100, 1), (DATA + 0x200, 19)]
    writable = [(DATA + 0x1000, 3), (DATA + 0x2000, 5), (DATA + 0x3000, 100_000)]
    head = vq.add(readable, writable)
    vq.publish()
    (chain,) = dq.pop_batch()
    assert dq.read_chain(chain) == request
    assert dq.read_chain(chain, 9, 3) == request[9:12]
    assert dq.read_chain(chain, 25) == request[25:]
    assert dq.read_chain(chain, 31) == b""
    assert dq.read_chain(chain, length=0) == b""
    assert dq.read_chain(chain, 0, 1 << 40) == request  # clamped to the readable bytes

    assert dq.write_chain(chain, b"abcdefgh") == 8
    assert dq.write_chain(chain, memoryview(b"XY"), offset=2) == 2
    assert mem.read(DATA + 0x1000, 3) + mem.read(DATA + 0x2000, 5) == b"abXYefgh"
    big = bytes(range(256)) * 400  # 102400 bytes: crosses the GIL-release threshold
    assert dq.write_chain(chain, big, offset=8) == 100_000
    assert mem.read(DATA + 0x3000, 100_000) == big[:100_000]
    assert dq.write_chain(chain, b"z", offset=chain.writable_len) == 0
    dq.add_used(head, chain.writable_len)
    assert vq.poll_used() == [(head, chain.writable_len)]


def test_queues_keep_their_memory_alive() -> None:
    mem = GuestMemory.allocate([(0, MEM_SIZE)])
    vq, dq = pair(mem, 4, packed=False)
    del mem
    gc.collect()
    head = offer(vq)
    (chain,) = dq.pop_batch()
    dq.add_used(chain.head, 8)
    assert vq.poll_used() == [(head, 8)]


@pytest.mark.parametrize("packed", FORMATS)
def test_driver_and_device_in_two_threads(mem: GuestMemory, packed: bool) -> None:
    """Large batches run with the GIL released; the queues are safe to share."""
    size, total = 256, 20000
    vq, dq = pair(mem, size, packed=packed, event_idx=True)
    kick, call = EventFd(), EventFd()
    errors: list[BaseException] = []
    served = 0

    def device() -> None:
        nonlocal served
        try:
            while served < total:
                if not dq.set_notification(True):  # nothing pending: sleep until a kick
                    assert kick.wait(TIMEOUT)
                    kick.try_read()
                dq.set_notification(False)
                chains = dq.pop_batch(128)
                for c in chains:
                    mem.write(c.segments[-1][0], c.segments[0][0].to_bytes(8, "little"))
                dq.add_used_batch([(c.head, 8) for c in chains])
                served += len(chains)
                if chains and dq.needs_notification():
                    call.write(1)
        except BaseException as exc:
            errors.append(exc)

    t = threading.Thread(target=device, daemon=True)
    t.start()
    sent = done = 0
    addr_of: dict[int, int] = {}
    try:
        while done < total:
            while sent < total and vq.num_free >= 2:
                gpa = DATA + 16 * (sent % 8192)
                head = vq.add([(gpa, 8)], [(gpa + 0x20000 * 2, 8)])
                addr_of[head] = gpa
                sent += 1
            vq.publish()
            if vq.kick_needed():
                kick.write(1)
            for head, length in wait_used(vq, call):
                assert length == 8
                gpa = addr_of.pop(head)
                assert int.from_bytes(mem.read(gpa + 0x40000, 8), "little") == gpa
                done += 1
    finally:
        t.join(TIMEOUT)
    assert errors == []
    assert served == total


# --------------------------------------------------------------------------------------
# A ring handed to our own vhost-user back-end
# --------------------------------------------------------------------------------------

FEATURES = int(
    VirtioFeature.VERSION_1
    | VirtioFeature.PROTOCOL_FEATURES
    | VirtioFeature.RING_PACKED
    | VirtioFeature.RING_EVENT_IDX
)


class RingDevice(BackendHandler):
    """A one-queue device: on each kick, reverses the readable bytes into the writable
    segments, as a back-end would, from what the front-end sent."""

    def __init__(self, requests: int) -> None:
        self.requests = requests
        self.features = 0
        self.memory: GuestMemory | None = None
        self.num = 0
        self.addr: tuple[int, int, int] = (0, 0, 0)
        self.base = -1
        self.call: EventFd | None = None
        self.enabled = False
        self.worker: threading.Thread | None = None
        self.served = 0
        self.errors: list[BaseException] = []

    def get_features(self) -> int:
        return FEATURES

    def set_features(self, features: int) -> None:
        self.features = features

    def get_protocol_features(self) -> int:
        return 0

    def set_mem_table(self, memory: GuestMemory) -> None:
        self.memory = memory

    def set_vring_num(self, index: int, num: int) -> None:
        self.num = num

    def set_vring_addr(self, index: int, addrs: VringAddrs) -> None:
        self.addr = (addrs.desc_table_addr, addrs.avail_ring_addr, addrs.used_ring_addr)

    def set_vring_base(self, index: int, base: int) -> None:
        self.base = base

    def get_vring_base(self, index: int) -> int:
        return self.base  # the rings of these tests are never stopped mid-way

    def set_vring_call(self, index: int, fd: EventFd | None) -> None:
        self.call = fd

    def set_vring_enable(self, index: int, enable: bool) -> None:
        self.enabled = enable

    def set_vring_kick(self, index: int, fd: EventFd | None) -> None:
        assert fd is not None and self.memory is not None
        queue = DeviceQueue.from_user(
            self.memory,
            self.num,
            *self.addr,
            packed=bool(self.features & VirtioFeature.RING_PACKED),
            event_idx=bool(self.features & VirtioFeature.RING_EVENT_IDX),
        )
        queue.base = self.base
        self.worker = threading.Thread(target=self.run, args=(queue, fd), daemon=True)
        self.worker.start()

    def run(self, queue: DeviceQueue, kick: EventFd) -> None:
        try:
            while self.served < self.requests and kick.wait(TIMEOUT):
                kick.read()
                assert self.memory is not None and self.call is not None
                used = []
                for chain in queue.pop_batch():
                    data = b"".join(self.memory.read(g, n) for g, n, w in chain.segments if not w)[
                        ::-1
                    ]
                    at = 0
                    for g, n, w in chain.segments:
                        if w and at < len(data):
                            at += self.memory.write(g, data[at : at + n])
                    used.append((chain.head, at))
                    self.served += 1
                queue.add_used_batch(used)
                if queue.needs_notification():
                    self.call.write(1)
        except BaseException as exc:
            self.errors.append(exc)


def wait_used(vq: Virtqueue, call: EventFd) -> list[tuple[int, int]]:
    """What a driver does: poll, ask for an interrupt, poll again, then sleep."""
    while True:
        got = vq.poll_used()
        if got:
            return got
        if vq.set_used_notification(True):
            continue
        assert call.wait(TIMEOUT), "no call from the back-end"
        call.read()


@pytest.mark.parametrize("packed", FORMATS)
@pytest.mark.parametrize("event_idx", [False, True], ids=["flags", "event_idx"])
def test_setup_queue_with_vhost_user_backend(
    tmp_sock_dir: Path, packed: bool, event_idx: bool
) -> None:
    messages = [b"hello, device", b"two segments " * 3, b"x", b"the last one"]
    device = RingDevice(len(messages))
    ram = GuestMemory.allocate([(0, 0x40000), (0x100000, 0x40000)])
    size = 6 if packed else 8
    with BackendListener(tmp_sock_dir / "vq.sock") as listener:
        fe = Frontend.connect(listener.path, timeout=TIMEOUT)
        session = listener.accept(timeout=TIMEOUT)
    with fe, serve_in_thread(session, device), EventFd() as kick, EventFd() as call:
        mask = FEATURES & ~(0 if packed else VirtioFeature.RING_PACKED)
        mask &= ~(0 if event_idx else VirtioFeature.RING_EVENT_IDX)
        fe.negotiate(features=mask, packed=packed, event_idx=event_idx)
        fe.set_mem_table(regions_of(ram))
        # The ring in the second region, so guest and user addresses differ per region.
        vq = Virtqueue(
            ram, size, *place_rings(0x100000, size, packed), packed=packed, event_idx=event_idx
        )
        setup_queue(fe, 0, ram, vq, kick, call)
        fe.get_features()  # a request with a reply: everything before it was handled
        assert device.num == size
        assert device.addr == (
            gpa_to_user(ram, vq.desc),
            gpa_to_user(ram, vq.avail),
            gpa_to_user(ram, vq.used),
        )
        assert device.base == (0x8000 if packed else 0)  # a fresh ring
        assert device.enabled  # PROTOCOL_FEATURES was acked: rings start disabled

        for message in messages:
            ram.write(0x1000, message)
            half = len(message) // 2
            readable = [(0x1000, half), (0x1000 + half, len(message) - half)]
            head = vq.add([r for r in readable if r[1]], [(0x2000, 7), (0x3000, 100)])
            vq.publish()
            assert vq.kick_needed()
            kick.write(1)
            assert wait_used(vq, call) == [(head, len(message))]
            got = (ram.read(0x2000, 7) + ram.read(0x3000, 100))[: len(message)]
            assert got == message[::-1]
        assert device.worker is not None
        device.worker.join(TIMEOUT)
        assert device.errors == []
        assert device.served == len(messages)
