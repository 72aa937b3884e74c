"""The VDUSE checks: this package's daemon serving its devices as VDUSE devices of the
guest kernel (``serve blk --vduse NAME``), then ``vdpa dev add`` and either the kernel's
own virtio-blk driver (``virtio_vdpa``: a ``/dev/vdX``) or our ``VhostVdpa`` driver
(``vhost_vdpa``) doing I/O through it, checked against the image; stop, SIGKILL and
restart; which device types the kernel accepts; bad input."""

from __future__ import annotations

import errno
import gc
import mmap
import os
import random
import signal
import struct
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import ClassVar

from vhost import KernelError
from vhost.daemon import Batch, BlkDevice, Daemon, Device

from .report import check, fd_count, maps_count
from .vdpa_blk import HDRS, MEM, SECTOR, SLOT_DATA, STATUS, T_IN, VdpaBlk, make_image

IMAGE = Path("/tmp/vduse-blk.img")
IMAGE_SIZE = 8 << 20
CHECKOUT = Path(__file__).resolve().parents[2]
VDPA_BUS = Path("/sys/bus/vdpa")


def _virtio_vdpa_module() -> Path:
    """The module tests/guest_kern/vduse_host.py extracted on the host before the boot."""
    return CHECKOUT / "target" / "guest-runs" / f"virtio_vdpa-{os.uname().release}.ko"


def _wait(what: str, ready: object, timeout: float = 20.0) -> None:
    deadline = time.monotonic() + timeout
    while not (ready() if callable(ready) else ready):
        if time.monotonic() > deadline:
            raise TimeoutError(f"{what}: not within {timeout} s")
        time.sleep(0.05)


class Serve:
    """``python -m vhost serve blk --vduse NAME --image IMAGE``, ready once it printed
    that it serves."""

    def __init__(self, name: str, *extra: str, image: Path = IMAGE) -> None:
        self.name = name
        self.log = Path(f"/tmp/serve-{name}-{time.monotonic_ns()}.log")
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "vhost", "serve", "blk", "--vduse", name,
             "--image", str(image), *extra],
            stdout=self.log.open("wb"),
            stderr=subprocess.STDOUT,
            cwd=CHECKOUT,
        )  # fmt: skip
        try:
            _wait(
                f"serve blk --vduse {name}",
                lambda: b"serving" in self.log.read_bytes() or self.proc.poll() is not None,
                60,
            )
            if self.proc.poll() is not None:
                raise RuntimeError(f"serve blk exited {self.proc.returncode}: {self.output()}")
        except BaseException:
            self.kill()
            raise

    def output(self) -> str:
        return self.log.read_text(errors="replace").strip()

    def stop(self) -> int:
        """SIGTERM, then its exit status."""
        self.proc.send_signal(signal.SIGTERM)
        return self.proc.wait(30)

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(30)


def _vdpa(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        ["vdpa", "dev", *args], check=False, capture_output=True, text=True, timeout=30
    )


def _serve_once(*args: str) -> subprocess.CompletedProcess[str]:
    """``python -m vhost serve blk ARGS`` expected to fail: its exit status and stderr."""
    return subprocess.run(
        [sys.executable, "-m", "vhost", "serve", "blk", *args],
        check=False,
        capture_output=True,
        text=True,
        timeout=60,
        cwd=CHECKOUT,
    )


def _add(name: str) -> None:
    done = _vdpa("add", "name", name, "mgmtdev", "vduse")
    if done.returncode:
        raise RuntimeError(f"vdpa dev add {name}: {done.stderr.strip()}")


def _del(name: str) -> None:
    _vdpa("del", name)


def _bind(name: str, driver: str) -> None:
    """Binds vDPA device ``name`` to ``driver`` (virtio_vdpa or vhost_vdpa), whichever
    took it at ``vdpa dev add``."""
    dev = VDPA_BUS / "devices" / name
    link = dev / "driver"
    if link.exists():
        current = link.resolve().name
        if current == driver:
            return
        (VDPA_BUS / "drivers" / current / "unbind").write_text(name)
    (VDPA_BUS / "drivers" / driver / "bind").write_text(name)


def _node(name: str, pattern: str) -> str:
    """The ``/dev`` node of the first sysfs child of vDPA device ``name`` matching
    ``pattern``, once it exists."""
    found: list[Path] = []

    def appeared() -> bool:
        found[:] = sorted((VDPA_BUS / "devices" / name).glob(pattern))
        return bool(found) and Path(f"/dev/{found[0].name}").exists()

    _wait(f"{pattern} of {name}", appeared)
    return f"/dev/{found[0].name}"


def _vd_node(name: str) -> str:
    """The ``/dev/vdX`` the kernel's virtio-blk made of vDPA device ``name``."""
    return _node(name, "virtio*/block/vd*")


def _vhost_node(name: str) -> str:
    """The ``/dev/vhost-vdpa-N`` vhost_vdpa made of vDPA device ``name``."""
    return _node(name, "vhost-vdpa-*")


def _aligned(data: bytes) -> mmap.mmap:
    buf = mmap.mmap(-1, len(data))
    buf[:] = data
    return buf


def _direct_io(node: str, offset: int, data: bytes) -> bytes:
    """Writes ``data`` at ``offset`` with O_DIRECT, drops the page cache, reads it back
    with O_DIRECT and buffered; returns what the buffered read saw (both must match)."""
    fd = os.open(node, os.O_RDWR | os.O_DIRECT)
    try:
        assert os.pwritev(fd, [_aligned(data)], offset) == len(data)
        os.fsync(fd)
        Path("/proc/sys/vm/drop_caches").write_text("3")
        back = mmap.mmap(-1, len(data))
        assert os.preadv(fd, [back], offset) == len(data)
        assert bytes(back) == data, "O_DIRECT read-back differs"
    finally:
        os.close(fd)
    with open(node, "rb") as f:
        f.seek(offset)
        return f.read(len(data))


def all_checks() -> None:
    with check("vduse_setup") as info:
        module = _virtio_vdpa_module()
        info["module"] = str(module)
        if not (VDPA_BUS / "drivers" / "virtio_vdpa").exists():
            subprocess.run(["insmod", str(module)], check=True, capture_output=True, timeout=60)
        assert (VDPA_BUS / "drivers" / "virtio_vdpa").exists()
        assert Path("/dev/vduse/control").exists()
    device_types()
    original = make_image(IMAGE, IMAGE_SIZE)
    blk_virtio("vduse_virtio_blk", original, python=False)
    blk_virtio("vduse_virtio_blk_python", original, python=True)
    blk_virtio("vduse_virtio_blk_packed", original, python=False, packed=True)
    blk_vhost_vdpa()
    stop_and_restart()
    bad_input()
    no_leak_in_process()
    bench_against_qemu_storage_daemon()


class _Typed(Device):
    """A device of any virtio type, to see which the kernel lets VDUSE create."""

    device_type: ClassVar[int] = 0

    def process(self, queue: int, batch: Batch) -> None:
        return None


def device_types() -> None:
    """Creates a VDUSE device of each virtio type in turn: "ok" or the kernel's errno."""
    with check("vduse_device_types") as info:
        types = {"net": 1, "blk": 2, "console": 3, "rng": 4, "scsi": 8, "9p": 9,
                 "gpu": 16, "input": 18, "vsock": 19, "fs": 26}  # fmt: skip
        got = {}
        for kind, number in types.items():
            device = type(f"_Typed{number}", (_Typed,), {"device_type": number})()
            daemon = Daemon(device, f"pyvhost-type{number}", transport="vduse")
            try:
                daemon.start()
            except KernelError as e:
                got[kind] = errno.errorcode.get(e.errno or 0, str(e.errno))
                continue
            got[kind] = "ok"
            daemon.stop()
        info["accepted"] = got
        assert got["blk"] == "ok", got


def _virtio_features(name: str) -> str:
    """The feature bits the guest's virtio driver negotiated with vDPA device ``name``
    (``/sys/bus/virtio/devices/virtioN/features``: one character per bit, bit 0 first)."""
    found = sorted((VDPA_BUS / "devices" / name).glob("virtio*/features"))
    assert found, f"no virtio device of {name}"
    return found[0].read_text().strip()


def blk_virtio(name: str, original: bytes, *, python: bool, packed: bool = False) -> None:
    """serve blk --vduse, vdpa dev add, bound to virtio_vdpa: the kernel's /dev/vdX has the
    image's capacity, writes read back after a cache drop, and the image holds them. With
    ``packed``, the daemon offers packed rings and the kernel's virtio-blk takes them;
    killed while bound, the daemon cannot be taken over (refused, saying why)."""
    make_image(IMAGE, IMAGE_SIZE)
    dev = "pyvhost-py" if python else "pyvhost-pk" if packed else "pyvhost-blk"
    serve: Serve | None = None
    with check(name) as info:
        # The native one with two queues: blk-mq spreads requests over both.
        extra = ["--python"] if python else ["--packed"] if packed else ["--queues", "2"]
        serve = Serve(dev, *extra)
        _add(dev)
        _bind(dev, "virtio_vdpa")
        node = _vd_node(dev)
        info["node"] = node
        # VIRTIO_F_RING_PACKED is bit 34.
        info["packed"] = _virtio_features(dev)[34] == "1"
        assert info["packed"] == packed, info
        sectors = int(Path(f"/sys/block/{Path(node).name}/size").read_text())
        info["sectors"] = sectors
        assert sectors == IMAGE_SIZE // SECTOR
        with open(node, "rb") as f:
            assert f.read(4 * SECTOR) == original[: 4 * SECTOR], "first sectors differ"
        rng = random.Random(name)
        data = rng.randbytes(64 * 1024)
        offset = 3 << 20
        info["read_back"] = _direct_io(node, offset, data) == data
        assert info["read_back"]
        with IMAGE.open("rb") as f:
            f.seek(offset)
            info["image_holds_data"] = f.read(len(data)) == data
        assert info["image_holds_data"]
        if not python and not packed:
            # Resize: grow the image, SIGHUP: the new config space goes to the kernel
            # (VDUSE_DEV_SET_CONFIG + config interrupt) and /dev/vdX grows.
            os.truncate(IMAGE, IMAGE_SIZE + (4 << 20))
            serve.proc.send_signal(signal.SIGHUP)
            size = Path(f"/sys/block/{Path(node).name}/size")
            grown = (IMAGE_SIZE + (4 << 20)) // SECTOR
            _wait("capacity after SIGHUP", lambda: int(size.read_text()) == grown)
            info["sectors_after_resize"] = grown
        if packed:
            # Killed while bound: a packed ring's position cannot be read back, so the
            # restart refuses to take over, and says what to do.
            serve.kill()
            again = _serve_once("--vduse", dev, "--image", str(IMAGE), "--packed")
            info["takeover"] = (again.returncode, again.stderr.strip().splitlines()[-1:])
            assert again.returncode == 1 and "Traceback" not in again.stderr, info
            assert "packed rings" in again.stderr and f"vdpa dev del {dev}" in again.stderr
            # Nobody answers the driver's reset at vdpa dev del: make it give up fast.
            Path(f"/sys/class/vduse/{dev}/msg_timeout").write_text("1")
            _del(dev)
            serve = Serve(dev, "--packed")  # the stale, unbound device is replaced
        _del(dev)
        info["stop_status"] = serve.stop()
        _wait(f"/dev/vduse/{dev} removed", lambda: not Path(f"/dev/vduse/{dev}").exists(), 10)
        info["removed"] = True
        assert info["stop_status"] == 0, serve.output()
    _del(dev)
    if serve is not None:
        serve.kill()


def _map_with_read_only_window(blk: VdpaBlk, window: int | None) -> None:
    """Maps the driver's memory again, in one IOTLB batch: all read-write, or with the
    64 KiB at ``window`` read-only for the device (``dma_map(readonly=True)``, as a VMM
    maps ROM; the kernel's IOTLB entry is then VDUSE_ACCESS_RO)."""
    base = blk.memory.regions()[0].userspace_addr
    with blk.dev.iotlb_batch():
        blk.dev.dma_unmap(0, MEM)
        if window is None:
            blk.dev.dma_map(0, MEM, base)
            return
        blk.dev.dma_map(0, window, base)
        blk.dev.dma_map(window, SLOT_DATA, base + window, readonly=True)
        end = window + SLOT_DATA
        blk.dev.dma_map(end, MEM - end, base + end)


def _read_into_read_only_memory(blk: VdpaBlk) -> dict[str, object]:
    """A read request whose data buffer the driver mapped read-only for the device asks
    the device to write where it may not: the request fails with IOERR, the memory is
    unchanged, and the queue goes on."""
    window = blk.window(10)
    blk.memory.write(window, b"\x5a" * 4096)
    _map_with_read_only_window(blk, window)
    try:
        blk.memory.write(HDRS, struct.pack("<IIQ", T_IN, 0, 8))
        blk.memory.write(STATUS, b"\xff")
        blk.queue.add([(HDRS, 16)], [(window, 4096), (STATUS, 1)])
        blk.queue.publish()
        blk.kick.write(1)
        used: list[tuple[int, int]] = []
        deadline = time.monotonic() + 20
        while not used:
            assert time.monotonic() < deadline, "the request into read-only memory never completed"
            used = blk.queue.poll_used()
            if not used and blk.call.wait(1):
                blk.call.read()
        return {
            "status": blk.memory.read(STATUS, 1)[0],
            "unchanged": blk.memory.read(window, 4096) == b"\x5a" * 4096,
        }
    finally:
        _map_with_read_only_window(blk, None)


def blk_vhost_vdpa() -> None:
    """Both ends ours: serve blk --vduse bound to vhost_vdpa, driven by VhostVdpa."""
    make_image(IMAGE, IMAGE_SIZE)
    original = IMAGE.read_bytes()
    dev = "pyvhost-vh"
    serve: Serve | None = None
    with check("vduse_vhost_vdpa") as info:
        serve = Serve(dev)
        _add(dev)
        _bind(dev, "vhost_vdpa")
        blk = VdpaBlk(_vhost_node(dev))
        try:
            info["device_id"] = blk.device_id
            info["capacity"] = blk.capacity
            assert blk.capacity == IMAGE_SIZE // SECTOR
            assert blk.read(5, SECTOR) == original[5 * SECTOR : 6 * SECTOR]
            data = random.Random(7).randbytes(8 * SECTOR)
            blk.write(100, data)
            blk.flush()
            assert blk.read(100, len(data)) == data
            with IMAGE.open("rb") as f:
                f.seek(100 * SECTOR)
                assert f.read(len(data)) == data, "the image does not hold the write"
            info["io"] = "ok"
            info["read_only"] = _read_into_read_only_memory(blk)
            assert info["read_only"] == {"status": 1, "unchanged": True}, info
            # The queue goes on after the failed request.
            assert blk.read(100, len(data)) == data
            # GET_VRING_BASE becomes a VDUSE_GET_VQ_STATE request: six chains consumed.
            info["vring_base"] = blk.dev.get_vring_base(0)
            assert info["vring_base"] == 6, info
        finally:
            blk.close()
        # The reset (status 0) stopped the rings; a second driver starts them again.
        again = VdpaBlk(_vhost_node(dev))
        try:
            info["after_reset"] = again.read(100, len(data)) == data
            assert info["after_reset"]
        finally:
            again.close()
        _del(dev)
        info["stop_status"] = serve.stop()
        assert info["stop_status"] == 0, serve.output()
    _del(dev)
    if serve is not None:
        serve.kill()


def stop_and_restart() -> None:
    """SIGKILL leaves the device behind: a restart replaces it. Killed while a vDPA device
    (and the kernel's virtio-blk) still uses it, the device cannot be destroyed: the
    restart takes it over, and the same /dev/vdX goes on working."""
    make_image(IMAGE, IMAGE_SIZE)
    dev = "pyvhost-re"
    with check("vduse_sigkill_restart") as info:
        first = Serve(dev)
        first.proc.kill()
        first.proc.wait(30)
        info["left_behind"] = Path(f"/dev/vduse/{dev}").exists()
        second = Serve(dev)
        third: Serve | None = None
        try:
            _add(dev)
            _bind(dev, "virtio_vdpa")
            node = _vd_node(dev)
            rng = random.Random(3)
            data = rng.randbytes(4096)
            info["io_after_restart"] = _direct_io(node, 1 << 20, data) == data
            assert info["io_after_restart"]
            second.proc.kill()
            second.proc.wait(30)
            third = Serve(dev)
            info["reclaimed_says"] = third.output().splitlines()[-1:]
            data = rng.randbytes(8192)
            info["io_after_reclaim"] = _direct_io(node, 2 << 20, data) == data
            assert info["io_after_reclaim"]
            with IMAGE.open("rb") as f:
                f.seek(2 << 20)
                assert f.read(len(data)) == data, "the image does not hold the write"
            # Stopped while the vDPA device still uses it: the kernel keeps the device
            # (EBUSY), the daemon says so and what to do, and the next start takes over.
            info["stop_while_bound"] = third.stop()
            info["stop_while_bound_says"] = third.output().splitlines()[-1:]
            assert info["stop_while_bound"] == 2 and "vdpa dev del" in third.output()
            # Taking it over as another device (another image size: capacity) is refused
            # in one line naming the field and what to do (the other fields: cargo tests).
            bigger = IMAGE.with_suffix(".bigger")
            make_image(bigger, IMAGE_SIZE + (1 << 20))
            other = _serve_once("--vduse", dev, "--image", str(bigger))
            info["takeover_other_size"] = (other.returncode, other.stderr.strip())
            assert other.returncode == 1, info
            assert "Traceback" not in other.stderr and len(other.stderr.strip().splitlines()) == 1
            assert "capacity is 16384 sectors, this start's 18432" in other.stderr, info
            assert f"vdpa dev del {dev}" in other.stderr, info
            third = Serve(dev)
            data = rng.randbytes(4096)
            assert _direct_io(node, 3 << 20, data) == data
            _del(dev)
            info["stop_after_reclaim"] = third.stop()
            assert info["stop_after_reclaim"] == 0, third.output()
            info["removed"] = not Path(f"/dev/vduse/{dev}").exists()
            assert info["removed"]
        finally:
            second.kill()
            if third is not None:
                third.kill()


def bad_input() -> None:
    """Names the kernel cannot take, --client with --vduse, a name in use: each a clear
    error and exit status 1, no traceback; the daemon serving the name goes on."""
    with check("vduse_bad_input") as info:
        got = {}
        cases = {
            "long_name": ["--vduse", "n" * 300],
            "slash": ["--vduse", "a/b"],
            "client": ["--vduse", "x", "--client"],
        }
        for case, args in cases.items():
            done = _serve_once("--image", str(IMAGE), *args)
            assert "Traceback" not in done.stderr, done.stderr
            got[case] = (done.returncode, done.stderr.strip().splitlines()[-1])
        # A device type VDUSE does not create: refused, saying which ones it does.
        done = subprocess.run(
            [sys.executable, "-m", "vhost", "serve", "rng", "--vduse", "pyvhost-rng"],
            check=False, capture_output=True, text=True, timeout=60, cwd=CHECKOUT,
        )  # fmt: skip
        assert "Traceback" not in done.stderr, done.stderr
        got["rng"] = (done.returncode, done.stderr.strip().splitlines()[-1])
        serving = Serve("pyvhost-busy")
        other = IMAGE.with_suffix(".other")
        make_image(other, 1 << 20)
        try:
            done = _serve_once("--vduse", "pyvhost-busy", "--image", str(other))
            got["in_use"] = (done.returncode, done.stderr.strip().splitlines()[-1])
            assert serving.proc.poll() is None, "the serving daemon died"
            assert serving.stop() == 0
        finally:
            serving.kill()
        info.update(got)
        assert "300 bytes, the kernel takes at most 255" in got["long_name"][1], got
        assert "names a path" in got["slash"][1], got
        assert "--client" in got["client"][1], got
        assert got["rng"][0] == 1 and "virtio-blk (2) devices only" in got["rng"][1], got
        assert got["in_use"][0] == 1 and "in use" in got["in_use"][1], got


def no_leak_in_process() -> None:
    """Daemon(..., transport="vduse") started and stopped three times in this process
    leaves no fd, mapping or device behind."""
    make_image(IMAGE, IMAGE_SIZE)
    gc.collect()
    fds, maps = fd_count(), maps_count()
    with check("vduse_lifecycle") as info:
        for _ in range(3):
            daemon = Daemon(BlkDevice(str(IMAGE)), "pyvhost-life", transport="vduse").start()
            assert Path("/dev/vduse/pyvhost-life").exists()
            daemon.stop()
            assert not Path("/dev/vduse/pyvhost-life").exists()
            del daemon
        gc.collect()
        info["fds"] = f"{fds}->{fd_count()}"
        info["maps"] = f"{maps}->{maps_count()}"
        assert (fd_count(), maps_count()) == (fds, maps), info


BENCH_SECONDS = 2.0


def _randread(node: str, depth: int, seconds: float) -> float:
    """4 KiB O_DIRECT random reads over the whole disk for ``seconds``, with ``depth``
    threads each keeping one read in flight (the GIL is released in the syscall):
    completed reads per second."""
    size = int(Path(f"/sys/block/{Path(node).name}/size").read_text()) * SECTOR
    blocks = size // 4096
    counts = [0] * depth
    stop = time.monotonic() + seconds

    def worker(i: int) -> None:
        fd = os.open(node, os.O_RDONLY | os.O_DIRECT)
        buf = mmap.mmap(-1, 4096)
        rng = random.Random(i)
        try:
            while time.monotonic() < stop:
                os.preadv(fd, [buf], rng.randrange(blocks) * 4096)
                counts[i] += 1
        finally:
            os.close(fd)

    threads = [threading.Thread(target=worker, args=(i,)) for i in range(depth)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return sum(counts) / seconds


def _qsd_vduse(name: str) -> subprocess.Popen[bytes]:
    """qemu-storage-daemon exporting IMAGE as VDUSE device ``name`` (as vdpa_blk.py's
    peer, but left for virtio_vdpa)."""
    proc = subprocess.Popen(
        ["qemu-storage-daemon",
         "--blockdev", f"driver=file,node-name=f0,filename={IMAGE},cache.direct=off",
         "--export", f"type=vduse-blk,id=v0,node-name=f0,name={name},writable=on,num-queues=1"],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )  # fmt: skip
    _wait(f"/dev/vduse/{name}", lambda: Path(f"/dev/vduse/{name}").exists() or proc.poll())
    return proc


def bench_against_qemu_storage_daemon() -> None:
    """4 KiB randread at QD1 and QD32 through /dev/vdX, our serve blk --vduse against
    qemu-storage-daemon's vduse-blk in the same guest run: the ratios (TCG makes the
    absolute figures meaningless). The guest's 2 vCPUs are not pinned."""
    make_image(IMAGE, IMAGE_SIZE)
    with check("vduse_bench") as info:
        for who in ("ours", "qsd"):
            dev = f"pyvhost-bench-{who}"
            serve = Serve(dev) if who == "ours" else None
            qsd = _qsd_vduse(dev) if who == "qsd" else None
            try:
                _add(dev)
                _bind(dev, "virtio_vdpa")
                node = _vd_node(dev)
                for depth in (1, 32):
                    info[f"{who}_qd{depth}_iops"] = round(_randread(node, depth, BENCH_SECONDS))
            finally:
                _del(dev)
                if serve is not None:
                    serve.stop()
                    serve.kill()
                if qsd is not None:
                    qsd.terminate()
                    qsd.wait(30)
        for depth in (1, 32):
            ours, theirs = info[f"ours_qd{depth}_iops"], info[f"qsd_qd{depth}_iops"]
            assert isinstance(ours, int) and isinstance(theirs, int) and theirs > 0, info
            info[f"ratio_qd{depth}"] = round(ours / theirs, 2)
