"""``serve``'s errors: a socket path it cannot use and bad arguments each give exit status
1 and one line ``error: <action> <path>: <reason>`` (no traceback, no errno EIO), and
nothing at the path is harmed.
"""

from __future__ import annotations

import socket
import subprocess
import sys
from pathlib import Path

import pytest

from daemon_util import ServeProc, make_image
from vhost.devices.blk import BlkDriver
from vhost.user import Frontend, Listener

pytestmark = pytest.mark.timeout(120)

MiB = 1 << 20


@pytest.fixture
def image(tmp_sock_dir: Path) -> Path:
    path = tmp_sock_dir / "disk.img"
    make_image(path, MiB)
    return path


def serve_error(*args: str | Path) -> str:
    proc = subprocess.run(
        [sys.executable, "-m", "vhost", "serve", *map(str, args)],
        check=False,
        capture_output=True,
        text=True,
        timeout=30,
        stdin=subprocess.DEVNULL,
    )
    assert proc.returncode == 1, (proc.returncode, proc.stdout, proc.stderr)
    assert "Traceback" not in proc.stderr and proc.stdout == "", proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), proc.stderr
    return lines[0]


@pytest.mark.parametrize("kind", ["file", "directory"])
@pytest.mark.parametrize("device", ["blk", "rng"])
def test_a_non_socket_at_the_path_is_not_replaced(
    tmp_sock_dir: Path, image: Path, kind: str, device: str
) -> None:
    path = tmp_sock_dir / "taken"
    if kind == "file":
        path.write_bytes(b"precious")
    else:
        path.mkdir()
    extra = ["--image", str(image)] if device == "blk" else []
    line = serve_error(device, "--socket", path, *extra)
    assert line == (
        f"error: listen on {path}: a file that is not a socket exists there; it is not replaced"
    )
    assert path.read_bytes() == b"precious" if kind == "file" else path.is_dir()


def test_a_live_socket_is_not_taken_over(tmp_sock_dir: Path, image: Path) -> None:
    first = ServeProc(["rng"], tmp_sock_dir / "live.sock", tmp_sock_dir / "log")
    try:
        other = tmp_sock_dir / "other.img"
        make_image(other, MiB)
        line = serve_error("blk", "--socket", first.socket_path, "--image", other)
        assert line == f"error: listen on {first.socket_path}: another server is listening there"
        assert first.alive()
    finally:
        first.close()
    # A blk back-end on the path keeps serving while another one is refused.
    blk = ServeProc(["blk", "--image", str(image)], tmp_sock_dir / "b.sock", tmp_sock_dir / "l2")
    try:
        serve_error("rng", "--socket", blk.socket_path)
        with BlkDriver.connect(blk.socket_path, timeout=10.0) as d:
            assert d.read(0, 512) == bytes(512)
    finally:
        blk.close()


def test_socket_paths_too_long_or_in_a_missing_directory(tmp_sock_dir: Path) -> None:
    long_path = tmp_sock_dir / ("x" * (120 - len(str(tmp_sock_dir))))
    n = len(str(long_path))
    assert serve_error("rng", "--socket", long_path) == (
        f"error: listen on {long_path}: the path is {n} bytes; a Unix socket path must be "
        "shorter than 108 bytes"
    )
    missing = tmp_sock_dir / "nope" / "s.sock"
    assert serve_error("rng", "--socket", missing) == (
        f"error: listen on {missing}: No such file or directory"
    )


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--poll-us", "-5"], "--poll-us must be 0 or more microseconds, not -5"),
        (["--poll-us", str(10**20)], f"--poll-us {10**20} is more than 1000 seconds"),
        (["--queues", "0"], "--queues must be between 1 and 256, not 0"),
        (["--queues", "100000"], "--queues must be between 1 and 256, not 100000"),
        (["--queue-size", "2"], "--queue-size must be between 3 and 32768, not 2"),
        (["--queue-size", "65536"], "--queue-size must be between 3 and 32768, not 65536"),
        (["--force-share"], "--force-share needs --readonly"),
        (
            ["--postcopy-fault-timeout", "-1"],
            "--postcopy-fault-timeout must be between 0 and 1000000 seconds, not -1.0",
        ),
        (
            ["--postcopy-fault-timeout", "nan"],
            "--postcopy-fault-timeout must be between 0 and 1000000 seconds, not nan",
        ),
    ],
    ids=[
        "poll-negative",
        "poll-huge",
        "no-queue",
        "many-queues",
        "tiny-ring",
        "huge-ring",
        "force-share-writable",
        "postcopy-bound-negative",
        "postcopy-bound-nan",
    ],
)
def test_bad_arguments(tmp_sock_dir: Path, image: Path, args: list[str], message: str) -> None:
    sock = tmp_sock_dir / "s.sock"
    line = serve_error("blk", "--socket", sock, "--image", image, *args)
    assert line.startswith(f"error: {message}"), line
    assert not sock.exists()


def test_bad_poll_for_rng(tmp_sock_dir: Path) -> None:
    line = serve_error("rng", "--socket", tmp_sock_dir / "s", "--poll-us", "-1")
    assert line == "error: --poll-us must be 0 or more microseconds, not -1"


@pytest.mark.parametrize("device", ["blk", "rng"])
def test_client_on_a_path_no_front_end_can_listen_on(
    tmp_sock_dir: Path, image: Path, device: str
) -> None:
    """``--client`` printed "serving ..." and retried for ever on a regular file, a
    directory or a path in a missing directory; now it is refused at once."""
    extra = ["--image", str(image)] if device == "blk" else []
    afile = tmp_sock_dir / "file"
    afile.write_bytes(b"data")
    adir = tmp_sock_dir / "dir"
    adir.mkdir()
    missing = tmp_sock_dir / "gone" / "fe.sock"
    for path, reason in (
        (afile, "it is a regular file, not a socket"),
        (adir, "it is a directory, not a socket"),
        (missing, f"No such file or directory (there is no directory {missing.parent})"),
    ):
        line = serve_error(device, "--client", "--socket", path, *extra)
        assert line == f"error: connect to {path}: {reason}"
    assert afile.read_bytes() == b"data" and adir.is_dir()


@pytest.mark.parametrize("stale", [False, True])
def test_client_waits_for_a_front_end_and_says_so(
    tmp_sock_dir: Path, image: Path, stale: bool
) -> None:
    """A missing or stale socket is where a front-end will listen (QEMU server=on): the
    banner says serve is waiting for it, not that it serves; it says so once connected;
    SIGTERM ends the wait with status 0 (a server's normal stop)."""
    sock = tmp_sock_dir / "fe.sock"
    if stale:
        with socket.socket(socket.AF_UNIX) as s:
            s.bind(str(sock))
    proc = ServeProc(["blk", "--client", "--image", str(image)], sock, tmp_sock_dir / "log")
    try:
        assert proc.banner == (
            f"waiting for a front-end to listen on {sock}, to serve blk (native, "
            f"{MiB // 512} sectors, 1 queue(s))\n"
        )
        if stale:
            assert proc.terminate() == 0, proc.stderr()
            assert proc.stderr() == "stopped after 0 session(s)\n"
            return
        with Listener(sock) as listener:
            fe = Frontend(listener.accept_frontend(timeout=10.0))
            with BlkDriver(fe) as d:
                d.write(0, b"\x05" * 512)
                assert proc.proc.stdout is not None
                assert proc.proc.stdout.readline().decode() == (
                    f"connected to {sock}: serving blk (native, {MiB // 512} sectors, 1 queue(s))\n"
                )
        assert proc.proc.wait(10) == 0, proc.stderr()
    finally:
        proc.close()
    assert image.read_bytes()[:512] == b"\x05" * 512


def test_client_stops_while_the_front_end_backlog_is_full(tmp_sock_dir: Path, image: Path) -> None:
    """`serve blk --client` retries a front-end that never accepts; each try is bounded, so
    SIGTERM stops it at once (an unbounded connect on a full backlog used to hang it)."""
    import signal  # noqa: PLC0415
    import time  # noqa: PLC0415

    from flood_backend import StuckListener  # noqa: PLC0415

    path = str(tmp_sock_dir / "fe.sock")
    stuck = StuckListener(path)
    try:
        proc = subprocess.Popen(
            [sys.executable, "-m", "vhost", "serve", "blk", "--client", "--socket", path,
             "--image", str(image)],
            stdout=subprocess.PIPE, stderr=subprocess.PIPE,
        )  # fmt: skip
        try:
            assert proc.stdout is not None
            assert proc.stdout.readline().decode().startswith("waiting")
            time.sleep(0.5)  # in the retry loop, connecting into the full backlog
            start = time.monotonic()
            proc.send_signal(signal.SIGTERM)
            assert proc.wait(timeout=10) == 0, proc.stderr.read() if proc.stderr else ""
            assert time.monotonic() - start < 3
        finally:
            proc.kill()
            proc.communicate()  # reaps it and closes both pipes (else a ResourceWarning)
    finally:
        stuck.close()
