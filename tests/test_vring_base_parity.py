"""A Python back-end (tests/blk_backend.py, over ``vhost.DeviceQueue``) and the native
daemon (``Daemon(BlkDevice)``) answer GET_VRING_BASE alike after the same traffic, for
split and packed rings: both encode the base through the core's one implementation
(issue 11: the glue once encoded the packed base itself, avail half only)."""

from __future__ import annotations

import random
import threading
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager, contextmanager
from pathlib import Path

import pytest

from blk_backend import BlkBackend
from vhost.daemon import BlkDevice, Daemon
from vhost.devices.blk import BlkDriver, BlkRequest
from vhost.user import BackendListener, BackendSession

pytestmark = pytest.mark.timeout(120)

IMAGE_SIZE = 1 << 20
QUEUE_SIZE = 16
TIMEOUT = 10.0
RINGS = pytest.mark.parametrize("packed", [False, True], ids=["split", "packed"])


def traffic(driver: BlkDriver, seed: int) -> int:
    """The same mix of reads and writes of 1 to 3 pages, in batches of 1 to 4, so a packed
    ring of 16 slots wraps several times. Returns the number of requests."""
    rng = random.Random(seed)
    total = 0
    for _ in range(40):
        batch = []
        for _ in range(rng.randint(1, 4)):
            pages = rng.randint(1, 3)
            offset = rng.randrange(0, IMAGE_SIZE - pages * 4096, 512)
            if rng.random() < 0.5:
                batch.append(BlkRequest.write(offset, rng.randbytes(pages * 4096)))
            else:
                batch.append(BlkRequest.read(offset, pages * 4096))
        driver.submit(batch)
        done = 0
        while done < len(batch):
            got = driver.wait(min_completions=len(batch) - done)
            for completion in got:
                completion.check()
            done += len(got)
        total += len(batch)
    return total


@contextmanager
def python_backend(sock_dir: Path, image: Path) -> Iterator[Path]:
    backend = BlkBackend(bytearray(image.read_bytes()))
    sessions: list[BackendSession] = []

    def serve(listener: BackendListener) -> None:
        try:
            session = listener.accept(timeout=TIMEOUT)
            sessions.append(session)
            session.serve(backend)
        except OSError:
            pass  # the driver closed the connection

    with BackendListener(sock_dir / "py.sock") as listener:
        thread = threading.Thread(target=serve, args=(listener,), daemon=True)
        thread.start()
        try:
            yield listener.path
        finally:
            backend.stop()
            for session in sessions:
                session.close()
            thread.join(TIMEOUT)
    assert backend.errors == []


@contextmanager
def native_daemon(sock_dir: Path, image: Path) -> Iterator[Path]:
    path = sock_dir / "native.sock"
    with Daemon(BlkDevice(str(image), lock=False), path):
        yield path


def base_after_traffic(
    backend: Callable[[Path, Path], AbstractContextManager[Path]],
    sock_dir: Path,
    image: Path,
    packed: bool,
) -> tuple[int, int]:
    with backend(sock_dir, image) as path:
        driver = BlkDriver.connect(
            path, queue_size=QUEUE_SIZE, packed=packed, event_idx=True, timeout=TIMEOUT
        )
        try:
            total = traffic(driver, seed=11)
            return total, driver.frontend.get_vring_base(0)
        finally:
            driver.close()


@RINGS
def test_python_backend_and_daemon_return_the_same_base(tmp_sock_dir: Path, packed: bool) -> None:
    image = tmp_sock_dir / "disk.img"
    image.write_bytes(bytes(IMAGE_SIZE))
    total, py_base = base_after_traffic(python_backend, tmp_sock_dir, image, packed)
    total2, native_base = base_after_traffic(native_daemon, tmp_sock_dir, image, packed)
    assert total == total2
    assert py_base == native_base
    if packed:
        # Every request completed: the used half (bits 16-31) equals the avail half, and
        # the ring wrapped (a wrap counter flipped at least once from its initial 1).
        assert py_base >> 16 == py_base & 0xFFFF
        assert total * 3 > QUEUE_SIZE
    else:
        assert py_base == total % 65536
