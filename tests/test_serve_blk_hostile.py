"""A hostile front-end against ``python -m vhost serve blk`` (a subprocess): malformed
headers, unknown codes, wrong sizes, fds where none belong, too many fds, bad memory
tables, bad vring indexes, rings outside memory, a kick fd that is not an eventfd,
corrupt descriptor rings, disconnects mid-message (ADVERSARIAL rows A, B, C, D, E, J1).

After every case the daemon process is alive, holds no more fds (and threads) than before,
is not spinning, and serves a new front-end with real I/O.
"""

from __future__ import annotations

import os
import socket
import struct
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

import hostile
from daemon_util import S_OK, BlkGuest, MiB, ServeProc, make_image, wait_for
from hostile import NEED_REPLY, NOFD, REPLY, U64, VERSION, VRING_STATE
from vhost.codes import FrontendRequest as Req
from vhost.codes import ProtocolFeature as PF
from vhost.devices.blk import BlkDriver
from vhost.user import Frontend
from vhost.virtio import Virtqueue, place_rings, setup_queue

pytestmark = pytest.mark.timeout(120)

FEATURES = (1 << 32) | (1 << 30)  # VERSION_1 | PROTOCOL_FEATURES
UADDR = 0x7F00_0000_0000
MSG = hostile.message


@dataclass
class Served:
    proc: ServeProc
    image: Path
    base_fds: int
    base_threads: int


@pytest.fixture(scope="module")
def served() -> Iterator[Served]:
    d = Path(tempfile.mkdtemp(prefix="pv-h-", dir="/tmp"))
    image = d / "disk.img"
    make_image(image, 4 * MiB, seed=1)
    proc = ServeProc(["blk", "--image", str(image), "--queues", "2"], d / "s", d / "log")
    try:
        with BlkDriver.connect(proc.socket_path) as drv:  # warm-up: lazy allocations
            drv.write(0, b"w" * 4096)
        base = proc.idle_fds()
        yield Served(proc, image, base, proc.threads())
        assert proc.alive(), proc.stderr()
        assert proc.terminate() == 0
    finally:
        proc.close()
        for p in d.iterdir():
            p.unlink()
        d.rmdir()


def cpu_seconds(pid: int) -> float:
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def check_survived(s: Served, offset: int = 8192) -> None:
    """Alive, back to its fds and threads, not spinning, and serving real I/O."""
    assert s.proc.alive(), s.proc.stderr()
    assert s.proc.settle_fds(s.base_fds) == s.base_fds, s.proc.fd_targets()
    assert wait_for(lambda: s.proc.threads() == s.base_threads)
    before = cpu_seconds(s.proc.pid)
    time.sleep(0.2)
    assert cpu_seconds(s.proc.pid) - before < 0.1  # idle, not busy-looping
    data = os.urandom(4096)
    with BlkDriver.connect(s.proc.socket_path, timeout=10.0) as d:
        d.write(offset, data)
        assert d.read(offset, 4096) == data
    assert s.proc.settle_fds(s.base_fds) == s.base_fds, s.proc.fd_targets()


# -- fd factories ---------------------------------------------------------------------------


def memfd(size: int = MiB) -> int:
    fd = os.memfd_create("hostile", os.MFD_CLOEXEC)
    os.ftruncate(fd, size)
    return fd


def eventfds(n: int) -> Callable[[], list[int]]:
    return lambda: [os.eventfd(0, os.EFD_CLOEXEC) for _ in range(n)]


def memfds(n: int, size: int = MiB) -> Callable[[], list[int]]:
    return lambda: [memfd(size) for _ in range(n)]


def pipe_read_end() -> list[int]:
    r, w = os.pipe()
    os.close(w)
    return [r]


def a_socket() -> list[int]:
    a, b = socket.socketpair()
    b.close()
    return [a.detach()]


def a_directory() -> list[int]:
    return [os.open("/", os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)]


def no_fds() -> list[int]:
    return []


# -- message bodies ---------------------------------------------------------------------------


def region(gpa: int, size: int, uaddr: int = UADDR, offset: int = 0) -> tuple[int, int, int, int]:
    return (gpa, size, uaddr, offset)


def vring_addr(index: int, desc: int, avail: int, used: int) -> bytes:
    return struct.pack("=IIQQQQ", index, 0, desc, used, avail, 0)


def word(index: int, nofd: bool = False) -> bytes:
    return U64.pack(index | (NOFD if nofd else 0))


def ring_setup(desc: int, avail: int, used: int, num: int = 64) -> bytes:
    return (
        MSG(Req.SET_VRING_NUM, VRING_STATE.pack(0, num))
        + MSG(Req.SET_VRING_ADDR, vring_addr(0, desc, avail, used))
        + MSG(Req.SET_VRING_BASE, VRING_STATE.pack(0, 0))
    )


VALID_TABLE = MSG(Req.SET_MEM_TABLE, hostile.mem_table([region(0, MiB)]))


@dataclass(frozen=True)
class Case:
    data: bytes
    fds: Callable[[], list[int]] = no_fds
    setup: str = "none"  # none | negotiated | mapped (negotiated + a 1 MiB memory table)
    closes: bool = True  # the daemon must end the connection
    nack: bool = True  # when it does not: a NACK comes first (REPLY_ACK asked for)
    half_close: bool = False  # EOF right after the data (a front-end gone mid-message)
    before: bytes = b""  # sent first, without fds (the fds ride on `data`)


CASES: dict[str, Case] = {
    # Malformed headers (A1-A5).
    "A1-short-header-eof": Case(hostile.header(Req.GET_FEATURES)[:5], half_close=True),
    "A1-mid-body-eof": Case(hostile.header(Req.SET_FEATURES, size=8) + b"\0\0", half_close=True),
    "A2-code-0": Case(MSG(0)),
    "A2-code-ffffffff": Case(MSG(0xFFFFFFFF)),
    "A2-code-1000": Case(MSG(1000)),
    "A3-version-2": Case(MSG(Req.GET_FEATURES, flags=2)),
    "A3-reply-bit-on-request": Case(MSG(Req.GET_FEATURES, flags=VERSION | REPLY)),
    "A4-size-ffffffff": Case(hostile.header(Req.SET_FEATURES, size=0xFFFFFFFF)),
    "A4-size-4097": Case(hostile.header(Req.SET_FEATURES, size=4097) + bytes(4097)),
    "A5-vring-num-4-bytes": Case(MSG(Req.SET_VRING_NUM, b"\0" * 4), setup="negotiated"),
    "A5-features-trailing": Case(MSG(Req.SET_FEATURES, U64.pack(FEATURES) + b"x")),
    "A9-features-never-offered": Case(
        MSG(Req.SET_FEATURES, U64.pack(FEATURES | 1 << 63)), setup="negotiated"
    ),
    # fds where none belong, or too many (B1-B5).
    "B1-fds-on-get-features": Case(MSG(Req.GET_FEATURES), eventfds(3)),
    "B2-64-fds": Case(MSG(Req.SET_VRING_KICK, word(0)), eventfds(64), setup="negotiated"),
    "B2-253-fds": Case(MSG(Req.SET_VRING_KICK, word(0)), eventfds(253), setup="negotiated"),
    "B3-two-regions-one-fd": Case(
        MSG(Req.SET_MEM_TABLE, hostile.mem_table([region(0, MiB), region(MiB, MiB, UADDR + MiB)])),
        memfds(1),
        setup="negotiated",
    ),
    "B3-one-region-three-fds": Case(
        MSG(Req.SET_MEM_TABLE, hostile.mem_table([region(0, MiB)])), memfds(3), setup="negotiated"
    ),
    "B4-nofd-with-fd": Case(
        MSG(Req.SET_VRING_CALL, word(0, nofd=True)), eventfds(1), setup="negotiated"
    ),
    "B4-no-fd-no-nofd": Case(MSG(Req.SET_VRING_KICK, word(0)), setup="negotiated"),
    "B5-reserved-bits": Case(
        MSG(Req.SET_VRING_KICK, U64.pack(1 << 40)), eventfds(1), setup="negotiated"
    ),
    # Bad memory tables (C1-C5, B6).
    "C1-zero-regions": Case(MSG(Req.SET_MEM_TABLE, hostile.mem_table([])), setup="negotiated"),
    "C2-zero-size": Case(
        MSG(Req.SET_MEM_TABLE, hostile.mem_table([region(0, 0)])), memfds(1), setup="negotiated"
    ),
    "C2-gpa-overflow": Case(
        MSG(Req.SET_MEM_TABLE, hostile.mem_table([region(2**64 - 4096, MiB)])),
        memfds(1),
        setup="negotiated",
    ),
    "C4-overlapping-gpa": Case(
        MSG(
            Req.SET_MEM_TABLE,
            hostile.mem_table([region(0, MiB), region(MiB // 2, MiB, UADDR + 4 * MiB)]),
        ),
        memfds(2),
        setup="negotiated",
    ),
    "C4-overlapping-uaddr": Case(
        MSG(
            Req.SET_MEM_TABLE,
            hostile.mem_table([region(0, MiB), region(4 * MiB, MiB, UADDR + MiB // 2)]),
        ),
        memfds(2),
        setup="negotiated",
    ),
    "C5-region-past-end-of-memfd": Case(
        MSG(Req.SET_MEM_TABLE, hostile.mem_table([region(0, 1 << 30)])),
        memfds(1, 4096),
        setup="negotiated",
    ),
    "B6-region-fd-eventfd": Case(
        MSG(Req.SET_MEM_TABLE, hostile.mem_table([region(0, MiB)])),
        eventfds(1),
        setup="negotiated",
    ),
    "B6-region-fd-socket": Case(
        MSG(Req.SET_MEM_TABLE, hostile.mem_table([region(0, MiB)])), a_socket, setup="negotiated"
    ),
    "B6-region-fd-directory": Case(
        MSG(Req.SET_MEM_TABLE, hostile.mem_table([region(0, MiB)])),
        a_directory,
        setup="negotiated",
    ),
    # Vring indexes beyond the queue count (2 queues) (D2).
    "D2-vring-num-index-2": Case(MSG(Req.SET_VRING_NUM, VRING_STATE.pack(2, 64)), setup="mapped"),
    "D2-vring-addr-index-255": Case(
        MSG(Req.SET_VRING_ADDR, vring_addr(255, UADDR, UADDR + 4096, UADDR + 8192)),
        setup="mapped",
    ),
    "D2-get-vring-base-256": Case(
        MSG(Req.GET_VRING_BASE, VRING_STATE.pack(256, 0)), setup="mapped"
    ),
    "D2-kick-index-255": Case(MSG(Req.SET_VRING_KICK, word(255)), eventfds(1), setup="mapped"),
    "D2-call-index-2": Case(MSG(Req.SET_VRING_CALL, word(2)), eventfds(1), setup="mapped"),
    "D2-enable-index-0x10001": Case(
        MSG(Req.SET_VRING_ENABLE, VRING_STATE.pack(0x10001, 1)), setup="mapped"
    ),
    # Rings outside guest memory (D4): refused at SET_VRING_ADDR once the size is known.
    "D4-ring-outside-memory": Case(
        MSG(Req.SET_VRING_KICK, word(0)),
        eventfds(1),
        before=ring_setup(UADDR + 2 * MiB, UADDR + 2 * MiB + 4096, UADDR + 2 * MiB + 8192),
        setup="mapped",
    ),
    "D4-ring-straddles-the-end": Case(
        MSG(Req.SET_VRING_KICK, word(0)),
        eventfds(1),
        before=ring_setup(UADDR + MiB - 512, UADDR + 4096, UADDR + 8192),
        setup="mapped",
    ),
    "D4-ring-before-memory": Case(
        MSG(Req.SET_VRING_KICK, word(0)),
        eventfds(1),
        before=ring_setup(UADDR - 4096, UADDR + 4096, UADDR + 8192),
        setup="mapped",
    ),
    # A kick fd that is not an eventfd (B6), hung up: taken, and the worker must not spin
    # on it (it stops listening to it) while the session goes on.
    "B6-kick-is-hung-up-pipe": Case(
        MSG(Req.SET_VRING_KICK, word(0)),
        pipe_read_end,
        before=ring_setup(UADDR, UADDR + 4096, UADDR + 8192),
        setup="mapped",
        closes=False,
        nack=False,
    ),
    "B6-kick-is-socket": Case(
        MSG(Req.SET_VRING_KICK, word(0)),
        a_socket,
        before=ring_setup(UADDR, UADDR + 4096, UADDR + 8192),
        setup="mapped",
        closes=False,
        nack=False,
    ),
    # With REPLY_ACK asked for, a refused request is NACKed and the session goes on.
    "D2-acked-vring-num-index-2": Case(
        MSG(Req.SET_VRING_NUM, VRING_STATE.pack(2, 64), flags=VERSION | NEED_REPLY),
        setup="mapped",
        closes=False,
    ),
    "D1-acked-vring-num-0": Case(
        MSG(Req.SET_VRING_NUM, VRING_STATE.pack(0, 0), flags=VERSION | NEED_REPLY),
        setup="mapped",
        closes=False,
    ),
    "D1-acked-vring-num-over-max": Case(
        MSG(Req.SET_VRING_NUM, VRING_STATE.pack(0, 512), flags=VERSION | NEED_REPLY),
        setup="mapped",
        closes=False,
    ),
    "D1-acked-vring-num-3-split": Case(
        MSG(Req.SET_VRING_NUM, VRING_STATE.pack(1, 3), flags=VERSION | NEED_REPLY),
        setup="mapped",
        closes=False,
    ),
    "D4-acked-ring-outside-memory": Case(
        MSG(Req.SET_VRING_NUM, VRING_STATE.pack(0, 64))
        + MSG(
            Req.SET_VRING_ADDR,
            vring_addr(0, UADDR + 2 * MiB, UADDR + 2 * MiB + 4096, UADDR + 2 * MiB + 8192),
            flags=VERSION | NEED_REPLY,
        ),
        setup="mapped",
        closes=False,
    ),
    "D6-acked-kick-before-ring-address": Case(
        MSG(Req.SET_VRING_KICK, word(1), flags=VERSION | NEED_REPLY),
        eventfds(1),
        before=MSG(Req.SET_VRING_NUM, VRING_STATE.pack(1, 64)),
        setup="mapped",
        closes=False,
    ),
    # Gone in the middle of a message carrying fds (J1).
    "J1-eof-mid-fd-message": Case(
        hostile.header(Req.SET_MEM_TABLE, size=40) + struct.pack("=II", 1, 0) + bytes(8),
        memfds(1),
        setup="negotiated",
        half_close=True,
    ),
}


def ask(sock: socket.socket, data: bytes) -> hostile.Received:
    hostile.send(sock, data)
    reply = hostile.recv_message(sock)
    assert reply is not None, "the daemon closed instead of answering"
    return reply


def negotiate(sock: socket.socket) -> None:
    assert ask(sock, MSG(Req.GET_FEATURES)).u64 & FEATURES == FEATURES
    hostile.send(sock, MSG(Req.SET_OWNER))
    proto = ask(sock, MSG(Req.GET_PROTOCOL_FEATURES)).u64
    assert proto & PF.MQ
    hostile.send(sock, MSG(Req.SET_PROTOCOL_FEATURES, U64.pack(int(PF.MQ | PF.REPLY_ACK))))
    hostile.send(sock, MSG(Req.SET_FEATURES, U64.pack(FEATURES)))


def map_memory(sock: socket.socket) -> None:
    fd = memfd()
    try:
        hostile.send(sock, VALID_TABLE, [fd])
    finally:
        os.close(fd)
    # In sync and still open: the table was taken.
    assert ask(sock, MSG(Req.GET_FEATURES)).code == Req.GET_FEATURES


@pytest.mark.parametrize("case", list(CASES.values()), ids=list(CASES))
def test_hostile_input(served: Served, case: Case) -> None:
    with hostile.connect(served.proc.socket_path) as s:
        if case.setup in ("negotiated", "mapped"):
            negotiate(s)
        if case.setup == "mapped":
            map_memory(s)
        if case.before:
            hostile.send(s, case.before)
        fds = case.fds()
        try:
            hostile.send(s, case.data, fds)
        except (BrokenPipeError, ConnectionResetError):
            pass  # already closed on an earlier part of the data: fine
        finally:
            for fd in fds:
                os.close(fd)
        if case.half_close:
            s.shutdown(socket.SHUT_WR)
        if case.closes:
            assert hostile.sees_eof(s, 5.0), "the daemon kept a broken connection open"
        else:
            if case.nack:
                nack = hostile.recv_message(s)
                assert nack is not None and nack.flags == VERSION | REPLY
                assert nack.u64 != 0
            before = cpu_seconds(served.proc.pid)
            time.sleep(0.3)
            assert cpu_seconds(served.proc.pid) - before < 0.1  # no thread spinning
            # Still in sync on this connection.
            assert ask(s, MSG(Req.GET_FEATURES)).code == Req.GET_FEATURES
    check_survived(served)


def _split_ring_bytes(guest: BlkGuest, q: int, descs: list[tuple[int, int, int, int]],
                      heads: list[int]) -> None:
    """Writes a descriptor table and publishes ``heads`` in queue ``q``'s avail ring,
    bypassing the driver (which would never build a corrupt ring)."""
    vq = guest.vqs[q]
    table = b"".join(struct.pack("<QIHH", *d) for d in descs)
    guest.memory.write(vq.desc, table)
    ring = b"".join(struct.pack("<H", h) for h in heads)
    guest.memory.write(vq.avail + 4, ring)
    guest.memory.write(vq.avail, struct.pack("<HH", 0, len(heads)))
    guest.kicks[q].write(1)


NEXT, WRITE = 1, 2
CORRUPT_RINGS: dict[str, tuple[list[tuple[int, int, int, int]], list[int]]] = {
    # E1: 0 -> 1 -> 0 with NEXT set.
    "E1-descriptor-loop": ([(4 * MiB, 16, NEXT, 1), (4 * MiB + 64, 1, NEXT | WRITE, 0)], [0]),
    # E2: next beyond the table.
    "E2-next-out-of-range": ([(4 * MiB, 16, NEXT, 999)], [0]),
    # E2: avail head beyond the table.
    "E2-head-out-of-range": ([(4 * MiB, 16, 0, 0)], [500]),
    # E3: a buffer outside guest memory.
    "E3-buffer-outside-memory": (
        [(4 * MiB, 16, NEXT, 1), (1 << 40, 512, NEXT | WRITE, 2), (4 * MiB + 64, 1, WRITE, 0)],
        [0],
    ),
}


@pytest.mark.parametrize("ring", list(CORRUPT_RINGS), ids=list(CORRUPT_RINGS))
def test_corrupt_ring_breaks_only_that_queue(served: Served, ring: str) -> None:
    descs, heads = CORRUPT_RINGS[ring]
    guest = BlkGuest(2, size=64)
    with Frontend.connect(served.proc.socket_path, timeout=10.0) as fe:
        guest.attach(fe)
        _split_ring_bytes(guest, 0, descs, heads)
        time.sleep(0.2)
        assert guest.vqs[0].poll_used() == []  # nothing completed from a corrupt ring
        # The other queue of the same session works.
        data = os.urandom(4096)
        assert guest.write(1, 12288, data) == S_OK
        assert guest.read(1, 12288, 4096) == (S_OK, data)
        # And the session itself is in sync.
        assert fe.get_queue_num() == 2
        # The broken queue comes back when the front-end hands it a fresh ring.
        desc, avail, used_ = place_rings(0, 64)
        guest.vqs[0] = Virtqueue(guest.memory, 64, desc, avail, used_)
        setup_queue(fe, 0, guest.memory, guest.vqs[0], guest.kicks[0], guest.calls[0])
        assert guest.write(0, 20480, data) == S_OK
        assert guest.read(0, 12288, 4096) == (S_OK, data)
        assert served.proc.alive()
    guest.close()
    check_survived(served, 16384)
