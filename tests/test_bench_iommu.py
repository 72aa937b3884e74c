"""``python -m vhost bench blk --iommu`` against our own ``serve blk --iommu``: the load
generator plays the IOMMU (remapped I/O virtual addresses, misses answered on the back-end
channel) and the data is checked twice, by the native loop (``--verify``) and here, in the
image file, with the pattern recomputed in Python (``test_cli_bench.image_generations``).
Speed is never asserted; the figures are ``benches/bench_iommu.py``'s.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager
from pathlib import Path

import pytest

import peers
from test_cli_bench import IMAGE_SIZE, REGION, SECTOR, bench, bench_json, image_generations
from vhost.devices.blk import BlkDriver
from vhost.errors import ClosedError
from vhost.user import Frontend

pytestmark = pytest.mark.timeout(180)


def serve(image: Path, sock: Path, *extra: str) -> AbstractContextManager[peers.Peer]:
    argv = [sys.executable, "-m", "vhost", "serve", "blk", "--socket", str(sock),
            "--image", str(image), *extra]  # fmt: skip
    return peers.spawn_peer("serve-blk", argv, sock)


def os_threads() -> int:
    """Threads of this process, native ones included (the responder is a Rust thread)."""
    return len(os.listdir("/proc/self/task"))


@pytest.fixture
def image(tmp_sock_dir: Path) -> Path:
    return peers.make_image(tmp_sock_dir / "disk.img", IMAGE_SIZE)


@pytest.fixture
def iommu_serve(image: Path, tmp_sock_dir: Path) -> Iterator[Path]:
    """``serve blk --iommu`` on ``image``: ACCESS_PLATFORM offered, every ring and buffer
    reached through its IOTLB."""
    sock = tmp_sock_dir / "blk.sock"
    with serve(image, sock, "--iommu") as peer:
        yield sock
        assert peer.alive(), peer.output()


@pytest.fixture
def flat_serve(image: Path, tmp_sock_dir: Path) -> Iterator[Path]:
    sock = tmp_sock_dir / "flat.sock"
    with serve(image, sock) as peer:
        yield sock
        assert peer.alive(), peer.output()


@pytest.mark.parametrize("page", ["4K", "2M"])
@pytest.mark.parametrize("rw", ["randwrite", "randread"])
def test_verified_run_behind_the_iommu_leaves_the_pattern_in_the_image(
    rw: str, page: str, iommu_serve: Path, image: Path
) -> None:
    r = bench_json(iommu_serve, "--iommu", "--iommu-page", page, "--rw", rw, "--verify",
                   "--generation", "5", "--size", str(REGION), "--offset", "64k",
                   "--seconds", "0.3", "--iodepth", "16")  # fmt: skip
    v = r["verify"]
    assert v["ok"] and v["bad_sectors"] == 0 and v["io_errors"] == 0, r
    assert r["ios"] > 0 and r["io_errors"] == 0
    assert v["filled_bytes"] == v["final_checked_bytes"] == REGION
    mmu = r["iommu"]
    assert mmu["page"] == {"4K": 4096, "2M": 2 << 20}[page]
    assert mmu["prefill"] == "none" and not mmu["strict"]
    # The back-end reached nothing without asking: every page it touched was a miss,
    # answered with one update each (none outside the memory).
    assert mmu["misses"] > 0
    assert v["iotlb_misses"] <= mmu["misses"]  # the others came before the first phase
    assert mmu["unmapped_misses"] == 0
    assert 0 < mmu["updates"] <= mmu["misses"]
    assert mmu["invalidations"] == 0
    # The host's view, computed apart from the loop: the region holds generation 5 or
    # (written by the run) 6, the rest of the image is untouched.
    gens = image_generations(image, 64 << 10, REGION, [5, 6])
    assert -1 not in gens, f"sector {gens.index(-1)} holds neither generation"
    assert gens.count(6) * SECTOR == v["written_bytes"]
    assert image.read_bytes()[: 64 << 10] == bytes(64 << 10)


def test_packed_ring_and_64k_pages_behind_the_iommu(iommu_serve: Path, image: Path) -> None:
    r = bench_json(iommu_serve, "--iommu", "--iommu-page", "64k", "--packed", "--rw",
                   "randwrite", "--verify", "--generation", "3", "--size", str(REGION),
                   "--ios", "500")  # fmt: skip
    assert r["packed"] and r["verify"]["ok"], r
    assert r["iommu"]["page"] == 65536 and r["iommu"]["misses"] > 0
    gens = image_generations(image, 0, REGION, [3, 4])
    assert -1 not in gens and gens.count(4) * SECTOR == r["verify"]["written_bytes"]


def test_native_load_behind_the_iommu_leaks_no_fd_or_thread(
    iommu_serve: Path, image: Path, fd_count: Callable[[], int]
) -> None:
    """The API under ``bench blk --iommu``: a driver made with ``iommu=True`` has no queue
    of its own until ``native_load`` sets it up behind the IOMMU; the responder thread and
    the back-end channel go with the load."""
    fds, threads = fd_count(), os_threads()
    with BlkDriver(Frontend.connect(iommu_serve), slots=4, max_request=8192, iommu=True) as disk:
        with pytest.raises(ClosedError, match="behind an IOMMU"):
            disk.read(0, 512)
        load = disk.native_load(iommu_page=8192, iommu_prefill="none")
        r = load.run("write", 8192, 4, 0, REGION, ios=128, verify=True, generation=21)
        assert r["verify"]["ok"] and r["verify"]["iotlb_misses"] > 0
        mmu = load.iommu
        assert mmu is not None and mmu["page"] == 8192 and mmu["iova_base"] == 1 << 40
        with pytest.raises(ClosedError):
            disk.native_load()
        del load
    # 128 sequential 8 KiB writes: the first MiB holds generation 22.
    assert image_generations(image, 0, REGION, [22]) == [22] * (REGION // SECTOR)
    assert fd_count() == fds
    assert os_threads() == threads, "the miss-answering thread outlived its load"


def test_prefill_all_maps_every_page_up_front(iommu_serve: Path) -> None:
    r = bench_json(iommu_serve, "--iommu", "--iommu-prefill", "all", "--verify",
                   "--size", str(REGION), "--seconds", "0.2")  # fmt: skip
    assert r["verify"]["ok"], r
    mmu = r["iommu"]
    assert mmu["updates"] == mmu["pages"] > 0
    assert mmu["misses"] == 0 and r["iotlb_misses"] == 0


def test_strict_mode_unmaps_every_request_so_each_misses(iommu_serve: Path) -> None:
    r = bench_json(iommu_serve, "--iommu", "--iommu-strict", "--iodepth", "1", "--ios", "200",
                   "--size", str(REGION))  # fmt: skip
    assert r["ios"] == 200 and r["io_errors"] == 0, r
    mmu = r["iommu"]
    assert mmu["strict"] and mmu["invalidations"] == 200
    # Each request found its data page unmapped by the one before.
    assert r["iotlb_misses"] >= 200


def test_human_report_names_the_misses(iommu_serve: Path) -> None:
    out = bench(iommu_serve, "--iommu", "--seconds", "0.2", "--size", str(REGION))
    assert out.returncode == 0, out.stderr
    line = next(x for x in out.stdout.splitlines() if x.startswith("iommu: "))
    assert "4096-byte pages, prefill none, strict off: " in line
    assert " IOTLB misses in the run (" in line


def test_a_back_end_without_access_platform_is_a_one_line_error(flat_serve: Path) -> None:
    out = bench(flat_serve, "--iommu", "--seconds", "0.2")
    assert out.returncode == 2, out.stdout
    assert out.stderr.count("\n") == 1 and "Traceback" not in out.stderr
    assert out.stderr.startswith(f"error: set up a virtio-blk queue on {flat_serve}: ")
    assert "does not offer VIRTIO_F_ACCESS_PLATFORM" in out.stderr
    assert "(python -m vhost serve blk --iommu offers it)" in out.stderr
    # The same back-end runs the flat load, with no IOMMU in its report.
    r = bench_json(flat_serve, "--seconds", "0.2", "--size", str(REGION))
    assert r["iommu"] is None and r["iotlb_misses"] is None


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (
            ["--iommu", "--iommu-page", "3k"],
            "argument --iommu-page: must be a power of two from 4K to 2M: '3k'",
        ),
        (["--iommu", "--iommu-page", "4M"], "argument --iommu-page: must be a power of two"),
        (["--iommu", "--iommu-page", "2k"], "argument --iommu-page: must be a power of two"),
        (["--iommu", "--iommu-page", "x"], "argument --iommu-page: not a byte count: 'x'"),
        (["--iommu", "--iommu-prefill", "some"], "argument --iommu-prefill: invalid choice"),
    ],
)
def test_bad_iommu_values_are_usage_errors(
    args: list[str], message: str, tmp_sock_dir: Path
) -> None:
    out = bench(tmp_sock_dir / "none.sock", *args)
    assert out.returncode == 1, out.stderr
    assert out.stderr.startswith("error: bench blk: ") and message in out.stderr
    assert out.stderr.count("\n") == 1 and "Traceback" not in out.stderr


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--iommu-page", "2M"], "error: --iommu-page need(s) --iommu\n"),
        (
            ["--iommu-prefill", "all", "--iommu-strict"],
            "error: --iommu-prefill, --iommu-strict need(s) --iommu\n",
        ),
        (
            ["--iommu", "--engine", "python"],
            "error: --verify, --busy-poll and --iommu need the native engine\n",
        ),
        (
            ["--iommu", "--dirty-log"],
            "error: --dirty-log cannot run with --iommu (the ring is set up by the loop)\n",
        ),
    ],
)
def test_iommu_options_that_cannot_run_are_refused_before_connecting(
    args: list[str], message: str, tmp_sock_dir: Path
) -> None:
    out = bench(tmp_sock_dir / "none.sock", *args)
    assert out.returncode == 1
    assert out.stderr == message
