"""The vhost-net checks (TX to the tap, RX from it) and rows I of ADVERSARIAL.md that a
vhost-net device reaches."""

from __future__ import annotations

import contextlib
import errno
import gc
import os
import select
import socket
from pathlib import Path

from vhost import (
    ClosedError,
    EventFd,
    GuestMemory,
    InvalidParamError,
    IotlbAccess,
    IotlbMessage,
    IotlbType,
    KernelError,
    MemoryRegion,
)
from vhost.kern import VHOST_NET_F_VIRTIO_NET_HDR, BackendFeature, KernelBackend, VhostNet
from vhost.virtio import VirtioFeature, Virtqueue, place_rings, setup_queue

from .net import (
    ETH_TYPE,
    HDR_LEN,
    MEM,
    QSIZE,
    RX_BUFS,
    TX_BUFS,
    TX_RING,
    NetRig,
    frame,
    open_tap,
)
from .report import bad_int_refusals, check, errno_of, fd_count, maps_count


def tx_frames_come_out_of_the_tap() -> None:
    with check("net_tx") as info:
        rig = NetRig.create()
        try:
            frames = [frame(i, 60 + 7 * i) for i in range(8)]
            rig.send(frames)
            seen: list[bytes] = []
            while len(seen) < len(frames):
                ready, _, _ = select.select([rig.capture], [], [], 10)
                assert ready, f"only {len(seen)} of {len(frames)} frames reached the tap"
                seen.append(rig.capture.recv(4096))
            assert seen == frames, "frames differ"
            used = rig.reap(rig.tx, rig.calls[VhostNet.TX], len(frames))
            info["frames"] = len(seen)
            info["tx_used"] = len(used)
        finally:
            rig.close()


def tap_frames_arrive_in_rx() -> None:
    with check("net_rx") as info:
        rig = NetRig.create()
        try:
            heads = rig.post_rx(16)
            frames = [frame(100 + i, 64 + 11 * i) for i in range(5)]
            for f in frames:
                rig.capture.send(f)
            # Whatever else the interface sends (IPv6 neighbour discovery...) also lands
            # in the ring: collect until our five are in, and keep only ours.
            ours: list[bytes] = []
            others = 0
            while len(ours) < len(frames):
                assert len(ours) + others < len(heads), f"ring full: {len(ours)} ours, {others}"
                for head, length in rig.reap(rig.rx, rig.calls[VhostNet.RX], 1):
                    data = rig.memory.read(heads[head], length)
                    assert len(data) > HDR_LEN, f"{length} bytes: no frame after the header"
                    if data[HDR_LEN + 12 : HDR_LEN + 14] == ETH_TYPE.to_bytes(2, "big"):
                        ours.append(data[HDR_LEN:])
                    else:
                        others += 1
            assert ours == frames, f"RX got {len(ours)} of our frames: {ours!r}"
            info["frames"] = len(ours)
            info["other_frames"] = others
        finally:
            rig.close()


def errors_are_typed_with_the_kernel_errno() -> None:
    """ADVERSARIAL I1, I2, I4, I5, I9, I10 on a real /dev/vhost-net."""
    with check("adv_not_vhost") as info:
        for path in ("/dev/null", "/dev/net/tun"):
            try:
                KernelBackend(path)
            except KernelError as e:
                assert e.errno == errno.ENOTTY or (
                    path == "/dev/net/tun" and e.errno == errno.EBADFD
                ), e
                info[path] = errno.errorcode[e.errno]
            else:
                raise AssertionError(f"{path} accepted as a vhost device")
    with check("adv_closed") as info:
        net = VhostNet()
        number = net.fileno()
        net.close()
        # The fd number goes to the next file opened; the closed device must not use it.
        reused = os.open("/dev/null", os.O_RDONLY)
        try:
            info["number_reused"] = reused == number
            try:
                net.get_features()
            except ClosedError:
                info["closed"] = "ClosedError"
            else:
                raise AssertionError("a closed device answered")
        finally:
            os.close(reused)
        # from_fd adopts a duplicate: the caller's fd can be closed right away.
        raw = os.open("/dev/vhost-net", os.O_RDWR)
        adopted = KernelBackend.from_fd(raw)
        os.close(raw)
        with adopted:
            adopted.set_owner()
            info["from_fd_features"] = hex(adopted.get_features())
    with check("adv_errno") as info:
        with VhostNet() as net:
            net.set_owner()
            info["set_owner_twice"] = errno_of(net.set_owner)
            assert info["set_owner_twice"] == "EBUSY"
            info["vring_num_index_2"] = errno_of(lambda: net.set_vring_num(2, 256))
            assert info["vring_num_index_2"] == "ENOBUFS"
            info["vring_base_index_9"] = errno_of(lambda: net.get_vring_base(9))
            assert info["vring_base_index_9"] == "ENOBUFS"
            info["vring_num_0"] = errno_of(lambda: net.set_vring_num(0, 0))
            info["vring_num_3"] = errno_of(lambda: net.set_vring_num(0, 3))
            assert info["vring_num_0"] == info["vring_num_3"] == "EINVAL", info
            with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as s:
                info["backend_index_2"] = errno_of(lambda: net.set_backend(2, s))
            assert info["backend_index_2"] == "ENOBUFS"
            # Before its rings are set up a queue refuses any backend.
            with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as s:
                info["backend_no_rings"] = errno_of(lambda: net.set_backend(0, s))
            assert info["backend_no_rings"] == "EFAULT"
        rig = NetRig.create("pvtap1")
        r, w = os.pipe()
        try:
            info["backend_pipe"] = errno_of(lambda: rig.net.set_backend(0, r))
            assert info["backend_pipe"] == "ENOTSOCK", info
            info["ring_change_running"] = errno_of(lambda: rig.net.set_vring_num(0, 128))
            assert info["ring_change_running"] == "EBUSY", info
        finally:
            os.close(r)
            os.close(w)
            rig.close()
        with VhostNet() as other:
            info["not_owner"] = errno_of(lambda: other.set_vring_num(0, 256))
            assert info["not_owner"] == "EPERM"
    # Checked once, by the native call (issue 11): the facade has no range checks.
    with check("adv_int_args") as info, VhostNet() as net:
        net.set_owner()
        info.update(
            bad_int_refusals(
                {
                    "set_vring_num:index": (lambda v: net.set_vring_num(v, 8), 32),
                    "set_vring_num:num": (lambda v: net.set_vring_num(0, v), 32),
                    "set_vring_base:base": (lambda v: net.set_vring_base(0, v), 32),
                    "get_vring_base:index": (net.get_vring_base, 32),
                    "set_vring_call:index": (lambda v: net.set_vring_call(v, None), 32),
                    "set_features:features": (net.set_features, 64),
                    "set_log_base:base": (net.set_log_base, 64),
                    "set_backend_features:features": (net.set_backend_features, 64),
                    "set_vring_endian:index": (lambda v: net.set_vring_endian(v, False), 32),
                    "set_vring_busyloop_timeout:usecs": (
                        lambda v: net.set_vring_busyloop_timeout(0, v),
                        32,
                    ),
                    "net_set_backend:index": (lambda v: net.set_backend(v, None), 32),
                }
            )
        )
        assert set(info.values()) == {"ok"}, info
        # Nothing reached the kernel: the device still answers.
        info["features_after"] = hex(net.get_features())


def no_fd_leak() -> None:
    """Failed opens, refused ioctls and whole device lifetimes leave no fd behind."""
    with check("adv_no_fd_leak") as info:
        gc.collect()
        before, maps_before = fd_count(), maps_count()
        for i in range(10):
            with contextlib.suppress(KernelError):
                KernelBackend("/dev/null")
            with VhostNet() as net:
                net.set_owner()
                errno_of(lambda: net.set_vring_num(5, 256))
            rig = NetRig.create(f"pvleak{i}")
            rig.send([frame(i)])
            rig.close()
            del rig
        gc.collect()
        info["before"], info["after"] = before, fd_count()
        info["maps_before"], info["maps_after"] = maps_before, maps_count()
        assert info["after"] == before, f"fds {before} -> {info['after']}"
        assert info["maps_after"] == maps_before, info


def iotlb_miss_update_invalidate() -> None:
    """vhost-net with ACCESS_PLATFORM: ring and buffer addresses are IOVAs the kernel
    translates through its IOTLB. It reports what it cannot translate as MISS messages we
    read and parse from the fd; our UPDATE lets the frame through; after an INVALIDATE
    the next frame misses again."""
    with check("net_iotlb") as info:
        tap = open_tap("pviotlb0")
        sniff = socket.socket(socket.AF_PACKET, socket.SOCK_RAW, socket.htons(ETH_TYPE))
        sniff.bind(("pviotlb0", ETH_TYPE))
        net = VhostNet()
        memory = GuestMemory.allocate([(0, MEM)])
        kick, call = EventFd(), EventFd()
        try:
            net.set_owner()
            net.set_backend_features(BackendFeature.IOTLB_MSG_V2)
            want = (
                int(VirtioFeature.VERSION_1 | VirtioFeature.ACCESS_PLATFORM)
                | VHOST_NET_F_VIRTIO_NET_HDR
            )
            net.set_features(want)
            uaddr = memory.regions()[0].userspace_addr
            # The kernel checks rings against a memory table even when it translates
            # through the IOTLB (no table: EFAULT on attach).
            net.set_mem_table([MemoryRegion(0, MEM, uaddr)])
            tx = Virtqueue(memory, QSIZE, *place_rings(TX_RING, QSIZE))
            net.set_vring_num(VhostNet.TX, QSIZE)
            # IOVA = guest address: the ring addresses are what the device sees.
            net.native.set_vring_addr(VhostNet.TX, tx.desc, tx.used, tx.avail)
            net.set_vring_base(VhostNet.TX, 0)
            net.set_vring_call(VhostNet.TX, call)
            net.set_vring_kick(VhostNet.TX, kick)
            chunk = 1 << 20

            def update(iova: int) -> None:
                """Maps the 1 MiB chunk of guest memory holding ``iova``, read-write."""
                base = iova & ~(chunk - 1)
                msg = IotlbMessage(base, chunk, uaddr + base, IotlbAccess.RW, IotlbType.UPDATE)
                net.send_iotlb_msg(msg)

            # Attaching the backend reads the used ring at once: map the rings first,
            # as QEMU does; buffers will miss.
            update(tx.used)
            net.set_backend(VhostNet.TX, tap)
            misses: list[IotlbMessage] = []

            def send_and_serve(seq: int) -> bytes:
                """Sends a frame; answers each miss with an update until it comes out."""
                f = frame(seq)
                memory.write(TX_BUFS, bytes(HDR_LEN) + f)
                tx.add([(TX_BUFS, HDR_LEN + len(f))], [])
                tx.publish()
                kick.write(1)
                while True:
                    ready, _, _ = select.select([sniff.fileno(), net.fileno()], [], [], 10)
                    assert ready, "no frame and no IOTLB miss"
                    if sniff.fileno() in ready:
                        return sniff.recv(4096)
                    msg = net.recv_iotlb_msg(timeout=0)
                    assert msg is not None and msg.type is IotlbType.MISS, msg
                    assert 0 <= msg.iova < MEM, msg
                    misses.append(msg)
                    update(msg.iova)

            assert send_and_serve(1) == frame(1)
            info["misses_first"] = len(misses)
            assert misses, "the kernel translated without any IOTLB update"
            before = len(misses)
            assert send_and_serve(2) == frame(2)  # translations cached: no new miss
            info["misses_cached"] = len(misses) - before
            net.send_iotlb_msg(IotlbMessage(0, MEM, 0, IotlbAccess(0), IotlbType.INVALIDATE))
            before = len(misses)
            assert send_and_serve(3) == frame(3)
            again = len(misses) - before
            info["misses_after_invalidate"] = again
            assert again >= 1, info
            info["first_miss"] = f"iova={misses[0].iova:#x} perm={misses[0].perm.name}"
        finally:
            net.close()
            sniff.close()
            os.close(tap)
            kick.close()
            call.close()


def control_plane_extras() -> None:
    """The rest of the generic requests on a real device: reset_owner, the busy-loop
    timeout, vring endianness, the memory table limits (ADVERSARIAL I3)."""
    with check("net_control") as info, VhostNet() as net:
        net.set_owner()
        net.reset_owner()
        net.set_owner()  # a reset device can be claimed again
        info["owner_after_reset"] = "ok"
        net.set_vring_busyloop_timeout(VhostNet.TX, 50)
        info["busyloop"] = net.get_vring_busyloop_timeout(VhostNet.TX)
        assert info["busyloop"] == 50, info
        # Only kernels built with cross-endian support have it: a value or ENOTTY.
        try:
            info["endian"] = int(net.get_vring_endian(VhostNet.RX))
        except KernelError as e:
            info["endian"] = errno.errorcode[e.errno or 0]
        assert info["endian"] in (0, "ENOTTY"), info
        try:
            net.set_mem_table([])
        except InvalidParamError:
            info["mem_table_empty"] = "InvalidParamError"
        assert info.get("mem_table_empty") == "InvalidParamError", info
        # More regions than the vhost module's max_mem_regions (64 by default).
        limit = int(Path("/sys/module/vhost/parameters/max_mem_regions").read_text())
        regions = [
            MemoryRegion(i << 20, 4096, 0x7F00_0000_0000 + (i << 20)) for i in range(limit + 1)
        ]
        info["mem_table_over_limit"] = errno_of(lambda: net.set_mem_table(regions))
        assert info["mem_table_over_limit"] == "E2BIG", info
        info["max_mem_regions"] = limit


def dirty_log() -> None:
    """VHOST_F_LOG_ALL with set_log_base/set_log_fd: the kernel marks the guest pages it
    writes (RX buffers) in our log and signals the log eventfd."""
    with check("net_dirty_log") as info:
        tap = open_tap("pvlog0")
        sniff = socket.socket(socket.AF_PACKET, socket.SOCK_RAW, socket.htons(ETH_TYPE))
        sniff.bind(("pvlog0", ETH_TYPE))
        net = VhostNet()
        memory = GuestMemory.allocate([(0, MEM)])
        log = GuestMemory.allocate([(0, 4096)])  # one bit per 4 KiB page: 128 bytes used
        kick, call, log_fd = EventFd(), EventFd(), EventFd(nonblock=True)
        try:
            net.set_owner()
            net.set_mem_table(
                [
                    MemoryRegion(r.guest_phys_addr, r.memory_size, r.userspace_addr)
                    for r in memory.regions()
                ]
            )
            net.set_log_base(log.regions()[0].userspace_addr)
            net.set_log_fd(log_fd)
            want = int(VirtioFeature.VERSION_1 | VirtioFeature.LOG_ALL) | VHOST_NET_F_VIRTIO_NET_HDR
            net.set_features(want)
            rx = Virtqueue(memory, QSIZE, *place_rings(0, QSIZE))
            setup_queue(net, VhostNet.RX, memory, rx, kick, call)
            net.set_backend(VhostNet.RX, tap)
            buf = RX_BUFS + 5 * 4096  # page 0x105
            rx.add([], [(buf, 2048)])
            rx.publish()
            kick.write(1)
            sniff.send(frame(9))
            ready, _, _ = select.select([call.fileno()], [], [], 10)
            assert ready, "no RX completion"
            page = buf // 4096
            bits = log.read(0, 128)
            assert bits[page // 8] & (1 << (page % 8)), f"page {page:#x} not marked dirty"
            info["dirty_pages"] = sum(bin(b).count("1") for b in bits)
            info["log_signalled"] = log_fd.try_read() is not None
            assert info["log_signalled"], info
            net.set_backend(VhostNet.RX, None)
        finally:
            net.close()
            sniff.close()
            os.close(tap)
            for e in (kick, call, log_fd):
                e.close()
