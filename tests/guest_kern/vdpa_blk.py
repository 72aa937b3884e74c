"""A VDUSE block device in the guest and a minimal virtio-blk driver on it through
``vhost.vdpa.VhostVdpa``: qemu-storage-daemon exports an image as ``vduse-blk``, ``vdpa
dev add`` binds it to vhost-vdpa, and our split ring (IOVA = guest address) carries the
requests."""

from __future__ import annotations

import os
import struct
import subprocess
import time
from collections.abc import Sequence
from pathlib import Path

from vhost import EventFd, GuestMemory
from vhost.kern import BackendFeature
from vhost.vdpa import VhostVdpa
from vhost.virtio import BlkFeature, DeviceStatus, VirtioFeature, Virtqueue, place_rings

SECTOR = 512
T_IN, T_OUT, T_FLUSH = 0, 1, 4
_OUTHDR = struct.Struct("<IIQ")
QSIZE = 128
MEM = 8 << 20
RING, HDRS, STATUS, DATA = 0x0, 0x10000, 0x20000, 0x100000
SLOT_DATA = 64 * 1024  # data window per request slot
SLOTS = 64


class VdusePeer:
    """qemu-storage-daemon exporting ``image`` as VDUSE device ``name``, bound to
    vhost-vdpa with the ``vdpa`` tool; :attr:`node` is its ``/dev/vhost-vdpa-N``."""

    def __init__(
        self, image: Path, name: str = "vduse0", *, writable: bool = True, cpu: int | None = None
    ) -> None:
        self.name = name
        self.log = Path(f"/tmp/qsd-{name}.log")
        pin = [] if cpu is None else ["taskset", "-c", str(cpu)]
        self.proc = subprocess.Popen(
            [
                *pin,
                "qemu-storage-daemon",
                "--blockdev", f"driver=file,node-name=f0,filename={image},cache.direct=off",
                "--export",
                f"type=vduse-blk,id=v0,node-name=f0,name={name},"
                f"writable={'on' if writable else 'off'},num-queues=1",
            ],
            stdout=self.log.open("wb"),
            stderr=subprocess.STDOUT,
        )  # fmt: skip
        self.node = ""
        try:
            _wait_for(Path(f"/dev/vduse/{name}"), self.proc, self.log)
            subprocess.run(
                ["vdpa", "dev", "add", "name", name, "mgmtdev", "vduse"],
                check=True,
                capture_output=True,
            )
            sysdir = Path(f"/sys/bus/vdpa/devices/{name}")
            deadline = time.monotonic() + 20
            while True:
                found = sorted(sysdir.glob("vhost-vdpa-*"))
                if found and Path(f"/dev/{found[0].name}").exists():
                    self.node = f"/dev/{found[0].name}"
                    break
                if time.monotonic() > deadline:
                    raise RuntimeError(f"no vhost-vdpa node for {name}")
                time.sleep(0.05)
        except BaseException:
            self.close()
            raise

    def close(self) -> None:
        if self.node:
            subprocess.run(["vdpa", "dev", "del", self.name], check=False, capture_output=True)
            self.node = ""
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(20)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()


def _wait_for(path: Path, proc: subprocess.Popen[bytes], log: Path) -> None:
    deadline = time.monotonic() + 30
    while not path.exists():
        if proc.poll() is not None:
            raise RuntimeError(f"qemu-storage-daemon exited: {log.read_text()}")
        if time.monotonic() > deadline:
            raise RuntimeError(f"{path} did not appear: {log.read_text()}")
        time.sleep(0.05)


class VdpaBlk:
    """virtio-blk over vhost-vdpa: the virtio status handshake, our memory mapped with
    ``dma_map``, queue 0 set up, then requests as descriptor chains."""

    WANT = (
        VirtioFeature.VERSION_1
        | VirtioFeature.ACCESS_PLATFORM
        | BlkFeature.SEG_MAX
        | BlkFeature.BLK_SIZE
        | BlkFeature.FLUSH
    )

    def __init__(self, node: str) -> None:
        self.dev = VhostVdpa(node)
        dev = self.dev
        self.device_id = dev.get_device_id()
        self.config_size = dev.get_config_size()
        self.capacity = struct.unpack("<Q", dev.get_config(0, 8))[0]
        self.vqs = dev.get_vqs_count()
        self.max_queue = dev.get_vring_num()
        self.iova_range = dev.get_iova_range()
        dev.set_owner()
        self.backend_offered = dev.get_backend_features()
        dev.set_backend_features(
            self.backend_offered & (BackendFeature.IOTLB_MSG_V2 | BackendFeature.IOTLB_BATCH)
        )
        dev.set_status(DeviceStatus.ACKNOWLEDGE | DeviceStatus.DRIVER)
        self.offered = dev.get_features()
        self.features = self.offered & int(self.WANT)
        dev.set_features(self.features)
        dev.set_status(dev.get_status() | DeviceStatus.FEATURES_OK)
        if not dev.get_status() & DeviceStatus.FEATURES_OK:
            raise RuntimeError("the device refused FEATURES_OK")
        self.memory = GuestMemory.allocate([(0, MEM)])
        # With IOTLB_BATCH the device applies the whole map at BATCH_END.
        self.batched = bool(self.backend_offered & BackendFeature.IOTLB_BATCH)
        if self.batched:
            with dev.iotlb_batch():
                dev.map_memory(self.memory)
        else:
            dev.map_memory(self.memory)
        self.queue = Virtqueue(self.memory, QSIZE, *place_rings(RING, QSIZE))
        self.kick, self.call = EventFd(), EventFd()
        dev.setup_queue(0, self.queue, self.kick, self.call)
        dev.set_status(dev.get_status() | DeviceStatus.DRIVER_OK)
        self.status = dev.get_status()

    def _chain(self, slot: int, kind: int, sector: int, length: int) -> int:
        hdr, st, data = HDRS + 16 * slot, STATUS + slot, DATA + SLOT_DATA * slot
        self.memory.write(hdr, _OUTHDR.pack(kind, 0, sector))
        self.memory.write(st, b"\xff")
        readable, writable = [(hdr, 16)], [(st, 1)]
        if length and kind == T_OUT:
            readable.append((data, length))
        elif length:
            writable.insert(0, (data, length))
        return self.queue.add(readable, writable)

    def submit(self, requests: Sequence[tuple[int, int, int]]) -> None:
        """Runs ``(kind, sector, length)`` requests, one per slot, all at once; write
        data must already be in each slot's window (:meth:`window`)."""
        heads = {self._chain(i, k, s, n): i for i, (k, s, n) in enumerate(requests)}
        self.queue.publish()
        self.kick.write(1)
        pending = set(heads)
        while pending:
            done = self.queue.poll_used()
            if not done:
                if not self.call.wait(10):
                    raise TimeoutError(f"{len(pending)} requests not completed")
                self.call.read()
                continue
            for head, _len in done:
                pending.discard(head)
                status = self.memory.read(STATUS + heads[head], 1)[0]
                if status != 0:
                    raise OSError(f"virtio-blk status {status} for {requests[heads[head]]}")

    def window(self, slot: int) -> int:
        return DATA + SLOT_DATA * slot

    def read(self, sector: int, length: int) -> bytes:
        self.submit([(T_IN, sector, length)])
        return self.memory.read(DATA, length)

    def write(self, sector: int, data: bytes) -> None:
        self.memory.write(DATA, data)
        self.submit([(T_OUT, sector, len(data))])

    def flush(self) -> None:
        self.submit([(T_FLUSH, 0, 0)])

    def close(self) -> None:
        """Unmap, reset, close: the order a driver tears down in."""
        try:
            self.dev.unmap_memory(self.memory)
            self.dev.reset_device()
        finally:
            self.dev.close()
            self.kick.close()
            self.call.close()


def make_image(path: Path, size: int) -> bytes:
    """An image whose every sector starts with its number, the rest a byte pattern."""
    pattern = bytes(range(256)) * 3
    sectors = bytearray()
    for n in range(size // SECTOR):
        sectors += struct.pack("<Q", n) + pattern[n % 256 : n % 256 + SECTOR - 8]
    path.write_bytes(sectors)
    os.sync()
    return bytes(sectors)
