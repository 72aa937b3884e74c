"""Ctrl-C reaches every blocking call of the package (issue 9).

Each case runs a child Python process that blocks in one call, gets a real SIGINT from
the test, and must raise ``KeyboardInterrupt`` within a bound, leaving the object in the
stated state (closed, or still usable), with no fd leaked. On the old code every child
here stayed blocked until the test killed it.
"""

from __future__ import annotations

import os
import select
import signal
import subprocess
import sys
import tempfile
import textwrap
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent
#: How long a child may take to raise KeyboardInterrupt after the signal. The waits
#: return to Python every 50 ms; the rest is slack for a loaded 2-CPU machine.
INTERRUPT_BOUND = 2.0

PRELUDE = """
import os, signal, socket, sys, threading, time
sys.path.insert(0, {tests!r})
from vhost import EventFd, ClosedError, VhostError
from vhost.user import (
    BackendHandler, BackendListener, Frontend, FrontendRequestHandler, Listener,
)
PATH = {path!r}
class Device(BackendHandler):
    def get_features(self):
        return 1 << 32
    def get_vring_base(self, index):
        return 0
def fds():
    return len(os.listdir("/proc/self/fd"))
"""

TEMPLATE = """
{setup}
before = fds()
print("READY", flush=True)
try:
{call}
except KeyboardInterrupt:
    print("KI", flush=True)
{after}
    print("OK", flush=True)
    sys.exit(0)
print("RETURNED", flush=True)
sys.exit(3)
"""


def _indent(code: str) -> str:
    return textwrap.indent(textwrap.dedent(code).strip() or "pass", "    ")


class _Lines:
    """Lines of a child's stdout, each waited for with a bound (a child that ignores the
    signal must fail the test, not hang it)."""

    def __init__(self, fd: int) -> None:
        self.fd = fd
        self.buf = b""

    def next(self, timeout: float) -> str | None:
        deadline = time.monotonic() + timeout
        while b"\n" not in self.buf:
            left = deadline - time.monotonic()
            if left <= 0 or not select.select([self.fd], [], [], left)[0]:
                return None
            chunk = os.read(self.fd, 4096)
            if not chunk:
                return None
            self.buf += chunk
        line, self.buf = self.buf.split(b"\n", 1)
        return line.decode()


def run_interrupted(setup: str, call: str, after: str, sock_dir: Path) -> None:
    """Runs `setup`, then blocks in `call` in a child; SIGINT must raise KeyboardInterrupt
    there within INTERRUPT_BOUND, and `after` (assertions on the object's state) pass."""
    path = str(sock_dir / "s.sock")
    code = PRELUDE.format(tests=str(ROOT), path=path) + TEMPLATE.format(
        setup=textwrap.dedent(setup).strip(), call=_indent(call), after=_indent(after)
    )
    with tempfile.TemporaryFile() as errors:
        child = subprocess.Popen(
            [sys.executable, "-c", code], stdout=subprocess.PIPE, stderr=errors
        )
        assert child.stdout is not None
        lines = _Lines(child.stdout.fileno())

        def fail(why: str) -> None:
            if child.poll() is None:
                child.kill()
            child.wait()
            errors.seek(0)
            pytest.fail(f"{why}; child stderr:\n{errors.read().decode(errors='replace')}")

        try:
            if lines.next(30) != "READY":
                fail("the child did not get ready")
            time.sleep(0.3)  # let it block
            if child.poll() is not None:
                fail("the child did not block")
            sent = time.monotonic()
            child.send_signal(signal.SIGINT)
            line = lines.next(10)
            elapsed = time.monotonic() - sent
            if line != "KI":
                fail(f"no KeyboardInterrupt after SIGINT (got {line!r})")
            assert elapsed < INTERRUPT_BOUND, f"KeyboardInterrupt came {elapsed:.2f} s after SIGINT"
            if lines.next(10) != "OK" or child.wait(timeout=10) != 0:
                fail("the object was not left in the stated state")
        finally:
            if child.poll() is None:
                child.kill()
            child.wait()
            child.stdout.close()


def test_eventfd_read_is_interrupted_and_stays_usable(tmp_sock_dir: Path) -> None:
    run_interrupted(
        "e = EventFd()",
        "e.read()",
        """
        assert not e.closed
        e.write(5)
        assert e.read() == 5
        assert fds() == before
        """,
        tmp_sock_dir,
    )


def test_eventfd_wait_is_interrupted_and_stays_usable(tmp_sock_dir: Path) -> None:
    run_interrupted(
        "e = EventFd()",
        "e.wait()",
        """
        e.write(2)
        assert e.wait(1.0) is True
        assert e.try_read() == 2
        """,
        tmp_sock_dir,
    )


def test_frontend_accept_is_interrupted_and_unlinks_its_socket(tmp_sock_dir: Path) -> None:
    run_interrupted(
        "",
        "Frontend.accept(PATH)",
        """
        assert not os.path.exists(PATH)
        assert fds() == before
        """,
        tmp_sock_dir,
    )


def test_backend_listener_accept_is_interrupted_and_accepts_afterwards(
    tmp_sock_dir: Path,
) -> None:
    run_interrupted(
        "listener = BackendListener(PATH)",
        "listener.accept()",
        """
        client = socket.socket(socket.AF_UNIX)
        client.connect(PATH)
        session = listener.accept(timeout=5)
        session.close()
        client.close()
        assert fds() == before
        """,
        tmp_sock_dir,
    )


def test_serve_forever_is_interrupted_while_waiting_for_a_front_end(
    tmp_sock_dir: Path,
) -> None:
    run_interrupted(
        "listener = BackendListener(PATH)",
        "listener.serve_forever(Device)",
        """
        client = socket.socket(socket.AF_UNIX)
        client.connect(PATH)
        listener.accept(timeout=5).close()
        client.close()
        listener.close()
        assert not os.path.exists(PATH)
        """,
        tmp_sock_dir,
    )


def test_serve_forever_is_interrupted_while_serving_a_silent_front_end(
    tmp_sock_dir: Path,
) -> None:
    # The README's back-end example: a front-end connected and went quiet.
    run_interrupted(
        """
        listener = BackendListener(PATH)
        def connect_later():
            time.sleep(0.1)
            global client
            client = socket.socket(socket.AF_UNIX)
            client.connect(PATH)
        threading.Thread(target=connect_later, daemon=True).start()
        """,
        "listener.serve_forever(Device)",
        """
        # The session was closed: the front-end sees EOF.
        client.settimeout(5)
        assert client.recv(1) == b""
        client.close()
        """,
        tmp_sock_dir,
    )


def test_backend_session_serve_is_interrupted_and_closes_the_session(
    tmp_sock_dir: Path,
) -> None:
    run_interrupted(
        """
        listener = BackendListener(PATH)
        client = socket.socket(socket.AF_UNIX)
        client.connect(PATH)
        session = listener.accept(timeout=5)
        """,
        "session.serve(Device())",
        """
        assert session.closed
        client.settimeout(5)
        assert client.recv(1) == b""
        """,
        tmp_sock_dir,
    )


SILENT_BACKEND = """
import flood_backend
srv = flood_backend.SilentListener(PATH).srv
fe = Frontend.connect(PATH, timeout={timeout})
peer, _ = srv.accept()
"""


@pytest.mark.parametrize("timeout", [None, 60.0])
def test_frontend_request_is_interrupted_and_leaves_the_connection_closed(
    tmp_sock_dir: Path, timeout: float | None
) -> None:
    run_interrupted(
        SILENT_BACKEND.format(timeout=timeout),
        "fe.get_features()",
        """
        assert fe.broken
        try:
            fe.get_features()
        except ClosedError:
            pass
        else:
            raise AssertionError("an interrupted connection answered a later request")
        # The back-end sees the connection closed, so a late reply goes nowhere.
        peer.settimeout(5)
        data = peer.recv(64)
        assert peer.recv(64) == b"", data
        fe.close()
        """,
        tmp_sock_dir,
    )


def test_connect_to_a_full_backlog_is_interrupted(tmp_sock_dir: Path) -> None:
    run_interrupted(
        "import flood_backend; stuck = flood_backend.StuckListener(PATH)",
        "Frontend.connect(PATH, timeout=None)",
        "assert fds() == before",
        tmp_sock_dir,
    )


def test_frontend_channel_wait_for_a_request_is_interrupted(tmp_sock_dir: Path) -> None:
    run_interrupted(
        """
        import flood_backend
        backend = flood_backend.RawBackend(PATH, flood=False)
        fe = Frontend.connect(PATH, timeout=5)
        ch = flood_backend.open_channel(fe)
        """,
        "ch.process_one(FrontendRequestHandler())",
        "assert fds() == before",
        tmp_sock_dir,
    )


def test_probe_of_a_back_end_that_never_replies_ends_on_ctrl_c(tmp_sock_dir: Path) -> None:
    """The CLI's probe waits in a reply with a long timeout; SIGINT ends the process."""
    import socket  # noqa: PLC0415

    path = tmp_sock_dir / "s.sock"
    srv = socket.socket(socket.AF_UNIX)
    srv.bind(os.fspath(path))
    srv.listen(1)
    child = subprocess.Popen(
        [sys.executable, "-m", "vhost", "probe", os.fspath(path), "--timeout", "60"],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )
    try:
        srv.settimeout(10)
        peer, _ = srv.accept()
        peer.settimeout(10)
        assert peer.recv(12)  # the first request arrived: the probe now waits
        time.sleep(0.2)
        sent = time.monotonic()
        child.send_signal(signal.SIGINT)
        child.wait(timeout=10)
        assert time.monotonic() - sent < INTERRUPT_BOUND
        peer.close()
    finally:
        if child.poll() is None:
            child.kill()
        child.communicate()
        srv.close()


FLOOD_CHILD = """
import flood_backend
from vhost.errors import VhostError, VhostTimeoutError
backend = flood_backend.RawBackend(PATH, flood=True)
fe = Frontend.connect(PATH, timeout=5)
ch = flood_backend.open_channel(fe)
if {timeout} is not None:
    ch.set_timeout({timeout})
before = fds()
outcome = []
class Answers(FrontendRequestHandler):
    def config_change(self):
        return 0
def serve():
    try:
        while True:
            ch.process_one(Answers())
    except BaseException as exc:
        outcome.append(exc)
t = threading.Thread(target=serve, daemon=True)
t.start()
assert backend.channel_full.wait(20), "the back-end never filled the channel"
assert backend.sent > 0
# The process keeps running Python while the channel thread is stuck sending an ack.
ticks = 0
end = time.monotonic() + 0.3
while time.monotonic() < end:
    ticks += 1
    time.sleep(0.01)
assert ticks > 5
{ending}
t.join(10)
assert not t.is_alive(), "the channel thread is still stuck"
assert len(outcome) == 1 and isinstance(outcome[0], VhostError), outcome
{check}
fe.close()
ch.close()
print("OK", flush=True)
"""


@pytest.mark.parametrize(
    ("timeout", "ending", "check"),
    [
        # Another thread's documented close() wakes the stuck send.
        (None, "ch.close()", "assert ch.broken"),
        # Or the channel's own timeout ends it.
        ("0.5", "", "assert isinstance(outcome[0], VhostTimeoutError), outcome"),
    ],
)
def test_a_back_end_flooding_the_channel_does_not_freeze_the_front_end(
    tmp_sock_dir: Path, timeout: str | None, ending: str, check: str
) -> None:
    code = PRELUDE.format(tests=str(ROOT), path=str(tmp_sock_dir / "s.sock")) + FLOOD_CHILD.format(
        timeout=timeout, ending=ending, check=check
    )
    try:
        done = subprocess.run(
            [sys.executable, "-c", code], check=False, capture_output=True, text=True, timeout=60
        )
    except subprocess.TimeoutExpired as e:
        pytest.fail(f"the front-end process froze: {e.stdout!r} {e.stderr!r}")
    assert done.returncode == 0 and done.stdout.strip() == "OK", (done.stdout, done.stderr)


def test_ctrl_c_inside_a_handler_ends_serve(tmp_sock_dir: Path) -> None:
    """A KeyboardInterrupt raised while a Python handler runs is not a refusal to report
    and serve on: serve raises it (after NACKing the request) and closes the session."""
    import socket  # noqa: PLC0415
    import threading  # noqa: PLC0415

    from hostile import message  # noqa: PLC0415
    from vhost.codes import FrontendRequest  # noqa: PLC0415
    from vhost.user import BackendHandler, BackendListener  # noqa: PLC0415

    class Interrupted(BackendHandler):
        def get_features(self) -> int:
            raise KeyboardInterrupt

        def get_vring_base(self, index: int) -> int:
            return 0

    path = tmp_sock_dir / "s.sock"
    outcome: list[BaseException | None] = []
    with BackendListener(path) as listener:
        client = socket.socket(socket.AF_UNIX)
        client.connect(os.fspath(path))
        session = listener.accept(timeout=5)

        def serve() -> None:
            try:
                session.serve(Interrupted())
                outcome.append(None)
            except BaseException as exc:
                outcome.append(exc)

        t = threading.Thread(target=serve, daemon=True)
        t.start()
        client.sendall(message(FrontendRequest.GET_FEATURES))
        t.join(5)
        alive = t.is_alive()
        client.close()  # ends an old-style serve that went on waiting
        t.join(5)
    assert not alive, "serve went on after a KeyboardInterrupt in the handler"
    assert len(outcome) == 1 and isinstance(outcome[0], KeyboardInterrupt), outcome
    assert session.closed


def test_try_read_of_a_blocking_eventfd_never_blocks() -> None:
    """Documented as non-blocking; it blocked on a blocking EventFd with a zero counter."""
    child = """
from vhost import EventFd
e = EventFd()
assert e.try_read() is None
e.write(3)
assert e.try_read() == 3
assert e.try_read() is None
print("OK")
"""
    try:
        done = subprocess.run(
            [sys.executable, "-c", child], check=False, capture_output=True, text=True, timeout=30
        )
    except subprocess.TimeoutExpired:
        pytest.fail("try_read blocked")
    assert done.stdout.strip() == "OK", (done.stdout, done.stderr)
