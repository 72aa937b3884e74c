"""A transparent recording proxy for vhost-user: see every message between a front-end
(QEMU) and a back-end, decoded, while both keep talking as if the proxy were not there.

:class:`Tracer` sits between the two sockets. Every byte and every passed fd is forwarded
unchanged and in order, one message at a time (framed by the 12-byte header, with the
body bound of the core), and each message becomes a :class:`Message` record: who sent it,
on which channel, the request name, flags, the body's fields (memory regions, ring
addresses, features, config bytes; the device's own feature bits are named when the
caller says the device type, ``device=``) as the core's request table decodes them
(:func:`vhost._core.describe`), the fds attached, and for a reply the time since its
request. A message the core would refuse is still forwarded, and its record says why and
holds its bytes in hex. The back-end channel (``SET_BACKEND_REQ_FD``) is interposed: the
back-end receives one end of the proxy's own socketpair, and the proxy relays between it
and the front-end's socket, so the back-end's requests are recorded too.

Two layouts::

    front-end  --connects-->  [listen]  Tracer  [connect]  -->  back-end (server)
    back-end   --connects-->  [listen]  Tracer  [connect]  -->  front-end (server)

the second with ``backend_connects=True`` (a back-end in client mode, QEMU with
``server=on``). Example::

    from vhost.trace import Tracer

    with Tracer("/tmp/front.sock", "/tmp/back.sock") as tracer:
        for record in tracer.records():
            print(record.format())

The relay is Python (``socket.recv_fds`` / ``send_fds``): a message and its fds leave in
one ``sendmsg`` exactly as they came in one ``recvmsg``, the proxy closes its copies of
the fds once sent, and the cost is one thread wake-up per message, small beside the
peers' own work (``benches/bench_trace.py`` measures it).
"""

from __future__ import annotations

import contextlib
import enum
import errno
import itertools
import os
import queue
import socket
import stat
import struct
import threading
import time
from collections import deque
from collections.abc import Iterator
from dataclasses import dataclass, field
from types import TracebackType
from typing import Literal

from . import _core
from .codes import VERSION_MASK, MessageFlag, ProtocolFeature
from .errors import VhostOSError
from .virtio import DEVICE_FEATURES, DEVICE_NAMES, DeviceId, VirtioFeature

HEADER_SIZE: int = _core.HEADER_SIZE
MAX_BODY_SIZE: int = _core.MAX_BODY_SIZE
MAX_FDS: int = _core.MAX_FDS

_SET_PROTOCOL_FEATURES = 16
_SET_BACKEND_REQ_FD = 21

_Side = Literal["frontend"] | Literal["backend"]
"""A peer: the front-end (QEMU) or the back-end."""

_Channel = Literal["main"] | Literal["backend-channel"]
"""The main socket or the back-end channel of ``SET_BACKEND_REQ_FD``."""


#: Which requests get a reply of their own (not only a REPLY_ACK status), by channel and
#: code: from the core's request table.
_HAS_REPLY: dict[tuple[str, int], bool] = {
    (row[0], row[1]): row[6] != "Ack" for row in _core.request_table()
}


_temp_names = itertools.count()


def _listen_unix(path: str) -> socket.socket:
    """A listening socket that appears at ``path`` only once it listens, so a front-end
    that sees the path never gets ECONNREFUSED (bind then listen leaves that moment open).
    It listens under a temporary sibling name, then is hard-linked into place, which
    fails rather than replace a file that appeared at ``path`` meanwhile. Where the
    sibling cannot be bound (a name too long for ``sun_path``), it binds ``path``."""
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    temp = os.path.join(os.path.dirname(path) or ".", f".pv{os.getpid():x}.t{next(_temp_names):x}")
    try:
        try:
            listener.bind(temp)
        except OSError:
            listener.bind(path)
            listener.listen(4)
            return listener
        try:
            listener.listen(4)
            os.link(temp, path)
        finally:
            os.unlink(temp)
    except OSError:
        listener.close()
        raise
    return listener


@dataclass(frozen=True)
class Field:
    """One field of a message body, as the core's decoder names it."""

    name: str
    """The spec's name (``index``, ``desc``, ``features``...)."""
    kind: str
    """How to read ``value``: ``int``, ``addr``, ``bytes``, ``virtio_features``,
    ``protocol_features``, ``regions`` (``(gpa, size, uaddr, mmap_offset)`` tuples) or
    ``bool``."""
    value: object
    """The value: an int, bytes, bool or a list of region tuples."""
    device: str | None = None
    """The device type (a key of ``DEVICE_NAMES``: ``blk``, ``net``...) that names the
    device-specific virtio feature bits, or None (they show as ``bit N``)."""

    def format(self) -> str:
        """``name=value``, addresses in hex and features by name."""
        v = self.value
        if self.kind == "addr" and isinstance(v, int):
            return f"{self.name}={v:#x}"
        if self.kind == "bytes" and isinstance(v, bytes):
            return f"{self.name}={v.hex()}"
        if self.kind in ("virtio_features", "protocol_features") and isinstance(v, int):
            return f"{self.name}={v:#x}[{','.join(feature_names(self.kind, v, self.device))}]"
        if self.kind == "regions" and isinstance(v, list):
            regions = " ".join(
                f"{{gpa={g:#x} size={s:#x} uaddr={u:#x} offset={o:#x}}}" for g, s, u, o in v
            )
            return f"{self.name}=[{regions}]"
        return f"{self.name}={v}"

    def to_json(self) -> object:
        """The value as JSON: numbers stay numbers, bytes become hex, features add their
        names, regions become objects."""
        v = self.value
        if isinstance(v, bytes):
            return v.hex()
        if self.kind in ("virtio_features", "protocol_features") and isinstance(v, int):
            return {"value": v, "names": feature_names(self.kind, v, self.device)}
        if self.kind == "regions" and isinstance(v, list):
            keys = ("guest_phys_addr", "memory_size", "userspace_addr", "mmap_offset")
            return [dict(zip(keys, r, strict=True)) for r in v]
        return v


def feature_names(kind: str, mask: int, device: str | None = None) -> list[str]:
    """The names of the bits of ``mask``: protocol features by the core's table, virtio
    features by their transport names, and the device-specific ones by ``device``'s
    feature table (``blk``, ``net``, ``fs``, ``vsock``: the protocol never says the
    device type, so the caller does). A bit no table names is ``bit N``."""
    tables: list[type[enum.IntFlag]] = [ProtocolFeature]
    if kind != "protocol_features":
        tables = [VirtioFeature]
        if device is not None:
            tables.insert(0, DEVICE_FEATURES[device_id(device)])
    names = []
    for bit in range(64):
        if mask >> bit & 1:
            known = (t(1 << bit).name for t in tables if (1 << bit) & _defined(t))
            names.append(next(known, None) or f"bit {bit}")
    return names


def _defined(table: type[enum.IntFlag]) -> int:
    mask = 0
    for member in table:
        mask |= member.value
    return mask


def device_id(device: str) -> DeviceId:
    """The device type of a short name (``blk``...), or ValueError naming the choices."""
    try:
        return DEVICE_NAMES[device]
    except KeyError:
        choices = ", ".join(sorted(DEVICE_NAMES))
        raise ValueError(f"unknown device type {device!r}: one of {choices}") from None


def flag_names(flags: int) -> list[str]:
    """The names of the header's ``flags``: the version (``v1``), ``REPLY``,
    ``NEED_REPLY``, and ``bit N`` for a bit the protocol does not define."""
    names = [f"v{flags & VERSION_MASK}"]
    for bit in range(2, 32):
        if flags >> bit & 1:
            names.append(MessageFlag(1 << bit).name or f"bit {bit}")
    return names


@dataclass(frozen=True)
class Message:
    """One message the proxy forwarded."""

    time: float
    """Seconds since the trace started, when the message was read."""
    connection: int
    """Which front-end connection (1, 2... in accept order)."""
    channel: _Channel
    """The main socket or the back-end channel."""
    sender: _Side
    """Who sent it."""
    name: str | None
    """The request's name (a reply has its request's), None for an unknown code."""
    code: int
    flags: int
    size: int
    """The header's fields, as received."""
    reply: bool
    """Whether it is a reply (the REPLY flag)."""
    fds: int
    """How many fds came with it (and were forwarded)."""
    fields: tuple[Field, ...]
    """The body, decoded (empty when malformed)."""
    malformed: str | None = None
    """Why the core would refuse it, or None."""
    hex: str | None = None
    """Its bytes (header and body) in hex when malformed."""
    elapsed: float | None = None
    """For a reply: seconds since its request was read."""

    @property
    def need_reply(self) -> bool:
        """Whether the sender asked for a reply (NEED_REPLY)."""
        return bool(self.flags & MessageFlag.NEED_REPLY)

    def field(self, name: str) -> object:
        """The value of the field ``name`` (KeyError when absent)."""
        for f in self.fields:
            if f.name == name:
                return f.value
        raise KeyError(f"{self.name}: no field {name!r}")

    def format(self) -> str:
        """One line: time, connection, direction, name, flags, fields, fds, latency."""
        arrow = "F->B" if self.sender == "frontend" else "B->F"
        where = " [backend channel]" if self.channel == "backend-channel" else ""
        name = self.name or f"code {self.code}"
        flags = [f"flags={self.flags:#x}[{','.join(flag_names(self.flags))}]"]
        parts = [f"{self.time:10.6f} #{self.connection} {arrow}{where}"]
        parts.append(f"{name} reply" if self.reply else name)
        parts.extend(flags)
        if self.malformed is not None:
            parts.append(f"MALFORMED size={self.size}: {self.malformed}; hex={self.hex}")
        else:
            parts.extend(f.format() for f in self.fields)
        if self.fds:
            parts.append(f"fds={self.fds}")
        if self.elapsed is not None:
            parts.append(f"({self.elapsed * 1e3:.3f} ms)")
        return " ".join(parts)

    def to_json(self) -> dict[str, object]:
        """The record as a JSON object."""
        return {
            "type": "message",
            "time": self.time,
            "connection": self.connection,
            "channel": self.channel,
            "sender": self.sender,
            "name": self.name,
            "code": self.code,
            "flags": self.flags,
            "flag_names": flag_names(self.flags),
            "size": self.size,
            "reply": self.reply,
            "need_reply": self.need_reply,
            "fds": self.fds,
            "fields": {f.name: f.to_json() for f in self.fields},
            "malformed": self.malformed,
            "hex": self.hex,
            "elapsed": self.elapsed,
        }


@dataclass(frozen=True)
class Event:
    """Something that is not a message: a connection opened or closed."""

    time: float
    """Seconds since the trace started."""
    connection: int
    """Which connection."""
    kind: Literal["connect", "disconnect"]
    """What happened."""
    channel: _Channel
    """On which channel."""
    side: _Side | None
    """Who closed (``disconnect``), or None."""
    detail: str = ""
    """The paths connected, or why the relay stopped."""

    def format(self) -> str:
        """One line."""
        where = " [backend channel]" if self.channel == "backend-channel" else ""
        who = f" by the {self.side}" if self.side else ""
        detail = f": {self.detail}" if self.detail else ""
        return f"{self.time:10.6f} #{self.connection}{where} {self.kind}{who}{detail}"

    def to_json(self) -> dict[str, object]:
        """The record as a JSON object."""
        return {
            "type": self.kind,
            "time": self.time,
            "connection": self.connection,
            "channel": self.channel,
            "side": self.side,
            "detail": self.detail,
        }


Record = Message | Event
"""What :meth:`Tracer.records` yields."""


def _os_error(exc: OSError, operation: str, path: str) -> VhostOSError:
    code = exc.errno if exc.errno is not None else errno.EIO
    return VhostOSError(code, os.strerror(code), path, operation=operation)


@dataclass
class _Pending:
    """A request waiting for its reply."""

    time: float
    body: bytes


@dataclass
class _Connection:
    """One front-end connection: its sockets, relays and requests awaiting replies."""

    number: int
    sockets: list[socket.socket] = field(default_factory=list)
    threads: list[threading.Thread] = field(default_factory=list)
    pending: dict[tuple[_Channel, int], deque[_Pending]] = field(default_factory=dict)
    reply_ack: bool = False
    lock: threading.Lock = field(default_factory=threading.Lock)
    closed: bool = False
    active: int = 0
    ended: set[str] = field(default_factory=set)

    def shutdown(self, only: tuple[socket.socket, ...] | None = None) -> None:
        """Wakes the relays of this connection (their reads return end of file): all of
        them, or those reading ``only``."""
        with self.lock:
            if only is None:
                self.closed = True
            sockets = list(self.sockets) if only is None else list(only)
        for s in sockets:
            with contextlib.suppress(OSError):
                s.shutdown(socket.SHUT_RDWR)


@dataclass(frozen=True)
class _Leg:
    """One direction of one channel: who sends, from which socket to which."""

    conn: _Connection
    channel: _Channel
    sender: _Side
    src: socket.socket
    dst: socket.socket


class Tracer:
    """The proxy: listens on ``listen``, and for each peer that connects there, connects
    to ``connect`` and relays between the two, recording every message.

    By default the front-end connects to ``listen`` and the back-end listens on
    ``connect``; with ``backend_connects=True`` it is the mirror (a back-end in client
    mode connects to ``listen``, the front-end listens on ``connect``). A stale socket
    file at ``listen`` is replaced. Use as a context manager, and read
    :meth:`records`; :meth:`close` (or leaving the ``with``) ends every relay and closes
    every fd the proxy holds. ``device`` (``blk``, ``net``, ``fs``, ``vsock``) names the
    device-specific feature bits in the records (ValueError for an unknown name)."""

    def __init__(
        self,
        listen: str | os.PathLike[str],
        connect: str | os.PathLike[str],
        *,
        backend_connects: bool = False,
        connect_timeout: float = 10.0,
        device: str | None = None,
    ) -> None:
        if device is not None:
            device_id(device)  # an unknown name fails here, not at the first message
        self.device = device
        self.listen_path = os.fspath(listen)
        self.connect_path = os.fspath(connect)
        self.backend_connects = backend_connects
        self.connect_timeout = connect_timeout
        self._records: queue.Queue[Record | BaseException | None] = queue.Queue()
        self._connections: list[_Connection] = []
        self._lock = threading.Lock()
        self._start = time.monotonic()
        self._listener: socket.socket | None = None
        self._acceptor: threading.Thread | None = None
        self._closed = False

    # -- lifetime ------------------------------------------------------------------------

    def start(self) -> None:
        """Binds the listening socket and starts accepting (idempotent)."""
        if self._listener is not None:
            return
        try:
            mode = os.stat(self.connect_path).st_mode
        except OSError as exc:
            raise _os_error(exc, "connect to", self.connect_path) from None
        if not stat.S_ISSOCK(mode):
            raise _os_error(OSError(errno.ENOTSOCK, ""), "connect to", self.connect_path)
        try:
            if stat.S_ISSOCK(os.stat(self.listen_path).st_mode):
                os.unlink(self.listen_path)
        except FileNotFoundError:
            pass
        except OSError as exc:
            raise _os_error(exc, "listen on", self.listen_path) from None
        try:
            listener = _listen_unix(self.listen_path)
        except OSError as exc:
            raise _os_error(exc, "listen on", self.listen_path) from None
        self._listener = listener
        self._acceptor = threading.Thread(target=self._accept_loop, name="trace-accept")
        self._acceptor.daemon = True
        self._acceptor.start()

    def close(self) -> None:
        """Stops accepting, ends every relay, closes every socket and fd the proxy holds
        and removes the listening socket's file."""
        if self._closed:
            return
        self._closed = True
        if self._listener is not None:
            with contextlib.suppress(OSError):
                self._listener.shutdown(socket.SHUT_RDWR)
            self._listener.close()
            if self._acceptor is not None:
                self._acceptor.join()
            with contextlib.suppress(OSError):
                os.unlink(self.listen_path)
        with self._lock:
            connections = list(self._connections)
        for c in connections:
            c.shutdown()
        for c in connections:
            for t in list(c.threads):
                t.join()
        self._records.put(None)

    def __enter__(self) -> Tracer:
        self.start()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    def records(self, timeout: float | None = None) -> Iterator[Record]:
        """The records, in the order the proxy read the messages, until :meth:`close`.
        Raises :class:`~vhost.errors.VhostOSError` naming the path when the proxy could
        not connect a peer, and :class:`TimeoutError` when ``timeout`` seconds pass
        without a record."""
        self.start()
        while True:
            try:
                item = self._records.get(timeout=timeout)
            except queue.Empty:
                raise TimeoutError(f"no vhost-user message for {timeout} s") from None
            if item is None:
                return
            if isinstance(item, BaseException):
                raise item
            yield item

    # -- relays --------------------------------------------------------------------------

    def _now(self) -> float:
        return time.monotonic() - self._start

    def _accept_loop(self) -> None:
        assert self._listener is not None
        number = 0
        while True:
            try:
                accepted, _ = self._listener.accept()
            except OSError:
                return  # closed
            number += 1
            peer = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            peer.settimeout(self.connect_timeout)
            try:
                peer.connect(self.connect_path)
            except OSError as exc:
                peer.close()
                accepted.close()
                self._records.put(_os_error(exc, "connect to", self.connect_path))
                continue
            peer.settimeout(None)
            front, back = (peer, accepted) if self.backend_connects else (accepted, peer)
            conn = _Connection(number, [front, back])
            with self._lock:
                self._connections.append(conn)
            self._records.put(
                Event(
                    self._now(),
                    number,
                    "connect",
                    "main",
                    None,
                    f"{self.listen_path} -> {self.connect_path}",
                )
            )
            self._relay(conn, "main", front, back)

    def _relay(
        self, conn: _Connection, channel: _Channel, front: socket.socket, back: socket.socket
    ) -> None:
        """Starts the two relays of a channel: front-end to back-end and back."""
        with conn.lock:
            conn.active += 2
        legs: tuple[tuple[_Side, socket.socket, socket.socket], ...] = (
            ("frontend", front, back),
            ("backend", back, front),
        )
        for sender, src, dst in legs:
            t = threading.Thread(
                target=self._pump,
                args=(_Leg(conn, channel, sender, src, dst),),
                name=f"trace-{conn.number}-{channel}-{sender}",
            )
            t.daemon = True
            conn.threads.append(t)
            t.start()

    def _pump(self, leg: _Leg) -> None:
        """Forwards messages from ``leg.src`` to ``leg.dst`` until either side closes."""
        conn, channel, sender, src, dst = leg.conn, leg.channel, leg.sender, leg.src, leg.dst
        detail = ""
        try:
            while self._forward_one(leg):
                pass
        except OSError as exc:
            detail = os.strerror(exc.errno) if exc.errno else str(exc)
        except Exception as exc:  # a relay must end its connection, not hang it
            detail = f"relay failed: {type(exc).__name__}: {exc}"
        # The main socket closing ends the whole connection (the back-end channel too:
        # a vhost-user session does not survive it); the back-end channel closing ends
        # only its own relays.
        with conn.lock:
            first = not conn.closed and channel not in conn.ended
            conn.ended.add(channel)
        conn.shutdown(None if channel == "main" else (src, dst))
        if first:
            event = Event(self._now(), conn.number, "disconnect", channel, sender, detail)
            self._records.put(event)
        self._finish(conn)

    def _finish(self, conn: _Connection) -> None:
        """The last relay of a connection closes its sockets."""
        with conn.lock:
            conn.active -= 1
            sockets = list(conn.sockets) if conn.active == 0 else []
            if conn.active == 0:
                conn.sockets.clear()
        for s in sockets:
            s.close()

    def _read(self, src: socket.socket, want: int, got: bytearray, fds: list[int]) -> bool:
        """Reads until ``got`` holds ``want`` bytes, collecting fds; False at end of
        file."""
        while len(got) < want:
            data, new, _flags, _addr = socket.recv_fds(src, want - len(got), MAX_FDS)
            fds.extend(new)
            if not data:
                return False
            got += data
        return True

    def _forward_one(self, leg: _Leg) -> bool:
        fds: list[int] = []
        try:
            return self._forward_message(leg, fds)
        finally:
            for fd in fds:
                os.close(fd)

    def _forward_message(self, leg: _Leg, fds: list[int]) -> bool:
        """Forwards one message and records it; False at end of file. The fds received
        are added to ``fds`` (the caller closes them)."""
        conn, channel, sender, src, dst = leg.conn, leg.channel, leg.sender, leg.src, leg.dst
        raw = bytearray()
        if not self._read(src, HEADER_SIZE, raw, fds):
            if raw or fds:
                self._partial(leg, raw, fds)
            return False
        t = self._now()
        code, flags, size = struct.unpack("=III", raw)
        if size > MAX_BODY_SIZE:
            return self._oversized(leg, bytes(raw), fds, t)
        if not self._read(src, HEADER_SIZE + size, raw, fds):
            self._partial(leg, raw, fds)
            return False
        header, body = bytes(raw[:HEADER_SIZE]), bytes(raw[HEADER_SIZE:])
        reply = bool(flags & MessageFlag.REPLY)
        # The back-end channel's requests come from the back-end.
        requests_from: _Side = "frontend" if channel == "main" else "backend"
        table = "frontend" if channel == "main" else "backend"
        pending: _Pending | None = None
        if reply:
            with conn.lock:
                waiting = conn.pending.get((channel, code))
                pending = waiting.popleft() if waiting else None
        description = _core.describe(
            table, header, body, fds, pending.body if pending is not None else b""
        )
        name, is_reply, (c, f, s), nfds, fields, malformed, hexed = description
        message = Message(
            time=t,
            connection=conn.number,
            channel=channel,
            sender=sender,
            name=name,
            code=c,
            flags=f,
            size=s,
            reply=is_reply,
            fds=nfds,
            fields=tuple(Field(n, k, v, self.device) for n, k, v in fields),
            malformed=malformed,
            hex=hexed,
            elapsed=t - pending.time if pending is not None else None,
        )
        if not reply and sender == requests_from:
            # Registered before the request leaves, so its reply always finds it.
            expects = bool(flags & MessageFlag.NEED_REPLY) and conn.reply_ack
            if _HAS_REPLY.get((table, code), False) or expects:
                with conn.lock:
                    conn.pending.setdefault((channel, code), deque()).append(_Pending(t, body))
        if code == _SET_PROTOCOL_FEATURES and channel == "main" and not reply and not malformed:
            acked = message.field("features")
            conn.reply_ack = isinstance(acked, int) and bool(acked & ProtocolFeature.REPLY_ACK)
        self._records.put(message)
        interposed: tuple[socket.socket, socket.socket] | None = None
        if (
            channel == "main"
            and not reply
            and code == _SET_BACKEND_REQ_FD
            and malformed is None
            and sender == requests_from
        ):
            # Hand the back-end our own socketpair's end, and relay between the other end
            # and the front-end's socket.
            ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
            interposed = (socket.socket(fileno=os.dup(fds[0])), ours)
            try:
                self._send(dst, bytes(raw), [theirs.fileno()])
            except OSError:
                for sock in interposed:
                    sock.close()
                raise
            finally:
                theirs.close()
        else:
            self._send(dst, bytes(raw), fds)
        if interposed is not None:
            front_end, ours = interposed
            with conn.lock:
                if conn.closed:
                    front_end.close()
                    ours.close()
                    return True
                conn.sockets.extend(interposed)
            self._records.put(
                Event(t, conn.number, "connect", "backend-channel", None, "interposed")
            )
            self._relay(conn, "backend-channel", front_end, ours)
        return True

    def _send(self, dst: socket.socket, data: bytes, fds: list[int]) -> None:
        """Sends a message with its fds in one ``sendmsg`` (the rest, if the kernel took
        only part, without them)."""
        sent = socket.send_fds(dst, [data], fds) if fds else dst.send(data)
        if sent < len(data):
            dst.sendall(data[sent:])

    def _partial(self, leg: _Leg, raw: bytearray, fds: list[int]) -> None:
        """The sender closed in the middle of a message: forward what came, record it."""
        conn, channel, sender, dst = leg.conn, leg.channel, leg.sender, leg.dst
        with contextlib.suppress(OSError):
            self._send(dst, bytes(raw), fds)
        head = bytes(raw[:HEADER_SIZE]).ljust(HEADER_SIZE, b"\0")
        code, flags, size = struct.unpack("=III", head)
        self._records.put(
            Message(
                self._now(),
                conn.number,
                channel,
                sender,
                None,
                code,
                flags,
                size,
                bool(flags & MessageFlag.REPLY),
                len(fds),
                (),
                f"partial message: {len(raw)} bytes before the connection closed",
                bytes(raw).hex(),
            )
        )

    def _oversized(self, leg: _Leg, header: bytes, fds: list[int], t: float) -> bool:
        """A size over the core's bound: record the header, then copy that many bytes
        through in bounded chunks, keeping the framing for what follows."""
        conn, channel, sender, src, dst = leg.conn, leg.channel, leg.sender, leg.src, leg.dst
        code, flags, size = struct.unpack("=III", header)
        self._records.put(
            Message(
                t,
                conn.number,
                channel,
                sender,
                None,
                code,
                flags,
                size,
                bool(flags & MessageFlag.REPLY),
                len(fds),
                (),
                f"body of {size} bytes over the bound of {MAX_BODY_SIZE}",
                header.hex(),
            )
        )
        self._send(dst, header, fds)
        left = size
        while left:
            chunk: list[int] = []
            data = bytearray()
            try:
                if not self._read(src, min(left, 1 << 16), data, chunk):
                    if data or chunk:
                        self._send(dst, bytes(data), chunk)
                    return False
                self._send(dst, bytes(data), chunk)
            finally:
                for fd in chunk:
                    os.close(fd)
            left -= len(data)
        return True


def trace(
    listen: str | os.PathLike[str],
    connect: str | os.PathLike[str],
    *,
    backend_connects: bool = False,
    device: str | None = None,
) -> Iterator[Record]:
    """Runs a :class:`Tracer` and yields its records until the caller stops iterating
    (the proxy is closed then)."""
    with Tracer(listen, connect, backend_connects=backend_connects, device=device) as tracer:
        yield from tracer.records()


__all__ = [
    "Event",
    "Field",
    "Message",
    "Record",
    "Tracer",
    "device_id",
    "feature_names",
    "flag_names",
    "trace",
]
