"""Raw vhost-user bytes and fds, for speaking as a broken or hostile front-end.

Nothing here validates anything: :mod:`vhost.check` (and this project's adversarial
tests) must be able to send what a broken peer would, which the validating codec of
:class:`vhost.user.Frontend` refuses to build. Layouts are the specification's
("Message format"); every integer is native-endian, as on the wire.
"""

from __future__ import annotations

import os
import socket
import struct
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

HEADER = struct.Struct("=III")
"""Message header: request code, flags, payload size."""
U64 = struct.Struct("=Q")
"""A 64-bit payload (features, acks, the vring fd word)."""
VRING_STATE = struct.Struct("=II")
"""``struct vhost_vring_state``: ring index and a number."""
REGION = struct.Struct("=QQQQ")
"""A memory region: guest address, size, front-end address, mmap offset."""
CONFIG_HEAD = struct.Struct("=III")
"""``GET_CONFIG``/``SET_CONFIG`` payload head: offset, size, flags."""
VRING_ADDR = struct.Struct("=IIQQQQ")
"""``struct vhost_vring_addr``: index, flags, desc, used, avail, log addresses."""

VERSION = 0x1
"""The only protocol version: the low two bits of every header's flags."""
REPLY = 1 << 2
"""Set on every reply."""
NEED_REPLY = 1 << 3
"""Asks for a REPLY_ACK."""
NOFD = 1 << 8
"""Vring fd word: no fd rides with this message."""


def header(code: int, flags: int = VERSION, size: int = 0) -> bytes:
    """A header with any values (each truncated to 32 bits)."""
    return HEADER.pack(code & 0xFFFFFFFF, flags & 0xFFFFFFFF, size & 0xFFFFFFFF)


def message(code: int, body: bytes = b"", flags: int = VERSION, size: int | None = None) -> bytes:
    """A whole message; ``size`` overrides the header's size to lie about the body."""
    return header(code, flags, len(body) if size is None else size) + body


def mem_table(regions: Sequence[tuple[int, int, int, int]], count: int | None = None) -> bytes:
    """A ``SET_MEM_TABLE`` payload; ``count`` overrides the region count to lie about it."""
    n = len(regions) if count is None else count
    return struct.pack("=II", n, 0) + b"".join(REGION.pack(*r) for r in regions)


def single_region(r: tuple[int, int, int, int]) -> bytes:
    """An ``ADD_MEM_REG``/``REM_MEM_REG`` payload (padding word, then the region)."""
    return U64.pack(0) + REGION.pack(*r)


def config_body(offset: int, size: int, flags: int = 0, data: bytes | None = None) -> bytes:
    """A ``GET_CONFIG``/``SET_CONFIG`` payload; ``data`` may disagree with ``size``."""
    payload = bytes(size) if data is None else data
    return CONFIG_HEAD.pack(offset, size, flags) + payload


def vring_addr(
    index: int, *, desc: int = 0x1000, used: int = 0x3000, avail: int = 0x2000, flags: int = 0
) -> bytes:
    """A ``SET_VRING_ADDR`` payload (the addresses are the front-end's)."""
    return VRING_ADDR.pack(index, flags, desc, used, avail, 0)


def vring_word(index: int, nofd: bool = False) -> bytes:
    """The payload of ``SET_VRING_KICK``/``CALL``/``ERR``."""
    return U64.pack(index | (NOFD if nofd else 0))


def send(sock: socket.socket, data: bytes, fds: Sequence[int] = ()) -> None:
    """Sends ``data``, with ``fds`` riding on the first byte."""
    if fds:
        sent = socket.send_fds(sock, [data], list(fds))
        if sent < len(data):
            sock.sendall(data[sent:])
    else:
        sock.sendall(data)


def recv_exact(sock: socket.socket, n: int) -> bytes | None:
    """Exactly n bytes, or None on EOF before them."""
    buf = b""
    while len(buf) < n:
        chunk = sock.recv(n - len(buf))
        if not chunk:
            return None
        buf += chunk
    return buf


@dataclass
class Received:
    """One message as read off the socket, with the fds that came with it (ours to close)."""

    code: int
    flags: int
    body: bytes
    fds: list[int] = field(default_factory=list)

    def close_fds(self) -> None:
        """Closes the received fds (a checker keeps none)."""
        for fd in self.fds:
            os.close(fd)
        self.fds.clear()

    @property
    def u64(self) -> int:
        """The body as one u64 (raises ``struct.error`` when it is not 8 bytes)."""
        value: int = U64.unpack(self.body)[0]
        return value


def recv_message(sock: socket.socket) -> Received | None:
    """One message with its fds, or None on EOF."""
    head, fds, _flags, _addr = socket.recv_fds(sock, HEADER.size, 16)
    if not head:
        for fd in fds:
            os.close(fd)
        return None
    rest = recv_exact(sock, HEADER.size - len(head)) if len(head) < HEADER.size else b""
    if rest is None:
        return None
    code, flags, size = HEADER.unpack(head + rest)
    body = recv_exact(sock, size) if size else b""
    if body is None:
        return None
    return Received(code, flags, body, list(fds))


def sees_eof(sock: socket.socket, timeout: float = 5.0) -> bool:
    """True when the peer closed (EOF or reset) within ``timeout``; stray data is drained."""
    sock.settimeout(timeout)
    deadline = time.monotonic() + timeout
    try:
        while time.monotonic() < deadline:
            data, fds, _f, _a = socket.recv_fds(sock, 4096, 16)
            for fd in fds:
                os.close(fd)
            if not data:
                return True
    except (ConnectionResetError, BrokenPipeError):
        return True
    except TimeoutError:
        return False
    return False


def connect(path: Path | str, timeout: float = 5.0) -> socket.socket:
    """A blocking AF_UNIX stream socket connected to ``path``, with ``timeout`` on each
    operation."""
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    s.settimeout(timeout)
    try:
        s.connect(os.fspath(path))
    except BaseException:
        s.close()
        raise
    return s


def memfd(size: int, name: str = "vhost-check") -> int:
    """A memfd of ``size`` bytes (close-on-exec), to pass as guest memory."""
    fd = os.memfd_create(name, os.MFD_CLOEXEC)
    try:
        os.ftruncate(fd, size)
    except BaseException:
        os.close(fd)
        raise
    return fd
