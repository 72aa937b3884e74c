"""A hostile front-end against our back-end session (ADVERSARIAL rows A, B, C, D, G).

Every case speaks raw bytes (and raw fds) to a `BackendListener` whose sessions are served
in a thread by a `BackendHandler`. For each one we check that the session either refuses
the message and goes on (a NACK, when an ack was asked for) or ends with a typed
`VhostError` and closes the connection (the hostile peer sees EOF); that no fd or mapping
leaks; and that a well-behaved `vhost.user.Frontend` is served afterwards on the same
listener.
"""

from __future__ import annotations

import fcntl
import os
import signal
import socket
import struct
import subprocess
import sys
import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

import hostile
from hostile import NEED_REPLY, NOFD, REPLY, U64, VERSION, VRING_STATE, SessionThread
from vhost import EventFd, GuestMemory, VhostError, _core
from vhost.codes import BackendRequest as BReq
from vhost.codes import FrontendRequest as Req
from vhost.codes import ProtocolFeature as PF
from vhost.errors import (
    ClosedError,
    DisconnectedError,
    InactiveFeatureError,
    InvalidMemoryError,
    InvalidParamError,
    KernelError,
    PartialMessageError,
    ProtocolError,
    VhostTimeoutError,
)
from vhost.user import (
    BackendHandler,
    BackendListener,
    Frontend,
    InflightArea,
    InflightInfo,
)

FEATURES = (1 << 32) | (1 << 30)  # VERSION_1 | PROTOCOL_FEATURES
OFFERED_PROTO = int(
    PF.REPLY_ACK | PF.CONFIG | PF.MQ | PF.CONFIGURE_MEM_SLOTS | PF.INFLIGHT_SHMFD | PF.STATUS
    | PF.BACKEND_REQ
)
NACK_PROTO = int(
    PF.REPLY_ACK | PF.CONFIGURE_MEM_SLOTS | PF.INFLIGHT_SHMFD | PF.STATUS | PF.BACKEND_REQ
)
CONFIG_SPACE = bytes(range(256))
MiB = 1 << 20
UADDR = 0x7F00_0000_0000
OK = VERSION | REPLY


class Device(BackendHandler):
    """A small well-behaved device; `fail_vring_num` makes one handler fail on purpose."""

    max_queues = 2

    def __init__(self) -> None:
        self.fail_vring_num = False
        self.kick_cloexec: list[bool] = []
        self.config_len = 256
        self.errors: list[BaseException] = []

    def get_features(self) -> int:
        return FEATURES

    def get_protocol_features(self) -> int:
        return OFFERED_PROTO

    def get_vring_base(self, index: int) -> int:
        return 0

    def set_vring_num(self, index: int, num: int) -> None:
        if self.fail_vring_num:
            raise InvalidParamError("this device refuses ring sizes today")

    def set_vring_kick(self, index: int, fd: EventFd | None) -> None:
        if fd is not None:
            flags = fcntl.fcntl(fd.fileno(), fcntl.F_GETFD)
            self.kick_cloexec.append(bool(flags & fcntl.FD_CLOEXEC))
            fd.close()

    def get_config(self, offset: int, size: int, flags: int) -> bytes:
        return CONFIG_SPACE[offset : offset + size][: self.config_len]

    def get_max_mem_slots(self) -> int:
        return 2

    def set_inflight_fd(self, info: InflightInfo) -> None:
        info.fd.close()

    def on_request_error(self, error: BaseException) -> None:
        self.errors.append(error)


# -- harness -----------------------------------------------------------------------------


@pytest.fixture
def listener(tmp_sock_dir: Path) -> Iterator[BackendListener]:
    with BackendListener(tmp_sock_dir / "be.sock") as lst:
        yield lst


def start(listener: BackendListener, handler: BackendHandler) -> SessionThread:
    return SessionThread(lambda: listener.accept(10.0), handler)


def well_behaved(listener: BackendListener) -> None:
    """A normal front-end is served by a fresh session on the same listener."""
    st = start(listener, Device())
    fe = Frontend.connect(listener.path, timeout=5.0)
    try:
        assert fe.get_features() == FEATURES
        fe.set_owner()
        assert fe.get_protocol_features() == OFFERED_PROTO
    finally:
        fe.close()
        del fe
    assert st.join() is None


def check_clean(listener: BackendListener, base_fds: int) -> None:
    """No fd leaked by the hostile session, and the listener still serves."""
    assert hostile.settle_fds(base_fds) == base_fds, hostile.open_fd_targets()
    well_behaved(listener)
    assert hostile.settle_fds(base_fds) == base_fds, hostile.open_fd_targets()


def ask(sock: socket.socket, data: bytes, fds: list[int] | None = None) -> hostile.Received:
    hostile.send(sock, data, fds or [])
    reply = hostile.recv_message(sock)
    assert reply is not None, "back-end closed instead of answering"
    return reply


def negotiate(sock: socket.socket, proto: int) -> None:
    """GET_FEATURES, SET_OWNER, protocol features `proto`, SET_FEATURES (no acks asked)."""
    r = ask(sock, hostile.message(Req.GET_FEATURES))
    assert (r.code, r.flags, r.u64) == (Req.GET_FEATURES, VERSION | REPLY, FEATURES)
    hostile.send(sock, hostile.message(Req.SET_OWNER))
    r = ask(sock, hostile.message(Req.GET_PROTOCOL_FEATURES))
    assert r.u64 == OFFERED_PROTO
    hostile.send(sock, hostile.message(Req.SET_PROTOCOL_FEATURES, U64.pack(proto)))
    hostile.send(sock, hostile.message(Req.SET_FEATURES, U64.pack(FEATURES)))


def still_answers(sock: socket.socket) -> None:
    """The connection is in sync: the next thing we read answers our GET_FEATURES."""
    r = ask(sock, hostile.message(Req.GET_FEATURES))
    assert (r.code, r.flags, r.u64) == (Req.GET_FEATURES, VERSION | REPLY, FEATURES)


# -- fd factories (the test closes its copies after sending) ----------------------------


def memfd(size: int) -> int:
    fd = os.memfd_create("hostile", os.MFD_CLOEXEC)
    os.ftruncate(fd, size)
    return fd


def eventfds(n: int) -> Callable[[], list[int]]:
    return lambda: [os.eventfd(0, os.EFD_CLOEXEC) for _ in range(n)]


def memfds(n: int, size: int = MiB) -> Callable[[], list[int]]:
    return lambda: [memfd(size) for _ in range(n)]


def one_socket() -> list[int]:
    a, b = socket.socketpair()
    fd = a.detach()
    b.close()
    return [fd]


def regular_file() -> list[int]:
    return [os.open("/etc/hostname" if os.path.exists("/etc/hostname") else "/etc/passwd",
                    os.O_RDONLY | os.O_CLOEXEC)]


def pipe_end() -> list[int]:
    r, w = os.pipe()
    os.close(w)
    return [r]


def listening_socket() -> list[int]:
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    s.bind("")  # autobind: an abstract address
    s.listen(1)
    return [s.detach()]


def udp_socket() -> list[int]:
    return [socket.socket(socket.AF_INET, socket.SOCK_DGRAM).detach()]


def directory() -> list[int]:
    return [os.open("/", os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)]


def no_fds() -> list[int]:
    return []


def region(gpa: int, size: int, uaddr: int = UADDR, offset: int = 0) -> tuple[int, int, int, int]:
    return (gpa, size, uaddr, offset)


ACKED = VERSION | NEED_REPLY


def vring_addr(
    index: int, *, desc: int = 0x1000, used: int = 0x3000, avail: int = 0x2000, flags: int = 0
) -> bytes:
    return struct.pack("=IIQQQQ", index, flags, desc, used, avail, 0)


def single_region(r: tuple[int, int, int, int]) -> bytes:
    return U64.pack(0) + hostile.REGION.pack(*r)


def inflight(mmap_size: int, offset: int, num_queues: int, queue_size: int) -> bytes:
    return struct.pack("=QQHH4x", mmap_size, offset, num_queues, queue_size)


def kick_word(index: int, nofd: bool = False) -> bytes:
    return U64.pack(index | (NOFD if nofd else 0))


# -- cases that end the session with a typed error and a closed connection --------------


@dataclass(frozen=True)
class Fatal:
    data: bytes
    error: type[VhostError]
    fds: Callable[[], list[int]] = no_fds
    proto: int | None = None  # negotiate first, acking these protocol features
    half_close: bool = False  # shut our write side after sending (EOF inside a message)


MSG = hostile.message
FATAL: dict[str, Fatal] = {
    # A1: EOF inside a header.
    "A1-short-header-then-eof": Fatal(hostile.header(1)[:5], PartialMessageError, half_close=True),
    "A1-header-then-eof-in-body": Fatal(
        hostile.header(Req.SET_FEATURES, size=8) + b"\0\0", PartialMessageError, half_close=True
    ),
    # A2: request codes.
    "A2-code-0": Fatal(MSG(0), ProtocolError),
    "A2-code-ffffffff": Fatal(MSG(0xFFFFFFFF), ProtocolError),
    "A2-code-unassigned-1000": Fatal(MSG(1000), ProtocolError),
    # A3: header flags.
    "A3-version-2": Fatal(MSG(Req.GET_FEATURES, flags=2), ProtocolError),
    "A3-version-0": Fatal(MSG(Req.GET_FEATURES, flags=0), ProtocolError),
    "A3-reserved-flag-bit": Fatal(MSG(Req.GET_FEATURES, flags=VERSION | 0x10), ProtocolError),
    "A3-reserved-high-bit": Fatal(MSG(Req.GET_FEATURES, flags=VERSION | 1 << 31), ProtocolError),
    "A3-reply-bit-on-request": Fatal(MSG(Req.GET_FEATURES, flags=VERSION | REPLY), ProtocolError),
    # A4: sizes announced but never sent.
    "A4-size-ffffffff": Fatal(hostile.header(Req.SET_FEATURES, size=0xFFFFFFFF), ProtocolError),
    "A4-size-4097": Fatal(hostile.header(Req.SET_FEATURES, size=4097), ProtocolError),
    # A5: exact-size rule.
    "A5-vring-num-4-bytes": Fatal(MSG(Req.SET_VRING_NUM, b"\0" * 4), ProtocolError),
    "A5-features-trailing-bytes": Fatal(
        MSG(Req.SET_FEATURES, U64.pack(FEATURES) + b"x"), ProtocolError
    ),
    "A5-get-features-with-body": Fatal(MSG(Req.GET_FEATURES, U64.pack(0)), ProtocolError),
    # A7: gated on a protocol feature never negotiated.
    "A7-get-config-without-CONFIG": Fatal(
        MSG(Req.GET_CONFIG, hostile.config_body(0, 4)), InactiveFeatureError, proto=0
    ),
    "A7-add-mem-reg-without-MEM_SLOTS": Fatal(
        MSG(Req.ADD_MEM_REG, struct.pack("=Q", 0) + hostile.REGION.pack(0, MiB, UADDR, 0)),
        InactiveFeatureError,
        fds=memfds(1),
        proto=0,
    ),
    # A9: protocol violations without an ack to carry the refusal.
    "A9-second-set-owner": Fatal(MSG(Req.SET_OWNER), InvalidParamError, proto=0),
    "A9-features-never-offered": Fatal(
        MSG(Req.SET_FEATURES, U64.pack(FEATURES | 1 << 7)), InvalidParamError, proto=0
    ),
    "A9-unknown-protocol-feature-bit": Fatal(
        MSG(Req.GET_FEATURES) + MSG(Req.SET_PROTOCOL_FEATURES, U64.pack(1 << 40)),
        InvalidParamError,
    ),
    # B1/B2/B7: fds where none belong or too many.
    "B1-three-fds-on-get-features": Fatal(MSG(Req.GET_FEATURES), ProtocolError, fds=eventfds(3)),
    "B2-64-fds": Fatal(MSG(Req.SET_VRING_KICK, kick_word(0)), ProtocolError, fds=eventfds(64)),
    "B2-253-fds": Fatal(MSG(Req.SET_VRING_KICK, kick_word(0)), ProtocolError, fds=eventfds(253)),
    # B3: one fd per region.
    "B3-two-regions-one-fd": Fatal(
        MSG(Req.SET_MEM_TABLE, hostile.mem_table([region(0, MiB), region(MiB, MiB, UADDR + MiB)])),
        ProtocolError,
        fds=memfds(1),
    ),
    "B3-two-regions-three-fds": Fatal(
        MSG(Req.SET_MEM_TABLE, hostile.mem_table([region(0, MiB), region(MiB, MiB, UADDR + MiB)])),
        ProtocolError,
        fds=memfds(3),
    ),
    # B4/B5: the vring fd word.
    "B4-nofd-with-fd": Fatal(MSG(Req.SET_VRING_KICK, kick_word(0, nofd=True)), ProtocolError,
                             fds=eventfds(1)),
    "B4-no-nofd-no-fd": Fatal(MSG(Req.SET_VRING_CALL, kick_word(0)), ProtocolError),
    "B5-reserved-bits-in-vring-word": Fatal(
        MSG(Req.SET_VRING_KICK, U64.pack(0x1_0000_0000)), InvalidParamError, fds=eventfds(1)
    ),
    "B5-bit-9-in-vring-word": Fatal(
        MSG(Req.SET_VRING_ERR, U64.pack(1 << 9)), InvalidParamError, fds=eventfds(1)
    ),
    # C1/C2/C4/C5: memory tables (no ack asked: the failure closes the connection).
    "C1-zero-regions": Fatal(MSG(Req.SET_MEM_TABLE, hostile.mem_table([])), VhostError),
    # 33 regions (one past rust-vmm's 32) with 32 fds: refused for the count.
    "C1-33-regions": Fatal(
        MSG(Req.SET_MEM_TABLE,
            hostile.mem_table([region(i * MiB, MiB, UADDR + i * MiB) for i in range(33)])),
        InvalidParamError,
        fds=memfds(32),
    ),
    # ... and with its 33 fds: more than one message may carry (B2), refused as such.
    "C1-33-regions-33-fds": Fatal(
        MSG(Req.SET_MEM_TABLE,
            hostile.mem_table([region(i * MiB, MiB, UADDR + i * MiB) for i in range(33)])),
        ProtocolError,
        fds=memfds(33),
    ),
    "C1-count-says-two-one-sent": Fatal(
        MSG(Req.SET_MEM_TABLE, hostile.mem_table([region(0, MiB)], count=2)),
        ProtocolError,
        fds=memfds(1),
    ),
    "C2-gpa-plus-size-overflows": Fatal(
        MSG(Req.SET_MEM_TABLE, hostile.mem_table([region(2**64 - 4096, MiB)])),
        VhostError,
        fds=memfds(1),
    ),
    "C2-uaddr-plus-size-overflows": Fatal(
        MSG(Req.SET_MEM_TABLE, hostile.mem_table([region(0, MiB, 2**64 - 4096)])),
        VhostError,
        fds=memfds(1),
    ),
    "C2-offset-plus-size-overflows": Fatal(
        MSG(Req.SET_MEM_TABLE, hostile.mem_table([region(0, MiB, UADDR, 2**64 - 4096)])),
        VhostError,
        fds=memfds(1),
    ),
    "C2-size-zero": Fatal(
        MSG(Req.SET_MEM_TABLE, hostile.mem_table([region(0, 0)])), VhostError, fds=memfds(1)
    ),
    "C3-size-aligns-up-to-zero": Fatal(
        MSG(Req.SET_MEM_TABLE, hostile.mem_table([region(0, 2**64 - 1, 0)])),
        VhostError,
        fds=memfds(1),
    ),
    "C4-overlapping-gpa": Fatal(
        MSG(Req.SET_MEM_TABLE,
            hostile.mem_table([region(0, MiB), region(MiB // 2, MiB, UADDR + 4 * MiB)])),
        VhostError,
        fds=memfds(2),
    ),
    "C4-overlapping-uaddr": Fatal(
        MSG(Req.SET_MEM_TABLE,
            hostile.mem_table([region(0, MiB), region(4 * MiB, MiB, UADDR + MiB // 2)])),
        VhostError,
        fds=memfds(2),
    ),
    "C5-4k-memfd-1g-region": Fatal(
        MSG(Req.SET_MEM_TABLE, hostile.mem_table([region(0, 1 << 30)])),
        InvalidMemoryError,
        fds=memfds(1, 4096),
    ),
    "B6-region-fd-is-eventfd": Fatal(
        MSG(Req.SET_MEM_TABLE, hostile.mem_table([region(0, MiB)])), VhostError, fds=eventfds(1)
    ),
    "B6-region-fd-is-socket": Fatal(
        MSG(Req.SET_MEM_TABLE, hostile.mem_table([region(0, MiB)])), VhostError, fds=one_socket
    ),
    "B6-kick-fd-is-regular-file": Fatal(
        MSG(Req.SET_VRING_KICK, kick_word(0)), InvalidParamError, fds=regular_file
    ),
    "B6-call-fd-is-directory": Fatal(
        MSG(Req.SET_VRING_CALL, kick_word(0), flags=VERSION | NEED_REPLY), InvalidParamError,
        fds=directory, proto=int(PF.REPLY_ACK),
    ),
    # D2: ring indexes.
    "D2-vring-num-index-eq-max": Fatal(MSG(Req.SET_VRING_NUM, VRING_STATE.pack(2, 256)),
                                       InvalidParamError),
    "D2-vring-num-index-256": Fatal(MSG(Req.SET_VRING_NUM, VRING_STATE.pack(256, 256)),
                                    InvalidParamError),
    "D2-get-vring-base-index-255": Fatal(MSG(Req.GET_VRING_BASE, VRING_STATE.pack(255, 0)),
                                         InvalidParamError),
    "D2-kick-index-255": Fatal(MSG(Req.SET_VRING_KICK, kick_word(255)), InvalidParamError,
                               fds=eventfds(1)),
    "D2-enable-index-0x10001": Fatal(MSG(Req.SET_VRING_ENABLE, VRING_STATE.pack(0x10001, 1)),
                                     InvalidParamError),
    # G1: config windows (CONFIG negotiated, GET_CONFIG has a reply: refusal closes).
    "G1-config-offset-size-overflow": Fatal(
        MSG(Req.GET_CONFIG, hostile.config_body(0xFFFFFFFF, 4)), VhostError, proto=int(PF.CONFIG)
    ),
    "G1-config-size-0": Fatal(
        MSG(Req.GET_CONFIG, hostile.config_body(0, 0)), VhostError, proto=int(PF.CONFIG)
    ),
    "G1-config-size-257": Fatal(
        MSG(Req.GET_CONFIG, hostile.config_body(0, 257)), VhostError, proto=int(PF.CONFIG)
    ),
    "G1-config-size-field-lies": Fatal(
        MSG(Req.GET_CONFIG, hostile.config_body(0, 8, data=bytes(4))), VhostError,
        proto=int(PF.CONFIG),
    ),
}


@pytest.mark.parametrize("case", FATAL.values(), ids=list(FATAL))
def test_fatal_input_closes_session(listener: BackendListener, case: Fatal) -> None:
    base = hostile.fd_count()
    st = start(listener, Device())
    with hostile.connect(listener.path) as s:
        if case.proto is not None:
            negotiate(s, case.proto)
        fds = case.fds()
        try:
            hostile.send(s, case.data, fds)
        finally:
            for fd in fds:
                os.close(fd)
        if case.half_close:
            s.shutdown(socket.SHUT_WR)
        assert hostile.sees_eof(s), "back-end kept the connection open"
    outcome = st.join()
    assert isinstance(outcome, case.error), repr(outcome)
    check_clean(listener, base)


# -- cases where the session refuses and goes on ----------------------------------------


def test_a1_eof_at_message_boundary_is_clean(listener: BackendListener) -> None:
    base = hostile.fd_count()
    st = start(listener, Device())
    with hostile.connect(listener.path) as s:
        still_answers(s)
    assert st.join() is None
    check_clean(listener, base)


def test_a1_connect_and_close_is_clean(listener: BackendListener) -> None:
    base = hostile.fd_count()
    st = start(listener, Device())
    hostile.connect(listener.path).close()
    assert st.join() is None
    check_clean(listener, base)


def test_a6_message_one_byte_at_a_time(listener: BackendListener) -> None:
    base = hostile.fd_count()
    st = start(listener, Device())
    with hostile.connect(listener.path) as s:
        negotiate(s, int(PF.REPLY_ACK))
        data = MSG(Req.SET_VRING_NUM, VRING_STATE.pack(1, 256), flags=VERSION | NEED_REPLY)
        for b in data:
            s.sendall(bytes([b]))
        r = hostile.recv_message(s)
        assert r is not None and (r.code, r.flags, r.u64) == (Req.SET_VRING_NUM, VERSION | REPLY, 0)
        for b in MSG(Req.GET_FEATURES):
            s.sendall(bytes([b]))
        r = hostile.recv_message(s)
        assert r is not None and r.u64 == FEATURES
    assert st.join() is None
    check_clean(listener, base)


def test_a8_failing_handler_gets_exactly_one_nack(listener: BackendListener) -> None:
    base = hostile.fd_count()
    dev = Device()
    dev.fail_vring_num = True
    st = start(listener, dev)
    with hostile.connect(listener.path) as s:
        negotiate(s, int(PF.REPLY_ACK))
        r = ask(s, MSG(Req.SET_VRING_NUM, VRING_STATE.pack(0, 256), flags=VERSION | NEED_REPLY))
        assert (r.code, r.flags) == (Req.SET_VRING_NUM, VERSION | REPLY)
        assert r.u64 != 0
        # Without NEED_REPLY a failure has nothing to answer with: no reply at all, and the
        # session closes rather than let the failure go unseen... so ask again with an ack.
        still_answers(s)  # next message read is the GET_FEATURES reply: no stray ack
        dev.fail_vring_num = False
        r = ask(s, MSG(Req.SET_VRING_NUM, VRING_STATE.pack(0, 256), flags=VERSION | NEED_REPLY))
        assert r.u64 == 0
    assert st.join() is None
    assert len(dev.errors) == 1 and isinstance(dev.errors[0], InvalidParamError)
    check_clean(listener, base)


NACKED: dict[str, tuple[bytes, Callable[[], list[int]]]] = {
    "A9-second-set-owner-acked": (MSG(Req.SET_OWNER, flags=VERSION | NEED_REPLY), no_fds),
    "A9-features-never-offered-acked": (
        MSG(Req.SET_FEATURES, U64.pack(FEATURES | 1 << 5), flags=VERSION | NEED_REPLY), no_fds
    ),
    "D1-vring-num-not-power-of-two": (
        MSG(Req.SET_VRING_NUM, VRING_STATE.pack(0, 3), flags=VERSION | NEED_REPLY), no_fds
    ),
    "D2-vring-num-index-eq-max-acked": (
        MSG(Req.SET_VRING_NUM, VRING_STATE.pack(2, 256), flags=VERSION | NEED_REPLY), no_fds
    ),
    "C5-small-memfd-acked": (
        MSG(Req.SET_MEM_TABLE, hostile.mem_table([region(0, 1 << 30)]), flags=VERSION | NEED_REPLY),
        memfds(1, 4096),
    ),
    "B6-region-fd-is-eventfd-acked": (
        MSG(Req.SET_MEM_TABLE, hostile.mem_table([region(0, MiB)]), flags=VERSION | NEED_REPLY),
        eventfds(1),
    ),
    "D1-vring-num-0": (MSG(Req.SET_VRING_NUM, VRING_STATE.pack(0, 0), flags=ACKED), no_fds),
    "D1-vring-num-65536": (MSG(Req.SET_VRING_NUM, VRING_STATE.pack(0, 65536), flags=ACKED),
                           no_fds),
    "D2-vring-addr-index-2": (MSG(Req.SET_VRING_ADDR, vring_addr(2), flags=ACKED), no_fds),
    "D2-vring-base-index-255": (MSG(Req.SET_VRING_BASE, VRING_STATE.pack(255, 0), flags=ACKED),
                                no_fds),
    "D2-call-index-255": (MSG(Req.SET_VRING_CALL, kick_word(255), flags=ACKED), eventfds(1)),
    "D5-vring-base-over-16-bits": (
        MSG(Req.SET_VRING_BASE, VRING_STATE.pack(0, 0x10000), flags=ACKED), no_fds
    ),
    "A9-status-wider-than-a-byte": (MSG(Req.SET_STATUS, U64.pack(0x100), flags=ACKED), no_fds),
    "C7-rem-mem-reg-absent": (
        MSG(Req.REM_MEM_REG, single_region(region(0, MiB)), flags=ACKED), no_fds
    ),
    "C5-add-mem-reg-small-memfd": (
        MSG(Req.ADD_MEM_REG, single_region(region(0, 1 << 30)), flags=ACKED), memfds(1, 4096)
    ),
    "D7-inflight-more-queues-than-device": (
        MSG(Req.SET_INFLIGHT_FD, inflight(4096, 0, 3, 256), flags=ACKED), memfds(1, 4096)
    ),
    "B6-backend-req-fd-is-eventfd": (MSG(Req.SET_BACKEND_REQ_FD, flags=ACKED), eventfds(1)),
    "B6-backend-req-fd-is-pipe": (MSG(Req.SET_BACKEND_REQ_FD, flags=ACKED), pipe_end),
    "B6-backend-req-fd-is-listening-socket": (
        MSG(Req.SET_BACKEND_REQ_FD, flags=ACKED), listening_socket
    ),
    "B6-backend-req-fd-is-udp-socket": (MSG(Req.SET_BACKEND_REQ_FD, flags=ACKED), udp_socket),
    "B6-region-fd-is-socket-acked": (
        MSG(Req.SET_MEM_TABLE, hostile.mem_table([region(0, MiB)]), flags=VERSION | NEED_REPLY),
        one_socket,
    ),
}


@pytest.mark.parametrize("case", NACKED.values(), ids=list(NACKED))
def test_refused_request_is_nacked_and_session_goes_on(
    listener: BackendListener, case: tuple[bytes, Callable[[], list[int]]]
) -> None:
    data, make_fds = case
    base = hostile.fd_count()
    dev = Device()
    st = start(listener, dev)
    with hostile.connect(listener.path) as s:
        negotiate(s, NACK_PROTO)
        fds = make_fds()
        try:
            r = ask(s, data, fds)
        finally:
            for fd in fds:
                os.close(fd)
        code = struct.unpack_from("=I", data)[0]
        assert (r.code, r.flags, len(r.fds)) == (code, VERSION | REPLY, 0)
        assert r.u64 != 0, "hostile request was acked as a success"
        still_answers(s)
    assert st.join() is None
    assert len(dev.errors) == 1 and isinstance(dev.errors[0], VhostError), dev.errors
    check_clean(listener, base)


def test_b7_fds_attached_to_body_chunk(listener: BackendListener) -> None:
    base = hostile.fd_count()
    st = start(listener, Device())
    with hostile.connect(listener.path) as s:
        s.sendall(hostile.header(Req.SET_FEATURES, size=8))
        fds = eventfds(2)()
        try:
            hostile.send(s, U64.pack(FEATURES), fds)
        finally:
            for fd in fds:
                os.close(fd)
        assert hostile.sees_eof(s)
    assert isinstance(st.join(), ProtocolError | InvalidParamError)
    check_clean(listener, base)


def test_b8_received_fds_are_cloexec(listener: BackendListener) -> None:
    base = hostile.fd_count()
    dev = Device()
    st = start(listener, dev)
    with hostile.connect(listener.path) as s:
        negotiate(s, int(PF.REPLY_ACK))
        fd = os.eventfd(0)  # deliberately not CLOEXEC on our side
        try:
            r = ask(s, MSG(Req.SET_VRING_KICK, kick_word(1), flags=VERSION | NEED_REPLY), [fd])
        finally:
            os.close(fd)
        assert r.u64 == 0
    assert st.join() is None
    assert dev.kick_cloexec == [True]
    check_clean(listener, base)


def test_b9_peer_closes_while_we_reply(listener: BackendListener) -> None:
    """The reply goes to a closed peer: an error, never SIGPIPE (MSG_NOSIGNAL)."""
    previous = signal.signal(signal.SIGPIPE, signal.SIG_DFL)
    try:
        base = hostile.fd_count()
        for _ in range(20):
            st = start(listener, Device())
            s = hostile.connect(listener.path)
            s.sendall(MSG(Req.GET_FEATURES) * 64)
            s.close()
            outcome = st.join()
            assert outcome is None or isinstance(outcome, DisconnectedError | KernelError), outcome
        check_clean(listener, base)
    finally:
        signal.signal(signal.SIGPIPE, previous)


def test_a10_repeated_mem_table_and_vring_num_stay_flat(listener: BackendListener) -> None:
    base = hostile.fd_count()
    st = start(listener, Device())
    with hostile.connect(listener.path) as s:
        negotiate(s, int(PF.REPLY_ACK))
        table = MSG(Req.SET_MEM_TABLE, hostile.mem_table([region(0, MiB)]),
                    flags=VERSION | NEED_REPLY)
        num = MSG(Req.SET_VRING_NUM, VRING_STATE.pack(0, 256), flags=VERSION | NEED_REPLY)

        def round_trip() -> None:
            fd = memfd(MiB)
            try:
                assert ask(s, table, [fd]).u64 == 0
            finally:
                os.close(fd)
            assert ask(s, num).u64 == 0

        for _ in range(50):
            round_trip()
        fds_mid, maps_mid = hostile.fd_count(), hostile.maps_count()
        for _ in range(2000):
            round_trip()
        assert hostile.fd_count() == fds_mid, hostile.open_fd_targets()
        assert hostile.maps_count() <= maps_mid + 2
    assert st.join() is None
    check_clean(listener, base)


NACK_THEN_CLOSE: dict[str, tuple[bytes, Callable[[], list[int]]]] = {
    "D3-vring-addr-desc-misaligned": (
        MSG(Req.SET_VRING_ADDR, vring_addr(0, desc=0x1001), flags=ACKED), no_fds
    ),
    "D3-vring-addr-used-misaligned": (
        MSG(Req.SET_VRING_ADDR, vring_addr(0, used=0x3002), flags=ACKED), no_fds
    ),
    "D3-vring-addr-unknown-flag": (
        MSG(Req.SET_VRING_ADDR, vring_addr(0, flags=0x80), flags=ACKED), no_fds
    ),
    "A9-vring-enable-2": (MSG(Req.SET_VRING_ENABLE, VRING_STATE.pack(0, 2), flags=ACKED), no_fds),
    "C2-add-mem-reg-offset-overflow": (
        MSG(Req.ADD_MEM_REG, single_region(region(0, MiB, UADDR, 2**64 - 4096)), flags=ACKED),
        memfds(1),
    ),
    "A2-unknown-code-acked": (MSG(1000, flags=VERSION | NEED_REPLY), no_fds),
    "A5-vring-num-4-bytes-acked": (MSG(Req.SET_VRING_NUM, b"\0" * 4, flags=VERSION | NEED_REPLY),
                                   no_fds),
    "B1-fds-on-set-features-acked": (
        MSG(Req.SET_FEATURES, U64.pack(FEATURES), flags=VERSION | NEED_REPLY), eventfds(3)
    ),
    "B4-nofd-with-fd-acked": (
        MSG(Req.SET_VRING_KICK, kick_word(0, nofd=True), flags=VERSION | NEED_REPLY), eventfds(1)
    ),
    "B5-reserved-bits-acked": (
        MSG(Req.SET_VRING_CALL, U64.pack(1 << 40), flags=VERSION | NEED_REPLY), eventfds(1)
    ),
    "C1-zero-regions-acked": (
        MSG(Req.SET_MEM_TABLE, hostile.mem_table([]), flags=VERSION | NEED_REPLY), no_fds
    ),
}


@pytest.mark.parametrize("case", NACK_THEN_CLOSE.values(), ids=list(NACK_THEN_CLOSE))
def test_malformed_acked_request_gets_nack_then_close(
    listener: BackendListener, case: tuple[bytes, Callable[[], list[int]]]
) -> None:
    """A protocol violation closes the connection, with a NACK first when one was asked."""
    data, make_fds = case
    base = hostile.fd_count()
    st = start(listener, Device())
    with hostile.connect(listener.path) as s:
        negotiate(s, NACK_PROTO)
        fds = make_fds()
        try:
            r = ask(s, data, fds)
        finally:
            for fd in fds:
                os.close(fd)
        assert (r.code, r.flags, len(r.fds)) == (struct.unpack_from("=I", data)[0], OK, 0)
        assert r.u64 != 0
        assert hostile.sees_eof(s)
    assert isinstance(st.join(), VhostError)
    check_clean(listener, base)


def test_malformed_request_with_own_reply_gets_no_nack(listener: BackendListener) -> None:
    """GET_FEATURES answers with features, never a status: a bad one just closes."""
    base = hostile.fd_count()
    st = start(listener, Device())
    with hostile.connect(listener.path) as s:
        negotiate(s, int(PF.REPLY_ACK))
        fd = os.eventfd(0, os.EFD_CLOEXEC)
        try:
            hostile.send(s, MSG(Req.GET_FEATURES, flags=VERSION | NEED_REPLY), [fd])
        finally:
            os.close(fd)
        assert hostile.recv_message(s) is None
    assert isinstance(st.join(), ProtocolError)
    check_clean(listener, base)


@pytest.mark.parametrize("n", [9, 32])
def test_c1_mem_tables_up_to_32_regions_are_accepted(listener: BackendListener, n: int) -> None:
    """Past QEMU's 8 and up to rust-vmm's 32 regions, one SET_MEM_TABLE is mapped whole."""
    base = hostile.fd_count()
    maps = hostile.maps_count()
    dev = Device()
    st = start(listener, dev)
    with hostile.connect(listener.path) as s:
        negotiate(s, NACK_PROTO)
        fds = memfds(n)()
        try:
            table = hostile.mem_table([region(i * MiB, MiB, UADDR + i * MiB) for i in range(n)])
            assert ask(s, MSG(Req.SET_MEM_TABLE, table, flags=ACKED), fds).u64 == 0
        finally:
            for fd in fds:
                os.close(fd)
        assert hostile.maps_count() >= maps + n
        still_answers(s)
    assert st.join() is None
    check_clean(listener, base)


def test_c6_add_mem_reg_beyond_max_slots(listener: BackendListener) -> None:
    base = hostile.fd_count()
    dev = Device()
    st = start(listener, dev)
    with hostile.connect(listener.path) as s:
        negotiate(s, NACK_PROTO)
        statuses = []
        for i in range(4):
            fd = memfd(MiB)
            try:
                msg = MSG(Req.ADD_MEM_REG, single_region(region(i * MiB, MiB, UADDR + i * MiB)),
                          flags=ACKED)
                statuses.append(ask(s, msg, [fd]).u64)
            finally:
                os.close(fd)
        assert statuses[:2] == [0, 0] and all(v != 0 for v in statuses[2:]), statuses
        # Overlapping an accepted region is refused too (C4 through ADD_MEM_REG).
        fd = memfd(MiB)
        try:
            r = ask(s, MSG(Req.REM_MEM_REG, single_region(region(0, MiB)), flags=ACKED))
            assert r.u64 == 0
            msg = MSG(Req.ADD_MEM_REG, single_region(region(MiB // 2, MiB, UADDR + 8 * MiB)),
                      flags=ACKED)
            assert ask(s, msg, [fd]).u64 != 0
        finally:
            os.close(fd)
        still_answers(s)
    assert st.join() is None
    check_clean(listener, base)


def test_g2_device_returns_fewer_config_bytes(listener: BackendListener) -> None:
    """A handler that answers GET_CONFIG short must not send a short or padded reply."""
    base = hostile.fd_count()
    dev = Device()
    dev.config_len = 2
    st = start(listener, dev)
    with hostile.connect(listener.path) as s:
        negotiate(s, int(PF.CONFIG))
        hostile.send(s, MSG(Req.GET_CONFIG, hostile.config_body(0, 4)))
        assert hostile.recv_message(s) is None
    assert isinstance(st.join(), VhostError)
    check_clean(listener, base)


# -- hostile arguments from Python: typed errors, never a panic or an abort -------------


@pytest.mark.parametrize(
    "timeout", [-1.0, float("nan"), float("-inf")], ids=["neg", "nan", "neg-inf"]
)
def test_listener_rejects_bad_timeouts(listener: BackendListener, timeout: float) -> None:
    base = hostile.fd_count()
    with pytest.raises(InvalidParamError):
        listener.accept(timeout)
    native = _core.Listener(str(listener.path.with_name("fe.sock")))
    try:
        with pytest.raises(InvalidParamError):
            native.accept_frontend(0.01, timeout)
    finally:
        native.close()
    check_clean(listener, base)


def test_listener_waits_for_ever_on_an_infinite_timeout(listener: BackendListener) -> None:
    """``math.inf`` is "no bound", as ``None`` is (one timeout conversion everywhere)."""
    client = socket.socket(socket.AF_UNIX)
    timer = threading.Timer(0.2, client.connect, args=(str(listener.path),))
    timer.start()
    try:
        session = listener.accept(float("inf"))
        session.close()
        timer.join()
        # The session accepted was the client's connection: closing it reaches the client.
        client.settimeout(5)
        assert client.recv(1) == b""
    finally:
        timer.join()
        client.close()


@pytest.mark.parametrize("length", [2**62, 2**64 - 1, (1 << 20) + 1])
def test_guest_memory_read_huge_length_is_an_error(length: int) -> None:
    mem = GuestMemory.allocate([(0, 1 << 20)])
    with pytest.raises(InvalidMemoryError):
        mem.read(0, length)
    assert mem.read(0, 4) == bytes(4)


class ChannelTimeouts(Device):
    def __init__(self) -> None:
        super().__init__()
        self.timeout_errors: list[BaseException] = []

    def set_backend_channel(self, channel: _core.BackendChannel) -> None:
        for bad in (-1.0, float("nan")):
            try:
                channel.set_timeout(bad)
            except BaseException as exc:  # a PanicException is a BaseException
                # without its traceback, whose frame would keep the channel's socket open
                self.timeout_errors.append(exc.with_traceback(None))
        channel.set_timeout(1.0)


def test_backend_channel_rejects_bad_timeouts(listener: BackendListener) -> None:
    base = hostile.fd_count()
    dev = ChannelTimeouts()
    st = start(listener, dev)
    fe = Frontend.connect(listener.path, timeout=5.0)
    try:
        fe.negotiate()
        with fe.set_backend_req_fd():
            pass
    finally:
        fe.close()
        del fe
    assert st.join() is None
    assert len(dev.timeout_errors) == 2
    assert all(isinstance(e, InvalidParamError) for e in dev.timeout_errors), dev.timeout_errors
    check_clean(listener, base)


class Inflight(BackendHandler):
    """Hands out a fresh inflight memfd per request and ignores the fds it is given."""

    max_queues = 2

    def __init__(self) -> None:
        self.mine: int | None = None

    def get_features(self) -> int:
        return FEATURES

    def get_protocol_features(self) -> int:
        return OFFERED_PROTO

    def get_vring_base(self, index: int) -> int:
        return 0

    def get_inflight_fd(self, num_queues: int, queue_size: int) -> InflightArea:
        self.drop()
        self.mine = memfd(4096)
        return InflightArea(4096, 0, self.mine)

    def drop(self) -> None:
        if self.mine is not None:
            os.close(self.mine)
            self.mine = None


def test_a10_inflight_and_kick_loops_stay_flat(listener: BackendListener) -> None:
    base = hostile.fd_count()
    dev = Inflight()
    st = start(listener, dev)
    with hostile.connect(listener.path) as s:
        negotiate(s, NACK_PROTO)
        get_inflight = MSG(Req.GET_INFLIGHT_FD, inflight(0, 0, 1, 256))
        kick = MSG(Req.SET_VRING_KICK, kick_word(0), flags=ACKED)

        def round_trip() -> None:
            r = ask(s, get_inflight)
            assert len(r.fds) == 1
            r.close_fds()
            fd = os.eventfd(0, os.EFD_CLOEXEC)
            try:
                assert ask(s, kick, [fd]).u64 == 0
            finally:
                os.close(fd)

        for _ in range(50):
            round_trip()
        fds_mid, maps_mid = hostile.fd_count(), hostile.maps_count()
        for _ in range(1000):
            round_trip()
        assert hostile.fd_count() == fds_mid, hostile.open_fd_targets()
        assert hostile.maps_count() <= maps_mid + 2
    assert st.join() is None
    dev.drop()
    check_clean(listener, base)


# -- a hostile front-end on the back-end request channel (H2/H5 from the back-end side) --


class ChannelUser(Device):
    """Sends CONFIG_CHANGE_MSG on the channel as soon as it gets one, twice."""

    def __init__(self) -> None:
        super().__init__()
        self.channel_errors: list[BaseException] = []

    def set_backend_channel(self, channel: _core.BackendChannel) -> None:
        channel.set_timeout(0.5)
        for _ in range(2):
            try:
                channel.config_change()
            except BaseException as exc:  # a PanicException is a BaseException
                self.channel_errors.append(exc.with_traceback(None))


CHANNEL_PROTO = int(PF.REPLY_ACK | PF.BACKEND_REQ | PF.CONFIG)
CC = BReq.CONFIG_CHANGE_MSG
BAD_CHANNEL_REPLIES: dict[str, tuple[bytes, int, type[VhostError]]] = {
    "wrong-code": (MSG(BReq.VRING_CALL, U64.pack(0), flags=OK), 0, ProtocolError),
    "reply-bit-missing": (MSG(CC, U64.pack(0)), 0, ProtocolError),
    "fds-on-reply": (MSG(CC, U64.pack(0), flags=OK), 2, ProtocolError),
    "body-4-bytes": (MSG(CC, b"\0" * 4, flags=OK), 0, ProtocolError),
    "size-ffffffff": (hostile.header(CC, OK, 0xFFFFFFFF), 0, ProtocolError),
    "never-replies": (b"", 0, VhostTimeoutError),
}


@pytest.mark.parametrize(
    "case", BAD_CHANNEL_REPLIES.values(), ids=list(BAD_CHANNEL_REPLIES)
)
def test_channel_bad_reply_closes_only_the_channel(
    listener: BackendListener, case: tuple[bytes, int, type[VhostError]]
) -> None:
    data, nfds, error = case
    base = hostile.fd_count()
    dev = ChannelUser()
    st = start(listener, dev)
    with hostile.connect(listener.path) as s:
        negotiate(s, CHANNEL_PROTO)
        mine, theirs = socket.socketpair()
        with mine:
            try:
                hostile.send(s, MSG(Req.SET_BACKEND_REQ_FD, flags=ACKED), [theirs.fileno()])
            finally:
                theirs.close()
            mine.settimeout(5.0)
            req = hostile.recv_message(mine)
            assert req is not None and req.code == CC and req.flags == VERSION | NEED_REPLY
            fds = eventfds(nfds)()
            try:
                if data:
                    hostile.send(mine, data, fds)
            finally:
                for fd in fds:
                    os.close(fd)
            assert hostile.sees_eof(mine), "channel left open after a bad reply"
        r = hostile.recv_message(s)  # the ack of SET_BACKEND_REQ_FD: the session is fine
        assert r is not None and (r.code, r.u64) == (Req.SET_BACKEND_REQ_FD, 0)
        still_answers(s)
    assert st.join() is None
    assert len(dev.channel_errors) == 2, dev.channel_errors
    assert isinstance(dev.channel_errors[0], error), dev.channel_errors
    assert isinstance(dev.channel_errors[1], ClosedError), dev.channel_errors
    check_clean(listener, base)


def test_j4_second_frontend_waits_and_first_is_untouched(listener: BackendListener) -> None:
    """One session at a time: a second front-end is not served (it times out) until the
    first is done, and the first one is not disturbed by it."""
    base = hostile.fd_count()
    st = start(listener, Device())
    first = Frontend.connect(listener.path, timeout=5.0)
    second = Frontend.connect(listener.path, timeout=0.3)
    try:
        assert first.get_features() == FEATURES
        with pytest.raises(VhostTimeoutError):
            second.get_features()
        first.set_owner()
        assert first.get_protocol_features() == OFFERED_PROTO
    finally:
        second.close()
        first.close()
        del first, second
    assert st.join() is None
    # The second front-end's connection sat in the backlog; the next session finds it
    # closed and ends cleanly or with a typed error.
    leftover = start(listener, Device())
    outcome = leftover.join()
    assert outcome is None or isinstance(outcome, VhostError), outcome
    check_clean(listener, base)


def test_d4_ring_outside_memory_is_refused(listener: BackendListener) -> None:
    base = hostile.fd_count()
    dev = Device()
    st = start(listener, dev)
    with hostile.connect(listener.path) as s:
        negotiate(s, NACK_PROTO)
        fd = memfd(MiB)
        try:
            r = ask(s, MSG(Req.SET_MEM_TABLE, hostile.mem_table([region(0, MiB)]), flags=ACKED),
                    [fd])
        finally:
            os.close(fd)
        assert r.u64 == 0
        assert ask(s, MSG(Req.SET_VRING_NUM, VRING_STATE.pack(0, 256), flags=ACKED)).u64 == 0
        bad = {
            "desc outside": vring_addr(0, desc=UADDR + 2 * MiB, used=UADDR + 0x3000,
                                       avail=UADDR + 0x2000),
            "desc straddles the end": vring_addr(0, desc=UADDR + MiB - 16, used=UADDR + 0x3000,
                                                 avail=UADDR + 0x2000),
            "used below the region": vring_addr(0, desc=UADDR, used=UADDR - 0x1000,
                                                avail=UADDR + 0x2000),
            "avail wraps": vring_addr(0, desc=UADDR, used=UADDR + 0x3000, avail=2**64 - 2),
        }
        for what, body in bad.items():
            r = ask(s, MSG(Req.SET_VRING_ADDR, body, flags=ACKED))
            assert r.u64 != 0, what
        good = vring_addr(0, desc=UADDR, used=UADDR + 0x3000, avail=UADDR + 0x2000)
        assert ask(s, MSG(Req.SET_VRING_ADDR, good, flags=ACKED)).u64 == 0
        still_answers(s)
    assert st.join() is None
    assert len(dev.errors) == 4, dev.errors
    check_clean(listener, base)


# -- J7: a thread blocked in a native call must not wedge the interpreter ---------------
# Each scenario runs in a child interpreter: a regression would deadlock, and a deadlock
# with the GIL held would otherwise hang the whole test run.

J7_SCENARIOS: dict[str, str] = {
    "listener-close-during-accept-with-timeout": """
import threading, time
from vhost import _core
from vhost.errors import ClosedError
l = _core.Listener(PATH)
out = []
def run():
    try:
        l.accept_backend(5.0)
    except BaseException as e:
        out.append(e)
t = threading.Thread(target=run); t.start(); time.sleep(0.2)
l.close(); t.join(5)
assert not t.is_alive() and isinstance(out[0], ClosedError), out
""",
    "listener-close-during-accept-forever": """
import threading, time, os
from vhost.user import BackendListener
from vhost.errors import ClosedError
l = BackendListener(PATH)
out = []
def run():
    try:
        l.accept()
    except BaseException as e:
        out.append(e)
t = threading.Thread(target=run); t.start(); time.sleep(0.2)
assert l.fileno() >= 0
l.close(); t.join(5)
assert not t.is_alive() and isinstance(out[0], ClosedError), out
assert not os.path.exists(PATH)
""",
    "channel-broken-while-another-thread-waits": """
import threading, time
from vhost.user import BackendHandler, BackendListener, Frontend, FrontendRequestHandler
channels = []
class Dev(BackendHandler):
    def get_features(self): return (1 << 30) | (1 << 32)
    def get_vring_base(self, index): return 0
    def get_protocol_features(self): return (1 << 9) | (1 << 5)
    def set_backend_channel(self, c): channels.append(c)
l = BackendListener(PATH)
threading.Thread(target=lambda: l.accept().serve(Dev()), daemon=True).start()
fe = Frontend.connect(PATH)
fe.negotiate()
ch = fe.set_backend_req_fd()
seen = []
class Answers(FrontendRequestHandler):
    def config_change(self):
        seen.append(1)
        return 0
t = threading.Thread(target=lambda: ch.process_one(Answers())); t.start()
time.sleep(0.2)
assert ch.broken is False
channels[0].config_change()
t.join(5)
assert not t.is_alive() and seen == [1]
fe.close()
""",
    "frontend-close-while-a-call-waits-forever": """
import socket, threading, time
from vhost import VhostError
from vhost.user import Frontend
srv = socket.socket(socket.AF_UNIX)
srv.bind(PATH)
srv.listen(1)
fe = Frontend.connect(PATH, timeout=None)
conn, _ = srv.accept()  # a back-end that never answers
out = []
def call():
    try:
        fe.get_features()
    except BaseException as e:
        out.append(e)
t = threading.Thread(target=call); t.start(); time.sleep(0.2)
fe.close()
t.join(5)
assert not t.is_alive() and isinstance(out[0], VhostError), out
assert fe.broken
""",
    "two-threads-serve-one-session": """
import threading, time
from vhost.user import BackendHandler, BackendListener, Frontend
class Dev(BackendHandler):
    def get_features(self): return 1 << 32
    def get_vring_base(self, index): return 0
l = BackendListener(PATH)
fe = Frontend.connect(PATH)
s = l.accept()
out = []
def run():
    try:
        s.serve(Dev())
        out.append(None)
    except BaseException as e:
        out.append(e)
a = threading.Thread(target=run); b = threading.Thread(target=run)
a.start(); b.start(); time.sleep(0.2)
assert fe.get_features() == 1 << 32
fe.close()
a.join(5); b.join(5)
assert not a.is_alive() and not b.is_alive(), out
""",
}


@pytest.mark.parametrize("code", J7_SCENARIOS.values(), ids=list(J7_SCENARIOS))
def test_j7_no_deadlock_with_a_thread_blocked_in_native_code(
    tmp_sock_dir: Path, code: str
) -> None:
    path = tmp_sock_dir / "j7.sock"
    proc = subprocess.run(
        [sys.executable, "-c", f"PATH = {str(path)!r}\n" + code],
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
    )
    assert proc.returncode == 0, proc.stderr
