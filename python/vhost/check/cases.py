"""The cases of ``vhost check``: conformance rules of the specification as seen from the
front-end's side, and the rows of ADVERSARIAL.md that a front-end can send.

A case gets a :class:`Context` (the socket and what the back-end offered), speaks raw bytes
on a connection of its own, and returns a detail string when the back-end behaved, or
raises :class:`Failed` (wrong behaviour), :class:`NotApplicable` (the back-end lacks what
the case needs) or ``TimeoutError`` (no answer in time: hung). Whether the back-end survived
is judged afterwards by the runner, on a fresh connection.
"""

from __future__ import annotations

import mmap
import os
import socket
import struct
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass

from ..codes import FrontendRequest as Req
from ..codes import ProtocolFeature as PF
from . import wire
from .wire import NEED_REPLY, REPLY, U64, VERSION, VRING_STATE, Received

PROTOCOL_FEATURES_BIT = 1 << 30
"""``VHOST_USER_F_PROTOCOL_FEATURES``: the feature bit that opens protocol negotiation."""
VERSION_1 = 1 << 32
"""``VIRTIO_F_VERSION_1``."""
MiB = 1 << 20
UADDR = 0x7F00_0000_0000
"""The front-end address our guest memory pretends to live at."""
ACKED = VERSION | NEED_REPLY
MAX_CONFIG = 256
"""QEMU's (and rust-vmm's) largest config-space window, ``VHOST_USER_MAX_CONFIG_SIZE``."""


class Failed(Exception):
    """The back-end broke the rule the case checks; the message says how."""


class NotApplicable(Exception):
    """The back-end lacks what the case needs; the message says what."""


class Died(Exception):
    """The back-end's process was killed by a signal during the case; the message says
    by which."""


@dataclass
class Context:
    """What every case may use: where the back-end is and what it offered."""

    path: str
    features: int
    protocol_features: int | None
    device: str | None
    timeout: float = 2.0
    """Longest wait for a reply that must come (past it the case is hung)."""
    quiet: float = 0.3
    """How long to wait for a reply that may or may not come."""
    next_session: Callable[[], None] | None = None
    """For a back-end that serves one front-end and exits: waits for that exit and starts
    it again (raising :class:`Died` when a signal killed it), between the connections of
    a case that needs several."""

    def offers(self, proto: int) -> bool:
        """Whether the back-end offers every protocol feature in ``proto``."""
        return self.protocol_features is not None and self.protocol_features & proto == proto

    def need(self, proto: int) -> None:
        """Raises :class:`NotApplicable` unless the back-end offers ``proto``."""
        if not self.offers(proto):
            names = " and ".join(f.name or "" for f in PF if f.value & proto and f.name)
            raise NotApplicable(f"the back-end does not offer {names}")

    @contextmanager
    def connection(self) -> Iterator[Conn]:
        """A fresh connection to the back-end, closed afterwards."""
        deadline = time.monotonic() + self.timeout
        while True:
            try:
                sock = wire.connect(self.path, self.timeout)
                break
            except BlockingIOError:
                # The listen queue is full: the back-end has not accepted our last
                # connections yet. Past the deadline the case is hung.
                if time.monotonic() > deadline:
                    raise TimeoutError("nobody accepts (the listen queue is full)") from None
                time.sleep(0.02)
            except (FileNotFoundError, ConnectionRefusedError):
                # Some back-ends (rust-vmm's) make a new listening socket after each
                # session: give it the same time to come back.
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.02)
        conn = Conn(sock, self)
        try:
            yield conn
        finally:
            conn.sock.close()


class Conn:
    """One connection of a case: raw send, and receives that name what was expected."""

    def __init__(self, sock: socket.socket, ctx: Context) -> None:
        self.sock = sock
        self.ctx = ctx

    def send(self, data: bytes, fds: Sequence[int] = ()) -> None:
        """Sends ``data`` with ``fds``; our copies of the fds are closed afterwards."""
        try:
            wire.send(self.sock, data, fds)
        finally:
            for fd in fds:
                os.close(fd)

    def recv(self, timeout: float | None = None) -> Received | None:
        """The next message (its fds closed), None on EOF or reset; ``TimeoutError`` past
        ``timeout`` (the context's by default)."""
        self.sock.settimeout(self.ctx.timeout if timeout is None else timeout)
        try:
            r = wire.recv_message(self.sock)
        except (ConnectionResetError, BrokenPipeError):
            return None
        if r is not None:
            r.close_fds()
        return r

    def ask(self, data: bytes, fds: Sequence[int] = (), what: str = "") -> Received:
        """Sends a request whose reply must come; :class:`Failed` when the back-end closes
        instead, or answers another request."""
        code = wire.HEADER.unpack_from(data)[0]
        name = what or _name(code)
        try:
            self.send(data, fds)
        except (ConnectionResetError, BrokenPipeError) as exc:
            raise Failed(f"the back-end closed the connection before {name}") from exc
        r = self.recv()
        if r is None:
            raise Failed(f"the back-end closed the connection instead of answering {name}")
        if r.code != code:
            raise Failed(f"{name} was answered with a reply to request {_name(r.code)}")
        asked = wire.HEADER.unpack_from(data)[1] & NEED_REPLY
        # The specification reserves the other bits; echoing NEED_REPLY (libvhost-user
        # does) is tolerated on the reply to a request that carried it.
        if r.flags not in (VERSION | REPLY, VERSION | REPLY | asked):
            raise Failed(f"the reply to {name} has flags {r.flags:#x}, not {VERSION | REPLY:#x}")
        return r

    def ask_u64(self, data: bytes, fds: Sequence[int] = ()) -> int:
        """:meth:`ask`, checking that the reply is exactly one u64."""
        r = self.ask(data, fds)
        if len(r.body) != 8:
            code = wire.HEADER.unpack_from(data)[0]
            raise Failed(f"the reply to {_name(code)} has {len(r.body)} bytes, not 8")
        return r.u64

    def acked(self, data: bytes, fds: Sequence[int] = ()) -> None:
        """Sends a request with NEED_REPLY and requires a success ack."""
        value = self.ask_u64(data, fds)
        if value != 0:
            code = wire.HEADER.unpack_from(data)[0]
            raise Failed(f"the back-end refused {_name(code)} (ack {value:#x})")

    def negotiate(self, proto: int = 0, features: int = 0) -> int:
        """SET_OWNER, GET_FEATURES, the protocol features ``proto`` (those offered) and
        SET_FEATURES (VERSION_1, PROTOCOL_FEATURES and ``features`` where offered):
        QEMU's order. Returns the protocol features acked."""
        self.send(wire.message(Req.SET_OWNER))
        offered = self.ask_u64(wire.message(Req.GET_FEATURES))
        acked = 0
        if offered & PROTOCOL_FEATURES_BIT:
            have = self.ask_u64(wire.message(Req.GET_PROTOCOL_FEATURES))
            acked = proto & have
            self.send(wire.message(Req.SET_PROTOCOL_FEATURES, U64.pack(acked)))
        flags = ACKED if acked & PF.REPLY_ACK else VERSION
        body = U64.pack(offered & (VERSION_1 | PROTOCOL_FEATURES_BIT | features))
        if flags & NEED_REPLY:
            self.acked(wire.message(Req.SET_FEATURES, body, flags=flags))
        else:
            self.send(wire.message(Req.SET_FEATURES, body))
        return acked

    def in_sync(self) -> str:
        """After a hostile message: GET_FEATURES on this connection must be answered
        correctly, or the connection closed. Returns what happened."""
        try:
            self.send(wire.message(Req.GET_FEATURES))
        except (ConnectionResetError, BrokenPipeError):
            return "closed the connection"
        try:
            r = self.recv()
        except TimeoutError:
            return "stopped answering on this connection (reads our next bytes as the rest?)"
        if r is None:
            return "closed the connection"
        if (r.code, r.flags, r.body) != (Req.GET_FEATURES, VERSION | REPLY,
                                         U64.pack(self.ctx.features)):
            raise Failed(
                f"out of sync: GET_FEATURES was answered with code {r.code}, flags "
                f"{r.flags:#x}, {len(r.body)} bytes"
            )
        return "connection still in sync"


def _name(code: int) -> str:
    try:
        return Req(code).name
    except ValueError:
        return f"request {code}"


# -- conformance -------------------------------------------------------------------------

CaseFn = Callable[[Context], str]


def features_reply(ctx: Context) -> str:
    """GET_FEATURES: exactly 8 bytes, flags VERSION|REPLY, the same value twice, VERSION_1."""
    with ctx.connection() as c:
        value = c.ask_u64(wire.message(Req.GET_FEATURES))
        if value != ctx.features:
            raise Failed(f"GET_FEATURES answered {value:#x}, then {ctx.features:#x}")
        if not value & VERSION_1:
            raise Failed("VIRTIO_F_VERSION_1 (bit 32) is not offered")
    return "8-byte reply, flags 0x5, VERSION_1 offered"


def protocol_features_gate(ctx: Context) -> str:
    """GET_PROTOCOL_FEATURES after bit 30: exact reply; the offered set is accepted back."""
    if ctx.protocol_features is None:
        raise NotApplicable("bit 30 (PROTOCOL_FEATURES) is not offered")
    with ctx.connection() as c:
        c.ask_u64(wire.message(Req.GET_FEATURES))
        value = c.ask_u64(wire.message(Req.GET_PROTOCOL_FEATURES))
        if value != ctx.protocol_features:
            raise Failed(f"GET_PROTOCOL_FEATURES answered {value:#x}, then "
                         f"{ctx.protocol_features:#x}")
        c.send(wire.message(Req.SET_PROTOCOL_FEATURES, U64.pack(value)))
        detail = c.in_sync()
        if "in sync" not in detail:
            raise Failed(f"after SET_PROTOCOL_FEATURES with the offered bits, it {detail}")
    return "offered after bit 30, 8-byte reply, accepted as offered"


def reply_ack(ctx: Context) -> str:
    """REPLY_ACK: requests with NEED_REPLY are acked; a request that has a reply gets
    that reply and no extra ack."""
    ctx.need(PF.REPLY_ACK)
    with ctx.connection() as c:
        c.negotiate(PF.REPLY_ACK)  # SET_FEATURES is sent with NEED_REPLY and must be acked
        c.acked(wire.message(Req.SET_VRING_NUM, VRING_STATE.pack(0, 64), flags=ACKED))
        value = c.ask_u64(wire.message(Req.GET_FEATURES, flags=ACKED))
        if value != ctx.features:
            raise Failed("GET_FEATURES with NEED_REPLY was answered with an ack, not features")
        detail = c.in_sync()
        if "in sync" not in detail:
            raise Failed(f"after a request with both a reply and NEED_REPLY it {detail}")
    return "SET_FEATURES and SET_VRING_NUM acked; a request with a reply gets only the reply"


def queue_count(ctx: Context) -> str:
    """GET_QUEUE_NUM (MQ): an exact reply, in range."""
    ctx.need(PF.MQ)
    with ctx.connection() as c:
        c.negotiate(PF.MQ)
        n = c.ask_u64(wire.message(Req.GET_QUEUE_NUM))
    if not 1 <= n <= 0x8000:
        raise Failed(f"GET_QUEUE_NUM answered {n}")
    return f"{n} queue(s), 8-byte reply"


SLOT = 64 * 1024
"""The size of each region the memory-slot cases add."""


def add_region(c: Conn, i: int) -> int | None:
    """ADD_MEM_REG (with NEED_REPLY) of a 64 KiB region in slot ``i``'s place: the ack,
    or None when the back-end closed the connection instead."""
    region = (i * MiB, SLOT, UADDR + i * MiB, 0)
    data = wire.message(Req.ADD_MEM_REG, wire.single_region(region), flags=ACKED)
    try:
        c.send(data, [wire.memfd(SLOT)])
    except (ConnectionResetError, BrokenPipeError):
        return None
    r = c.recv()
    if r is None:
        return None
    if r.code != Req.ADD_MEM_REG or len(r.body) != 8:
        raise Failed(f"ADD_MEM_REG of region {i + 1} was answered with request {r.code}, "
                     f"{len(r.body)} bytes")
    return r.u64


def fill_slots(c: Conn) -> int:
    """Negotiates CONFIGURE_MEM_SLOTS and REPLY_ACK and fills every slot of
    GET_MAX_MEM_SLOTS; returns the limit."""
    c.negotiate(PF.CONFIGURE_MEM_SLOTS | PF.REPLY_ACK)
    limit = c.ask_u64(wire.message(Req.GET_MAX_MEM_SLOTS))
    if not 1 <= limit <= 4096:
        raise Failed(f"GET_MAX_MEM_SLOTS answered {limit}")
    for i in range(limit):
        if add_region(c, i) != 0:
            raise Failed(f"ADD_MEM_REG of region {i + 1} of {limit} was refused")
    return limit


def mem_slot_limit(ctx: Context) -> str:
    """GET_MAX_MEM_SLOTS: that many ADD_MEM_REG succeed, and one more is refused (C6)."""
    ctx.need(PF.CONFIGURE_MEM_SLOTS | PF.REPLY_ACK)
    with ctx.connection() as c:
        limit = fill_slots(c)
        value = add_region(c, limit)
        if value is None:
            return f"{limit} slots; region {limit + 1} closed the connection"
        if value == 0:
            raise Failed(f"region {limit + 1} was accepted past GET_MAX_MEM_SLOTS = {limit}")
    return f"{limit} slots filled; region {limit + 1} refused"


def config_bounds(ctx: Context) -> str:
    """GET_CONFIG: the reply is exactly the window asked; a window past any config space
    gets no data (G1)."""
    ctx.need(PF.CONFIG)
    with ctx.connection() as c:
        c.negotiate(PF.CONFIG)
        r = c.ask(wire.message(Req.GET_CONFIG, wire.config_body(0, 4)))
        if len(r.body) != wire.CONFIG_HEAD.size + 4:
            raise Failed(f"GET_CONFIG of 4 bytes was answered with {len(r.body)} bytes, "
                         f"not {wire.CONFIG_HEAD.size + 4}")
        try:
            c.send(wire.message(Req.GET_CONFIG, wire.config_body(0xFFFF_FFFC, 8)))
        except (ConnectionResetError, BrokenPipeError):
            return "exact 4-byte window; out-of-range window closed the connection"
        r2 = c.recv()
        if r2 is None:
            return "exact 4-byte window; out-of-range window closed the connection"
        if r2.code != Req.GET_CONFIG:
            raise Failed(f"an out-of-range GET_CONFIG was answered by {_name(r2.code)}")
        head = wire.CONFIG_HEAD.unpack_from(r2.body) if len(r2.body) >= 12 else None
        if len(r2.body) == wire.CONFIG_HEAD.size + 8 and head is not None and head[1] == 8:
            raise Failed("GET_CONFIG at offset 0xfffffffc (past any config space) was "
                         "answered with 8 bytes of data")
    return "exact 4-byte window; out-of-range window refused"


# -- rings: set-up and traffic -----------------------------------------------------------

RING = 8
MEM = 1 * MiB
DESC, AVAIL, USED, BUF = 0x0, 0x1000, 0x2000, 0x10000
DESC_F_NEXT, DESC_F_WRITE = 1, 2


class Ring:
    """Queue 0 of the back-end set up the way QEMU does it, over one memfd region we map
    too (so we can play the driver)."""

    def __init__(self, c: Conn, features: int = 0, proto: int = 0,
                 mem_table: bool = True) -> None:
        self.c = c
        self.acked = c.negotiate(PF.REPLY_ACK | proto, features)
        self.flags = ACKED if self.acked & PF.REPLY_ACK else VERSION
        self.memfd = wire.memfd(MEM)
        self.mem = mmap.mmap(self.memfd, MEM)
        self.kick = os.eventfd(0, os.EFD_CLOEXEC)
        self.call = os.eventfd(0, os.EFD_CLOEXEC | os.EFD_NONBLOCK)
        if mem_table:
            self.send_mem_table()

    def send_mem_table(self) -> None:
        """SET_MEM_TABLE with our one region (again, when called again: a replacement)."""
        self.step(Req.SET_MEM_TABLE, wire.mem_table([(0, MEM, UADDR, 0)]),
                  [os.dup(self.memfd)])

    def step(self, code: int, body: bytes, fds: Sequence[int] = ()) -> None:
        """Sends one set-up request, requiring its ack when REPLY_ACK was negotiated."""
        data = wire.message(code, body, flags=self.flags)
        if self.flags & NEED_REPLY:
            self.c.acked(data, fds)
        else:
            self.c.send(data, fds)

    def setup(self, base: int = 0, *, size: int = RING, desc: int = DESC,
              avail: int = AVAIL, used: int = USED, enable: bool = True) -> None:
        """Queue 0's set-up in QEMU's order: num, addr, base, call, kick, enable (the
        ring addresses are offsets into our region)."""
        self.step(Req.SET_VRING_NUM, VRING_STATE.pack(0, size))
        self.step(Req.SET_VRING_ADDR, wire.vring_addr(
            0, desc=UADDR + desc, avail=UADDR + avail, used=UADDR + used))
        self.step(Req.SET_VRING_BASE, VRING_STATE.pack(0, base))
        self.step(Req.SET_VRING_CALL, wire.vring_word(0), [os.dup(self.call)])
        self.step(Req.SET_VRING_KICK, wire.vring_word(0), [os.dup(self.kick)])
        if enable and self.c.ctx.features & PROTOCOL_FEATURES_BIT:
            self.step(Req.SET_VRING_ENABLE, VRING_STATE.pack(0, 1))
        if not self.flags & NEED_REPLY:
            # Without acks, a reply is the only sign that the set-up was processed: a
            # kick before the enable is handled may be dropped (rust-vmm's is).
            self.c.ask_u64(wire.message(Req.GET_FEATURES))

    def desc(self, i: int, addr: int, length: int, flags: int, nxt: int = 0) -> None:
        """Writes descriptor ``i`` of the split ring."""
        struct.pack_into("=QIHH", self.mem, DESC + 16 * i, addr, length, flags, nxt)

    def publish(self, head: int, idx: int) -> None:
        """Puts ``head`` in avail slot ``idx``, moves avail.idx past it, and kicks."""
        struct.pack_into("=H", self.mem, AVAIL + 4 + 2 * (idx % RING), head)
        struct.pack_into("=H", self.mem, AVAIL + 2, (idx + 1) & 0xFFFF)
        os.eventfd_write(self.kick, 1)

    def used_idx(self) -> int:
        """The back-end's used.idx."""
        value: int = struct.unpack_from("=H", self.mem, USED + 2)[0]
        return value

    def wait_used(self, idx: int) -> None:
        """Waits (up to the context timeout) for used.idx to reach ``idx``."""
        deadline = time.monotonic() + self.c.ctx.timeout
        while self.used_idx() != idx:
            if time.monotonic() > deadline:
                raise TimeoutError(f"the back-end did not use the buffer (used.idx "
                                   f"{self.used_idx()}, want {idx})")
            time.sleep(0.005)
        # (One kick per request, as a driver does: a lost kick is the back-end's bug.)

    def vring_base(self) -> int:
        """GET_VRING_BASE for queue 0, checking the reply is for ring 0 and 8 bytes long."""
        r = self.c.ask(wire.message(Req.GET_VRING_BASE, VRING_STATE.pack(0, 0)))
        if len(r.body) != VRING_STATE.size:
            raise Failed(f"the reply to GET_VRING_BASE has {len(r.body)} bytes, not 8")
        index, num = VRING_STATE.unpack(r.body)
        if index != 0:
            raise Failed(f"GET_VRING_BASE for ring 0 answered for ring {index}")
        return int(num)

    def close(self) -> None:
        """Unmaps the memory and closes our memfd, kick and call eventfds."""
        self.mem.close()
        os.close(self.memfd)
        os.close(self.kick)
        os.close(self.call)


@contextmanager
def ring(ctx: Context, features: int = 0, proto: int = 0,
         mem_table: bool = True) -> Iterator[Ring]:
    """A connection with queue 0's memory table sent (see :class:`Ring`)."""
    with ctx.connection() as c:
        r = Ring(c, features, proto, mem_table)
        try:
            yield r
        finally:
            r.close()


def ring_setup(ctx: Context) -> str:
    """Ring set-up in QEMU's order, each step acked; GET_VRING_BASE reads the base back."""
    with ring(ctx) as r:
        r.setup(base=0)
        base = r.vring_base()
        if base != 0:
            raise Failed(f"GET_VRING_BASE of an unused ring answered {base}, not the 0 set")
    acks = "each step acked" if r.flags & NEED_REPLY else "no REPLY_ACK to check steps"
    return f"mem table, num, addr, base, call, kick, enable; {acks}; base read back"


def _request(r: Ring, device: str) -> None:
    """Puts one device request in descriptor chain 0."""
    if device == "rng":
        r.desc(0, BUF, 64, DESC_F_WRITE)
    elif device == "blk":
        struct.pack_into("=IIQ", r.mem, BUF, 8, 0, 0)  # VIRTIO_BLK_T_GET_ID
        r.desc(0, BUF, 16, DESC_F_NEXT, 1)
        r.desc(1, BUF + 0x100, 20, DESC_F_WRITE | DESC_F_NEXT, 2)
        r.desc(2, BUF + 0x200, 1, DESC_F_WRITE)
    else:
        raise NotApplicable(f"no request to send to a {device} device (pass --device blk "
                            "or rng)" if device != "?" else "device type unknown (pass "
                            "--device blk or rng)")


def vring_base_after_traffic(ctx: Context) -> str:
    """GET_VRING_BASE after three requests the back-end used answers 3."""
    device = ctx.device or "?"
    if device not in ("rng", "blk"):
        _request(None, device)  # type: ignore[arg-type]  # raises NotApplicable
    with ring(ctx) as r:
        r.setup(base=0)
        for n in range(3):
            _request(r, device)
            r.publish(0, n)
            r.wait_used(n + 1)
        base = r.vring_base()
    if base != 3:
        raise Failed(f"GET_VRING_BASE after 3 requests answered {base}, not 3")
    return "3 requests used; GET_VRING_BASE answered 3"


def chain_loop(ctx: Context) -> str:
    """E1: a descriptor chain 0 -> 1 -> 0 must not spin the back-end."""
    with ring(ctx) as r:
        r.setup(base=0)
        r.desc(0, BUF, 16, DESC_F_NEXT, 1)
        r.desc(1, BUF + 0x100, 16, DESC_F_NEXT | DESC_F_WRITE, 0)
        r.publish(0, 0)
        return r.c.in_sync()


def head_out_of_range(ctx: Context) -> str:
    """E2: an avail entry naming a head past the ring's size."""
    with ring(ctx) as r:
        r.setup(base=0)
        r.publish(RING + 3, 0)
        return r.c.in_sync()


def avail_jump(ctx: Context) -> str:
    """E6: avail.idx jumps past the ring's size."""
    with ring(ctx) as r:
        r.setup(base=0)
        r.desc(0, BUF, 16, DESC_F_WRITE)
        struct.pack_into("=H", r.mem, AVAIL + 2, 0xFFF0)
        os.eventfd_write(r.kick, 1)
        return r.c.in_sync()


def desc_outside_memory(ctx: Context) -> str:
    """E3: a descriptor whose buffer lies outside every region, and one that overflows."""
    with ring(ctx) as r:
        r.setup(base=0)
        r.desc(0, 1 << 40, 64, DESC_F_WRITE)
        r.publish(0, 0)
        r.desc(1, 2**64 - 16, 64, DESC_F_WRITE)
        r.publish(1, 1)
        return r.c.in_sync()


def mid_message_disconnect(ctx: Context) -> str:
    """A1: the front-end vanishes inside a header, inside a body, and with fds in flight."""
    for n, (data, fds) in enumerate((
        (wire.header(Req.GET_FEATURES)[:5], 0),
        (wire.header(Req.SET_FEATURES, size=8) + b"\0\0", 0),
        (wire.header(Req.SET_MEM_TABLE, size=40) + struct.pack("=II", 1, 0), 1),
    )):
        if n and ctx.next_session is not None:
            ctx.next_session()
        with ctx.connection() as c:
            try:
                c.send(data, [wire.memfd(MiB) for _ in range(fds)])
                c.sock.shutdown(socket.SHUT_WR)
            except (ConnectionResetError, BrokenPipeError):
                # Closed by the back-end before our cut: what counts is that it
                # survives, judged on the next connection.
                pass
    return "three connections cut mid-message"


def byte_at_a_time(ctx: Context) -> str:
    """A6: a message dribbled one byte per send must be read whole."""
    with ctx.connection() as c:
        for b in wire.message(Req.GET_FEATURES):
            c.sock.sendall(bytes([b]))
            time.sleep(0.001)
        r = c.recv()
        if r is None or r.code != Req.GET_FEATURES or r.body != U64.pack(ctx.features):
            raise Failed("GET_FEATURES sent a byte at a time was not answered correctly")
    return "GET_FEATURES sent a byte at a time answered"


@dataclass(frozen=True)
class Case:
    """One named check: its rule's reference, a one-line description, and its body."""

    name: str
    ref: str
    what: str
    run: CaseFn


CONFORMANCE: list[Case] = [
    Case("get-features", "spec: GET_FEATURES", "exact 8-byte reply, VERSION_1 offered",
         features_reply),
    Case("protocol-features", "spec: Protocol features",
         "GET_PROTOCOL_FEATURES only after bit 30; exact reply", protocol_features_gate),
    Case("reply-ack", "spec: REPLY_ACK", "NEED_REPLY is acked; a reply replaces the ack",
         reply_ack),
    Case("queue-count", "spec: GET_QUEUE_NUM", "queue count in range, exact reply",
         queue_count),
    Case("mem-slot-limit", "spec: GET_MAX_MEM_SLOTS / ADD_MEM_REG (ADVERSARIAL C6)",
         "fills every slot, refuses one more", mem_slot_limit),
    Case("config-bounds", "spec: GET_CONFIG (ADVERSARIAL G1)",
         "exact window reply; out-of-range window refused", config_bounds),
    Case("ring-setup", "spec: Starting and stopping rings",
         "QEMU's set-up order acked step by step; base read back", ring_setup),
    Case("vring-base-after-traffic", "spec: GET_VRING_BASE",
         "after 3 requests GET_VRING_BASE answers 3", vring_base_after_traffic),
    Case("byte-at-a-time", "ADVERSARIAL A6", "a message one byte per send", byte_at_a_time),
    Case("mid-message-disconnect", "ADVERSARIAL A1",
         "front-end vanishes inside a header, a body, with fds in flight",
         mid_message_disconnect),
    Case("chain-loop", "ADVERSARIAL E1", "descriptor chain 0 -> 1 -> 0", chain_loop),
    Case("head-out-of-range", "ADVERSARIAL E2", "avail head >= ring size", head_out_of_range),
    Case("desc-outside-memory", "ADVERSARIAL E3", "buffer outside every region; overflow",
         desc_outside_memory),
    Case("avail-idx-jump", "ADVERSARIAL E6", "avail.idx jumps by more than the ring size",
         avail_jump),
]
