"""The ring-content rows of ADVERSARIAL.md a front-end can provoke (E4, E5, E7, E8, E10,
E11, E12, packed rings F1-F6) and the ones that need a sequence of messages around a ring
(C8, C9, D6). Each case plays the driver over its own connection, like the E1-E3/E6
cases of :mod:`vhost.check.cases`; the runner then checks the back-end on a fresh
connection.

E9 (the driver rewriting a descriptor while the back-end reads it) is a race a checker
cannot win on purpose, and the H rows are a back-end's requests to its front-end: neither
is here.
"""

from __future__ import annotations

import os
import struct
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager

from ..codes import FrontendRequest as Req
from ..codes import ProtocolFeature as PF
from . import wire
from .cases import (
    ACKED,
    BUF,
    DESC,
    DESC_F_NEXT,
    DESC_F_WRITE,
    MEM,
    PROTOCOL_FEATURES_BIT,
    RING,
    SLOT,
    UADDR,
    USED,
    Case,
    Context,
    Failed,
    NotApplicable,
    Ring,
    _request,
    add_region,
    fill_slots,
    ring,
)
from .hostile import socket_fd
from .wire import NEED_REPLY, REPLY, U64, VRING_STATE

INDIRECT_DESC = 1 << 28
"""``VIRTIO_RING_F_INDIRECT_DESC``."""
EVENT_IDX = 1 << 29
"""``VIRTIO_RING_F_EVENT_IDX``."""
RING_PACKED = 1 << 34
"""``VIRTIO_F_RING_PACKED``."""
LOG_ALL = 1 << 26
"""``VHOST_F_LOG_ALL``."""
DESC_F_INDIRECT = 4
TABLE = 0x8000
"""Where indirect tables go in our region."""


def _device(ctx: Context) -> str:
    """The device type, or :class:`NotApplicable` when traffic cannot be made."""
    if ctx.device not in ("rng", "blk"):
        _request(None, ctx.device or "?")  # type: ignore[arg-type]  # raises
    return ctx.device or ""


def _need_feature(ctx: Context, bit: int, name: str) -> None:
    if not ctx.features & bit:
        raise NotApplicable(f"the back-end does not offer {name}")


def _quiet(r: Ring) -> None:
    """Gives the back-end time to act on what was published."""
    time.sleep(r.c.ctx.quiet)


def _writable_bytes(device: str) -> int:
    return 64 if device == "rng" else 21


def zero_length_loop(ctx: Context) -> str:
    """E4: a chain 0 -> 1 -> 0 of zero-length descriptors must not spin the back-end."""
    with ring(ctx) as r:
        r.setup()
        r.desc(0, BUF, 0, DESC_F_NEXT, 1)
        r.desc(1, BUF, 0, DESC_F_NEXT | DESC_F_WRITE, 0)
        r.publish(0, 0)
        return r.c.in_sync()


def bad_indirect(ctx: Context) -> str:
    """E5: indirect tables of length 0, 17 bytes and 2 MiB; nested indirect;
    INDIRECT|NEXT; a table outside memory: each published once."""
    _need_feature(ctx, INDIRECT_DESC, "VIRTIO_RING_F_INDIRECT_DESC")
    with ring(ctx, features=INDIRECT_DESC) as r:
        r.setup()
        # The table itself: a nested indirect entry, then a plain writable buffer.
        struct.pack_into("=QIHH", r.mem, TABLE, TABLE + 0x100, 16, DESC_F_INDIRECT, 0)
        struct.pack_into("=QIHH", r.mem, TABLE + 16, BUF, 64, DESC_F_WRITE, 0)
        bad = [
            (TABLE + 16, 0, DESC_F_INDIRECT),
            (TABLE + 16, 17, DESC_F_INDIRECT),
            (TABLE + 16, 2 * MEM, DESC_F_INDIRECT),
            (TABLE, 32, DESC_F_INDIRECT),
            (TABLE + 16, 16, DESC_F_INDIRECT | DESC_F_NEXT),
            (1 << 40, 16, DESC_F_INDIRECT),
        ]
        for i, (addr, length, flags) in enumerate(bad):
            r.desc(i, addr, length, flags, (i + 1) % RING)
            r.publish(i, i)
        return f"{len(bad)} bad indirect tables published; " + r.c.in_sync()


def same_head_twice(ctx: Context) -> str:
    """E7: one head published twice, and a descriptor shared by two chains: bounded
    work, and no more completions than publications."""
    device = _device(ctx)
    with ring(ctx) as r:
        r.setup()
        _request(r, device)
        r.publish(0, 0)
        r.publish(0, 1)
        _quiet(r)
        if r.used_idx() > 2:
            raise Failed(f"2 publications of one head were completed {r.used_idx()} times")
        # Chain 3 -> 1 -> 2 shares descriptors 1 and 2 with chain 0 (blk); chain 3 -> 0
        # shares descriptor 0 (rng).
        if device == "rng":
            r.desc(3, BUF + 0x300, 16, DESC_F_NEXT | DESC_F_WRITE, 0)
        else:
            r.desc(3, BUF, 16, DESC_F_NEXT, 1)
        r.publish(3, 2)
        _quiet(r)
        if r.used_idx() > 3:
            raise Failed(f"3 publications were completed {r.used_idx()} times")
        return f"{r.used_idx()} of 3 publications completed; " + r.c.in_sync()


def chain_over_4g(ctx: Context) -> str:
    """E8: a chain whose lengths add up past 2^32 (each buffer 2 GiB, over our 1 MiB)."""
    with ring(ctx) as r:
        r.setup()
        for i in range(3):
            r.desc(i, BUF, 0x8000_0000, DESC_F_WRITE | (DESC_F_NEXT if i < 2 else 0),
                   i + 1)
        r.publish(0, 0)
        return r.c.in_sync()


def header_layouts(ctx: Context) -> str:
    """E10: a device header split over 3 descriptors, a chain shorter than the header,
    a readable descriptor after a writable one (and, for rng, a chain with nothing
    writable): handled or dropped, the back-end still answering."""
    device = _device(ctx)
    with ring(ctx) as r:
        r.setup()
        if device == "blk":
            struct.pack_into("=IIQ", r.mem, BUF, 8, 0, 0)  # VIRTIO_BLK_T_GET_ID
            r.desc(0, BUF, 4, DESC_F_NEXT, 1)
            r.desc(1, BUF + 4, 4, DESC_F_NEXT, 2)
            r.desc(2, BUF + 8, 8, DESC_F_NEXT, 3)
            r.desc(3, BUF + 0x100, 20, DESC_F_WRITE | DESC_F_NEXT, 4)
            r.desc(4, BUF + 0x200, 1, DESC_F_WRITE)
            r.publish(0, 0)
            r.desc(5, BUF, 8, DESC_F_NEXT, 6)  # 8 of the header's 16 bytes
            r.desc(6, BUF + 0x200, 1, DESC_F_WRITE)
            r.publish(5, 1)
            r.desc(7, BUF + 0x200, 1, DESC_F_WRITE | DESC_F_NEXT, 0)
            r.publish(7, 2)  # status first, then the header: readable after writable
        else:
            r.desc(0, BUF, 64, 0)  # nothing to write into
            r.publish(0, 0)
            r.desc(1, BUF, 32, DESC_F_WRITE | DESC_F_NEXT, 2)
            r.desc(2, BUF + 32, 32, 0)
            r.publish(1, 1)
        _quiet(r)
        return f"{r.used_idx()} of 3 odd chains completed; " + r.c.in_sync()


def used_len_bounded(ctx: Context) -> str:
    """E11: the used length of a request is at most the chain's writable bytes, and the
    used id is the head published."""
    device = _device(ctx)
    with ring(ctx) as r:
        r.setup()
        _request(r, device)
        r.publish(0, 0)
        r.wait_used(1)
        head, length = struct.unpack_from("=II", r.mem, USED + 4)
    limit = _writable_bytes(device)
    if head != 0:
        raise Failed(f"the used element names head {head}, not the 0 published")
    if length > limit:
        raise Failed(f"the used length {length} exceeds the chain's {limit} writable bytes")
    return f"used length {length} <= {limit} writable bytes"


def event_idx_at_end(ctx: Context) -> str:
    """E12: EVENT_IDX with the avail ring's used_event and the used ring's avail_event
    just past the end of memory: refused at SET_VRING_ADDR or survived in use."""
    _need_feature(ctx, EVENT_IDX, "VIRTIO_RING_F_EVENT_IDX")
    device = _device(ctx)
    avail = MEM - (4 + 2 * RING)
    used = MEM - (4 + 8 * RING) - 0x100
    with ring(ctx, features=EVENT_IDX) as r:
        # The avail ring ends at the region's end: its used_event lies outside.
        r.step(Req.SET_VRING_NUM, VRING_STATE.pack(0, RING))
        data = wire.message(Req.SET_VRING_ADDR, wire.vring_addr(
            0, desc=UADDR + DESC, avail=UADDR + avail, used=UADDR + used), flags=r.flags)
        if r.flags & NEED_REPLY:
            value = r.c.ask_u64(data)
            if value != 0:
                return "SET_VRING_ADDR refused; " + r.c.in_sync()
        else:
            r.c.send(data)
        r.step(Req.SET_VRING_BASE, VRING_STATE.pack(0, 0))
        r.step(Req.SET_VRING_CALL, wire.vring_word(0), [os.dup(r.call)])
        r.step(Req.SET_VRING_KICK, wire.vring_word(0), [os.dup(r.kick)])
        if ctx.features & PROTOCOL_FEATURES_BIT:
            r.step(Req.SET_VRING_ENABLE, VRING_STATE.pack(0, 1))
        _request(r, device)
        struct.pack_into("=H", r.mem, avail + 4, 0)
        struct.pack_into("=H", r.mem, avail + 2, 1)
        os.eventfd_write(r.kick, 1)
        _quiet(r)
        return "accepted, request published; " + r.c.in_sync()


def kick_before_ready(ctx: Context) -> str:
    """D6: a kick before the memory table, then a request published and kicked while
    the ring is disabled: when it is not used before SET_VRING_ENABLE, it must be used
    after it without another kick (the kick is not lost)."""
    device = _device(ctx)
    if not ctx.features & PROTOCOL_FEATURES_BIT:
        raise NotApplicable("rings start enabled without bit 30 (PROTOCOL_FEATURES)")
    with ring(ctx, mem_table=False) as r:
        # Refusing this kick is as good as ignoring it: only its not being acted on counts.
        data = wire.message(Req.SET_VRING_KICK, wire.vring_word(0), flags=r.flags)
        if r.flags & NEED_REPLY:
            early = "refused" if r.c.ask_u64(data, [os.dup(r.kick)]) else "accepted"
        else:
            r.c.send(data, [os.dup(r.kick)])
            early = "sent"
        os.eventfd_write(r.kick, 1)
        r.send_mem_table()
        r.setup(enable=False)
        _request(r, device)
        r.publish(0, 0)
        _quiet(r)
        # The specification has a started but disabled ring processed "without side
        # effects" (a net TX ring is drained and discarded): a request used here is
        # noted, not failed; a kick lost is the failure.
        early_use = r.used_idx() != 0
        if early_use:
            return (f"kick before the memory table {early}; the request on the disabled "
                    "ring was used before SET_VRING_ENABLE (allowed: processed while "
                    "disabled)")
        r.step(Req.SET_VRING_ENABLE, VRING_STATE.pack(0, 1))
        try:
            r.wait_used(1)
        except TimeoutError:
            raise Failed("the kick sent while ring 0 was disabled was lost: the request "
                         "was not used after SET_VRING_ENABLE") from None
        return (f"kick before the memory table {early}; the kick on the "
                "disabled ring kept until enable")


def mem_table_swap(ctx: Context) -> str:
    """C8: SET_MEM_TABLE replaced (same memory, a new fd) right after each of 20
    requests is kicked, while the back-end works on it: every request is still used
    (a head is published again only once it is used: no E7 reuse)."""
    device = _device(ctx)
    with ring(ctx) as r:
        r.setup()
        _request(r, device)
        for n in range(20):
            r.publish(0, n)
            r.send_mem_table()
            try:
                r.wait_used(n + 1)
            except TimeoutError:
                raise Failed(f"request {n + 1} of 20 was not used after SET_MEM_TABLE "
                             f"replaced the table under it (used.idx {r.used_idx()})") from None
        return "20 requests used, each across a table swap; " + r.c.in_sync()


def mem_slot_exhaustion(ctx: Context) -> str:
    """C6 past the limit: with every slot of GET_MAX_MEM_SLOTS filled, 64 more
    ADD_MEM_REG are each refused (or the connection closed); then REM_MEM_REG frees a
    slot that a new ADD_MEM_REG can take."""
    ctx.need(PF.CONFIGURE_MEM_SLOTS | PF.REPLY_ACK)
    with ctx.connection() as c:
        limit = fill_slots(c)
        for extra in range(64):
            value = add_region(c, limit + extra)
            if value is None:
                return f"{limit} slots; closed the connection at region {limit + extra + 1}"
            if value == 0:
                raise Failed(f"region {limit + extra + 1} was accepted past "
                             f"GET_MAX_MEM_SLOTS = {limit}")
        c.acked(wire.message(Req.REM_MEM_REG, wire.single_region((0, SLOT, UADDR, 0)),
                             flags=ACKED), [wire.memfd(SLOT)])
        if add_region(c, limit + 100) != 0:
            raise Failed("ADD_MEM_REG was refused after REM_MEM_REG freed a slot")
    return f"{limit} slots; 64 more refused; a freed slot taken again"


def _log_base(ctx: Context, r: Ring, size: int, offset: int, fd: int) -> str:
    """Sends SET_LOG_BASE (mmap size, offset) with ``fd``; '' when accepted."""
    data = wire.message(Req.SET_LOG_BASE, struct.pack("=QQ", size, offset))
    try:
        r.c.send(data, [fd])
    except (ConnectionResetError, BrokenPipeError):
        return "closed the connection"
    try:
        reply = r.c.recv(ctx.quiet)
    except TimeoutError:
        return "no reply"
    if reply is None:
        return "closed the connection"
    if reply.code != Req.SET_LOG_BASE or not reply.flags & REPLY:
        raise Failed(f"SET_LOG_BASE was answered with a reply to request {reply.code}")
    if reply.body in (b"", U64.pack(0)):
        return ""
    return "refused"


def log_base_bad(ctx: Context) -> str:
    """C9: SET_LOG_BASE whose size + offset overflows, whose fd cannot be mapped (a
    socket), and one smaller than the log of our 1 MiB of memory: each refused (a
    failure reply or a closed connection), never accepted."""
    ctx.need(PF.LOG_SHMFD)
    _need_feature(ctx, LOG_ALL, "VHOST_F_LOG_ALL")
    results: list[str] = []
    tries: list[tuple[str, int, int, Callable[[], int]]] = [
        ("size + offset overflowing u64", 4096, 2**64 - 2048, lambda: wire.memfd(4096)),
        ("a socket as the log fd", 4096, 0, lambda: socket_fd()[0]),
        ("a 1-byte log for 1 MiB of memory", 1, 0, lambda: wire.memfd(4096)),
    ]
    for what, size, offset, make in tries:
        if results and ctx.next_session is not None:
            ctx.next_session()
        with ring(ctx, features=LOG_ALL, proto=PF.LOG_SHMFD) as r:
            if not r.acked & PF.LOG_SHMFD:
                raise NotApplicable("LOG_SHMFD was not acked")
            outcome = _log_base(ctx, r, size, offset, make())
            if not outcome:
                raise Failed(f"SET_LOG_BASE with {what} was accepted")
            if outcome != "closed the connection":
                outcome += "; " + r.c.in_sync()
            results.append(f"{what}: {outcome}")
    return "; ".join(results)


# -- packed rings ------------------------------------------------------------------------

P_AVAIL, P_USED = 1 << 7, 1 << 15
P_DESC, P_DRIVER, P_DEVICE, P_BUF = 0x0, 0x90000, 0x90100, 0xA0000


class Packed:
    """Queue 0 as a packed ring of ``size`` descriptors over our region (ring at 0,
    event areas at 0x90000, buffers from 0xa0000): we are the driver."""

    def __init__(self, r: Ring, size: int) -> None:
        self.r = r
        self.size = size
        self.next = 0
        self.wrap = 1

    def setup(self, driver: int = P_DRIVER) -> None:
        """Sets queue 0 up as this packed ring the way a front-end would: size, addresses
        (the driver event area at ``driver``), base at index 0 with wrap counter 1, call
        and kick, and enable when protocol features were negotiated."""
        r = self.r
        r.step(Req.SET_VRING_NUM, VRING_STATE.pack(0, self.size))
        r.step(Req.SET_VRING_ADDR, wire.vring_addr(
            0, desc=UADDR + P_DESC, avail=driver if driver >= 1 << 40 else UADDR + driver,
            used=UADDR + P_DEVICE))
        r.step(Req.SET_VRING_BASE, VRING_STATE.pack(0, 1 << 15))  # index 0, wrap 1
        r.step(Req.SET_VRING_CALL, wire.vring_word(0), [os.dup(r.call)])
        r.step(Req.SET_VRING_KICK, wire.vring_word(0), [os.dup(r.kick)])
        if r.c.ctx.features & PROTOCOL_FEATURES_BIT:
            r.step(Req.SET_VRING_ENABLE, VRING_STATE.pack(0, 1))
        if not r.flags & NEED_REPLY:
            r.c.ask_u64(wire.message(Req.GET_FEATURES))

    def put(self, addr: int, length: int, flags: int, buf_id: int,
            avail: bool = True) -> int:
        """Writes the next descriptor (available in the current wrap unless ``avail``
        is false); returns its slot."""
        slot = self.next
        wrap_bits = (P_AVAIL if self.wrap else P_USED) if avail else 0
        struct.pack_into("=QIHH", self.r.mem, P_DESC + 16 * slot, addr, length, buf_id,
                         flags | wrap_bits)
        self.next += 1
        if self.next == self.size:
            self.next, self.wrap = 0, self.wrap ^ 1
        return slot

    def request(self, device: str, buf_id: int) -> tuple[int, int]:
        """One device request (its chain's descriptors); (head slot, its wrap)."""
        wrap = self.wrap
        if device == "rng":
            return self.put(P_BUF, 64, DESC_F_WRITE, buf_id), wrap
        struct.pack_into("=IIQ", self.r.mem, P_BUF, 8, 0, 0)
        head = self.put(P_BUF, 16, DESC_F_NEXT, buf_id)
        self.put(P_BUF + 0x100, 20, DESC_F_WRITE | DESC_F_NEXT, buf_id)
        self.put(P_BUF + 0x200, 1, DESC_F_WRITE, buf_id)
        return head, wrap

    def is_used(self, slot: int, wrap: int) -> bool:
        """Whether the back-end marked descriptor ``slot`` used for ``wrap``: its AVAIL
        and USED bits both equal the wrap counter, as the packed-ring rules say."""
        flags = struct.unpack_from("=H", self.r.mem, P_DESC + 16 * slot + 14)[0]
        want = (P_AVAIL | P_USED) if wrap else 0
        return bool(flags & (P_AVAIL | P_USED) == want)

    def kick(self) -> None:
        """Tells the back-end the ring has new buffers (one write to the kick eventfd)."""
        os.eventfd_write(self.r.kick, 1)


def _chain_len(device: str) -> int:
    return 1 if device == "rng" else 3


@contextmanager
def packed(ctx: Context, size: int = RING, features: int = 0) -> Iterator[Packed]:
    """A connection with VIRTIO_F_RING_PACKED negotiated and the memory table sent."""
    _need_feature(ctx, RING_PACKED, "VIRTIO_F_RING_PACKED")
    with ring(ctx, features=RING_PACKED | features) as r:
        yield Packed(r, size)


def packed_bad_ids(ctx: Context) -> str:
    """F1: a buffer id >= the ring size, and an id reused while its buffer is in flight:
    no double completion, the back-end still answering."""
    device = _device(ctx)
    with packed(ctx) as p:
        p.setup()
        p.request(device, RING + 5)
        p.request(device, 1)
        p.request(device, 1)
        p.kick()
        _quiet(p.r)
        return p.r.c.in_sync()


def packed_wrap_mismatch(ctx: Context) -> str:
    """F2: a descriptor whose AVAIL and USED bits both equal the wrap counter is used,
    not available: the back-end must not touch its buffer."""
    _device(ctx)
    with packed(ctx) as p:
        p.setup()
        struct.pack_into("=QIHH", p.r.mem, P_DESC, P_BUF, 64, 0,
                         DESC_F_WRITE | P_AVAIL | P_USED)
        p.r.mem[P_BUF:P_BUF + 64] = bytes(64)
        p.kick()
        _quiet(p.r)
        if p.r.mem[P_BUF:P_BUF + 64] != bytes(64):
            raise Failed("a descriptor marked used (AVAIL = USED = wrap) was processed: "
                         "its buffer was written")
        return "a used-marked descriptor was left alone; " + p.r.c.in_sync()


def packed_chain_around(ctx: Context) -> str:
    """F3: every descriptor of the ring available with NEXT set: a chain around the
    whole ring must stop after the ring's size."""
    with packed(ctx) as p:
        p.setup()
        for _ in range(RING):
            p.put(P_BUF, 16, DESC_F_NEXT | DESC_F_WRITE, 0)
        p.kick()
        _quiet(p.r)
        return p.r.c.in_sync()


def packed_bad_indirect(ctx: Context) -> str:
    """F4: packed indirect tables of length 0 and 17 bytes."""
    _need_feature(ctx, INDIRECT_DESC, "VIRTIO_RING_F_INDIRECT_DESC")
    with packed(ctx, features=INDIRECT_DESC) as p:
        p.setup()
        struct.pack_into("=QIHH", p.r.mem, TABLE, P_BUF, 64, 0, DESC_F_WRITE)
        p.put(TABLE, 0, DESC_F_INDIRECT, 0)
        p.put(TABLE, 17, DESC_F_INDIRECT, 1)
        p.kick()
        _quiet(p.r)
        return p.r.c.in_sync()


def packed_wraps(ctx: Context) -> str:
    """F5: packed rings of 3, 1000 and 32768 descriptors (not powers of 2 but the
    last), filled and drained across several wraps: every request is used, in the
    slot and wrap the driver expects."""
    device = _device(ctx)
    chain = _chain_len(device)
    done: list[str] = []
    for size, wraps in ((3, 8), (1000, 3), (32768, 2)):
        if done and ctx.next_session is not None:
            ctx.next_session()
        with packed(ctx, size=size) as p:
            try:
                p.setup()
            except Failed as exc:
                if "refused SET_VRING_NUM" not in str(exc):
                    raise
                # A device may cap its queue size: the sizes it takes are checked.
                done.append(f"{size}: size refused")
                continue
            sent = 0
            while sent < wraps * size:
                batch = []
                for i in range(max(1, (size // chain) // 2)):
                    batch.append(p.request(device, i))
                p.kick()
                deadline = time.monotonic() + ctx.timeout
                for slot, wrap in batch:
                    while not p.is_used(slot, wrap):
                        if time.monotonic() > deadline:
                            raise Failed(f"ring of {size}: request at slot {slot} (wrap "
                                         f"{wrap}) not used after {sent} descriptors")
                        time.sleep(0.001)
                sent += len(batch) * chain
            done.append(f"{size}: {sent // chain} requests")
    if all("refused" in d for d in done):
        raise Failed("every packed ring size (3, 1000, 32768) was refused")
    return "all used (" + ", ".join(done) + ")"


def packed_event_area(ctx: Context) -> str:
    """F6: the driver event-suppression area outside memory (refused or survived), and
    its flags set to the reserved value 3 with a request in flight."""
    device = _device(ctx)
    results: list[str] = []
    with packed(ctx) as p:
        try:
            p.setup(driver=1 << 40)
            p.request(device, 0)
            p.kick()
            _quiet(p.r)
            results.append("driver area outside memory accepted")
        except Failed as exc:
            if "refused" not in str(exc):
                raise
            results.append("driver area outside memory refused")
        results.append(p.r.c.in_sync())
    if ctx.next_session is not None:
        ctx.next_session()
    with packed(ctx) as p:
        struct.pack_into("=HH", p.r.mem, P_DRIVER, 0, 3)  # off_wrap 0, flags 3
        p.setup()
        p.request(device, 0)
        p.kick()
        _quiet(p.r)
        results.append("reserved flags 3: " + p.r.c.in_sync())
    return "; ".join(results)


RING_CASES: list[Case] = [
    Case("zero-length-loop", "ADVERSARIAL E4", "chain loop of zero-length descriptors",
         zero_length_loop),
    Case("bad-indirect", "ADVERSARIAL E5",
         "indirect len 0, 17, 2 MiB; nested; INDIRECT|NEXT; table outside memory",
         bad_indirect),
    Case("same-head-twice", "ADVERSARIAL E7", "one head published twice; a shared descriptor",
         same_head_twice),
    Case("chain-over-4g", "ADVERSARIAL E8", "chain lengths adding up past 2^32",
         chain_over_4g),
    Case("header-layouts", "ADVERSARIAL E10",
         "header over 3 descriptors; short chain; readable after writable", header_layouts),
    Case("used-len-bounded", "ADVERSARIAL E11", "used length <= writable bytes, used id = head",
         used_len_bounded),
    Case("event-idx-at-end", "ADVERSARIAL E12", "EVENT_IDX fields past the end of memory",
         event_idx_at_end),
    Case("kick-before-ready", "ADVERSARIAL D6",
         "kick before the mem table; kick while disabled is kept", kick_before_ready),
    Case("mem-table-swap", "ADVERSARIAL C8", "SET_MEM_TABLE replaced while requests run",
         mem_table_swap),
    Case("mem-slot-exhaustion", "ADVERSARIAL C6",
         "64 ADD_MEM_REG past the slot limit refused; a freed slot reusable",
         mem_slot_exhaustion),
    Case("log-base-bad", "ADVERSARIAL C9",
         "SET_LOG_BASE overflow, socket fd, log too small", log_base_bad),
    Case("packed-bad-ids", "ADVERSARIAL F1", "packed buffer id >= size; id reused in flight",
         packed_bad_ids),
    Case("packed-wrap-mismatch", "ADVERSARIAL F2", "AVAIL/USED bits say used: left alone",
         packed_wrap_mismatch),
    Case("packed-chain-around", "ADVERSARIAL F3", "packed NEXT chain around the whole ring",
         packed_chain_around),
    Case("packed-bad-indirect", "ADVERSARIAL F4", "packed indirect len 0 and 17",
         packed_bad_indirect),
    Case("packed-wraps", "ADVERSARIAL F5", "packed sizes 3, 1000, 32768 across wraps",
         packed_wraps),
    Case("packed-event-area", "ADVERSARIAL F6", "event area outside memory; flags 3",
         packed_event_area),
]
"""The ring-content and ring-sequence cases, run after the hostile messages."""

__all__ = ["RING_CASES"]
