"""A pure-Python vhost-user front-end client: the benchmark reference.

Written from the vhost-user specification with nothing but :mod:`socket` and
:mod:`struct`, it is deliberately independent of the ``vhost`` package: the
tests use it to check that the real peers (qemu-storage-daemon, virtiofsd)
speak the protocol before any native code is involved, and the benchmarks use
it as the "plain Python" reference that the Rust core is compared against.

Wire format (all fields little-endian on x86):

* header, 12 bytes: ``u32 request``, ``u32 flags``, ``u32 size`` (body bytes);
  flags bits 0-1 hold the version (1), bit 2 is REPLY, bit 3 is NEED_REPLY;
* GET_FEATURES (1) and GET_PROTOCOL_FEATURES (15), GET_QUEUE_NUM (17): empty
  body, the reply carries one ``u64``;
* SET_FEATURES (2) and SET_PROTOCOL_FEATURES (16): body is one ``u64``;
* SET_OWNER (3): empty body;
* SET_VRING_NUM (8): body ``u32 index, u32 num``; when the REPLY_ACK protocol
  feature (bit 3) is negotiated and NEED_REPLY is set, the back-end answers
  with a ``u64`` (0 = success);
* GET_CONFIG (24): body ``u32 offset, u32 size, u32 flags`` followed by
  ``size`` payload bytes; the reply has the same layout.

Run as a script it times round trips against a back-end socket (or against a
qemu-storage-daemon it starts itself) and states where it ran; see
``benches/README.md``.
"""

from __future__ import annotations

import argparse
import contextlib
import errno
import os
import shutil
import socket
import statistics
import struct
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass

# --- protocol constants -------------------------------------------------------

VERSION = 0x1
FLAG_REPLY = 0x4
FLAG_NEED_REPLY = 0x8
VERSION_MASK = 0x3

GET_FEATURES = 1
SET_FEATURES = 2
SET_OWNER = 3
SET_VRING_NUM = 8
GET_PROTOCOL_FEATURES = 15
SET_PROTOCOL_FEATURES = 16
GET_QUEUE_NUM = 17
GET_CONFIG = 24

# virtio feature bits (u64 from GET_FEATURES)
VIRTIO_F_VERSION_1 = 1 << 32
VHOST_USER_F_PROTOCOL_FEATURES = 1 << 30

# protocol feature bits (u64 from GET_PROTOCOL_FEATURES)
PROTOCOL_F_MQ = 1 << 0
PROTOCOL_F_REPLY_ACK = 1 << 3
PROTOCOL_F_CONFIG = 1 << 9

HEADER = struct.Struct("<III")
U64 = struct.Struct("<Q")
VRING_STATE = struct.Struct("<II")
CONFIG_HEADER = struct.Struct("<III")

MAX_BODY = 4096 + CONFIG_HEADER.size


class ProtocolError(Exception):
    """The back-end sent something the specification does not allow."""


# --- framing --------------------------------------------------------------------


def _recv_exact(sock: socket.socket, n: int) -> bytes:
    buf = bytearray()
    while len(buf) < n:
        chunk = sock.recv(n - len(buf))
        if not chunk:
            raise ProtocolError(f"back-end closed the connection ({len(buf)}/{n} bytes read)")
        buf += chunk
    return bytes(buf)


def send_message(
    sock: socket.socket,
    request: int,
    body: bytes = b"",
    *,
    need_reply: bool = False,
    fds: list[int] | None = None,
) -> None:
    """Send one front-end message (header + body, optionally with fds)."""
    flags = VERSION | (FLAG_NEED_REPLY if need_reply else 0)
    data = HEADER.pack(request, flags, len(body)) + body
    if fds:
        socket.send_fds(sock, [data], fds)
    else:
        sock.sendall(data)


def recv_reply(sock: socket.socket, request: int) -> bytes:
    """Read one reply to ``request`` and return its body, checking the header."""
    req, flags, size = HEADER.unpack(_recv_exact(sock, HEADER.size))
    if req != request:
        raise ProtocolError(f"reply for request {req}, expected {request}")
    if flags & VERSION_MASK != VERSION or not flags & FLAG_REPLY:
        raise ProtocolError(f"bad reply flags {flags:#x}")
    if size > MAX_BODY:
        raise ProtocolError(f"reply body of {size} bytes is too large")
    return _recv_exact(sock, size)


def _recv_u64(sock: socket.socket, request: int) -> int:
    body = recv_reply(sock, request)
    if len(body) != U64.size:
        raise ProtocolError(f"request {request}: u64 reply of {len(body)} bytes")
    value: int = U64.unpack(body)[0]
    return value


# --- requests -------------------------------------------------------------------


def connect(path: str | os.PathLike[str], timeout: float = 5.0) -> socket.socket:
    """Connect to a back-end's listening socket.

    Retries for up to ``timeout`` seconds while the socket is missing or not
    yet listening (a peer that has just been started).
    """
    deadline = time.monotonic() + timeout
    while True:
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
        try:
            sock.connect(os.fspath(path))
        except OSError as exc:
            sock.close()
            retry = exc.errno in (errno.ENOENT, errno.ECONNREFUSED, errno.EAGAIN)
            if not retry or time.monotonic() >= deadline:
                raise
            time.sleep(0.01)
            continue
        sock.settimeout(timeout)
        return sock


def get_features(sock: socket.socket) -> int:
    """GET_FEATURES: the back-end's virtio feature bits."""
    send_message(sock, GET_FEATURES)
    return _recv_u64(sock, GET_FEATURES)


def set_features(sock: socket.socket, features: int) -> None:
    """SET_FEATURES (no reply requested)."""
    send_message(sock, SET_FEATURES, U64.pack(features))


def set_owner(sock: socket.socket) -> None:
    """SET_OWNER (no reply)."""
    send_message(sock, SET_OWNER)


def get_protocol_features(sock: socket.socket) -> int:
    """GET_PROTOCOL_FEATURES: the back-end's vhost-user protocol feature bits."""
    send_message(sock, GET_PROTOCOL_FEATURES)
    return _recv_u64(sock, GET_PROTOCOL_FEATURES)


def set_protocol_features(sock: socket.socket, features: int) -> None:
    """SET_PROTOCOL_FEATURES (no reply requested)."""
    send_message(sock, SET_PROTOCOL_FEATURES, U64.pack(features))


def get_queue_num(sock: socket.socket) -> int:
    """GET_QUEUE_NUM (needs the MQ protocol feature)."""
    send_message(sock, GET_QUEUE_NUM)
    return _recv_u64(sock, GET_QUEUE_NUM)


def get_config(sock: socket.socket, offset: int, size: int, flags: int = 0) -> bytes:
    """GET_CONFIG: ``size`` bytes of the device config space at ``offset``."""
    body = CONFIG_HEADER.pack(offset, size, flags) + bytes(size)
    send_message(sock, GET_CONFIG, body)
    reply = recv_reply(sock, GET_CONFIG)
    if len(reply) != CONFIG_HEADER.size + size:
        raise ProtocolError(f"GET_CONFIG reply of {len(reply)} bytes, expected {12 + size}")
    r_offset, r_size, _r_flags = CONFIG_HEADER.unpack_from(reply)
    if (r_offset, r_size) != (offset, size):
        raise ProtocolError(f"GET_CONFIG reply for ({r_offset}, {r_size})")
    return reply[CONFIG_HEADER.size :]


def set_vring_num_ack(sock: socket.socket, index: int, num: int) -> None:
    """SET_VRING_NUM with NEED_REPLY; REPLY_ACK must have been negotiated.

    Raises :class:`ProtocolError` if the back-end acknowledges with non-zero.
    """
    send_message(sock, SET_VRING_NUM, VRING_STATE.pack(index, num), need_reply=True)
    status = _recv_u64(sock, SET_VRING_NUM)
    if status != 0:
        raise ProtocolError(f"SET_VRING_NUM({index}, {num}) acknowledged with {status}")


@dataclass(frozen=True)
class Negotiated:
    """What :func:`negotiate` agreed with the back-end."""

    features: int
    protocol_features: int


def negotiate(sock: socket.socket, protocol_wanted: int = PROTOCOL_F_REPLY_ACK) -> Negotiated:
    """SET_OWNER, GET/SET_FEATURES and GET/SET_PROTOCOL_FEATURES, as QEMU orders them.

    Acknowledges all offered virtio features and, of the protocol features,
    the offered subset of ``protocol_wanted``.
    """
    set_owner(sock)
    features = get_features(sock)
    protocol = 0
    if features & VHOST_USER_F_PROTOCOL_FEATURES:
        protocol = get_protocol_features(sock) & protocol_wanted
        set_protocol_features(sock, protocol)
    set_features(sock, features)
    return Negotiated(features, protocol)


# --- timing ---------------------------------------------------------------------


@dataclass(frozen=True)
class Timing:
    """Round-trip times of one loop, in nanoseconds."""

    iterations: int
    mean_ns: float
    median_ns: float
    p99_ns: float


def _summarize(samples: list[int]) -> Timing:
    ordered = sorted(samples)
    p99 = ordered[min(len(ordered) - 1, (len(ordered) * 99) // 100)]
    return Timing(len(samples), statistics.fmean(samples), statistics.median(ordered), p99)


def round_trip_loop(sock: socket.socket, n: int, *, ack: bool = False) -> Timing:
    """Time ``n`` request/reply round trips.

    ``ack=False``: GET_FEATURES (12-byte request, 20-byte reply).
    ``ack=True``: SET_VRING_NUM with NEED_REPLY (20-byte request, 20-byte
    reply); REPLY_ACK must have been negotiated.
    """
    if n <= 0:
        raise ValueError("n must be positive")
    samples: list[int] = []
    clock = time.perf_counter_ns
    for _ in range(n):
        t0 = clock()
        if ack:
            set_vring_num_ack(sock, 0, 256)
        else:
            get_features(sock)
        samples.append(clock() - t0)
    return _summarize(samples)


def placement(pid: int = 0) -> str:
    """The CPUs a process may run on, as ``cpus=0,1``."""
    return "cpus=" + ",".join(str(c) for c in sorted(os.sched_getaffinity(pid)))


# --- script ---------------------------------------------------------------------


@contextlib.contextmanager
def _spawned_qsd(tmp: str) -> Iterator[tuple[str, int]]:
    """Start a qemu-storage-daemon vhost-user-blk export on a 64 MiB sparse image."""
    binary = shutil.which("qemu-storage-daemon")
    if binary is None:
        raise SystemExit("qemu-storage-daemon not found: run `make setup`")
    image = os.path.join(tmp, "disk.img")
    sock_path = os.path.join(tmp, "blk.sock")
    with open(image, "wb") as f:
        f.truncate(64 << 20)
    argv = [
        binary,
        "--blockdev",
        f"driver=file,node-name=f0,filename={image}",
        "--export",
        f"type=vhost-user-blk,id=e0,node-name=f0,addr.type=unix,addr.path={sock_path},writable=on",
    ]
    proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, start_new_session=True)
    try:
        yield sock_path, proc.pid
    finally:
        proc.terminate()
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def _report(label: str, t: Timing) -> None:
    print(
        f"{label}: n={t.iterations} mean={t.mean_ns / 1000:.2f}us "
        f"median={t.median_ns / 1000:.2f}us p99={t.p99_ns / 1000:.2f}us"
    )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    target = parser.add_mutually_exclusive_group(required=True)
    target.add_argument("--socket", help="connect to this back-end socket")
    target.add_argument(
        "--spawn-qsd",
        action="store_true",
        help="start a qemu-storage-daemon vhost-user-blk export (inherits this CPU placement)",
    )
    parser.add_argument("-n", "--iterations", type=int, default=20000)
    args = parser.parse_args(argv)

    with contextlib.ExitStack() as stack:
        peer_pid = 0
        if args.spawn_qsd:
            tmp = stack.enter_context(tempfile.TemporaryDirectory(prefix="pvb-", dir="/tmp"))
            sock_path, peer_pid = stack.enter_context(_spawned_qsd(tmp))
        else:
            sock_path = args.socket
        sock = stack.enter_context(connect(sock_path, timeout=10.0))
        neg = negotiate(sock)
        peer = f"peer pid {peer_pid} {placement(peer_pid)}" if peer_pid else "peer: not ours"
        print(f"# pyclient: python {sys.version.split()[0]}, this process {placement()}, {peer}")
        warm = min(1000, args.iterations)
        round_trip_loop(sock, warm)
        _report("GET_FEATURES 12/20", round_trip_loop(sock, args.iterations))
        if neg.protocol_features & PROTOCOL_F_REPLY_ACK:
            round_trip_loop(sock, warm, ack=True)
            _report("SET_VRING_NUM+ack 20/20", round_trip_loop(sock, args.iterations, ack=True))
        else:
            print("SET_VRING_NUM+ack: back-end does not offer REPLY_ACK")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
