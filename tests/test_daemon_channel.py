"""The back-end channel handed to devices (issue 10): a device served by the daemon talks to
its front-end. Our own :class:`~vhost.user.Frontend` sets up the channel and a
:class:`~vhost.user.FrontendChannel` thread records what the daemon sends: the
config-change notification of a resize (native and Python blk), shared objects (the
lookup's dma-buf fd crosses the Python boundary both ways), in-band ``VRING_CALL`` and
``VRING_ERR`` when ``INBAND_NOTIFICATIONS`` is negotiated and the ring has no call (err)
fd, and the refusals: no front-end, no channel, a protocol feature not acked. Every case
before this issue fails at once: the daemon did not offer ``BACKEND_REQ``.
"""

from __future__ import annotations

import os
import queue
import signal
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from types import MappingProxyType

import pytest

from daemon_util import S_OK, SECTOR, T_IN, BlkGuest, MiB, ServeProc, make_image, wait_for
from vhost import FileDescriptor
from vhost.codes import ProtocolFeature as PF
from vhost.daemon import Batch, BlkDevice, Daemon, DaemonEvent, Device, Resized
from vhost.devices.blkdev import PythonBlkDevice
from vhost.errors import (
    ClosedError,
    DisconnectedError,
    InactiveFeatureError,
    InvalidParamError,
    VhostError,
)
from vhost.user import (
    BackendChannel,
    BackendHandler,
    BackendListener,
    Frontend,
    FrontendChannel,
    FrontendRequestHandler,
    SharedObject,
    regions_of,
    serve_in_thread,
)
from vhost.virtio import place_rings, setup_queue

pytestmark = pytest.mark.timeout(120)

IMAGE_SIZE = 4 * MiB
TIMEOUT = 10.0
#: What a front-end acks to let the device talk back: the channel, acks on it, and every
#: request kind the daemon offers on it.
CHANNEL = PF.BACKEND_REQ | PF.BACKEND_SEND_FD | PF.REPLY_ACK | PF.CONFIG | PF.SHARED_OBJECT
BASIC = PF.MQ | PF.REPLY_ACK | PF.CONFIG


def capacity_of(fe: Frontend) -> int:
    return int.from_bytes(fe.get_config(0, 8), "little")


@dataclass
class Recorder(FrontendRequestHandler):
    """A front-end's answers to the back-end's requests, recorded in order. Its shared
    object table holds memfds (as a VMM's holds dma-bufs)."""

    got: queue.Queue[tuple[object, ...]] = field(default_factory=queue.Queue)
    objects: dict[bytes, int] = field(default_factory=dict)

    def next(self, timeout: float = TIMEOUT) -> tuple[object, ...]:
        return self.got.get(timeout=timeout)

    def config_change(self) -> int | None:
        self.got.put(("config_change",))
        return 0

    def vring_call(self, index: int) -> int | None:
        self.got.put(("vring_call", index))
        return 0

    def vring_err(self, index: int) -> int | None:
        self.got.put(("vring_err", index))
        return 0

    def shared_object_add(self, uuid: bytes) -> int | None:
        self.got.put(("shared_object_add", uuid))
        return 0

    def shared_object_remove(self, uuid: bytes) -> int | None:
        self.got.put(("shared_object_remove", uuid))
        return 0

    def shared_object_lookup(self, uuid: bytes) -> int | SharedObject | None:
        self.got.put(("shared_object_lookup", uuid))
        fd = self.objects.get(uuid)
        return SharedObject(fd) if fd is not None else 1

    def close(self) -> None:
        for fd in self.objects.values():
            os.close(fd)


@dataclass
class Session:
    fe: Frontend
    front: Recorder
    channel: FrontendChannel | None
    errors: list[BaseException]


def _serve_channel(ch: FrontendChannel, front: Recorder, errors: list[BaseException]) -> None:
    while True:
        try:
            ch.process_one(front)
        except (ClosedError, DisconnectedError, OSError):
            return
        except VhostError as exc:
            if ch.broken:
                return
            errors.append(exc.with_traceback(None))


@contextmanager
def session(
    daemon: Daemon, protocol: int, *, channel: bool = True, memory: BlkGuest | None = None
) -> Iterator[Session]:
    """A front-end of ours on ``daemon``: negotiates ``protocol`` (what the daemon offers
    of it), and with ``channel`` hands over the back-end channel and serves it in a
    thread. With ``memory``, also shares the guest's memory and sets its rings up."""
    fe = Frontend.connect(daemon.path, timeout=TIMEOUT)
    front = Recorder()
    errors: list[BaseException] = []
    ch: FrontendChannel | None = None
    thread: threading.Thread | None = None
    try:
        offered = fe.get_features()
        features = memory.features(offered) if memory is not None else offered
        fe.negotiate(features=features, protocol_features=int(protocol))
        if channel:
            ch = fe.set_backend_req_fd()
            thread = threading.Thread(target=_serve_channel, args=(ch, front, errors), daemon=True)
            thread.start()
        if memory is not None:
            fe.set_mem_table(regions_of(memory.memory))
            for q, vq in enumerate(memory.vqs):
                setup_queue(fe, q, memory.memory, vq, memory.kicks[q], memory.calls[q])
            memory.fe = fe
        fe.get_features()  # a reply: everything before it has been handled
        yield Session(fe, front, ch, errors)
        assert errors == []
    finally:
        fe.close()
        if ch is not None:
            ch.close()
        if thread is not None:
            thread.join(TIMEOUT)
            assert not thread.is_alive()
        front.close()
        wait_for(lambda: not daemon.active, TIMEOUT)


def _native(image: Path) -> BlkDevice:
    return BlkDevice(image)


def _python(image: Path) -> PythonBlkDevice:
    return PythonBlkDevice(image)


@pytest.fixture(params=["native", "python"])
def blk(
    request: pytest.FixtureRequest, tmp_path: Path, tmp_sock_dir: Path
) -> Iterator[tuple[Daemon, Path]]:
    image = tmp_path / "disk.img"
    make_image(image, IMAGE_SIZE)
    make: Callable[[Path], BlkDevice | PythonBlkDevice] = (
        _native if request.param == "native" else _python
    )
    device = make(image)
    with Daemon(device, tmp_sock_dir / "blk.sock") as daemon:
        yield daemon, image
    if isinstance(device, PythonBlkDevice):
        device.close()


# -- resize ----------------------------------------------------------------------------


def test_resize_tells_the_frontend_and_the_new_sectors_work(blk: tuple[Daemon, Path]) -> None:
    daemon, image = blk
    guest = BlkGuest(1)
    old = IMAGE_SIZE // SECTOR
    try:
        with session(daemon, CHANNEL, memory=guest) as s:
            assert capacity_of(s.fe) == old
            # Past the end: refused before the resize.
            assert guest.read(0, IMAGE_SIZE, SECTOR)[0] != S_OK
            with open(image, "r+b") as f:
                f.truncate(2 * IMAGE_SIZE)
            assert daemon.resize() == Resized(old, 2 * old, True)
            assert s.front.next() == ("config_change",)
            assert capacity_of(s.fe) == 2 * old
            # The new sectors read and write through the ring, into the file.
            data = os.urandom(4096)
            assert guest.write(0, IMAGE_SIZE + 8192, data) == S_OK
            assert guest.read(0, IMAGE_SIZE + 8192, 4096) == (S_OK, data)
            with open(image, "rb") as f:
                f.seek(IMAGE_SIZE + 8192)
                assert f.read(4096) == data
            # The same size again: nothing to tell.
            assert daemon.resize() == Resized(2 * old, 2 * old, False)
            assert s.front.got.empty()
    finally:
        guest.close()


def test_explicit_size_grows_the_file_and_shrinking_is_refused(
    blk: tuple[Daemon, Path],
) -> None:
    daemon, image = blk
    old = IMAGE_SIZE // SECTOR
    with session(daemon, CHANNEL) as s:
        assert daemon.resize(3 * IMAGE_SIZE) == Resized(old, 3 * old, True)
        assert s.front.next() == ("config_change",)
        assert image.stat().st_size == 3 * IMAGE_SIZE
        with pytest.raises(InvalidParamError, match="not a multiple of 512"):
            daemon.resize(3 * IMAGE_SIZE + 100)
        with pytest.raises(InvalidParamError, match="never shrunk"):
            daemon.resize(IMAGE_SIZE)
        # The host shrinks the file itself: refused too, the disk keeps its size.
        os.truncate(image, 2 * IMAGE_SIZE)
        with pytest.raises(InvalidParamError, match=rf"\({2 * old} sectors\).*\({3 * old} "):
            daemon.resize()
        assert capacity_of(s.fe) == 3 * old
        assert s.front.got.empty()


@pytest.mark.parametrize("make", [BlkDevice, PythonBlkDevice])
def test_a_readonly_disk_grows_with_its_image_but_never_writes_it(
    make: Callable[..., BlkDevice | PythonBlkDevice], tmp_path: Path
) -> None:
    image = tmp_path / "ro.img"
    make_image(image, IMAGE_SIZE)
    device = make(image, readonly=True)
    old = IMAGE_SIZE // SECTOR
    with pytest.raises(InvalidParamError, match="served read-only"):
        device.resize(2 * IMAGE_SIZE)
    assert image.stat().st_size == IMAGE_SIZE
    assert device.capacity == old
    os.truncate(image, 2 * IMAGE_SIZE)
    # Not served by a daemon: nobody to tell.
    assert device.resize() == (old, 2 * old, False)
    assert device.capacity == 2 * old
    if isinstance(device, PythonBlkDevice):
        device.close()


def test_resize_without_a_frontend_is_read_by_the_next(blk: tuple[Daemon, Path]) -> None:
    daemon, image = blk
    old = IMAGE_SIZE // SECTOR
    os.truncate(image, 2 * IMAGE_SIZE)
    assert daemon.resize() == Resized(old, 2 * old, False)
    with session(daemon, BASIC, channel=False) as s:
        assert capacity_of(s.fe) == 2 * old


def test_resize_for_a_frontend_without_the_channel_says_so(blk: tuple[Daemon, Path]) -> None:
    daemon, image = blk
    with session(daemon, BASIC, channel=False) as s:
        os.truncate(image, 2 * IMAGE_SIZE)
        with pytest.raises(InactiveFeatureError, match="did not set up the back-end channel"):
            daemon.resize()
        # The disk did grow: the front-end reads it the next time it asks.
        assert capacity_of(s.fe) == 2 * IMAGE_SIZE // SECTOR


def test_config_change_needs_config_acked(blk: tuple[Daemon, Path]) -> None:
    daemon, _ = blk
    with session(daemon, CHANNEL & ~PF.CONFIG) as s:
        with pytest.raises(InactiveFeatureError, match="CONFIG_CHANGE_MSG needs CONFIG"):
            daemon.notify_config_changed()
        assert s.front.got.empty()


# -- a Python device's own requests ------------------------------------------------------


class Exporter(Device):
    """A device that shares objects with other devices through the front-end."""

    device_type = 4

    def process(self, queue: int, batch: Batch) -> None:
        for chain in batch:
            batch.complete(chain, 0)


@pytest.fixture
def exporter(tmp_sock_dir: Path) -> Iterator[tuple[Daemon, Exporter]]:
    device = Exporter()
    with Daemon(device, tmp_sock_dir / "dev.sock") as daemon:
        yield daemon, device


def test_device_shares_objects_and_looks_one_up_with_its_fd(
    exporter: tuple[Daemon, Exporter],
) -> None:
    daemon, device = exporter
    mine, theirs, unknown = (uuid.uuid4().bytes for _ in range(3))
    with session(daemon, CHANNEL) as s:
        # Another device's dma-buf, as the front-end keeps it: a memfd with content.
        buf = os.memfd_create("other-device-buffer")
        os.write(buf, b"exported by another device")
        s.front.objects[theirs] = buf
        link = device.frontend
        assert link.connected and link.has_channel
        link.shared_object_add(mine)
        assert s.front.next() == ("shared_object_add", mine)
        fd = link.shared_object_lookup(theirs)
        assert s.front.next() == ("shared_object_lookup", theirs)
        assert isinstance(fd, FileDescriptor)
        with fd:
            # The very object the front-end holds, now ours: another fd on the same file.
            assert os.fstat(fd.fileno()).st_ino == os.fstat(buf).st_ino
            assert os.pread(fd.fileno(), 64, 0) == b"exported by another device"
        assert link.shared_object_lookup(unknown) is None
        assert s.front.next() == ("shared_object_lookup", unknown)
        link.shared_object_remove(mine)
        assert s.front.next() == ("shared_object_remove", mine)


def test_device_requests_are_refused_clearly(exporter: tuple[Daemon, Exporter]) -> None:
    daemon, device = exporter
    u = uuid.uuid4().bytes
    link = device.frontend
    assert not link.connected
    with pytest.raises(DisconnectedError, match="SHARED_OBJECT_ADD: no front-end is connected"):
        link.shared_object_add(u)
    with (
        session(daemon, BASIC, channel=False),
        pytest.raises(InactiveFeatureError, match="did not set up the back-end channel"),
    ):
        link.shared_object_add(u)
    with session(daemon, CHANNEL & ~PF.SHARED_OBJECT) as s:
        with pytest.raises(InactiveFeatureError, match="SHARED_OBJECT_ADD needs SHARED_OBJECT"):
            link.shared_object_add(u)
        # SHMEM is not offered by a device without shared memory regions: never acked.
        memfd = os.memfd_create("window")
        try:
            with pytest.raises(InactiveFeatureError, match="SHMEM_MAP needs SHMEM"):
                link.shmem_map(0, 0, 0, 4096, memfd)
        finally:
            os.close(memfd)
        with pytest.raises(InactiveFeatureError, match="SHMEM_UNMAP needs SHMEM"):
            link.shmem_unmap(0, 0, 4096)
        assert s.front.got.empty()
    # The session is over: the link says so again.
    wait_for(lambda: not link.connected, TIMEOUT)
    with pytest.raises(DisconnectedError):
        link.shared_object_add(u)


def test_a_device_without_a_daemon_has_no_frontend() -> None:
    with pytest.raises(DisconnectedError, match="no Daemon serves this device"):
        _ = Exporter().frontend


class Window(Device):
    """A device with a VIRTIO Shared Memory Region (as virtio-fs's DAX window), into which
    it maps a file through the front-end."""

    device_type = 26
    shmem_regions = MappingProxyType({0: 1 << 20})

    def process(self, queue: int, batch: Batch) -> None:
        for chain in batch:
            batch.complete(chain, 0)


@dataclass
class Mapper(Recorder):
    """Records SHMEM_MAP/SHMEM_UNMAP and what the mapped fd holds at its offset."""

    def shmem_map(  # noqa: PLR0917 - the handler's signature
        self,
        shmid: int,
        fd_offset: int,
        shm_offset: int,
        length: int,
        fd: FileDescriptor,
        flags: int,
    ) -> int | None:
        content = os.pread(fd.fileno(), length, fd_offset)
        self.got.put(("shmem_map", shmid, fd_offset, shm_offset, length, flags, content))
        return 0

    def shmem_unmap(self, shmid: int, shm_offset: int, length: int) -> int | None:
        self.got.put(("shmem_unmap", shmid, shm_offset, length))
        return 0


def test_a_python_device_maps_a_file_into_its_shared_memory(tmp_sock_dir: Path) -> None:
    """SHMEM_MAP from a Python device reaches the front-end with the very file (its
    bytes at the offset), and the flags say writable only when asked."""
    device = Window()
    with Daemon(device, tmp_sock_dir / "win.sock") as daemon:
        fe = Frontend.connect(daemon.path, timeout=TIMEOUT)
        front = Mapper()
        errors: list[BaseException] = []
        fe.negotiate(features=fe.get_features(), protocol_features=int(CHANNEL | PF.SHMEM))
        assert fe.acked_protocol_features & PF.SHMEM
        assert fe.get_shmem_config().regions == {0: 1 << 20}
        ch = fe.set_backend_req_fd()
        thread = threading.Thread(target=_serve_channel, args=(ch, front, errors))
        thread.start()
        try:
            memfd = os.memfd_create("file")
            try:
                os.pwrite(memfd, b"page two" + bytes(4088), 4096)
                device.frontend.shmem_map(0, 4096, 8192, 4096, memfd)
                got = front.next()
                assert got[:6] == ("shmem_map", 0, 4096, 8192, 4096, 0)
                assert isinstance(got[6], bytes) and got[6].startswith(b"page two")
                device.frontend.shmem_map(0, 0, 0, 4096, memfd, writable=True)
                assert front.next()[5] == 1
                device.frontend.shmem_unmap(0, 8192, 4096)
                assert front.next() == ("shmem_unmap", 0, 8192, 4096)
                # a bad offset is the caller's InvalidParamError, as on BackendChannel
                with pytest.raises(InvalidParamError, match="fd_offset"):
                    device.frontend.shmem_map(0, -1, 0, 4096, memfd)
            finally:
                os.close(memfd)
        finally:
            fe.close()
            ch.close()
            thread.join(TIMEOUT)
            front.close()
        assert errors == []


# -- in-band notifications ----------------------------------------------------------------


@pytest.fixture
def ramdisk(tmp_sock_dir: Path) -> Iterator[Daemon]:
    with Daemon(BlkDevice.ram(IMAGE_SIZE), tmp_sock_dir / "ram.sock") as daemon:
        yield daemon


def test_inband_vring_call_without_a_call_fd(ramdisk: Daemon) -> None:
    guest = BlkGuest(1)
    try:
        with session(ramdisk, CHANNEL | PF.INBAND_NOTIFICATIONS, memory=guest) as s:
            s.fe.set_vring_call(0, None)
            s.fe.get_features()
            head = guest.add(0, T_IN, 0, in_len=SECTOR)
            guest.kick(0, force=True)
            assert s.front.next() == ("vring_call", 0)
            assert [h for h, _ in guest.vqs[0].poll_used()] == [head]
            # No call eventfd was written: the in-band message was the only signal.
            assert not guest.calls[0].wait(0)
    finally:
        guest.close()


def test_no_inband_vring_call_without_the_feature(ramdisk: Daemon) -> None:
    guest = BlkGuest(1)
    try:
        with session(ramdisk, CHANNEL, memory=guest) as s:
            s.fe.set_vring_call(0, None)
            s.fe.get_features()
            head = guest.add(0, T_IN, 0, in_len=SECTOR)
            guest.kick(0, force=True)
            assert wait_for(lambda: ramdisk.completed == [1], TIMEOUT)
            assert [h for h, _ in guest.vqs[0].poll_used()] == [head]
            with pytest.raises(queue.Empty):
                s.front.next(timeout=0.5)
    finally:
        guest.close()


def test_inband_vring_err_when_a_queue_fails(ramdisk: Daemon) -> None:
    guest = BlkGuest(1)
    try:
        with session(ramdisk, CHANNEL | PF.INBAND_NOTIFICATIONS, memory=guest) as s:
            s.fe.set_vring_err(0, None)
            # An avail index more than a ring ahead of the used one breaks the ring.
            _, avail, _ = place_rings(0, guest.size)
            guest.memory.write(avail + 2, (guest.size + 5).to_bytes(2, "little"))
            guest.kicks[0].write(1)
            assert s.front.next() == ("vring_err", 0)
            # next_events returns what happened so far once the first event is there
            # (the session's start may come alone): collect until the failure shows.
            events: list[DaemonEvent] = []
            deadline = time.monotonic() + TIMEOUT
            while not any(e.kind == "queue-failed" and e.queue == 0 for e in events):
                assert time.monotonic() < deadline, events
                events += ramdisk.next_events(0.1)
    finally:
        guest.close()


# -- no leaks ----------------------------------------------------------------------------------


def test_channel_sessions_leak_no_fds(
    exporter: tuple[Daemon, Exporter], fd_count: Callable[[], int]
) -> None:
    daemon, device = exporter
    theirs = uuid.uuid4().bytes

    def one_session() -> None:
        with session(daemon, CHANNEL) as s:
            s.front.objects[theirs] = os.memfd_create("buffer")
            for _ in range(5):
                fd = device.frontend.shared_object_lookup(theirs)
                assert fd is not None
                fd.close()
                assert s.front.next()[0] == "shared_object_lookup"

    one_session()
    before = fd_count()
    for _ in range(3):
        one_session()
    assert wait_for(lambda: fd_count() == before, TIMEOUT), (fd_count(), before)


# -- serve blk and SIGHUP ------------------------------------------------------------------


@pytest.mark.parametrize("impl", ["native", "python"])
def test_serve_blk_resizes_on_sighup_and_reports_each_outcome(
    impl: str, tmp_path: Path, tmp_sock_dir: Path
) -> None:
    image = tmp_path / "disk.img"
    make_image(image, IMAGE_SIZE)
    sock = tmp_sock_dir / "blk.sock"
    extra = ["--python"] if impl == "python" else []
    proc = ServeProc(["blk", "--image", str(image), *extra], sock, tmp_path / "serve.log")
    old = IMAGE_SIZE // SECTOR
    try:
        assert wait_for(lambda: proc.catches(signal.SIGHUP), TIMEOUT)

        def hangup(expect: str) -> None:
            proc.proc.send_signal(signal.SIGHUP)
            assert wait_for(lambda: expect in proc.stderr(), TIMEOUT), proc.stderr()

        os.truncate(image, 2 * IMAGE_SIZE)
        hangup(
            f"resized {image}: {old} -> {2 * old} sectors ({2 * IMAGE_SIZE} bytes); no front-end"
        )
        # A front-end without the back-end channel cannot be told; the disk grows anyway.
        fe = Frontend.connect(sock, timeout=TIMEOUT)
        try:
            fe.negotiate(protocol_features=int(BASIC))
            os.truncate(image, 3 * IMAGE_SIZE)
            hangup(f"resized {image} to {3 * old} sectors, but the guest was not told: ")
            assert capacity_of(fe) == 3 * old
        finally:
            fe.close()
        hangup(f"resize {image}: the size is unchanged ({3 * old} sectors)")
        os.truncate(image, IMAGE_SIZE)
        hangup(
            f"error: resize {image}: the new size ({old} sectors) is smaller than the disk "
            f"({3 * old} sectors); a disk is only grown, never shrunk under a guest; "
            f"the disk keeps its size ({3 * old} sectors)"
        )
        assert proc.alive()
        assert "Traceback" not in proc.stderr()
        assert proc.terminate() == 0
    finally:
        proc.close()


def test_serve_rng_outlives_sighup(tmp_path: Path, tmp_sock_dir: Path) -> None:
    """SIGHUP is a daemon's reload signal; ``serve rng`` has nothing to reload, says so
    and keeps serving (the default action would kill it)."""
    sock = tmp_sock_dir / "rng.sock"
    proc = ServeProc(["rng"], sock, tmp_path / "serve.log")
    try:
        assert wait_for(lambda: proc.catches(signal.SIGHUP), TIMEOUT)
        proc.proc.send_signal(signal.SIGHUP)
        expect = "serve rng: SIGHUP: nothing to reload; still serving"
        assert wait_for(lambda: expect in proc.stderr(), TIMEOUT), proc.stderr()
        assert proc.alive()
        with Frontend.connect(sock, timeout=TIMEOUT) as fe:
            assert fe.get_features()
        assert "Traceback" not in proc.stderr()
        assert proc.terminate() == 0
    finally:
        proc.close()


class SlowAck(Recorder):
    """Holds each config-change ack until released: a front-end busy elsewhere."""

    def __init__(self) -> None:
        super().__init__()
        self.release = threading.Event()

    def config_change(self) -> int | None:
        self.got.put(("config_change",))
        self.release.wait(TIMEOUT)
        self.release.clear()
        return 0


def test_a_sighup_during_a_resize_runs_after_it(tmp_path: Path, tmp_sock_dir: Path) -> None:
    image = tmp_path / "disk.img"
    make_image(image, IMAGE_SIZE)
    sock = tmp_sock_dir / "blk.sock"
    proc = ServeProc(["blk", "--image", str(image)], sock, tmp_path / "serve.log")
    old = IMAGE_SIZE // SECTOR
    front = SlowAck()
    errors: list[BaseException] = []
    try:
        assert wait_for(lambda: proc.catches(signal.SIGHUP), TIMEOUT)
        fe = Frontend.connect(sock, timeout=TIMEOUT)
        fe.negotiate(protocol_features=int(CHANNEL))
        ch = fe.set_backend_req_fd()
        thread = threading.Thread(target=_serve_channel, args=(ch, front, errors), daemon=True)
        thread.start()
        try:
            fe.get_features()
            os.truncate(image, 2 * IMAGE_SIZE)
            proc.proc.send_signal(signal.SIGHUP)
            assert front.next() == ("config_change",)  # serve blk now waits for the ack
            os.truncate(image, 3 * IMAGE_SIZE)
            proc.proc.send_signal(signal.SIGHUP)  # arrives while the first one waits
            front.release.set()
            assert front.next() == ("config_change",)
            front.release.set()
            assert wait_for(lambda: f"-> {3 * old} sectors" in proc.stderr(), TIMEOUT), (
                proc.stderr()
            )
            assert f"{old} -> {2 * old} sectors" in proc.stderr()
            assert capacity_of(fe) == 3 * old
        finally:
            fe.close()
            ch.close()
            thread.join(TIMEOUT)
        assert errors == []
        assert proc.terminate() == 0
    finally:
        proc.close()


class ChannelHolder(BackendHandler):
    """A plain (non-daemon) Python back-end that keeps the channel it is given."""

    def __init__(self) -> None:
        self.channel: BackendChannel | None = None

    def get_features(self) -> int:
        return (1 << 32) | (1 << 30)

    def get_protocol_features(self) -> int:
        return int(CHANNEL)

    def get_vring_base(self, index: int) -> int:
        return 0

    def set_backend_channel(self, channel: BackendChannel) -> None:
        self.channel = channel


def test_a_python_backend_channel_gets_the_lookup_fd(tmp_sock_dir: Path) -> None:
    theirs, unknown = uuid.uuid4().bytes, uuid.uuid4().bytes
    backend = ChannelHolder()
    front = Recorder()
    errors: list[BaseException] = []
    buf = os.memfd_create("dma-buf")
    os.write(buf, b"looked up from Python")
    front.objects[theirs] = buf
    with BackendListener(tmp_sock_dir / "be.sock") as listener:
        fe = Frontend.connect(listener.path, timeout=TIMEOUT)
        be_session = listener.accept(timeout=TIMEOUT)
    with fe, serve_in_thread(be_session, backend):
        fe.negotiate(protocol_features=int(CHANNEL))
        ch = fe.set_backend_req_fd()
        thread = threading.Thread(target=_serve_channel, args=(ch, front, errors), daemon=True)
        thread.start()
        try:
            fe.get_features()
            assert backend.channel is not None
            status, fd = backend.channel.shared_object_lookup_fd(theirs)
            assert status == 0 and fd is not None
            with fd:
                assert os.pread(fd.fileno(), 64, 0) == b"looked up from Python"
            assert backend.channel.shared_object_lookup_fd(unknown) == (1, None)
        finally:
            ch.close()
            thread.join(TIMEOUT)
            front.close()
    assert errors == []
