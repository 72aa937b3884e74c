"""vhost-net in the guest: our split-ring driver (``Virtqueue`` on our ``GuestMemory``) on
``/dev/vhost-net``, attached to a tap. Frames we put on TX come out of the tap's
interface (captured with a packet socket); frames the interface transmits land in
buffers we posted on RX."""

from __future__ import annotations

import fcntl
import os
import socket
import struct
from dataclasses import dataclass
from pathlib import Path

from vhost import EventFd, GuestMemory, MemoryRegion
from vhost.kern import VHOST_NET_F_VIRTIO_NET_HDR, VhostNet
from vhost.virtio import VirtioFeature, Virtqueue, place_rings, setup_queue

TUNSETIFF = 0x400454CA
IFF_TAP = 0x0002
IFF_NO_PI = 0x1000
SIOCSIFFLAGS = 0x8914
IFF_UP = 0x1
ETH_TYPE = 0x88B5  # IEEE local experimental: nothing else in the guest sends it
HDR_LEN = 12  # struct virtio_net_hdr_mrg_rxbuf (VERSION_1)
QSIZE = 256
BUF = 2048
MEM = 4 << 20
RX_RING, TX_RING = 0x0, 0x10000
RX_BUFS, TX_BUFS = 0x100000, 0x200000


def open_tap(name: str) -> int:
    """A tap without IFF_VNET_HDR (vhost adds/strips the header), interface up."""
    fd = os.open("/dev/net/tun", os.O_RDWR | os.O_CLOEXEC)
    fcntl.ioctl(fd, TUNSETIFF, struct.pack("16sH22x", name.encode(), IFF_TAP | IFF_NO_PI))
    # No IPv6 on it: its neighbour discovery would put frames of its own on the tap.
    ipv6 = Path(f"/proc/sys/net/ipv6/conf/{name}/disable_ipv6")
    if ipv6.exists():
        ipv6.write_text("1")
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        fcntl.ioctl(s, SIOCSIFFLAGS, struct.pack("16sH22x", name.encode(), IFF_UP))
    return fd


def frame(seq: int, size: int = 64) -> bytes:
    dst, src = b"\xff" * 6, bytes([0x02, 0, 0, 0, 0, seq & 0xFF])
    body = struct.pack(">I", seq) + bytes((seq + i) & 0xFF for i in range(size - 18))
    return dst + src + struct.pack(">H", ETH_TYPE) + body


@dataclass
class NetRig:
    """vhost-net on a tap, with both queues set up and filled as a guest driver would."""

    net: VhostNet
    tap: int
    sniff: socket.socket | None
    memory: GuestMemory
    rx: Virtqueue
    tx: Virtqueue
    kicks: tuple[EventFd, EventFd]
    calls: tuple[EventFd, EventFd]

    @classmethod
    def create(
        cls, name: str = "pvtap0", *, sniff_frames: bool = True, event_idx: bool = False
    ) -> NetRig:
        """``sniff_frames``: also open a packet socket that captures our frames on the tap;
        ``event_idx``: negotiate VIRTIO_RING_F_EVENT_IDX (notification suppression)."""
        tap = open_tap(name)
        sniff = None
        if sniff_frames:
            sniff = socket.socket(socket.AF_PACKET, socket.SOCK_RAW, socket.htons(ETH_TYPE))
            sniff.bind((name, ETH_TYPE))
        net = VhostNet()
        net.set_owner()
        offered = net.get_features()
        want = int(VirtioFeature.VERSION_1) | VHOST_NET_F_VIRTIO_NET_HDR
        if event_idx:
            want |= int(VirtioFeature.RING_EVENT_IDX)
        assert offered & want == want, f"vhost-net offers {offered:#x}"
        net.set_features(want)
        memory = GuestMemory.allocate([(0, MEM)])
        net.set_mem_table(
            [
                MemoryRegion(r.guest_phys_addr, r.memory_size, r.userspace_addr)
                for r in memory.regions()
            ]
        )
        rx = Virtqueue(memory, QSIZE, *place_rings(RX_RING, QSIZE), event_idx=event_idx)
        tx = Virtqueue(memory, QSIZE, *place_rings(TX_RING, QSIZE), event_idx=event_idx)
        kicks, calls = (EventFd(), EventFd()), (EventFd(), EventFd())
        for index, q in ((VhostNet.RX, rx), (VhostNet.TX, tx)):
            setup_queue(net, index, memory, q, kicks[index], calls[index])
            net.set_backend(index, tap)
        return cls(net, tap, sniff, memory, rx, tx, kicks, calls)

    @property
    def capture(self) -> socket.socket:
        """The packet socket on the tap (only with ``sniff_frames``)."""
        assert self.sniff is not None, "created with sniff_frames=False"
        return self.sniff

    def post_rx(self, count: int) -> dict[int, int]:
        """Posts ``count`` writable buffers on RX; returns head -> buffer address."""
        heads = {}
        for i in range(count):
            gpa = RX_BUFS + i * BUF
            heads[self.rx.add([], [(gpa, BUF)])] = gpa
        self.rx.publish()
        self.kicks[VhostNet.RX].write(1)
        return heads

    def send(self, frames: list[bytes]) -> None:
        """Puts frames (with a zero virtio-net header) on TX and kicks once."""
        for i, f in enumerate(frames):
            gpa = TX_BUFS + (i % QSIZE) * BUF
            self.memory.write(gpa, bytes(HDR_LEN) + f)
            self.tx.add([(gpa, HDR_LEN + len(f))], [])
        self.tx.publish()
        if self.tx.kick_needed():
            self.kicks[VhostNet.TX].write(1)

    def reap(
        self, queue: Virtqueue, call: EventFd, want: int, timeout: float = 10.0
    ) -> list[tuple[int, int]]:
        done: list[tuple[int, int]] = []
        while len(done) < want:
            got = queue.poll_used()
            if got:
                done += got
                continue
            if not call.wait(timeout):
                raise TimeoutError(f"{len(done)} of {want} buffers used after {timeout}s")
            call.read()
        return done

    def close(self) -> None:
        for index in (VhostNet.RX, VhostNet.TX):
            self.net.set_backend(index, None)
        self.net.close()
        if self.sniff is not None:
            self.sniff.close()
        os.close(self.tap)
        for e in (*self.kicks, *self.calls):
            e.close()
