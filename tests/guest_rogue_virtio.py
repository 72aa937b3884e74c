"""Run inside the test guest (as root, ``mode="host"``): drive the virtio-blk PCI device
by hand, with its descriptor table and available ring where the vIOMMU gives the device
nothing.

The guest kernel's own driver always maps what it gives the device, so this is the one
way, with no module of our own, to make a device behind the vIOMMU see such an address:
unbind the device from ``virtio-pci``, switch its IOMMU group to the identity domain
(QEMU then translates I/O virtual addresses one to one: the used ring can sit in a page
of this process, at its guest-physical address, which QEMU must translate before it
starts the back-end), program the modern virtio-pci registers through the sysfs BAR
file (reset, features ``VERSION_1`` and ``ACCESS_PLATFORM``, queue 0 with its
descriptor table and available ring at ``RING_IOVA``, beyond the guest's memory,
``DRIVER_OK``), notify the queue, wait ``--wait`` seconds while the back-end asks QEMU
for a translation QEMU cannot give, then reset the device, give the group its DMA
domain back and bind it to ``virtio-pci`` again, so the guest's own driver takes it
back (``/dev/vda``).

Prints ``ROGUE-RING-AT=0x...`` once the queue is notified and ``ROGUE-DONE`` once the
device is bound again; any failure is one line on stderr and exit status 1.
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
#: Beyond the guest's memory (the tests give it 512 MiB) and below the PCI hole.
RING_IOVA = 0x7FF0_0000
QUEUE_SIZE = 16

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


def run(wait: float) -> None:
    dev = find_device()
    bdf = dev.name
    if (dev / "driver").exists():
        (dev / "driver" / "unbind").write_text(bdf)
    set_domain(dev, "identity")
    used, used_gpa = own_page()
    caps = virtio_caps((dev / "config").read_bytes())
    if COMMON_CFG not in caps or NOTIFY_CFG not in caps:
        raise Fail(f"{bdf}: no common or notify virtio capability ({sorted(caps)})")
    enable_memory_and_bus_master(dev)
    cbar, coff, _ = caps[COMMON_CFG]
    nbar, noff, mult = caps[NOTIFY_CFG]
    bars = {b: map_bar(dev, b) for b in {cbar, nbar}}
    common = Regs(bars[cbar], coff)
    common.w8(DEVICE_STATUS, 0)
    deadline = time.monotonic() + 5
    while common.r8(DEVICE_STATUS) != 0:
        if time.monotonic() > deadline:
            raise Fail(f"{bdf}: the device does not reset")
        time.sleep(0.01)
    common.w8(DEVICE_STATUS, ACKNOWLEDGE | DRIVER)
    common.w32(DEVICE_FEATURE_SELECT, 1)
    offered = common.r32(DEVICE_FEATURE)
    if offered & (VERSION_1 | ACCESS_PLATFORM) != VERSION_1 | ACCESS_PLATFORM:
        raise Fail(f"{bdf}: VERSION_1 and ACCESS_PLATFORM not offered (high word {offered:#x})")
    common.w32(DRIVER_FEATURE_SELECT, 0)
    common.w32(DRIVER_FEATURE, 0)
    common.w32(DRIVER_FEATURE_SELECT, 1)
    common.w32(DRIVER_FEATURE, VERSION_1 | ACCESS_PLATFORM)
    common.w8(DEVICE_STATUS, ACKNOWLEDGE | DRIVER | FEATURES_OK)
    if not common.r8(DEVICE_STATUS) & FEATURES_OK:
        raise Fail(f"{bdf}: the device refused the features")
    common.w16(QUEUE_SELECT, 0)
    common.w16(QUEUE_SIZE_REG, QUEUE_SIZE)
    common.w64(QUEUE_DESC, RING_IOVA)
    common.w64(QUEUE_DRIVER, RING_IOVA + 0x1000)
    common.w64(QUEUE_DEVICE, used_gpa)
    common.w16(QUEUE_ENABLE, 1)
    notify_off = common.r16(QUEUE_NOTIFY_OFF)
    common.w8(DEVICE_STATUS, ACKNOWLEDGE | DRIVER | FEATURES_OK | DRIVER_OK)
    Regs(bars[nbar], noff).w16(notify_off * mult, 0)
    print(f"ROGUE-RING-AT={RING_IOVA:#x}", flush=True)
    time.sleep(wait)
    common.w8(DEVICE_STATUS, 0)
    for bar in bars.values():
        bar.close()
    used.close()
    set_domain(dev, "DMA")
    (PCI / "drivers" / "virtio-pci" / "bind").write_text(bdf)
    print("ROGUE-DONE", flush=True)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--wait", type=float, required=True, help="seconds before taking it back")
    args = parser.parse_args()
    try:
        run(args.wait)
    except (Fail, OSError) as exc:
        print(f"guest_rogue_virtio: {exc}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
