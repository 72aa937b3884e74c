"""Real vhost-user peers for the tests: start them, wait for them, stop them.

Every peer is a real program from Debian or crates.io, never a stand-in:

* :func:`qemu_storage_daemon_blk` - a vhost-user-blk back-end exporting an image;
* :func:`virtiofsd` - the Rust virtiofsd, a vhost-user-fs back-end;
* :func:`dpdk_testpmd_net` - DPDK's testpmd with its vhost PMD, a vhost-user-net back-end;
* :func:`qemu_vhost_user_blk` - ``qemu-system-x86_64 -S`` (TCG) as a vhost-user-blk
  front-end, with a :class:`Qmp` client to ask it about its state.

Each is a context manager that starts the program in its own process group,
on a Unix socket in a directory the caller gives (keep it short: ``sun_path`` is
108 bytes), waits until the socket exists, and on exit kills the whole group,
reaps it and removes the socket. If the program dies before its socket
appears, or does not create it in time, the test fails with the program's
stderr. A missing binary fails the test too (:func:`find_binary`): peer tests
are never skipped - ``make setup`` installs everything.

:class:`VhostUserRelay` is a listening socket of the test's own that forwards a
front-end's connection (bytes and passed file descriptors) to a real back-end
and records the requests it saw: proof that a front-end really connected.
"""

from __future__ import annotations

import contextlib
import json
import os
import selectors
import shutil
import signal
import socket
import struct
import subprocess
import tempfile
import threading
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any

import pytest

from vhost.testing.qemu import program_version

START_TIMEOUT = 30.0
STOP_TIMEOUT = 10.0

VIRTIOFSD_CANDIDATES = (
    Path.home() / ".cache/pyvhost/virtiofsd/bin/virtiofsd",
    Path("/usr/lib/qemu/virtiofsd"),
    Path("/usr/libexec/virtiofsd"),
)


# --- binaries -------------------------------------------------------------------


def locate_binary(name: str, candidates: Sequence[Path] = ()) -> Path | None:
    """Return the first executable among ``candidates`` then ``$PATH``, or None."""
    for cand in candidates:
        if cand.is_file() and os.access(cand, os.X_OK):
            return cand
    found = shutil.which(name)
    return Path(found) if found else None


def find_binary(name: str, candidates: Sequence[Path] = ()) -> Path:
    """Like :func:`locate_binary`, but fail the test (never skip) when it is missing."""
    path = locate_binary(name, candidates)
    if path is None:
        where = ", ".join(str(c) for c in candidates) or "-"
        pytest.fail(
            f"peer binary {name!r} not found (looked in {where} and $PATH); "
            "run `make setup` (scripts/setup.sh) to install it",
            pytrace=False,
        )
    return path


def find_virtiofsd() -> Path:
    """The virtiofsd binary: setup.sh's cargo install, $PATH, then QEMU 7.2's C one."""
    path = locate_binary("virtiofsd", VIRTIOFSD_CANDIDATES[:1])
    return path if path is not None else find_binary("virtiofsd", VIRTIOFSD_CANDIDATES)


def binary_version(path: Path) -> str:
    """First line of ``path --version`` (for report headers)."""
    return program_version(path)


# --- process handling -----------------------------------------------------------


@dataclass
class Peer:
    """A running peer program."""

    name: str
    argv: list[str]
    proc: subprocess.Popen[bytes]
    socket_path: Path
    log_path: Path
    returncode: int | None = field(default=None)

    @property
    def pid(self) -> int:
        return self.proc.pid

    def output(self) -> str:
        """Everything the peer has written to stdout/stderr so far."""
        try:
            return self.log_path.read_text(errors="replace")
        except OSError:
            return ""

    def alive(self) -> bool:
        return self.proc.poll() is None


def _qemu_escape(value: str | os.PathLike[str]) -> str:
    """Escape a value for QEMU's key=value,... option syntax (commas double)."""
    return os.fspath(value).replace(",", ",,")


def _fail_with_output(peer: Peer, why: str) -> None:
    out = peer.output().strip() or "(no output)"
    pytest.fail(
        f"{peer.name} {why}\n  argv: {' '.join(peer.argv)}\n  output:\n{out}",
        pytrace=False,
    )


def _stop(peer: Peer, timeout: float = STOP_TIMEOUT) -> None:
    """SIGTERM the peer's process group, SIGKILL it if it lingers, reap, unlink socket."""
    proc = peer.proc
    for sig in (signal.SIGTERM, signal.SIGKILL):
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(proc.pid, sig)
        try:
            proc.wait(timeout)
            break
        except subprocess.TimeoutExpired:
            continue
    else:
        proc.wait()
    if proc.stdin is not None:  # the keep_stdin pipe; left open it is a ResourceWarning
        with contextlib.suppress(OSError):
            proc.stdin.close()
    peer.returncode = proc.returncode
    with contextlib.suppress(FileNotFoundError):
        peer.socket_path.unlink()


def _wait_for_socket(peer: Peer, path: Path, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while True:
        if path.is_socket():
            return
        if peer.proc.poll() is not None:
            _fail_with_output(
                peer, f"exited with status {peer.proc.returncode} before creating {path}"
            )
        if time.monotonic() >= deadline:
            _fail_with_output(peer, f"did not create {path} within {timeout:.0f}s")
        time.sleep(0.01)


@contextlib.contextmanager
def spawn_peer(
    name: str,
    argv: Sequence[str],
    socket_path: Path,
    *,
    wait_for: Path | None = None,
    timeout: float = START_TIMEOUT,
    keep_stdin: bool = False,
) -> Iterator[Peer]:
    """Run ``argv`` in a new session, wait for ``wait_for`` (default: ``socket_path``).
    ``keep_stdin``: stdin is a pipe left open (for a program that exits at end of input)."""
    socket_path = Path(socket_path)
    wait_path = socket_path if wait_for is None else Path(wait_for)
    if len(os.fsencode(socket_path)) >= 108:
        pytest.fail(f"socket path too long for sun_path: {socket_path}", pytrace=False)
    with contextlib.suppress(FileNotFoundError):
        wait_path.unlink()
    log: IO[bytes] = tempfile.NamedTemporaryFile(  # noqa: SIM115 (kept for the peer's life)
        prefix=f"{name}-", suffix=".log", dir=socket_path.parent, delete=False
    )
    argv = [str(a) for a in argv]
    try:
        proc = subprocess.Popen(
            argv,
            stdin=subprocess.PIPE if keep_stdin else subprocess.DEVNULL,
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    except OSError as exc:
        log.close()
        pytest.fail(f"cannot start {name}: {exc}", pytrace=False)
    peer = Peer(name, argv, proc, socket_path, Path(log.name))
    try:
        _wait_for_socket(peer, wait_path, timeout)
        yield peer
    finally:
        _stop(peer)
        if wait_path != socket_path:
            with contextlib.suppress(FileNotFoundError):
                wait_path.unlink()
        log.close()
        with contextlib.suppress(FileNotFoundError):
            Path(log.name).unlink()


# --- images ---------------------------------------------------------------------


def make_image(path: Path, size_bytes: int, pattern: bytes | None = None) -> Path:
    """Create a sparse raw image of ``size_bytes``.

    With ``pattern``, every 4 KiB block ``i`` starts with ``pattern`` followed by
    ``i`` as a little-endian u64, so reads can be checked for the right offset;
    without it the image is all holes (reads as zeros).
    """
    if size_bytes <= 0 or size_bytes % 512:
        raise ValueError("image size must be a positive multiple of 512")
    with open(path, "wb") as f:
        f.truncate(size_bytes)
        if pattern:
            block = 4096
            for i in range(0, size_bytes // block):
                f.seek(i * block)
                f.write((pattern + struct.pack("<Q", i))[:block])
    return path


# --- peers ----------------------------------------------------------------------


@contextlib.contextmanager
def qemu_storage_daemon_blk(
    image_path: Path,
    socket_path: Path,
    writable: bool = True,
    num_queues: int = 1,
    *,
    locking: bool = True,
    timeout: float = START_TIMEOUT,
) -> Iterator[Peer]:
    """qemu-storage-daemon exporting ``image_path`` as vhost-user-blk on ``socket_path``.

    ``locking=False`` (``locking=off``) lets a second daemon export the same image, as
    the source and destination back-ends of a live migration must."""
    binary = find_binary("qemu-storage-daemon")
    argv = [
        str(binary),
        "--blockdev",
        f"driver=file,node-name=f0,filename={_qemu_escape(image_path)}"
        + ("" if locking else ",locking=off"),
        "--export",
        "type=vhost-user-blk,id=e0,node-name=f0,addr.type=unix,"
        f"addr.path={_qemu_escape(socket_path)},writable={'on' if writable else 'off'},"
        f"num-queues={num_queues}",
    ]
    with spawn_peer("qemu-storage-daemon", argv, Path(socket_path), timeout=timeout) as peer:
        yield peer


def _is_c_virtiofsd(binary: Path) -> bool:
    """QEMU 7.2's C virtiofsd takes ``-o source=``; the Rust one ``--shared-dir``."""
    out = subprocess.run(
        [str(binary), "--help"],
        capture_output=True,
        text=True,
        timeout=10,
        check=False,
        stdin=subprocess.DEVNULL,
    )
    return "--shared-dir" not in out.stdout + out.stderr


@contextlib.contextmanager
def virtiofsd(
    shared_dir: Path,
    socket_path: Path,
    *,
    sandbox: str = "none",
    extra_args: Sequence[str] = (),
    timeout: float = START_TIMEOUT,
) -> Iterator[Peer]:
    """virtiofsd serving ``shared_dir`` on ``socket_path``.

    ``sandbox="none"`` works everywhere (``namespace`` and ``chroot`` also work as
    root on this project's machines). virtiofsd serves one connection and exits
    when its front-end disconnects.
    """
    binary = find_virtiofsd()
    if _is_c_virtiofsd(binary):
        argv = [
            str(binary),
            f"--socket-path={socket_path}",
            "-o",
            f"source={shared_dir}",
            "-o",
            "cache=none",
        ]
        if sandbox == "none":
            argv += ["-o", "sandbox=chroot"]
    else:
        argv = [
            str(binary),
            f"--socket-path={socket_path}",
            f"--shared-dir={shared_dir}",
            f"--sandbox={sandbox}",
            "--cache=never",
        ]
    argv += list(extra_args)
    with spawn_peer("virtiofsd", argv, Path(socket_path), timeout=timeout) as peer:
        yield peer


@contextlib.contextmanager
def dpdk_testpmd_net(socket_path: Path, *, timeout: float = START_TIMEOUT) -> Iterator[Peer]:
    """DPDK testpmd (Debian ``dpdk-dev``) with a vhost-user-net port (the vhost PMD,
    server mode) on ``socket_path``, forwarding on one queue pair. It runs without
    hugepages or PCI devices; its stdin stays open, since testpmd exits at end of input."""
    binary = find_binary("dpdk-testpmd")
    socket_path = Path(socket_path)
    prefix = f"pyvhost-{os.getpid()}-{socket_path.parent.name}"
    argv = [
        str(binary), "-l", "0,1", "--no-huge", "-m", "1024", "--no-pci",
        f"--file-prefix={prefix}", "--vdev", f"net_vhost0,iface={socket_path},queues=1",
        "--", "--nb-cores=1", "--total-num-mbufs=4096",
    ]  # fmt: skip
    try:
        with spawn_peer("dpdk-testpmd", argv, socket_path, timeout=timeout, keep_stdin=True) as p:
            yield p
    finally:
        shutil.rmtree(f"/var/run/dpdk/{prefix}", ignore_errors=True)


class QmpError(Exception):
    """QMP answered with an error or broke the protocol."""


class Qmp:
    """A minimal synchronous QMP client (JSON lines over a Unix socket)."""

    def __init__(self, path: Path, timeout: float = START_TIMEOUT) -> None:
        self._sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
        self._sock.settimeout(timeout)
        self._sock.connect(os.fspath(path))
        self._file = self._sock.makefile("rb")
        self.events: list[dict[str, Any]] = []
        greeting = self._read()
        if "QMP" not in greeting:
            raise QmpError(f"no QMP greeting: {greeting}")
        self.command("qmp_capabilities")

    def _read(self) -> dict[str, Any]:
        line = self._file.readline()
        if not line:
            raise QmpError("QMP connection closed")
        msg: dict[str, Any] = json.loads(line)
        return msg

    def command(self, name: str, **arguments: Any) -> Any:
        """Run ``name`` and return its ``return`` value; raise :class:`QmpError` on error."""
        req: dict[str, Any] = {"execute": name}
        if arguments:
            req["arguments"] = arguments
        self._sock.sendall(json.dumps(req).encode() + b"\n")
        while True:
            msg = self._read()
            if "event" in msg:
                self.events.append(msg)
                continue
            if "error" in msg:
                raise QmpError(f"{name}: {msg['error']}")
            return msg.get("return")

    def query_status(self) -> str:
        """The VM's run state: ``prelaunch``, ``paused``, ``running``, ..."""
        status = self.command("query-status")
        return str(status["status"])

    def close(self) -> None:
        self._file.close()
        self._sock.close()

    def __enter__(self) -> Qmp:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


@dataclass
class QemuPeer:
    """A running ``qemu-system-x86_64`` and the path of its QMP socket."""

    peer: Peer
    qmp_path: Path

    @property
    def proc(self) -> subprocess.Popen[bytes]:
        return self.peer.proc

    def qmp(self, timeout: float = START_TIMEOUT) -> Qmp:
        """A new QMP connection (use it as a context manager)."""
        return Qmp(self.qmp_path, timeout)

    def query_status(self, timeout: float = START_TIMEOUT) -> str:
        with self.qmp(timeout) as q:
            return q.query_status()


@contextlib.contextmanager
def qemu_vhost_user_blk(
    socket_path: Path,
    extra_args: Sequence[str] = (),
    *,
    mem_size: str = "256M",
    num_queues: int = 1,
    qmp_path: Path | None = None,
    timeout: float = START_TIMEOUT,
) -> Iterator[QemuPeer]:
    """QEMU (TCG, stopped with ``-S``) with a vhost-user-blk-pci device on ``socket_path``.

    QEMU connects to ``socket_path`` and runs the vhost-user handshake while it
    realizes the device, so a back-end must be listening (and answering) there
    first. The context is entered once the QMP socket exists.
    """
    binary = find_binary("qemu-system-x86_64")
    socket_path = Path(socket_path)
    qmp = Path(qmp_path) if qmp_path is not None else socket_path.with_suffix(".qmp")
    argv = [
        str(binary),
        "-S",
        "-M",
        "q35",
        "-nodefaults",
        "-nographic",
        "-display",
        "none",
        "-m",
        mem_size,
        "-object",
        f"memory-backend-memfd,id=mem,size={mem_size},share=on",
        "-M",
        "memory-backend=mem",
        "-chardev",
        f"socket,id=c0,path={_qemu_escape(socket_path)}",
        "-device",
        f"vhost-user-blk-pci,chardev=c0,num-queues={num_queues}",
        "-qmp",
        f"unix:{_qemu_escape(qmp)},server=on,wait=off",
        *extra_args,
    ]
    with spawn_peer("qemu-system-x86_64", argv, qmp, timeout=timeout) as peer:
        yield QemuPeer(peer, qmp)


# --- a socket of the test's own -------------------------------------------------

_HEADER = struct.Struct("<III")


class VhostUserRelay:
    """Listen on ``listen_path``; forward the first connection to ``backend_path``.

    Bytes and SCM_RIGHTS file descriptors are forwarded both ways by a thread.
    ``accepted`` is set when a front-end connected, and ``requests`` lists the
    request codes of the front-end's messages, in order.
    """

    def __init__(self, listen_path: Path, backend_path: Path, timeout: float = START_TIMEOUT):
        self.listen_path = Path(listen_path)
        self.backend_path = Path(backend_path)
        self.timeout = timeout
        self.accepted = threading.Event()
        self.requests: list[int] = []
        self.error: BaseException | None = None
        self._stop = threading.Event()
        self._listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
        with contextlib.suppress(FileNotFoundError):
            self.listen_path.unlink()
        self._listener.bind(os.fspath(self.listen_path))
        self._listener.listen(1)
        self._listener.settimeout(0.1)
        self._thread = threading.Thread(target=self._run, name="vhost-user-relay", daemon=True)

    def __enter__(self) -> VhostUserRelay:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(STOP_TIMEOUT)
        self._listener.close()
        with contextlib.suppress(FileNotFoundError):
            self.listen_path.unlink()

    def _run(self) -> None:
        try:
            deadline = time.monotonic() + self.timeout
            while not self._stop.is_set():
                try:
                    front, _ = self._listener.accept()
                    break
                except TimeoutError:
                    if time.monotonic() >= deadline:
                        return
            else:
                return
            self.accepted.set()
            with front, socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as back:
                back.connect(os.fspath(self.backend_path))
                self._pump(front, back)
        except BaseException as exc:  # reported to the test through self.error
            self.error = exc

    def _pump(self, front: socket.socket, back: socket.socket) -> None:
        sel = selectors.DefaultSelector()
        sel.register(front, selectors.EVENT_READ, back)
        sel.register(back, selectors.EVENT_READ, front)
        pending = b""
        with sel:
            while not self._stop.is_set():
                for key, _ in sel.select(0.1):
                    src: socket.socket = key.fileobj  # type: ignore[assignment]
                    dst: socket.socket = key.data
                    data, fds, _flags, _addr = socket.recv_fds(src, 65536, 32)
                    if not data:
                        return
                    try:
                        sent = socket.send_fds(dst, [data], fds) if fds else 0
                        dst.sendall(data[sent:])
                    finally:
                        for fd in fds:
                            os.close(fd)
                    if src is front:
                        pending = self._record(pending + data)

    def _record(self, buf: bytes) -> bytes:
        while len(buf) >= _HEADER.size:
            request, _flags, size = _HEADER.unpack_from(buf)
            if len(buf) < _HEADER.size + size:
                break
            self.requests.append(request)
            buf = buf[_HEADER.size + size :]
        return buf
