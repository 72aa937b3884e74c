"""``python -m vhost demo``: the README's main job moves real data through a virtqueue."""

from __future__ import annotations

import subprocess
import sys


def test_demo_moves_data_through_a_virtqueue() -> None:
    out = subprocess.run(
        [sys.executable, "-m", "vhost", "demo", "--message", "abc", "--message", "virtio"],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert out.returncode == 0, out.stderr
    lines = out.stdout.splitlines()
    assert any("3 bytes: 'ABC'" in line for line in lines), out.stdout
    assert any("6 bytes: 'VIRTIO'" in line for line in lines), out.stdout
    assert any("back-end popped chain" in line and "b'virtio'" in line for line in lines)
    assert "ring 0 stopped at index 2" in out.stdout
    # The embedded default: a RAM disk served by the daemon, checked block by block.
    assert out.stdout.count("bytes at offset") == 3, out.stdout
    assert "MISMATCH" not in out.stdout
    assert any(
        "daemon completed" in line and int(line.split()[-2]) >= 7 for line in lines
    ), out.stdout
