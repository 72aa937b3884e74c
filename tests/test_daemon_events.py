"""The daemon says why: sessions, refused requests and how each session ended are reported
as events (``Daemon.next_events``, ``serve_forever(on_event=...)``), and ``serve`` prints
them: every one with ``-v``, and without it one line for a session that ended on an error
or after a refusal. The QEMU case of the issue (guest RAM not shared: "vhost start
failed" on QEMU's side) is run with a real QEMU.
"""

from __future__ import annotations

import math
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

import hostile
from daemon_util import ServeProc, make_image, wait_for
from peers import find_binary
from vhost import EventFd
from vhost.codes import FrontendRequest as Req
from vhost.daemon import BlkDevice, Daemon, DaemonEvent, EventKind, SessionEnd
from vhost.errors import InvalidParamError, RequestRefusedError
from vhost.types import VringConfig
from vhost.user import Frontend

pytestmark = pytest.mark.timeout(120)

MiB = 1 << 20


def events_until_end(daemon: Daemon, session: int = 1, timeout: float = 10.0) -> list[DaemonEvent]:
    """The events up to and including the end of ``session``."""
    seen: list[DaemonEvent] = []
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        seen += daemon.next_events(0.2)
        if any(e.kind is EventKind.SESSION_ENDED and e.session == session for e in seen):
            return seen
    raise AssertionError(f"session {session} did not end: {seen}")


def early_kick(path: Path | str) -> None:
    """The README's old example: a kick fd before any ring address. Refused, and the
    session goes on."""
    with Frontend.connect(path, timeout=10.0) as fe:
        fe.negotiate()
        with pytest.raises(RequestRefusedError):
            fe.set_vring_kick(0, EventFd())
        assert fe.get_features() & (1 << 32)


def test_refusal_and_close_are_reported_in_order(tmp_sock_dir: Path) -> None:
    with Daemon(BlkDevice.ram(MiB), tmp_sock_dir / "b.sock") as daemon:
        early_kick(daemon.path)
        events = events_until_end(daemon)
    assert [e.kind for e in events] == [
        EventKind.SESSION_STARTED,
        EventKind.REFUSED,
        EventKind.SESSION_ENDED,
    ], events
    refused, ended = events[1], events[2]
    assert refused.request == "SET_VRING_KICK" and refused.error
    assert refused.reason is not None and "ring started before SET_VRING_ADDR" in refused.reason
    assert str(refused).startswith("session 1: SET_VRING_KICK refused: ")
    assert ended.end is SessionEnd.CLOSED and not ended.error
    assert str(ended) == "session 1 ended: the front-end closed the connection"


def test_ring_without_shared_memory_is_refused_with_the_memory_hint(tmp_sock_dir: Path) -> None:
    """A ring set up with no guest memory shared (what QEMU does without a shared memory
    backend): the refusal says how to share guest RAM."""
    with Daemon(BlkDevice.ram(MiB), tmp_sock_dir / "b.sock") as daemon:
        with Frontend.connect(daemon.path, timeout=10.0) as fe:
            fe.negotiate()
            fe.set_vring_num(0, 256)
            fe.set_vring_addr(0, VringConfig(256, 256, 0, 0x10000, 0x11000, 0x12000))
            with pytest.raises(RequestRefusedError):
                fe.set_vring_kick(0, EventFd())
        events = events_until_end(daemon)
    refused = [e for e in events if e.kind is EventKind.REFUSED]
    assert len(refused) == 1, events
    assert refused[0].reason is not None and "not backed by guest memory" in refused[0].reason
    assert refused[0].hint is not None and "memory-backend-memfd" in refused[0].hint
    assert "share=on" in refused[0].hint


def test_stall_and_protocol_error_end_sessions_with_their_reason(tmp_sock_dir: Path) -> None:
    with Daemon(BlkDevice.ram(MiB), tmp_sock_dir / "b.sock", stall_timeout=0.3) as daemon:
        with socket.socket(socket.AF_UNIX) as s:
            s.connect(daemon.path)
            s.sendall(hostile.header(Req.GET_FEATURES)[:7])
            stalled = events_until_end(daemon, 1)[-1]
        with socket.socket(socket.AF_UNIX) as s:
            s.connect(daemon.path)
            s.sendall(hostile.header(Req.GET_FEATURES, flags=0x2))  # version 2
            failed = events_until_end(daemon, 2)[-1]
    assert stalled.end is SessionEnd.STALLED and stalled.error, stalled
    assert str(stalled) == "session 1 ended: the front-end stalled inside a message"
    assert failed.end is SessionEnd.FAILED and failed.error, failed
    assert failed.reason is not None and "header" in failed.reason, failed


def test_serve_forever_hands_events_to_the_callback(tmp_sock_dir: Path) -> None:
    got: list[DaemonEvent] = []
    daemon = Daemon(BlkDevice.ram(MiB), tmp_sock_dir / "b.sock")
    thread = threading.Thread(target=daemon.serve_forever, kwargs={"on_event": got.append})
    thread.start()
    try:
        assert wait_for(lambda: daemon.running and (tmp_sock_dir / "b.sock").exists())
        early_kick(daemon.path)
        assert wait_for(lambda: any(e.kind is EventKind.SESSION_ENDED for e in got))
    finally:
        daemon.stop()
        thread.join(10)
    assert [e.kind for e in got] == [
        EventKind.SESSION_STARTED,
        EventKind.REFUSED,
        EventKind.SESSION_ENDED,
    ]


def test_uncollected_events_are_bounded(tmp_sock_dir: Path) -> None:
    """A daemon nobody watches keeps only the latest 1024 events and counts the rest."""
    with Daemon(BlkDevice.ram(MiB), tmp_sock_dir / "b.sock") as daemon:
        with Frontend.connect(daemon.path, timeout=10.0) as fe:
            fe.negotiate()
            for _ in range(1100):
                with pytest.raises(RequestRefusedError):
                    fe.set_vring_kick(0, None)
        assert wait_for(lambda: daemon.sessions_ended == 1)
        events = daemon.next_events()
    # 1 start + 1100 refusals + 1 end = 1102 events, of which the oldest 78 are gone.
    assert len(events) == 1024 and daemon.events_dropped == 78
    assert events[-1].kind is EventKind.SESSION_ENDED
    assert all(e.kind is EventKind.REFUSED for e in events[:-1])


# -- what `serve` prints -----------------------------------------------------------------


@pytest.fixture
def image(tmp_sock_dir: Path) -> Path:
    path = tmp_sock_dir / "disk.img"
    make_image(path, 4 * MiB)
    return path


@pytest.mark.parametrize("verbose", [False, True], ids=["quiet", "verbose"])
def test_serve_prints_the_refusal(tmp_sock_dir: Path, image: Path, verbose: bool) -> None:
    args = ["blk", "--image", str(image), *(["-v"] if verbose else [])]
    proc = ServeProc(args, tmp_sock_dir / "s", tmp_sock_dir / "log")
    try:
        early_kick(proc.socket_path)
        assert wait_for(lambda: "ended" in proc.stderr(), 10), proc.stderr()
        # A clean session prints nothing without -v.
        with Frontend.connect(proc.socket_path, timeout=10.0) as fe:
            fe.negotiate()
        if verbose:
            assert wait_for(lambda: "session 2 ended" in proc.stderr(), 10), proc.stderr()
        else:
            time.sleep(0.3)
        lines = proc.stderr().splitlines()
    finally:
        proc.close()
    refusal = "SET_VRING_KICK refused: invalid parameter: ring started before SET_VRING_ADDR"
    if verbose:
        assert lines == [
            "session 1: front-end connected",
            f"session 1: {refusal}",
            "session 1 ended: the front-end closed the connection",
            "session 2: front-end connected",
            "session 2 ended: the front-end closed the connection",
        ], lines
    else:
        assert lines == [
            f"session 1 ended: the front-end closed the connection, after: {refusal}"
        ], lines


def test_qemu_without_shared_memory_is_explained(tmp_sock_dir: Path, image: Path) -> None:
    """The issue's QEMU line without a shared memory backend: QEMU says only "vhost start
    failed"; serve (without -v) says why and how to fix it. SeaBIOS drives the disk, so
    no guest kernel is needed."""
    proc = ServeProc(["blk", "--image", str(image)], tmp_sock_dir / "s", tmp_sock_dir / "log")
    log_path = tmp_sock_dir / "qemu.log"
    qemu_log = open(log_path, "wb")  # noqa: SIM115 - closed in the finally below
    qemu = subprocess.Popen(
        [
            str(find_binary("qemu-system-x86_64")),
            "-M", "q35", "-m", "256M", "-nodefaults", "-nographic", "-display", "none",
            "-serial", "none",
            "-chardev", f"socket,id=c0,path={proc.socket_path}",
            "-device", "vhost-user-blk-pci,chardev=c0",
        ],
        stdout=qemu_log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
    )

    def qemu_said() -> str:
        return log_path.read_text(errors="replace")

    try:
        assert wait_for(lambda: "ended" in proc.stderr(), 60), proc.stderr()
        # QEMU may print its failure after the daemon has logged the session's end.
        wait_for(lambda: "vhost start failed" in qemu_said(), 30)
    finally:
        qemu.kill()
        qemu.wait(30)
        qemu_log.close()
        qemu_out = qemu_said()
        err = proc.stderr()
        proc.close()
    assert "vhost start failed" in qemu_out, qemu_out
    assert "session 1 ended: SET_VRING_" in err, err
    assert "not backed by guest memory" in err, err
    assert "memory-backend-memfd,id=mem,size=RAM,share=on" in err, err
    assert len(err.strip().splitlines()) == 1, err


def test_client_mode_session_failure_is_said_once(tmp_sock_dir: Path) -> None:
    """``serve --client``: the front-end breaks the protocol, serve says why in one line
    and exits with 1 (the session was the whole daemon)."""
    path = tmp_sock_dir / "fe.sock"
    with socket.socket(socket.AF_UNIX) as listener:
        listener.bind(str(path))
        listener.listen(1)
        listener.settimeout(30)
        proc = subprocess.Popen(
            [sys.executable, "-m", "vhost", "serve", "rng", "--client", "--socket", str(path)],
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, stdin=subprocess.DEVNULL,
        )
        try:
            conn, _ = listener.accept()
            with conn:
                conn.sendall(hostile.header(Req.GET_FEATURES, flags=0x2))  # version 2
                out, err = proc.communicate(timeout=30)
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.communicate()
    assert proc.returncode == 1, (out, err)
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("session 1 ended: invalid message header"), err


def test_daemon_arguments_are_checked(tmp_sock_dir: Path) -> None:
    """A negative poll is the caller's InvalidParamError, not an OverflowError."""
    with pytest.raises(InvalidParamError, match=r"^Daemon: poll_us: -5 is out of range"):
        Daemon(BlkDevice.ram(MiB), tmp_sock_dir / "b.sock", poll_us=-5)
    # The bounds: a number of seconds (the glue's one conversion), more than 0 (the core's
    # DaemonSettings::check); each refusal names the setting.
    for kwargs, words in (
        ({"stall_timeout": 0}, "stall_timeout must be a positive number of seconds"),
        ({"stall_timeout": -1.0}, "stall_timeout must be a finite number of seconds"),
        ({"stall_timeout": math.inf}, "stall_timeout must be a finite number of seconds"),
        ({"postcopy_fault_timeout": 0}, "postcopy_fault_timeout must be more than 0"),
        ({"postcopy_fault_timeout": -1.0}, "postcopy_fault_timeout must be a number"),
    ):
        with pytest.raises(InvalidParamError, match=words):
            Daemon(BlkDevice.ram(MiB), tmp_sock_dir / "b.sock", **kwargs)
