"""Our virtio-blk driver (:mod:`vhost.devices.blk`) against the real qemu-storage-daemon.

Every test moves real blocks: the daemon reads and writes a raw image file through our
shared memfd memory and virtqueue, and the test checks the image file on disk as well as
what the driver reads back. The CLI (``python -m vhost blk ...``) is run as a subprocess.
"""

from __future__ import annotations

import os
import random
import signal
import subprocess
import sys
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

import peers
from vhost.devices.blk import (
    BlkCompletion,
    BlkDriver,
    BlkIOError,
    BlkRequest,
    BlkRequestType,
    BlkStatus,
)
from vhost.errors import InvalidParamError, NotSupportedError, VhostTimeoutError
from vhost.virtio import BlkFeature, VirtioFeature

pytestmark = pytest.mark.timeout(120)

IMAGE_SIZE = 8 << 20
ROOT = Path(__file__).resolve().parent.parent


def pread(image: Path, offset: int, length: int) -> bytes:
    fd = os.open(image, os.O_RDONLY)
    try:
        return os.pread(fd, length, offset)
    finally:
        os.close(fd)


def qsd_offers(sock: Path, feature: int) -> bool:
    from vhost.user import Frontend  # noqa: PLC0415

    with Frontend.connect(sock) as fe:
        return bool(fe.get_features() & feature)


@pytest.fixture
def image(tmp_sock_dir: Path) -> Path:
    return peers.make_image(tmp_sock_dir / "disk.img", IMAGE_SIZE)


@pytest.fixture
def qsd(image: Path, tmp_sock_dir: Path) -> Iterator[Path]:
    sock = tmp_sock_dir / "blk.sock"
    with peers.qemu_storage_daemon_blk(image, sock) as peer:
        yield sock
        assert peer.alive(), peer.output()


@pytest.mark.parametrize("packed", [False, True], ids=["split", "packed"])
def test_writes_reach_the_image_and_read_back(packed: bool, qsd: Path, image: Path) -> None:
    offered = qsd_offers(qsd, VirtioFeature.RING_PACKED)
    if packed and not offered:
        # qemu-storage-daemon (libvhost-user) has no packed rings: the driver says so
        # instead of setting up a ring the daemon would misread.
        with pytest.raises(NotSupportedError, match="RING_PACKED"):
            BlkDriver.connect(qsd, packed=True)
        return
    rng = random.Random(1234)
    writes = {
        0: rng.randbytes(512),
        7 * 4096: rng.randbytes(4096),
        (1 << 20) + 512: rng.randbytes(3 * 512),
        2 << 20: rng.randbytes(256 * 1024),  # several requests, each a multi-segment chain
        IMAGE_SIZE - 4096: rng.randbytes(4096),  # the last block
    }
    with BlkDriver.connect(qsd, packed=packed) as disk:
        assert disk.packed == packed
        assert disk.capacity == IMAGE_SIZE // 512
        assert disk.size == IMAGE_SIZE
        assert disk.block_size == 512
        assert not disk.read_only
        assert disk.features & VirtioFeature.VERSION_1
        assert disk.max_request < 256 * 1024 and disk.segment_size < disk.max_request
        for offset, data in writes.items():
            disk.write(offset, data)
        disk.flush()
        for offset, data in writes.items():
            assert pread(image, offset, len(data)) == data, offset
            assert disk.read(offset, len(data)) == data, offset
        # neighbours untouched
        assert disk.read(512, 512) == bytes(512)
        assert pread(image, (2 << 20) + 256 * 1024, 4096) == bytes(4096)
        # one read spanning written and unwritten data
        whole = disk.read(0, 8 * 4096)
        assert whole == pread(image, 0, 8 * 4096)
        assert disk.in_flight == 0


def test_flush_and_get_id(qsd: Path) -> None:
    with BlkDriver.connect(qsd) as disk:
        assert disk.features & BlkFeature.FLUSH
        disk.flush()
        ident = disk.get_id()
        assert isinstance(ident, bytes) and len(ident) == 20


def test_event_idx_off_uses_flag_notifications(qsd: Path, image: Path) -> None:
    with BlkDriver.connect(qsd, event_idx=False) as disk:
        assert not disk.features & VirtioFeature.RING_EVENT_IDX
        data = os.urandom(64 * 1024)
        disk.write(4096, data)
        assert disk.read(4096, len(data)) == data
        assert pread(image, 4096, len(data)) == data
        assert disk.kicks >= 1  # an idle daemon always wants the first kick


def test_event_idx_negotiated_when_offered(qsd: Path) -> None:
    offered = qsd_offers(qsd, VirtioFeature.RING_EVENT_IDX)
    with BlkDriver.connect(qsd) as disk:
        assert disk.event_idx == offered
        disk.read(0, 4096)


def test_queue_depth_32_batched(qsd: Path, image: Path) -> None:
    rng = random.Random(7)
    blocks = rng.sample(range(IMAGE_SIZE // 4096), 64)
    payload = {b: rng.randbytes(4096) for b in blocks}
    with BlkDriver.connect(qsd) as disk:
        tags = disk.submit(BlkRequest.write(b * 4096, payload[b]) for b in blocks[:32])
        assert disk.in_flight == 32 and disk.kicks == 1  # one publish, one kick
        got = disk.wait(min_completions=32)
        assert sorted(c.tag for c in got) == sorted(tags)
        assert all(c.check().status == BlkStatus.OK for c in got)
        # more requests than slots: submit collects completions to make room (they
        # stay queued for wait)
        batch = [BlkRequest.write(b * 4096, payload[b]) for b in blocks]
        tags = disk.submit(batch)
        assert len(set(tags)) == 64
        done: list[BlkCompletion] = []
        while len(done) < 64:
            done += disk.wait(min_completions=64 - len(done))
        assert sorted(c.tag for c in done) == sorted(tags)
        assert all(c.ok for c in done) and disk.in_flight == 0
        for b in blocks:
            assert pread(image, b * 4096, 4096) == payload[b]
        reads = disk.submit(BlkRequest.read(b * 4096, 4096) for b in blocks[:32])
        by_tag = {c.tag: c for c in disk.wait(min_completions=32)}
        for tag, b in zip(reads, blocks[:32], strict=True):
            assert by_tag[tag].type == BlkRequestType.IN
            assert by_tag[tag].data == payload[b]
            assert by_tag[tag].used_len == 4096 + 1  # data and the status byte
        # placed without a kick: wait() publishes and kicks before sleeping
        kicks = disk.kicks
        (tag,) = disk.submit([BlkRequest.read(blocks[0] * 4096, 4096)], kick=False)
        assert disk.kicks == kicks
        (c,) = disk.wait()
        assert c.tag == tag and c.data == payload[blocks[0]] and disk.kicks == kicks + 1


def test_write_zeroes_and_discard(qsd: Path, image: Path) -> None:
    with BlkDriver.connect(qsd) as disk:
        assert disk.features & BlkFeature.WRITE_ZEROES and disk.features & BlkFeature.DISCARD
        disk.write(0, b"\xaa" * 16384)
        disk.write_zeroes(4096, 8192)
        assert disk.read(0, 16384) == b"\xaa" * 4096 + bytes(8192) + b"\xaa" * 4096
        assert pread(image, 4096, 8192) == bytes(8192)
        disk.write_zeroes(0, 4096, unmap=True)
        assert pread(image, 0, 4096) == bytes(4096)
        disk.discard(12288, 4096)  # the device may drop the data; it must not fail
        # a feature the device did not offer is refused locally
        disk._features &= ~int(BlkFeature.WRITE_ZEROES | BlkFeature.DISCARD)
        with pytest.raises(NotSupportedError):
            disk.write_zeroes(0, 512)
        with pytest.raises(NotSupportedError):
            disk.discard(0, 512)
        assert disk.in_flight == 0


def test_io_past_the_end_is_refused_before_sending(qsd: Path) -> None:
    """The driver knows the capacity: I/O past the end is not sent (the device would
    answer IOERR); a request submitted anyway gets the device's own IOERR."""
    with BlkDriver.connect(qsd) as disk:
        for call in (
            lambda: disk.read(IMAGE_SIZE, 512),
            lambda: disk.read(IMAGE_SIZE - 512, 1024),
            lambda: disk.write(IMAGE_SIZE, b"x" * 512),
            lambda: disk.write_zeroes(IMAGE_SIZE - 512, 1024),
            lambda: disk.discard(IMAGE_SIZE, 512),
        ):
            with pytest.raises(InvalidParamError, match="runs past the end of the disk"):
                call()
        assert disk.kicks == 0 and disk.in_flight == 0
        (tag,) = disk.submit([BlkRequest.read(IMAGE_SIZE, 512)])
        (c,) = disk.wait()
        assert c.tag == tag and c.status == BlkStatus.IOERR
        with pytest.raises(BlkIOError) as info:
            c.check()
        assert info.value.status_name == "IOERR" and not info.value.local
        assert disk.read(IMAGE_SIZE - 512, 512) == bytes(512)  # the queue goes on


def test_unaligned_io_is_refused_before_sending(qsd: Path) -> None:
    with BlkDriver.connect(qsd) as disk:
        free = disk.queue.num_free
        for call in (
            lambda: disk.read(100, 512),
            lambda: disk.read(0, 100),
            lambda: disk.write(512, b"x" * 1000),
            lambda: disk.write(3, b"x" * 512),
            lambda: disk.write_zeroes(0, 7),
            lambda: disk.discard(1, 512),
            lambda: disk.submit([BlkRequest.read(0, 513)]),
        ):
            with pytest.raises(InvalidParamError):
                call()
        assert disk.queue.num_free == free and disk.in_flight == 0 and disk.kicks == 0


def test_read_only_export(image: Path, tmp_sock_dir: Path) -> None:
    original = os.urandom(8192)
    fd = os.open(image, os.O_WRONLY)
    try:
        os.pwrite(fd, original, 0)
    finally:
        os.close(fd)
    sock = tmp_sock_dir / "ro.sock"
    with (
        peers.qemu_storage_daemon_blk(image, sock, writable=False) as peer,
        BlkDriver.connect(sock) as disk,
    ):
        assert disk.read_only == bool(disk.offered_features & BlkFeature.RO)
        if disk.read_only:
            with pytest.raises(BlkIOError) as info:
                disk.write(0, b"\x55" * 4096)
            assert info.value.local and info.value.status == BlkStatus.IOERR
        # whatever the feature says, the device itself refuses a write sent anyway
        (tag,) = disk.submit([BlkRequest.write(0, b"\x55" * 4096)])
        (c,) = disk.wait()
        assert c.tag == tag and c.status == BlkStatus.IOERR
        assert disk.read(0, 8192) == original
        assert peer.alive(), peer.output()
    assert pread(image, 0, 8192) == original


def test_timeout_when_the_device_never_answers(qsd: Path) -> None:
    with BlkDriver.connect(qsd, timeout=0.5) as disk:
        disk.read(0, 512)
        pid = _qsd_pid(qsd)
        os.kill(pid, signal.SIGSTOP)
        try:
            with pytest.raises(VhostTimeoutError):
                disk.read(0, 512)
        finally:
            os.kill(pid, signal.SIGCONT)
        # the late completion arrives and is collected
        assert disk.wait(timeout=10.0)[0].status == BlkStatus.OK


def _qsd_pid(sock: Path) -> int:
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            cmdline = Path(f"/proc/{entry}/cmdline").read_bytes()
        except OSError:
            continue
        if b"qemu-storage-daemon" in cmdline and os.fsencode(sock) in cmdline:
            return int(entry)
    raise AssertionError(f"no qemu-storage-daemon serving {sock}")


def test_close_releases_everything(qsd: Path, fd_count: Callable[[], int]) -> None:
    before = fd_count()
    with BlkDriver.connect(qsd) as disk:
        disk.read(0, 512)
    assert disk.closed
    assert fd_count() <= before


# --- the command line --------------------------------------------------------------------


def vhost_cli(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "vhost", *args],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
        cwd=ROOT,
    )


def test_cli_write_read_info(qsd: Path, image: Path, tmp_sock_dir: Path) -> None:
    out = vhost_cli("blk", "write", "--socket", str(qsd), "--offset", "8k", "--pattern",
                    "0xab", "--length", "4096", "--flush")  # fmt: skip
    assert out.returncode == 0, out.stderr
    assert pread(image, 8192, 4096) == b"\xab" * 4096
    assert pread(image, 8192 + 4096, 512) == bytes(512)

    dest = tmp_sock_dir / "out.bin"
    out = vhost_cli("blk", "read", "--socket", str(qsd), "--offset", "8192", "--length",
                    "8192", "--output", str(dest))  # fmt: skip
    assert out.returncode == 0, out.stderr
    assert dest.read_bytes() == b"\xab" * 4096 + bytes(4096)

    src = tmp_sock_dir / "in.bin"
    payload = os.urandom(1024)
    src.write_bytes(payload)
    out = vhost_cli("blk", "write", "--socket", str(qsd), "--offset", "0", "--input", str(src))
    assert out.returncode == 0, out.stderr
    assert pread(image, 0, 1024) == payload

    out = vhost_cli("blk", "read", "--socket", str(qsd), "--offset", "8192", "--length", "4608")
    assert out.returncode == 0, out.stderr
    assert out.stdout.startswith("00002000  ab ab ab ab ab ab ab ab  ab ab")
    assert "*" in out.stdout and "00003000  00 00" in out.stdout

    out = vhost_cli("blk", "info", "--socket", str(qsd))
    assert out.returncode == 0, out.stderr
    assert f"capacity:    {IMAGE_SIZE // 512} sectors" in out.stdout
    assert "block size:  512" in out.stdout and "read-only:   no" in out.stdout
    assert "FLUSH" in out.stdout and "VERSION_1" in out.stdout


def test_cli_errors(image: Path, tmp_sock_dir: Path) -> None:
    # unaligned: refused before connecting (the socket does not even exist)
    out = vhost_cli("blk", "read", "--socket", str(tmp_sock_dir / "none.sock"), "--offset",
                    "100", "--length", "512")  # fmt: skip
    assert out.returncode == 1 and "multiple of 512" in out.stderr
    sock = tmp_sock_dir / "ro.sock"
    with peers.qemu_storage_daemon_blk(image, sock, writable=False):
        out = vhost_cli("blk", "write", "--socket", str(sock), "--offset", "0", "--pattern", "1")
        assert out.returncode == 2
        assert "read-only (VIRTIO_BLK_F_RO); nothing was sent" in out.stderr
        out = vhost_cli("blk", "read", "--socket", str(sock), "--offset", str(IMAGE_SIZE),
                        "--length", "512")  # fmt: skip
        assert out.returncode == 1
        assert "runs past the end of the disk" in out.stderr and "not sent" in out.stderr
        out = vhost_cli("blk", "info", "--socket", str(sock), "--json")
        assert out.returncode == 0, out.stderr
        assert '"capacity": 16384' in out.stdout
    assert pread(image, 0, 512) == bytes(512)
