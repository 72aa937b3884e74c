"""``python -m vhost probe`` against DPDK's vhost-user *net* back-end (testpmd with the
vhost PMD): the device type is named only from unambiguous evidence.

testpmd offers feature bits 9, 10 and 13, which are virtio-net's GUEST_ECN, GUEST_UFO and
HOST_ECN but would read as virtio-blk's FLUSH, TOPOLOGY and DISCARD; the probe once took
them as proof of a block device and decoded every bit with block names. What testpmd
offers is checked against ``benches/pyclient.py`` (a front-end from the spec that shares
no code with ``vhost``).
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

import peers
import pyclient
from test_probe import run_probe as probe

pytestmark = pytest.mark.timeout(120)

NET_ONLY_BITS = {3: "MTU", 18: "CTRL_RX", 22: "MQ"}
"""Bits testpmd offers that only virtio-net defines (virtio-blk leaves them undefined)."""
BLK_BITS = {0, 1, 2, 4, 5, 6, 7, 9, 10, 11, 12, 13, 14, 15, 16, 17}
"""The device feature bits below 24 the virtio spec (1.3) defines for virtio-blk."""


@pytest.fixture
def testpmd(tmp_sock_dir: Path) -> Iterator[Path]:
    sock = tmp_sock_dir / "net.sock"
    with peers.dpdk_testpmd_net(sock) as peer:
        yield sock
        assert peer.alive(), peer.output()


def test_probe_names_testpmd_a_net_device(testpmd: Path) -> None:
    out = probe(testpmd, "--json")
    assert out.returncode == 0, out.stderr
    assert out.stderr == ""
    info: dict[str, Any] = json.loads(out.stdout)
    with pyclient.connect(testpmd) as sock:
        features = pyclient.get_features(sock)
        protocol = pyclient.get_protocol_features(sock)
    assert info["features"] == features
    assert info["protocol_features"] == protocol
    for bit, name in NET_ONLY_BITS.items():
        assert features >> bit & 1, f"testpmd no longer offers bit {bit}"
        assert name in info["feature_names"]
    # The bits that read as virtio-blk's are decoded as what they are here.
    assert info["device"] == "net"
    assert {"GUEST_ECN", "HOST_ECN", "MRG_RXBUF", "CTRL_VQ"} <= set(info["feature_names"])
    assert not {"FLUSH", "TOPOLOGY", "DISCARD", "SEG_MAX", "BLK_SIZE"} & set(info["feature_names"])
    assert any("only net defines every offered device bit" in e for e in info["device_evidence"])


def test_probe_human_output_and_socket_option(testpmd: Path) -> None:
    out = probe("--socket", testpmd)
    assert out.returncode == 0, out.stderr
    lines = out.stdout.splitlines()
    assert any(line.split() == ["device:", "net"] for line in lines), out.stdout
    assert "FLUSH" not in out.stdout and "CTRL_RX" in out.stdout


def test_device_option_that_the_bits_contradict_warns(testpmd: Path) -> None:
    out = probe(testpmd, "--device", "blk", "--json")
    assert out.returncode == 0, out.stderr
    info = json.loads(out.stdout)
    assert info["device"] == "blk"  # obeyed, as asked
    foreign = [b for b in range(24) if info["features"] >> b & 1 and b not in BLK_BITS]
    assert set(NET_ONLY_BITS) <= set(foreign)
    warning = (
        "warning: --device blk contradicts the evidence: the back-end offers device feature "
        f"bit(s) {', '.join(map(str, foreign))}, which blk does not define\n"
    )
    assert out.stderr == warning
    assert info["warnings"] == [warning.removeprefix("warning: ").rstrip("\n")]
