"""Speaking raw vhost-user bytes, for adversarial tests (ADVERSARIAL rows A, B, C, D, G, H).

Nothing here validates anything: the point is to send what a broken or hostile peer would,
and to watch how our side reacts (typed error, closed connection, no leaked fd).
"""

from __future__ import annotations

import os
import re
import socket
import struct
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager, suppress
from dataclasses import dataclass, field
from pathlib import Path

from vhost import _core

HEADER = struct.Struct("=III")
U64 = struct.Struct("=Q")
VRING_STATE = struct.Struct("=II")
REGION = struct.Struct("=QQQQ")
CONFIG_HEAD = struct.Struct("=III")

VERSION = 0x1
REPLY = 1 << 2
NEED_REPLY = 1 << 3
NOFD = 1 << 8


def fd_count() -> int:
    return len(os.listdir("/proc/self/fd"))


def maps_count() -> int:
    with open("/proc/self/maps") as f:
        return sum(1 for _ in f)


def header(code: int, flags: int = VERSION, size: int = 0) -> bytes:
    return HEADER.pack(code & 0xFFFFFFFF, flags & 0xFFFFFFFF, size & 0xFFFFFFFF)


def message(code: int, body: bytes = b"", flags: int = VERSION, size: int | None = None) -> bytes:
    return header(code, flags, len(body) if size is None else size) + body


def mem_table(regions: Sequence[tuple[int, int, int, int]], count: int | None = None) -> bytes:
    n = len(regions) if count is None else count
    return struct.pack("=II", n, 0) + b"".join(REGION.pack(*r) for r in regions)


def config_body(offset: int, size: int, flags: int = 0, data: bytes | None = None) -> bytes:
    payload = bytes(size) if data is None else data
    return CONFIG_HEAD.pack(offset, size, flags) + payload


def send(sock: socket.socket, data: bytes, fds: Sequence[int] = ()) -> None:
    """Sends `data`, with `fds` riding on the first byte."""
    if fds:
        sent = socket.send_fds(sock, [data], list(fds))
        if sent < len(data):
            sock.sendall(data[sent:])
    else:
        sock.sendall(data)


def recv_exact(sock: socket.socket, n: int) -> bytes | None:
    """Exactly n bytes, or None on EOF before them."""
    buf = b""
    while len(buf) < n:
        chunk = sock.recv(n - len(buf))
        if not chunk:
            return None
        buf += chunk
    return buf


@dataclass
class Received:
    code: int
    flags: int
    body: bytes
    fds: list[int] = field(default_factory=list)

    def close_fds(self) -> None:
        for fd in self.fds:
            os.close(fd)
        self.fds.clear()

    @property
    def u64(self) -> int:
        value: int = U64.unpack(self.body)[0]
        return value


def recv_message(sock: socket.socket) -> Received | None:
    """One message with its fds, or None on EOF."""
    head, fds, _flags, _addr = socket.recv_fds(sock, HEADER.size, 16)
    if not head:
        for fd in fds:
            os.close(fd)
        return None
    rest = recv_exact(sock, HEADER.size - len(head)) if len(head) < HEADER.size else b""
    if rest is None:
        return None
    code, flags, size = HEADER.unpack(head + rest)
    body = recv_exact(sock, size) if size else b""
    if body is None:
        return None
    return Received(code, flags, body, list(fds))


def sees_eof(sock: socket.socket, timeout: float = 5.0) -> bool:
    """True when the peer closed (EOF or reset) within `timeout`; stray data is drained."""
    sock.settimeout(timeout)
    deadline = time.monotonic() + timeout
    try:
        while time.monotonic() < deadline:
            data, fds, _f, _a = socket.recv_fds(sock, 4096, 16)
            for fd in fds:
                os.close(fd)
            if not data:
                return True
    except (ConnectionResetError, BrokenPipeError):
        return True
    except TimeoutError:
        return False
    return False


def connect(path: Path | str, timeout: float = 5.0) -> socket.socket:
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    s.settimeout(timeout)
    s.connect(os.fspath(path))
    return s


class SessionThread:
    """Accepts one front-end on a listener and serves it with a handler in a thread; the
    outcome (None for a clean return, or the exception) is kept for the test."""

    def __init__(self, accept: Callable[[], _core.BackendSession], handler: object) -> None:
        self.outcome: BaseException | None = None
        self.finished = threading.Event()
        self._accept = accept
        self._handler = handler
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        try:
            session = self._accept()
            session.serve(self._handler)
        except BaseException as exc:
            self.outcome = exc
        finally:
            self.finished.set()

    def join(self, timeout: float = 10.0) -> BaseException | None:
        self._thread.join(timeout)
        assert not self._thread.is_alive(), "session thread did not finish"
        return self.outcome


def settle_fds(expected: int, timeout: float = 2.0) -> int:
    """fd count, waiting briefly for it to fall back to `expected` (drops are async)."""
    deadline = time.monotonic() + timeout
    n = fd_count()
    while n > expected and time.monotonic() < deadline:
        time.sleep(0.01)
        n = fd_count()
    return n


@contextmanager
def server_socket(path: Path) -> Iterator[socket.socket]:
    """A raw listening socket, for playing a hostile back-end."""
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    s.bind(os.fspath(path))
    s.listen(4)
    try:
        yield s
    finally:
        s.close()
        with suppress(FileNotFoundError):
            os.unlink(path)


def open_fd_targets() -> list[str]:
    """Where our fds point (for a readable leak message)."""
    out = []
    for name in os.listdir("/proc/self/fd"):
        with suppress(OSError):
            out.append(f"{name}->{os.readlink(f'/proc/self/fd/{name}')}")
    return sorted(out, key=lambda s: int(re.split(r"\D", s, maxsplit=1)[0] or 0))
