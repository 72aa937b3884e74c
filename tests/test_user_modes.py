"""Client and server modes, both ways, and what the context managers release.

- front-end client (:meth:`Frontend.connect`) to a back-end server (:class:`BackendListener`);
- front-end server (:meth:`Frontend.accept`) to a back-end client
  (:meth:`BackendSession.connect`);
- socket paths are unlinked when listeners close, and every ``with`` block gives back
  the file descriptors it opened (counted in ``/proc/self/fd``).
"""

from __future__ import annotations

import gc
import os
import socket
import threading
import time
from collections.abc import Callable
from pathlib import Path

import pytest

from vhost import EventFd, GuestMemory
from vhost.codes import ProtocolFeature
from vhost.errors import ClosedError, VhostTimeoutError
from vhost.user import (
    BackendHandler,
    BackendListener,
    BackendSession,
    Frontend,
    regions_of,
    serve_in_thread,
)

FEATURES = (1 << 32) | (1 << 30)
PROTOCOL = int(ProtocolFeature.REPLY_ACK | ProtocolFeature.MQ | ProtocolFeature.CONFIG)
TIMEOUT = 5.0


class Device(BackendHandler):
    """A small device: answers negotiation and config, keeps the memory and the fds."""

    max_queues = 2

    def __init__(self) -> None:
        self.memory: GuestMemory | None = None
        self.kick: EventFd | None = None
        self.seen: list[str] = []

    def get_features(self) -> int:
        self.seen.append("get_features")
        return FEATURES

    def get_protocol_features(self) -> int:
        self.seen.append("get_protocol_features")
        return PROTOCOL

    def set_owner(self) -> None:
        self.seen.append("set_owner")

    def get_config(self, offset: int, size: int, flags: int) -> bytes:
        return b"cfg:" + bytes(size - 4)

    def set_mem_table(self, memory: GuestMemory) -> None:
        self.memory = memory

    def set_vring_kick(self, index: int, fd: EventFd | None) -> None:
        self.kick = fd

    def get_vring_base(self, index: int) -> int:
        return 0


def exercise(fe: Frontend, device: Device) -> None:
    """A short but real conversation: negotiation, config, memory, a kick."""
    features, proto = fe.negotiate()
    assert features == FEATURES
    assert proto == PROTOCOL
    assert fe.get_queue_num() == 2
    assert fe.get_config(0, 8) == b"cfg:\0\0\0\0"
    ram = GuestMemory.allocate([(0, 0x10000)])
    ram.write(0x100, b"shared")
    fe.set_mem_table(regions_of(ram))
    assert device.memory is not None
    assert device.memory.read(0x100, 6) == b"shared"
    with EventFd() as kick:
        fe.set_vring_kick(0, kick)
        assert device.kick is not None
        kick.write(1)
        assert device.kick.wait(TIMEOUT)
        device.kick.close()
    assert device.seen[:3] == ["get_features", "set_owner", "get_protocol_features"]


def wait_for_socket(path: Path, timeout: float = TIMEOUT) -> None:
    deadline = time.monotonic() + timeout
    while not path.is_socket():
        assert time.monotonic() < deadline, f"{path} never appeared"
        time.sleep(0.005)


# ---- client front-end, server back-end --------------------------------------------------


def test_frontend_client_to_backend_listener(tmp_sock_dir: Path) -> None:
    path = tmp_sock_dir / "be.sock"
    device = Device()
    with BackendListener(path) as listener:
        assert listener.path == path
        assert path.is_socket()
        with Frontend.connect(path, timeout=TIMEOUT) as fe:
            session = listener.accept(timeout=TIMEOUT)
            with serve_in_thread(session, device):
                exercise(fe, device)
    assert not path.exists()


def test_backend_listener_serves_one_frontend_after_another(tmp_sock_dir: Path) -> None:
    path = tmp_sock_dir / "be.sock"
    devices: list[Device] = []
    with BackendListener(path) as listener:
        for _ in range(2):
            device = Device()
            devices.append(device)
            with Frontend.connect(path, timeout=TIMEOUT) as fe:
                session = listener.accept(timeout=TIMEOUT)
                with serve_in_thread(session, device):
                    exercise(fe, device)
    # Each front-end had a session of its own: a fresh negotiation, its own memory.
    assert [d.seen.count("set_owner") for d in devices] == [1, 1]
    assert devices[0].memory is not devices[1].memory


def test_backend_listener_accept_timeout(tmp_sock_dir: Path) -> None:
    with BackendListener(tmp_sock_dir / "be.sock") as listener:
        start = time.monotonic()
        with pytest.raises(VhostTimeoutError):
            listener.accept(timeout=0.2)
        assert time.monotonic() - start < 3


def test_frontend_connect_without_listener_fails(tmp_sock_dir: Path) -> None:
    with pytest.raises(FileNotFoundError) as caught:
        Frontend.connect(tmp_sock_dir / "nobody.sock", timeout=TIMEOUT)
    assert caught.value.filename == str(tmp_sock_dir / "nobody.sock")


# ---- server front-end, client back-end --------------------------------------------------


def test_frontend_server_backend_client(tmp_sock_dir: Path) -> None:
    path = tmp_sock_dir / "fe.sock"
    accepted: list[Frontend] = []
    errors: list[BaseException] = []

    def accept() -> None:
        try:
            accepted.append(Frontend.accept(path, timeout=TIMEOUT))
        except BaseException as exc:  # reported below
            errors.append(exc)

    t = threading.Thread(target=accept, daemon=True)
    t.start()
    wait_for_socket(path)
    session = BackendSession.connect(path)
    t.join(TIMEOUT)
    assert errors == []
    (fe,) = accepted
    # Frontend.accept took one back-end and closed its listener: the path is gone.
    assert not path.exists()
    device = Device()
    with fe, serve_in_thread(session, device):
        exercise(fe, device)


def test_frontend_accept_timeout_removes_socket(tmp_sock_dir: Path) -> None:
    path = tmp_sock_dir / "fe.sock"
    with pytest.raises(VhostTimeoutError):
        Frontend.accept(path, timeout=0.2)
    assert not path.exists()


# ---- listeners and socket paths ---------------------------------------------------------


def test_listener_unlinks_path_on_close(tmp_sock_dir: Path) -> None:
    path = tmp_sock_dir / "be.sock"
    listener = BackendListener(path)
    assert path.is_socket()
    listener.close()
    assert not path.exists()
    listener.close()  # idempotent
    with pytest.raises(ClosedError):
        listener.accept(timeout=0.1)


def test_listener_replaces_stale_socket_only(tmp_sock_dir: Path) -> None:
    path = tmp_sock_dir / "be.sock"
    # a stale socket (its server died without cleaning up) is replaced
    stale = socket.socket(socket.AF_UNIX)
    stale.bind(os.fspath(path))
    stale.close()
    assert path.is_socket()
    with BackendListener(path) as listener, Frontend.connect(path, timeout=TIMEOUT):
        listener.accept(timeout=TIMEOUT).close()
    assert not path.exists()
    # ...but not without replace_stale
    stale = socket.socket(socket.AF_UNIX)
    stale.bind(os.fspath(path))
    stale.close()
    with pytest.raises(OSError):
        BackendListener(path, replace_stale=False)
    assert path.is_socket()
    path.unlink()
    # and a regular file is never removed
    path.write_text("precious")
    with pytest.raises(OSError):
        BackendListener(path)
    assert path.read_text() == "precious"


# ---- fds --------------------------------------------------------------------------------


def test_client_mode_context_managers_release_fds(
    tmp_sock_dir: Path, fd_count: Callable[[], int]
) -> None:
    path = tmp_sock_dir / "be.sock"
    gc.collect()  # earlier tests' garbage must not close its fds mid-count
    before = fd_count()
    with BackendListener(path) as listener:
        with Frontend.connect(path, timeout=TIMEOUT) as fe:
            with (
                listener.accept(timeout=TIMEOUT) as session,
                serve_in_thread(session, Device()),
            ):
                fe.negotiate()
                assert fd_count() > before
            # the session and its socket are gone; the front-end's socket is still open
            assert fd_count() == before + 2
        # leaving the Frontend's block closes its socket at once (not at collection)
        assert fe.closed
        assert fd_count() == before + 1
        with pytest.raises(ClosedError):
            fe.get_features()
    assert fd_count() == before


def test_server_mode_context_managers_release_fds(
    tmp_sock_dir: Path, fd_count: Callable[[], int]
) -> None:
    path = tmp_sock_dir / "fe.sock"
    gc.collect()  # earlier tests' garbage must not close its fds mid-count
    before = fd_count()
    accepted: list[Frontend] = []
    t = threading.Thread(
        target=lambda: accepted.append(Frontend.accept(path, timeout=TIMEOUT)), daemon=True
    )
    t.start()
    wait_for_socket(path)
    with BackendSession.connect(path) as session:
        t.join(TIMEOUT)
        (fe,) = accepted
        device = Device()
        with fe, serve_in_thread(session, device):
            exercise(fe, device)
        assert fe.closed
    assert session.closed
    # Both sockets are closed. The guest RAM the back-end mapped stays mapped (its memfd
    # open) while the session object, whose ``memory`` it is, is alive.
    assert fd_count() == before + 1
    del device, session
    assert fd_count() == before


def test_frontend_close_is_seen_by_the_backend(tmp_sock_dir: Path) -> None:
    """Closing the front-end ends the back-end's serve loop cleanly (no exception)."""
    path = tmp_sock_dir / "be.sock"
    with BackendListener(path) as listener:
        fe = Frontend.connect(path, timeout=TIMEOUT)
        session = listener.accept(timeout=TIMEOUT)
        done = threading.Event()
        errors: list[BaseException] = []

        def serve() -> None:
            try:
                session.serve(Device())
            except BaseException as exc:  # reported below
                errors.append(exc)
            done.set()

        threading.Thread(target=serve, daemon=True).start()
        fe.negotiate()
        fe.close()
        assert done.wait(TIMEOUT)
        assert errors == []
        assert session.closed


def test_eventfd_and_memory_context(fd_count: Callable[[], int]) -> None:
    gc.collect()  # earlier tests' garbage must not close its fds mid-count
    before = fd_count()
    with EventFd() as e:
        e.write(1)
        assert e.read() == 1
    assert e.closed
    ram = GuestMemory.allocate([(0, 0x10000)])
    assert fd_count() == before + 1  # the memfd stays open while the memory lives
    del ram
    assert fd_count() == before
