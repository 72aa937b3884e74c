"""Stuck and hostile back-ends for the blocking-call tests (issue 9): a raw vhost-user
back-end that opens the back-end channel and then, optionally, floods it with NEED_REPLY
requests without ever reading the front-end's acks (such a back-end froze the whole
front-end process while the ack send held the GIL), and a listener that stopped accepting.
"""

from __future__ import annotations

import socket
import threading

from hostile import NEED_REPLY, REPLY, U64, VERSION, message, recv_message
from vhost.codes import BackendRequest, FrontendRequest, ProtocolFeature
from vhost.user import Frontend, FrontendChannel

PROTOCOL = ProtocolFeature.BACKEND_REQ | ProtocolFeature.REPLY_ACK | ProtocolFeature.CONFIG


class RawBackend:
    """Listens at `path`, serves one front-end's opening, keeps the channel it is given and
    (with `flood`) sends CONFIG_CHANGE_MSG with NEED_REPLY until the channel is full."""

    def __init__(self, path: str, *, flood: bool) -> None:
        self.flood = flood
        self.sent = 0
        #: Set once the channel stayed full for a while: the front-end's acks are stuck.
        self.channel_full = threading.Event()
        self.channel: socket.socket | None = None
        self._srv = socket.socket(socket.AF_UNIX)
        self._srv.bind(path)
        self._srv.listen(1)
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()

    def _reply(self, conn: socket.socket, code: int, value: int) -> None:
        conn.sendall(message(code, U64.pack(value), VERSION | REPLY))

    def _run(self) -> None:
        conn, _ = self._srv.accept()
        while True:
            msg = recv_message(conn)
            if msg is None:
                return
            if msg.code == FrontendRequest.GET_FEATURES:
                self._reply(conn, msg.code, 1 << 30)
            elif msg.code == FrontendRequest.GET_PROTOCOL_FEATURES:
                self._reply(conn, msg.code, int(PROTOCOL))
            elif msg.code == FrontendRequest.SET_BACKEND_REQ_FD:
                self.channel = socket.socket(fileno=msg.fds.pop())
                msg.close_fds()
                if msg.flags & NEED_REPLY:
                    self._reply(conn, msg.code, 0)
                if self.flood:
                    self._flood(self.channel)
            else:
                msg.close_fds()
                if msg.flags & NEED_REPLY:
                    self._reply(conn, msg.code, 0)

    def _flood(self, channel: socket.socket) -> None:
        request = message(BackendRequest.CONFIG_CHANGE_MSG, b"", VERSION | NEED_REPLY)
        channel.settimeout(0.5)
        while True:
            try:
                channel.sendall(request)
                self.sent += 1
            except TimeoutError:
                self.channel_full.set()
                return
            except OSError:
                return


def open_channel(fe: Frontend) -> FrontendChannel:
    """The opening a front-end needs for a back-end channel with acks."""
    fe.get_features()
    fe.get_protocol_features()
    fe.set_protocol_features(PROTOCOL)
    return fe.set_backend_req_fd()


class StuckListener:
    """A listener at `path` that never accepts, its backlog filled with connections the
    caller holds: the next connect waits for a free slot."""

    def __init__(self, path: str) -> None:
        self.srv = socket.socket(socket.AF_UNIX)
        self.srv.bind(path)
        self.srv.listen(0)
        self.held: list[socket.socket] = []
        while True:
            s = socket.socket(socket.AF_UNIX)
            s.setblocking(False)
            try:
                s.connect(path)
            except BlockingIOError:
                s.close()
                break
            self.held.append(s)

    def close(self) -> None:
        for s in self.held:
            s.close()
        self.srv.close()


class SilentListener:
    """A listener at `path` that accepts nothing and answers nothing (a one-at-a-time
    back-end busy with another front-end looks like this to the next one)."""

    def __init__(self, path: str) -> None:
        self.srv = socket.socket(socket.AF_UNIX)
        self.srv.bind(path)
        self.srv.listen(1)

    def close(self) -> None:
        self.srv.close()
