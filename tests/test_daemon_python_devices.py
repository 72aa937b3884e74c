"""Devices written in Python on the daemon: the virtio-rng example, the Python virtio-blk
path, and what the daemon does when a Python device misbehaves (raises, leaves chains
out, misuses its ``Batch``)."""

from __future__ import annotations

import random
import subprocess
import sys
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytest

from daemon_util import (
    S_IOERR,
    S_OK,
    S_UNSUPP,
    SECTOR,
    T_DISCARD,
    T_GET_ID,
    T_IN,
    BlkGuest,
    MiB,
    Result,
    ServeProc,
    check_roundtrip,
    make_image,
    wait_for,
)
from vhost import _core
from vhost.codes import ProtocolFeature as PF
from vhost.daemon import Batch, Daemon, Device
from vhost.devices.blk import BlkDriver, BlkIOError
from vhost.devices.blkdev import PythonBlkDevice
from vhost.devices.rng import RngDevice
from vhost.errors import ClosedError, InvalidParamError, VhostError
from vhost.user import Frontend

pytestmark = pytest.mark.timeout(120)

IMAGE_SIZE = 4 * MiB


@contextmanager
def guest_of(daemon: Daemon, queues: int = 1, **kw: Any) -> Iterator[BlkGuest]:
    guest = BlkGuest(queues, **kw)
    fe = Frontend.connect(daemon.path, timeout=10.0)
    try:
        guest.attach(fe)
        yield guest
    finally:
        fe.close()
        guest.close()


def offer(guest: BlkGuest, sizes: list[int], q: int = 0, fill: int = 0x11) -> list[int]:
    """One device-writable chain per size (published and kicked); returns their
    guest addresses. The area is pre-filled with ``fill`` to see what the device wrote."""
    base = guest.data_area(q)
    guest.memory.write(base, bytes([fill]) * (sum(sizes) + 4096 * len(sizes)))
    at, addrs = base, []
    for n in sizes:
        guest.add_raw(q, [], [(at, n)])
        addrs.append(at)
        at += n + 4096
    guest.kick(q)
    return addrs


def used(guest: BlkGuest, n: int, q: int = 0) -> list[Result]:
    return [r for r, _ in guest.reap(q, n)]


# -- the rng example -------------------------------------------------------------------------


def test_rng_fills_buffers_with_random_bytes(tmp_sock_dir: Path) -> None:
    dev = RngDevice()
    with Daemon(dev, tmp_sock_dir / "rng.sock") as daemon, guest_of(daemon) as g:
        addrs = offer(g, [64, 64, 1000])
        done = {r.head: r.used_len for r in used(g, 3)}
        assert sorted(done.values()) == [64, 64, 1000]
        got = [g.memory.read(a, n) for a, n in zip(addrs, [64, 64, 1000], strict=True)]
        assert all(b != bytes(len(b)) and b != b"\x11" * len(b) for b in got)
        assert got[0] != got[1]
        assert g.memory.read(addrs[0] + 64, 16) == b"\x11" * 16  # nothing past the buffer
        # A chain of several writable segments is filled across them.
        base = g.data_area(0) + 64 * 1024
        g.memory.write(base, bytes(3 * 4096))
        g.add_raw(0, [], [(base, 100), (base + 4096, 28), (base + 8192, 1)])
        g.kick(0)
        assert [r.used_len for r in used(g, 1)] == [129]
        assert dev.bytes_served == 64 + 64 + 1000 + 129
        assert wait_for(lambda: daemon.completed == [4]), daemon.completed


def test_rng_custom_source_and_cap(tmp_sock_dir: Path) -> None:
    asked: list[int] = []

    def source(n: int) -> bytes:
        asked.append(n)
        return bytes((i * 7 + 3) % 256 for i in range(n))

    dev = RngDevice(source=source, max_bytes=48)
    with Daemon(dev, tmp_sock_dir / "rng.sock") as daemon, guest_of(daemon) as g:
        (a, b) = offer(g, [32, 200])
        assert sorted(r.used_len for r in used(g, 2)) == [32, 48]
        assert sorted(asked) == [32, 48]
        assert g.memory.read(a, 32) == source(32)
        assert g.memory.read(b, 200) == source(48) + b"\x11" * 152


def test_serve_rng_cli(tmp_sock_dir: Path) -> None:
    sock = tmp_sock_dir / "rng.sock"
    proc = ServeProc(["rng"], sock, tmp_sock_dir / "rng.log")
    try:
        assert "rng" in proc.banner
        guest = BlkGuest(1)
        with Frontend.connect(sock, timeout=10.0) as fe:
            guest.attach(fe)
            (a,) = offer(guest, [256])
            assert [r.used_len for r in used(guest, 1)] == [256]
            assert guest.memory.read(a, 256) not in (bytes(256), b"\x11" * 256)
        guest.close()
        assert proc.terminate() == 0
        assert not sock.exists()
    finally:
        proc.close()


# -- misbehaving devices -----------------------------------------------------------------


class Flaky(Device):
    """Raises on its first batch; afterwards writes one 0xAB byte per chain."""

    device_type = 4

    def __init__(self) -> None:
        self.calls = 0

    def process(self, queue: int, batch: _core.Batch) -> None:
        self.calls += 1
        if self.calls == 1:
            raise RuntimeError("device bug")
        for chain in batch:
            batch.complete(chain, batch.write(chain, b"\xab"))


def test_raising_device_completes_chains_empty_and_keeps_serving(
    tmp_sock_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    seen: list[BaseException | None] = []
    monkeypatch.setattr(sys, "unraisablehook", lambda u: seen.append(u.exc_value))
    dev = Flaky()
    with Daemon(dev, tmp_sock_dir / "f.sock") as daemon, guest_of(daemon) as g:
        offer(g, [16, 16])
        first = used(g, 2)
        assert [r.used_len for r in first] == [0, 0]  # returned, nothing written
        assert wait_for(lambda: len(seen) == 1)
        assert isinstance(seen[0], RuntimeError) and "device bug" in str(seen[0])
        assert daemon.active
        (a,) = offer(g, [16], fill=0)
        assert [r.used_len for r in used(g, 1)] == [1]
        assert g.memory.read(a, 2) == b"\xab\x00"
        assert dev.calls == 2
    assert len(seen) == 1


class Partial(Device):
    """Completes only every other chain of a batch."""

    device_type = 4

    def process(self, queue: int, batch: _core.Batch) -> None:
        for i, chain in enumerate(batch):
            if i % 2 == 0:
                batch.complete(chain, batch.write(chain, b"\x01\x02\x03"))


def test_chains_left_out_are_returned_empty(tmp_sock_dir: Path) -> None:
    with Daemon(Partial(), tmp_sock_dir / "p.sock") as daemon, guest_of(daemon) as g:
        offer(g, [8] * 6)
        lens = sorted(r.used_len for r in used(g, 6))
        assert lens == [0, 0, 0, 3, 3, 3]
        assert wait_for(lambda: daemon.completed == [6]), daemon.completed
        assert daemon.active


class Misuser(Device):
    """Tries every way of misusing a batch and records what each raised."""

    device_type = 4

    def __init__(self) -> None:
        self.errors: dict[str, type[BaseException]] = {}
        self.kept: tuple[Batch, _core.DescriptorChain] | None = None

    def _try(self, name: str, fn: Any) -> None:
        try:
            fn()
        except Exception as exc:
            self.errors[name] = type(exc)

    def process(self, queue: int, batch: _core.Batch) -> None:
        chains = list(batch)
        c0, c1 = chains[0], chains[1]
        self._try("too-long", lambda: batch.complete(c0, c0.writable_len + 1))
        batch.complete(c0, 4)
        self._try("twice", lambda: batch.complete(c0, 1))
        batch.complete(c1, c1.writable_len)
        self.kept = (batch, chains[2])


def test_batch_misuse_raises_typed_errors(tmp_sock_dir: Path) -> None:
    dev = Misuser()
    with Daemon(dev, tmp_sock_dir / "m.sock") as daemon, guest_of(daemon) as g:
        offer(g, [8, 8, 8])
        lens = sorted(r.used_len for r in used(g, 3))
        assert lens == [0, 4, 8]  # the first completion of each chain counts, once
        assert dev.errors == {"too-long": InvalidParamError, "twice": InvalidParamError}
        assert dev.kept is not None
        batch, chain = dev.kept
        with pytest.raises(ClosedError):
            batch.complete(chain, 0)  # process has returned: the batch is closed
        # Its buffers belong to the driver again: writing into them would corrupt them.
        addr = chain.segments[0][0]
        g.memory.write(addr, b"\x11" * 8)
        with pytest.raises(ClosedError):
            batch.write(chain, b"late")
        assert g.memory.read(addr, 8) == b"\x11" * 8
        assert issubclass(ClosedError, VhostError)
        assert len(batch) == 3


class Foreign(Device):
    """Keeps the chains of its first batch and, later, completes one of them again from
    another batch (a device bug): the batch must refuse it, not hand the ring a head that
    is not in flight."""

    device_type = 4

    def __init__(self) -> None:
        self.old: list[_core.DescriptorChain] = []
        self.errors: list[type[BaseException]] = []

    def process(self, queue: int, batch: _core.Batch) -> None:
        chains = list(batch)
        if not self.old:
            self.old = chains
        else:
            mine = {c.head for c in chains}
            foreign = [c for c in self.old if c.head not in mine]
            try:
                batch.complete(foreign[0], 2)
            except VhostError as exc:
                self.errors.append(type(exc))
        for c in chains:
            batch.complete(c, 1)


def test_completing_a_chain_of_another_batch_is_refused(tmp_sock_dir: Path) -> None:
    dev = Foreign()
    with Daemon(dev, tmp_sock_dir / "f.sock") as daemon, guest_of(daemon) as g:
        offer(g, [8, 8, 8])
        assert sorted(r.used_len for r in used(g, 3)) == [1, 1, 1]
        offer(g, [8])
        assert [r.used_len for r in used(g, 1)] == [1]  # its own chain, once
        assert dev.errors == [InvalidParamError]
        offer(g, [8])  # the queue still works
        assert [r.used_len for r in used(g, 1)] == [1]
        assert not g.vqs[0].broken
        assert wait_for(lambda: daemon.completed == [5]), daemon.completed


class TwoQueues(Device):
    """Two queues; records which queue and thread served each batch."""

    device_type = 4
    num_queues = 2

    def __init__(self) -> None:
        self.seen: list[tuple[int, str]] = []

    def process(self, queue: int, batch: _core.Batch) -> None:
        self.seen.append((queue, threading.current_thread().name))
        for chain in batch:
            batch.complete(chain, batch.write(chain, bytes([queue + 1]) * chain.writable_len))


def test_python_device_with_two_queues(tmp_sock_dir: Path) -> None:
    dev = TwoQueues()
    with Daemon(dev, tmp_sock_dir / "q.sock") as daemon, guest_of(daemon, queues=2) as g:
        (a0,) = offer(g, [32], q=0)
        (a1,) = offer(g, [32], q=1)
        assert [r.used_len for r in used(g, 1, q=0)] == [32]
        assert [r.used_len for r in used(g, 1, q=1)] == [32]
        assert g.memory.read(a0, 32) == b"\x01" * 32
        assert g.memory.read(a1, 32) == b"\x02" * 32
        assert sorted(q for q, _ in dev.seen) == [0, 1]
        assert len({name for _, name in dev.seen}) == 2  # one worker per queue
        assert wait_for(lambda: daemon.completed == [1, 1]), daemon.completed


class WithConfig(Device):
    device_type = 4

    def __init__(self, fail: bool) -> None:
        self.fail = fail

    def config(self) -> bytes:
        if self.fail:
            raise ValueError("no config today")
        return bytes(range(1, 9))

    def process(self, queue: int, batch: _core.Batch) -> None:
        raise AssertionError("not reached")


@pytest.mark.parametrize("fail", [False, True], ids=["ok", "raises"])
def test_python_device_config_space(
    tmp_sock_dir: Path, fail: bool, monkeypatch: pytest.MonkeyPatch
) -> None:
    seen: list[BaseException | None] = []
    monkeypatch.setattr(sys, "unraisablehook", lambda u: seen.append(u.exc_value))
    with Daemon(WithConfig(fail), tmp_sock_dir / "c.sock") as daemon:
        with Frontend.connect(daemon.path, timeout=10.0) as fe:
            _, proto = fe.negotiate()
            if fail:
                # A config space that cannot be read is no config space: CONFIG is not
                # offered, and the exception is reported, not swallowed.
                assert not proto & PF.CONFIG
            else:
                assert fe.get_config(0, 12) == bytes(range(1, 9)) + bytes(4)
            assert fe.get_features() & (1 << 32)  # the session goes on
            assert daemon.active
        assert {type(e) for e in seen} == ({ValueError} if fail else set())


def test_device_description_is_checked(tmp_sock_dir: Path) -> None:
    class NoType(Device):
        def process(self, queue: int, batch: _core.Batch) -> None:
            return None

    with pytest.raises(AttributeError):
        Daemon(NoType(), tmp_sock_dir / "x.sock")
    with pytest.raises(InvalidParamError):
        Daemon(RngDevice(), tmp_sock_dir / "x.sock", stall_timeout=0)


# -- the Python blk path ----------------------------------------------------------------


@contextmanager
def python_blk(sock_dir: Path, mode: str, *, readonly: bool = False) -> Iterator[Path]:
    image = sock_dir / "disk.img"
    make_image(image, IMAGE_SIZE, seed=11)
    sock = sock_dir / "pyblk.sock"
    if mode == "serve":
        args = ["blk", "--python", "--image", str(image), "--serial", "pyblk"]
        proc = ServeProc([*args, "--readonly"] if readonly else args, sock, sock_dir / "log")
        try:
            assert "python" in proc.banner
            yield image
            assert proc.alive()
        finally:
            proc.close()
    else:
        dev = PythonBlkDevice(image, readonly=readonly, serial="pyblk")
        try:
            with Daemon(dev, sock):
                yield image
        finally:
            dev.close()


MODES = pytest.mark.parametrize("mode", ["serve", "inproc"])


@MODES
@pytest.mark.parametrize("packed", [False, True], ids=["split", "packed"])
def test_python_blk_data(tmp_sock_dir: Path, mode: str, packed: bool) -> None:
    with python_blk(tmp_sock_dir, mode) as image, BlkDriver.connect(
        tmp_sock_dir / "pyblk.sock", packed=packed
    ) as d:
        assert d.capacity == IMAGE_SIZE // SECTOR
        check_roundtrip(d, image, seed=20 + int(packed))
        assert d.get_id() == b"pyblk".ljust(20, b"\0")


@MODES
def test_python_blk_errors(tmp_sock_dir: Path, mode: str) -> None:
    last = IMAGE_SIZE // SECTOR
    with python_blk(tmp_sock_dir, mode) as image:
        before = image.read_bytes()
        guest = BlkGuest(1)
        with Frontend.connect(tmp_sock_dir / "pyblk.sock", timeout=10.0) as fe:
            guest.attach(fe)
            assert guest.read(0, last * SECTOR, SECTOR)[0] == S_IOERR
            assert guest.request(0, T_IN, 2**63, in_len=SECTOR).status == S_IOERR
            assert guest.write(0, (last - 1) * SECTOR, b"x" * 1024) == S_IOERR
            assert guest.request(0, T_DISCARD, 0, out=bytes(16)).status == S_UNSUPP
            r = guest.request(0, T_GET_ID, in_len=20)
            assert (r.status, r.data) == (S_OK, b"pyblk".ljust(20, b"\0"))
        guest.close()
        assert image.read_bytes() == before


@MODES
def test_python_blk_readonly(tmp_sock_dir: Path, mode: str) -> None:
    with python_blk(tmp_sock_dir, mode, readonly=True) as image:
        before = image.read_bytes()
        with BlkDriver.connect(tmp_sock_dir / "pyblk.sock") as d:
            assert d.read_only
            with pytest.raises(BlkIOError):
                d.write(0, b"\x01" * 512)
        guest = BlkGuest(1)
        with Frontend.connect(tmp_sock_dir / "pyblk.sock", timeout=10.0) as fe:
            guest.attach(fe)
            assert guest.write(0, 0, random.randbytes(4096)) == S_IOERR
            assert guest.read(0, 0, 512) == (S_OK, before[:512])
        guest.close()
        assert image.read_bytes() == before


def test_python_blk_probe(tmp_sock_dir: Path) -> None:
    with python_blk(tmp_sock_dir, "serve"):
        out = subprocess.run(
            [sys.executable, "-m", "vhost", "probe", "--json", str(tmp_sock_dir / "pyblk.sock")],
            capture_output=True, text=True, timeout=30, check=True,
        )
        assert '"capacity": 8192' in out.stdout
        assert '"blk_size": 512' in out.stdout
