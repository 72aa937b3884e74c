"""Images served by ``serve blk``: raw only, whole sectors, and locked the way QEMU locks
them, so that a qemu-storage-daemon and a ``serve blk`` (or two of ours) never both write
one image. Interop is proven against the real qemu-storage-daemon in both orders; the
checks and the locks are the Rust core's, so the native and the Python device share them.
"""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from daemon_util import ServeProc, make_image
from peers import find_binary, qemu_storage_daemon_blk
from vhost.daemon import BlkDevice, ImageFile
from vhost.devices.blkdev import PythonBlkDevice
from vhost.errors import InvalidParamError, VhostOSError

pytestmark = pytest.mark.timeout(120)

MiB = 1 << 20
CMD_TIMEOUT = 30.0


@pytest.fixture
def image(tmp_sock_dir: Path) -> Path:
    path = tmp_sock_dir / "disk.img"
    make_image(path, 4 * MiB)
    return path


def serve(*args: str | Path, timeout: float = CMD_TIMEOUT) -> subprocess.CompletedProcess[str]:
    """``python -m vhost serve blk ARGS`` that is expected to refuse and exit."""
    return subprocess.run(
        [sys.executable, "-m", "vhost", "serve", "blk", *map(str, args)],
        check=False,
        capture_output=True,
        text=True,
        timeout=timeout,
        stdin=subprocess.DEVNULL,
    )


def one_line_error(proc: subprocess.CompletedProcess[str]) -> str:
    """The refusal: exit status 1, one ``error:`` line on stderr, no traceback."""
    assert proc.returncode == 1, (proc.returncode, proc.stdout, proc.stderr)
    assert "Traceback" not in proc.stderr, proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), proc.stderr
    return lines[0]


PY = ["native", "python"]


def device(path: Path, python: bool) -> BlkDevice | PythonBlkDevice:
    return PythonBlkDevice(path) if python else BlkDevice(path)


# -- formats, sizes, missing and unwritable files -----------------------------------------

# qemu-img creates each one: the real signatures, not ones we wrote ourselves.
FORMATS = {
    "qcow2": ("qcow2", []),
    "qed": ("QED", []),
    "vmdk": ("VMDK", []),
    "vdi": ("VDI", []),
    "vhdx": ("VHDX", []),
    "vpc": ("VHD (vpc)", []),
    "parallels": ("Parallels", []),
    "luks": ("LUKS", ["--object", "secret,id=s0,data=pw", "-o", "key-secret=s0"]),
}


def qemu_img_create(path: Path, fmt: str, extra: list[str]) -> None:
    qemu_img = find_binary("qemu-img")
    subprocess.run(
        [str(qemu_img), "create", "-q", "-f", fmt, *extra, str(path), "4M"],
        check=True,
        timeout=CMD_TIMEOUT,
        capture_output=True,
    )


@pytest.mark.parametrize("fmt", list(FORMATS))
def test_non_raw_images_are_refused_naming_the_format(tmp_sock_dir: Path, fmt: str) -> None:
    name, extra = FORMATS[fmt]
    path = tmp_sock_dir / f"disk.{fmt}"
    qemu_img_create(path, fmt, extra)
    for python in (False, True):
        with pytest.raises(InvalidParamError) as exc:
            device(path, python)
        assert f"a {name} image, not a raw disk" in str(exc.value)
        assert str(path) in str(exc.value)
    for args in ([], ["--python"]):
        line = one_line_error(serve("--socket", tmp_sock_dir / "s", "--image", path, *args))
        assert line.startswith(f"error: open image {path}: a {name} image"), line
        assert "qemu-img convert -O raw" in line


@pytest.mark.parametrize(
    ("size", "words"),
    [(0, "the file is empty"), (4 * MiB + 100, "4194404 bytes is not a multiple of")],
    ids=["empty", "partial-sector"],
)
def test_empty_and_partial_sector_images_are_refused(
    tmp_sock_dir: Path, size: int, words: str
) -> None:
    path = tmp_sock_dir / "odd.img"
    path.write_bytes(bytes(size))
    for python in (False, True):
        with pytest.raises(InvalidParamError, match=words):
            device(path, python)
        line = one_line_error(
            serve("--socket", tmp_sock_dir / "s", "--image", path, *(["--python"] * python))
        )
        assert line.startswith(f"error: open image {path}: {words}"), line


@pytest.mark.parametrize("kind", ["directory", "FIFO", "character device"])
def test_files_that_are_not_disks_are_refused(tmp_sock_dir: Path, kind: str) -> None:
    """A FIFO must not hang the open; a directory or /dev/null is no disk either."""
    path = {"directory": tmp_sock_dir / "dir", "FIFO": tmp_sock_dir / "fifo"}.get(
        kind, Path("/dev/null")
    )
    if kind == "directory":
        path.mkdir()
    elif kind == "FIFO":
        os.mkfifo(path)
    for py in ([], ["--python"]):
        line = one_line_error(
            serve("--socket", tmp_sock_dir / "s", "--image", path, "--readonly", *py)
        )
        assert line == (
            f"error: open image {path}: a {kind}, not a regular file or a block device"
        ), line


@pytest.mark.parametrize("impl", PY)
def test_missing_image(tmp_sock_dir: Path, impl: str) -> None:
    path = tmp_sock_dir / "missing.img"
    with pytest.raises(VhostOSError) as exc:
        device(path, impl == "python")
    assert isinstance(exc.value, OSError) and exc.value.filename == str(path)
    assert exc.value.errno == 2
    py = ["--python"] * (impl == "python")
    line = one_line_error(serve("--socket", tmp_sock_dir / "s", "--image", path, *py))
    assert line == f"error: open image {path}: No such file or directory"


@pytest.fixture
def unwritable_image(tmp_sock_dir: Path) -> Iterator[tuple[Path, list[str]]]:
    """An image this test's serve cannot open for writing, and the argv prefix that runs
    serve as a user for whom that is so (root ignores file modes: run as nobody)."""
    os.chmod(tmp_sock_dir, 0o777)
    path = tmp_sock_dir / "ro.img"
    make_image(path, MiB)
    path.chmod(0o444)
    prefix: list[str] = []
    if os.geteuid() == 0:
        setpriv = find_binary("setpriv")
        prefix = [str(setpriv), "--reuid=65534", "--regid=65534", "--clear-groups"]
    yield path, prefix


@pytest.mark.parametrize("impl", PY)
def test_read_only_file_without_readonly_hints_readonly(
    tmp_sock_dir: Path, unwritable_image: tuple[Path, list[str]], impl: str
) -> None:
    path, prefix = unwritable_image
    py = ["--python"] * (impl == "python")
    argv = [*prefix, sys.executable, "-m", "vhost", "serve", "blk", "--image", str(path), *py]
    proc = subprocess.run(
        [*argv, "--socket", str(tmp_sock_dir / "s")],
        check=False, capture_output=True, text=True, timeout=CMD_TIMEOUT,
        stdin=subprocess.DEVNULL,
    )
    line = one_line_error(proc)
    assert line == f"error: open image {path}: Permission denied; use --readonly to serve it"
    # ... and --readonly serves it.
    served = subprocess.Popen(
        [*argv, "--readonly", "--socket", str(tmp_sock_dir / "ro.sock")],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, stdin=subprocess.DEVNULL,
    )
    try:
        assert served.stdout is not None
        assert served.stdout.readline().startswith("serving blk"), served.stderr
    finally:
        served.kill()
        served.communicate(timeout=CMD_TIMEOUT)


# -- locks, against the real qemu-storage-daemon ----------------------------------------


def qsd_refused(image: Path, sock: Path, writable: bool = True) -> str:
    """Runs qemu-storage-daemon on ``image``; returns its error, failing if it started."""
    qsd = find_binary("qemu-storage-daemon")
    proc = subprocess.Popen(
        [
            str(qsd),
            "--blockdev", f"driver=file,node-name=f0,filename={image}",
            "--export", "type=vhost-user-blk,id=e0,node-name=f0,addr.type=unix,"
            f"addr.path={sock},writable={'on' if writable else 'off'}",
        ],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
    )
    try:
        out, _ = proc.communicate(timeout=CMD_TIMEOUT)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert proc.returncode != 0, "qemu-storage-daemon started on an image we hold"
    return out


@pytest.mark.parametrize("impl", PY)
def test_ours_first_then_qemu_storage_daemon_is_refused(
    tmp_sock_dir: Path, image: Path, impl: str
) -> None:
    args = ["blk", "--image", str(image), *(["--python"] * (impl == "python"))]
    ours = ServeProc(args, tmp_sock_dir / "ours.sock", tmp_sock_dir / "ours.log")
    try:
        out = qsd_refused(image, tmp_sock_dir / "q.sock")
        assert 'Failed to get "write" lock' in out, out
    finally:
        ours.close()
    # Our locks die with us: qemu-storage-daemon now starts.
    with qemu_storage_daemon_blk(image, tmp_sock_dir / "q.sock"):
        pass


@pytest.mark.parametrize("impl", PY)
def test_qemu_storage_daemon_first_then_ours_is_refused(
    tmp_sock_dir: Path, image: Path, impl: str
) -> None:
    py = ["--python"] * (impl == "python")
    with qemu_storage_daemon_blk(image, tmp_sock_dir / "q.sock") as qsd:
        line = one_line_error(serve("--socket", tmp_sock_dir / "s", "--image", image, *py))
        assert line.startswith(
            f"error: lock image {image}: in use by qemu-storage-daemon (pid {qsd.pid}), "
            "which holds the write permission"
        ), line
        assert "--force-share" in line and "--no-lock" in line
        with pytest.raises(VhostOSError) as exc:
            device(image, impl == "python")
        assert exc.value.errno == 16 and exc.value.filename == str(image)
        assert exc.value.strerror == (
            f"in use by qemu-storage-daemon (pid {qsd.pid}), which holds the write permission"
        )
        # Read-only use does not share write either, as in QEMU.
        one_line_error(serve("--socket", tmp_sock_dir / "s", "--image", image, "--readonly", *py))
        # force-share reads anyway, no-lock ignores locks: both start.
        for extra in (["--readonly", "--force-share"], ["--no-lock"]):
            ServeProc(
                ["blk", "--image", str(image), *extra, *py],
                tmp_sock_dir / "fs.sock",
                tmp_sock_dir / "fs.log",
            ).close()


def test_two_of_ours_writable_refused_readers_share(tmp_sock_dir: Path, image: Path) -> None:
    first = ServeProc(["blk", "--image", str(image)], tmp_sock_dir / "a.sock", tmp_sock_dir / "a")
    try:
        line = one_line_error(serve("--socket", tmp_sock_dir / "b.sock", "--image", image))
        assert f"lock image {image}: in use by pyvhost (pid {first.pid})" in line, line
        # From this (older, lower-pid) process too: our own new file is never the holder.
        with pytest.raises(VhostOSError, match=rf"in use by pyvhost \(pid {first.pid}\)"):
            BlkDevice(image)
    finally:
        first.close()
    # Readers coexist with readers (ours and qemu-storage-daemon's), and keep writers out.
    readers = [
        ServeProc(
            ["blk", "--image", str(image), "--readonly", *py],
            tmp_sock_dir / f"r{i}.sock",
            tmp_sock_dir / f"r{i}.log",
        )
        for i, py in enumerate([[], ["--python"]])
    ]
    try:
        with qemu_storage_daemon_blk(image, tmp_sock_dir / "q.sock", writable=False):
            out = qsd_refused(image, tmp_sock_dir / "q2.sock", writable=True)
            assert 'Failed to get "write" lock' in out, out
            with pytest.raises(VhostOSError, match="does not share the write permission"):
                BlkDevice(image)
    finally:
        for r in readers:
            r.close()


def test_image_file_api(tmp_sock_dir: Path, image: Path) -> None:
    """ImageFile (what the Python device uses): size, fd, locks until close, errors."""
    with ImageFile(image) as held:
        assert held.size == 4 * MiB and not held.readonly
        assert os.pread(held.fileno(), 512, 0) == bytes(512)
        with pytest.raises(VhostOSError) as exc:
            ImageFile(image, readonly=True)
        assert exc.value.errno == 16 and exc.value.filename == str(image)
        with ImageFile(image, readonly=True, force_share=True):
            pass
        ImageFile(image, lock=False).close()
    assert held.closed
    ImageFile(image).close()  # released on close
    with pytest.raises(InvalidParamError, match="force-share needs a read-only image"):
        ImageFile(image, force_share=True)


def test_qemu_img_sees_our_lock(tmp_sock_dir: Path, image: Path) -> None:
    """qemu-img (QEMU's own locking code) cannot write an image we serve, even read-only,
    and still reads it, as it would a running VM's image."""
    qemu_img = str(find_binary("qemu-img"))
    for extra in ([], ["--readonly"]):
        ours = ServeProc(
            ["blk", "--image", str(image), *extra], tmp_sock_dir / "s", tmp_sock_dir / "l"
        )
        try:
            write = subprocess.run(
                [qemu_img, "bench", "-w", "-c", "1", "-f", "raw", str(image)],
                check=False, capture_output=True, text=True, timeout=CMD_TIMEOUT,
            )
            assert write.returncode != 0, write.stdout
            assert 'Failed to get "write" lock' in write.stderr, write.stderr
            read = subprocess.run(
                [qemu_img, "bench", "-U", "-c", "1", "-f", "raw", str(image)],
                check=False, capture_output=True, text=True, timeout=CMD_TIMEOUT,
            )
            assert read.returncode == 0, read.stderr
        finally:
            ours.close()
