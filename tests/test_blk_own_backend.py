"""Our virtio-blk driver against our own virtio-blk back-end (tests/blk_backend.py) over a
real vhost-user socket: split and packed rings (packed is what qemu-storage-daemon cannot
test), EVENT_IDX on and off. The back-end's image is checked byte for byte."""

from __future__ import annotations

import random
import struct
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest

from blk_backend import DEVICE_ID, SECTOR, BlkBackend
from vhost import GuestMemory
from vhost.devices.blk import BlkCompletion, BlkDriver, BlkIOError, BlkRequest, BlkStatus
from vhost.user import BackendListener, BackendSession
from vhost.virtio import BlkFeature, DeviceQueue, VirtioFeature, Virtqueue, place_rings

pytestmark = pytest.mark.timeout(120)

IMAGE_SIZE = 4 << 20
TIMEOUT = 10.0

RINGS = pytest.mark.parametrize("packed", [False, True], ids=["split", "packed"])
EVENT_IDX = pytest.mark.parametrize("event_idx", [False, True], ids=["flags", "event_idx"])


@contextmanager
def connected(
    sock_dir: Path,
    image: bytearray,
    *,
    packed: bool,
    event_idx: bool,
    read_only: bool = False,
    queue_size: int = 128,
) -> Iterator[tuple[BlkDriver, BlkBackend]]:
    """Our driver connected to a :class:`BlkBackend` served in a thread (the driver's
    connect needs replies, so the back-end accepts and serves while it connects)."""
    backend = BlkBackend(image, read_only=read_only)
    sessions: list[BackendSession] = []
    errors: list[BaseException] = []

    def serve(listener: BackendListener) -> None:
        try:
            session = listener.accept(timeout=TIMEOUT)
            sessions.append(session)
            session.serve(backend)
        except BaseException as exc:  # checked below
            errors.append(exc)

    with BackendListener(sock_dir / "blk.sock") as listener:
        thread = threading.Thread(target=serve, args=(listener,), daemon=True)
        thread.start()
        driver = BlkDriver.connect(
            listener.path,
            queue_size=queue_size,
            packed=packed,
            event_idx=event_idx,
            timeout=TIMEOUT,
        )
        try:
            yield driver, backend
        finally:
            driver.close()
            backend.stop()
            for session in sessions:
                session.close()
            thread.join(TIMEOUT)
    assert not thread.is_alive()
    assert [e for e in errors if not isinstance(e, OSError | ConnectionError)] == []
    assert backend.errors == []


def random_image(seed: int) -> bytearray:
    return bytearray(random.Random(seed).randbytes(IMAGE_SIZE))


@RINGS
@EVENT_IDX
def test_negotiation(tmp_sock_dir: Path, packed: bool, event_idx: bool) -> None:
    with connected(tmp_sock_dir, random_image(0), packed=packed, event_idx=event_idx) as (d, b):
        assert d.packed == packed
        assert d.event_idx == event_idx
        assert bool(b.features & VirtioFeature.RING_PACKED) == packed
        assert bool(b.features & VirtioFeature.RING_EVENT_IDX) == event_idx
        assert d.capacity == IMAGE_SIZE // SECTOR
        assert d.size == IMAGE_SIZE
        assert d.block_size == SECTOR
        assert not d.read_only


@RINGS
@EVENT_IDX
def test_writes_reach_the_image_and_read_back(
    tmp_sock_dir: Path, packed: bool, event_idx: bool
) -> None:
    image = random_image(1)
    rng = random.Random(1234)
    writes = {
        0: rng.randbytes(512),
        7 * 4096: rng.randbytes(4096),
        (1 << 20) + 512: rng.randbytes(3 * 512),
        2 << 20: rng.randbytes(256 * 1024),  # several multi-segment chains
        IMAGE_SIZE - 512: rng.randbytes(512),  # the last block
    }
    expected = bytearray(image)
    for off, data in writes.items():
        expected[off : off + len(data)] = data
    with connected(tmp_sock_dir, image, packed=packed, event_idx=event_idx) as (d, _b):
        for off, data in writes.items():
            d.write(off, data)
        assert image == expected  # exactly those bytes changed
        for off, data in writes.items():
            assert d.read(off, len(data)) == data
        assert d.read(4096, 4096) == expected[4096:8192]  # untouched data too
        d.flush()


@RINGS
@EVENT_IDX
def test_get_id_write_zeroes_discard(tmp_sock_dir: Path, packed: bool, event_idx: bool) -> None:
    image = random_image(2)
    with connected(tmp_sock_dir, image, packed=packed, event_idx=event_idx) as (d, b):
        assert d.get_id() == DEVICE_ID.ljust(20, b"\0")
        assert d.has_feature(BlkFeature.WRITE_ZEROES)
        assert d.has_feature(BlkFeature.DISCARD)
        before = bytes(image)
        d.write_zeroes(8192, 3 * 512)
        assert image[8192 : 8192 + 1536] == bytes(1536)
        assert image[:8192] == before[:8192]
        assert image[8192 + 1536 :] == before[8192 + 1536 :]
        assert d.read(8192, 1536) == bytes(1536)
        d.discard(1 << 20, 4096)
        assert image[1 << 20 : (1 << 20) + 4096] == bytes(4096)
        assert image[(1 << 20) + 4096 :] == before[(1 << 20) + 4096 :]
        d.flush()
        assert set(b.requests) >= {4, 8, 11, 13}


@RINGS
@EVENT_IDX
def test_queue_depth_32(tmp_sock_dir: Path, packed: bool, event_idx: bool) -> None:
    image = bytearray(IMAGE_SIZE)
    rng = random.Random(3)
    blocks = {i * 8192: rng.randbytes(4096) for i in range(32)}
    with connected(tmp_sock_dir, image, packed=packed, event_idx=event_idx) as (d, _b):
        tags = d.submit([BlkRequest.write(o, data) for o, data in blocks.items()])
        assert len(set(tags)) == 32
        done: list[BlkCompletion] = []
        while len(done) < 32:
            done += d.wait(min_completions=32 - len(done))
        assert sorted(c.tag for c in done) == sorted(tags)
        assert all(c.ok for c in done)
        for o, data in blocks.items():
            assert image[o : o + 4096] == data
        tags = d.submit([BlkRequest.read(o, 4096) for o in blocks])
        got: list[BlkCompletion] = []
        while len(got) < 32:
            got += d.wait(min_completions=32 - len(got))
        by_tag = {c.tag: c for c in got}
        for tag, (_o, data) in zip(tags, blocks.items(), strict=True):
            assert by_tag[tag].ok
            assert by_tag[tag].data == data
        assert d.in_flight == 0


@RINGS
@EVENT_IDX
def test_out_of_range_is_ioerr_and_queue_survives(
    tmp_sock_dir: Path, packed: bool, event_idx: bool
) -> None:
    image = random_image(4)
    with connected(tmp_sock_dir, image, packed=packed, event_idx=event_idx) as (d, _b):
        (tag,) = d.submit([BlkRequest.read(IMAGE_SIZE, 512)])
        (c,) = d.wait()
        assert c.tag == tag
        assert c.status == BlkStatus.IOERR
        (tag,) = d.submit([BlkRequest.read(IMAGE_SIZE - 512, 1024)])  # straddles the end
        (c,) = d.wait()
        assert (c.tag, c.status) == (tag, BlkStatus.IOERR)
        assert d.read(0, 4096) == image[:4096]
        d.write(512, b"z" * 512)
        assert image[512:1024] == b"z" * 512


@RINGS
def test_read_only(tmp_sock_dir: Path, packed: bool) -> None:
    image = random_image(5)
    before = bytes(image)
    with connected(tmp_sock_dir, image, packed=packed, event_idx=True, read_only=True) as (
        d,
        b,
    ):
        assert d.read_only
        with pytest.raises(BlkIOError) as info:
            d.write(0, b"x" * 512)
        assert info.value.status == BlkStatus.IOERR
        assert d.read(0, 4096) == before[:4096]
        assert info.value.local  # refused by the driver: nothing reached the device
        assert 1 not in b.requests
    assert bytes(image) == before


@RINGS
@pytest.mark.parametrize("read_only", [False, True], ids=["rw", "ro"])
def test_unsupported_type_and_bad_sector_statuses(packed: bool, read_only: bool) -> None:
    """Request types the driver never sends, straight through a ring: UNSUPP for an
    unknown type, IOERR for a sector past the end, the used length counts the status."""
    image = bytearray(8 * SECTOR)
    backend = BlkBackend(image, read_only=read_only)
    mem = GuestMemory.allocate([(0, 0x10000)])
    size = 8
    desc, avail, used = place_rings(0, size, packed)
    vq = Virtqueue(mem, size, desc, avail, used, packed=packed)
    dq = DeviceQueue(mem, size, desc, avail, used, packed=packed)
    cases = [(99, 0, BlkStatus.UNSUPP), (0, 8, BlkStatus.IOERR), (0, 7, BlkStatus.OK)]
    if read_only:  # a write that reaches a read-only device is refused by the device
        cases = [(1, 0, BlkStatus.IOERR), (13, 0, BlkStatus.IOERR), (0, 0, BlkStatus.OK)]
    for kind, sector, status in cases:
        mem.write(0x8000, struct.pack("<IIQ", kind, 0, sector))
        mem.write(0x9000 + SECTOR, b"\xee")
        head = vq.add([(0x8000, 16)], [(0x9000, SECTOR), (0x9000 + SECTOR, 1)])
        vq.publish()
        (chain,) = dq.pop_batch()
        written = backend._serve(dq, chain)
        dq.add_used_batch([(chain.head, written)])
        assert vq.poll_used() == [(head, written)]
        assert mem.read(0x9000 + SECTOR, 1) == bytes([status])
        assert written == (SECTOR + 1 if status == BlkStatus.OK else 1)
    assert backend.requests == [kind for kind, _, _ in cases]
    assert image == bytearray(8 * SECTOR)  # a write to the read-only device changed nothing
