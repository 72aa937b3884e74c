"""The QEMU guest harness (tests/guest.py) works: both modes, a vhost-user disk, a kill.

Each test boots the real 6.12 guest under TCG (about 5-10 s each).
"""

from __future__ import annotations

import re
import secrets
from pathlib import Path

import pytest

import guest
import peers
from guest import CHECKOUT, VENV_PYTHON, run_guest, start_guest

BLOCK = 4096


def test_busybox_mode_runs_the_script_and_reports_its_status() -> None:
    token = secrets.token_hex(4)
    script = f"""
echo "answer=$((6 * 7))"
echo "kernel=$(uname -r)"
echo "token={token}"
echo "mode=$PYVHOST_GUEST cwd=$(pwd)"
exit 7
"""
    result = run_guest(script, mode="busybox", timeout=120).check(status=7)
    out = result.script_output
    assert "answer=42" in out  # computed by the guest's shell, not echoed literally
    kernel = re.search(r"^kernel=(\S+)$", out, re.M)
    assert kernel and kernel.group(1).startswith("6.12."), out
    assert kernel.group(1) == guest.guest_image().kver
    assert f"token={token}" in out
    assert "mode=busybox cwd=" in out
    assert result.returncode == 0  # the guest powered QEMU off itself


def test_host_mode_runs_the_hosts_python_and_has_kernel_vhost(tmp_path: Path) -> None:
    run_dir = tmp_path / "run"
    code = (
        "import os, vhost, vhost._core as core; "
        "print('vhost-file', vhost.__file__); print('core-file', core.__file__); "
        "open('from-guest.txt', 'w').write(os.uname().release)"
    )
    script = f"""
set -e
for dev in /dev/vhost-net /dev/vhost-vsock /dev/net/tun /dev/vduse/control; do
    test -c "$dev" && echo "chardev $dev"
done
echo "modules: $(cut -d' ' -f1 /proc/modules | sort | tr '\\n' ' ')"
{VENV_PYTHON} -c "{code}"
"""
    result = run_guest(script, mode="host", run_dir=run_dir, timeout=180).check()
    out = result.script_output
    for dev in ("/dev/vhost-net", "/dev/vhost-vsock", "/dev/net/tun", "/dev/vduse/control"):
        assert f"chardev {dev}" in out, out
    for mod in ("vhost_net", "vhost_vsock", "vhost_vdpa", "vduse", "tun", "virtio_blk"):
        assert re.search(rf"modules: .*\b{mod}\b", out), out
    # The guest imported this checkout's package and its built extension.
    assert f"vhost-file {CHECKOUT / 'python' / 'vhost' / '__init__.py'}" in out, out
    core = re.search(r"^core-file (\S+)$", out, re.M)
    assert core and core.group(1).startswith(str(CHECKOUT)), out
    # ... and wrote into the run dir, which is the host's.
    assert (run_dir / "from-guest.txt").read_text().startswith("6.12.")


def test_guest_writes_a_vhost_user_blk_disk_served_by_qemu_storage_daemon(
    tmp_sock_dir: Path,
) -> None:
    image = tmp_sock_dir / "disk.img"
    sock = tmp_sock_dir / "blk.sock"
    size = 8 << 20
    peers.make_image(image, size, pattern=b"HOSTDATA")
    token = secrets.token_hex(8)
    line = f"pyvhost-{token}\n"
    expected = (line * (BLOCK // len(line) + 1)).encode()[:BLOCK]
    script = f"""
set -e
test -b /dev/vda
echo "sectors=$(cat /sys/block/vda/size)"
echo "host-block3=$(dd if=/dev/vda bs={BLOCK} skip=3 count=1 iflag=direct 2>/dev/null | head -c 8)"
echo "host-index3=$(dd if=/dev/vda bs={BLOCK} skip=3 count=1 2>/dev/null | od -A n -t u8 -j 8 -N 8)"
yes "pyvhost-{token}" | head -c {BLOCK} > /tmp/pattern
dd if=/tmp/pattern of=/dev/vda bs={BLOCK} seek=5 count=1 conv=fsync 2>/dev/null
echo 3 > /proc/sys/vm/drop_caches
dd if=/dev/vda bs={BLOCK} skip=5 count=1 iflag=direct 2>/dev/null > /tmp/back
cmp /tmp/pattern /tmp/back
echo readback=ok
"""
    with peers.qemu_storage_daemon_blk(image, sock) as qsd:
        result = run_guest(
            script,
            mode="busybox",
            qemu_args=[
                "-chardev",
                f"socket,id=vub0,path={sock}",
                "-device",
                "vhost-user-blk-pci,chardev=vub0,num-queues=1",
            ],
            timeout=180,
        )
        assert qsd.alive(), qsd.output()
    result.check()
    out = result.script_output
    assert f"sectors={size // 512}" in out, out
    assert "host-block3=HOSTDATA" in out, out  # the guest read what the host wrote
    index = re.search(r"^host-index3=\s*(\d+)$", out, re.M)
    assert index and int(index.group(1)) == 3, out
    assert "readback=ok" in out, out
    data = image.read_bytes()
    assert data[5 * BLOCK : 6 * BLOCK] == expected  # the guest's write reached the image
    assert data[4 * BLOCK : 4 * BLOCK + 8] == b"HOSTDATA"  # and nothing else moved
    assert data[6 * BLOCK : 6 * BLOCK + 8] == b"HOSTDATA"


def test_background_guest_can_be_watched_and_killed_mid_run() -> None:
    script = """
echo "ready-$((40 + 2))"
sleep 600
echo never-reached
"""
    with start_guest(script, mode="busybox") as g:
        g.wait_for("ready-42", timeout=120)
        assert g.alive()
        with g.qmp() as q:
            assert q.query_status() == "running"
        result = g.kill()
    assert not g.alive()
    assert result.status is None
    assert result.started
    assert result.returncode is not None and result.returncode < 0  # killed by a signal
    assert "never-reached" not in result.output
    with pytest.raises(AssertionError, match="no end marker"):
        result.check()


def test_qemu_version_is_reported() -> None:
    assert re.match(r"QEMU emulator version \d+\.\d+", guest.qemu_version())
