"""VDUSE against a real kernel: in the test guest, ``python -m vhost serve blk --vduse``
makes our daemon a VDUSE device; ``vdpa dev add`` binds it to the guest kernel's own
virtio-blk driver (``virtio_vdpa``: a ``/dev/vdX``) or to ``vhost_vdpa``, where
``vhost.vdpa.VhostVdpa`` drives it, so both ends are ours
(tests/guest_kern/checks_vduse.py). The host has no VDUSE: the last test checks the
error a user gets there."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from guest_kern.boot import kern_guest
from vhost.daemon import BlkDevice, Daemon
from vhost.errors import InvalidParamError, NotSupportedError

SECTORS = (8 << 20) // 512


def test_vduse_kernel_accepts_blk_and_net_and_names_the_errno_for_the_rest() -> None:
    accepted = kern_guest().check("vduse_device_types")["accepted"]
    assert accepted["blk"] == "ok"
    assert accepted["net"] == "ok"
    # Linux 6.12 allows virtio-blk and virtio-net only (drivers/vdpa/vdpa_user).
    assert {k for k, v in accepted.items() if v != "ok"} == {
        "console", "rng", "scsi", "9p", "gpu", "input", "vsock", "fs"
    }  # fmt: skip
    assert set(accepted.values()) == {"ok", "EINVAL"}
    # The report is in the docs, with every refused type named.
    docs = " ".join((Path(__file__).parents[1] / "docs" / "kernel.md").read_text().split())
    assert "VDUSE creates virtio-net (1) and virtio-blk (2) devices only" in docs
    assert "(checked for console, rng, scsi, 9p, gpu, input, vsock and fs)" in docs


def test_vduse_native_blk_is_a_dev_vd_of_the_guest_kernel() -> None:
    run = kern_guest()
    run.check("vduse_setup")
    info = run.check("vduse_virtio_blk")
    assert info["node"].startswith("/dev/vd")
    assert info["sectors"] == SECTORS
    assert info["read_back"] is True
    assert info["image_holds_data"] is True
    # SIGHUP after growing the image: VDUSE_DEV_SET_CONFIG + config interrupt, and the
    # kernel's /dev/vdX grew by 4 MiB.
    assert info["sectors_after_resize"] == SECTORS + (4 << 20) // 512
    assert info["stop_status"] == 0
    assert info["removed"] is True  # stopping the daemon destroyed /dev/vduse/NAME


def test_vduse_offers_split_rings_by_default_and_packed_when_asked() -> None:
    run = kern_guest()
    assert run.check("vduse_virtio_blk")["packed"] is False
    # serve blk --vduse --packed: the guest kernel's virtio-blk negotiated
    # VIRTIO_F_RING_PACKED (bit 34 of /sys/bus/virtio/devices/*/features), and the same
    # write, cache drop, read-back and image checks pass on the packed ring.
    info = run.check("vduse_virtio_blk_packed")
    assert info["packed"] is True
    assert info["sectors"] == SECTORS
    assert info["read_back"] is True
    assert info["image_holds_data"] is True
    # Killed while bound: a packed ring's position cannot be read back from the ring, so
    # the restart is refused (exit 1, one line saying why and what to do).
    status, says = info["takeover"]
    assert status == 1
    assert "packed rings" in says[0] and "vdpa dev del pyvhost-pk" in says[0]
    assert info["stop_status"] == 0
    assert info["removed"] is True


def test_vduse_python_blk_is_a_dev_vd_of_the_guest_kernel() -> None:
    info = kern_guest().check("vduse_virtio_blk_python")
    assert info["sectors"] == SECTORS
    assert info["read_back"] is True
    assert info["image_holds_data"] is True
    assert info["removed"] is True


def test_vduse_bound_to_vhost_vdpa_is_driven_by_our_vdpa_driver() -> None:
    info = kern_guest().check("vduse_vhost_vdpa")
    assert info["device_id"] == 2
    assert info["capacity"] == SECTORS
    assert info["io"] == "ok"
    # A VMM's read-only mapping (dma_map readonly: VDUSE_ACCESS_RO) is read-only for the
    # device: a read request into it fails with IOERR (1), nothing is written, the queue
    # goes on.
    assert info["read_only"] == {"status": 1, "unchanged": True}
    assert info["vring_base"] == 6  # GET_VRING_BASE answered by our GET_VQ_STATE handler
    assert info["after_reset"] is True  # status 0 stopped the rings, a new driver restarted
    assert info["stop_status"] == 0


def test_vduse_sigkill_then_restart_recovers() -> None:
    info = kern_guest().check("vduse_sigkill_restart")
    assert info["left_behind"] is True
    assert info["io_after_restart"] is True  # the stale device was replaced
    # Killed again while /dev/vdX was bound: the restart took the device over, the same
    # /dev/vdX went on working, and stopping after vdpa dev del removed it.
    assert info["io_after_reclaim"] is True
    # Stopped while still bound: exit status 2 and what to do; the next start took over.
    assert info["stop_while_bound"] == 2
    assert "vdpa dev del" in info["stop_while_bound_says"][0]
    # Taking over as another device is refused in one line naming the field and the fix.
    status, says = info["takeover_other_size"]
    assert status == 1
    assert says == (
        'error: VDUSE device "pyvhost-re": left in use by a daemon that died, and cannot be '
        "taken over: its capacity is 16384 sectors, this start's 18432 (another image "
        "size); vdpa dev del pyvhost-re removes it"
    )
    assert info["stop_after_reclaim"] == 0
    assert info["removed"] is True


def test_vduse_bad_input_is_named_and_leaks_nothing() -> None:
    run = kern_guest()
    info = run.check("vduse_bad_input")
    assert info["long_name"][0] == 1
    assert "takes at most 255" in info["long_name"][1]
    assert info["slash"][0] == 1
    assert info["client"][0] == 1
    # serve rng --vduse: a device type VDUSE does not create, refused saying which it does.
    status, says = info["rng"]
    assert status == 1
    assert says == (
        'error: VDUSE device "pyvhost-rng": the kernel refused a virtio device of type 4 '
        "(VDUSE_CREATE_DEV: Invalid argument (os error 22)); VDUSE creates virtio-net (1) and "
        "virtio-blk (2) devices only (Linux 6.12; later kernels add virtio-fs, 26)"
    )
    assert info["in_use"][0] == 1
    assert "is in use" in info["in_use"][1]
    life = run.check("vduse_lifecycle")
    before, after = life["fds"].split("->")
    assert before == after
    before, after = life["maps"].split("->")
    assert before == after


def test_serve_blk_vduse_without_vduse_says_modprobe(tmp_path: Path) -> None:
    image = tmp_path / "disk.img"
    image.write_bytes(bytes(1 << 20))
    done = subprocess.run(
        [sys.executable, "-m", "vhost", "serve", "blk", "--vduse", "d0", "--image", str(image)],
        check=False,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == 1
    assert "Traceback" not in done.stderr
    assert done.stderr.strip() == (
        "error: VDUSE not available: /dev/vduse/control is missing (modprobe vduse)"
    )


def test_serve_packed_is_for_vduse(tmp_path: Path) -> None:
    image = tmp_path / "disk.img"
    image.write_bytes(bytes(1 << 20))
    done = subprocess.run(
        [sys.executable, "-m", "vhost", "serve", "blk", "--socket", str(tmp_path / "s"),
         "--image", str(image), "--packed"],
        check=False, capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert done.returncode == 1
    assert done.stderr.strip() == (
        "error: --packed is for --vduse (a vhost-user socket always offers packed rings)"
    )


def test_vduse_bench_against_qemu_storage_daemon_reports_ratios() -> None:
    """4 KiB randread QD1/QD32 on /dev/vdX: ours and qemu-storage-daemon's vduse-blk in
    the same run. Reported, not asserted on (TCG; no timed assertions)."""
    info = kern_guest().check("vduse_bench")
    for depth in (1, 32):
        assert info[f"ours_qd{depth}_iops"] > 0
        assert info[f"qsd_qd{depth}_iops"] > 0
        assert info[f"ratio_qd{depth}"] > 0


def test_daemon_transport_argument_is_checked(tmp_path: Path) -> None:
    image = tmp_path / "disk.img"
    image.write_bytes(bytes(1 << 20))
    with pytest.raises(InvalidParamError, match="transport must be"):
        Daemon(BlkDevice(str(image)), "d0", transport="vhost")  # type: ignore[arg-type]
    with pytest.raises(InvalidParamError, match="client=True is for vhost-user"):
        Daemon(BlkDevice(str(image)), "d0", transport="vduse", client=True)
    with pytest.raises(InvalidParamError, match="packed=True is for VDUSE"):
        Daemon(BlkDevice(str(image)), "d0", packed=True)
    daemon = Daemon(BlkDevice(str(image)), "d0", transport="vduse", packed=True)
    with pytest.raises(NotSupportedError, match="modprobe vduse"):
        daemon.start()
    assert not daemon.running
