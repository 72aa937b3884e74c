"""``serve``'s errors: a socket path it cannot use and bad arguments each give exit status
1 and one line ``error: <action> <path>: <reason>`` (no traceback, no errno EIO), and
nothing at the path is harmed.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from daemon_util import ServeProc, make_image
from vhost.devices.blk import BlkDriver

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
        check=False, capture_output=True, text=True, timeout=30, stdin=subprocess.DEVNULL,
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
        f"error: listen on {path}: a file that is not a socket exists there; "
        "it is not replaced"
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
    ],
    ids=["poll-negative", "poll-huge", "no-queue", "many-queues", "tiny-ring", "huge-ring",
         "force-share-writable"],
)
def test_bad_arguments(tmp_sock_dir: Path, image: Path, args: list[str], message: str) -> None:
    sock = tmp_sock_dir / "s.sock"
    line = serve_error("blk", "--socket", sock, "--image", image, *args)
    assert line.startswith(f"error: {message}"), line
    assert not sock.exists()


def test_bad_poll_for_rng(tmp_sock_dir: Path) -> None:
    line = serve_error("rng", "--socket", tmp_sock_dir / "s", "--poll-us", "-1")
    assert line == "error: --poll-us must be 0 or more microseconds, not -1"
