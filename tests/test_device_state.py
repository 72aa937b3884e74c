"""Device state for live migration (``DEVICE_STATE``: ``SET_DEVICE_STATE_FD``,
``CHECK_DEVICE_STATE``), end to end with real processes and real pipes.

- Our daemon, both ways: a Python device whose state is visible (a counter it writes into
  every buffer) is saved from daemon A by our front-end and loaded into a fresh daemon B,
  which goes on counting where A stopped; a stateless native ``BlkDevice`` round-trips
  empty state and refuses state it would lose.
- What the daemon refuses, each as a failure status the front-end raises as a typed
  error, with the daemon's reason in its ``refused`` event, the connection kept, and no fd
  or thread left behind: a transfer while a ring runs, an unknown phase or direction, an
  fd that is not a pipe, CHECK with no transfer, garbage state (the device keeps its old
  state), a pipe closed early either way, more state than the bound, a front-end that
  never reads.
- virtiofsd (rust-vmm): our front-end saves the state of one virtiofsd (the inode it
  looked up for a guest) and loads it into a second one on the same directory, which then
  answers for that inode without any lookup of its own.
"""

from __future__ import annotations

import os
import struct
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import pytest

import peers
from daemon_util import wait_for
from vhost import EventFd, GuestMemory
from vhost.codes import MigrationPhase, ProtocolFeature, TransferDirection
from vhost.daemon import Batch, BlkDevice, Daemon, DaemonEvent, Device, EventKind
from vhost.errors import InvalidParamError, RequestRefusedError
from vhost.user import (
    BackendHandler,
    BackendListener,
    FileDescriptor,
    Frontend,
    regions_of,
    serve_in_thread,
)
from vhost.virtio import VirtioFeature, Virtqueue, place_rings, setup_queue, wait_used

pytestmark = pytest.mark.timeout(120)

PROTO = int(ProtocolFeature.REPLY_ACK | ProtocolFeature.DEVICE_STATE)
MAX_DEVICE_STATE = 64 << 20
SAVE, LOAD, STOPPED = TransferDirection.SAVE, TransferDirection.LOAD, MigrationPhase.STOPPED


# -- a device whose state shows ----------------------------------------------------------


class CounterDevice(Device):
    """Writes a running count (8 bytes, little-endian) into every buffer it gets: the
    count is its state, and the guest sees it in the bytes written."""

    device_type = 4  # an entropy source, as far as a driver can tell
    MAGIC = b"CNT1"

    def __init__(self) -> None:
        self.count = 0

    def process(self, queue: int, batch: Batch) -> None:
        for chain in batch:
            self.count += 1
            batch.complete(chain, batch.write(chain, struct.pack("<Q", self.count)))

    def save_state(self) -> bytes:
        return self.MAGIC + struct.pack("<Q", self.count)

    def load_state(self, state: bytes) -> None:
        if len(state) != 12 or not state.startswith(self.MAGIC):
            raise ValueError(f"not a counter state: {state[:16]!r} ({len(state)} bytes)")
        (self.count,) = struct.unpack("<Q", state[4:])


class BlobDevice(Device):
    """A device with a large state (more than a pipe holds), for transfers that stall."""

    device_type = 4

    def __init__(self, size: int) -> None:
        self.blob = bytes(size)

    def process(self, queue: int, batch: Batch) -> None:
        for chain in batch:
            batch.complete(chain, 0)

    def save_state(self) -> bytes:
        return self.blob


@dataclass
class Guest:
    """Guest memory with one split ring of 16 entries, kept across front-ends (it is what
    a VMM migrates itself); ``attach`` hands it to a back-end."""

    memory: GuestMemory = field(default_factory=lambda: GuestMemory.allocate([(0, 1 << 20)]))
    kick: EventFd = field(default_factory=EventFd)
    call: EventFd = field(default_factory=EventFd)

    def __post_init__(self) -> None:
        desc, avail, used = place_rings(0, 16)
        self.vq = Virtqueue(self.memory, 16, desc, avail, used, event_idx=False)

    def negotiate(self, fe: Frontend) -> None:
        fe.negotiate(protocol_features=PROTO, event_idx=False)
        fe.set_mem_table(regions_of(self.memory))

    def start(self, fe: Frontend, base: int | None = None) -> None:
        setup_queue(fe, 0, self.memory, self.vq, self.kick, self.call, base=base)

    def counts(self, n: int) -> list[int]:
        """Offers ``n`` 8-byte buffers and returns what the device wrote into each."""
        addrs = [0x10000 + 64 * i for i in range(n)]
        heads = {self.vq.add([], [(a, 8)]): a for a in addrs}
        self.vq.publish()
        self.kick.write(1)
        done: dict[int, int] = {}
        while len(done) < n:
            done.update(wait_used(self.vq, self.call))
        assert all(done[h] == 8 for h in heads)
        return sorted(struct.unpack("<Q", self.memory.read(heads[h], 8))[0] for h in heads)

    def close(self) -> None:
        self.kick.close()
        self.call.close()


def refusals(daemon: Daemon, expect: int = 1) -> list[DaemonEvent]:
    """The ``refused`` events since the last call, once ``expect`` of them arrived (the
    daemon reports a refusal just after its reply, so the front-end can be first)."""
    deadline = time.monotonic() + 5.0
    got: list[DaemonEvent] = []
    while True:
        got += [e for e in daemon.next_events(0.1) if e.kind is EventKind.REFUSED]
        if len(got) >= expect or time.monotonic() > deadline:
            return got


def threads() -> int:
    return len(os.listdir("/proc/self/task"))


@contextmanager
def no_leak(fd_count: Callable[[], int]) -> Iterator[None]:
    """Fds and threads of this process are back to where they were once the block's
    sessions ended (daemon threads end asynchronously, hence the wait)."""
    fds, tasks = fd_count(), threads()
    yield
    assert wait_for(lambda: fd_count() <= fds and threads() <= tasks, 10.0), (
        f"fds {fds} -> {fd_count()}, threads {tasks} -> {threads()}"
    )


# -- our daemon, both ways --------------------------------------------------------------


def test_python_counter_state_moves_to_a_fresh_daemon(tmp_sock_dir: Path) -> None:
    """Save from daemon A, load into daemon B: B's device goes on counting where A's
    stopped, which a fresh device (count 0) cannot do by itself."""
    src, dst = CounterDevice(), CounterDevice()
    guest = Guest()
    with (
        Daemon(src, tmp_sock_dir / "a.sock") as a,
        Daemon(dst, tmp_sock_dir / "b.sock") as b,
    ):
        with Frontend.connect(a.path) as fe:
            guest.negotiate(fe)
            guest.start(fe)
            assert guest.counts(3) == [1, 2, 3]
            base = fe.get_vring_base(0)  # the device is stopped: the spec's only phase
            state = fe.save_device_state()
        assert state == b"CNT1" + struct.pack("<Q", 3)
        assert src.count == 3  # saving does not change the source
        with Frontend.connect(b.path) as fe:
            guest.negotiate(fe)
            fe.load_device_state(state)
            guest.start(fe, base=base)
            assert guest.counts(2) == [4, 5]
        assert dst.count == 5
        assert refusals(a, 0) == [] and refusals(b, 0) == []
    guest.close()


def test_stateless_native_device_round_trips_empty_state(tmp_sock_dir: Path) -> None:
    """A native BlkDevice is stateless: it saves b"", loads b"", and refuses state that
    some stateful device saved (it would lose it silently)."""
    with Daemon(BlkDevice.ram(1 << 20), tmp_sock_dir / "blk.sock") as d, Frontend.connect(
        d.path
    ) as fe:
        _, proto = fe.negotiate(protocol_features=PROTO)
        assert proto & ProtocolFeature.DEVICE_STATE
        assert fe.save_device_state() == b""
        fe.load_device_state(b"")
        with pytest.raises(RequestRefusedError) as err:
            fe.load_device_state(b"CNT1" + bytes(8))
        assert err.value.request == "CHECK_DEVICE_STATE"
        (event,) = refusals(d)
        assert event.request == "CHECK_DEVICE_STATE"
        assert "this device is stateless, but 12 bytes of device state were sent" in str(
            event.reason
        )
        assert fe.save_device_state() == b""  # the session goes on


class OwnChannelBackend(BackendHandler):
    """A back-end (of our Python API) that answers SET_DEVICE_STATE_FD with a pipe end of
    its own, which the spec allows and which the front-end must then use instead of its
    own: its state is a byte string, written or read on a thread of its own."""

    def __init__(self, state: bytes) -> None:
        self.state = state
        self.worker: threading.Thread | None = None
        self.kept: list[int] = []
        self.failed: str | None = None

    def get_features(self) -> int:
        return int(VirtioFeature.VERSION_1 | VirtioFeature.PROTOCOL_FEATURES)

    def get_protocol_features(self) -> int:
        return PROTO

    def get_vring_base(self, index: int) -> int:
        return 0  # no ring ever starts on this device

    def set_device_state_fd(self, direction: int, phase: int, fd: FileDescriptor) -> int | None:
        fd.close()  # the front-end's end: unused, ours is returned instead
        r, w = os.pipe()
        if direction == SAVE:
            mine, theirs = w, r

            def work() -> None:
                os.write(mine, self.state)
                os.close(mine)

        else:
            mine, theirs = r, w

            def work() -> None:
                got = bytearray()
                while chunk := os.read(mine, 1 << 16):
                    got += chunk
                os.close(mine)
                self.state = bytes(got)

        self.worker = threading.Thread(target=work, daemon=True)
        self.worker.start()
        # The session sends a duplicate of `theirs`; ours closes once the transfer is
        # checked (a write end kept open here would keep the reader from its end of file).
        self.kept.append(theirs)
        return theirs

    def check_device_state(self) -> None:
        for fd in self.kept:
            os.close(fd)
        self.kept.clear()
        assert self.worker is not None
        self.worker.join(10.0)
        if self.worker.is_alive():
            raise RuntimeError("the state transfer did not finish")


def test_front_end_uses_the_channel_a_back_end_returns(tmp_sock_dir: Path) -> None:
    """When the back-end answers with its own pipe end (no NOFD bit), our front-end reads
    from or writes into that one, and its own pipe is closed."""
    be = OwnChannelBackend(b"state of the source")
    with BackendListener(tmp_sock_dir / "own.sock") as listener:
        fe = Frontend.connect(listener.path)
        session = listener.accept(timeout=10.0)
    with fe, serve_in_thread(session, be):
        fe.negotiate(protocol_features=PROTO)
        assert fe.save_device_state() == b"state of the source"
        fe.load_device_state(b"state for the destination")
        assert be.state == b"state for the destination"


# -- what the daemon refuses --------------------------------------------------------------


def test_refusals_are_typed_and_leave_the_connection_and_device_as_they_were(
    tmp_sock_dir: Path, fd_count: Callable[[], int]
) -> None:
    dev = CounterDevice()
    guest = Guest()
    with Daemon(dev, tmp_sock_dir / "c.sock") as d:
        with no_leak(fd_count), Frontend.connect(d.path) as fe:
            guest.negotiate(fe)

            def refused(request: str, reason: str, call: Callable[[], object]) -> None:
                with pytest.raises(RequestRefusedError) as err:
                    call()
                assert err.value.request == request
                events = refusals(d)
                assert [e.request for e in events] == [request], events
                assert reason in str(events[0].reason), events[0]

            # CHECK with no transfer to check.
            refused("CHECK_DEVICE_STATE", "no device state transfer", fe.check_device_state)
            r, w = os.pipe()
            try:
                # A phase the spec may add one day, and a direction that does not exist:
                # a failure status, not a closed connection.
                refused(
                    "SET_DEVICE_STATE_FD",
                    "phase 1 is not supported",
                    lambda: fe.set_device_state_fd(SAVE, 1, w),
                )
                refused(
                    "SET_DEVICE_STATE_FD",
                    "direction 7 is neither save (0) nor load (1)",
                    lambda: fe.set_device_state_fd(7, STOPPED, w),
                )
                # The read end of a pipe to save into; an eventfd instead of a pipe.
                refused(
                    "SET_DEVICE_STATE_FD",
                    "not open for writing",
                    lambda: fe.set_device_state_fd(SAVE, STOPPED, r),
                )
                with EventFd() as ev:
                    refused(
                        "SET_DEVICE_STATE_FD",
                        "not a pipe or a socket",
                        lambda: fe.set_device_state_fd(LOAD, STOPPED, ev),
                    )
            finally:
                os.close(r)
                os.close(w)
            # A running ring: the device is not stopped.
            guest.start(fe)
            assert guest.counts(2) == [1, 2]
            refused("SET_DEVICE_STATE_FD", "ring 0 is running", fe.save_device_state)
            base = fe.get_vring_base(0)
            # Garbage state: the device raises, CHECK fails with the exception's text,
            # and the device keeps its count.
            refused(
                "CHECK_DEVICE_STATE",
                "ValueError: not a counter state: b'garbage'",
                lambda: fe.load_device_state(b"garbage"),
            )
            assert dev.count == 2
            assert fe.save_device_state() == b"CNT1" + struct.pack("<Q", 2)
            guest.start(fe, base=base)
            assert guest.counts(1) == [3]
            fe.get_vring_base(0)
            assert fe.get_features()  # the connection survived every refusal
        # The session's end is counted once its thread has finished tearing it down.
        assert d.running and wait_for(lambda: d.sessions_ended == 1, 10.0)
    guest.close()


class FailingDevice(CounterDevice):
    """Cannot save its state: a device bug, or state it cannot serialise."""

    def save_state(self) -> bytes:
        raise RuntimeError("the counter is locked")


def test_a_device_that_fails_to_save(tmp_sock_dir: Path, fd_count: Callable[[], int]) -> None:
    """The exception becomes a failed CHECK_DEVICE_STATE (its text in the daemon's event),
    the pipe is closed so the front-end is not left waiting, and the daemon goes on."""
    with (
        Daemon(FailingDevice(), tmp_sock_dir / "f.sock") as d,
        no_leak(fd_count),
        Frontend.connect(d.path) as fe,
    ):
        fe.negotiate(protocol_features=PROTO)
        with pytest.raises(RequestRefusedError) as err:
            fe.save_device_state()
        assert err.value.request == "CHECK_DEVICE_STATE"
        (event,) = refusals(d)
        assert "saving the device state: device failed: RuntimeError: the counter is locked" in (
            str(event.reason)
        ), event
        assert fe.get_features()


def test_pipe_closed_early_either_way(tmp_sock_dir: Path, fd_count: Callable[[], int]) -> None:
    """The front-end closes its end before the transfer is over: saving gets EPIPE (no
    SIGPIPE), loading gets a truncated state the device refuses; CHECK says so."""
    dev = CounterDevice()
    dev.count = 41
    with (
        Daemon(dev, tmp_sock_dir / "p.sock") as d,
        no_leak(fd_count),
        Frontend.connect(d.path) as fe,
    ):
        fe.negotiate(protocol_features=PROTO)
        r, w = os.pipe()
        os.close(r)  # nobody will ever read
        assert fe.set_device_state_fd(SAVE, STOPPED, w) is None
        os.close(w)
        with pytest.raises(RequestRefusedError):
            fe.check_device_state()
        (event,) = refusals(d)
        assert "writing 12 bytes of device state: the reading end was closed" in str(
            event.reason
        ), event
        r, w = os.pipe()
        fe.set_device_state_fd(LOAD, STOPPED, r)
        os.close(r)
        os.write(w, b"CNT1\x07")  # cut short
        os.close(w)
        with pytest.raises(RequestRefusedError):
            fe.check_device_state()
        (event,) = refusals(d)
        assert "loading 5 bytes of device state" in str(event.reason), event
        assert dev.count == 41
        assert fe.save_device_state() == b"CNT1" + struct.pack("<Q", 41)


def test_state_larger_than_the_bound(tmp_sock_dir: Path, fd_count: Callable[[], int]) -> None:
    """Both sides bound what they buffer: our front-end refuses to send more than 64 MiB,
    and the daemon stops reading a front-end that sends more (and says so in CHECK)."""
    with (
        Daemon(CounterDevice(), tmp_sock_dir / "big.sock") as d,
        no_leak(fd_count),
        Frontend.connect(d.path) as fe,
    ):
        fe.negotiate(protocol_features=PROTO)
        with pytest.raises(InvalidParamError, match="larger than the 67108864 bytes"):
            fe.load_device_state(bytes(MAX_DEVICE_STATE + 1))
        r, w = os.pipe()
        fe.set_device_state_fd(LOAD, STOPPED, r)
        os.close(r)
        sent = 0
        chunk = bytes(1 << 20)
        try:
            while sent <= MAX_DEVICE_STATE:
                sent += os.write(w, chunk)
        except BrokenPipeError:
            pass  # the daemon gave up reading and closed its end
        finally:
            os.close(w)
        with pytest.raises(RequestRefusedError):
            fe.check_device_state()
        (event,) = refusals(d)
        assert f"more than {MAX_DEVICE_STATE} bytes" in str(event.reason), event


def test_a_front_end_that_never_reads_cannot_keep_the_transfer(
    tmp_sock_dir: Path, fd_count: Callable[[], int]
) -> None:
    """A save the front-end never reads (1 MiB, more than a pipe holds) blocks only its
    own thread: the daemon answers other requests meanwhile, and when the session ends
    the transfer is cancelled at once (its pipe end closed), long before its 10 s bound."""
    with Daemon(BlobDevice(1 << 20), tmp_sock_dir / "blob.sock") as d, no_leak(fd_count):
        r, w = os.pipe()
        try:
            with Frontend.connect(d.path) as fe:
                fe.negotiate(protocol_features=PROTO)
                fe.set_device_state_fd(SAVE, STOPPED, w)
                os.close(w)
                w = -1
                assert fe.get_features()  # the control plane is not blocked
            # The session is over: the daemon's write end must be closed now.
            got = bytearray()
            done = threading.Event()

            def drain() -> None:
                while chunk := os.read(r, 1 << 16):
                    got.extend(chunk)
                done.set()

            threading.Thread(target=drain, daemon=True).start()
            assert done.wait(5.0), "the daemon still holds the pipe after the session"
            assert 0 < len(got) < 1 << 20
            assert wait_for(lambda: d.sessions_ended == 1)
        finally:
            os.close(r)
            if w >= 0:
                os.close(w)


# -- virtiofsd ------------------------------------------------------------------------------

FUSE_IN = struct.Struct("<IIQQIIIHH")  # len, opcode, unique, nodeid, uid, gid, pid, extlen, pad
FUSE_OUT = struct.Struct("<IiQ")  # len, error, unique
FUSE_LOOKUP, FUSE_GETATTR, FUSE_INIT = 1, 3, 26
ROOT_ID = 1
# struct fuse_attr: ino, size, blocks, atime, mtime, ctime, then ten u32s.
ATTR = struct.Struct("<QQQQQQIIIIIIIIII")
ENTRY_OUT = struct.Struct("<QQQQII")  # nodeid, generation, entry/attr valid (+ nsec)
ATTR_OUT = struct.Struct("<QII")  # attr_valid, attr_valid_nsec, dummy
REQUEST_QUEUE = 1  # queue 0 is virtio-fs's high-priority queue


class FuseGuest:
    """The guest's virtio-fs driver, as little of it as the test needs: FUSE requests on
    the request queue of any back-end (attach again after a migration)."""

    def __init__(self) -> None:
        self.g = Guest()
        self.unique = 0

    def attach(self, fe: Frontend, base: int | None = None) -> None:
        g = self.g
        setup_queue(fe, REQUEST_QUEUE, g.memory, g.vq, g.kick, g.call, base=base)

    def request(self, opcode: int, nodeid: int, body: bytes) -> tuple[int, bytes]:
        """One FUSE request; returns (error, reply body)."""
        self.unique += 1
        header = FUSE_IN.pack(
            FUSE_IN.size + len(body), opcode, self.unique, nodeid, os.getuid(), os.getgid(),
            os.getpid(), 0, 0,
        )  # fmt: skip
        req, out = 0x20000, 0x30000
        self.g.memory.write(req, header + body)
        self.g.memory.write(out, bytes(4096))
        self.g.vq.add([(req, FUSE_IN.size + len(body))], [(out, 4096)])
        self.g.vq.publish()
        self.g.kick.write(1)
        ((_, written),) = wait_used(self.g.vq, self.g.call)
        length, error, unique = FUSE_OUT.unpack(self.g.memory.read(out, FUSE_OUT.size))
        assert unique == self.unique and length == written
        return error, self.g.memory.read(out + FUSE_OUT.size, length - FUSE_OUT.size)

    def getattr(self, nodeid: int) -> tuple[int, tuple[int, ...]]:
        """(error, fuse_attr fields) of inode ``nodeid``."""
        error, body = self.request(FUSE_GETATTR, nodeid, bytes(16))
        if error:
            return error, ()
        return 0, ATTR.unpack_from(body, ATTR_OUT.size)


def test_virtiofsd_state_moves_between_two_virtiofsd(tmp_sock_dir: Path) -> None:
    """Our front-end against virtiofsd's own device-state migration: the source looked up
    a file for the guest (FUSE INIT, LOOKUP: inode N); its saved state, loaded into a
    second virtiofsd sharing the directory, makes that one answer GETATTR on N, which it
    refused before the load (it never saw a LOOKUP)."""
    shared = tmp_sock_dir / "share"
    shared.mkdir()
    payload = b"written on the source host\n"
    (shared / "hello.txt").write_bytes(payload)
    ino = os.stat(shared / "hello.txt").st_ino
    fs = FuseGuest()
    with (
        peers.virtiofsd(shared, tmp_sock_dir / "src.sock") as src,
        peers.virtiofsd(shared, tmp_sock_dir / "dst.sock") as dst,
    ):
        with Frontend.connect(src.socket_path) as fe:
            fs.g.negotiate(fe)
            fs.attach(fe)
            error, _ = fs.request(FUSE_INIT, 0, struct.pack("<IIII", 7, 31, 0, 0))
            assert error == 0
            error, entry = fs.request(FUSE_LOOKUP, ROOT_ID, b"hello.txt\0")
            assert error == 0
            node = ENTRY_OUT.unpack_from(entry)[0]
            attr = ATTR.unpack_from(entry, ENTRY_OUT.size)
            assert node != ROOT_ID and attr[:2] == (ino, len(payload))
            # The spec's phase: the device stopped (every ring), then the state.
            base = fe.get_vring_base(REQUEST_QUEUE)
            state = fe.save_device_state()
            # (virtiofsd serves one front-end: it exits once this one disconnects.)
            assert src.alive(), src.output()
        assert len(state) > 0
        with Frontend.connect(dst.socket_path) as fe:
            fs.g.negotiate(fe)
            fs.attach(fe, base=base)
            error, _ = fs.getattr(node)
            assert error < 0  # this virtiofsd does not know inode N
            base = fe.get_vring_base(REQUEST_QUEUE)
            fe.load_device_state(state)
            fs.attach(fe, base=base)
            error, attr = fs.getattr(node)
            assert error == 0, f"GETATTR after the load: errno {-error}"
            assert attr[:2] == (ino, len(payload))
            # Garbage is refused by virtiofsd's own CHECK_DEVICE_STATE.
            fe.get_vring_base(REQUEST_QUEUE)
            with pytest.raises(RequestRefusedError) as err:
                fe.load_device_state(b"garbage")
            assert err.value.request == "CHECK_DEVICE_STATE"
            assert dst.alive(), dst.output()
    fs.g.close()
