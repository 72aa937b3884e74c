"""SHMEM_MAP / SHMEM_UNMAP on the back-end request channel: the spec's form of the seed's
virtio-fs FS_MAP/FS_UNMAP. The back-end hands the front-end an fd to map into a shared
memory region; the front-end's handler receives it and can read what the back-end wrote."""

from __future__ import annotations

import mmap
import os
import threading
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from vhost import FileDescriptor, InactiveFeatureError, InvalidParamError, RequestRefusedError
from vhost.codes import ProtocolFeature
from vhost.user import (
    BackendChannel,
    BackendHandler,
    BackendListener,
    Frontend,
    FrontendRequestHandler,
    serve_in_thread,
)

SHMEM = int(ProtocolFeature.SHMEM)
PROTO = int(ProtocolFeature.BACKEND_REQ | ProtocolFeature.REPLY_ACK) | SHMEM


class FsDevice(BackendHandler):
    def __init__(self, protocol: int) -> None:
        self.protocol = protocol
        self.channel: BackendChannel | None = None
        self.ready = threading.Event()

    def get_features(self) -> int:
        return (1 << 32) | (1 << 30)

    def get_protocol_features(self) -> int:
        return self.protocol

    def get_vring_base(self, index: int) -> int:
        return 0

    def set_backend_channel(self, channel: BackendChannel) -> None:
        self.channel = channel
        self.ready.set()


@dataclass
class Mapper(FrontendRequestHandler):
    maps: list[tuple[int, int, int, int, int, bytes]] = field(default_factory=list)
    unmaps: list[tuple[int, int, int]] = field(default_factory=list)

    def shmem_map(  # noqa: PLR0917 - one argument per field of the request
        self,
        shmid: int,
        fd_offset: int,
        shm_offset: int,
        length: int,
        fd: FileDescriptor,
        flags: int,
    ) -> int | None:
        with fd, mmap.mmap(fd.fileno(), length, offset=fd_offset) as m:
            self.maps.append((shmid, fd_offset, shm_offset, length, flags, bytes(m[:16])))
        return 0

    def shmem_unmap(self, shmid: int, shm_offset: int, length: int) -> int | None:
        if shm_offset >= 1 << 20:
            raise ValueError("outside the window")
        self.unmaps.append((shmid, shm_offset, length))
        return 0


@dataclass
class Rig:
    frontend: Frontend
    device: FsDevice
    channel_done: threading.Thread
    mapper: Mapper


@pytest.fixture(params=[PROTO, PROTO & ~SHMEM], ids=["shmem", "no-shmem"])
def rig(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Rig]:
    protocol: int = request.param
    path = tmp_path / "fs.sock"
    device = FsDevice(protocol)
    mapper = Mapper()
    with BackendListener(path) as listener:
        fe = Frontend.connect(path)
        session = listener.accept(timeout=5)
        with serve_in_thread(session, device), fe:
            fe.negotiate()
            channel = fe.set_backend_req_fd()
            assert device.ready.wait(5)

            def serve_channel() -> None:
                try:
                    while True:
                        try:
                            channel.process_one(mapper)
                        except (RequestRefusedError, ValueError):
                            continue
                except Exception:  # the channel was closed at teardown
                    return

            t = threading.Thread(target=serve_channel, daemon=True)
            t.start()
            yield Rig(fe, device, t, mapper)
            channel.close()
            t.join(5)


def _memfd(content: bytes) -> int:
    fd = os.memfd_create("shm-test")
    os.ftruncate(fd, 8192)
    os.pwrite(fd, content, 4096)
    return fd


def test_shmem_map_carries_the_fd(rig: Rig) -> None:
    ch = rig.device.channel
    assert ch is not None
    fd = _memfd(b"dax window bytes")
    try:
        if rig.device.protocol & SHMEM:
            ch.shmem_map(0, 4096, 0x2000, 4096, fd, writable=True)
            ch.shmem_unmap(0, 0x2000, 4096)
            assert rig.mapper.maps == [(0, 4096, 0x2000, 4096, 1, b"dax window bytes")]
            assert rig.mapper.unmaps == [(0, 0x2000, 4096)]
            # The front-end's refusal reaches the back-end as a NACK.
            with pytest.raises(RequestRefusedError):
                ch.shmem_unmap(0, 1 << 21, 4096)
        else:
            with pytest.raises(InactiveFeatureError):
                ch.shmem_map(0, 0, 0, 4096, fd)
            assert rig.mapper.maps == []
    finally:
        os.close(fd)


@pytest.mark.parametrize(
    ("fd_offset", "shm_offset", "length"),
    [(0, 0, 0), (2**64 - 4096, 0, 8192), (0, 2**64 - 1, 2)],
    ids=["zero-length", "fd-offset-overflow", "shm-offset-overflow"],
)
def test_shmem_map_bounds_checked_before_sending(
    rig: Rig, fd_offset: int, shm_offset: int, length: int
) -> None:
    ch = rig.device.channel
    assert ch is not None
    fd = _memfd(b"x")
    try:
        with pytest.raises(InvalidParamError):
            ch.shmem_map(0, fd_offset, shm_offset, length, fd)
    finally:
        os.close(fd)
    assert rig.mapper.maps == []
    # The main connection is unaffected.
    assert rig.frontend.get_features() & (1 << 32)
