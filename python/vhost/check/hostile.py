"""The one-message rows of ADVERSARIAL.md a front-end can send, as data: each
:class:`Hostile` is a message (with fds) that a back-end must refuse (a NACK, an error
reply or a closed connection) without dying, leaking or losing sync."""

from __future__ import annotations

import functools
import os
import socket
import struct
from collections.abc import Callable
from dataclasses import dataclass

from ..codes import FrontendRequest as Req
from ..codes import ProtocolFeature as PF
from . import wire
from .cases import ACKED, UADDR, VERSION_1, Case, Context, Failed, MiB, NotApplicable
from .wire import NEED_REPLY, REPLY, U64, VERSION, VRING_STATE

FdMaker = Callable[[], list[int]]


def no_fds() -> list[int]:
    """No fds (the default of :attr:`Hostile.fds`)."""
    return []


def eventfds(n: int) -> FdMaker:
    """``n`` eventfds (where a kick, call or nothing belongs)."""
    return lambda: [os.eventfd(0, os.EFD_CLOEXEC) for _ in range(n)]


def memfds(n: int, size: int = MiB) -> FdMaker:
    """``n`` memfds of ``size`` bytes (guest memory, possibly too small)."""
    return lambda: [wire.memfd(size) for _ in range(n)]


def socket_fd() -> list[int]:
    """A connected socket (where memory or an eventfd belongs)."""
    a, b = socket.socketpair()
    b.close()
    return [a.detach()]


def file_fd() -> list[int]:
    """A read-only regular file (where an eventfd belongs)."""
    return [os.open("/proc/self/stat", os.O_RDONLY | os.O_CLOEXEC)]


def pipe_fd() -> list[int]:
    """The read end of a pipe whose write end is closed (where a socket belongs)."""
    r, w = os.pipe()
    os.close(w)
    return [r]


def region(gpa: int, size: int, uaddr: int = UADDR, offset: int = 0) -> tuple[int, int, int, int]:
    """A memory region tuple for :func:`vhost.check.wire.mem_table`."""
    return (gpa, size, uaddr, offset)


@dataclass(frozen=True)
class Hostile:
    """A hostile message: where it comes from in ADVERSARIAL.md, the bytes and fds, and
    what must be negotiated first."""

    name: str
    ref: str
    what: str
    data: bytes
    fds: FdMaker = no_fds
    proto: int | None = 0
    """Protocol features to negotiate first (None: send on a fresh connection)."""
    needs: int = 0
    """Protocol features the back-end must offer for the case to apply."""
    refuse: bool = True
    """A success ack is a failure (the message breaks a rule, not only a habit)."""


M = wire.message
TWO = wire.mem_table([region(0, MiB), region(MiB, MiB, UADDR + MiB)])
RA = int(PF.REPLY_ACK)

HOSTILE: list[Hostile] = [
    Hostile("code-0", "ADVERSARIAL A2", "request code 0", M(0), proto=None),
    Hostile("code-ffffffff", "ADVERSARIAL A2", "request code 0xffffffff", M(0xFFFFFFFF),
            proto=None),
    Hostile("code-unassigned-acked", "ADVERSARIAL A2", "request code 1000 with NEED_REPLY",
            M(1000, flags=ACKED), proto=RA, needs=RA),
    Hostile("version-2", "ADVERSARIAL A3", "header version 2", M(Req.GET_FEATURES, flags=2),
            proto=None),
    Hostile("version-0", "ADVERSARIAL A3", "header version 0", M(Req.GET_FEATURES, flags=0),
            proto=None),
    Hostile("reply-bit-on-request", "ADVERSARIAL A3", "REPLY flag on a request",
            M(Req.GET_FEATURES, flags=VERSION | REPLY), proto=None),
    Hostile("size-ffffffff", "ADVERSARIAL A4", "header size 0xffffffff, no body",
            wire.header(Req.SET_FEATURES, size=0xFFFFFFFF), proto=None),
    Hostile("size-4097", "ADVERSARIAL A4", "header size 4097, no body",
            wire.header(Req.SET_FEATURES, size=4097), proto=None),
    Hostile("vring-num-short-body", "ADVERSARIAL A5", "SET_VRING_NUM with 4 bytes",
            M(Req.SET_VRING_NUM, b"\0" * 4, flags=ACKED), proto=RA, needs=RA),
    Hostile("features-trailing-bytes", "ADVERSARIAL A5", "SET_FEATURES with 9 bytes",
            M(Req.SET_FEATURES, U64.pack(VERSION_1) + b"x", flags=ACKED), proto=RA, needs=RA),
    Hostile("config-without-CONFIG", "ADVERSARIAL A7", "GET_CONFIG when CONFIG is not acked",
            M(Req.GET_CONFIG, wire.config_body(0, 4)), proto=0, needs=int(PF.CONFIG)),
    Hostile("add-mem-reg-without-slots", "ADVERSARIAL A7",
            "ADD_MEM_REG when CONFIGURE_MEM_SLOTS is not acked",
            M(Req.ADD_MEM_REG, wire.single_region(region(0, MiB)), flags=ACKED),
            fds=memfds(1), proto=RA, needs=RA | int(PF.CONFIGURE_MEM_SLOTS)),
    Hostile("features-never-offered", "ADVERSARIAL A9", "SET_FEATURES with bit 63 (unoffered)",
            M(Req.SET_FEATURES, U64.pack(VERSION_1 | 1 << 63), flags=ACKED), proto=RA, needs=RA),
    Hostile("unknown-protocol-feature", "ADVERSARIAL A9",
            "SET_PROTOCOL_FEATURES with bit 40", M(Req.GET_FEATURES)
            + M(Req.SET_PROTOCOL_FEATURES, U64.pack(1 << 40)), proto=None,
            needs=0, refuse=False),
    Hostile("fds-on-get-features", "ADVERSARIAL B1", "3 eventfds on GET_FEATURES",
            M(Req.GET_FEATURES), fds=eventfds(3), proto=None, refuse=False),
    Hostile("64-fds", "ADVERSARIAL B2", "64 fds on SET_VRING_KICK",
            M(Req.SET_VRING_KICK, wire.vring_word(0)), fds=eventfds(64)),
    Hostile("253-fds", "ADVERSARIAL B2", "253 (SCM_MAX_FD) fds on SET_VRING_KICK",
            M(Req.SET_VRING_KICK, wire.vring_word(0)), fds=eventfds(253)),
    Hostile("two-regions-one-fd", "ADVERSARIAL B3", "SET_MEM_TABLE, 2 regions, 1 fd",
            M(Req.SET_MEM_TABLE, TWO, flags=ACKED), fds=memfds(1), proto=RA, needs=RA),
    Hostile("two-regions-three-fds", "ADVERSARIAL B3", "SET_MEM_TABLE, 2 regions, 3 fds",
            M(Req.SET_MEM_TABLE, TWO, flags=ACKED), fds=memfds(3), proto=RA, needs=RA),
    Hostile("nofd-with-fd", "ADVERSARIAL B4", "SET_VRING_KICK with NOFD and an fd",
            M(Req.SET_VRING_KICK, wire.vring_word(0, nofd=True), flags=ACKED),
            fds=eventfds(1), proto=RA, needs=RA),
    Hostile("no-nofd-no-fd", "ADVERSARIAL B4", "SET_VRING_CALL without NOFD and without fd",
            M(Req.SET_VRING_CALL, wire.vring_word(0), flags=ACKED), proto=RA, needs=RA),
    Hostile("vring-word-reserved-bits", "ADVERSARIAL B5", "SET_VRING_KICK word 0x1_0000_0000",
            M(Req.SET_VRING_KICK, U64.pack(1 << 32), flags=ACKED), fds=eventfds(1), proto=RA,
            needs=RA),
    Hostile("region-fd-is-socket", "ADVERSARIAL B6", "SET_MEM_TABLE region fd is a socket",
            M(Req.SET_MEM_TABLE, wire.mem_table([region(0, MiB)]), flags=ACKED),
            fds=socket_fd, proto=RA, needs=RA),
    Hostile("region-fd-is-eventfd", "ADVERSARIAL B6", "SET_MEM_TABLE region fd is an eventfd",
            M(Req.SET_MEM_TABLE, wire.mem_table([region(0, MiB)]), flags=ACKED),
            fds=eventfds(1), proto=RA, needs=RA),
    Hostile("kick-fd-is-file", "ADVERSARIAL B6", "SET_VRING_KICK fd is a regular file",
            M(Req.SET_VRING_KICK, wire.vring_word(0)), fds=file_fd, refuse=False),
    Hostile("backend-req-fd-is-pipe", "ADVERSARIAL B6", "SET_BACKEND_REQ_FD fd is a pipe",
            M(Req.SET_BACKEND_REQ_FD, flags=ACKED), fds=pipe_fd,
            proto=RA | int(PF.BACKEND_REQ), needs=RA | int(PF.BACKEND_REQ), refuse=False),
    Hostile("zero-regions", "ADVERSARIAL C1", "SET_MEM_TABLE with 0 regions",
            M(Req.SET_MEM_TABLE, wire.mem_table([]), flags=ACKED), proto=RA, needs=RA,
            refuse=False),
    Hostile("513-regions", "ADVERSARIAL C1", "SET_MEM_TABLE claiming 513 regions, 1 fd",
            M(Req.SET_MEM_TABLE, wire.mem_table([region(0, MiB)], count=513), flags=ACKED),
            fds=memfds(1), proto=RA, needs=RA),
    Hostile("count-says-two-one-sent", "ADVERSARIAL C1", "SET_MEM_TABLE count 2, 1 region",
            M(Req.SET_MEM_TABLE, wire.mem_table([region(0, MiB)], count=2), flags=ACKED),
            fds=memfds(1), proto=RA, needs=RA),
    Hostile("gpa-overflow", "ADVERSARIAL C2", "region gpa + size overflows u64",
            M(Req.SET_MEM_TABLE, wire.mem_table([region(2**64 - 4096, MiB)]), flags=ACKED),
            fds=memfds(1), proto=RA, needs=RA),
    Hostile("uaddr-overflow", "ADVERSARIAL C2", "region user address + size overflows u64",
            M(Req.SET_MEM_TABLE, wire.mem_table([region(0, MiB, 2**64 - 4096)]), flags=ACKED),
            fds=memfds(1), proto=RA, needs=RA),
    Hostile("offset-overflow", "ADVERSARIAL C2", "region mmap offset + size overflows u64",
            M(Req.SET_MEM_TABLE, wire.mem_table([region(0, MiB, UADDR, 2**64 - 4096)]),
              flags=ACKED), fds=memfds(1), proto=RA, needs=RA),
    Hostile("region-size-0", "ADVERSARIAL C2", "region of size 0",
            M(Req.SET_MEM_TABLE, wire.mem_table([region(0, 0)]), flags=ACKED),
            fds=memfds(1), proto=RA, needs=RA),
    Hostile("size-aligns-to-0", "ADVERSARIAL C3", "region size 2^64-1 (page-aligns to 0)",
            M(Req.SET_MEM_TABLE, wire.mem_table([region(0, 2**64 - 1, 0)]), flags=ACKED),
            fds=memfds(1), proto=RA, needs=RA),
    Hostile("overlapping-gpa", "ADVERSARIAL C4", "two regions overlapping in guest memory",
            M(Req.SET_MEM_TABLE, wire.mem_table([region(0, MiB),
                                                 region(MiB // 2, MiB, UADDR + 4 * MiB)]),
              flags=ACKED), fds=memfds(2), proto=RA, needs=RA),
    Hostile("memfd-smaller-than-region", "ADVERSARIAL C5", "4 KiB memfd for a 1 GiB region",
            M(Req.SET_MEM_TABLE, wire.mem_table([region(0, 1 << 30)]), flags=ACKED),
            fds=memfds(1, 4096), proto=RA, needs=RA),
    Hostile("rem-absent-region", "ADVERSARIAL C7", "REM_MEM_REG of a region never added",
            M(Req.REM_MEM_REG, wire.single_region(region(0, MiB)), flags=ACKED),
            proto=RA | int(PF.CONFIGURE_MEM_SLOTS), needs=RA | int(PF.CONFIGURE_MEM_SLOTS),
            refuse=False),
    Hostile("vring-num-0", "ADVERSARIAL D1", "SET_VRING_NUM 0",
            M(Req.SET_VRING_NUM, VRING_STATE.pack(0, 0), flags=ACKED), proto=RA, needs=RA),
    Hostile("vring-num-3", "ADVERSARIAL D1", "SET_VRING_NUM 3 (split ring, not a power of 2)",
            M(Req.SET_VRING_NUM, VRING_STATE.pack(0, 3), flags=ACKED), proto=RA, needs=RA),
    Hostile("vring-num-65536", "ADVERSARIAL D1", "SET_VRING_NUM 65536",
            M(Req.SET_VRING_NUM, VRING_STATE.pack(0, 65536), flags=ACKED), proto=RA, needs=RA),
    Hostile("vring-num-index-256", "ADVERSARIAL D2", "SET_VRING_NUM for ring 256",
            M(Req.SET_VRING_NUM, VRING_STATE.pack(256, 64), flags=ACKED), proto=RA, needs=RA),
    Hostile("vring-addr-index-0x10001", "ADVERSARIAL D2", "SET_VRING_ADDR for ring 0x10001",
            M(Req.SET_VRING_ADDR, wire.vring_addr(0x10001), flags=ACKED), proto=RA, needs=RA),
    Hostile("get-vring-base-index-255", "ADVERSARIAL D2", "GET_VRING_BASE for ring 255",
            M(Req.GET_VRING_BASE, VRING_STATE.pack(255, 0)), refuse=False),
    Hostile("kick-index-255", "ADVERSARIAL D2", "SET_VRING_KICK for ring 255",
            M(Req.SET_VRING_KICK, wire.vring_word(255), flags=ACKED), fds=eventfds(1),
            proto=RA, needs=RA),
    Hostile("enable-index-0x10001", "ADVERSARIAL D2", "SET_VRING_ENABLE for ring 0x10001",
            M(Req.SET_VRING_ENABLE, VRING_STATE.pack(0x10001, 1), flags=ACKED), proto=RA,
            needs=RA),
    Hostile("vring-addr-misaligned", "ADVERSARIAL D3", "SET_VRING_ADDR desc at 0x1001",
            M(Req.SET_VRING_ADDR, wire.vring_addr(0, desc=0x1001), flags=ACKED), proto=RA,
            needs=RA, refuse=False),
    Hostile("vring-addr-unmapped", "ADVERSARIAL D4", "SET_VRING_ADDR outside every region",
            M(Req.SET_VRING_ADDR, wire.vring_addr(0), flags=ACKED), proto=RA, needs=RA,
            refuse=False),
    Hostile("vring-base-over-16-bits", "ADVERSARIAL D5", "SET_VRING_BASE 0x10000",
            M(Req.SET_VRING_BASE, VRING_STATE.pack(0, 0x10000), flags=ACKED), proto=RA,
            needs=RA, refuse=False),
    Hostile("inflight-too-small", "ADVERSARIAL D7", "SET_INFLIGHT_FD, 4 KiB fd for 2x1024",
            M(Req.SET_INFLIGHT_FD, struct.pack("=QQHH4x", 1 << 20, 0, 2, 1024), flags=ACKED),
            fds=memfds(1, 4096), proto=RA | int(PF.INFLIGHT_SHMFD),
            needs=RA | int(PF.INFLIGHT_SHMFD)),
    Hostile("config-offset-overflow", "ADVERSARIAL G1", "GET_CONFIG offset+size overflows u32",
            M(Req.GET_CONFIG, wire.config_body(0xFFFFFFFF, 4)), proto=int(PF.CONFIG),
            needs=int(PF.CONFIG), refuse=False),
    Hostile("config-size-0", "ADVERSARIAL G1", "GET_CONFIG of 0 bytes",
            M(Req.GET_CONFIG, wire.config_body(0, 0)), proto=int(PF.CONFIG),
            needs=int(PF.CONFIG), refuse=False),
    Hostile("config-size-4097", "ADVERSARIAL G1", "GET_CONFIG of 4097 bytes",
            M(Req.GET_CONFIG, wire.config_body(0, 4097)), proto=int(PF.CONFIG),
            needs=int(PF.CONFIG), refuse=False),
    Hostile("config-size-field-lies", "ADVERSARIAL G2", "GET_CONFIG size 8 with 4 bytes",
            M(Req.GET_CONFIG, wire.config_body(0, 8, data=bytes(4))), proto=int(PF.CONFIG),
            needs=int(PF.CONFIG), refuse=False),
]


def run_hostile(ctx: Context, h: Hostile) -> str:
    """Sends ``h``; the back-end must close, NACK, or answer without a success ack, and
    stay in sync if it keeps the connection."""
    data, needs, proto = h.data, h.needs, h.proto
    code, flags, size = wire.HEADER.unpack_from(data)
    if needs & RA and not ctx.offers(RA):
        # No REPLY_ACK: send it without NEED_REPLY, and judge by what follows only.
        flags &= ~NEED_REPLY
        data = wire.header(code, flags, size) + data[wire.HEADER.size:]
        needs &= ~RA
        proto = None if proto is None else proto & ~RA
    if needs and not ctx.offers(needs):
        ctx.need(needs)
    if proto and ctx.protocol_features is None:
        raise NotApplicable("bit 30 (PROTOCOL_FEATURES) is not offered")
    with ctx.connection() as c:
        if proto is not None:
            c.negotiate(proto)
        try:
            c.send(data, h.fds())
        except (ConnectionResetError, BrokenPipeError):
            return "closed the connection"
        try:
            r = c.recv(ctx.quiet)
        except TimeoutError:
            return "no reply; " + c.in_sync()
        if r is None:
            return "closed the connection"
        if r.code == code and r.flags & REPLY and flags & NEED_REPLY and r.body == U64.pack(0):
            if h.refuse:
                raise Failed(f"{h.what} was acked as a success")
            return "accepted; " + c.in_sync()
        if r.code not in (code, Req.GET_FEATURES):
            raise Failed(f"{h.what} was answered with a reply to {r.code}")
        return "refused; " + c.in_sync()


# -- IOTLB_MSG (a back-end behind a vIOMMU) -----------------------------------------------

ACCESS_PLATFORM = 1 << 33
"""``VIRTIO_F_ACCESS_PLATFORM``: the device reaches memory through the front-end's IOMMU,
which feeds the back-end's IOTLB with ``IOTLB_MSG``."""
IOTLB = struct.Struct("=QQQBB6x")
"""``struct vhost_iotlb_msg``: iova, size, uaddr, perm, type, padded to 32 bytes."""
IOTLB_UPDATE, IOTLB_INVALIDATE = 2, 3
PERM_RW = 3
IOTLB_MEM = MiB
"""The memory table of the IOTLB cases: one region of this size at :data:`UADDR`."""
GOOD_UPDATE = (0x10_0000, 0x1000, UADDR, PERM_RW, IOTLB_UPDATE)
"""A valid update (one page of the table's memory), accepted before and after each bad
one: what shows that the session and its IOTLB still work."""

IotlbFields = tuple[int, int, int, int, int]

IOTLB_BAD: dict[str, list[tuple[str, IotlbFields]]] = {
    "iotlb-update-refused": [
        ("update with permission 0", (0x1000, 0x1000, UADDR, 0, IOTLB_UPDATE)),
        ("update of front-end memory outside the memory table",
         (0x1000, 0x1000, UADDR + IOTLB_MEM, PERM_RW, IOTLB_UPDATE)),
    ],
    "iotlb-range-refused": [
        ("update of size 0", (0x1000, 0, UADDR, PERM_RW, IOTLB_UPDATE)),
        ("update whose I/O virtual range wraps past 2^64",
         (2**64 - 0x1000, 0x2000, UADDR, PERM_RW, IOTLB_UPDATE)),
        ("invalidate of size 0", (0x1000, 0, 0, 0, IOTLB_INVALIDATE)),
    ],
}


def iotlb_msg(fields: IotlbFields) -> bytes:
    """An ``IOTLB_MSG`` with NEED_REPLY carrying ``fields`` (iova, size, uaddr, perm,
    type)."""
    return M(Req.IOTLB_MSG, IOTLB.pack(*fields), flags=ACKED)


def run_iotlb(ctx: Context, bad: list[tuple[str, IotlbFields]]) -> str:
    """With ``VIRTIO_F_ACCESS_PLATFORM`` and REPLY_ACK negotiated and a memory table sent:
    a valid update is acked; each bad ``IOTLB_MSG`` must be refused (a non-zero ack) and
    the session go on, a valid update after it acked again. Closing the connection fails
    the case: one bad message from the IOMMU side must not end the device."""
    if not ctx.features & ACCESS_PLATFORM:
        raise NotApplicable("VIRTIO_F_ACCESS_PLATFORM (bit 33) is not offered")
    ctx.need(PF.REPLY_ACK)
    with ctx.connection() as c:
        c.negotiate(int(PF.REPLY_ACK), ACCESS_PLATFORM)
        c.acked(M(Req.SET_MEM_TABLE, wire.mem_table([region(0, IOTLB_MEM)]), flags=ACKED),
                [wire.memfd(IOTLB_MEM)])
        c.acked(iotlb_msg(GOOD_UPDATE))
        for what, fields in bad:
            try:
                c.send(iotlb_msg(fields))
                r = c.recv()
            except (ConnectionResetError, BrokenPipeError):
                r = None
            if r is None:
                raise Failed(f"the back-end closed the connection on an IOTLB_MSG {what}")
            if r.code != Req.IOTLB_MSG or len(r.body) != 8:
                raise Failed(f"an IOTLB_MSG {what} was answered with request {r.code}, "
                             f"{len(r.body)} bytes")
            if r.u64 == 0:
                raise Failed(f"an IOTLB_MSG {what} was acked as a success")
            try:
                c.acked(iotlb_msg(GOOD_UPDATE))
            except Failed as exc:
                raise Failed(f"after refusing an IOTLB_MSG {what}: {exc}") from exc
        detail = c.in_sync()
        if "in sync" not in detail:
            raise Failed(f"after the bad IOTLB messages it {detail}")
    return f"{'; '.join(w for w, _ in bad)}: refused; a valid update acked after each"


IOTLB_CASES: list[Case] = [
    Case("iotlb-update-refused", "ADVERSARIAL H4a",
         "IOTLB_MSG update with permission 0 or unbacked memory; session goes on",
         functools.partial(run_iotlb, bad=IOTLB_BAD["iotlb-update-refused"])),
    Case("iotlb-range-refused", "ADVERSARIAL H4b",
         "IOTLB_MSG update or invalidate of size 0, wrapping range; session goes on",
         functools.partial(run_iotlb, bad=IOTLB_BAD["iotlb-range-refused"])),
]
"""The IOTLB rows: they apply to a back-end that offers ``VIRTIO_F_ACCESS_PLATFORM``."""


def hostile_cases() -> list[Case]:
    """The table above as cases, then the IOTLB rows."""
    singles = [Case(h.name, h.ref, h.what, functools.partial(run_hostile, h=h))
               for h in HOSTILE]
    return singles + IOTLB_CASES


__all__ = ["HOSTILE", "IOTLB_CASES", "Failed", "Hostile", "hostile_cases", "run_hostile",
           "run_iotlb"]
