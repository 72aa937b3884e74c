"""The native virtio-blk device on the daemon, through ``python -m vhost serve blk`` (a
subprocess) and through an in-process ``Daemon(BlkDevice(...))``: data lands byte-exact in
the image file, every request type, read-only mode, range checks, several queues, split
and packed rings with EVENT_IDX on and off, and the config space."""

from __future__ import annotations

import json
import random
import struct
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest

from daemon_util import (
    S_IOERR,
    S_OK,
    S_UNSUPP,
    SECTOR,
    T_DISCARD,
    T_GET_ID,
    T_IN,
    T_OUT,
    T_WRITE_ZEROES,
    BlkGuest,
    MiB,
    ServeProc,
    check_roundtrip,
    make_image,
    wait_for,
)
from vhost.daemon import BlkDevice, Daemon
from vhost.devices.blk import BlkDriver, BlkIOError, BlkRequest, BlkStatus
from vhost.errors import InvalidParamError
from vhost.user import Frontend, Listener, regions_of
from vhost.virtio import BlkFeature, VirtioFeature, setup_queue

pytestmark = pytest.mark.timeout(120)

IMAGE_SIZE = 4 * MiB
SERIAL = "disk-0042"
RINGS = pytest.mark.parametrize("packed", [False, True], ids=["split", "packed"])
EVENT_IDX = pytest.mark.parametrize("event_idx", [False, True], ids=["flags", "event_idx"])
MODES = pytest.mark.parametrize("mode", ["serve", "inproc"])


def seg(sector: int, sectors: int, flags: int = 0) -> bytes:
    """One discard / write-zeroes range: sector u64, num_sectors u32, flags u32."""
    return struct.pack("<QII", sector, sectors, flags)


@contextmanager
def served(
    sock_dir: Path,
    mode: str,
    *,
    queues: int = 1,
    readonly: bool = False,
    queue_size: int = 256,
    seed: int | None = 3,
) -> Iterator[tuple[Path, Path]]:
    """An image file served by ``serve blk`` or an in-process daemon; yields the socket
    and the image."""
    image = sock_dir / "disk.img"
    make_image(image, IMAGE_SIZE, seed)
    sock = sock_dir / "blk.sock"
    if mode == "serve":
        args = ["blk", "--image", str(image), "--queues", str(queues), "--serial", SERIAL,
                "--queue-size", str(queue_size)]
        if readonly:
            args.append("--readonly")
        proc = ServeProc(args, sock, sock_dir / "serve.log")
        try:
            yield sock, image
            assert proc.alive(), proc.stderr()
        finally:
            proc.close()
    else:
        dev = BlkDevice(image, num_queues=queues, queue_size=queue_size, readonly=readonly,
                        serial=SERIAL)
        with Daemon(dev, sock) as daemon:
            yield sock, image
            assert wait_for(lambda: not daemon.active)
            assert daemon.last_error is None, daemon.last_error


@MODES
@RINGS
@EVENT_IDX
def test_data_reaches_the_image(
    tmp_sock_dir: Path, mode: str, packed: bool, event_idx: bool
) -> None:
    with served(tmp_sock_dir, mode) as (sock, image), BlkDriver.connect(
        sock, packed=packed, event_idx=event_idx
    ) as d:
        assert d.packed == packed and d.event_idx == event_idx
        check_roundtrip(d, image, seed=int(packed) * 2 + int(event_idx))


@MODES
def test_deep_queue_of_mixed_requests(tmp_sock_dir: Path, mode: str) -> None:
    """32 requests in flight at once (one publish, one kick), reads of what was written."""
    rng = random.Random(9)
    with served(tmp_sock_dir, mode) as (sock, image), BlkDriver.connect(sock) as d:
        data = {i * 65536: rng.randbytes(8192) for i in range(32)}
        for off, blob in data.items():
            d.write(off, blob)
        tags = d.submit([BlkRequest.read(off, 8192) for off in data])
        got = {c.tag: c for c in d.wait(min_completions=32)}
        assert sorted(got) == sorted(tags)
        for tag, off in zip(tags, data, strict=True):
            assert got[tag].ok and got[tag].data == data[off]
        disk = image.read_bytes()
        assert all(disk[o : o + 8192] == b for o, b in data.items())


@MODES
def test_get_id_flush_discard_write_zeroes(tmp_sock_dir: Path, mode: str) -> None:
    with served(tmp_sock_dir, mode) as (sock, image), BlkDriver.connect(sock) as d:
        assert d.get_id() == SERIAL.encode().ljust(20, b"\0")
        d.flush()
        assert image.read_bytes()[8192:16384] != bytes(8192)  # random to start with
        d.discard(8192, 8192)
        d.write_zeroes(64 * 1024, 3 * SECTOR)
        d.write_zeroes(MiB, 4096, unmap=True)
        disk = image.read_bytes()
        assert d.read(8192, 8192) == bytes(8192) == disk[8192:16384]
        assert d.read(64 * 1024, 3 * SECTOR) == bytes(3 * SECTOR) == disk[65536:65536 + 1536]
        assert d.read(MiB, 4096) == bytes(4096) == disk[MiB : MiB + 4096]
        # Neighbours are untouched.
        assert disk[8192 - SECTOR : 8192] != bytes(SECTOR)
        assert disk[16384 : 16384 + SECTOR] != bytes(SECTOR)
        assert disk[65536 + 1536 : 65536 + 2048] != bytes(SECTOR)


@MODES
def test_out_of_range_requests_get_ioerr(tmp_sock_dir: Path, mode: str) -> None:
    last = IMAGE_SIZE // SECTOR
    with served(tmp_sock_dir, mode) as (sock, image):
        before = image.read_bytes()
        guest = BlkGuest(1)
        with Frontend.connect(sock) as fe:
            guest.attach(fe)
            assert guest.read(0, (last - 1) * SECTOR, SECTOR)[0] == S_OK
            assert guest.read(0, last * SECTOR, SECTOR)[0] == S_IOERR
            assert guest.read(0, (last - 1) * SECTOR, 2 * SECTOR)[0] == S_IOERR
            assert guest.request(0, T_IN, 2**64 - 1, in_len=SECTOR).status == S_IOERR
            assert guest.request(0, T_OUT, last, out=b"x" * SECTOR).status == S_IOERR
            assert guest.request(0, T_OUT, 2**63, out=b"x" * SECTOR).status == S_IOERR
            # Not a whole number of sectors.
            assert guest.request(0, T_OUT, 0, out=b"x" * 100).status == S_IOERR
            assert guest.request(0, T_IN, 0, in_len=100).status == S_IOERR
            # A discard range past the end.
            assert guest.request(0, T_DISCARD, 0, out=seg(last - 1, 2)).status == S_IOERR
            # Unknown request type; write-zeroes flags the device does not know.
            assert guest.request(0, 99, 0, in_len=SECTOR).status == S_UNSUPP
            bad = seg(0, 1, 0x80)
            assert guest.request(0, T_WRITE_ZEROES, 0, out=bad).status == S_UNSUPP
            # The ring keeps working after all that.
            assert guest.write(0, 0, b"\x42" * SECTOR) == S_OK
        guest.close()
        after = image.read_bytes()
        assert after[:SECTOR] == b"\x42" * SECTOR
        assert after[SECTOR:] == before[SECTOR:]


@MODES
def test_readonly_refuses_writes(tmp_sock_dir: Path, mode: str) -> None:
    with served(tmp_sock_dir, mode, readonly=True) as (sock, image):
        before = image.read_bytes()
        with BlkDriver.connect(sock) as d:
            assert d.read_only
            assert not d.has_feature(BlkFeature.DISCARD | BlkFeature.WRITE_ZEROES)
            assert d.read(0, 4096) == before[:4096]
            with pytest.raises(BlkIOError) as err:
                d.write(0, b"\x01" * 4096)
            assert err.value.status == BlkStatus.IOERR
        # A driver that ignores VIRTIO_BLK_F_RO: the device itself refuses.
        guest = BlkGuest(1)
        with Frontend.connect(sock) as fe:
            guest.attach(fe)
            assert guest.write(0, 0, b"\x01" * 4096) == S_IOERR
            assert guest.request(0, T_DISCARD, 0, out=seg(0, 8)).status == S_IOERR
            assert guest.request(0, T_WRITE_ZEROES, 0, out=seg(0, 8)).status == S_IOERR
            assert guest.read(0, 0, 4096) == (S_OK, before[:4096])
        guest.close()
        assert image.read_bytes() == before


@MODES
@RINGS
def test_several_queues(tmp_sock_dir: Path, mode: str, packed: bool) -> None:
    """Every queue serves its own requests, all in flight at once."""
    rng = random.Random(4)
    with served(tmp_sock_dir, mode, queues=4) as (sock, image):
        expected = bytearray(image.read_bytes())
        guest = BlkGuest(4, packed=packed, event_idx=True)
        with Frontend.connect(sock) as fe:
            guest.attach(fe)
            assert fe.get_queue_num() == 4
            for q in range(4):
                for i in range(8):
                    off = (q * 8 + i) * 16384
                    data = rng.randbytes(8192)
                    guest.add(q, T_OUT, off // SECTOR, out=data, segment=2048)
                    expected[off : off + 8192] = data
            for q in range(4):
                guest.kick(q)
            for q in range(4):
                assert [r.status for r, _ in guest.reap(q, 8)] == [S_OK] * 8
            for q in range(4):
                off = q * 8 * 16384
                assert guest.read(3 - q, off, 8192) == (S_OK, bytes(expected[off : off + 8192]))
            got = guest.request(2, T_GET_ID, in_len=20)
            assert (got.status, got.data) == (S_OK, SERIAL.encode().ljust(20, b"\0"))
        guest.close()
        assert image.read_bytes() == expected


@MODES
def test_many_segment_chains(tmp_sock_dir: Path, mode: str) -> None:
    """Requests split into many small descriptors (up to seg_max) move the right bytes."""
    rng = random.Random(6)
    with served(tmp_sock_dir, mode, queue_size=128) as (sock, image):
        guest = BlkGuest(1, size=128)
        with Frontend.connect(sock) as fe:
            guest.attach(fe)
            data = rng.randbytes(32 * 1024)
            # 64 readable data segments of 512 bytes, then one of 64 writable segments.
            assert guest.request(0, T_OUT, 100, out=data, segment=512).status == S_OK
            r = guest.request(0, T_IN, 100, in_len=len(data), segment=512)
            assert (r.status, r.data, r.used_len) == (S_OK, data, len(data) + 1)
            odd = rng.randbytes(3 * SECTOR)
            assert guest.request(0, T_OUT, 7, out=odd, segment=100).status == S_OK
            r = guest.request(0, T_IN, 7, in_len=len(odd), segment=300)
            assert (r.status, r.data) == (S_OK, odd)
        guest.close()
        disk = image.read_bytes()
        assert disk[100 * SECTOR : 100 * SECTOR + len(data)] == data
        assert disk[7 * SECTOR : 10 * SECTOR] == odd


def test_config_space_and_probe(tmp_sock_dir: Path) -> None:
    with served(tmp_sock_dir, "serve", queues=4, queue_size=128) as (sock, _image):
        out = subprocess.run(
            [sys.executable, "-m", "vhost", "probe", "--json", str(sock)],
            capture_output=True, text=True, timeout=30, check=True,
        )
        info = json.loads(out.stdout)
        assert info["device"] == "blk"
        assert info["queue_num"] == 4
        cfg = info["config_decoded"]
        assert cfg["capacity"] == IMAGE_SIZE // SECTOR
        assert cfg["blk_size"] == SECTOR
        assert cfg["seg_max"] == 126
        assert cfg["num_queues"] == 4
        assert cfg["max_discard_sectors"] > 0 and cfg["max_discard_seg"] >= 1
        assert cfg["max_write_zeroes_sectors"] > 0
        names = set(info["feature_names"])
        assert {"SEG_MAX", "BLK_SIZE", "FLUSH", "MQ", "DISCARD", "WRITE_ZEROES"} <= names
        assert {"VERSION_1", "RING_PACKED", "RING_EVENT_IDX", "PROTOCOL_FEATURES"} <= names
        assert "RO" not in names
        with BlkDriver.connect(sock) as d:
            assert d.capacity == IMAGE_SIZE // SECTOR
            assert d.block_size == SECTOR
            assert d.num_queues == 4
            assert d.has_feature(VirtioFeature.VERSION_1)


def test_inproc_device_properties(tmp_sock_dir: Path) -> None:
    image = tmp_sock_dir / "disk.img"
    image.write_bytes(bytes(IMAGE_SIZE))
    dev = BlkDevice(image, num_queues=3, queue_size=64, serial="x")
    assert dev.capacity == IMAGE_SIZE // SECTOR
    assert dev.num_queues == 3
    cfg = dev.config()
    assert int.from_bytes(cfg[0:8], "little") == IMAGE_SIZE // SECTOR
    assert int.from_bytes(cfg[12:16], "little") == 62
    assert int.from_bytes(cfg[34:36], "little") == 3
    ram = BlkDevice.ram(MiB)
    assert ram.capacity == MiB // SECTOR
    assert dev.features & int(BlkFeature.DISCARD)
    del dev  # closes the image, releasing its write lock
    ro = BlkDevice(image, readonly=True)
    assert ro.features & int(BlkFeature.RO) and not ro.features & int(BlkFeature.DISCARD)


@pytest.mark.parametrize(
    "kwargs",
    [{"num_queues": 0}, {"queue_size": 2}, {"serial": "x" * 21}],
    ids=["no-queue", "tiny-queue", "long-serial"],
)
def test_bad_device_arguments(tmp_sock_dir: Path, kwargs: dict[str, object]) -> None:
    with pytest.raises(InvalidParamError):
        BlkDevice.ram(MiB, **kwargs)  # type: ignore[arg-type]


def test_ram_disk(tmp_sock_dir: Path) -> None:
    with Daemon(BlkDevice.ram(2 * MiB, serial="ram"), tmp_sock_dir / "r.sock") as daemon:
        data = random.Random(1).randbytes(64 * 1024)
        with BlkDriver.connect(daemon.path) as d:
            assert d.capacity == 2 * MiB // SECTOR
            assert d.read(0, 4096) == bytes(4096)
            d.write(4096, data)
            d.flush()
        with BlkDriver.connect(daemon.path) as d:  # kept across sessions
            assert d.read(4096, len(data)) == data
            assert d.get_id().rstrip(b"\0") == b"ram"


def test_serve_blk_client_mode(tmp_sock_dir: Path) -> None:
    """``--client``: the daemon connects to a listening front-end (QEMU ``server=on``),
    serves that one session and exits 0 when it ends."""
    image = tmp_sock_dir / "disk.img"
    before = make_image(image, IMAGE_SIZE, seed=5)
    sock = tmp_sock_dir / "fe.sock"
    with Listener(sock) as listener:
        proc = ServeProc(["blk", "--client", "--image", str(image)], sock, tmp_sock_dir / "log")
        try:
            fe = Frontend(listener.accept_frontend(timeout=10.0))
            with BlkDriver(fe) as d:
                check_roundtrip(d, image, seed=8)
            assert proc.proc.wait(10) == 0, proc.stderr()
            assert "stopped after 1 session" in proc.stderr()
        finally:
            proc.close()
    assert image.read_bytes() != before


def test_serve_blk_client_waits_for_the_frontend(tmp_sock_dir: Path) -> None:
    """Started before the front-end listens, the client retries until it appears."""
    image = tmp_sock_dir / "disk.img"
    make_image(image, IMAGE_SIZE, seed=None)
    sock = tmp_sock_dir / "late.sock"
    proc = ServeProc(["blk", "--client", "--image", str(image)], sock, tmp_sock_dir / "log")
    try:
        time.sleep(0.3)
        assert proc.alive()
        with Listener(sock) as listener:
            fe = Frontend(listener.accept_frontend(timeout=10.0))
            with BlkDriver(fe) as d:
                d.write(0, b"\x07" * SECTOR)
        assert proc.proc.wait(10) == 0
        assert image.read_bytes()[:SECTOR] == b"\x07" * SECTOR
    finally:
        proc.close()


def test_kick_while_disabled_is_served_on_enable(tmp_sock_dir: Path) -> None:
    """D6: a request made available (and kicked) while its ring is disabled waits, and is
    served when the ring is enabled again."""
    with served(tmp_sock_dir, "inproc", queues=2) as (sock, image):
        guest = BlkGuest(2)
        with Frontend.connect(sock) as fe:
            guest.attach(fe)
            fe.set_vring_enable(0, False)
            guest.add(0, T_OUT, 1, out=b"\x0d" * SECTOR)
            guest.kick(0, force=True)
            time.sleep(0.3)
            assert guest.vqs[0].poll_used() == []
            assert image.read_bytes()[SECTOR : 2 * SECTOR] != b"\x0d" * SECTOR
            assert guest.write(1, 4096, b"\x0e" * SECTOR) == S_OK  # the other ring runs
            fe.set_vring_enable(0, True)
            ((r, _),) = guest.reap(0, 1)
            assert (r.status, r.used_len) == (S_OK, 1)
        guest.close()
        assert image.read_bytes()[SECTOR : 2 * SECTOR] == b"\x0d" * SECTOR


@pytest.mark.parametrize("how", ["reset-device", "status-0"])
def test_reset_then_new_rings_in_the_same_session(tmp_sock_dir: Path, how: str) -> None:
    """After RESET_DEVICE (or the driver writing status 0) the front-end sets everything
    up again, with new memory and fresh rings, and I/O works on the same connection."""
    with served(tmp_sock_dir, "inproc", queues=2) as (sock, image):
        first = BlkGuest(2)
        with Frontend.connect(sock) as fe:
            first.attach(fe)
            assert first.write(0, 0, b"\x01" * SECTOR) == S_OK
            if how == "reset-device":
                fe.reset_device()
            else:
                fe.set_status(0xF)
                fe.set_status(0)
            second = BlkGuest(2, packed=True)
            fe.set_features(second.features(fe.get_features()))
            fe.set_mem_table(regions_of(second.memory))
            for q in range(2):
                setup_queue(fe, q, second.memory, second.vqs[q], second.kicks[q],
                            second.calls[q])
            assert second.write(1, SECTOR, b"\x02" * SECTOR) == S_OK
            assert second.read(0, 0, 2 * SECTOR) == (S_OK, b"\x01" * SECTOR + b"\x02" * SECTOR)
            # The old rings are gone: a kick on them is not served.
            first.add(0, T_OUT, 2, out=b"\x03" * SECTOR)
            first.kick(0, force=True)
            time.sleep(0.2)
            assert first.vqs[0].poll_used() == []
        first.close()
        second.close()
        assert image.read_bytes()[2 * SECTOR : 3 * SECTOR] != b"\x03" * SECTOR


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--image", "missing.img"], "No such file"),
        (["--image", "disk.img", "--queues", "0"], "--queues must be between 1 and 256"),
        (["--image", "disk.img", "--queue-size", "2"], "--queue-size must be between 3 and"),
        (["--image", "disk.img", "--serial", "s" * 21], "at most 20 bytes"),
    ],
    ids=["missing-image", "no-queue", "tiny-queue", "long-serial"],
)
def test_serve_blk_bad_arguments(tmp_sock_dir: Path, args: list[str], message: str) -> None:
    make_image(tmp_sock_dir / "disk.img", MiB)
    out = subprocess.run(
        [sys.executable, "-m", "vhost", "serve", "blk", "--socket", "blk.sock", *args],
        cwd=tmp_sock_dir, capture_output=True, text=True, timeout=30, check=False,
    )
    assert out.returncode != 0
    assert message in out.stderr
    assert "Traceback" not in out.stderr
    assert not (tmp_sock_dir / "blk.sock").exists()
