"""The sealed-memory policy (ADVERSARIAL J8): with ``require_sealed_memory`` the daemon
refuses guest memory that a front-end could still truncate under it (a SIGBUS no check
can prevent), and accepts memory sealed against shrinking."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from vhost import MemoryRegion
from vhost.daemon import BlkDevice, Daemon
from vhost.devices.blk import BlkDriver
from vhost.errors import RequestRefusedError
from vhost.user import Frontend

SIZE = 1 << 20


def unsealed_region() -> tuple[MemoryRegion, int]:
    fd = os.memfd_create("unsealed-guest-ram", os.MFD_CLOEXEC)
    os.ftruncate(fd, SIZE)
    return MemoryRegion(0, SIZE, 0x7F00_0000_0000, 0, fd), fd


@pytest.mark.parametrize("required", [True, False])
def test_unsealed_memory_is_refused_only_under_the_policy(
    required: bool, tmp_sock_dir: Path
) -> None:
    sock = tmp_sock_dir / "sealed.sock"
    region, fd = unsealed_region()
    try:
        with Daemon(BlkDevice.ram(SIZE), sock, require_sealed_memory=required) as daemon:
            with Frontend.connect(sock) as fe:
                fe.negotiate()
                if required:
                    with pytest.raises(RequestRefusedError):
                        fe.set_mem_table([region])
                    assert "not sealed" in (daemon.last_error or "")
                else:
                    fe.set_mem_table([region])
            # Sealed memory (what GuestMemory.allocate makes) is served either way.
            with BlkDriver.connect(sock) as disk:
                disk.write(4096, b"\x5a" * 4096)
                assert disk.read(4096, 4096) == b"\x5a" * 4096
    finally:
        os.close(fd)


def test_serve_blk_accepts_the_flag(tmp_path: Path, tmp_sock_dir: Path) -> None:
    image = tmp_path / "disk.img"
    image.write_bytes(bytes(SIZE))
    sock = tmp_sock_dir / "cli.sock"
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "vhost",
            "serve",
            "blk",
            "--image",
            str(image),
            "--socket",
            str(sock),
            "--require-sealed-memory",
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        assert proc.stdout is not None
        assert "serving" in proc.stdout.readline()
        region, fd = unsealed_region()
        try:
            with Frontend.connect(sock) as fe:
                fe.negotiate()
                with pytest.raises(RequestRefusedError):
                    fe.set_mem_table([region])
        finally:
            os.close(fd)
        with BlkDriver.connect(sock) as disk:
            disk.write(0, b"\x11" * 512)
        assert image.read_bytes()[:512] == b"\x11" * 512
    finally:
        proc.terminate()
        proc.communicate(timeout=10)
    assert proc.returncode == 0
