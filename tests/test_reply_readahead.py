"""The front-end reads a reply's header and body with one recvmsg when the reply has the
expected size. A reply split across several writes must still work, and bytes beyond
the reply are a protocol error (the back-end must send nothing it was not asked for)."""

from __future__ import annotations

import contextlib
import socket
import struct
import threading
from collections.abc import Callable
from pathlib import Path

import pytest

from vhost import ProtocolError
from vhost.user import Frontend

REPLY = 1 | 4  # version 1, REPLY


def _serve_once(path: Path, answer: Callable[[socket.socket], None]) -> threading.Thread:
    srv = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    srv.bind(str(path))
    srv.listen(1)

    def run() -> None:
        conn, _ = srv.accept()
        with conn, srv:
            header = conn.recv(12)
            assert struct.unpack("<III", header)[0] == 1  # GET_FEATURES
            answer(conn)
            # Hold the connection until the front-end is done (or resets it, as it must
            # after a protocol error).
            with contextlib.suppress(OSError):
                conn.recv(1)

    t = threading.Thread(target=run, daemon=True)
    t.start()
    return t


def test_reply_in_pieces_is_reassembled(tmp_path: Path) -> None:
    reply = struct.pack("<IIIQ", 1, REPLY, 8, 0x1_4000_0000)

    def trickle(conn: socket.socket) -> None:
        for i in range(len(reply)):
            conn.sendall(reply[i : i + 1])

    t = _serve_once(tmp_path / "s", trickle)
    with Frontend.connect(tmp_path / "s", timeout=5) as fe:
        assert fe.get_features() == 0x1_4000_0000
    t.join(5)


def test_bytes_beyond_the_reply_are_a_protocol_error(tmp_path: Path) -> None:
    # Unasked-for bytes are never taken for the next reply: they fail as a header.
    def extra(conn: socket.socket) -> None:
        conn.sendall(struct.pack("<IIIQ", 1, REPLY, 8, 1 << 32) + b"junk" * 3)

    t = _serve_once(tmp_path / "s", extra)
    with Frontend.connect(tmp_path / "s", timeout=5) as fe:
        assert fe.get_features() == 1 << 32
        with pytest.raises(ProtocolError):
            fe.get_features()
        assert fe.broken
    t.join(5)


def test_short_reply_followed_by_more_is_a_protocol_error(tmp_path: Path) -> None:
    # A body shorter than expected with bytes after it in the same read: the surplus
    # cannot belong to anything, so the reply is rejected outright.
    def short(conn: socket.socket) -> None:
        conn.sendall(struct.pack("<III", 1, REPLY, 4) + b"\0" * 4 + b"trailing")

    t = _serve_once(tmp_path / "s", short)
    with Frontend.connect(tmp_path / "s", timeout=5) as fe:
        with pytest.raises(ProtocolError):
            fe.get_features()
        assert fe.broken
    t.join(5)
