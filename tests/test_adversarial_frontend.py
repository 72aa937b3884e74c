"""A hostile back-end against our front-end (ADVERSARIAL rows H1, H2, H5, J3).

The back-end here is a raw listening socket played by a script in a thread: it answers
our `vhost.user.Frontend` wrongly (wrong code, missing REPLY bit, fds on a reply, a
GET_CONFIG reply larger than asked, wrong body size), never, or only half, and abuses the
back-end request channel. For each case we check the typed exception, that the broken
connection is closed at once (the hostile side sees EOF before we close anything), that
no fd leaks, and that the same listening socket then serves a well-behaved connection (a
real `BackendSession` adopted on the next accepted socket).
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import random
import signal
import socket
import struct
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import pytest

import hostile
from hostile import NEED_REPLY, REPLY, U64, VERSION, VRING_STATE
from vhost import VhostError, _core
from vhost.codes import BackendRequest as BReq
from vhost.codes import FrontendRequest as Req
from vhost.codes import ProtocolFeature as PF
from vhost.errors import (
    ClosedError,
    DisconnectedError,
    InactiveFeatureError,
    InvalidParamError,
    KernelError,
    PartialMessageError,
    ProtocolError,
    RequestRefusedError,
    VhostTimeoutError,
)
from vhost.user import BackendHandler, Frontend, FrontendRequestHandler

FEATURES = (1 << 32) | (1 << 30)
OK_REPLY = VERSION | REPLY


class GoodDevice(BackendHandler):
    max_queues = 1

    def get_features(self) -> int:
        return FEATURES

    def get_protocol_features(self) -> int:
        return int(PF.REPLY_ACK)

    def get_vring_base(self, index: int) -> int:
        return 0


Script = Callable[["HostileBackend", socket.socket], None]


class HostileBackend:
    """A raw listening socket: the first connection is played by `script`, the next one is
    served by a real back-end session (the "second, well-behaved connection")."""

    def __init__(self, path: Path, script: Script) -> None:
        self.path = path
        self.script = script
        self.error: BaseException | None = None
        self.good_outcome: BaseException | None = None
        self._events: dict[str, threading.Event] = {}
        self._lock = threading.Lock()
        self._sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self._sock.bind(os.fspath(path))
        self._sock.listen(2)
        self._sock.settimeout(10.0)
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def event(self, name: str) -> threading.Event:
        with self._lock:
            return self._events.setdefault(name, threading.Event())

    def _run(self) -> None:
        try:
            conn, _ = self._sock.accept()
            with conn:
                conn.settimeout(10.0)
                self.script(self, conn)
        except BaseException as exc:
            self.error = exc
        finally:
            self.event("hostile-done").set()
        try:
            conn, _ = self._sock.accept()
            with conn:
                session = _core.BackendSession.from_socket(conn)
            session.serve(GoodDevice())
        except BaseException as exc:
            self.good_outcome = exc

    def finish_hostile(self) -> None:
        assert self.event("hostile-done").wait(10), "hostile script did not finish"
        if self.error is not None:
            raise self.error

    def close(self) -> None:
        self._thread.join(10)
        assert not self._thread.is_alive()
        self._sock.close()
        os.unlink(self.path)


@pytest.fixture
def sock_path(tmp_sock_dir: Path) -> Path:
    return tmp_sock_dir / "hostile-be.sock"


def well_behaved(hb: HostileBackend) -> None:
    fe = Frontend.connect(hb.path, timeout=5.0)
    try:
        assert fe.get_features() == FEATURES
        fe.set_owner()
    finally:
        fe.close()
        del fe
    hb.close()
    assert hb.good_outcome is None, hb.good_outcome


def expect(conn: socket.socket, code: int) -> hostile.Received:
    msg = hostile.recv_message(conn)
    assert msg is not None, f"front-end closed instead of sending request {code}"
    assert msg.code == code, (msg.code, code)
    return msg


def reply(conn: socket.socket, code: int, body: bytes, fds: list[int] | None = None) -> None:
    hostile.send(conn, hostile.message(code, body, flags=OK_REPLY), fds or [])


def play_negotiation(conn: socket.socket, proto: int) -> None:
    """Answers Frontend.negotiate() honestly, offering protocol features `proto`."""
    expect(conn, Req.GET_FEATURES)
    reply(conn, Req.GET_FEATURES, U64.pack(FEATURES))
    expect(conn, Req.SET_OWNER)
    expect(conn, Req.GET_PROTOCOL_FEATURES)
    reply(conn, Req.GET_PROTOCOL_FEATURES, U64.pack(proto))
    m = expect(conn, Req.SET_PROTOCOL_FEATURES)
    assert m.u64 == proto
    m = expect(conn, Req.SET_FEATURES)
    if m.flags & NEED_REPLY:
        reply(conn, Req.SET_FEATURES, U64.pack(0))


def saw_eof(hb: HostileBackend, conn: socket.socket, name: str = "peer-eof") -> None:
    """Records whether the front-end closed the connection on its own."""
    if hostile.sees_eof(conn, 5.0):
        hb.event(name).set()


# -- one bad reply to one request -------------------------------------------------------


@dataclass(frozen=True)
class BadReply:
    """The front-end calls `call`; the hostile side answers `request` with `data`."""

    data: bytes
    error: type[VhostError] = ProtocolError
    request: int = Req.GET_FEATURES
    proto: int | None = None  # negotiate first, offering these protocol features
    fds: int = 0
    close_after: bool = False
    fd_kind: str = "eventfd"  # the fds sent: "eventfd", "memfd" (4 KiB) or "pipe"
    fds_on_body: bool = False  # send the header alone first, the fds with the body


def reply_fds(kind: str, count: int) -> list[int]:
    """``count`` fds of ``kind`` to attach to a reply (the caller closes them)."""
    fds: list[int] = []
    for _ in range(count):
        if kind == "eventfd":
            fds.append(os.eventfd(0, os.EFD_CLOEXEC))
        elif kind == "memfd":
            fd = os.memfd_create("hostile-inflight", os.MFD_CLOEXEC)
            os.ftruncate(fd, 4096)
            fds.append(fd)
        else:
            r, w = os.pipe()
            os.close(w)
            fds.append(r)
    return fds


def get_features(fe: Frontend) -> None:
    fe.get_features()


def get_config_4(fe: Frontend) -> None:
    fe.get_config(0, 4)


def set_vring_num(fe: Frontend) -> None:
    fe.set_vring_num(0, 256)


def get_vring_base_0(fe: Frontend) -> None:
    fe.get_vring_base(0)


def get_inflight_fd(fe: Frontend) -> None:
    fe.get_inflight_fd(1, 256)


def get_queue_num(fe: Frontend) -> None:
    fe.get_queue_num()


CALLS: dict[int, Callable[[Frontend], None]] = {
    Req.GET_INFLIGHT_FD: get_inflight_fd,
    Req.GET_QUEUE_NUM: get_queue_num,
    Req.GET_FEATURES: get_features,
    Req.GET_CONFIG: get_config_4,
    Req.SET_VRING_NUM: set_vring_num,
    Req.GET_VRING_BASE: get_vring_base_0,
}

CONFIG = int(PF.CONFIG | PF.REPLY_ACK)
INFLIGHT = int(PF.INFLIGHT_SHMFD | PF.REPLY_ACK)
INFLIGHT_BODY = struct.pack("=QQHH4x", 4096, 0, 1, 256)
MSG = hostile.message
GF = Req.GET_FEATURES


def inflight_reply(
    size: int, *, offset: int = 0, queues: int = 1, queue_size: int = 256, fd_kind: str = "memfd"
) -> BadReply:
    """A GET_INFLIGHT_FD reply (to a request for 1 queue of 256) with one fd of ``fd_kind``."""
    body = struct.pack("=QQHH4x", size, offset, queues, queue_size)
    return BadReply(
        MSG(Req.GET_INFLIGHT_FD, body, flags=OK_REPLY),
        request=Req.GET_INFLIGHT_FD,
        proto=INFLIGHT,
        fds=1,
        fd_kind=fd_kind,
    )

BAD_REPLIES: dict[str, BadReply] = {
    "H2-wrong-code": BadReply(MSG(Req.SET_FEATURES, U64.pack(FEATURES), flags=OK_REPLY)),
    "H2-reply-bit-missing": BadReply(MSG(GF, U64.pack(FEATURES), flags=VERSION)),
    "H2-need-reply-on-reply": BadReply(MSG(GF, U64.pack(FEATURES), flags=OK_REPLY | NEED_REPLY)),
    "H2-version-2": BadReply(MSG(GF, U64.pack(FEATURES), flags=2 | REPLY)),
    "H2-reserved-flag-bit": BadReply(MSG(GF, U64.pack(FEATURES), flags=OK_REPLY | 0x40)),
    "H2-fds-on-get-features-reply": BadReply(MSG(GF, U64.pack(FEATURES), flags=OK_REPLY), fds=3),
    "H2-body-4-bytes": BadReply(MSG(GF, b"\0" * 4, flags=OK_REPLY)),
    "H2-body-12-bytes": BadReply(MSG(GF, b"\0" * 12, flags=OK_REPLY)),
    "H2-size-ffffffff": BadReply(hostile.header(GF, OK_REPLY, 0xFFFFFFFF)),
    "H2-size-4097": BadReply(hostile.header(GF, OK_REPLY, 4097)),
    "J1-short-header-then-close": BadReply(
        hostile.header(GF, OK_REPLY, 8)[:7], PartialMessageError, close_after=True
    ),
    "J1-half-body-then-close": BadReply(
        hostile.header(GF, OK_REPLY, 8) + b"\0\0\0", PartialMessageError, close_after=True
    ),
    "J1-close-instead-of-reply": BadReply(b"", DisconnectedError, close_after=True),
    "H2-config-reply-larger-than-asked": BadReply(
        MSG(Req.GET_CONFIG, hostile.config_body(0, 8), flags=OK_REPLY),
        request=Req.GET_CONFIG,
        proto=CONFIG,
    ),
    "H2-config-reply-other-offset": BadReply(
        MSG(Req.GET_CONFIG, hostile.config_body(4, 4), flags=OK_REPLY),
        request=Req.GET_CONFIG,
        proto=CONFIG,
    ),
    "H2-config-reply-size-field-lies": BadReply(
        MSG(Req.GET_CONFIG, hostile.config_body(0, 4, data=bytes(12)), flags=OK_REPLY),
        request=Req.GET_CONFIG,
        proto=CONFIG,
    ),
    "H2-ack-body-4-bytes": BadReply(
        MSG(Req.SET_VRING_NUM, b"\0" * 4, flags=OK_REPLY),
        request=Req.SET_VRING_NUM,
        proto=int(PF.REPLY_ACK),
    ),
    "H2-ack-with-fd": BadReply(
        MSG(Req.SET_VRING_NUM, U64.pack(0), flags=OK_REPLY),
        request=Req.SET_VRING_NUM,
        proto=int(PF.REPLY_ACK),
        fds=1,
    ),
    "H2-ack-for-another-request": BadReply(
        MSG(Req.SET_VRING_BASE, U64.pack(0), flags=OK_REPLY),
        request=Req.SET_VRING_NUM,
        proto=int(PF.REPLY_ACK),
    ),
    "H2-inflight-reply-without-fd": BadReply(
        MSG(Req.GET_INFLIGHT_FD, INFLIGHT_BODY, flags=OK_REPLY),
        request=Req.GET_INFLIGHT_FD,
        proto=INFLIGHT,
    ),
    "H2-inflight-reply-with-two-fds": BadReply(
        MSG(Req.GET_INFLIGHT_FD, INFLIGHT_BODY, flags=OK_REPLY),
        request=Req.GET_INFLIGHT_FD,
        proto=INFLIGHT,
        fds=2,
    ),
    "H2-inflight-reply-short-body": BadReply(
        MSG(Req.GET_INFLIGHT_FD, INFLIGHT_BODY[:20], flags=OK_REPLY),
        request=Req.GET_INFLIGHT_FD,
        proto=INFLIGHT,
        fds=1,
    ),
    # The reply to GET_INFLIGHT_FD is mapped by its user: it is checked first (issue 9).
    "H2-inflight-mmap-size-2**64-1": inflight_reply(2**64 - 1),
    "H2-inflight-mmap-size-0": inflight_reply(0),
    "H2-inflight-larger-than-its-file": inflight_reply(8192),  # the memfd has 4096
    "H2-inflight-offset-past-the-end": inflight_reply(4096, offset=4096),
    "H2-inflight-offset-plus-size-overflows": inflight_reply(4096, offset=2**64 - 4096),
    "H2-inflight-fd-is-a-pipe": inflight_reply(4096, fd_kind="pipe"),
    "H2-inflight-fd-is-an-eventfd": inflight_reply(4096, fd_kind="eventfd"),
    "H2-inflight-other-queue-count": inflight_reply(4096, queues=2),
    "H2-inflight-other-queue-size": inflight_reply(4096, queue_size=128),
    # Malformed replies that once raised InvalidParamError, as if our caller had erred.
    "H2-config-reply-unknown-flags": BadReply(
        MSG(Req.GET_CONFIG, hostile.config_body(0, 4, flags=0xFF), flags=OK_REPLY),
        request=Req.GET_CONFIG, proto=CONFIG,
    ),
    "H2-config-reply-size-over-256": BadReply(
        MSG(Req.GET_CONFIG, hostile.config_body(0, 300), flags=OK_REPLY),
        request=Req.GET_CONFIG, proto=CONFIG,
    ),
    "H2-config-reply-beyond-byte-256": BadReply(
        MSG(Req.GET_CONFIG, hostile.config_body(254, 4), flags=OK_REPLY),
        request=Req.GET_CONFIG, proto=CONFIG,
    ),
    "H2-fd-on-the-reply-body": BadReply(
        MSG(Req.GET_FEATURES, U64.pack(FEATURES), flags=OK_REPLY), fds=1, fds_on_body=True,
    ),
    "H2-queue-num-reply-empty": BadReply(
        MSG(Req.GET_QUEUE_NUM, b"", flags=OK_REPLY), request=Req.GET_QUEUE_NUM,
        proto=int(PF.MQ),
    ),
    "H2-vring-base-for-another-ring": BadReply(
        MSG(Req.GET_VRING_BASE, VRING_STATE.pack(1, 0), flags=OK_REPLY),
        request=Req.GET_VRING_BASE,
        proto=0,
    ),
}


@pytest.mark.parametrize("case", BAD_REPLIES.values(), ids=list(BAD_REPLIES))
def test_bad_reply_breaks_only_this_connection(sock_path: Path, case: BadReply) -> None:
    base = hostile.fd_count()

    def script(hb: HostileBackend, conn: socket.socket) -> None:
        if case.proto is not None:
            play_negotiation(conn, case.proto)
        expect(conn, case.request)
        fds = reply_fds(case.fd_kind, case.fds)
        try:
            if case.fds_on_body:
                size = hostile.HEADER.size
                hostile.send(conn, case.data[:size])
                time.sleep(0.2)  # the front-end reads the header alone, then the body
                hostile.send(conn, case.data[size:], fds)
            elif case.data:
                hostile.send(conn, case.data, fds)
        finally:
            for fd in fds:
                os.close(fd)
        if case.close_after:
            return
        saw_eof(hb, conn)

    hb = HostileBackend(sock_path, script)
    fe = Frontend.connect(sock_path, timeout=5.0)
    try:
        if case.proto is not None:
            fe.negotiate(protocol_features=case.proto)
        try:
            CALLS[case.request](fe)
        except case.error as exc:
            # The peer's fault: never reported as the caller's (InvalidParamError).
            assert not isinstance(exc, InvalidParamError), exc
        else:
            pytest.fail(f"no {case.error.__name__}")
        assert fe.broken
        if not case.close_after:
            # Closed by us at once, not when the object goes away.
            assert hb.event("peer-eof").wait(5), "front-end left a broken connection open"
        with pytest.raises(ClosedError):
            fe.get_features()
    finally:
        fe.close()
        del fe
    hb.finish_hostile()
    well_behaved(hb)
    assert hostile.settle_fds(base) == base, hostile.open_fd_targets()


def test_j3_backend_never_replies_times_out(sock_path: Path) -> None:
    base = hostile.fd_count()
    release = threading.Event()

    def script(hb: HostileBackend, conn: socket.socket) -> None:
        expect(conn, Req.GET_FEATURES)
        saw_eof(hb, conn)  # say nothing; the front-end gives up and closes
        release.wait(5)

    hb = HostileBackend(sock_path, script)
    fe = Frontend.connect(sock_path, timeout=0.3)
    try:
        with pytest.raises(VhostTimeoutError):
            fe.get_features()
        assert fe.broken
        assert hb.event("peer-eof").wait(5)
    finally:
        fe.close()
        del fe
        release.set()
    hb.finish_hostile()
    well_behaved(hb)
    assert hostile.settle_fds(base) == base, hostile.open_fd_targets()


def test_refusal_is_not_a_protocol_error(sock_path: Path) -> None:
    """A NACK is an answer: RequestRefusedError, and the connection goes on."""
    base = hostile.fd_count()

    def script(hb: HostileBackend, conn: socket.socket) -> None:
        play_negotiation(conn, int(PF.REPLY_ACK))
        expect(conn, Req.SET_VRING_NUM)
        reply(conn, Req.SET_VRING_NUM, U64.pack(1))
        expect(conn, Req.GET_FEATURES)
        reply(conn, Req.GET_FEATURES, U64.pack(FEATURES))
        assert hostile.recv_message(conn) is None

    hb = HostileBackend(sock_path, script)
    fe = Frontend.connect(sock_path, timeout=5.0)
    try:
        fe.negotiate()
        with pytest.raises(RequestRefusedError):
            fe.set_vring_num(0, 256)
        assert not fe.broken
        assert fe.get_features() == FEATURES
    finally:
        fe.close()
        del fe
    hb.finish_hostile()
    well_behaved(hb)
    assert hostile.settle_fds(base) == base, hostile.open_fd_targets()


# -- the back-end request channel (H1, H5) ----------------------------------------------


class Answers(FrontendRequestHandler):
    def __init__(self) -> None:
        self.calls: list[str] = []

    def config_change(self) -> int | None:
        self.calls.append("config_change")
        return 0

    def vring_call(self, index: int) -> int | None:
        self.calls.append("vring_call")
        return 0


@dataclass(frozen=True)
class BadChannel:
    data: bytes
    error: type[VhostError]
    proto: int = int(PF.REPLY_ACK | PF.BACKEND_REQ)
    fds: int = 0


NOTIFIER = int(PF.REPLY_ACK | PF.BACKEND_REQ | PF.HOST_NOTIFIER | PF.BACKEND_SEND_FD)


def area(index: int, size: int, offset: int, nofd: bool = False) -> bytes:
    return struct.pack("=QQQ", index | (hostile.NOFD if nofd else 0), size, offset)


SHMEM = int(PF.REPLY_ACK | PF.BACKEND_REQ | PF.SHMEM | PF.BACKEND_SEND_FD)


def shmem_map(fd_offset: int, shm_offset: int, length: int, shmid: int = 0) -> bytes:
    return struct.pack("=B7xQQQQ", shmid, fd_offset, shm_offset, length, 1)


BAD_CHANNEL: dict[str, BadChannel] = {
    "H1-config-change-without-CONFIG": BadChannel(
        MSG(BReq.CONFIG_CHANGE_MSG, flags=VERSION | NEED_REPLY), InactiveFeatureError
    ),
    "H1-vring-call-without-INBAND": BadChannel(
        MSG(BReq.VRING_CALL, VRING_STATE.pack(0, 0)), InactiveFeatureError
    ),
    "H1-shared-object-without-SHARED_OBJECT": BadChannel(
        MSG(BReq.SHARED_OBJECT_ADD, bytes(16)), InactiveFeatureError
    ),
    "H3-host-notifier-nofd-clear-no-fd": BadChannel(
        MSG(BReq.VRING_HOST_NOTIFIER_MSG, area(0, 4096, 0)), ProtocolError, proto=NOTIFIER
    ),
    "H3-host-notifier-size-0": BadChannel(
        MSG(BReq.VRING_HOST_NOTIFIER_MSG, area(0, 0, 0)), VhostError, proto=NOTIFIER, fds=1
    ),
    "H3-host-notifier-offset-overflow": BadChannel(
        MSG(BReq.VRING_HOST_NOTIFIER_MSG, area(0, 4096, 2**64 - 1)), VhostError,
        proto=NOTIFIER, fds=1,
    ),
    "H3-host-notifier-reserved-bits": BadChannel(
        MSG(BReq.VRING_HOST_NOTIFIER_MSG, struct.pack("=QQQ", 1 << 20, 4096, 0)), VhostError,
        proto=NOTIFIER, fds=1,
    ),
    "H4-shmem-map-without-SHMEM": BadChannel(
        MSG(BReq.SHMEM_MAP, shmem_map(0, 0, 4096)), InactiveFeatureError, fds=1
    ),
    "H4-shmem-map-shm-offset-overflow": BadChannel(
        MSG(BReq.SHMEM_MAP, shmem_map(0, 2**64 - 4096, 8192)), VhostError, proto=SHMEM, fds=1
    ),
    "H4-shmem-map-fd-offset-overflow": BadChannel(
        MSG(BReq.SHMEM_MAP, shmem_map(2**64 - 1, 0, 2)), VhostError, proto=SHMEM, fds=1
    ),
    "H4-shmem-map-length-0": BadChannel(
        MSG(BReq.SHMEM_MAP, shmem_map(0, 0, 0)), VhostError, proto=SHMEM, fds=1
    ),
    "H4-shmem-map-without-fd": BadChannel(
        MSG(BReq.SHMEM_MAP, shmem_map(0, 0, 4096)), ProtocolError, proto=SHMEM
    ),
    "H4-iotlb-size-0": BadChannel(
        MSG(BReq.IOTLB_MSG, struct.pack("=QQQBB6x", 0x1000, 0, 0x1000, 3, 2)), VhostError,
        proto=int(PF.REPLY_ACK | PF.BACKEND_REQ),
    ),
    "H5-unknown-code": BadChannel(MSG(0xFFFF), ProtocolError),
    "H5-short-header-then-close": BadChannel(hostile.header(BReq.CONFIG_CHANGE_MSG)[:6],
                                             PartialMessageError),
    "H5-reply-bit-on-request": BadChannel(MSG(BReq.IOTLB_MSG, flags=OK_REPLY), ProtocolError),
    "H5-oversized": BadChannel(hostile.header(BReq.CONFIG_CHANGE_MSG, VERSION, 0x10000),
                               ProtocolError),
    "H5-fds-on-config-change": BadChannel(
        MSG(BReq.CONFIG_CHANGE_MSG),
        ProtocolError,
        proto=int(PF.REPLY_ACK | PF.BACKEND_REQ | PF.CONFIG),
        fds=2,
    ),
    "H5-config-change-with-body": BadChannel(
        MSG(BReq.CONFIG_CHANGE_MSG, U64.pack(0)),
        ProtocolError,
        proto=int(PF.REPLY_ACK | PF.BACKEND_REQ | PF.CONFIG),
    ),
}


@pytest.mark.parametrize("case", BAD_CHANNEL.values(), ids=list(BAD_CHANNEL))
def test_channel_error_closes_only_the_channel(sock_path: Path, case: BadChannel) -> None:
    base = hostile.fd_count()

    def script(hb: HostileBackend, conn: socket.socket) -> None:
        play_negotiation(conn, case.proto)
        m = expect(conn, Req.SET_BACKEND_REQ_FD)
        assert len(m.fds) == 1
        channel = socket.socket(fileno=m.fds.pop())
        with channel:
            if m.flags & NEED_REPLY:
                reply(conn, Req.SET_BACKEND_REQ_FD, U64.pack(0))
            fds = [os.eventfd(0, os.EFD_CLOEXEC) for _ in range(case.fds)]
            try:
                hostile.send(channel, case.data, fds)
            finally:
                for fd in fds:
                    os.close(fd)
            if len(case.data) < hostile.HEADER.size:
                channel.shutdown(socket.SHUT_WR)
            saw_eof(hb, channel, "channel-eof")
        # The main connection is still in business.
        expect(conn, Req.GET_FEATURES)
        reply(conn, Req.GET_FEATURES, U64.pack(FEATURES))
        assert hostile.recv_message(conn) is None

    hb = HostileBackend(sock_path, script)
    fe = Frontend.connect(sock_path, timeout=5.0)
    try:
        fe.negotiate()
        with fe.set_backend_req_fd() as ch:
            handler = Answers()
            with pytest.raises(case.error):
                ch.process_one(handler)
            assert ch.broken
            assert handler.calls == []
            assert hb.event("channel-eof").wait(5), "channel left open after its error"
        assert not fe.broken
        assert fe.get_features() == FEATURES
    finally:
        fe.close()
        del fe
    hb.finish_hostile()
    well_behaved(hb)
    assert hostile.settle_fds(base) == base, hostile.open_fd_targets()


def test_channel_good_request_after_negotiation_works(sock_path: Path) -> None:
    """Control case: the same channel request with its feature negotiated is served."""
    base = hostile.fd_count()

    def script(hb: HostileBackend, conn: socket.socket) -> None:
        play_negotiation(conn, int(PF.REPLY_ACK | PF.BACKEND_REQ | PF.CONFIG))
        m = expect(conn, Req.SET_BACKEND_REQ_FD)
        with socket.socket(fileno=m.fds.pop()) as channel:
            reply(conn, Req.SET_BACKEND_REQ_FD, U64.pack(0))
            hostile.send(channel, MSG(BReq.CONFIG_CHANGE_MSG, flags=VERSION | NEED_REPLY))
            r = hostile.recv_message(channel)
            assert r is not None and (r.code, r.flags, r.u64) == (
                BReq.CONFIG_CHANGE_MSG, OK_REPLY, 0
            )
        assert hostile.recv_message(conn) is None

    hb = HostileBackend(sock_path, script)
    fe = Frontend.connect(sock_path, timeout=5.0)
    try:
        fe.negotiate()
        with fe.set_backend_req_fd() as ch:
            handler = Answers()
            ch.process_one(handler)
            assert handler.calls == ["config_change"]
    finally:
        fe.close()
        del fe
    hb.finish_hostile()
    well_behaved(hb)
    assert hostile.settle_fds(base) == base, hostile.open_fd_targets()


def test_b9_frontend_sends_to_a_closed_backend(sock_path: Path) -> None:
    """Writing to a back-end that has gone: a typed error, never SIGPIPE (MSG_NOSIGNAL)."""
    base = hostile.fd_count()

    def script(hb: HostileBackend, conn: socket.socket) -> None:
        expect(conn, Req.GET_FEATURES)
        reply(conn, Req.GET_FEATURES, U64.pack(FEATURES))

    previous = signal.signal(signal.SIGPIPE, signal.SIG_DFL)
    try:
        hb = HostileBackend(sock_path, script)
        fe = Frontend.connect(sock_path, timeout=5.0)
        try:
            assert fe.get_features() == FEATURES
            hb.finish_hostile()  # the back-end has closed its end
            with pytest.raises((DisconnectedError, KernelError)):
                for _ in range(4):  # the first send may still land in the socket buffer
                    fe.set_vring_num(0, 256)
                    fe.set_owner()
            assert fe.broken
        finally:
            fe.close()
            del fe
    finally:
        signal.signal(signal.SIGPIPE, previous)
    well_behaved(hb)
    assert hostile.settle_fds(base) == base, hostile.open_fd_targets()


def test_j3_backend_trickling_a_reply_times_out(sock_path: Path) -> None:
    """SO_RCVTIMEO restarts with every byte; the whole reply must still come in time."""
    base = hostile.fd_count()
    stop = threading.Event()

    def script(hb: HostileBackend, conn: socket.socket) -> None:
        expect(conn, Req.GET_FEATURES)
        try:
            for b in hostile.message(Req.GET_FEATURES, U64.pack(FEATURES), flags=OK_REPLY):
                if stop.wait(0.1):
                    return
                conn.sendall(bytes([b]))
        except (BrokenPipeError, ConnectionResetError):
            hb.event("peer-eof").set()

    hb = HostileBackend(sock_path, script)
    fe = Frontend.connect(sock_path, timeout=0.4)
    try:
        t0 = time.monotonic()
        with pytest.raises(VhostTimeoutError):
            fe.get_features()
        assert time.monotonic() - t0 < 1.6
        assert fe.broken
    finally:
        fe.close()
        del fe
        stop.set()
    hb.finish_hostile()
    well_behaved(hb)
    assert hostile.settle_fds(base) == base, hostile.open_fd_targets()


def test_b8_fds_received_by_the_frontend_are_cloexec(sock_path: Path) -> None:
    base = hostile.fd_count()

    def script(hb: HostileBackend, conn: socket.socket) -> None:
        play_negotiation(conn, INFLIGHT)
        expect(conn, Req.GET_INFLIGHT_FD)
        fd = os.memfd_create("inflight", 0)  # deliberately not CLOEXEC on this side
        try:
            os.ftruncate(fd, 4096)
            reply(conn, Req.GET_INFLIGHT_FD, INFLIGHT_BODY, [fd])
        finally:
            os.close(fd)
        assert hostile.recv_message(conn) is None

    hb = HostileBackend(sock_path, script)
    fe = Frontend.connect(sock_path, timeout=5.0)
    try:
        fe.negotiate(protocol_features=INFLIGHT)
        info = fe.get_inflight_fd(1, 256)
        with info.fd:
            assert fcntl.fcntl(info.fd.fileno(), fcntl.F_GETFD) & fcntl.FD_CLOEXEC
            assert (info.mmap_size, info.num_queues, info.queue_size) == (4096, 1, 256)
        del info
    finally:
        fe.close()
        del fe
    hb.finish_hostile()
    well_behaved(hb)
    assert hostile.settle_fds(base) == base, hostile.open_fd_targets()


def test_random_replies_only_ever_raise_vhost_errors(sock_path: Path) -> None:
    """Seeded random replies (codes, flags, sizes, bodies, fds) to GET_FEATURES and
    GET_VRING_BASE: a value or a VhostError, never another exception, never a leak."""
    rng = random.Random(0x5EED)
    base = hostile.fd_count()
    with hostile.server_socket(sock_path) as srv:
        for i in range(400):
            code = Req.GET_FEATURES if i % 2 else Req.GET_VRING_BASE
            body = (
                rng.choice([U64.pack(FEATURES), VRING_STATE.pack(0, 7), b""])
                if rng.random() < 0.5
                else rng.randbytes(rng.choice([0, 1, 4, 7, 8, 9, 16, 64, 300]))
            )
            reply_code = code if rng.random() < 0.7 else rng.choice([0, 2, 11, 0xFFFFFFFF])
            flags = OK_REPLY if rng.random() < 0.6 else rng.getrandbits(32)
            size = len(body) if rng.random() < 0.7 else rng.choice([0, 8, 4096, 4097, 2**32 - 1])
            data = hostile.header(reply_code, flags, size) + body
            if rng.random() < 0.2:
                data = data[: rng.randrange(len(data) + 1)]
            nfds = rng.choice([0, 0, 0, 1, 3])
            fe = Frontend.connect(sock_path, timeout=1.0)
            conn, _ = srv.accept()
            try:
                fds = [os.eventfd(0, os.EFD_CLOEXEC) for _ in range(nfds)]
                try:
                    if data:
                        hostile.send(conn, data, fds)
                finally:
                    for fd in fds:
                        os.close(fd)
                conn.shutdown(socket.SHUT_WR)
                try:
                    if code == Req.GET_FEATURES:
                        fe.get_features()
                    else:
                        fe.get_vring_base(0)
                except VhostError:
                    pass
            finally:
                fe.close()
                del fe
                conn.close()
    assert hostile.settle_fds(base) == base, hostile.open_fd_targets()


def test_random_channel_requests_only_ever_raise_vhost_errors(sock_path: Path) -> None:
    """Seeded random back-end requests on the channel, every channel feature negotiated."""
    rng = random.Random(0xC4A7)
    proto = int(
        PF.BACKEND_REQ | PF.CONFIG | PF.HOST_NOTIFIER | PF.INBAND_NOTIFICATIONS
        | PF.SHARED_OBJECT | PF.SHMEM | PF.BACKEND_SEND_FD
    )
    base = hostile.fd_count()
    with hostile.server_socket(sock_path) as srv:
        fe = Frontend.connect(sock_path, timeout=2.0)
        conn, _ = srv.accept()
        try:
            conn.settimeout(5.0)
            # The negotiation's replies, sent ahead (no REPLY_ACK: nothing else is answered).
            reply(conn, Req.GET_FEATURES, U64.pack(FEATURES))
            reply(conn, Req.GET_PROTOCOL_FEATURES, U64.pack(proto))
            fe.negotiate()
            for _ in range(5):
                assert hostile.recv_message(conn) is not None
            for _ in range(300):
                ch = fe.set_backend_req_fd()
                m = expect(conn, Req.SET_BACKEND_REQ_FD)
                with socket.socket(fileno=m.fds.pop()) as end:
                    code = rng.choice([*range(0, 12), 0xFFFF, 0xFFFFFFFF])
                    body = rng.randbytes(rng.choice([0, 8, 16, 24, 40, 64]))
                    flags = rng.choice([VERSION, VERSION | NEED_REPLY, rng.getrandbits(32)])
                    size = len(body) if rng.random() < 0.8 else rng.choice([0, 4097, 2**32 - 1])
                    fds = [os.eventfd(0, os.EFD_CLOEXEC) for _ in range(rng.choice([0, 0, 1, 2]))]
                    try:
                        hostile.send(end, hostile.header(code, flags, size) + body, fds)
                    finally:
                        for fd in fds:
                            os.close(fd)
                    end.shutdown(socket.SHUT_WR)
                    with ch, contextlib.suppress(VhostError):
                        ch.process_one(Answers())
                    del ch
            # The main connection survived every channel failure.
            reply(conn, Req.GET_FEATURES, U64.pack(FEATURES))
            assert fe.get_features() == FEATURES
        finally:
            fe.close()
            del fe
            conn.close()
    assert hostile.settle_fds(base) == base, hostile.open_fd_targets()


# -- negotiate() against a back-end that offers every bit (issue 9) ---------------------


def test_negotiate_acks_only_what_the_package_implements(sock_path: Path) -> None:
    """A back-end offering all 64 feature and protocol feature bits: the front-end acks
    the transport bits its split rings implement, the device bits, and only implemented
    protocol features (never GPA_ADDRESSES, XEN_MMAP or a bit it does not know)."""
    everything = (1 << 64) - 1
    acked: dict[str, int] = {}

    def script(hb: HostileBackend, conn: socket.socket) -> None:
        expect(conn, Req.GET_FEATURES)
        reply(conn, Req.GET_FEATURES, U64.pack(everything))
        expect(conn, Req.SET_OWNER)
        expect(conn, Req.GET_PROTOCOL_FEATURES)
        reply(conn, Req.GET_PROTOCOL_FEATURES, U64.pack(everything))
        acked["protocol"] = expect(conn, Req.SET_PROTOCOL_FEATURES).u64
        m = expect(conn, Req.SET_FEATURES)
        acked["features"] = m.u64
        if m.flags & NEED_REPLY:
            reply(conn, Req.SET_FEATURES, U64.pack(0))
        assert hostile.recv_message(conn) is None

    hb = HostileBackend(sock_path, script)
    fe = Frontend.connect(sock_path, timeout=5.0)
    try:
        features, proto = fe.negotiate()
    finally:
        fe.close()
        del fe
    hb.finish_hostile()
    well_behaved(hb)
    assert acked == {"features": features, "protocol": int(proto)}
    assert proto == Frontend.DEFAULT_PROTOCOL_FEATURES
    for bit in (PF.GPA_ADDRESSES, PF.XEN_MMAP, PF.GET_VRING_BASE_INFLIGHT, PF.INFLIGHT_SHMFD):
        assert not proto & bit, bit
    assert not int(proto) >> 24
    transport = features & ((1 << 50) - 1) & ~((1 << 24) - 1)
    assert transport == (1 << 28) | (1 << 29) | (1 << 30) | (1 << 32)  # INDIRECT, EVENT_IDX,
    # PROTOCOL_FEATURES, VERSION_1: not RING_PACKED (34), ACCESS_PLATFORM (33), IN_ORDER
    # (35), NOTIFICATION_DATA (38), LOG_ALL (26), ...
    assert features & 0xFFFFFF == 0xFFFFFF  # device bits: the caller's driver decides
