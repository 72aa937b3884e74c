"""virtio-blk written in Python on the daemon framework: the Python device path.

:class:`PythonBlkDevice` does what the native :class:`vhost.daemon.BlkDevice` does for
read, write, flush and get-id, in plain Python (``os.pread``/``os.pwrite`` per request).
It exists to measure and to show what the Python device interface costs against the
native one (``python -m vhost serve blk --python``); use the native device to serve
disks.
"""

from __future__ import annotations

import os
import struct
import threading

from .. import _core
from ..daemon import Device, ImageFile
from ..errors import DisconnectedError, InvalidParamError, QueueError

__all__ = ["PythonBlkDevice"]

_SECTOR = 512
_HEADER = struct.Struct("<IIQ")
_IN, _OUT, _FLUSH, _GET_ID = 0, 1, 4, 8
_OK, _IOERR, _UNSUPP = b"\x00", b"\x01", b"\x02"
_F_SEG_MAX, _F_RO, _F_BLK_SIZE, _F_FLUSH, _F_MQ = 1 << 2, 1 << 5, 1 << 6, 1 << 9, 1 << 12


class PythonBlkDevice(Device):
    """virtio-blk over the raw image file at ``path``.

    The image is opened, checked and locked exactly as the native device does it
    (:class:`vhost.daemon.ImageFile`): the same errors for a missing, unwritable, empty,
    non-raw or in-use image, and the same QEMU-compatible locks (``lock``,
    ``force_share``), held until :meth:`close`.
    """

    device_type = 2

    def __init__(
        self,
        path: str | os.PathLike[str],
        *,
        num_queues: int = 1,
        queue_size: int = 256,
        readonly: bool = False,
        serial: str = "pyvhost-py",
        lock: bool = True,
        force_share: bool = False,
    ) -> None:
        if num_queues < 1 or queue_size < 3:
            raise InvalidParamError("a block device needs a queue of at least 3 entries")
        if len(serial.encode()) > 20:
            raise InvalidParamError("the serial is at most 20 bytes")
        self.image = ImageFile(path, readonly=readonly, lock=lock, force_share=force_share)
        self.fd = self.image.fileno()
        self.capacity = self.image.size // _SECTOR
        self.readonly = readonly
        self.num_queues = num_queues
        self.max_queue_size = queue_size
        self.serial = serial.encode().ljust(20, b"\x00")
        self.features = _F_SEG_MAX | _F_BLK_SIZE | _F_FLUSH | _F_MQ | (_F_RO if readonly else 0)
        self._resizing = threading.Lock()

    def close(self) -> None:
        """Closes the image, releasing its locks."""
        self.image.close()

    def resize(self, size: int | None = None) -> tuple[int, int, bool]:
        """Grows the disk as the native :meth:`vhost.daemon.BlkDevice.resize` does: to the
        image's size now (``size`` None) or to ``size`` bytes (growing the file), never
        smaller; then tells the front-end. Returns ``(old, new, notified)`` in sectors."""
        with self._resizing:
            old = self.capacity
            if size is not None and size % _SECTOR:
                raise InvalidParamError(f"{size} bytes is not a multiple of 512")
            new = (os.lseek(self.fd, 0, os.SEEK_END) if size is None else size) // _SECTOR
            if new < old:
                raise InvalidParamError(
                    f"the new size ({new} sectors) is smaller than the disk ({old} sectors); "
                    "a disk is only grown, never shrunk under a guest"
                )
            if new == old:
                return old, new, False
            if size is not None and os.lseek(self.fd, 0, os.SEEK_END) < size:
                if self.readonly:
                    raise InvalidParamError(
                        f"cannot grow the image file to {size} bytes: the disk is served read-only"
                    )
                os.ftruncate(self.fd, size)
            self.capacity = new
            try:
                self.frontend.config_change()
            except DisconnectedError:
                return old, new, False
            return old, new, True

    def config(self) -> bytes:
        cfg = bytearray(60)
        struct.pack_into("<Q", cfg, 0, self.capacity)
        # seg_max as the native device computes it (rust/src/devices/blk.rs, seg_max): a
        # request must fit QEMU's default 128-entry ring too, not only our largest.
        struct.pack_into("<I", cfg, 12, max(1, min(self.max_queue_size, 128) - 2))
        struct.pack_into("<I", cfg, 20, _SECTOR)
        struct.pack_into("<H", cfg, 34, self.num_queues)
        return bytes(cfg)

    def process(self, queue: int, batch: _core.Batch) -> None:
        for chain in batch:
            data_in = chain.writable_len - 1
            if data_in < 0:
                batch.complete(chain, 0)
                continue
            try:
                status, written = self._execute(batch, chain, data_in)
            except QueueError:
                # What was read is not the guest's (postcopy failed under the read): the
                # request fails, as on the native device, and nothing reaches the image.
                status, written = _IOERR, 0
            batch.write(chain, status, data_in)
            batch.complete(chain, written + 1)

    def _execute(
        self, batch: _core.Batch, chain: _core.DescriptorChain, data_in: int
    ) -> tuple[bytes, int]:
        if chain.readable_len < _HEADER.size:
            return _IOERR, 0
        kind, _, sector = _HEADER.unpack(batch.read(chain, 0, _HEADER.size))
        if kind == _IN:
            if not self._fits(sector, data_in):
                return _IOERR, 0
            data = os.pread(self.fd, data_in, sector * _SECTOR)
            if len(data) != data_in:
                return _IOERR, 0
            return _OK, batch.write(chain, data)
        if kind == _OUT:
            length = chain.readable_len - _HEADER.size
            if self.readonly or not self._fits(sector, length):
                return _IOERR, 0
            data = batch.read(chain, _HEADER.size)
            if os.pwrite(self.fd, data, sector * _SECTOR) != length:
                return _IOERR, 0
            return _OK, 0
        if kind == _FLUSH:
            os.fdatasync(self.fd)
            return _OK, 0
        if kind == _GET_ID:
            return _OK, batch.write(chain, self.serial[:data_in])
        return _UNSUPP, 0

    def _fits(self, sector: int, length: int) -> bool:
        return length % _SECTOR == 0 and sector + length // _SECTOR <= self.capacity
