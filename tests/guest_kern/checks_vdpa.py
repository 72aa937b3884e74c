"""The vDPA checks: a VDUSE virtio-blk device from qemu-storage-daemon, driven through
``VhostVdpa`` (identity, config, status handshake, DMA mapping, block I/O checked against
the image, unmap, reset), and rows I of ADVERSARIAL.md on it."""

from __future__ import annotations

import errno
import gc
import random
from collections.abc import Callable
from pathlib import Path

from vhost import (
    ClosedError,
    EventFd,
    GuestMemory,
    InvalidMemoryError,
    InvalidParamError,
    KernelError,
    MemoryRegion,
)
from vhost.kern import BackendFeature
from vhost.vdpa import VhostVdpa
from vhost.virtio import DeviceId

from .report import bad_int_refusals, check, errno_of, fd_count, maps_count
from .vdpa_blk import SECTOR, T_IN, VdpaBlk, VdusePeer, make_image

IMAGE = Path("/tmp/vdpa-blk.img")
IMAGE_SIZE = 4 << 20


def blk_through_vdpa() -> None:
    original = make_image(IMAGE, IMAGE_SIZE)
    peer = None
    with check("vdpa_setup") as info:
        peer = VdusePeer(IMAGE)
        info["node"] = peer.node
    if peer is None or not peer.node:
        return
    try:
        _blk_checks(peer, original)
        _lifecycle(peer, original)
        _adversarial(peer)
    finally:
        peer.close()


def _blk_checks(peer: VdusePeer, original: bytes) -> None:
    blk: VdpaBlk | None = None
    with check("vdpa_identity") as info:
        blk = VdpaBlk(peer.node)
        info["device_id"] = blk.device_id
        info["capacity"] = blk.capacity
        info["config_size"] = blk.config_size
        info["vqs"] = blk.vqs
        info["max_queue"] = blk.max_queue
        info["iova_range"] = f"{blk.iova_range.first:#x}-{blk.iova_range.last:#x}"
        info["features"] = hex(blk.features)
        info["backend_features"] = hex(int(blk.backend_offered))
        info["status"] = hex(int(blk.status))
        assert blk.device_id == DeviceId.BLOCK
        assert blk.capacity == IMAGE_SIZE // SECTOR
        assert blk.status == 0xF, blk.status  # ACK | DRIVER | FEATURES_OK | DRIVER_OK
        # The group and address-space calls: a value, or the errno the kernel answers for
        # a device that has no groups (VDUSE has none in 6.12: EOPNOTSUPP).
        group_calls: tuple[tuple[str, Callable[[], int]], ...] = (
            ("groups", blk.dev.get_group_num),
            ("address_spaces", blk.dev.get_as_num),
            ("vring_group_0", lambda: blk.dev.get_vring_group(0)),
            ("vring_size_0", lambda: blk.dev.get_vring_size(0)),
            ("vring_desc_group_0", lambda: blk.dev.get_vring_desc_group(0)),
        )
        for name, call in group_calls:
            try:
                info[name] = call()
            except KernelError as e:
                info[name] = errno.errorcode[e.errno or 0]
        info["mappings"] = len(blk.dev.mappings())
        info["batched_map"] = blk.batched
    if blk is None:
        return
    try:
        with check("vdpa_blk_io") as info:
            # Read: sectors straight from the image.
            for sector in (0, 1, 777, IMAGE_SIZE // SECTOR - 8):
                got = blk.read(sector, 8 * SECTOR)
                want = original[sector * SECTOR : (sector + 8) * SECTOR]
                assert got == want, f"read at sector {sector} differs from the image"
            # Write then read back, at several offsets and sizes, then flush.
            rng = random.Random(5)
            written = {}
            for sector, count in ((16, 1), (100, 8), (2000, 64), (5000, 3)):
                data = rng.randbytes(count * SECTOR)
                blk.write(sector, data)
                written[sector] = data
                assert blk.read(sector, len(data)) == data, f"read-back at {sector}"
            blk.flush()
            # Many requests in flight at once.
            reqs = [(T_IN, 64 * i, 4096) for i in range(32)]
            blk.submit(reqs)
            for i in range(32):
                got = blk.memory.read(blk.window(i), 4096)
                assert got == original[64 * i * SECTOR : 64 * i * SECTOR + 4096], f"QD32 #{i}"
            # The image file itself holds what we wrote.
            with IMAGE.open("rb") as f:
                for sector, data in written.items():
                    f.seek(sector * SECTOR)
                    assert f.read(len(data)) == data, f"image at sector {sector}"
            info["writes"] = len(written)
            # Suspend/resume on the running device: done when offered, else the kernel
            # refuses (EOPNOTSUPP); I/O works afterwards either way.
            offered = blk.dev.get_backend_features()
            pairs: tuple[tuple[str, BackendFeature, Callable[[], None]], ...] = (
                ("suspend", BackendFeature.SUSPEND, blk.dev.suspend),
                ("resume", BackendFeature.RESUME, blk.dev.resume),
            )
            for op, feature, op_call in pairs:
                info[op] = errno_of(op_call)
                expected = "no error" if offered & feature else "ENOTSUP"
                assert info[op] == expected, info
            assert blk.read(0, SECTOR) == original[:SECTOR]
            info["qd32_reads"] = len(reqs)
        with check("vdpa_config") as info:
            # The config-change eventfd: attached, then detached.
            with EventFd() as config_call:
                blk.dev.set_config_call(config_call)
                blk.dev.set_config_call(None)
            info["config_call"] = "set+cleared"
            # The whole config space reads back; blk_size (offset 20) is 512 or more.
            space = blk.dev.get_config(0, blk.config_size)
            info["config_len"] = len(space)
            assert len(space) == blk.config_size
            assert space[:8] == blk.dev.get_config(0, 8)
            # A write inside the config space reaches the device (VDUSE keeps its config
            # read-only and ignores it); one past the end is the kernel's EINVAL.
            blk.dev.set_config(blk.config_size - 1, space[-1:])
            info["set_config"] = "ok"
            info["set_config_past_end"] = errno_of(
                lambda: blk.dev.set_config(blk.config_size, b"\0")
            )
            assert info["set_config_past_end"] == "EINVAL", info
            assert blk.dev.get_config(0, blk.config_size) == space
            info["get_config_past_end"] = errno_of(lambda: blk.dev.get_config(blk.config_size, 8))
            assert info["get_config_past_end"] == "EINVAL", info
            try:
                blk.dev.get_config(0xFFFF_FFF0, 0x20)
            except InvalidParamError:
                info["offset_overflow"] = "InvalidParamError"
            assert info.get("offset_overflow") == "InvalidParamError", info
        with check("vdpa_teardown") as info:
            blk.dev.unmap_memory(blk.memory)
            info["mappings_after_unmap"] = len(blk.dev.mappings())
            assert info["mappings_after_unmap"] == 0
            blk.dev.reset_device()
            info["status_after_reset"] = int(blk.dev.get_status())
            assert info["status_after_reset"] == 0
    finally:
        blk.dev.close()
        blk.kick.close()
        blk.call.close()


def _lifecycle(peer: VdusePeer, original: bytes) -> None:
    """Whole driver lifetimes (handshake, map, I/O, unmap, reset, close) leave no fd or
    mapping behind, and each starts from a reset device."""
    gc.collect()
    fds, maps = fd_count(), maps_count()
    with check("vdpa_lifecycle") as info:
        for _ in range(3):
            blk = VdpaBlk(peer.node)
            assert blk.read(8, SECTOR) == original[8 * SECTOR : 9 * SECTOR]
            blk.close()
            del blk
        gc.collect()
        info["fds"] = f"{fds}->{fd_count()}"
        info["maps"] = f"{maps}->{maps_count()}"
        assert (fd_count(), maps_count()) == (fds, maps), info


def _adversarial(peer: VdusePeer) -> None:
    gc.collect()
    before = fd_count()
    with check("vdpa_adversarial") as info:
        with VhostVdpa(peer.node) as dev:
            # The kernel allows one open at a time.
            info["second_open"] = errno_of(lambda: VhostVdpa(peer.node))
            assert info["second_open"] == "EBUSY", info
            dev.set_owner()
            count = dev.get_vqs_count()
            # A group or address space the device does not have.
            info["group_asid_bad_group"] = errno_of(lambda: dev.set_group_asid(99, 0))
            info["group_asid_bad_asid"] = errno_of(lambda: dev.set_group_asid(0, 99))
            # The kernel checks the index against the queues first (ENOBUFS), then asid.
            assert info["group_asid_bad_group"] == "ENOBUFS", info
            assert info["group_asid_bad_asid"] == "EINVAL", info
            int_args = bad_int_refusals(
                {
                    "set_vring_num:index": (lambda v: dev.set_vring_num(v, 64), 32),
                    "set_vring_num:num": (lambda v: dev.set_vring_num(0, v), 32),
                    "set_status:status": (dev.set_status, 8),
                    "get_config:offset": (lambda v: dev.get_config(v, 4), 32),
                    "get_config:size": (lambda v: dev.get_config(0, v), 32),
                    "set_vring_enable:index": (lambda v: dev.set_vring_enable(v, True), 32),
                    "get_vring_group:index": (dev.get_vring_group, 32),
                    "set_group_asid:asid": (lambda v: dev.set_group_asid(0, v), 32),
                    "dma_map:iova": (lambda v: dev.dma_map(v, 4096, 0), 64),
                    "dma_map:asid": (lambda v: dev.dma_map(0, 4096, 0, asid=v), 32),
                    "dma_unmap:size": (lambda v: dev.dma_unmap(0, v), 64),
                }
            )
            info["int_args"] = int_args
            assert set(int_args.values()) == {"ok"}, info
            info["vring_num_beyond_count"] = errno_of(lambda: dev.set_vring_num(count, 64))
            info["vring_enable_beyond_count"] = errno_of(
                lambda: dev.set_vring_enable(count + 5, True)
            )
            info["vring_group_beyond_count"] = errno_of(lambda: dev.get_vring_group(count))
            assert info["vring_num_beyond_count"] == "ENOBUFS", info
            assert info["vring_enable_beyond_count"] == "ENOBUFS", info
            # Unmapping an IOVA nothing was mapped at.
            try:
                dev.dma_unmap(0x40000000, 4096)
            except InvalidMemoryError as e:
                info["unmap_unmapped"] = f"InvalidMemoryError@{e.address:#x}"
            assert info.get("unmap_unmapped") == "InvalidMemoryError@0x40000000", info
            # Mapping outside the device's IOVA range, or wrapping past 2**64.
            last = dev.get_iova_range().last
            bad_iova = last + 1 if last < (1 << 64) - 1 - 4096 else (1 << 64) - 4096
            # Shared file-backed memory: VDUSE maps by file (anonymous memory is skipped).
            scratch = GuestMemory.allocate([(0, 1 << 16)])
            addr = scratch.regions()[0].userspace_addr
            info["map_outside_range"] = errno_of(lambda: dev.dma_map(bad_iova, 8192, addr))
            assert info["map_outside_range"] in ("EFAULT", "EINVAL"), info
            # An IOTLB update of size 0.
            info["map_size_0"] = errno_of(lambda: dev.dma_map(0x1000, 0, addr))
            assert info["map_size_0"] in ("EFAULT", "EINVAL"), info
            # Overlapping an existing mapping.
            dev.dma_map(0x200000, 8192, addr)
            info["map_overlap"] = errno_of(lambda: dev.dma_map(0x201000, 4096, addr))
            assert info["map_overlap"] in ("EFAULT", "EEXIST"), info
            dev.dma_unmap(0x200000, 8192)
            # set_mem_table maps regions at IOVA = guest address, replacing what it mapped.
            dev.set_mem_table([MemoryRegion(0x100000, 1 << 16, addr)])
            dev.set_mem_table([MemoryRegion(0x300000, 1 << 15, addr)])
            info["mem_table_mappings"] = str(dev.mappings())
            assert dev.mappings() == [(0, 0x300000, 1 << 15)], info
            dev.dma_unmap(0x300000, 1 << 15)
            info["mappings_left"] = len(dev.mappings())
            assert info["mappings_left"] == 0
        try:
            dev.get_device_id()
        except ClosedError:
            info["after_close"] = "ClosedError"
        assert info.get("after_close") == "ClosedError"
        try:
            VhostVdpa("/dev/vhost-vdpa-99")
        except KernelError as e:
            info["missing_node"] = errno.errorcode[e.errno or 0]
        assert info.get("missing_node") == "ENOENT", info
        del scratch
        gc.collect()
        info["fds_before"], info["fds_after"] = before, fd_count()
        assert info["fds_after"] == before, info
