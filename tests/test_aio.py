"""``vhost.aio``: the front-end, eventfds and the daemon on an event loop, against real
back-ends (our ``python -m vhost serve blk`` and qemu-storage-daemon, as processes).

Every test moves real data through real rings (a virtio-blk write and read through a split
ring, the device's completions awaited on the call eventfd), or checks what a real
back-end process does (a stopped back-end never answers: SIGSTOP). The last test plays an
orchestrator: one loop, 20 daemons, 20 front-ends, kills and restarts, no leak.
"""

from __future__ import annotations

import asyncio
import contextlib
import fcntl
import gc
import os
import signal
import struct
import sys
import threading
import time
from collections.abc import AsyncIterator, Callable, Coroutine, Iterator
from pathlib import Path
from typing import Any

import pytest

import peers
from vhost import GuestMemory, _core, aio
from vhost.daemon import BlkDevice, Daemon, Device
from vhost.errors import ClosedError, RequestRefusedError, VhostError
from vhost.user import Frontend
from vhost.virtio import VirtioFeature, Virtqueue, place_rings

pytestmark = pytest.mark.timeout(60)

IMAGE_SIZE = 1 << 20
T_IN, T_OUT = 0, 1
HEADER, STATUS, DATA_OUT, DATA_IN = 0x20000, 0x20010, 0x30000, 0x40000


def run(main: Coroutine[Any, Any, None], loop: str = "asyncio") -> None:
    """Runs ``main`` on a fresh loop of the named kind (``uvloop`` too)."""
    factory: Callable[[], asyncio.AbstractEventLoop] | None = None
    if loop == "uvloop":
        import uvloop  # noqa: PLC0415 - only this parametrisation needs it

        factory = uvloop.new_event_loop
    with asyncio.Runner(loop_factory=factory) as runner:
        runner.run(main)


# -- a minimal virtio-blk driver on the loop ---------------------------------------------


class AsyncBlk:
    """Queue 0 of a vhost-user-blk back-end, one request at a time, all on the loop:
    requests through :class:`vhost.aio.Frontend`, completions on an awaited call eventfd."""

    def __init__(self, fe: aio.Frontend) -> None:
        self.fe = fe
        self.ram = GuestMemory.allocate([(0, 1 << 20)])
        self.kick, self.call = aio.EventFd(), aio.EventFd()
        self.vq: Virtqueue | None = None

    async def attach(self) -> int:
        """Negotiates, shares memory, hands the ring over; returns the capacity."""
        features, _ = await self.fe.negotiate()
        await self.fe.set_mem_table(self.ram.regions())
        desc, avail, used = place_rings(0x10000, 64)
        event_idx = bool(features & VirtioFeature.EVENT_IDX)
        self.vq = Virtqueue(self.ram, 64, desc, avail, used, event_idx=event_idx)
        await aio.setup_queue(self.fe, 0, self.ram, self.vq, self.kick, self.call)
        return int.from_bytes(await self.fe.get_config(0, 8), "little")

    async def request(self, kind: int, sector: int, addr: int, length: int) -> int:
        assert self.vq is not None
        self.ram.write(HEADER, struct.pack("<IIQ", kind, 0, sector))
        if kind == T_OUT:
            head = self.vq.add([(HEADER, 16), (addr, length)], [(STATUS, 1)])
        else:
            head = self.vq.add([(HEADER, 16)], [(addr, length), (STATUS, 1)])
        self.vq.publish()
        if self.vq.kick_needed():
            self.kick.write(1)
        done = await aio.wait_used(self.vq, self.call, limit=10.0)
        assert [h for h, _ in done] == [head]
        return self.ram.read(STATUS, 1)[0]

    async def write(self, sector: int, data: bytes) -> None:
        self.ram.write(DATA_OUT, data)
        assert await self.request(T_OUT, sector, DATA_OUT, len(data)) == 0

    async def read(self, sector: int, length: int) -> bytes:
        self.ram.write(DATA_IN, bytes(length))
        assert await self.request(T_IN, sector, DATA_IN, length) == 0
        return self.ram.read(DATA_IN, length)

    def close(self) -> None:
        self.fe.close()
        self.kick.close()
        self.call.close()
        # The memory (a memfd) goes with the last reference to it.
        self.vq = None
        self.ram = GuestMemory.empty()


def pattern(tag: int) -> bytes:
    return bytes((tag * 7 + i) % 251 for i in range(512))


# -- back-end processes ---------------------------------------------------------------------


async def wait_socket(path: Path, proc: asyncio.subprocess.Process, timeout: float = 20.0) -> None:
    deadline = time.monotonic() + timeout
    while not path.exists():
        if proc.returncode is not None or time.monotonic() > deadline:
            raise AssertionError(f"serve blk on {path} did not start (rc {proc.returncode})")
        await asyncio.sleep(0.02)


async def serve_blk(sock: Path, image: Path) -> asyncio.subprocess.Process:
    """``python -m vhost serve blk`` as a process, once its socket exists."""
    with contextlib.suppress(FileNotFoundError):
        sock.unlink()
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "vhost", "serve", "blk", "--socket", str(sock), "--image",
        str(image), stdin=asyncio.subprocess.DEVNULL, stdout=asyncio.subprocess.DEVNULL,
        stderr=asyncio.subprocess.DEVNULL,
    )  # fmt: skip
    await wait_socket(sock, proc)
    return proc


async def stopped(proc: asyncio.subprocess.Process) -> None:
    """SIGSTOP, then wait until every thread of the process is stopped (state T)."""
    proc.send_signal(signal.SIGSTOP)
    tasks = Path(f"/proc/{proc.pid}/task")
    deadline = time.monotonic() + 5
    while time.monotonic() < deadline:
        states = [(t / "stat").read_text().rsplit(")", 1)[1].split()[0] for t in tasks.iterdir()]
        if all(s == "T" for s in states):
            return
        await asyncio.sleep(0.01)
    raise AssertionError(f"process {proc.pid} did not stop")


async def stop_proc(proc: asyncio.subprocess.Process, sig: int = signal.SIGTERM) -> None:
    if proc.returncode is None:
        proc.send_signal(sig)
    try:
        async with asyncio.timeout(10):
            await proc.wait()
    except TimeoutError:
        proc.kill()  # it ignored the signal: it must not outlive the test either
        await proc.wait()
        raise


@contextlib.asynccontextmanager
async def serve_blk_proc(tmp: Path) -> AsyncIterator[tuple[Path, asyncio.subprocess.Process]]:
    sock, image = tmp / "blk.sock", peers.make_image(tmp / "disk.img", IMAGE_SIZE)
    proc = await serve_blk(sock, image)
    try:
        yield sock, proc
    finally:
        with contextlib.suppress(ProcessLookupError):
            proc.send_signal(signal.SIGCONT)
        await stop_proc(proc)


# -- the front-end --------------------------------------------------------------------------


async def exercise(sock: Path) -> None:
    """The requests a VMM makes, and a write and a read through the ring; the answers
    agree with the blocking front-end's on another connection."""
    async with await aio.Frontend.connect(sock) as fe:
        # The socket stays blocking: answers are taken with MSG_DONTWAIT, and a blocking
        # call on the same connection (fe.sync) must wait in the kernel, not spin.
        assert not fcntl.fcntl(fe.fileno(), fcntl.F_GETFL) & os.O_NONBLOCK
        blk = AsyncBlk(fe)
        try:
            capacity = await blk.attach()
            assert capacity == IMAGE_SIZE // 512
            await blk.write(8, pattern(1))
            assert await blk.read(8, 512) == pattern(1)
            assert fe.offered_features is not None
            acked, proto = fe.acked_features, fe.acked_protocol_features
            assert await fe.get_vring_base(0) >= 2  # two requests went through ring 0
        finally:
            blk.close()
    with Frontend.connect(sock) as sync_fe:
        assert sync_fe.negotiate() == (acked, proto)


def test_frontend_against_serve_blk(tmp_sock_dir: Path) -> None:
    async def main() -> None:
        async with serve_blk_proc(tmp_sock_dir) as (sock, _):
            await exercise(sock)

    run(main())
    with open(tmp_sock_dir / "disk.img", "rb") as f:  # the write reached serve blk's image
        f.seek(8 * 512)
        assert f.read(512) == pattern(1)


def test_frontend_against_qemu_storage_daemon(tmp_sock_dir: Path) -> None:
    image = peers.make_image(tmp_sock_dir / "disk.img", IMAGE_SIZE)
    sock = tmp_sock_dir / "qsd.sock"
    with peers.qemu_storage_daemon_blk(image, sock):
        run(exercise(sock))
    with open(image, "rb") as f:  # the write reached qemu-storage-daemon's image
        f.seek(8 * 512)
        assert f.read(512) == pattern(1)


def test_connect_failure_names_the_path(tmp_sock_dir: Path) -> None:
    async def main() -> None:
        with pytest.raises(FileNotFoundError) as info:
            await aio.Frontend.connect(tmp_sock_dir / "nobody.sock")
        assert isinstance(info.value, VhostError)
        assert str(tmp_sock_dir / "nobody.sock") in str(info.value)

    run(main())


def test_cancelled_request_closes_the_connection_and_the_next_one_works(
    tmp_sock_dir: Path,
) -> None:
    """A request cancelled after it was sent closes its connection (the late answer must
    not be taken for the next request's); one cancelled while waiting for its turn changes
    nothing; and a timeout (``asyncio.timeout``) on a back-end that never answers (a
    stopped process) is a cancellation like any other."""

    async def main() -> None:
        async with serve_blk_proc(tmp_sock_dir) as (sock, proc):
            fe = await aio.Frontend.connect(sock)
            await fe.negotiate()
            await stopped(proc)  # the back-end answers nothing from now on
            first = asyncio.create_task(fe.get_features())
            second = asyncio.create_task(fe.get_queue_num())  # waits for its turn
            await asyncio.sleep(0.1)
            second.cancel()  # never sent: the connection stays in step
            with pytest.raises(asyncio.CancelledError):
                await second
            assert not fe.broken
            proc.send_signal(signal.SIGCONT)
            assert await first == fe.offered_features  # the first completes
            await stopped(proc)
            t0 = time.monotonic()
            with pytest.raises(TimeoutError):
                async with asyncio.timeout(0.3):
                    await fe.get_config(0, 8)
            assert time.monotonic() - t0 < 3
            assert fe.broken  # sent, unanswered, cancelled: closed
            with pytest.raises(ClosedError):
                await fe.get_features()
            fe.close()
            proc.send_signal(signal.SIGCONT)
            # The back-end saw the close and serves the next front-end.
            async with await aio.Frontend.connect(sock) as again:
                features, _ = await again.negotiate()
                assert features & VirtioFeature.VERSION_1

    run(main())


def test_one_request_at_a_time_on_a_connection(tmp_sock_dir: Path) -> None:
    """Concurrent callers are ordered, each getting its own answer."""

    async def main() -> None:
        async with (
            serve_blk_proc(tmp_sock_dir) as (sock, _),
            await aio.Frontend.connect(sock) as fe,
        ):
            await fe.negotiate()
            got = await asyncio.gather(
                *(fe.get_config(0, 8) if i % 2 else fe.get_queue_num() for i in range(40))
            )
            capacity = (IMAGE_SIZE // 512).to_bytes(8, "little")
            assert got == [capacity if i % 2 else 1 for i in range(40)]

    run(main())


def test_server_mode_accepts_a_daemon_that_connects(tmp_sock_dir: Path) -> None:
    """``Frontend.accept`` waits on the loop for a back-end (our daemon in client mode)."""

    async def main() -> None:
        path = tmp_sock_dir / "fe.sock"
        accepting = asyncio.create_task(aio.Frontend.accept(path))
        while not path.exists():
            await asyncio.sleep(0.01)
        device = BlkDevice.ram(IMAGE_SIZE)
        async with aio.Daemon(device, path, client=True), await accepting as fe:
            await fe.negotiate()
            assert await fe.get_config(0, 8) == (IMAGE_SIZE // 512).to_bytes(8, "little")
        assert not path.exists()
        with pytest.raises(TimeoutError, match=r"no back-end connected within 0\.1 s"):
            await aio.Frontend.accept(path, timeout=0.1)
        assert not path.exists()

    run(main())


class Stateful(Device):
    """A device whose internal state crosses a migration (``DEVICE_STATE``)."""

    device_type = 4

    def __init__(self, state: bytes = b"") -> None:
        self.state = state

    def save_state(self) -> bytes:
        return self.state

    def load_state(self, state: bytes) -> None:
        if not state.startswith(b"state:"):
            raise ValueError("not this device's state")
        self.state = state

    def process(self, queue: int, batch: _core.Batch) -> None:
        """Never called: no ring runs."""


def test_device_state_moves_between_two_daemons(tmp_sock_dir: Path) -> None:
    """``save_device_state``/``load_device_state``: the pipe is read and written on the loop
    (a state larger than a pipe's buffer), and a refusal comes back as the blocking
    call's."""

    async def main() -> None:
        source, target = Stateful(b"state:" + bytes(range(256)) * 1024), Stateful()
        async with (
            aio.Daemon(source, tmp_sock_dir / "src.sock") as a,
            aio.Daemon(target, tmp_sock_dir / "dst.sock") as b,
            await aio.Frontend.connect(a.path) as src,
            await aio.Frontend.connect(b.path) as dst,
        ):
            await src.negotiate()
            await dst.negotiate()
            state = await src.save_device_state()
            assert state == source.state
            await dst.load_device_state(state)
            assert target.state == state
            with pytest.raises(RequestRefusedError):
                await dst.load_device_state(b"garbage")
            assert target.state == state  # kept

    run(main())


# -- eventfds ----------------------------------------------------------------------------


def test_eventfd_wait_returns_the_counter_and_cancelling_consumes_nothing() -> None:
    async def main() -> None:
        with aio.EventFd() as efd:
            efd.write(3)
            assert await efd.wait() == 3
            waiter = asyncio.create_task(efd.wait())
            await asyncio.sleep(0.05)
            assert not waiter.done()  # nothing signalled: it waits on the loop
            waiter.cancel()
            with pytest.raises(asyncio.CancelledError):
                await waiter
            # Signalled from another thread while nobody waits: the next wait gets it.
            t = threading.Thread(target=efd.write, args=(5,))
            t.start()
            t.join()
            assert await efd.wait() == 5
            later = asyncio.get_running_loop().call_later(0.05, efd.write, 2)
            assert await efd.wait() == 2
            later.cancel()

    run(main())


# -- the daemon on the loop --------------------------------------------------------------


class AsyncFill(Device):
    """An entropy-like device whose ``process`` is a coroutine: it fills each buffer with
    a byte it gets from an asyncio service (here a queue fed by the test)."""

    device_type = 4

    def __init__(self, source: asyncio.Queue[int]) -> None:
        self.source = source
        self.threads: set[int] = set()

    async def process(self, queue: int, batch: _core.Batch) -> None:
        self.threads.add(threading.get_ident())
        byte = await self.source.get()
        if byte == 0xEE:
            raise RuntimeError("async device bug")
        for chain in batch:
            batch.complete(chain, batch.write(chain, bytes([byte]) * chain.writable_len))


async def fill_once(
    ram: GuestMemory, vq: Virtqueue, kick: aio.EventFd, call: aio.EventFd, addr: int
) -> tuple[int, bytes]:
    ram.write(addr, bytes(64))
    vq.add([], [(addr, 64)])
    vq.publish()
    kick.write(1)
    ((_, written),) = await aio.wait_used(vq, call, limit=10.0)
    return written, ram.read(addr, 64)


def test_async_device_serves_a_front_end_on_the_same_loop(
    tmp_sock_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    seen: list[BaseException | None] = []
    monkeypatch.setattr(sys, "unraisablehook", lambda u: seen.append(u.exc_value))

    async def main() -> None:
        source: asyncio.Queue[int] = asyncio.Queue()
        device = AsyncFill(source)
        async with aio.Daemon(device, tmp_sock_dir / "fill.sock") as daemon:
            async with await aio.Frontend.connect(daemon.path) as fe:
                features, _ = await fe.negotiate()
                ram = GuestMemory.allocate([(0, 1 << 20)])
                await fe.set_mem_table(ram.regions())
                vq = Virtqueue(ram, 64, *place_rings(0x10000, 64),
                               event_idx=bool(features & VirtioFeature.EVENT_IDX))  # fmt: skip
                with aio.EventFd() as kick, aio.EventFd() as call:
                    await aio.setup_queue(fe, 0, ram, vq, kick, call)
                    source.put_nowait(0x5A)
                    assert await fill_once(ram, vq, kick, call, 0x30000) == (64, b"Z" * 64)
                    # The device's exception: reported like a plain process's, the chain
                    # returned with nothing written, and the device goes on.
                    source.put_nowait(0xEE)
                    assert await fill_once(ram, vq, kick, call, 0x31000) == (0, bytes(64))
                    source.put_nowait(0x11)
                    assert await fill_once(ram, vq, kick, call, 0x32000) == (64, b"\x11" * 64)
            assert device.threads == {threading.get_ident()}  # it ran on this loop
            assert daemon.daemon.sessions_started == 1

    run(main())
    assert len(seen) == 1 and "async device bug" in str(seen[0])


def test_a_stopped_loop_fails_the_pending_batch_instead_of_hanging_the_worker(
    tmp_sock_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The loop running a device's coroutine stops with a batch pending: the worker gets
    ``ClosedError`` within a fraction of a second, the chain goes back unprocessed, and
    the daemon still stops promptly."""
    seen: list[BaseException | None] = []
    monkeypatch.setattr(sys, "unraisablehook", lambda u: seen.append(u.exc_value))
    loop = asyncio.new_event_loop()
    thread = threading.Thread(target=loop.run_forever)
    thread.start()
    source: asyncio.Queue[int] = asyncio.Queue()  # never fed: the batch stays pending
    daemon = Daemon(AsyncFill(source), tmp_sock_dir / "stuck.sock", loop=loop).start()
    try:
        with Frontend.connect(daemon.path) as fe:
            features, _ = fe.negotiate()
            ram = GuestMemory.allocate([(0, 1 << 20)])
            fe.set_mem_table(ram.regions())
            vq = Virtqueue(ram, 64, *place_rings(0x10000, 64),
                           event_idx=bool(features & VirtioFeature.EVENT_IDX))  # fmt: skip
            with _core.EventFd() as kick, _core.EventFd() as call:
                from vhost.virtio import setup_queue, wait_used  # noqa: PLC0415

                setup_queue(fe, 0, ram, vq, kick, call)
                vq.add([], [(0x30000, 64)])
                vq.publish()
                kick.write(1)
                time.sleep(0.3)  # the batch is on the loop, waiting for the queue
                loop.call_soon_threadsafe(loop.stop)
                thread.join(5)
                t0 = time.monotonic()
                assert [n for _, n in wait_used(vq, call, timeout=5.0)] == [0]
                assert time.monotonic() - t0 < 2
                # Closed, the loop takes no batch at all: refused at once, same way.
                close_loop(loop)
                vq.add([], [(0x31000, 64)])
                vq.publish()
                kick.write(1)
                assert [n for _, n in wait_used(vq, call, timeout=5.0)] == [0]
        assert len(seen) == 2 and all(isinstance(e, ClosedError) for e in seen)
        assert "event loop stopped" in str(seen[0]) and "AsyncFill.process(queue 0)" in str(seen[0])
        assert "event loop is closed" in str(seen[1])
    finally:
        t0 = time.monotonic()
        daemon.stop()
        assert time.monotonic() - t0 < 5
        close_loop(loop)


def close_loop(loop: asyncio.AbstractEventLoop) -> None:
    """Lets a stopped loop run the cancellation of what was stranded on it, then closes it."""
    if not loop.is_closed():
        stranded = asyncio.all_tasks(loop)
        loop.run_until_complete(asyncio.gather(*stranded, return_exceptions=True))
        loop.close()


def test_an_async_device_needs_a_loop(tmp_sock_dir: Path) -> None:
    with pytest.raises(VhostError, match="coroutine function"):
        Daemon(AsyncFill(asyncio.Queue()), tmp_sock_dir / "x.sock")


def test_daemon_wait_stops_on_cancellation(tmp_sock_dir: Path) -> None:
    async def main() -> None:
        tasks = len(os.listdir("/proc/self/task"))
        daemon = await aio.Daemon(BlkDevice.ram(IMAGE_SIZE), tmp_sock_dir / "w.sock").start()
        waiter = asyncio.create_task(daemon.wait())
        await asyncio.sleep(0.1)
        assert not waiter.done()
        waiter.cancel()
        with pytest.raises(asyncio.CancelledError):
            await waiter
        assert not (tmp_sock_dir / "w.sock").exists()  # stopped: the listener is gone
        assert len(os.listdir("/proc/self/task")) == tasks

    run(main())


def test_daemon_takes_the_blocking_daemons_iommu_and_transport_arguments(
    tmp_sock_dir: Path,
) -> None:
    """aio.Daemon passes every argument of vhost.daemon.Daemon on: with a miss bound the
    daemon offers ACCESS_PLATFORM (bit 33), without one it does not; a bad transport is
    refused by name."""
    access_platform = 1 << 33

    async def offered(**options: Any) -> int:
        path = tmp_sock_dir / "iommu.sock"
        async with (
            aio.Daemon(BlkDevice.ram(IMAGE_SIZE), path, **options),
            await aio.Frontend.connect(path) as fe,
        ):
            return await fe.get_features() & access_platform

    async def main() -> None:
        assert await offered(iommu_miss_timeout=1.0) == access_platform
        assert await offered() == 0
        with pytest.raises(VhostError, match="transport"):
            await aio.Daemon(
                BlkDevice.ram(IMAGE_SIZE), tmp_sock_dir / "t.sock", transport="tcp"  # type: ignore[arg-type]
            ).start()

    run(main())


# -- the orchestrator ----------------------------------------------------------------------

N_DAEMONS = 20
N_PROCESSES = 4  # of the 20, served by `serve blk` processes (SIGKILLed, restarted)


def os_threads() -> int:
    return len(os.listdir("/proc/self/task"))


def fd_targets() -> list[str]:
    out = []
    for fd in os.listdir("/proc/self/fd"):
        with contextlib.suppress(OSError):
            out.append(os.readlink(f"/proc/self/fd/{fd}"))
    return out


def open_fds() -> int:
    return len(os.listdir("/proc/self/fd"))


async def settle(measure: Callable[[], int], want: int, timeout: float = 5.0) -> int:
    deadline = time.monotonic() + timeout
    while (got := measure()) != want and time.monotonic() < deadline:
        await asyncio.sleep(0.02)
    return got


async def orchestrate(tmp: Path) -> None:
    gc.collect()  # what earlier tests left for the collector is not this test's
    fds0, threads0, os_threads0 = open_fds(), set(threading.enumerate()), os_threads()
    tasks0 = asyncio.all_tasks()
    socks = [tmp / f"d{i}.sock" for i in range(N_DAEMONS)]
    images = [peers.make_image(tmp / f"d{i}.img", IMAGE_SIZE) for i in range(N_DAEMONS)]
    procs: dict[int, asyncio.subprocess.Process] = {}
    daemons: dict[int, aio.Daemon] = {}

    async def start(i: int) -> None:
        if i < N_PROCESSES:
            procs[i] = await serve_blk(socks[i], images[i])
        else:
            daemons[i] = await aio.Daemon(BlkDevice(images[i]), socks[i]).start()

    async def attach(i: int) -> AsyncBlk:
        # No retry: a restarted server's path appears only once it listens.
        fe = await aio.Frontend.connect(socks[i])
        blk = AsyncBlk(fe)
        assert await blk.attach() == IMAGE_SIZE // 512
        return blk

    async def write_read(i: int, blk: AsyncBlk, sector: int) -> None:
        await blk.write(sector, pattern(i))
        assert await blk.read(sector, 512) == pattern(i)

    try:
        await asyncio.gather(*(start(i) for i in range(N_DAEMONS)))
        blks = await asyncio.gather(*(attach(i) for i in range(N_DAEMONS)))
        await asyncio.gather(*(write_read(i, blks[i], 16) for i in range(N_DAEMONS)))

        # Kill two back-end processes outright and stop two in-process daemons: their
        # front-ends see the connection go; restarted, a new front-end finds the data.
        victims = [0, 1, N_PROCESSES, N_PROCESSES + 1]
        for i in victims[:2]:
            await stop_proc(procs[i], signal.SIGKILL)
        for i in victims[2:]:
            await daemons.pop(i).stop()
        for i in victims:
            with pytest.raises(VhostError):
                await blks[i].fe.get_features()
            blks[i].close()
        await asyncio.gather(*(start(i) for i in victims))
        again = await asyncio.gather(*(attach(i) for i in victims))
        for k, i in enumerate(victims):
            blks[i] = again[k]
            assert await blks[i].read(16, 512) == pattern(i)  # what was written before
        await asyncio.gather(*(write_read(i, blks[i], 32) for i in range(N_DAEMONS)))
    finally:
        try:
            for k in range(len(blks) if "blks" in locals() else 0):
                blks[k].close()
            blks = again = []
        finally:  # whatever happened above, no back-end outlives the test
            await asyncio.gather(*(d.stop() for d in daemons.values()))
            await asyncio.gather(*(stop_proc(p) for p in procs.values()))
            daemons.clear()
            procs.clear()
    if await settle(open_fds, fds0) != fds0:
        Path("/tmp/aio/fds.txt").write_text("\n".join(fd_targets()))
    assert await settle(open_fds, fds0) == fds0, fd_targets()
    assert await settle(os_threads, os_threads0) == os_threads0
    assert set(threading.enumerate()) == threads0
    assert asyncio.all_tasks() == tasks0


@pytest.mark.parametrize("loop", ["asyncio", "uvloop"])
def test_orchestrator_20_daemons_kill_restart_no_leak(tmp_sock_dir: Path, loop: str) -> None:
    """orchestrate() asserts the data of every daemon and, at its end, that no fd, thread
    or task is left; here, that it ran to that end on this loop."""
    finished = []

    async def main() -> None:
        await orchestrate(tmp_sock_dir)
        finished.append(loop)

    run(main(), loop)
    assert finished == [loop]


@pytest.fixture(autouse=True)
def _no_stray_children() -> Iterator[None]:
    yield
    # Every back-end process a test started was reaped by it.
    with contextlib.suppress(ChildProcessError):
        assert os.waitpid(-1, os.WNOHANG) == (0, 0)
