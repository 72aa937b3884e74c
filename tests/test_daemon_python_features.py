"""Python devices offer protocol features and see what the front-end acked (issue 10).

A :class:`vhost.daemon.Device` declares ``protocol_features`` (offered besides the
daemon's own) and gets :meth:`~vhost.daemon.Device.set_acked_features` and
:meth:`~vhost.daemon.Device.set_acked_protocol_features` when our
:class:`vhost.user.Frontend` negotiates; a device that raises in a hook has the exception
reported through :func:`sys.unraisablehook`, and the session goes on.
"""

from __future__ import annotations

import sys
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytest

from vhost import _core
from vhost.codes import ProtocolFeature as PF
from vhost.daemon import Daemon, Device
from vhost.user import Frontend
from vhost.virtio import VirtioFeature as VF

pytestmark = pytest.mark.timeout(60)

DEVICE_BITS = (1 << 0) | (1 << 5)


class Recorder(Device):
    """Offers two device bits and RARP (which the daemon does not offer by itself) and
    records every ack it is told about."""

    device_type = 42
    features = DEVICE_BITS
    protocol_features = int(PF.RARP)

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.acked: list[int] = []
        self.acked_protocol: list[int] = []

    def set_acked_features(self, features: int) -> None:
        with self.lock:
            self.acked.append(features)

    def set_acked_protocol_features(self, protocol_features: int) -> None:
        with self.lock:
            self.acked_protocol.append(protocol_features)

    def process(self, queue: int, batch: _core.Batch) -> None:
        for chain in batch.chains:
            batch.complete(chain, 0)


@contextmanager
def served(device: Device, sock_dir: Path) -> Iterator[Frontend]:
    with Daemon(device, sock_dir / "dev.sock") as daemon:
        with Frontend.connect(daemon.path) as fe:
            yield fe
        assert daemon.last_error is None, daemon.last_error


@pytest.mark.parametrize("device_bits", [DEVICE_BITS, 1 << 5, 0])
def test_device_sees_what_was_acked(tmp_sock_dir: Path, device_bits: int) -> None:
    dev = Recorder()
    with served(dev, tmp_sock_dir) as fe:
        offered = fe.get_features()
        assert offered & DEVICE_BITS == DEVICE_BITS
        offered_proto = fe.get_protocol_features()
        # The device's bit joins the daemon's own.
        assert offered_proto & PF.RARP
        assert offered_proto & PF.REPLY_ACK
        proto = int(PF.REPLY_ACK | PF.RARP | PF.MQ)
        acked, acked_proto = fe.negotiate(features=device_bits, protocol_features=proto)
        assert acked_proto == proto
        assert acked & DEVICE_BITS == device_bits
        # SET_FEATURES was acked (REPLY_ACK), so the hook has run by now.
        assert dev.acked_protocol == [proto]
        assert dev.acked == [acked]
        assert dev.acked[0] & int(VF.VERSION_1 | VF.PROTOCOL_FEATURES)
        # A later SET_FEATURES (say, turning dirty logging off) is told too.
        fe.set_features(acked & ~(1 << 0))
        assert dev.acked == [acked, acked & ~(1 << 0)]


def test_device_without_protocol_features_offers_the_daemons_own(tmp_sock_dir: Path) -> None:
    class Plain(Recorder):
        protocol_features = 0

    with served(Plain(), tmp_sock_dir) as fe:
        fe.get_features()
        proto = fe.get_protocol_features()
        assert not proto & PF.RARP
        assert proto & PF.CONFIGURE_MEM_SLOTS


def test_a_raising_hook_is_reported_and_the_session_goes_on(
    tmp_sock_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    class Raising(Recorder):
        def set_acked_protocol_features(self, protocol_features: int) -> None:
            raise RuntimeError(f"no thanks: {protocol_features:#x}")

    reported: list[Any] = []
    monkeypatch.setattr(sys, "unraisablehook", reported.append)
    dev = Raising()
    with served(dev, tmp_sock_dir) as fe:
        acked, _ = fe.negotiate(protocol_features=int(PF.REPLY_ACK))
        assert dev.acked == [acked]
        assert fe.get_features()
    assert len(reported) == 1
    assert "no thanks: 0x8" in str(reported[0].exc_value)
