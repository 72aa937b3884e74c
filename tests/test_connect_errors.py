"""Connection failures are ``OSError`` subclasses of the right kind, with ``filename`` set,
that are also ``VhostError`` (issue 9); a connect to a back-end that stopped accepting
times out; a reply timeout says which request and how long.

Before: every case below was ``KernelError(2 or 111, ...)`` without a path, a path over
108 bytes was EIO, and a full backlog blocked ``Frontend.connect`` for ever.
"""

from __future__ import annotations

import errno
import os
import pickle
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from flood_backend import SilentListener, StuckListener
from vhost import VhostError, VhostOSError, VhostTimeoutError
from vhost.errors import (
    VhostConnectionRefusedError,
    VhostFileNotFoundError,
    VhostNotADirectoryError,
    VhostPermissionError,
)
from vhost.user import BackendListener, BackendSession, Frontend

Connect = Callable[[str], object]

CONNECTS: dict[str, Connect] = {
    "frontend": lambda p: Frontend.connect(p, timeout=5),
    "backend-session": BackendSession.connect,
}


@pytest.fixture(params=sorted(CONNECTS))
def connect(request: pytest.FixtureRequest) -> Connect:
    return CONNECTS[request.param]


def expect_failure(
    connect: Connect,
    path: str,
    cls: type[OSError],
    builtin: type[OSError],
    fd_count: Callable[[], int],
) -> OSError:
    before = fd_count()
    with pytest.raises(builtin) as caught:
        connect(path)
    exc = caught.value
    assert type(exc) is cls, repr(exc)
    assert isinstance(exc, VhostError)
    assert exc.filename == path
    assert str(exc).startswith(f"connect to {path}: "), str(exc)
    assert fd_count() == before
    return exc


def test_missing_socket(connect: Connect, tmp_sock_dir: Path, fd_count: Callable[[], int]) -> None:
    path = str(tmp_sock_dir / "missing.sock")
    exc = expect_failure(connect, path, VhostFileNotFoundError, FileNotFoundError, fd_count)
    assert exc.errno == errno.ENOENT
    assert str(exc) == f"connect to {path}: No such file or directory"


def test_missing_directory(
    connect: Connect, tmp_sock_dir: Path, fd_count: Callable[[], int]
) -> None:
    path = str(tmp_sock_dir / "no-dir" / "s.sock")
    expect_failure(connect, path, VhostFileNotFoundError, FileNotFoundError, fd_count)


@pytest.mark.parametrize("kind", ["regular-file", "directory", "stale-socket"])
def test_nobody_listening(
    connect: Connect, tmp_sock_dir: Path, fd_count: Callable[[], int], kind: str
) -> None:
    path = tmp_sock_dir / "s.sock"
    if kind == "regular-file":
        path.write_bytes(b"not a socket")
    elif kind == "directory":
        path.mkdir()
    else:
        stale = socket.socket(socket.AF_UNIX)
        stale.bind(os.fspath(path))
        stale.close()  # the path stays, nobody listens
    exc = expect_failure(
        connect, os.fspath(path), VhostConnectionRefusedError, ConnectionRefusedError, fd_count
    )
    assert exc.errno == errno.ECONNREFUSED


def test_a_file_used_as_a_directory(
    connect: Connect, tmp_sock_dir: Path, fd_count: Callable[[], int]
) -> None:
    (tmp_sock_dir / "file").write_bytes(b"")
    path = str(tmp_sock_dir / "file" / "s.sock")
    expect_failure(connect, path, VhostNotADirectoryError, NotADirectoryError, fd_count)


def test_path_longer_than_a_socket_address(
    connect: Connect, tmp_sock_dir: Path, fd_count: Callable[[], int]
) -> None:
    path = str(tmp_sock_dir / ("x" * 120))
    exc = expect_failure(connect, path, VhostOSError, OSError, fd_count)
    assert exc.errno == errno.ENAMETOOLONG
    assert "at most 107" in str(exc)


PERMISSION_CHILD = """
import os, sys
from vhost.errors import VhostPermissionError, VhostError
from vhost.user import Frontend
if os.geteuid() == 0:  # root passes every permission check: become nobody first
    os.setgroups([])
    os.setegid(65534)
    os.seteuid(65534)
try:
    Frontend.connect(sys.argv[1], timeout=5)
except PermissionError as exc:
    assert type(exc) is VhostPermissionError and isinstance(exc, VhostError), repr(exc)
    assert exc.filename == sys.argv[1], exc.filename
    print(str(exc))
else:
    sys.exit("connected")
"""


def test_no_permission(tmp_sock_dir: Path) -> None:
    """A socket the caller may not write to; tested as an unprivileged user in a child
    (root bypasses the permission check)."""
    path = tmp_sock_dir / "s.sock"
    srv = socket.socket(socket.AF_UNIX)
    srv.bind(os.fspath(path))
    srv.listen(1)
    os.chmod(path, 0o600)
    os.chmod(tmp_sock_dir, 0o755)
    try:
        done = subprocess.run(
            [sys.executable, "-c", PERMISSION_CHILD, os.fspath(path)],
            check=False,
            capture_output=True,
            text=True,
            timeout=60,
        )
    finally:
        srv.close()
    assert done.returncode == 0, (done.stdout, done.stderr)
    assert done.stdout.strip() == f"connect to {path}: Permission denied"


@pytest.fixture
def full_backlog(tmp_sock_dir: Path) -> Iterator[str]:
    """A listener that stopped accepting, its backlog full."""
    path = os.fspath(tmp_sock_dir / "stuck.sock")
    stuck = StuckListener(path)
    try:
        yield path
    finally:
        stuck.close()


@pytest.fixture
def silent(tmp_sock_dir: Path) -> Iterator[str]:
    """A socket path whose listener never accepts or answers."""
    path = os.fspath(tmp_sock_dir / "s.sock")
    listener = SilentListener(path)
    try:
        yield path
    finally:
        listener.close()


def test_connect_to_a_full_backlog_times_out(
    full_backlog: str, fd_count: Callable[[], int]
) -> None:
    before = fd_count()
    start = time.monotonic()
    with pytest.raises(VhostTimeoutError) as caught:
        Frontend.connect(full_backlog, timeout=0.5)
    assert time.monotonic() - start < 5, "the connect was not bounded by its timeout"
    exc = caught.value
    assert exc.errno == errno.ETIMEDOUT
    assert exc.filename == full_backlog
    assert str(exc).startswith(f"connect to {full_backlog}: ")
    assert "backlog is full" in str(exc)
    assert fd_count() == before


def test_bind_failure_names_the_path(tmp_sock_dir: Path) -> None:
    path = str(tmp_sock_dir / "no-dir" / "s.sock")
    with pytest.raises(FileNotFoundError) as caught:
        BackendListener(path)
    exc = caught.value
    assert isinstance(exc, VhostOSError)
    assert exc.filename == path
    assert str(exc).startswith(f"bind {path}: ")


def test_reply_timeout_names_the_request_the_bound_and_the_likely_cause(silent: str) -> None:
    """A second front-end of a one-at-a-time back-end is queued by the kernel and never
    answered: the error says so instead of only "timed out"."""
    fe = Frontend.connect(silent, timeout=0.3)
    with pytest.raises(VhostTimeoutError) as caught:
        fe.get_features()
    message = str(caught.value)
    assert "GET_FEATURES" in message and "0.3 s" in message, message
    assert "one front-end at a time" in message, message
    fe.close()


def test_a_zero_timeout_is_a_timeout_not_eio(silent: str) -> None:
    fe = Frontend.connect(silent, timeout=0)
    with pytest.raises(VhostTimeoutError):
        fe.get_features()
    fe.close()


def test_path_errors_pickle_and_pick_their_class() -> None:
    exc = VhostOSError(errno.ECONNREFUSED, "Connection refused", "/x.sock", operation="connect to")
    assert type(exc) is VhostConnectionRefusedError
    copy = pickle.loads(pickle.dumps(exc))
    assert type(copy) is VhostConnectionRefusedError
    assert (copy.errno, copy.filename, copy.operation, str(copy)) == (
        errno.ECONNREFUSED,
        "/x.sock",
        "connect to",
        "connect to /x.sock: Connection refused",
    )
    assert type(VhostOSError(errno.EACCES, "x", "/p")) is VhostPermissionError
    assert type(VhostOSError(errno.EADDRINUSE, "x", "/p")) is VhostOSError


def test_daemon_bind_failure_names_the_path(tmp_sock_dir: Path) -> None:
    """`serve blk --socket` binds through Daemon.start: the same error kind as a connect."""
    from vhost.daemon import Daemon  # noqa: PLC0415
    from vhost.devices.rng import RngDevice  # noqa: PLC0415

    path = str(tmp_sock_dir / "no-dir" / "s.sock")
    with pytest.raises(FileNotFoundError) as caught:
        Daemon(RngDevice(), path).start()
    exc = caught.value
    assert isinstance(exc, VhostOSError)
    assert exc.filename == path
    assert str(exc) == f"listen on {path}: No such file or directory"


def test_a_daemon_does_not_take_over_a_stuck_server_socket(full_backlog: str) -> None:
    """A live server whose backlog is full is still a live server: binding over it is
    refused within the stale-socket probe's bound, not blocked in a plain connect."""
    from vhost.daemon import Daemon  # noqa: PLC0415
    from vhost.devices.rng import RngDevice  # noqa: PLC0415

    start = time.monotonic()
    with pytest.raises(VhostOSError) as caught:
        Daemon(RngDevice(), full_backlog).start()
    assert time.monotonic() - start < 10, "the stale-socket probe was not bounded"
    assert caught.value.errno == errno.EADDRINUSE
    assert caught.value.filename == full_backlog
    assert "another server is listening there" in str(caught.value)
    assert os.path.exists(full_backlog)
