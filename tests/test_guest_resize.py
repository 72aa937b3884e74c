"""A QEMU guest sees ``serve blk``'s disk grow without a reboot (issue 10).

The guest boots on ``python -m vhost serve blk`` and reads its disk's size; the host grows
the image file and sends ``serve blk`` SIGHUP; ``serve blk`` re-reads the size and sends
``CONFIG_CHANGE_MSG`` on the back-end channel; QEMU re-reads the config space and
interrupts the guest's virtio-blk driver, which updates ``/sys/block/vda/size``. The guest
then reads what the host put in the new sectors and writes its own there. Before this
issue the daemon offered no back-end channel, so the guest kept the old size (and the
SIGHUP killed ``serve blk``).
"""

from __future__ import annotations

import signal
from pathlib import Path

import pytest

import guest
from daemon_util import wait_for
from peers import make_image
from test_guest_daemon import blk_args, image_at, read_back, serve, write_pattern

pytestmark = pytest.mark.timeout(300)

OLD_BYTES = 32 << 20
NEW_BYTES = 64 << 20
HOST_PATTERN = "PYVHOST-HOST-WROTE-PAST-THE-OLD-END"
GUEST_PATTERN = "PYVHOST-GUEST-WROTE-PAST-THE-OLD-END"
# Sectors past the old end of the disk, inside the new one.
HOST_SECTOR = OLD_BYTES // 512 + 100
GUEST_SECTOR = NEW_BYTES // 512 - 8

SCRIPT = f"""\
old=$(cat /sys/block/vda/size)
echo SIZE-BEFORE=$old
echo PAST-END-BYTES=$(dd if=/dev/vda bs=512 skip={HOST_SECTOR} count=1 2>/dev/null | wc -c)
echo WAITING-FOR-RESIZE
i=0; while [ ! -e go ] && [ $i -lt 1200 ]; do sleep 0.1; i=$((i+1)); done
i=0
while [ "$(cat /sys/block/vda/size)" = "$old" ] && [ $i -lt 600 ]; do sleep 0.1; i=$((i+1)); done
echo SIZE-AFTER=$(cat /sys/block/vda/size)
{read_back(HOST_SECTOR, len(HOST_PATTERN))}{write_pattern(GUEST_PATTERN, GUEST_SECTOR)}\
{read_back(GUEST_SECTOR, len(GUEST_PATTERN))}"""


@pytest.mark.parametrize("impl", ["native", "python"])
def test_guest_sees_the_disk_grow_after_sighup(
    impl: str, tmp_path: Path, tmp_sock_dir: Path
) -> None:
    image = make_image(tmp_path / "disk.img", OLD_BYTES)
    sock = tmp_sock_dir / "blk.sock"
    extra = ["--python"] if impl == "python" else []
    with (
        serve(["blk", "--image", str(image), *extra], sock) as served,
        guest.start_guest(SCRIPT, mode="busybox", qemu_args=blk_args(sock), memory_mb=512) as vm,
    ):
        vm.wait_for("WAITING-FOR-RESIZE", timeout=180)
        # The host grows the image (as `truncate -s 64M` would) and fills a new sector.
        with open(image, "r+b") as f:
            f.truncate(NEW_BYTES)
            f.seek(HOST_SECTOR * 512)
            f.write(HOST_PATTERN.encode())
        served.proc.send_signal(signal.SIGHUP)
        (vm.run_dir / "go").touch()
        result = vm.wait(180).check()
        assert wait_for(lambda: served.proc.poll() is None, 1.0)  # SIGHUP did not kill it
        code, err = served.stop()
    out = result.script_output
    assert f"SIZE-BEFORE={OLD_BYTES // 512}" in out, out
    assert "PAST-END-BYTES=0" in out, out  # the end of the disk, before the resize
    assert f"SIZE-AFTER={NEW_BYTES // 512}" in out, out
    assert f"READ-{HOST_SECTOR}={HOST_PATTERN}" in out, out
    assert f"WROTE-{GUEST_SECTOR}" in out, out
    assert f"READ-{GUEST_SECTOR}={GUEST_PATTERN}" in out, out
    assert image_at(image, GUEST_SECTOR, len(GUEST_PATTERN)) == GUEST_PATTERN.encode()
    assert code == 0, err
    assert (
        f"resized {image}: {OLD_BYTES // 512} -> {NEW_BYTES // 512} sectors "
        f"({NEW_BYTES} bytes); the front-end was notified"
    ) in err, err
