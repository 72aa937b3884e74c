"""The CLI's one error path, tried as a user would: every failure is one line on stderr,
``error: ACTION PATH: REASON`` with a hint where one helps, with the documented exit status
(1 bad arguments or unusable inputs, 2 a failed request, 130 Ctrl-C), never a traceback;
an output pipe closed early (``| head``) ends the command quietly, as it does other Unix
tools. The back-ends are real: our ``serve blk``, qemu-storage-daemon, and
``tests/stuck_blk.py`` (our daemon with a device that never completes one sector)."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from importlib import metadata
from pathlib import Path

import pytest

import peers
from vhost.devices.blk import BlkDriver, BlkRequest
from vhost.errors import DisconnectedError

pytestmark = pytest.mark.timeout(120)

ROOT = Path(__file__).resolve().parent.parent
IMAGE_SIZE = 8 << 20
STUCK_OFFSET = 4096 * 512  # tests/stuck_blk.py's STUCK_SECTOR, in bytes


def cli(
    *args: str | Path, cwd: Path = ROOT, timeout: float = 60, argv0: list[str] | None = None
) -> subprocess.CompletedProcess[bytes]:
    return subprocess.run(
        [*(argv0 or [sys.executable, "-m", "vhost"]), *(str(a) for a in args)],
        capture_output=True,
        timeout=timeout,
        check=False,
        cwd=cwd,
        stdin=subprocess.DEVNULL,
    )


def err(out: subprocess.CompletedProcess[bytes]) -> str:
    return out.stderr.decode()


@pytest.fixture
def image(tmp_sock_dir: Path) -> Path:
    return peers.make_image(tmp_sock_dir / "disk.img", IMAGE_SIZE)


@pytest.fixture
def serve_blk(image: Path, tmp_sock_dir: Path) -> Iterator[peers.Peer]:
    sock = tmp_sock_dir / "blk.sock"
    argv = [sys.executable, "-m", "vhost", "serve", "blk", "--socket", str(sock),
            "--image", str(image)]  # fmt: skip
    with peers.spawn_peer("serve-blk", argv, sock) as peer:
        yield peer


@pytest.fixture
def stuck_blk(image: Path, tmp_sock_dir: Path) -> Iterator[peers.Peer]:
    sock = tmp_sock_dir / "stuck.sock"
    argv = [sys.executable, str(ROOT / "tests/stuck_blk.py"), str(sock), str(image)]
    with peers.spawn_peer("stuck-blk", argv, sock) as peer:
        yield peer


# --- connecting ----------------------------------------------------------------------

COMMANDS = {
    "probe": ["probe"],
    "probe --socket": ["probe", "--socket"],
    "blk info": ["blk", "info", "--socket"],
    "blk read": ["blk", "read", "--offset", "0", "--length", "512", "--socket"],
    "blk write": ["blk", "write", "--offset", "0", "--pattern", "1", "--socket"],
    "bench blk": ["bench", "blk", "--seconds", "0.1", "--socket"],
}


def _stale_socket(path: Path) -> None:
    s = socket.socket(socket.AF_UNIX)
    s.bind(str(path))
    s.close()  # bound, never listened: nobody accepts


@pytest.mark.parametrize("command", sorted(COMMANDS))
@pytest.mark.parametrize(
    ("kind", "reason", "hint"),
    [
        ("missing", "No such file or directory", "is the back-end running?"),
        ("no directory", "No such file or directory", "there is no directory"),
        ("regular file", "Connection refused", "it is a regular file, not a socket"),
        ("directory", "Connection refused", "it is a directory, not a socket"),
        ("stale socket", "Connection refused", "a stale socket"),
    ],
)
def test_a_socket_that_cannot_be_connected_is_named(
    command: str, kind: str, reason: str, hint: str, tmp_sock_dir: Path
) -> None:
    path = tmp_sock_dir / "blk.sock"
    if kind == "no directory":
        path = tmp_sock_dir / "gone" / "blk.sock"
    elif kind == "regular file":
        path.write_bytes(b"not a socket")
    elif kind == "directory":
        path.mkdir()
    elif kind == "stale socket":
        _stale_socket(path)
    out = cli(*COMMANDS[command], path)
    assert out.returncode == 1, err(out)
    line = f"error: connect to {path}: {reason} ("
    assert err(out).startswith(line) and hint in err(out), err(out)
    assert err(out).count("\n") == 1 and out.stdout == b""


def test_a_socket_path_too_long_for_an_address(tmp_sock_dir: Path) -> None:
    path = tmp_sock_dir / ("a" * 120 + ".sock")
    for command in ("probe", "blk info", "bench blk"):
        out = cli(*COMMANDS[command], path)
        assert out.returncode == 1
        assert err(out) == (
            f"error: connect to {path}: File name too long ({len(str(path))} bytes; a socket "
            "path holds at most 107)\n"
        )


def test_a_socket_in_an_unreadable_directory(tmp_sock_dir: Path) -> None:
    """Run without the capabilities that let root ignore permissions (bench blk used to
    die in a traceback from a stat before connecting)."""
    locked = tmp_sock_dir / "locked"
    locked.mkdir(mode=0)
    path = locked / "blk.sock"
    drop = ["setpriv", "--bounding-set=-dac_override,-dac_read_search"]
    for command in ("bench blk", "blk info", "probe"):
        out = cli(*COMMANDS[command], path, argv0=[*drop, sys.executable, "-m", "vhost"])
        assert out.returncode == 1, err(out)
        assert err(out) == (
            f"error: connect to {path}: Permission denied "
            "(check the permissions of the socket and of its directories)\n"
        )


# --- inputs and outputs --------------------------------------------------------------


def test_blk_write_input_that_cannot_be_read(tmp_sock_dir: Path) -> None:
    """Read before connecting (the socket does not exist): the input is what is named."""
    sock = tmp_sock_dir / "none.sock"
    missing = tmp_sock_dir / "missing.bin"
    out = cli("blk", "write", "--socket", sock, "--offset", "0", "--input", missing)
    assert (out.returncode, err(out)) == (1, f"error: read {missing}: No such file or directory\n")
    out = cli("blk", "write", "--socket", sock, "--offset", "0", "--input", tmp_sock_dir)
    assert (out.returncode, err(out)) == (1, f"error: read {tmp_sock_dir}: Is a directory\n")


def test_blk_read_output_is_checked_before_the_read(
    serve_blk: peers.Peer, tmp_sock_dir: Path
) -> None:
    out_path = tmp_sock_dir / "gone" / "out.bin"
    # With no back-end at all the output is still what fails: it is opened first.
    out = cli("blk", "read", "--socket", tmp_sock_dir / "none.sock", "--offset", "0",
              "--length", "512", "--output", out_path)  # fmt: skip
    assert out.returncode == 1
    assert err(out) == (
        f"error: open {out_path}: No such file or directory "
        f"(there is no directory {out_path.parent})\n"
    )
    out = cli("blk", "read", "--socket", serve_blk.socket_path, "--offset", "0",
              "--length", "512", "--output", tmp_sock_dir)  # fmt: skip
    assert (out.returncode, err(out)) == (1, f"error: open {tmp_sock_dir}: Is a directory\n")
    # A read that fails leaves no output file behind; one that works writes it whole.
    target = tmp_sock_dir / "out.bin"
    out = cli("blk", "read", "--socket", serve_blk.socket_path, "--offset", str(IMAGE_SIZE),
              "--length", "512", "--output", target)  # fmt: skip
    assert out.returncode == 1 and "runs past the end of the disk" in err(out)
    assert not target.exists()
    target.write_bytes(b"x" * 100_000)
    out = cli("blk", "read", "--socket", serve_blk.socket_path, "--offset", "0",
              "--length", "1024", "--output", target)  # fmt: skip
    assert out.returncode == 0, err(out)
    assert target.read_bytes() == bytes(1024)


def test_blk_read_output_dash_is_stdout(serve_blk: peers.Peer, tmp_sock_dir: Path) -> None:
    data = os.urandom(2048)
    src = tmp_sock_dir / "in.bin"
    src.write_bytes(data)
    sock = serve_blk.socket_path
    out = cli("blk", "write", "--socket", sock, "--offset", "4k", "--input", src)
    assert out.returncode == 0, err(out)
    work = tmp_sock_dir / "cwd"
    work.mkdir()
    out = cli("blk", "read", "--socket", sock, "--offset", "4k", "--length", "2k",
              "--output", "-", cwd=work)  # fmt: skip
    assert out.returncode == 0, err(out)
    assert out.stdout == data
    assert list(work.iterdir()) == []  # no file named "-"


@pytest.mark.parametrize("target", ["/dev/null", "fifo"])
def test_blk_read_output_to_a_device_or_a_fifo(
    serve_blk: peers.Peer, tmp_sock_dir: Path, target: str
) -> None:
    """Only a regular file is truncated: ftruncate on /dev/null or a FIFO failed (EINVAL)."""
    sock = serve_blk.socket_path
    data = os.urandom(4096)
    src = tmp_sock_dir / "in.bin"
    src.write_bytes(data)
    assert cli("blk", "write", "--socket", sock, "--offset", "0", "--input", src).returncode == 0
    if target == "/dev/null":
        out = cli("blk", "read", "--socket", sock, "--offset", "0", "--length", "4k",
                  "--output", "/dev/null")  # fmt: skip
        assert out.returncode == 0, err(out)
        return
    fifo = tmp_sock_dir / "out.fifo"
    os.mkfifo(fifo)
    proc = subprocess.Popen(
        [sys.executable, "-m", "vhost", "blk", "read", "--socket", str(sock), "--offset", "0",
         "--length", "4k", "--output", str(fifo)],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, stdin=subprocess.DEVNULL, cwd=ROOT,
    )  # fmt: skip
    try:
        with open(fifo, "rb") as reader:
            got = reader.read()
        _, stderr = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate()
    assert proc.returncode == 0, stderr.decode()
    assert got == data


def test_output_dash_read_partly_dies_by_sigpipe(serve_blk: peers.Peer) -> None:
    """``blk read --output - | head -c 10``: the reader leaves after 10 bytes. The command
    must not exit 0 with its output cut short; it dies by SIGPIPE (141 in a shell)."""
    args = ["blk", "read", "--socket", str(serve_blk.socket_path), "--offset", "0",
            "--length", "1m", "--output", "-"]  # fmt: skip
    assert _reader_leaves(args, read_first=10) == (b"", -signal.SIGPIPE)


def _reader_leaves(args: list[str], read_first: int) -> tuple[bytes, int]:
    """Runs a command whose stdout reader takes ``read_first`` bytes and goes away;
    returns its stderr and exit status."""
    proc = subprocess.Popen(
        [sys.executable, "-m", "vhost", *args],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, stdin=subprocess.DEVNULL, cwd=ROOT,
    )  # fmt: skip
    assert proc.stdout is not None and proc.stderr is not None
    try:
        assert len(proc.stdout.read(read_first)) == read_first
        proc.stdout.close()
        stderr = proc.stderr.read()
        proc.wait(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        proc.stderr.close()
    return stderr, proc.returncode


def test_output_pipe_closed_early_is_quiet(serve_blk: peers.Peer) -> None:
    """``probe ... | head`` and ``blk read ... | head``: the reader is gone before the
    command writes; it stops as Unix tools do (SIGPIPE), saying nothing."""
    sock = str(serve_blk.socket_path)
    for args in (
        ["probe", sock],
        ["blk", "read", "--socket", sock, "--offset", "0", "--length", "1m"],
        ["blk", "read", "--socket", sock, "--offset", "0", "--length", "1m", "--output", "-"],
        ["blk", "info", "--socket", sock, "--json"],
    ):
        stderr, status = _reader_leaves(args, read_first=0)
        assert stderr == b"", (args, stderr.decode())
        assert status == -signal.SIGPIPE, args
    assert serve_blk.alive()


# --- exit statuses -------------------------------------------------------------------


def test_a_write_to_a_read_only_device_is_status_2_everywhere(
    image: Path, tmp_sock_dir: Path
) -> None:
    sock = str(tmp_sock_dir / "ro.sock")
    with peers.qemu_storage_daemon_blk(image, Path(sock), writable=False):
        for args in (
            ["blk", "write", "--socket", sock, "--offset", "0", "--pattern", "1"],
            ["bench", "blk", "--socket", sock, "--rw", "write", "--seconds", "0.1"],
            ["bench", "blk", "--socket", sock, "--rw", "randwrite", "--engine", "python",
             "--seconds", "0.1"],
        ):  # fmt: skip
            out = cli(*args)
            assert out.returncode == 2, (args, err(out))
            assert err(out) == (
                f"error: write to {sock}: the device is read-only (VIRTIO_BLK_F_RO); "
                "nothing was sent\n"
            ), args


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["probe"], "error: probe needs the back-end's socket"),
        (["probe", "a.sock", "--socket", "b.sock"], "error: two different sockets given"),
        (["probe", "a.sock", "--timeout", "0"], "--timeout: must be a positive number of seconds"),
        (["probe", "a.sock", "--timeout", "-1"], "--timeout: must be a positive number"),
        (["probe", "a.sock", "--device", "gpu"], "--device: invalid choice: 'gpu'"),
        (["blk"], "error: blk: the following arguments are required: COMMAND"),
        (["blk", "read", "--socket", "a.sock", "--offset", "0"], "required: --length"),
        (["blk", "read", "--socket", "a.sock", "--offset", "-512", "--length", "512"],
         "--offset: negative byte count: '-512'"),
        (["blk", "info", "--socket", "a.sock", "--timeout", "0"], "--timeout: must be a positive"),
        (["blk", "write", "--socket", "a.sock", "--offset", "0", "--pattern", "256"],
         "--pattern: a byte is 0..255: '256'"),
        (["bench", "blk", "--socket", "a.sock", "--iodepth", "x"], "--iodepth: not a number: 'x'"),
        (["frobnicate"], "invalid choice: 'frobnicate'"),
        ([], "error: the following arguments are required: COMMAND"),
    ],
)  # fmt: skip
def test_bad_arguments_exit_1(args: list[str], message: str, tmp_sock_dir: Path) -> None:
    """Usage errors exit with 1 as documented (argparse's own errors exited with 2, the
    status of a failed request), before anything is connected to, in one line like every
    other error: ``error: COMMAND: MESSAGE (see --help)``, not argparse's usage block."""
    out = cli(*args, cwd=tmp_sock_dir)
    assert out.returncode == 1, err(out)
    assert message in err(out) and "Traceback" not in err(out) and "connect" not in err(out)
    assert err(out).startswith("error: ") and err(out).count("\n") == 1, err(out)
    assert "usage:" not in err(out)
    if message.startswith(("error: probe", "error: two")):
        return  # probe's own checks, not argparse's
    command = " ".join(a for a in args[:2] if not a.startswith("-") and "." not in a)
    if command in ("blk read", "blk write", "blk info", "bench blk", "probe", "blk"):
        assert err(out).startswith(f"error: {command}: "), err(out)
    assert err(out).endswith(" (see --help)\n"), err(out)


@pytest.mark.parametrize(
    ("args", "line"),
    [
        (["read", "--offset", "0", "--length", "0"],
         "error: blk read: argument --length: must be more than 0 bytes: '0' (see --help)"),
        (["write", "--offset", "0", "--length", "0", "--pattern", "1"],
         "error: blk write: argument --length: must be more than 0 bytes: '0' (see --help)"),
        (["read", "--offset", "0", "--length", "1000000000000T"],
         "error: blk read: argument --length: too large: '1000000000000T' (at most 8 EiB) "
         "(see --help)"),
        (["read", "--offset", "1T", "--length", "512"], None),
    ],
)  # fmt: skip
def test_lengths_of_zero_or_too_large(
    args: list[str], line: str | None, tmp_sock_dir: Path
) -> None:
    """A zero --length did nothing and exited 0; 1000000000000T was 'not a byte count'.
    (1T is a byte count: it gets as far as connecting.)"""
    sock = tmp_sock_dir / "none.sock"
    out = cli("blk", *args, "--socket", sock)
    assert out.returncode == 1, err(out)
    if line is None:
        assert err(out).startswith(f"error: connect to {sock}: "), err(out)
    else:
        assert err(out) == line + "\n"


def test_input_not_whole_sectors_names_the_input(serve_blk: peers.Peer, tmp_sock_dir: Path) -> None:
    """No --length was given: the input's size is what is wrong, and --length is the fix."""
    sock = serve_blk.socket_path
    src = tmp_sock_dir / "odd.bin"
    src.write_bytes(os.urandom(1000))
    out = cli("blk", "write", "--socket", sock, "--offset", "0", "--input", src)
    assert (out.returncode, err(out)) == (1, (
        f"error: read {src}: its size, 1000 bytes, is not a multiple of 512 "
        "(--length 512 writes its first 512 bytes; or pad it)\n"
    ))  # fmt: skip
    out = subprocess.run(
        [sys.executable, "-m", "vhost", "blk", "write", "--socket", str(sock), "--offset", "0",
         "--input", "-"],
        input=b"hello\n", capture_output=True, timeout=60, check=False, cwd=ROOT,
    )  # fmt: skip
    assert (out.returncode, err(out)) == (1, (
        "error: read standard input: its size, 6 bytes, is not a multiple of 512 (pad it)\n"
    ))  # fmt: skip
    out = cli("blk", "write", "--socket", sock, "--offset", "0", "--input", src, "--length", "512")
    assert out.returncode == 0, err(out)
    assert serve_blk.alive()


def test_blk_info_says_what_it_was_doing(image: Path, tmp_sock_dir: Path) -> None:
    """A back-end that takes no ring blk tries: info names its own step, not the queue
    set-up of read and write."""
    sock = tmp_sock_dir / "tiny.sock"
    argv = [sys.executable, "-m", "vhost", "serve", "blk", "--socket", str(sock),
            "--image", str(image), "--queue-size", "4"]  # fmt: skip
    with peers.spawn_peer("serve-blk", argv, sock):
        out = cli("blk", "info", "--socket", sock)
    assert out.returncode == 2, err(out)
    assert err(out).startswith(
        f"error: read the disk's configuration from {sock}: SET_VRING_NUM refused"
    ), err(out)


def test_a_connect_timeout_keeps_the_library_reason(tmp_sock_dir: Path) -> None:
    """A listener whose backlog is full never takes the connection: the library says so,
    and the CLI passes that on (it printed only 'Connection timed out'); a request not
    answered is exit status 2."""
    path = tmp_sock_dir / "full.sock"
    listener = socket.socket(socket.AF_UNIX)
    waiting: list[socket.socket] = []
    try:
        listener.bind(str(path))
        listener.listen(0)
        for _ in range(3):
            c = socket.socket(socket.AF_UNIX)
            waiting.append(c)
            c.setblocking(False)
            with contextlib.suppress(BlockingIOError):  # queued in the backlog
                c.connect(str(path))
        commands: list[list[str | Path]] = [["probe", path], ["blk", "info", "--socket", path]]
        for args in commands:
            out = cli(*args, "--timeout", "1")
            assert out.returncode == 2, err(out)
            assert err(out) == (
                f"error: connect to {path}: the listener did not take the connection within "
                "1 s: its backlog is full (is the back-end stuck, not accepting?)\n"
            )
    finally:
        for c in waiting:
            c.close()
        listener.close()


def test_driver_wait_notices_the_back_end_going_away(stuck_blk: peers.Peer) -> None:
    """The API, not only the CLI: a wait for a completion ends when the back-end dies."""
    with BlkDriver.connect(stuck_blk.socket_path, queue_size=64, timeout=10) as disk:
        (tag,) = disk.submit([BlkRequest.read(STUCK_OFFSET, 512)])
        _wait_for_stuck(stuck_blk)
        os.killpg(stuck_blk.pid, signal.SIGKILL)
        t = time.monotonic()
        with pytest.raises(DisconnectedError, match="closed the connection"):
            disk.wait()
        assert time.monotonic() - t < 3
        assert tag == 0


def test_ctrl_c_while_waiting_for_a_completion(stuck_blk: peers.Peer) -> None:
    proc = subprocess.Popen(
        [sys.executable, "-m", "vhost", "blk", "read", "--socket", str(stuck_blk.socket_path),
         "--offset", str(STUCK_OFFSET), "--length", "512"],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, stdin=subprocess.DEVNULL, cwd=ROOT,
    )  # fmt: skip
    try:
        _wait_for_stuck(stuck_blk)
        t = time.monotonic()
        proc.send_signal(signal.SIGINT)
        _, stderr = proc.communicate(timeout=30)
        took = time.monotonic() - t
    finally:
        _reap(proc)
    assert proc.returncode == 130, stderr.decode()
    assert stderr.decode() == "error: interrupted\n"
    assert took < 5, f"Ctrl-C took {took:.1f} s (the request timeout is 10 s)"


# --- a back-end that goes away -------------------------------------------------------


def _wait_for_stuck(peer: peers.Peer, timeout: float = 30) -> None:
    deadline = time.monotonic() + timeout
    while "STUCK" not in peer.output():
        assert time.monotonic() < deadline, peer.output()
        assert peer.alive(), peer.output()
        time.sleep(0.02)


def _reap(proc: subprocess.Popen[bytes]) -> None:
    if proc.poll() is None:
        proc.kill()
    proc.communicate()


def _killed_while_running(peer: peers.Peer, args: list[str], stuck: bool) -> tuple[str, float]:
    """Runs the CLI, SIGKILLs the back-end once a request is in flight (``stuck``: the
    device holds one) or after a second of load; returns stderr and how long the CLI
    took to notice."""
    proc = subprocess.Popen(
        [sys.executable, "-m", "vhost", *args],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, stdin=subprocess.DEVNULL, cwd=ROOT,
    )  # fmt: skip
    try:
        if stuck:
            _wait_for_stuck(peer)
        else:
            time.sleep(1.5)
            assert proc.poll() is None, proc.communicate()
        os.killpg(peer.pid, signal.SIGKILL)
        t = time.monotonic()
        _, stderr = proc.communicate(timeout=30)
        took = time.monotonic() - t
    finally:
        _reap(proc)
    assert proc.returncode == 2, stderr.decode()
    return stderr.decode(), took


def test_blk_read_notices_the_back_end_going_away(stuck_blk: peers.Peer) -> None:
    sock = str(stuck_blk.socket_path)
    args = ["blk", "read", "--socket", sock, "--offset", str(STUCK_OFFSET), "--length", "512"]
    stderr, took = _killed_while_running(stuck_blk, args, stuck=True)
    assert stderr == (
        f"error: read from {sock}: the back-end closed the connection (1 request(s) in flight)\n"
    )
    assert took < 3, f"noticed after {took:.1f} s (the request timeout is 10 s)"


@pytest.mark.parametrize("engine", ["native", "python"])
def test_bench_notices_the_back_end_going_away(stuck_blk: peers.Peer, engine: str) -> None:
    sock = str(stuck_blk.socket_path)
    args = ["bench", "blk", "--socket", sock, "--rw", "read", "--offset", str(STUCK_OFFSET),
            "--size", "4k", "--iodepth", "1", "--seconds", "60", "--engine", engine]  # fmt: skip
    stderr, took = _killed_while_running(stuck_blk, args, stuck=True)
    assert stderr.startswith(f"error: run the load on {sock}: the back-end closed the connection")
    assert took < 3, f"noticed after {took:.1f} s (the request timeout is 10 s)"


def test_bench_notices_serve_blk_killed_under_load(serve_blk: peers.Peer) -> None:
    sock = str(serve_blk.socket_path)
    args = ["bench", "blk", "--socket", sock, "--seconds", "60", "--json"]
    stderr, took = _killed_while_running(serve_blk, args, stuck=False)
    assert "the back-end closed the connection" in stderr, stderr
    assert took < 3, f"noticed after {took:.1f} s (the request timeout is 10 s)"


# --- help ----------------------------------------------------------------------------

HELP_PAGES = [
    [], ["probe"], ["demo"], ["blk"], ["blk", "info"], ["blk", "read"], ["blk", "write"],
    ["bench"], ["bench", "blk"], ["serve"], ["serve", "blk"], ["serve", "rng"],
]  # fmt: skip


@pytest.mark.parametrize("page", HELP_PAGES, ids=lambda p: " ".join(p) or "top")
def test_help_is_plain_text(page: list[str]) -> None:
    out = cli(*page, "--help")
    assert out.returncode == 0, err(out)
    text = out.stdout.decode()
    assert text.startswith("usage: python -m vhost")
    for markup in ("``", ":class:", ":func:", ":meth:", ":mod:", ":data:"):
        assert markup not in text, (markup, text)


def test_every_page_says_what_it_does_and_every_option_has_a_help_line() -> None:
    """serve blk and serve rng had no description; bench blk's --rw and --engine had no
    help line, and its description a dangling cross-reference ("generation number;
    pattern)")."""
    for page in (["serve", "blk"], ["serve", "rng"]):
        text = " ".join(cli(*page, "--help").stdout.decode().split())
        assert "SIGINT (Ctrl-C) or SIGTERM" in text and "exits with status 0" in text, page
        assert "0 stopped by SIGINT (Ctrl-C) or SIGTERM: a server's normal stop" in text, page
        assert "1 bad arguments" in text, page
    text = " ".join(cli("serve", "blk", "--help").stdout.decode().split())
    assert "The image must be raw" in text and "locked the way QEMU locks it" in text
    assert "--no-lock takes no locks" in text and "--readonly --force-share" in text
    text = " ".join(cli("serve", "--help").stdout.decode().split())
    assert "with exit status 0: that is a server's normal stop" in text
    text = cli("bench", "blk", "--help").stdout.decode()
    assert "pattern)" not in text and "generation number;" not in text
    flat = " ".join(text.split())
    assert "--rw {read,write,randread,randwrite} access pattern (default randread)" in flat
    assert "--engine {native,python} native: the Rust loop (default)" in flat


def test_top_level_help_lists_whole_sentences_and_exit_statuses() -> None:
    text = cli("--help").stdout.decode()
    assert "  1    bad arguments or unusable inputs" in text
    assert "  2    a request failed" in text
    assert "  3    data did not verify" in text
    assert "  130  interrupted (Ctrl-C)" in text
    listing = " ".join(text.split())
    assert "blk be the virtio-blk driver of any vhost-user-blk back-end: info, read, write" in (
        listing
    )
    assert "probe report what any vhost-user back-end offers" in listing


def test_installed_script_names_itself_and_has_a_version() -> None:
    script = Path(sys.executable).parent / "pyvhost"
    out = cli("--help", argv0=[str(script)])
    assert out.returncode == 0 and out.stdout.decode().startswith("usage: pyvhost ")
    out = cli("--version", argv0=[str(script)])
    assert (out.returncode, out.stdout.decode()) == (0, f"pyvhost {metadata.version('pyvhost')}\n")
    out = cli("--version")
    assert out.stdout.decode() == f"python -m vhost {metadata.version('pyvhost')}\n"


def test_probe_json_still_parses_with_socket_option(serve_blk: peers.Peer) -> None:
    out = cli("probe", "--socket", serve_blk.socket_path, "--json")
    assert out.returncode == 0, err(out)
    assert json.loads(out.stdout)["device"] == "blk"


def test_readme_lists_the_exit_statuses_of_help() -> None:
    """The README's table and ``--help``'s agree on every status and its first words."""
    help_rows = {}
    for line in cli("--help").stdout.decode().splitlines():
        words = line.split()
        if len(words) > 1 and words[0].isdigit():
            help_rows[int(words[0])] = " ".join(words[1:3])
    readme = (ROOT / "README.md").read_text()
    readme_rows = {}
    for line in readme.splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if len(cells) == 2 and cells[0].isdigit():
            readme_rows[int(cells[0])] = " ".join(cells[1].replace(":", "").split()[:2])
    assert set(help_rows) == set(readme_rows) == {0, 1, 2, 3, 130}
    assert help_rows == readme_rows
