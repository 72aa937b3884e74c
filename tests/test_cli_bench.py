"""``python -m vhost bench blk`` against qemu-storage-daemon and our own ``serve blk``:
checking data, not speed.

Every data test reads the image file on the host afterwards and recomputes, in Python and
independently of the native loop, the pattern each sector must hold (see
:func:`expected_sector`), so a back-end that dropped, misplaced or corrupted a write, or a
loop that checked nothing, fails here. Speed is never asserted.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

import peers
from vhost.devices.blk import BlkDriver, BlkRequest
from vhost.errors import ClosedError, InvalidParamError, VhostTimeoutError

pytestmark = pytest.mark.timeout(180)

ROOT = Path(__file__).resolve().parent.parent
IMAGE_SIZE = 4 << 20
REGION = 1 << 20
SECTOR = 512
MASK = (1 << 64) - 1


def splitmix64(x: int) -> int:
    z = (x + 0x9E3779B97F4A7C15) & MASK
    z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & MASK
    z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & MASK
    return z ^ (z >> 31)


def expected_sector(offset: int, generation: int) -> bytes:
    """The documented pattern, recomputed here: word at byte p is
    splitmix64(p ^ (generation << 40)), little-endian."""
    return b"".join(
        splitmix64((offset + i) ^ (generation << 40)).to_bytes(8, "little")
        for i in range(0, SECTOR, 8)
    )


def image_generations(image: Path, offset: int, size: int, candidates: list[int]) -> list[int]:
    """For each sector of the region: which candidate generation it holds (-1: none)."""
    data = image.read_bytes()[offset : offset + size]
    out = []
    for s in range(size // SECTOR):
        at = offset + s * SECTOR
        chunk = data[s * SECTOR : (s + 1) * SECTOR]
        found = next((g for g in candidates if chunk == expected_sector(at, g)), -1)
        out.append(found)
    return out


def bench(sock: Path, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "vhost", "bench", "blk", "--socket", str(sock), *args],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
        cwd=ROOT,
    )


def bench_json(sock: Path, *args: str) -> dict[str, Any]:
    out = bench(sock, "--json", *args)
    assert out.returncode == 0, out.stderr
    result: dict[str, Any] = json.loads(out.stdout)
    return result


@pytest.fixture
def image(tmp_sock_dir: Path) -> Path:
    return peers.make_image(tmp_sock_dir / "disk.img", IMAGE_SIZE)


@pytest.fixture(params=["qsd", "serve"])
def backend(request: pytest.FixtureRequest, image: Path, tmp_sock_dir: Path) -> Iterator[Path]:
    """The socket of a vhost-user-blk back-end on ``image``: qemu-storage-daemon, or our
    ``python -m vhost serve blk`` (native device)."""
    sock = tmp_sock_dir / "blk.sock"
    if request.param == "qsd":
        ctx = peers.qemu_storage_daemon_blk(image, sock)
    else:
        argv = [sys.executable, "-m", "vhost", "serve", "blk", "--socket", str(sock),
                "--image", str(image)]  # fmt: skip
        ctx = peers.spawn_peer("serve-blk", argv, sock)
    with ctx as peer:
        yield sock
        assert peer.alive(), peer.output()


@pytest.fixture
def qsd(image: Path, tmp_sock_dir: Path) -> Iterator[Path]:
    sock = tmp_sock_dir / "blk.sock"
    with peers.qemu_storage_daemon_blk(image, sock) as peer:
        yield sock
        assert peer.alive(), peer.output()


# --- data --------------------------------------------------------------------------


@pytest.mark.parametrize("rw", ["read", "write", "randread", "randwrite"])
def test_verified_run_leaves_the_pattern_in_the_image(rw: str, backend: Path, image: Path) -> None:
    r = bench_json(backend, "--rw", rw, "--verify", "--generation", "5", "--size", str(REGION),
                   "--offset", "64k", "--seconds", "0.3", "--iodepth", "16")  # fmt: skip
    v = r["verify"]
    assert v["ok"] and v["bad_sectors"] == 0 and v["io_errors"] == 0
    assert r["ios"] > 0 and r["io_errors"] == 0
    assert v["filled_bytes"] == REGION
    assert v["final_checked_bytes"] == REGION
    if rw.endswith("read"):
        assert v["read_checked_bytes"] == r["bytes"] > 0
        assert v["written_bytes"] == 0
    else:
        assert v["read_checked_bytes"] == 0
        assert 0 < v["written_bytes"] <= REGION
    # The host's view: every sector of the region holds generation 5 or (written by the
    # run) 6, as many of 6 as the run reports; outside the region the image is untouched.
    gens = image_generations(image, 64 << 10, REGION, [5, 6])
    assert -1 not in gens, f"sector {gens.index(-1)} holds neither generation"
    assert gens.count(6) * SECTOR == v["written_bytes"]
    assert image.read_bytes()[: 64 << 10] == bytes(64 << 10)
    assert image.read_bytes()[(64 << 10) + REGION :] == bytes(IMAGE_SIZE - (64 << 10) - REGION)


def test_sequential_write_of_n_ios_writes_exactly_those_blocks(backend: Path, image: Path) -> None:
    r = bench_json(backend, "--rw", "write", "--verify", "--generation", "9", "--size",
                   str(REGION), "--ios", "100", "--bs", "4k", "--iodepth", "8")  # fmt: skip
    assert r["ios"] == 100
    assert r["verify"]["written_bytes"] == 100 * 4096
    gens = image_generations(image, 0, REGION, [9, 10])
    assert gens == [10] * (100 * 8) + [9] * (REGION // SECTOR - 100 * 8)


def test_reads_are_checked_against_the_image(qsd: Path, image: Path) -> None:
    # Write generation 3 over the whole region, then corrupt one sector behind the daemon's back.
    r = bench_json(qsd, "--rw", "write", "--verify", "--generation", "2", "--size", str(REGION),
                   "--ios", str(REGION // 4096))  # fmt: skip
    assert r["verify"]["written_bytes"] == REGION
    assert set(image_generations(image, 0, REGION, [3])) == {3}
    bad = 77 * SECTOR
    fd = os.open(image, os.O_WRONLY)
    try:
        os.pwrite(fd, b"\x00" * 8, bad + 128)
    finally:
        os.close(fd)
    out = bench(qsd, "--json", "--rw", "randread", "--verify", "--no-fill", "--generation", "3",
                "--size", str(REGION), "--seconds", "0.3")  # fmt: skip
    assert out.returncode == 3, out.stderr
    v = json.loads(out.stdout)["verify"]
    assert not v["ok"] and v["bad_sectors"] >= 1  # at least the read-back pass found it
    # Only that sector is wrong, whichever phase saw it first.
    assert v["first_bad_offset"] == bad
    assert f"first at byte offset {bad}" in out.stderr
    # Expecting another generation than the disk holds fails everywhere.
    out = bench(qsd, "--rw", "read", "--verify", "--no-fill", "--generation", "4", "--size",
                "64k", "--ios", "16")  # fmt: skip
    assert out.returncode == 3
    assert "data verification failed" in out.stderr


def test_packed_ring_busy_poll_and_no_event_idx(image: Path, tmp_sock_dir: Path) -> None:
    # qemu-storage-daemon has no packed rings; our serve blk does.
    sock = tmp_sock_dir / "blk.sock"
    argv = [sys.executable, "-m", "vhost", "serve", "blk", "--socket", str(sock),
            "--image", str(image)]  # fmt: skip
    with peers.spawn_peer("serve-blk", argv, sock):
        for extra in (["--packed"], ["--packed", "--no-event-idx", "--busy-poll", "50"],
                      ["--no-event-idx", "--busy-poll", "50"]):  # fmt: skip
            r = bench_json(sock, "--rw", "randwrite", "--verify", "--generation", "20",
                           "--size", str(REGION), "--seconds", "0.2", *extra)  # fmt: skip
            assert r["packed"] == ("--packed" in extra)
            assert r["event_idx"] == ("--no-event-idx" not in extra)
            assert r["verify"]["ok"] and r["ios"] > 0
            gens = image_generations(image, 0, REGION, [20, 21])
            assert -1 not in gens
            assert gens.count(21) * SECTOR == r["verify"]["written_bytes"] > 0


def test_ring_is_fitted_to_the_back_end(image: Path, tmp_sock_dir: Path) -> None:
    """1 MiB requests at the default depth need a 2048-entry ring; our serve blk takes at
    most 256 (--queue-size): the bench steps down to 256 and lowers the default depth to
    what fits, saying so, instead of failing or suggesting a size the back-end refuses."""
    sock = tmp_sock_dir / "blk.sock"
    argv = [sys.executable, "-m", "vhost", "serve", "blk", "--socket", str(sock),
            "--image", str(image)]  # fmt: skip
    with peers.spawn_peer("serve-blk", argv, sock):
        out = bench(sock, "--json", "--bs", "1M", "--rw", "randwrite", "--verify",
                    "--generation", "30", "--seconds", "0.3")  # fmt: skip
        assert out.returncode == 0, out.stderr
        r = json.loads(out.stdout)
        assert (r["queue_size"], r["queue_size_refused"]) == (256, [2048, 1024, 512])
        per_request = 2 + (1 << 20) // (32 << 10)
        assert (r["iodepth"], r["iodepth_requested"]) == (256 // per_request, 32)
        assert out.stderr == (
            "note: ring of 256 entries (the back-end refused 2048, 1024, 512 entries; "
            f"{per_request} per request): iodepth {256 // per_request}\n"
        )
        assert r["verify"]["ok"] and r["ios"] > 0
        gens = image_generations(image, 0, IMAGE_SIZE, [30, 31])
        assert -1 not in gens and gens.count(31) * SECTOR == r["verify"]["written_bytes"]
        # An explicit size or depth the back-end cannot take is an error naming it.
        out = bench(sock, "--queue-size", "2048", "--seconds", "0.1")
        assert out.returncode == 2
        assert out.stderr == (
            f"error: set up a virtio-blk queue on {sock}: SET_VRING_NUM refused, the back-end "
            "takes no ring of 2048 entries (try a smaller --queue-size)\n"
        )
        out = bench(sock, "--bs", "1M", "--iodepth", "32", "--seconds", "0.1")
        assert out.returncode == 2
        assert "--iodepth 32 of 1048576-byte requests does not fit" in out.stderr
        assert out.stderr.endswith(f"(use --iodepth {256 // per_request} or less)\n")


# --- report --------------------------------------------------------------------------


@pytest.mark.parametrize("engine", ["native", "python"])
def test_json_report(engine: str, qsd: Path) -> None:
    r = bench_json(qsd, "--rw", "randread", "--bs", "8k", "--iodepth", "4", "--seconds", "0.3",
                   "--engine", engine)  # fmt: skip
    for key in ("iops", "bandwidth_bytes_per_s", "ios", "bytes", "seconds", "rw", "bs",
                "iodepth", "kicks", "wakeups", "latency_ns", "verify", "driver_cpu_seconds",
                "queue_size", "engine", "cpus"):  # fmt: skip
        assert key in r, key
    assert (r["rw"], r["bs"], r["iodepth"], r["engine"]) == ("randread", 8192, 4, engine)
    assert r["ios"] > 0 and r["bytes"] == r["ios"] * 8192
    assert r["iops"] == pytest.approx(r["ios"] / r["seconds"])
    assert r["bandwidth_bytes_per_s"] == pytest.approx(r["iops"] * 8192)
    assert 0.3 <= r["seconds"] < 30
    assert r["verify"] is None
    assert 0 < r["kicks"] <= r["ios"]
    if engine == "native":
        lat = r["latency_ns"]
        assert 0 < lat["min"] <= lat["p50"] <= lat["p90"] <= lat["p99"] <= lat["max"]
        assert lat["min"] <= lat["mean"] <= lat["max"]


def test_human_report(qsd: Path) -> None:
    out = bench(qsd, "--rw", "randwrite", "--seconds", "0.2", "--verify", "--size", "256k")
    assert out.returncode == 0, out.stderr
    assert "randwrite bs=4096 iodepth=32 engine=native:" in out.stdout
    assert "IOPS" in out.stdout and "latency us:" in out.stdout
    assert "verify: ok" in out.stdout


# --- bad input ---------------------------------------------------------------------


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--bs", "1000"], "--bs must be a positive multiple of 512"),
        (["--bs", "0"], "--bs must be a positive multiple of 512"),
        (["--iodepth", "20000"], "more than the largest ring (32768)"),
        (["--iodepth", "64", "--queue-size", "128"], "iodepth 64 does not fit"),
        (["--size", "64m"], "--offset 0 --size 67108864 runs past the end of the disk of "),
        (["--offset", "3m", "--size", "2m"], "--offset 3145728 --size 2097152 runs past the end"),
        (["--bs", "8m"], f"--bs 8388608 is larger than the disk of {{sock}} ({IMAGE_SIZE} bytes)"),
        (["--offset", "4m"], "--offset 4194304 is beyond the end of the disk of "),
        (["--offset", "1000"], "--offset must be a multiple of 512"),
        (["--engine", "python", "--verify"], "need the native engine"),
    ],
)
def test_bad_arguments_are_clear_errors(args: list[str], message: str, qsd: Path) -> None:
    out = bench(qsd, *args, "--seconds", "0.2")
    assert out.returncode == 1, out.stdout
    assert out.stderr.startswith("error: "), out.stderr
    assert message.format(sock=qsd) in out.stderr
    assert "Traceback" not in out.stderr


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--iodepth", "0"], "argument --iodepth: must be in 1..65535: '0'"),
        (["--iodepth", "-5"], "argument --iodepth: must be in 1..65535: '-5'"),
        (["--seconds", "0"], "argument --seconds: must be a positive number of seconds"),
        (["--seconds", "-1"], "argument --seconds: must be a positive number of seconds"),
        (["--timeout", "-1"], "argument --timeout: must be a positive number of seconds"),
        (["--timeout", "nan"], "argument --timeout: must be a positive number of seconds"),
        (["--busy-poll", "-5"], "argument --busy-poll: must be zero or more"),
        (["--busy-poll", "2000000"], "argument --busy-poll: must be 0..1000000 us"),
        (["--ios", "-1"], "argument --ios: must be in 1.."),
        (["--generation", "-1"], "argument --generation: must be in 0..4294967294"),
        (["--seed", "-1"], "argument --seed: must be in 0.."),
        (["--queue-size", "70000"], "argument --queue-size: must be in 2..32768"),
        (["--rw", "trim"], "argument --rw: invalid choice: 'trim'"),
    ],
)
def test_bad_values_are_usage_errors(args: list[str], message: str, tmp_sock_dir: Path) -> None:
    """Refused while parsing (exit status 1, as the README says), before any connection
    (the socket does not even exist) and never as a traceback (``--busy-poll -5`` was an
    OverflowError in the native glue)."""
    out = bench(tmp_sock_dir / "none.sock", *args)
    assert out.returncode == 1, out.stderr
    assert out.stderr.startswith("error: bench blk: ") and message in out.stderr
    assert out.stderr.endswith(" (see --help)\n") and out.stderr.count("\n") == 1
    assert "Traceback" not in out.stderr and "connect" not in out.stderr


def test_missing_socket(tmp_sock_dir: Path) -> None:
    sock = tmp_sock_dir / "nothing.sock"
    out = bench(sock)
    assert out.returncode == 1
    assert out.stderr == (
        f"error: connect to {sock}: No such file or directory (is the back-end running?)\n"
    )


def test_ctrl_c_stops_a_long_run(qsd: Path) -> None:
    proc = subprocess.Popen(
        [sys.executable, "-m", "vhost", "bench", "blk", "--socket", str(qsd), "--seconds", "120"],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        cwd=ROOT,
    )
    try:
        time.sleep(1.5)  # connected and running (the GIL released in the native loop)
        assert proc.poll() is None
        proc.send_signal(signal.SIGINT)
        _, err = proc.communicate(timeout=10)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert proc.returncode == 130, err
    assert "error: interrupted" in err and "Traceback" not in err


# --- API ---------------------------------------------------------------------------


def test_native_load_hand_off(qsd: Path, image: Path, fd_count: Any) -> None:
    before = fd_count()
    with BlkDriver.connect(qsd, slots=4, max_request=8192) as disk:
        load = disk.native_load()
        assert (load.slots, load.window, load.queue_size) == (4, 8192, disk.queue_size)
        assert load.max_iodepth(4096) == 4
        with pytest.raises(ClosedError):
            disk.read(0, 512)
        with pytest.raises(ClosedError):
            disk.native_load()
        with pytest.raises(InvalidParamError, match="rw must be"):
            load.run("trim", 4096, 1, 0, 4096, ios=1)
        with pytest.raises(InvalidParamError, match="iodepth 5 does not fit"):
            load.run("read", 4096, 5, 0, 1 << 20, ios=1)
        with pytest.raises(InvalidParamError, match="data window"):
            load.run("read", 16384, 1, 0, 1 << 20, ios=1)
        r = load.run("write", 8192, 4, 0, 1 << 20, ios=64, verify=True, generation=11)
        assert r["ios"] == 64 and r["verify"]["ok"]
        # 64 sequential 8 KiB writes cover the first 512 KiB with generation 12.
        gens = image_generations(image, 0, 1 << 20, [11, 12])
        assert gens == [12] * 1024 + [11] * 1024
        r = load.run("randread", 4096, 4, 0, 1 << 20, seconds=0.1)
        assert r["ios"] > 0 and r["verify"] is None
    del load
    assert fd_count() == before


def test_native_load_only_on_a_fresh_driver(qsd: Path) -> None:
    with BlkDriver.connect(qsd) as disk:
        disk.submit([BlkRequest.read(0, 512)])
        disk.wait()
        with pytest.raises(InvalidParamError, match="sent no request"):
            disk.native_load()


def test_a_back_end_that_stops_answering_times_out(tmp_sock_dir: Path, image: Path) -> None:
    sock = tmp_sock_dir / "blk.sock"
    with peers.qemu_storage_daemon_blk(image, sock) as peer, BlkDriver.connect(sock) as disk:
        load = disk.native_load()
        os.killpg(peer.pid, 19)  # SIGSTOP: the daemon holds the requests and never answers
        try:
            with pytest.raises(VhostTimeoutError, match="completed none"):
                load.run("randread", 4096, 2, 0, 1 << 20, seconds=5, timeout=0.3)
        finally:
            os.killpg(peer.pid, 18)  # SIGCONT


def test_a_bs_no_ring_holds_says_which_bs_fits(tmp_sock_dir: Path) -> None:
    """``serve blk --queue-size 256`` takes no ring big enough for a 16 MiB request (514
    descriptors of 32 KiB segments): the error says how many descriptors one request
    needs and which --bs the largest ring it took (256 entries) holds, and that --bs runs."""
    image = peers.make_image(tmp_sock_dir / "big.img", 32 << 20)
    sock = tmp_sock_dir / "small-ring.sock"
    argv = [sys.executable, "-m", "vhost", "serve", "blk", "--socket", str(sock),
            "--image", str(image), "--queue-size", "256"]  # fmt: skip
    with peers.spawn_peer("serve-blk", argv, sock) as peer:
        out = bench(sock, "--bs", "16m", "--seconds", "0.1")
        assert out.returncode == 2, out.stderr
        # The device's seg_max (min(queue size, 128) - 2 = 126 segments, so that QEMU's
        # default 128-entry ring holds a whole request) bounds a request below the ring.
        fits = 126 * 32768
        assert out.stderr == (
            f"error: set up a virtio-blk queue on {sock}: SET_VRING_NUM refused, the back-end "
            "takes no ring of 32768, 16384, 8192, 4096, 2048, 1024 entries: one request of "
            "--bs 16777216 needs 514 descriptors (a header, 512 data segments of up to 32768 "
            "bytes, a status); the largest ring it took, 256 entries, holds requests of up to "
            f"{fits} bytes (use --bs {fits} or less)\n"
        )
        result = bench_json(sock, "--bs", str(fits), "--size", str(fits), "--ios", "2")
        assert (result["bs"], result["ios"], result["queue_size"]) == (fits, 2, 256)
        # Larger than the disk: a bad argument, found before any ring is tried.
        out = bench(sock, "--bs", "64m", "--seconds", "0.1")
        assert out.returncode == 1, out.stderr
        assert out.stderr == (
            f"error: --bs 67108864 is larger than the disk of {sock} ({32 << 20} bytes)\n"
        )
        assert peer.alive(), peer.output()


def test_verify_on_a_read_only_device_needs_no_fill(image: Path, tmp_sock_dir: Path) -> None:
    """The fill of --verify writes: on a read-only back-end it is refused before anything
    runs (exit status 2, as a write to a read-only device), not reported afterwards as
    corrupt data (exit status 3); with --no-fill the region's generation is checked."""
    sock = tmp_sock_dir / "ro.sock"
    rw_sock = tmp_sock_dir / "rw.sock"
    with peers.qemu_storage_daemon_blk(image, rw_sock):
        bench_json(rw_sock, "--rw", "read", "--verify", "--size", str(REGION), "--ios", "1",
                   "--generation", "6")  # fmt: skip
    argv = [sys.executable, "-m", "vhost", "serve", "blk", "--socket", str(sock),
            "--image", str(image), "--readonly"]  # fmt: skip
    with peers.spawn_peer("serve-blk", argv, sock):
        out = bench(sock, "--rw", "read", "--verify", "--size", str(REGION), "--seconds", "0.1")
        assert (out.returncode, out.stdout) == (2, ""), out.stderr
        assert out.stderr == (
            f"error: write to {sock}: --verify first fills the region, and the device is "
            "read-only (VIRTIO_BLK_F_RO); nothing was sent (add --no-fill if the region "
            "already holds generation 1)\n"
        )
        result = bench_json(sock, "--rw", "randread", "--verify", "--no-fill",
                            "--generation", "6", "--size", str(REGION), "--ios", "50")  # fmt: skip
        assert result["verify"]["ok"] and result["verify"]["read_checked_bytes"] > 0
