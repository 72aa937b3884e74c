"""Black-box fuzzing of a live back-end session: random message sequences, random sizes and
random fds, over a real socket. Whatever arrives, the session answers or closes that one
connection; the process survives, no fd leaks, and the next front-end is served."""

from __future__ import annotations

import os
import socket
import struct
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from vhost import VhostError
from vhost.user import BackendHandler, BackendListener, Frontend

HEADER = struct.Struct("<III")


class Device(BackendHandler):
    max_queues = 2

    def get_features(self) -> int:
        return (1 << 32) | (1 << 30)

    def get_protocol_features(self) -> int:
        return 0x8 | 0x200 | 0x8000  # REPLY_ACK, CONFIG, CONFIGURE_MEM_SLOTS

    def get_max_mem_slots(self) -> int:
        return 8

    def get_config(self, offset: int, size: int, flags: int) -> bytes:
        return bytes(size)

    def get_vring_base(self, index: int) -> int:
        return 0


class Server:
    """One listener serving front-ends one after another, recording how each ended."""

    def __init__(self, path: Path) -> None:
        self.listener = BackendListener(path)
        self.outcomes: list[str] = []
        self.active = 0  # sessions being served right now (0 or 1: one at a time)
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self.run, daemon=True)
        self.thread.start()

    def run(self) -> None:
        while not self.stop.is_set():
            try:
                session = self.listener.accept(timeout=0.2)
            except VhostError:
                continue
            self.active += 1
            try:
                session.serve(Device())
                self.outcomes.append("clean")
            except VhostError as exc:
                self.outcomes.append(type(exc).__name__)
            finally:
                self.active -= 1


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    path = Path(tmp_path_factory.mktemp("fuzz")) / "b.sock"
    s = Server(path)
    yield s
    s.stop.set()
    s.thread.join(5)
    s.listener.close()


# Codes around the assigned range, the assigned ones weighted up.
codes = st.one_of(st.integers(1, 45), st.sampled_from([0, 46, 0xFF, 0xFFFF_FFFF]))
flags = st.one_of(st.just(1), st.just(1 | 8), st.integers(0, 0xFF))
bodies = st.one_of(
    st.binary(max_size=64),
    st.sampled_from([8, 12, 16, 24, 40, 72]).flatmap(lambda n: st.binary(min_size=n, max_size=n)),
)
message = st.tuples(codes, flags, bodies, st.integers(0, 3), st.integers(-8, 8))


def _fd_count() -> int:
    return len(os.listdir("/proc/self/fd"))


def _send(sock: socket.socket, msg: tuple[int, int, bytes, int, int]) -> None:
    code, flag, body, nfds, size_skew = msg
    size = max(0, len(body) + size_skew)
    data = HEADER.pack(code, flag, size) + body
    fds = [os.open("/dev/null", os.O_RDONLY) for _ in range(nfds)]
    try:
        socket.send_fds(sock, [data], fds)
    finally:
        for fd in fds:
            os.close(fd)


@settings(
    max_examples=400,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture],
)
@given(st.lists(message, min_size=1, max_size=6))
def test_random_messages_never_break_the_server(
    server: Server, msgs: list[tuple[int, int, bytes, int, int]]
) -> None:
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
        sock.connect(str(server.listener.path))
        sock.settimeout(2)
        try:
            for m in msgs:
                _send(sock, m)
        except OSError:
            pass  # the session may close on the first bad message
        sock.shutdown(socket.SHUT_WR)
        try:
            while sock.recv(4096):
                pass
        except OSError:
            pass
    # A well-behaved front-end is still served.
    with Frontend.connect(server.listener.path, timeout=5) as fe:
        assert fe.get_features() == (1 << 32) | (1 << 30)


def _settle(server: Server) -> None:
    """Call after closing a front-end whose request the server answered: that session was
    running, and the server accepts in order and serves one session at a time, so once
    none is active every earlier session has ended and closed its fds."""
    deadline = time.monotonic() + 10
    while server.active and time.monotonic() < deadline:
        time.sleep(0.002)
    assert not server.active, "the server did not finish its sessions"


def test_fuzzing_leaves_no_fds_behind(server: Server) -> None:
    # Warm up (lazy imports, thread-local allocations) and let every earlier session end,
    # then measure across 100 hostile connections: every fd the sessions received must
    # have been closed.
    with Frontend.connect(server.listener.path) as fe:
        fe.get_features()
    _settle(server)
    before = _fd_count()
    for i in range(100):
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
            sock.connect(str(server.listener.path))
            try:
                _send(sock, (5, 1, struct.pack("<II", 2, 0) + bytes(32), 3, 0))  # bad table
                _send(sock, (i % 46, 1, bytes(8), 2, 0))  # may find the session closed
                sock.shutdown(socket.SHUT_WR)
            except OSError:
                pass
            sock.settimeout(2)
            try:
                while sock.recv(4096):
                    pass
            except OSError:
                pass
    with Frontend.connect(server.listener.path) as fe:
        assert fe.get_features() & (1 << 32)
    _settle(server)
    assert _fd_count() == before
    assert "clean" in server.outcomes
