"""docs/asyncio.md's examples, run as a reader would run them.

Every ```python block of the page runs as its own program: the front-end example against
``python -m vhost serve blk`` on a temporary socket (its ``/tmp/vhost-user-blk.sock``
replaced), the daemon example as it is but for its ``/tmp/fill.sock``; each must print
what its last line says. A block this file does not know fails
:func:`test_every_block_is_run`.
"""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest

import peers

pytestmark = pytest.mark.timeout(60)

DOC = Path(__file__).resolve().parent.parent / "docs" / "asyncio.md"


def blocks(language: str) -> list[str]:
    found = re.findall(r"^```(\w*)\n(.*?)^```", DOC.read_text(), flags=re.S | re.M)
    return [code for lang, code in found if lang == language]


def run_python(code: str) -> str:
    done = subprocess.run(
        [sys.executable, "-c", code],
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
        stdin=subprocess.DEVNULL,
    )
    assert done.returncode == 0, done.stderr
    return done.stdout


def test_every_block_is_run() -> None:
    assert len(blocks("python")) == 2
    assert len(blocks("sh")) == 1


def test_frontend_example(tmp_sock_dir: Path) -> None:
    (code, _) = blocks("python")
    (sh,) = blocks("sh")
    assert "/tmp/disk.img" in sh and "/tmp/vhost-user-blk.sock" in sh
    sock = tmp_sock_dir / "blk.sock"
    image = peers.make_image(tmp_sock_dir / "disk.img", 64 << 20)
    argv = [sys.executable, "-m", "vhost", "serve", "blk", "--socket", str(sock)]
    with peers.spawn_peer("serve", [*argv, "--image", str(image)], sock, timeout=30):
        out = run_python(code.replace("/tmp/vhost-user-blk.sock", str(sock)))
    assert out.splitlines() == ["capacity: 131072 sectors", "wrote and read back sector 8"]
    with open(image, "rb") as f:
        f.seek(8 * 512)
        assert f.read(18) == b"hello from asyncio"


def test_daemon_example(tmp_sock_dir: Path) -> None:
    (_, code) = blocks("python")
    out = run_python(code.replace("/tmp/fill.sock", str(tmp_sock_dir / "fill.sock")))
    assert out.splitlines() == [repr(b"*" * 16)]
