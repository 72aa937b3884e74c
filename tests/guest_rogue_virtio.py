"""Run inside the test guest (as root, ``mode="host"``): drive the virtio-blk PCI device
by hand, with addresses where the vIOMMU gives the device nothing.

The guest kernel's own driver always maps what it gives the device, so this is the one
way, with no module of our own, to make a device behind the vIOMMU see such an address:
unbind the device from ``virtio-pci``, switch its IOMMU group to the identity domain
(QEMU then translates I/O virtual addresses one to one: a page of this process is
mapped at its guest-physical address, and an address beyond the guest's memory
translates to no memory at all), and program the modern virtio-pci registers through
the sysfs BAR file (reset, features ``VERSION_1`` and ``ACCESS_PLATFORM``, queue 0,
``DRIVER_OK``). Two cases, on the same device, in this order:

* the request case (``--requests``): queue 0's rings in a page of this process, all
  mapped. Request 1 is a read whose header and status byte are in another such page
  but whose data buffer is at ``DATA_IOVA``, beyond the guest's memory; once it is back
  (``--timeout`` bounds each wait), request 2 writes ``PATTERN`` to sector ``SECTOR``
  and request 3 reads it back, all mapped. Each request's used element and status
  byte are printed: ``ROGUE-REQ<n> head=.. id=.. used_len=.. status=..`` (request 3
  adds ``data=same`` or ``data=different``), or ``ROGUE-REQ<n> head=.. none`` if it
  did not come back (the later ones are then not posted). Then the device is reset;
* the ring case: queue 0's descriptor table and available ring at ``RING_IOVA``,
  beyond the guest's memory (the used ring in a page of this process: QEMU translates
  it itself before it starts the back-end); notify; wait ``--wait`` seconds while the
  back-end asks QEMU for a translation QEMU cannot give; reset the device.

Then the group gets its DMA domain back and the device is bound to ``virtio-pci``
again, so the guest's own driver takes it back (``/dev/vda``).

Prints ``ROGUE-RING-AT=0x...`` once the ring case's queue is notified and
``ROGUE-DONE`` once the device is bound again; any failure is one line on stderr and
exit status 1.
"""

from __future__ import annotations

import argparse
import ctypes
import mmap
import os
import struct
import sys
import time
from pathlib import Path

PCI = Path("/sys/bus/pci")
VIRTIO_VENDOR = 0x1AF4
MODERN_BLK = 0x1042
#: Beyond the guest's memory (the tests give it 512 MiB) and below the PCI hole: where
#: the ring case puts queue 0's descriptor table and available ring ...
RING_IOVA = 0x7FF0_0000
#: ... and where the request case puts request 1's data buffer.
DATA_IOVA = 0x7FE0_0000
QUEUE_SIZE = 16
#: The sector requests 2 and 3 write and read back (byte 4096 of the disk), and what.
SECTOR = 8
SECTOR_BYTES = 512
PATTERN = bytes((i * 37 + 11) & 0xFF for i in range(SECTOR_BYTES))

# virtio-blk request types; split ring flags.
VIRTIO_BLK_T_IN, VIRTIO_BLK_T_OUT = 0, 1
VRING_DESC_F_NEXT, VRING_DESC_F_WRITE = 1, 2
VRING_AVAIL_F_NO_INTERRUPT = 1

# virtio_pci_cap cfg_type values, and the common configuration's fields (offsets).
COMMON_CFG, NOTIFY_CFG = 1, 2
DEVICE_FEATURE_SELECT, DEVICE_FEATURE = 0x00, 0x04
DRIVER_FEATURE_SELECT, DRIVER_FEATURE = 0x08, 0x0C
DEVICE_STATUS, QUEUE_SELECT, QUEUE_SIZE_REG = 0x14, 0x16, 0x18
QUEUE_ENABLE, QUEUE_NOTIFY_OFF = 0x1C, 0x1E
QUEUE_DESC, QUEUE_DRIVER, QUEUE_DEVICE = 0x20, 0x28, 0x30
ACKNOWLEDGE, DRIVER, DRIVER_OK, FEATURES_OK = 1, 2, 4, 8
# Feature bits 32 and 33, in the high word.
VERSION_1, ACCESS_PLATFORM = 1 << 0, 1 << 1


class Fail(Exception):
    """What went wrong, for the one-line report."""


def find_device() -> Path:
    for dev in sorted((PCI / "devices").iterdir()):
        ids = (int((dev / "vendor").read_text(), 16), int((dev / "device").read_text(), 16))
        if ids == (VIRTIO_VENDOR, MODERN_BLK):
            return dev
    raise Fail("no modern virtio-blk PCI device (1af4:1042)")


def virtio_caps(config: bytes) -> dict[int, tuple[int, int, int]]:
    """cfg_type -> (bar, offset, notify_off_multiplier) of the vendor capabilities."""
    caps: dict[int, tuple[int, int, int]] = {}
    at = config[0x34] & ~3
    while at:
        cap_id, nxt = config[at], config[at + 1]
        if cap_id == 0x09:
            cfg_type, bar = config[at + 3], config[at + 4]
            (offset,) = struct.unpack_from("<I", config, at + 8)
            mult = struct.unpack_from("<I", config, at + 16)[0] if cfg_type == NOTIFY_CFG else 0
            caps.setdefault(cfg_type, (bar, offset, mult))
        at = nxt & ~3
    return caps


class Regs:
    """Exact-width register access in a mapped BAR (QEMU's virtio-pci registers take
    the access size as the field's, so no byte-by-byte copies)."""

    def __init__(self, bar: mmap.mmap, base: int) -> None:
        self.bar, self.base = bar, base

    def _cell(self, kind: type[ctypes._SimpleCData[int]], off: int) -> ctypes._SimpleCData[int]:
        return kind.from_buffer(self.bar, self.base + off)

    def r8(self, off: int) -> int:
        return self._cell(ctypes.c_uint8, off).value

    def w8(self, off: int, v: int) -> None:
        self._cell(ctypes.c_uint8, off).value = v

    def r16(self, off: int) -> int:
        return self._cell(ctypes.c_uint16, off).value

    def w16(self, off: int, v: int) -> None:
        self._cell(ctypes.c_uint16, off).value = v

    def r32(self, off: int) -> int:
        return self._cell(ctypes.c_uint32, off).value

    def w32(self, off: int, v: int) -> None:
        self._cell(ctypes.c_uint32, off).value = v

    def w64(self, off: int, v: int) -> None:
        self.w32(off, v & 0xFFFF_FFFF)
        self.w32(off + 4, v >> 32)


def map_bar(dev: Path, bar: int) -> mmap.mmap:
    path = dev / f"resource{bar}"
    fd = os.open(path, os.O_RDWR | os.O_SYNC)
    try:
        return mmap.mmap(fd, os.fstat(fd).st_size)
    finally:
        os.close(fd)


def set_domain(dev: Path, kind: str) -> None:
    """The IOMMU group's default domain (``identity``, ``DMA``): no driver may be bound."""
    (dev / "iommu_group" / "type").write_text(kind)


def own_page() -> tuple[mmap.mmap, int]:
    """A locked page of this process and its guest-physical address (root reads it in
    /proc/self/pagemap)."""
    page = mmap.mmap(-1, mmap.PAGESIZE)
    page.write(b"\0" * mmap.PAGESIZE)
    libc = ctypes.CDLL(None, use_errno=True)
    address = ctypes.addressof(ctypes.c_char.from_buffer(page))
    if libc.mlock(ctypes.c_void_p(address), ctypes.c_size_t(mmap.PAGESIZE)) != 0:
        raise Fail(f"mlock: {os.strerror(ctypes.get_errno())}")
    with open("/proc/self/pagemap", "rb") as f:
        f.seek(address // mmap.PAGESIZE * 8)
        (entry,) = struct.unpack("<Q", f.read(8))
    if not entry >> 63 or not entry & ((1 << 55) - 1):
        raise Fail(f"/proc/self/pagemap: no frame for {address:#x} ({entry:#x})")
    return page, (entry & ((1 << 55) - 1)) * mmap.PAGESIZE


def enable_memory_and_bus_master(dev: Path) -> None:
    fd = os.open(dev / "config", os.O_RDWR)
    try:
        (command,) = struct.unpack("<H", os.pread(fd, 2, 4))
        os.pwrite(fd, struct.pack("<H", command | 0x6), 4)
    finally:
        os.close(fd)


class Device:
    """The virtio-blk PCI device taken from its driver: its common configuration and
    its queue notification register, mapped from the sysfs BAR files."""

    def __init__(self, dev: Path) -> None:
        self.dev, self.bdf = dev, dev.name
        caps = virtio_caps((dev / "config").read_bytes())
        if COMMON_CFG not in caps or NOTIFY_CFG not in caps:
            raise Fail(f"{self.bdf}: no common or notify virtio capability ({sorted(caps)})")
        enable_memory_and_bus_master(dev)
        cbar, coff, _ = caps[COMMON_CFG]
        nbar, noff, self.mult = caps[NOTIFY_CFG]
        self.bars = {b: map_bar(dev, b) for b in {cbar, nbar}}
        self.common = Regs(self.bars[cbar], coff)
        self.notify_regs = Regs(self.bars[nbar], noff)
        self.notify_off = 0

    def reset(self) -> None:
        self.common.w8(DEVICE_STATUS, 0)
        deadline = time.monotonic() + 5
        while self.common.r8(DEVICE_STATUS) != 0:
            if time.monotonic() > deadline:
                raise Fail(f"{self.bdf}: the device does not reset")
            time.sleep(0.01)

    def start(self, desc: int, avail: int, used: int) -> None:
        """Reset, features ``VERSION_1`` and ``ACCESS_PLATFORM``, queue 0 at these I/O
        virtual addresses, ``DRIVER_OK``."""
        common = self.common
        self.reset()
        common.w8(DEVICE_STATUS, ACKNOWLEDGE | DRIVER)
        common.w32(DEVICE_FEATURE_SELECT, 1)
        offered = common.r32(DEVICE_FEATURE)
        if offered & (VERSION_1 | ACCESS_PLATFORM) != VERSION_1 | ACCESS_PLATFORM:
            raise Fail(
                f"{self.bdf}: VERSION_1 and ACCESS_PLATFORM not offered (high word {offered:#x})"
            )
        common.w32(DRIVER_FEATURE_SELECT, 0)
        common.w32(DRIVER_FEATURE, 0)
        common.w32(DRIVER_FEATURE_SELECT, 1)
        common.w32(DRIVER_FEATURE, VERSION_1 | ACCESS_PLATFORM)
        common.w8(DEVICE_STATUS, ACKNOWLEDGE | DRIVER | FEATURES_OK)
        if not common.r8(DEVICE_STATUS) & FEATURES_OK:
            raise Fail(f"{self.bdf}: the device refused the features")
        common.w16(QUEUE_SELECT, 0)
        common.w16(QUEUE_SIZE_REG, QUEUE_SIZE)
        common.w64(QUEUE_DESC, desc)
        common.w64(QUEUE_DRIVER, avail)
        common.w64(QUEUE_DEVICE, used)
        common.w16(QUEUE_ENABLE, 1)
        self.notify_off = common.r16(QUEUE_NOTIFY_OFF)
        common.w8(DEVICE_STATUS, ACKNOWLEDGE | DRIVER | FEATURES_OK | DRIVER_OK)

    def notify(self) -> None:
        self.notify_regs.w16(self.notify_off * self.mult, 0)

    def close(self) -> None:
        for bar in self.bars.values():
            bar.close()


class Ring:
    """Queue 0 as a split ring in one locked page of this process (descriptor table,
    available ring, used ring), with the requests' headers, status bytes and data in a
    second one: all mapped, as the group is identity (I/O virtual address = guest-physical)."""

    DESC, AVAIL, USED = 0x000, 0x100, 0x200
    #: In the buffer page: request ``i``'s header at ``i * 0x20``, its status byte 0x10
    #: further; the data of requests 2 and 3 at ``DATA`` and ``DATA + SECTOR_BYTES``.
    DATA = 0x200

    def __init__(self, device: Device) -> None:
        self.device = device
        self.page, self.gpa = own_page()
        self.buf, self.buf_gpa = own_page()
        self.next_desc = 0
        self.posted = 0
        # No interrupts: nothing in the guest handles the device's now.
        struct.pack_into("<H", self.page, self.AVAIL, VRING_AVAIL_F_NO_INTERRUPT)

    def start(self) -> None:
        self.device.start(self.gpa + self.DESC, self.gpa + self.AVAIL, self.gpa + self.USED)

    def request(self, number: int, kind: int, data: tuple[int, int, bool]) -> int:
        """Posts request ``number`` (1, 2, ...): header ``kind`` at :data:`SECTOR`, the
        data descriptor ``(iova, len, device-writable)``, a status byte set to 0xFF
        first; notifies the queue. Returns its head."""
        header_at = number * 0x20
        struct.pack_into("<IIQ", self.buf, header_at, kind, 0, SECTOR)
        self.buf[header_at + 0x10] = 0xFF
        chain = [
            (self.buf_gpa + header_at, 16, 0),
            (data[0], data[1], VRING_DESC_F_WRITE if data[2] else 0),
            (self.buf_gpa + header_at + 0x10, 1, VRING_DESC_F_WRITE),
        ]
        head = self.next_desc
        for i, (addr, length, flags) in enumerate(chain):
            last = i == len(chain) - 1
            struct.pack_into(
                "<QIHH",
                self.page,
                self.DESC + 16 * (head + i),
                addr,
                length,
                flags | (0 if last else VRING_DESC_F_NEXT),
                0 if last else head + i + 1,
            )
        self.next_desc += len(chain)
        struct.pack_into("<H", self.page, self.AVAIL + 4 + 2 * (self.posted % QUEUE_SIZE), head)
        self.posted += 1
        # x86 keeps stores in order: the entry is visible before the index.
        struct.pack_into("<H", self.page, self.AVAIL + 2, self.posted)
        self.device.notify()
        return head

    def wait_used(self, timeout: float) -> tuple[int, int] | None:
        """The used element of the last request posted, ``(id, len)``, once the device
        has returned it; None if it has not within ``timeout`` seconds."""
        deadline = time.monotonic() + timeout
        while struct.unpack_from("<H", self.page, self.USED + 2)[0] != self.posted:
            if time.monotonic() > deadline:
                return None
            time.sleep(0.01)
        at = self.USED + 4 + 8 * ((self.posted - 1) % QUEUE_SIZE)
        used_id, used_len = struct.unpack_from("<II", self.page, at)
        return used_id, used_len

    def status(self, number: int) -> int:
        return self.buf[number * 0x20 + 0x10]

    def data(self, offset: int, length: int) -> bytes:
        return bytes(self.buf[self.DATA + offset : self.DATA + offset + length])

    def close(self) -> None:
        self.page.close()
        self.buf.close()


def request_case(device: Device, timeout: float) -> None:
    """Requests on a mapped ring; request 1's data where the vIOMMU gives nothing. Prints
    ``ROGUE-REQ<n> id=.. used_len=.. status=..`` (``ROGUE-REQ<n> none`` if it did not
    come back within ``timeout`` seconds; the later ones are then not posted)."""
    ring = Ring(device)
    try:
        ring.start()
        requests = [
            (VIRTIO_BLK_T_IN, (DATA_IOVA, SECTOR_BYTES, True)),
            (VIRTIO_BLK_T_OUT, (ring.buf_gpa + ring.DATA, SECTOR_BYTES, False)),
            (VIRTIO_BLK_T_IN, (ring.buf_gpa + ring.DATA + SECTOR_BYTES, SECTOR_BYTES, True)),
        ]
        ring.buf[ring.DATA : ring.DATA + SECTOR_BYTES] = PATTERN
        ring.buf[ring.DATA + SECTOR_BYTES : ring.DATA + 2 * SECTOR_BYTES] = b"\xee" * SECTOR_BYTES
        for number, (kind, data) in enumerate(requests, start=1):
            head = ring.request(number, kind, data)
            used = ring.wait_used(timeout)
            if used is None:
                print(f"ROGUE-REQ{number} head={head} none", flush=True)
                return
            line = f"ROGUE-REQ{number} head={head} id={used[0]} used_len={used[1]}"
            line += f" status={ring.status(number)}"
            if number == 3:
                same = ring.data(SECTOR_BYTES, SECTOR_BYTES) == PATTERN
                line += f" data={'same' if same else 'different'}"
            print(line, flush=True)
    finally:
        device.reset()
        ring.close()


def ring_case(device: Device, wait: float) -> None:
    """Queue 0's descriptor table and available ring at ``RING_IOVA``, its used ring in a
    page of this process; notify; wait ``wait`` seconds."""
    used, used_gpa = own_page()
    try:
        device.start(RING_IOVA, RING_IOVA + 0x1000, used_gpa)
        device.notify()
        print(f"ROGUE-RING-AT={RING_IOVA:#x}", flush=True)
        time.sleep(wait)
    finally:
        device.reset()
        used.close()


def run(wait: float, timeout: float, requests: bool) -> None:
    dev = find_device()
    bdf = dev.name
    if (dev / "driver").exists():
        (dev / "driver" / "unbind").write_text(bdf)
    set_domain(dev, "identity")
    device = Device(dev)
    try:
        if requests:
            request_case(device, timeout)
        ring_case(device, wait)
    finally:
        device.close()
    set_domain(dev, "DMA")
    (PCI / "drivers" / "virtio-pci" / "bind").write_text(bdf)
    print("ROGUE-DONE", flush=True)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--wait", type=float, required=True, help="ring case: seconds before taking it back"
    )
    parser.add_argument(
        "--requests",
        action="store_true",
        help="run the request case first, on the same device, before the ring case",
    )
    parser.add_argument(
        "--timeout",
        type=float,
        default=30.0,
        help="request case: seconds each request may take to come back",
    )
    args = parser.parse_args()
    try:
        run(args.wait, args.timeout, args.requests)
    except (Fail, OSError) as exc:
        print(f"guest_rogue_virtio: {exc}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
