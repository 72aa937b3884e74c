"""``vhost.testing``, the public guest rig (issue 12): commands and their data, the
devices back-ends attach with (blk on qemu-storage-daemon, fs on virtiofsd, net on DPDK
testpmd, vsock on vhost-device-vsock, each checked by the data the guest's driver moves; rng in
test_testing_docs.py), the pytest plugin's failure report, and the error paths (missing
QEMU, missing kernel, missing build tool), without tracebacks from the CLI.

Each guest test boots the real 6.12 guest (TCG here: 10-20 s each).
"""

from __future__ import annotations

import concurrent.futures
import os
import re
import secrets
import shutil
import socket
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

import peers
from vhost.testing import (
    CommandFailed,
    Device,
    Guest,
    GuestFailed,
    GuestImage,
    GuestSetupError,
    boot,
    choose_accel,
    ensure_image,
    kvm_usable,
)

CHECKOUT = Path(__file__).resolve().parent.parent
BLOCK = 4096
CLI_TIMEOUT = 300


def _cli(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "vhost.testing", *args],
        capture_output=True,
        text=True,
        timeout=CLI_TIMEOUT,
        check=False,
        stdin=subprocess.DEVNULL,
        env=env,
        cwd=CHECKOUT,
    )


# --- commands ------------------------------------------------------------------------


def test_commands_return_exact_output_and_status_and_failures_carry_the_console(
    tmp_path: Path,
) -> None:
    token = secrets.token_hex(8)
    with boot(files={"input.bin": bytes(range(256))}, runs_parent=tmp_path) as guest:
        # Status, and stdout and stderr apart, computed by the guest's shell.
        r = guest.run(f"echo out-$((6 * 7)); echo err-{token} >&2; exit 5", check=False)
        assert (r.status, r.stdout, r.stderr) == (5, "out-42\n", f"err-{token}\n")
        # Bytes come back exactly, binary included, whatever their size.
        r = guest.run("cat input.bin; head -c 200000 /dev/zero")
        assert r.stdout_bytes == bytes(range(256)) + bytes(200000)
        # The commands share the run dir, and the guest's kernel is the image's.
        guest.run(f"uname -r > from-guest; echo {token} >> from-guest")
        assert (guest.run_dir / "from-guest").read_text() == f"{ensure_image().kver}\n{token}\n"
        with pytest.raises(CommandFailed) as failed:
            guest.run(f"echo before-{token}; ls /no/such/file")
        message = str(failed.value)
        assert "exited with status 1: echo before-" in message
        assert f"before-{token}" in message  # its stdout
        assert "/no/such/file" in message  # its stderr
        assert "PYVHOST-GUEST-START mode=busybox agent" in message  # the console's tail
        # A command that outlives its timeout ends the guest's usefulness, loudly.
        with pytest.raises(GuestFailed, match=r"'sleep 30' did not finish within 2s"):
            guest.run("sleep 30", timeout=2)
        with pytest.raises(GuestFailed, match="takes no more commands"):
            guest.run("true")
    assert not guest.alive()
    assert list(tmp_path.iterdir()) == []  # the run dir it made is gone


def test_a_command_that_kills_the_guest_is_reported() -> None:
    with boot() as guest:
        with pytest.raises(GuestFailed, match="the guest stopped while running") as failed:
            guest.run("poweroff -f; sleep 30")
        assert "console tail:" in str(failed.value)


# --- devices -------------------------------------------------------------------------


def test_blk_device_data_goes_both_ways(tmp_sock_dir: Path) -> None:
    image = tmp_sock_dir / "disk.img"
    sock = tmp_sock_dir / "blk.sock"
    peers.make_image(image, 8 << 20, pattern=b"HOSTDATA")
    token = secrets.token_hex(8)
    with (
        peers.qemu_storage_daemon_blk(image, sock) as qsd,
        boot(Device("blk", sock)) as guest,
    ):
        assert guest.run("cat /sys/block/vda/size").stdout == f"{(8 << 20) // 512}\n"
        got = guest.run(f"dd if=/dev/vda bs={BLOCK} skip=3 count=1 iflag=direct 2>/dev/null")
        assert got.stdout_bytes[:8] == b"HOSTDATA"
        assert int.from_bytes(got.stdout_bytes[8:16], "little") == 3
        guest.run(
            f"printf 'guest-{token}' | dd of=/dev/vda bs={BLOCK} seek=5 conv=sync,fsync 2>/dev/null"
        )
        assert qsd.alive(), qsd.output()
    data = image.read_bytes()
    assert data[5 * BLOCK : 5 * BLOCK + 22] == f"guest-{token}".encode()
    assert data[6 * BLOCK : 6 * BLOCK + 8] == b"HOSTDATA"


def test_fs_device_shows_the_hosts_files(tmp_sock_dir: Path, tmp_path: Path) -> None:
    shared = tmp_path / "shared"
    shared.mkdir()
    token = secrets.token_hex(8)
    (shared / "from-host.txt").write_text(f"host-{token}\n")
    sock = tmp_sock_dir / "fs.sock"
    with (
        peers.virtiofsd(shared, sock),
        boot(Device("fs", sock, tag="shared"), memory_mb=512) as guest,
    ):
        guest.run("mkdir -p /mnt/fs && mount -t virtiofs shared /mnt/fs")
        assert guest.run("cat /mnt/fs/from-host.txt").stdout == f"host-{token}\n"
        guest.run(f"echo guest-{token} > /mnt/fs/from-guest.txt && sync")
    assert (shared / "from-guest.txt").read_text() == f"guest-{token}\n"


# Sends one broadcast frame with a token on eth0 and prints the first frame that comes
# back in (testpmd's io forwarding returns every frame on the port it came from).
ECHO_FRAME = """
import socket, sys
ETHERTYPE = 0x88B5  # IEEE local experimental
sock = socket.socket(socket.AF_PACKET, socket.SOCK_RAW, socket.htons(ETHERTYPE))
sock.bind(("eth0", 0))
mac = bytes.fromhex(open("/sys/class/net/eth0/address").read().strip().replace(":", ""))
sock.send(b"\\xff" * 6 + mac + ETHERTYPE.to_bytes(2, "big") + sys.argv[1].encode().ljust(46, b"."))
sock.settimeout(20)
while True:
    frame, addr = sock.recvfrom(2048)
    if addr[2] != socket.PACKET_OUTGOING:  # our own send, seen by the packet socket
        print(addr[2], frame.hex())
        break
"""


def test_net_device_carries_a_frame_through_testpmd(tmp_sock_dir: Path) -> None:
    sock = tmp_sock_dir / "net.sock"
    token = secrets.token_hex(8)
    with (
        peers.dpdk_testpmd_net(sock) as testpmd,
        boot(Device("net", sock), mode="host", files={"echo.py": ECHO_FRAME}) as guest,
    ):
        mac = guest.run("cat /sys/class/net/eth0/address").stdout.strip()
        guest.run("ip link set eth0 up")
        out = guest.run(f"python3 echo.py {token}", timeout=60).stdout.split()
        assert testpmd.alive(), testpmd.output()
    frame = bytes.fromhex(out[1])
    assert int(out[0]) == socket.PACKET_BROADCAST
    assert frame[:6] == b"\xff" * 6 and frame[6:12].hex(":") == mac
    assert frame[14 : 14 + 16] == token.encode()  # the guest's payload came back whole


VHOST_DEVICE_VSOCK = Path.home() / ".cache/pyvhost/vhost-device-vsock/bin/vhost-device-vsock"
GUEST_PORT = 1234  # the guest listens here; the host reaches it with CONNECT 1234
HOST_PORT = 5001  # the guest connects to CID 2 here; the back-end dials <uds-path>_5001

# The guest's side (argv: token, port to listen on, host port): accept the host's
# connection and answer it, then connect to the host and print what the host answered.
# "listening" in the run dir tells the host when to connect.
VSOCK_PEER = """
import socket, sys
def line(sock):
    return sock.makefile("rb").readline().decode().rstrip("\\n")
srv = socket.socket(socket.AF_VSOCK, socket.SOCK_STREAM)
srv.bind((socket.VMADDR_CID_ANY, int(sys.argv[2])))
srv.listen(1)
srv.settimeout(60)
open("listening", "w").close()
conn, (cid, _) = srv.accept()
conn.settimeout(60)
got = line(conn)
conn.sendall(f"guest-read-{got}\\n".encode())
print("accepted", cid, got)
out = socket.socket(socket.AF_VSOCK, socket.SOCK_STREAM)
out.settimeout(60)
out.connect((socket.VMADDR_CID_HOST, int(sys.argv[3])))
out.sendall(f"guest-{sys.argv[1]}\\n".encode())
print("answered", line(out))
"""


def _read_line(sock: socket.socket) -> bytes:
    # A fresh reader per line is safe here: each side waits for the other's line.
    with sock.makefile("rb") as reader:
        return reader.readline()


def _wait_for(path: Path, guest: Guest, timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while not path.exists():
        assert guest.alive(), guest.report()
        assert time.monotonic() < deadline, f"{path} not created: {guest.report()}"
        time.sleep(0.1)


def test_vsock_device_carries_data_both_ways_through_vhost_device_vsock(
    tmp_sock_dir: Path,
) -> None:
    """rust-vmm's vhost-device-vsock bridges the guest's AF_VSOCK to host Unix sockets
    (hybrid vsock): the host connects in with ``CONNECT <port>``, and a guest's connection
    to CID 2 port P arrives on ``<uds-path>_P``. Bytes go both ways on both."""
    binary = peers.find_binary("vhost-device-vsock", [VHOST_DEVICE_VSOCK])
    sock = tmp_sock_dir / "vsock.sock"
    uds = tmp_sock_dir / "vm.vsock"
    host_token, guest_token = secrets.token_hex(8), secrets.token_hex(8)
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    listener.bind(f"{uds}_{HOST_PORT}")
    listener.listen(1)
    listener.settimeout(120)
    vm = f"guest-cid=3,socket={sock},uds-path={uds}"
    with (
        listener,
        peers.spawn_peer("vhost-device-vsock", [str(binary), "--vm", vm], sock) as back_end,
        boot(Device("vsock", sock), mode="host", files={"peer.py": VSOCK_PEER}) as guest,
        concurrent.futures.ThreadPoolExecutor(1) as pool,
    ):
        command = f"python3 peer.py {guest_token} {GUEST_PORT} {HOST_PORT}"
        run = pool.submit(guest.run, command, timeout=90)
        _wait_for(guest.run_dir / "listening", guest)
        # Host to guest: the hybrid vsock handshake, then a line each way.
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as conn:
            conn.settimeout(60)
            conn.connect(str(uds))
            conn.sendall(f"CONNECT {GUEST_PORT}\n".encode())
            assert re.fullmatch(rb"OK \d+\n", _read_line(conn))
            conn.sendall(f"host-{host_token}\n".encode())
            assert _read_line(conn) == f"guest-read-host-{host_token}\n".encode()
        # Guest to host: the back-end dials <uds-path>_<port> for the guest's connection.
        accepted, _ = listener.accept()
        with accepted:
            accepted.settimeout(60)
            got = _read_line(accepted)
            accepted.sendall(b"host-read-" + got)
        out = run.result(timeout=120).stdout
        assert back_end.alive(), back_end.output()
    assert got == f"guest-{guest_token}\n".encode()
    assert out == (
        f"accepted 2 host-{host_token}\nanswered host-read-guest-{guest_token}\n"
    )  # the guest saw the host as CID 2, and the host's answer arrived whole


def test_device_arguments_name_the_socket_and_keep_ids_apart() -> None:
    devices = [
        Device("blk", "/s/b,1", queues=2, reconnect=True),
        Device("rng", "/s/r"),
        Device("net", "/s/n", queues=2),
        Device("fs", "/s/f", tag="t"),
        Device("vsock", "/s/v"),
    ]
    assert [d.qemu_args(i) for i, d in enumerate(devices)] == [
        [
            "-chardev", "socket,id=c0,path=/s/b,,1,reconnect-ms=200",
            "-device", "vhost-user-blk-pci,chardev=c0,num-queues=2",
        ],
        ["-chardev", "socket,id=c1,path=/s/r", "-device", "vhost-user-rng-pci,chardev=c1"],
        [
            "-chardev", "socket,id=c2,path=/s/n",
            "-netdev", "vhost-user,id=n2,chardev=c2,queues=2",
            "-device", "virtio-net-pci,netdev=n2,mq=on,vectors=6",
        ],
        ["-chardev", "socket,id=c3,path=/s/f", "-device", "vhost-user-fs-pci,chardev=c3,tag=t"],
        [
            "-chardev", "socket,id=c4,path=/s/v",
            "-device", "vhost-user-vsock-pci,chardev=c4",
        ],
    ]  # fmt: skip
    with pytest.raises(GuestSetupError, match="unknown device kind 'gpu'"):
        Device("gpu", "/s/g")  # type: ignore[arg-type]
    with pytest.raises(GuestSetupError, match="blk device on /s/b: queues must be >= 1"):
        Device("blk", "/s/b", queues=0)


# --- the pytest plugin ---------------------------------------------------------------


def test_plugin_adds_the_guest_console_to_a_failing_tests_report(tmp_path: Path) -> None:
    (tmp_path / "test_fails.py").write_text(
        textwrap.dedent(
            """
            def test_guest_disagrees(vhost_guest):
                guest = vhost_guest()
                assert guest.run("echo guest-says-$((40 + 2))").stdout == "43\\n"
            """
        )
    )
    out = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "test_fails.py"],
        capture_output=True,
        text=True,
        timeout=CLI_TIMEOUT,
        check=False,
        cwd=tmp_path,
    )
    assert out.returncode == 1, out.stdout + out.stderr
    assert "AssertionError: assert 'guest-says-42\\n' == '43\\n'" in out.stdout, out.stdout
    section = out.stdout[out.stdout.index("vhost guest 0 (call)") :]
    assert "$ echo guest-says-$((40 + 2))\n  -> exit status 0" in section, section
    assert "PYVHOST-GUEST-START mode=busybox agent" in section, section
    assert "1 failed" in out.stdout


# --- errors --------------------------------------------------------------------------


def test_missing_qemu_is_named_with_how_to_install_it(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    ensure_image()
    monkeypatch.setenv("PYVHOST_QEMU", "/nonexistent/qemu-system-x86_64")
    with pytest.raises(GuestSetupError) as err:
        boot(runs_parent=tmp_path)
    assert str(err.value).startswith(
        "QEMU binary $PYVHOST_QEMU=/nonexistent/qemu-system-x86_64 not found or not executable;"
    )
    assert "apt-get install qemu-system-x86" in str(err.value)
    assert list(tmp_path.iterdir()) == []  # nothing made, nothing left
    monkeypatch.delenv("PYVHOST_QEMU")
    monkeypatch.setenv("PATH", str(tmp_path))
    with pytest.raises(GuestSetupError, match=r"^qemu-system-x86_64 not found on \$PATH; install"):
        boot(runs_parent=tmp_path)


def test_cli_reports_a_missing_qemu_or_back_end_without_traceback() -> None:
    out = _cli("run", "--qemu", "/nonexistent/qemu", "--device", "rng:/tmp/x.sock", "--", "true")
    assert out.returncode == 1
    assert out.stderr.startswith("error: QEMU binary qemu=/nonexistent/qemu not found"), out.stderr
    assert out.stderr.count("\n") == 1 and "Traceback" not in out.stderr
    # A back-end that is not listening: QEMU's own words name the socket.
    absent = _cli("run", "--device", "blk:/nonexistent/blk.sock", "--", "true")
    assert absent.returncode == 1
    assert absent.stderr.startswith(
        "error: QEMU exited (status 1) before the console showed the guest ready for commands"
    ), absent.stderr
    assert "Failed to connect to '/nonexistent/blk.sock'" in absent.stderr
    assert "Traceback" not in absent.stderr
    usage = _cli("run", "--device", "gpu:/tmp/x.sock", "--", "true")
    assert usage.returncode == 2
    assert "unknown device kind 'gpu' in 'gpu:/tmp/x.sock'" in usage.stderr
    assert "Traceback" not in usage.stderr


def test_a_guest_that_does_not_come_up_shows_why(tmp_path: Path) -> None:
    # QEMU refuses its command line: its own message is in the error.
    with pytest.raises(GuestFailed, match=r"QEMU exited \(status 1\) before") as err:
        boot(qemu_args=["-device", "no-such-device"], runs_parent=tmp_path)
    assert "'no-such-device' is not a valid device model name" in str(err.value)
    # The guest's /init cannot set up: its reason is in the error.
    with pytest.raises(GuestFailed, match=r"QEMU exited \(status 0\) before") as err:
        boot(kernel_args=["pyvhost.mode=bogus"], runs_parent=tmp_path)
    assert "PYVHOST-GUEST-SETUP-FAILED: unknown pyvhost.mode=bogus" in str(err.value)
    assert list(tmp_path.iterdir()) == []


def test_missing_kernel_is_named(tmp_path: Path) -> None:
    real = ensure_image()
    missing = tmp_path / "vmlinuz"
    with pytest.raises(GuestSetupError, match=f"^guest kernel {missing} not found$"):
        boot(image=GuestImage(missing, real.initrd, real.kver), runs_parent=tmp_path)
    assert list(tmp_path.iterdir()) == []
    with pytest.raises(GuestSetupError, match=f"guest image incomplete in {tmp_path}: missing"):
        GuestImage.load(tmp_path)


def test_image_builder_names_the_missing_tool_and_its_package(tmp_path: Path) -> None:
    # A PATH with only what the builder needs before it checks its tools: apt-cache
    # (Debian's apt) is the first one it does not find.
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    for tool in ("bash", "sha256sum", "cut", "head"):
        found = shutil.which(tool)
        assert found, tool
        (bin_dir / tool).symlink_to(found)
    env = {**os.environ, "PATH": str(bin_dir), "PYVHOST_GUEST_DIR": str(tmp_path / "img")}
    out = _cli("image", env=env)
    assert out.returncode == 1, out.stderr
    assert out.stderr.startswith(f"error: building the guest image in {tmp_path / 'img'} failed")
    assert "apt-cache not found on $PATH: install the Debian package apt" in out.stderr
    assert "Traceback" not in out.stderr


def test_accel_choice() -> None:
    assert choose_accel("tcg") == "tcg"
    assert choose_accel("kvm") == "kvm"  # asked for: used as asked, QEMU says if it cannot
    assert kvm_usable(device="/nonexistent/kvm") is False
    with pytest.raises(GuestSetupError, match="accel must be one of auto, kvm, tcg, not 'hvf'"):
        choose_accel("hvf")  # type: ignore[arg-type]
    assert re.fullmatch(r"kvm|tcg", choose_accel("auto"))
