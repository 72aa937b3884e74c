"""The real peers work on this machine and speak vhost-user (no native module needed).

These tests check the test harness and the machine, through benches/pyclient.py
(a front-end written from the spec with socket + struct): if they fail, every
interop test that uses the same peers is suspect.
"""

from __future__ import annotations

import struct
from collections.abc import Callable
from pathlib import Path

import pytest

import peers
import pyclient

pytestmark = pytest.mark.timeout(120)

IMAGE_SIZE = 64 << 20


def test_qsd_blk_speaks_vhost_user(tmp_sock_dir: Path) -> None:
    image = peers.make_image(tmp_sock_dir / "disk.img", IMAGE_SIZE)
    sock_path = tmp_sock_dir / "blk.sock"
    with (
        peers.qemu_storage_daemon_blk(image, sock_path, num_queues=2) as qsd,
        pyclient.connect(sock_path) as sock,
    ):
        features = pyclient.get_features(sock)
        assert features & pyclient.VIRTIO_F_VERSION_1
        assert features & pyclient.VHOST_USER_F_PROTOCOL_FEATURES

        protocol = pyclient.get_protocol_features(sock)
        assert protocol & pyclient.PROTOCOL_F_CONFIG
        wanted = pyclient.PROTOCOL_F_CONFIG | pyclient.PROTOCOL_F_MQ | pyclient.PROTOCOL_F_REPLY_ACK
        pyclient.set_protocol_features(sock, protocol & wanted)

        if protocol & pyclient.PROTOCOL_F_MQ:
            assert pyclient.get_queue_num(sock) == 2

        # virtio-blk config space starts with le64 capacity in 512-byte sectors
        config = pyclient.get_config(sock, 0, 8)
        (capacity,) = struct.unpack("<Q", config)
        assert capacity == IMAGE_SIZE // 512

        if protocol & pyclient.PROTOCOL_F_REPLY_ACK:
            pyclient.set_vring_num_ack(sock, 0, 256)
        assert qsd.alive(), qsd.output()


def test_qsd_readonly_export_accepts_connection(tmp_sock_dir: Path) -> None:
    image = peers.make_image(tmp_sock_dir / "ro.img", 1 << 20, pattern=b"pyvhost")
    sock_path = tmp_sock_dir / "ro.sock"
    with (
        peers.qemu_storage_daemon_blk(image, sock_path, writable=False),
        pyclient.connect(sock_path) as sock,
    ):
        features = pyclient.get_features(sock)
        assert features & pyclient.VIRTIO_F_VERSION_1
        virtio_blk_f_ro = 1 << 5
        assert features & virtio_blk_f_ro


def test_qsd_round_trip_loop(tmp_sock_dir: Path) -> None:
    image = peers.make_image(tmp_sock_dir / "disk.img", IMAGE_SIZE)
    sock_path = tmp_sock_dir / "blk.sock"
    with (
        peers.qemu_storage_daemon_blk(image, sock_path),
        pyclient.connect(sock_path) as sock,
    ):
        neg = pyclient.negotiate(sock)
        timing = pyclient.round_trip_loop(sock, 200)
        assert timing.iterations == 200
        assert 0 < timing.median_ns <= timing.p99_ns
        if neg.protocol_features & pyclient.PROTOCOL_F_REPLY_ACK:
            assert pyclient.round_trip_loop(sock, 50, ack=True).iterations == 50


def test_peer_is_stopped_and_socket_removed(tmp_sock_dir: Path) -> None:
    image = peers.make_image(tmp_sock_dir / "disk.img", 1 << 20)
    sock_path = tmp_sock_dir / "blk.sock"
    with peers.qemu_storage_daemon_blk(image, sock_path) as qsd:
        assert sock_path.is_socket()
    assert not qsd.alive()
    assert not sock_path.exists()


def test_peer_that_dies_fails_loudly_with_its_output(tmp_sock_dir: Path) -> None:
    missing = tmp_sock_dir / "no-such-image.img"
    with (
        pytest.raises(pytest.fail.Exception, match=r"(?s)exited with status.*no-such-image"),
        peers.qemu_storage_daemon_blk(missing, tmp_sock_dir / "x.sock"),
    ):
        pass


def test_virtiofsd_speaks_vhost_user(tmp_sock_dir: Path) -> None:
    shared = tmp_sock_dir / "share"
    shared.mkdir()
    (shared / "hello.txt").write_text("hello\n")
    sock_path = tmp_sock_dir / "fs.sock"
    with peers.virtiofsd(shared, sock_path) as fsd:
        with pyclient.connect(sock_path) as sock:
            features = pyclient.get_features(sock)
            assert features & pyclient.VIRTIO_F_VERSION_1
            assert features & pyclient.VHOST_USER_F_PROTOCOL_FEATURES
            assert pyclient.get_protocol_features(sock) & pyclient.PROTOCOL_F_REPLY_ACK
        # virtiofsd serves a single front-end and exits when it goes away
        fsd.proc.wait(10)
        assert fsd.proc.returncode == 0, fsd.output()


def test_qemu_connects_to_our_socket_and_reaches_prelaunch(
    tmp_sock_dir: Path, fd_count: Callable[[], int]
) -> None:
    fds_before = fd_count()
    image = peers.make_image(tmp_sock_dir / "disk.img", IMAGE_SIZE)
    backend_path = tmp_sock_dir / "qsd.sock"
    our_path = tmp_sock_dir / "ours.sock"
    with (
        peers.qemu_storage_daemon_blk(image, backend_path),
        peers.VhostUserRelay(our_path, backend_path) as relay,
        peers.qemu_vhost_user_blk(our_path) as qemu,
    ):
        assert relay.accepted.wait(30), "QEMU never connected to our listening socket"
        status = qemu.query_status(timeout=60)
        assert status in ("prelaunch", "paused")
        assert qemu.peer.alive(), qemu.peer.output()
        assert relay.error is None, relay.error
        # QEMU ran the vhost-user handshake through our socket while realizing the device
        assert pyclient.GET_FEATURES in relay.requests
        assert pyclient.GET_CONFIG in relay.requests
    assert relay.error is None, relay.error
    assert fd_count() == fds_before
