"""``GuestMemory.regions()`` returns the API's own region type, ``vhost.MemoryRegion`` (a
raw 5-tuple before issue 11), so it goes straight to ``set_mem_table``. Peer: our own
native virtio-blk daemon."""

from __future__ import annotations

from pathlib import Path

from vhost import GuestMemory, MemoryRegion
from vhost.daemon import BlkDevice, Daemon
from vhost.user import Frontend


def test_regions_are_memory_regions_with_their_fd() -> None:
    memory = GuestMemory.allocate([(0, 1 << 16), (1 << 20, 1 << 16)])
    regions = memory.regions()
    assert all(type(r) is MemoryRegion for r in regions)
    assert [(r.guest_phys_addr, r.memory_size) for r in regions] == [
        (0, 1 << 16),
        (1 << 20, 1 << 16),
    ]
    for r in regions:
        assert r.fd >= 0
        assert memory.user_to_gpa(r.userspace_addr) == r.guest_phys_addr


def test_regions_go_straight_to_set_mem_table(tmp_sock_dir: Path) -> None:
    memory = GuestMemory.allocate([(0, 1 << 20)])
    sock = tmp_sock_dir / "blk.sock"
    with Daemon(BlkDevice.ram(1 << 20), sock), Frontend.connect(sock, timeout=5.0) as fe:
        fe.negotiate()
        fe.set_mem_table(memory.regions())
        assert fe.get_features()  # the back-end took the table and still answers
