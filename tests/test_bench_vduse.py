"""benches/bench_vduse.py stays runnable: its load generator (benches/vduse_load.c) catches
wrong data, and one short round in the test guest measures ``serve blk --vduse`` and both
qemu-storage-daemon ``vduse-blk`` back-ends with every read checked. The figures are
printed, never asserted on (TCG; no timed assertions)."""

from __future__ import annotations

import re
import subprocess
import sys
import tempfile
from pathlib import Path

import bench_vduse  # benches/ is on sys.path (conftest.py)

CHECKOUT = Path(__file__).resolve().parent.parent


def _load(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [str(bench_vduse.LOAD_BINARY), *args],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )


def test_load_generator_reads_the_pattern_and_names_a_wrong_byte() -> None:
    bench_vduse.build_load()
    # Not /tmp: O_DIRECT needs a file system that has it (tmpfs has not).
    (CHECKOUT / "target" / "bench").mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=CHECKOUT / "target" / "bench") as tmp:
        image = Path(tmp) / "pattern.img"
        assert _load("mkimage", str(image), str(1 << 20)).returncode == 0
        # The same pattern as the guest checks' images (tests/guest_kern/vdpa_blk.py).
        data = image.read_bytes()
        for n in (0, 1, 255, 256, 2047):
            sector = data[n * 512 : (n + 1) * 512]
            assert int.from_bytes(sector[:8], "little") == n
            assert sector[8:] == bytes((n + j) % 256 for j in range(504))
        good = _load("read", str(image), "4", "0.3")
        assert good.returncode == 0, good.stderr
        got = dict(re.findall(r"(\w+)=([\d.]+)", good.stdout))
        assert int(got["reads"]) > 0 and got["checked"] == got["reads"]
        assert int(got["fullchecked"]) == int(got["reads"]) // 8
        # One byte inside a sector (only the whole-block check sees it) and one header.
        for offset in (256 * 512 + 100, 7 * 4096):
            with image.open("r+b") as f:
                f.seek(offset)
                f.write(b"\xee")
            bad = _load("read", str(image), "32", "2")
            assert bad.returncode == 1
            assert f"data mismatch at byte {offset} " in bad.stderr, bad.stderr
            image.write_bytes(data)


def test_bench_vduse_one_round_in_the_guest_prints_ratios_of_verified_reads() -> None:
    done = subprocess.run(
        [sys.executable, str(CHECKOUT / "benches" / "bench_vduse.py"),
         "--rounds", "1", "--seconds", "0.5"],
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )  # fmt: skip
    print(done.stdout)
    assert done.returncode == 0, done.stdout + done.stderr
    for ref in ("qsd", "qsd-uring"):
        for depth in (1, 32):
            line = re.search(
                rf"^RATIO ours/{ref} placement=one depth={depth} rounds=1 median=([\d.]+) .*"
                rf"verified\(reads/whole-block\)=ours=(\d+)/(\d+) {ref}=(\d+)/(\d+)$",
                done.stdout,
                re.MULTILINE,
            )
            assert line is not None, done.stdout
            ratio, *counts = (float(x) for x in line.groups())
            assert ratio > 0
            assert all(c > 0 for c in counts), line.group(0)
