"""The stall timeout bounds a whole message, and a stop interrupts one being read
(issue 10, hardening): a front-end that trickles a message one byte at a time cannot keep
the daemon (SO_RCVTIMEO restarts with every byte) nor a ``stop()``/SIGTERM waiting.
Front-ends whose messages arrive whole are covered by the existing daemon tests."""

from __future__ import annotations

import signal
import threading
import time
from pathlib import Path

import pytest

import hostile
from daemon_util import MiB, ServeProc, make_image, wait_for
from test_daemon_events import events_until_end
from test_daemon_lifetime import io_works
from vhost.codes import FrontendRequest as Req
from vhost.daemon import BlkDevice, Daemon, SessionEnd

pytestmark = pytest.mark.timeout(60)


class Trickler:
    """A raw front-end sending a GET_FEATURES header one byte every ``every`` seconds,
    until the daemon hangs up or the header is out."""

    def __init__(self, path: Path | str, every: float) -> None:
        self.sock = hostile.connect(path)
        self.every = every
        self.first_byte = threading.Event()
        self.sent = 0
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        for byte in hostile.header(Req.GET_FEATURES):
            try:
                self.sock.send(bytes([byte]))
            except OSError:
                return
            self.sent += 1
            self.first_byte.set()
            time.sleep(self.every)

    def close(self) -> None:
        self._thread.join(10)
        self.sock.close()


def test_trickled_header_is_a_stall(tmp_sock_dir: Path) -> None:
    """12 bytes at 150 ms each take 1.65 s; every byte comes well within the 200 ms stall
    timeout, the message does not: the session ends stalled, soon, and the next
    front-end is served."""
    with Daemon(BlkDevice.ram(MiB), tmp_sock_dir / "t.sock", stall_timeout=0.2) as daemon:
        trickler = Trickler(daemon.path, 0.15)
        try:
            assert trickler.first_byte.wait(5)
            t0 = time.monotonic()
            end = events_until_end(daemon, 1)[-1]
            took = time.monotonic() - t0
            assert end.end is SessionEnd.STALLED, end
            assert took < 1.5, f"the trickled message kept the session {took:.2f} s"
            assert trickler.sent < 12, "the whole header went out before the daemon hung up"
            assert hostile.sees_eof(trickler.sock, 2.0)
        finally:
            trickler.close()
        io_works(daemon.path)


def test_stop_interrupts_a_trickled_message(tmp_sock_dir: Path) -> None:
    """With a long stall timeout the trickle could go on for 30 s; ``stop()`` ends the
    session at once, as stopped."""
    daemon = Daemon(BlkDevice.ram(MiB), tmp_sock_dir / "s.sock", stall_timeout=30.0).start()
    trickler = Trickler(daemon.path, 0.4)
    try:
        assert trickler.first_byte.wait(5)
        assert wait_for(lambda: daemon.active)
        time.sleep(0.3)  # the daemon is inside the header now
        t0 = time.monotonic()
        daemon.stop()
        took = time.monotonic() - t0
        assert took < 2.0, f"stop() waited {took:.2f} s for the trickled message"
        assert not daemon.running
        ends = [e for e in daemon.next_events(0) if e.end is not None]
        assert [e.end for e in ends] == [SessionEnd.STOPPED], ends
    finally:
        daemon.stop()
        trickler.close()


def test_sigterm_stops_serve_blk_while_a_message_trickles(tmp_sock_dir: Path) -> None:
    """``serve blk`` keeps its 5 s default stall timeout; a header at 0.4 s a byte takes
    4.4 s, and SIGTERM must not wait for it."""
    image = tmp_sock_dir / "disk.img"
    make_image(image, MiB)
    proc = ServeProc(["blk", "--image", str(image)], tmp_sock_dir / "b.sock", tmp_sock_dir / "log")
    trickler = None
    try:
        assert wait_for(lambda: proc.catches(signal.SIGTERM))
        trickler = Trickler(proc.socket_path, 0.4)
        assert trickler.first_byte.wait(5)
        time.sleep(0.5)
        t0 = time.monotonic()
        assert proc.terminate(signal.SIGTERM) == 0, proc.stderr()
        took = time.monotonic() - t0
        assert took < 2.0, f"SIGTERM waited {took:.2f} s for the trickled message"
        assert trickler.sent < 12
        assert "Traceback" not in proc.stderr()
        assert not proc.socket_path.exists()
    finally:
        if trickler is not None:
            trickler.close()
        proc.close()


def test_message_arriving_whole_after_a_pause_is_served(tmp_sock_dir: Path) -> None:
    """Only a message in progress is bounded: a header split in two halves 50 ms apart is
    served under a 200 ms stall timeout."""
    with Daemon(BlkDevice.ram(MiB), tmp_sock_dir / "w.sock", stall_timeout=0.2) as daemon:
        sock = hostile.connect(daemon.path)
        with sock:
            head = hostile.header(Req.GET_FEATURES)
            for _ in range(3):
                time.sleep(0.5)  # idle between messages is no stall
                hostile.send(sock, head[:5])
                time.sleep(0.05)
                hostile.send(sock, head[5:])
                reply = hostile.recv_message(sock)
                assert reply is not None and reply.code == Req.GET_FEATURES
            assert daemon.active


def test_stop_interrupts_a_reply_nobody_reads(tmp_sock_dir: Path) -> None:
    """A front-end that sends requests and never reads the replies blocks the daemon in a
    send, bounded by a 30 s stall timeout here: ``stop()`` does not wait for it."""
    daemon = Daemon(BlkDevice.ram(MiB), tmp_sock_dir / "r.sock", stall_timeout=30.0).start()
    sock = hostile.connect(daemon.path)
    try:
        sock.setblocking(False)
        burst = hostile.message(Req.GET_FEATURES) * 100
        blocked_since = None
        deadline = time.monotonic() + 20
        # Our sends block for good once the daemon stops reading: it is stuck in a send.
        while blocked_since is None or time.monotonic() - blocked_since < 0.5:
            assert time.monotonic() < deadline, "the daemon kept reading"
            try:
                sock.send(burst)
                blocked_since = None
            except BlockingIOError:
                blocked_since = blocked_since or time.monotonic()
                time.sleep(0.01)
        assert daemon.active
        t0 = time.monotonic()
        daemon.stop()
        took = time.monotonic() - t0
        assert took < 2.0, f"stop() waited {took:.2f} s for a reply send"
        ends = [e for e in daemon.next_events(0) if e.end is not None]
        assert [e.end for e in ends] == [SessionEnd.STOPPED], ends
    finally:
        daemon.stop()
        sock.close()
