"""``python -m vhost probe`` against real back-ends, checked by an independent client.

The probe runs as a subprocess, exactly as a user would run it. What it reports is
compared with what ``benches/pyclient.py`` (a front-end written from the spec with
socket + struct, sharing no code with ``vhost``) reads from the same peer.
"""

from __future__ import annotations

import json
import struct
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

import peers
import pyclient

pytestmark = pytest.mark.timeout(120)

IMAGE_SIZE = 96 << 20
VERSION_1 = 1 << 32
PROTOCOL_FEATURES = 1 << 30
BLK_CONFIG_SIZE = 60


def run_probe(*args: str | Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "vhost", "probe", *(str(a) for a in args)],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
        stdin=subprocess.DEVNULL,
    )


def probe_json(*args: str | Path) -> dict[str, Any]:
    out = run_probe(*args, "--json")
    assert out.returncode == 0, out.stderr
    info: dict[str, Any] = json.loads(out.stdout)
    return info


@pytest.mark.parametrize("num_queues", [1, 2])
def test_probe_qsd_blk_json(tmp_sock_dir: Path, num_queues: int) -> None:
    image = peers.make_image(tmp_sock_dir / "disk.img", IMAGE_SIZE)
    sock_path = tmp_sock_dir / "blk.sock"
    with peers.qemu_storage_daemon_blk(image, sock_path, num_queues=num_queues) as qsd:
        info = probe_json(sock_path)
        # qemu-storage-daemon takes the next front-end once the probe has gone
        with pyclient.connect(sock_path) as sock:
            features = pyclient.get_features(sock)
            protocol = pyclient.get_protocol_features(sock)
            wanted = protocol & (pyclient.PROTOCOL_F_MQ | pyclient.PROTOCOL_F_CONFIG)
            pyclient.set_protocol_features(sock, wanted)
            queue_num = pyclient.get_queue_num(sock)
            config = pyclient.get_config(sock, 0, BLK_CONFIG_SIZE)
        assert qsd.alive(), qsd.output()

    assert info["features"] == features
    assert info["protocol_features"] == protocol
    assert info["features"] & VERSION_1
    assert "VERSION_1" in info["feature_names"]
    assert "PROTOCOL_FEATURES" in info["feature_names"]
    assert "REPLY_ACK" in info["protocol_feature_names"]
    assert "CONFIG" in info["protocol_feature_names"]
    assert info["queue_num"] == queue_num == num_queues
    assert info["device"] == "blk"
    # qemu-storage-daemon's blk bits are named, not lumped into "unknown"
    assert "FLUSH" in info["feature_names"]
    assert not [n for n in info["feature_names"] if n.startswith("unknown")]

    raw = bytes.fromhex(info["config"])
    assert len(raw) == BLK_CONFIG_SIZE
    assert raw == config
    assert struct.unpack_from("<Q", raw)[0] == IMAGE_SIZE // 512
    decoded = info["config_decoded"]
    assert decoded["capacity"] == IMAGE_SIZE // 512
    assert decoded["num_queues"] == num_queues
    assert decoded["blk_size"] == 512
    if "CONFIGURE_MEM_SLOTS" in info["protocol_feature_names"]:
        assert isinstance(info["max_mem_slots"], int) and info["max_mem_slots"] > 0


def test_probe_qsd_blk_human(tmp_sock_dir: Path) -> None:
    image = peers.make_image(tmp_sock_dir / "disk.img", IMAGE_SIZE)
    sock_path = tmp_sock_dir / "blk.sock"
    with peers.qemu_storage_daemon_blk(image, sock_path, num_queues=2):
        out = run_probe(sock_path)
        with pyclient.connect(sock_path) as sock:
            features = pyclient.get_features(sock)
    assert out.returncode == 0, out.stderr
    text = out.stdout
    lines = text.splitlines()
    assert lines[0].split() == ["features:", f"{features:#018x}"]
    assert "VERSION_1" in lines[1].split()
    assert any(line.split() == ["queues:", "2"] for line in lines)
    assert any(line.split() == ["device:", "blk"] for line in lines)
    assert f"config ({BLK_CONFIG_SIZE} bytes):" in text
    assert any(line.split() == ["capacity:", str(IMAGE_SIZE // 512)] for line in lines)


def test_probe_device_option_overrides_guess(tmp_sock_dir: Path) -> None:
    """``--device net`` on a blk back-end: the probe asks for 12 bytes of config and
    decodes them as virtio-net, as told, but warns that the offered bits say otherwise
    (BLK_SIZE, bit 6, is virtio-blk's alone; virtio-net defined it only before 1.0)."""
    image = peers.make_image(tmp_sock_dir / "disk.img", IMAGE_SIZE)
    sock_path = tmp_sock_dir / "blk.sock"
    with peers.qemu_storage_daemon_blk(image, sock_path):
        out = run_probe(sock_path, "--device", "net", "--json")
    assert out.returncode == 0, out.stderr
    info = json.loads(out.stdout)
    assert info["device"] == "net"
    assert len(bytes.fromhex(info["config"])) == 12
    assert "config_decoded" in info
    assert out.stderr.startswith("warning: --device net contradicts the evidence: ")
    assert "its feature bits say it is blk" in out.stderr
    assert "bit(s) 6 (BLK_SIZE) are blk's alone" in out.stderr


def test_probe_unknown_device_asks_for_device(tmp_sock_dir: Path) -> None:
    """Our ``serve rng`` offers no device feature bits: nothing proves a type, so the
    probe says so instead of guessing; --socket works like the argument."""
    sock_path = tmp_sock_dir / "rng.sock"
    argv = [sys.executable, "-m", "vhost", "serve", "rng", "--socket", str(sock_path)]
    with peers.spawn_peer("serve-rng", argv, sock_path):
        out = run_probe("--socket", sock_path)
        info = probe_json(sock_path)
    assert out.returncode == 0, out.stderr
    assert "device:            unknown; pass --device blk|fs|net|vsock\n" in out.stdout
    assert "no device-specific feature bits are offered" in out.stdout
    assert info["device"] is None and "config_decoded" not in info


def test_probe_virtiofsd(tmp_sock_dir: Path) -> None:
    shared = tmp_sock_dir / "share"
    shared.mkdir()
    sock_path = tmp_sock_dir / "fs.sock"
    # virtiofsd serves one front-end and exits when it disconnects
    with peers.virtiofsd(shared, sock_path):
        info = probe_json(sock_path, "--device", "fs")
    assert info["features"] & VERSION_1
    assert info["features"] & PROTOCOL_FEATURES
    assert "VERSION_1" in info["feature_names"]
    assert info["device"] == "fs"
    assert "REPLY_ACK" in info["protocol_feature_names"]
    # one high-priority queue plus at least one request queue
    assert info["queue_num"] >= 2
    if "CONFIG" not in info["protocol_feature_names"]:
        assert info["config"] == ""

    with peers.virtiofsd(shared, sock_path):
        out = run_probe(sock_path)
    assert out.returncode == 0, out.stderr
    assert out.stdout.startswith("features:")
    assert "VERSION_1" in out.stdout
    assert f"{info['features']:#018x}" in out.stdout


def test_probe_missing_socket_fails(tmp_sock_dir: Path) -> None:
    sock = tmp_sock_dir / "nobody.sock"
    out = run_probe(sock)
    assert out.returncode == 1
    assert out.stderr == (
        f"error: connect to {sock}: No such file or directory (is the back-end running?)\n"
    )
    assert out.stdout == ""
