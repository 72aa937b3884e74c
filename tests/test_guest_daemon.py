"""Issue 4 with a real Linux guest: QEMU drives ``python -m vhost serve ...``.

The guests come from the public rig, :mod:`vhost.testing` (the ``vhost_guest`` fixture,
or ``tests/guest.py`` over it for the script-style tests).

The guest's own virtio drivers are the front-end's users: ``virtio_blk`` reads and
writes ``/dev/vda`` through our daemon, ``virtio_rng`` fills ``/dev/hwrng`` from our
Python example device. Lifetime: QEMU reconnects to a restarted daemon, and the daemon
serves a second QEMU after the first is killed.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path

import pytest

import guest
from peers import make_image
from vhost.testing import Device
from vhost.testing.pytest_plugin import GuestFactory

CHECKOUT = Path(__file__).resolve().parent.parent
PATTERN_A = "PYVHOST-GUEST-PATTERN-A-0123456789"
PATTERN_B = "PYVHOST-GUEST-PATTERN-B-9876543210"
IMAGE_BYTES = 32 << 20
# Sector offsets the guest writes at (both inside the image, not at its start).
SECTOR_A = 2048
SECTOR_B = 40000


class Served:
    """A ``python -m vhost serve`` subprocess."""

    def __init__(self, proc: subprocess.Popen[str], socket: Path) -> None:
        self.proc = proc
        self.socket = socket

    def stop(self, sig: signal.Signals = signal.SIGTERM) -> tuple[int, str]:
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
        try:
            _, err = self.proc.communicate(timeout=15)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            _, err = self.proc.communicate()
        return self.proc.returncode, err


@contextmanager
def serve(args: Sequence[str], socket: Path) -> Iterator[Served]:
    """Runs ``python -m vhost serve ARGS --socket SOCKET`` until it says it is serving."""
    proc = subprocess.Popen(
        [sys.executable, "-m", "vhost", "serve", *args, "--socket", str(socket)],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        cwd=CHECKOUT,
    )
    served = Served(proc, socket)
    try:
        assert proc.stdout is not None
        line = proc.stdout.readline()
        if "serving" not in line:
            code, err = served.stop()
            pytest.fail(f"serve did not start (exit {code}): {line!r}\n{err}")
        yield served
    finally:
        served.stop()


def blk_args(socket: Path, *, reconnect: bool = False, queues: int = 1) -> list[str]:
    # The same arguments README.md shows (tests/test_readme.py checks that it does).
    return guest.vhost_user_blk_args(socket, queues=queues, reconnect=reconnect)


def write_pattern(pattern: str, sector: int) -> str:
    """Guest shell: write ``pattern`` at ``sector`` of /dev/vda, bypassing nothing."""
    return (
        f"printf '%s' '{pattern}' > /tmp/pat\n"
        f"dd if=/tmp/pat of=/dev/vda bs=512 seek={sector} conv=sync,fsync 2>/dev/null"
        f" && echo WROTE-{sector}\n"
    )


def read_back(sector: int, length: int) -> str:
    """Guest shell: drop the page cache, read ``length`` bytes at ``sector`` of /dev/vda."""
    return (
        "sync; echo 3 > /proc/sys/vm/drop_caches\n"
        f"echo READ-{sector}=$(dd if=/dev/vda bs=512 skip={sector} count=1 2>/dev/null"
        f" | head -c {length})\n"
    )


def image_at(image: Path, sector: int, length: int) -> bytes:
    with open(image, "rb") as f:
        f.seek(sector * 512)
        return f.read(length)


@pytest.fixture
def image(tmp_path: Path) -> Path:
    return make_image(tmp_path / "disk.img", IMAGE_BYTES)


@pytest.mark.parametrize("impl", ["native", "python"])
def test_guest_writes_and_reads_through_serve_blk(
    impl: str, image: Path, tmp_sock_dir: Path
) -> None:
    sock = tmp_sock_dir / "blk.sock"
    queues = 2 if impl == "native" else 1
    # QEMU seals its memfd guest RAM, so the native case also runs the J8 policy.
    extra = ["--python"] if impl == "python" else ["--require-sealed-memory"]
    script = (
        "cat /sys/block/vda/size /sys/block/vda/ro\n"
        "ls /sys/block/vda/mq | wc -l | sed 's/^/MQ=/'\n"
        + write_pattern(PATTERN_A, SECTOR_A)
        + read_back(SECTOR_A, len(PATTERN_A))
        # A bigger transfer than one segment: 1 MiB read through the queue(s).
        + "dd if=/dev/vda of=/dev/null bs=64k count=16 2>/dev/null && echo BIGREAD-OK\n"
    )
    with serve(["blk", "--image", str(image), "--queues", str(queues), *extra], sock) as served:
        result = guest.run_guest(
            script, mode="busybox", qemu_args=blk_args(sock, queues=queues), memory_mb=512
        ).check()
        code, err = served.stop()
    out = result.script_output
    assert f"{IMAGE_BYTES // 512}\n0\n" in out, out
    assert f"MQ={queues}" in out, out
    assert f"WROTE-{SECTOR_A}" in out
    assert f"READ-{SECTOR_A}={PATTERN_A}" in out
    assert "BIGREAD-OK" in out
    assert image_at(image, SECTOR_A, len(PATTERN_A)) == PATTERN_A.encode()
    assert code == 0, err
    assert "stopped after 1 session(s)" in err


def test_guest_cannot_write_a_readonly_image(
    image: Path, tmp_sock_dir: Path, vhost_guest: GuestFactory
) -> None:
    sock = tmp_sock_dir / "ro.sock"
    make_image(image, IMAGE_BYTES, pattern=b"RO-ORIGINAL")
    before = image.read_bytes()
    with (
        serve(["blk", "--image", str(image), "--readonly"], sock),
        vhost_guest(Device("blk", sock)) as vm,
    ):
        assert vm.run("cat /sys/block/vda/ro").stdout == "1\n"
        write = vm.run(write_pattern(PATTERN_A, SECTOR_A), check=False)
        assert write.status != 0 and f"WROTE-{SECTOR_A}" not in write.stdout, write
        # The guest still reads the original data, and the file is unchanged.
        assert vm.run(read_back(SECTOR_A, 11)).stdout == f"READ-{SECTOR_A}=RO-ORIGINAL\n"
    assert image.read_bytes() == before


def test_guest_reads_hwrng_from_the_python_rng_device(
    tmp_sock_dir: Path, vhost_guest: GuestFactory
) -> None:
    sock = tmp_sock_dir / "rng.sock"
    with serve(["rng"], sock) as served:
        with vhost_guest(Device("rng", sock)) as vm:
            current = vm.run("cat /sys/class/misc/hw_random/rng_current").stdout
            data = vm.run("dd if=/dev/hwrng bs=64 count=8 2>/dev/null").stdout_bytes
        code, err = served.stop()
    assert current.startswith("virtio_rng"), current
    assert len(data) == 512
    # Random bytes: not constant, and (with overwhelming probability) many distinct values.
    assert len(set(data)) > 100, data.hex()
    assert code == 0, err
    assert "stopped after 1 session(s)" in err  # the guest's power-off ended the session


def test_qemu_reconnects_after_the_daemon_restarts(image: Path, tmp_sock_dir: Path) -> None:
    sock = tmp_sock_dir / "re.sock"
    script = (
        write_pattern(PATTERN_A, SECTOR_A)
        + "echo PHASE-ONE-DONE\n"
        + "i=0; while [ ! -e go ] && [ $i -lt 600 ]; do sleep 0.1; i=$((i+1)); done\n"
        + write_pattern(PATTERN_B, SECTOR_B)
        + read_back(SECTOR_A, len(PATTERN_A))
        + read_back(SECTOR_B, len(PATTERN_B))
    )
    with serve(["blk", "--image", str(image)], sock) as first:
        g = guest.start_guest(
            script, mode="busybox", qemu_args=blk_args(sock, reconnect=True), memory_mb=512
        )
        with g:
            g.wait_for("PHASE-ONE-DONE", timeout=120)
            # The daemon dies without a goodbye; QEMU sees the socket close.
            first.stop(signal.SIGKILL)
            with serve(["blk", "--image", str(image)], sock) as second:
                # QEMU retries every 200 ms; give it time to redo the whole set-up.
                deadline = time.monotonic() + 30
                while time.monotonic() < deadline and _served_sessions(second) < 1:
                    time.sleep(0.2)
                assert _served_sessions(second) >= 1, "QEMU did not reconnect"
                (g.run_dir / "go").write_text("go")
                result = g.wait(timeout=120).check()
                code, err = second.stop()
    out = result.script_output
    assert f"READ-{SECTOR_A}={PATTERN_A}" in out, out
    assert f"READ-{SECTOR_B}={PATTERN_B}" in out, out
    assert image_at(image, SECTOR_B, len(PATTERN_B)) == PATTERN_B.encode()
    assert code == 0, err
    assert "stopped after 1 session(s)" in err, err


def _served_sessions(served: Served) -> int:
    """Sessions the daemon process has open, judged by its connected sockets' fds."""
    try:
        fds = os.listdir(f"/proc/{served.proc.pid}/fd")
    except OSError:
        return 0
    socks = 0
    for fd in fds:
        try:
            if os.readlink(f"/proc/{served.proc.pid}/fd/{fd}").startswith("socket:"):
                socks += 1
        except OSError:
            pass
    # One listening socket; anything beyond it is a front-end.
    return max(0, socks - 1)


def test_daemon_serves_a_second_qemu_after_the_first_is_killed(
    image: Path, tmp_sock_dir: Path
) -> None:
    sock = tmp_sock_dir / "two.sock"
    first_script = write_pattern(PATTERN_A, SECTOR_A) + "echo FIRST-READY\nsleep 600\n"
    second_script = write_pattern(PATTERN_B, SECTOR_B) + read_back(SECTOR_A, len(PATTERN_A))
    with serve(["blk", "--image", str(image)], sock) as served:
        with guest.start_guest(
            first_script, mode="busybox", qemu_args=blk_args(sock), memory_mb=512
        ) as first:
            first.wait_for("FIRST-READY", timeout=120)
            first.kill(signal.SIGKILL)
        result = guest.run_guest(
            second_script, mode="busybox", qemu_args=blk_args(sock), memory_mb=512
        ).check()
        code, err = served.stop()
    out = result.script_output
    assert f"WROTE-{SECTOR_B}" in out
    assert f"READ-{SECTOR_A}={PATTERN_A}" in out, out
    assert image_at(image, SECTOR_B, len(PATTERN_B)) == PATTERN_B.encode()
    assert code == 0, err
    assert "stopped after 2 session(s)" in err, err
