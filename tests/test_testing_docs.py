"""docs/testing.md's examples, run as a reader would run them (issue 12).

Every ```python and ```sh block of docs/testing.md is run here, and a block this file
does not know fails :func:`test_every_block_is_run`:

* the pytest example (the block with ``def test_``) is written to a file as it is and
  run by ``python -m pytest`` in a fresh directory: the ``vhost_guest`` fixture comes from
  the installed plugin (the ``pytest11`` entry point), nothing else is provided;
* the first Python block runs against ``python -m vhost serve blk`` on a temporary
  socket (its ``/tmp/my-blk.sock`` replaced), and prints what its comment says;
* the ``sh`` block runs in a shell against ``python -m vhost serve rng``, with
  ``python`` replaced by this interpreter and ``/tmp/rng.sock`` by a temporary socket.
"""

from __future__ import annotations

import re
import shlex
import subprocess
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import peers

CHECKOUT = Path(__file__).resolve().parent.parent
DOC = CHECKOUT / "docs" / "testing.md"
RUN_TIMEOUT = 600
START_TIMEOUT = 30


def blocks(language: str) -> list[str]:
    found = re.findall(r"^```(\w*)\n(.*?)^```", DOC.read_text(), flags=re.S | re.M)
    return [code for lang, code in found if lang == language]


def _run(argv: list[str], cwd: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        argv,
        capture_output=True,
        text=True,
        timeout=RUN_TIMEOUT,
        check=False,
        stdin=subprocess.DEVNULL,
        cwd=cwd,
    )


@contextmanager
def serve(args: list[str], socket: Path) -> Iterator[None]:
    """``python -m vhost serve ARGS --socket SOCKET`` until the block exits."""
    argv = [sys.executable, "-m", "vhost", "serve", *args, "--socket", str(socket)]
    with peers.spawn_peer("serve", argv, socket, timeout=START_TIMEOUT):
        yield


def test_every_block_is_run() -> None:
    python = blocks("python")
    assert len(python) == 2, python
    assert 'boot(Device("blk", "/tmp/my-blk.sock"))' in python[0]
    assert "def test_guest_reads_the_bytes_the_rng_device_produced" in python[1]
    sh = blocks("sh")
    assert len(sh) == 1 and "--device rng:/tmp/rng.sock" in sh[0], sh


def test_pytest_example_passes_with_the_installed_plugin(tmp_path: Path) -> None:
    (tmp_path / "test_example.py").write_text(blocks("python")[1])
    out = _run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider"], tmp_path)
    assert out.returncode == 0, out.stdout + out.stderr
    assert "1 passed" in out.stdout, out.stdout


def test_first_example_reads_the_disk_size(tmp_sock_dir: Path, tmp_path: Path) -> None:
    image = peers.make_image(tmp_path / "disk.img", 8 << 20)
    sock = tmp_sock_dir / "blk.sock"
    code = blocks("python")[0].replace("/tmp/my-blk.sock", str(sock))
    with serve(["blk", "--image", str(image)], sock):
        out = _run([sys.executable, "-c", code], tmp_path)
    assert out.returncode == 0, out.stderr
    assert out.stdout == f"0 {(8 << 20) // 512}\n\n", out.stdout  # status, then stdout


def test_cli_example_reads_hwrng(tmp_sock_dir: Path, tmp_path: Path) -> None:
    sock = tmp_sock_dir / "rng.sock"
    line = blocks("sh")[0].strip()
    assert line.startswith("python -m vhost.testing ")
    line = shlex.quote(sys.executable) + line.removeprefix("python").replace(
        "/tmp/rng.sock", str(sock)
    )
    with serve(["rng"], sock):
        out = _run(["sh", "-c", line], tmp_path)
    assert out.returncode == 0, out.stderr
    # od -tx1 of 16 bytes: one line of offset and 16 byte values, then the end offset.
    lines = out.stdout.splitlines()
    assert len(lines) == 2, out.stdout
    assert re.fullmatch(r"0000000( [0-9a-f]{2}){16}", lines[0]), out.stdout
    assert lines[1] == "0000020"
    assert len(set(lines[0].split()[1:])) > 4  # random bytes, not a constant fill
