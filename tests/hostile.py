"""Speaking raw vhost-user bytes, for adversarial tests (ADVERSARIAL rows A, B, C, D, G, H).

Nothing here validates anything: the point is to send what a broken or hostile peer would,
and to watch how our side reacts (typed error, closed connection, no leaked fd).
"""

from __future__ import annotations

import gc
import os
import re
import socket
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager, suppress
from pathlib import Path

from vhost import _core
from vhost.check.wire import (
    CONFIG_HEAD,
    HEADER,
    NEED_REPLY,
    NOFD,
    REGION,
    REPLY,
    U64,
    VERSION,
    VRING_STATE,
    Received,
    config_body,
    connect,
    header,
    mem_table,
    message,
    recv_exact,
    recv_message,
    sees_eof,
    send,
)

# The wire helpers live in vhost.check.wire (vhost check sends the same bytes); the
# adversarial tests keep importing them from here.
__all__ = [
    "CONFIG_HEAD",
    "HEADER",
    "NEED_REPLY",
    "NOFD",
    "REGION",
    "REPLY",
    "U64",
    "VERSION",
    "VRING_STATE",
    "Received",
    "SessionThread",
    "config_body",
    "connect",
    "fd_count",
    "header",
    "maps_count",
    "mem_table",
    "message",
    "open_fd_targets",
    "recv_exact",
    "recv_message",
    "sees_eof",
    "send",
    "server_socket",
    "settle_fds",
]


def fd_count() -> int:
    """This process's open fds, after a garbage collection: objects an earlier test left
    in reference cycles (a GuestMemory and its memfd) would otherwise close in the middle
    of a later test's count."""
    gc.collect()
    return len(os.listdir("/proc/self/fd"))


def maps_count() -> int:
    with open("/proc/self/maps") as f:
        return sum(1 for _ in f)


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
