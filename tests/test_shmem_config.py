"""``GET_SHMEM_CONFIG`` (front-end request 44, protocol feature ``SHMEM``), both sides.

- our :class:`vhost.user.Frontend` against our daemon serving a Python
  :class:`~vhost.daemon.Device` that declares shared memory regions (and one that does
  not: the daemon then does not offer ``SHMEM``);
- against a Python :class:`~vhost.user.BackendHandler`;
- a hostile back-end answering with a malformed reply (a count above 256 or not matching
  the sizes, a body of the wrong size): :class:`~vhost.errors.ProtocolError`, the
  connection closed at once;
- the request refused without the feature, on either side.
"""

from __future__ import annotations

import socket
import struct
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path

import pytest

import hostile
from hostile import U64, SessionThread
from test_adversarial_frontend import (
    OK_REPLY,
    HostileBackend,
    expect,
    play_negotiation,
    saw_eof,
    well_behaved,
)
from vhost import VhostError, _core
from vhost.codes import FrontendRequest as Req
from vhost.codes import ProtocolFeature as PF
from vhost.daemon import Daemon, Device
from vhost.errors import ClosedError, InactiveFeatureError, InvalidParamError, ProtocolError
from vhost.user import BackendHandler, BackendListener, Frontend, ShmemConfig

pytestmark = pytest.mark.timeout(60)

MiB = 1 << 20
FEATURES = (1 << 32) | (1 << 30)
SHMEM_BODY = struct.Struct("=II256Q")
REGIONS = {0: 2 * MiB, 5: 4096, 255: 64 * MiB}


class ShmemDevice(Device):
    """A device with three shared memory regions (it never gets requests here)."""

    device_type = 42
    shmem_regions: Mapping[int, int] = REGIONS

    def process(self, queue: int, batch: _core.Batch) -> None:
        for chain in batch.chains:
            batch.complete(chain, 0)


class PlainDevice(ShmemDevice):
    shmem_regions: Mapping[int, int] = {}


@contextmanager
def daemon_of(device: Device, sock_dir: Path) -> Iterator[Daemon]:
    with Daemon(device, sock_dir / "dev.sock") as daemon:
        yield daemon
    assert daemon.last_error is None, daemon.last_error


def test_daemon_offers_shmem_and_answers_the_sizes(tmp_sock_dir: Path) -> None:
    with daemon_of(ShmemDevice(), tmp_sock_dir) as daemon, Frontend.connect(daemon.path) as fe:
        fe.get_features()
        assert fe.get_protocol_features() & PF.SHMEM
        fe.negotiate(protocol_features=int(PF.SHMEM | PF.REPLY_ACK))
        assert fe.acked_protocol_features & PF.SHMEM
        cfg = fe.get_shmem_config()
        assert cfg == ShmemConfig(REGIONS)
        assert dict(cfg.regions) == REGIONS
        assert list(cfg.regions) == [0, 5, 255]
        # The session goes on: a second query answers the same.
        assert fe.get_shmem_config() == cfg
        assert fe.get_features()


def test_daemon_without_regions_does_not_offer_shmem(tmp_sock_dir: Path) -> None:
    with daemon_of(PlainDevice(), tmp_sock_dir) as daemon, Frontend.connect(daemon.path) as fe:
        fe.get_features()
        assert not fe.get_protocol_features() & PF.SHMEM
        fe.negotiate(protocol_features=int(PF.REPLY_ACK))
        # Refused here, before anything is sent: the connection stays usable.
        with pytest.raises(InactiveFeatureError, match="SHMEM"):
            fe.get_shmem_config()
        assert not fe.broken
        assert fe.get_features()


@pytest.mark.parametrize(
    ("regions", "match"),
    [({256: 4096}, "0 to 255"), ({1: 0}, "size 0"), ({1: 4097}, "page size"), ({-1: 4096}, "0 to")],
)
def test_daemon_refuses_a_bad_declaration(
    tmp_sock_dir: Path, regions: dict[int, int], match: str
) -> None:
    dev = PlainDevice()
    dev.shmem_regions = regions
    with pytest.raises(InvalidParamError, match=match) as err:
        Daemon(dev, tmp_sock_dir / "dev.sock")
    assert "PlainDevice.shmem_regions" in str(err.value)


# -- a Python BackendHandler -------------------------------------------------------------


class Handler(BackendHandler):
    def __init__(self, regions: Mapping[int, int] | None, proto: int = int(PF.SHMEM)) -> None:
        self.regions = regions
        self.proto = proto | int(PF.REPLY_ACK)
        self.errors: list[BaseException] = []

    def get_features(self) -> int:
        return FEATURES

    def get_protocol_features(self) -> int:
        return self.proto

    def get_vring_base(self, index: int) -> int:
        return 0

    def get_shmem_config(self) -> Mapping[int, int]:
        if self.regions is None:
            return super().get_shmem_config()
        return self.regions

    def on_request_error(self, error: BaseException) -> None:
        self.errors.append(error)


def start(listener: BackendListener, handler: BackendHandler) -> SessionThread:
    return SessionThread(lambda: listener.accept(10.0), handler)


@pytest.fixture
def listener(tmp_sock_dir: Path) -> Iterator[BackendListener]:
    with BackendListener(tmp_sock_dir / "be.sock") as lst:
        yield lst


def test_python_backend_handler_answers(listener: BackendListener) -> None:
    st = start(listener, Handler({3: 8 * MiB}))
    with Frontend.connect(listener.path) as fe:
        fe.negotiate(protocol_features=int(PF.SHMEM | PF.REPLY_ACK))
        assert fe.get_shmem_config() == ShmemConfig({3: 8 * MiB})
    assert st.join() is None


@pytest.mark.parametrize(
    ("regions", "why"),
    [({1: 0}, "region 1 has size 0"), ({300: 4096}, "out of range"), (None, "GET_SHMEM_CONFIG")],
)
def test_python_handler_failure_closes_the_connection(
    listener: BackendListener, regions: Mapping[int, int] | None, why: str
) -> None:
    """A handler that cannot answer (a size 0, an id past 255, not implemented): the
    request has a reply of its own and cannot say "failed", so the connection closes and
    our front-end sees it; nothing is sent that could pass for a configuration."""
    st = start(listener, Handler(regions))
    with Frontend.connect(listener.path, timeout=5.0) as fe:
        fe.negotiate(protocol_features=int(PF.SHMEM | PF.REPLY_ACK))
        with pytest.raises(VhostError) as err:
            fe.get_shmem_config()
        assert not isinstance(err.value, InvalidParamError)
        assert fe.broken
    # The session ends with the handler's own failure.
    assert why in str(st.join())


def test_backend_refuses_the_request_without_the_feature(listener: BackendListener) -> None:
    """A raw GET_SHMEM_CONFIG before SHMEM was negotiated closes the session with
    InactiveFeatureError; the handler is never asked."""
    asked: list[bool] = []

    class Counting(Handler):
        def get_shmem_config(self) -> Mapping[int, int]:
            asked.append(True)
            return {0: 4096}

    st = start(listener, Counting({0: 4096}))
    with hostile.connect(listener.path) as s:
        hostile.send(s, hostile.message(Req.GET_FEATURES))
        assert hostile.recv_message(s) is not None
        hostile.send(s, hostile.message(Req.GET_SHMEM_CONFIG))
        assert hostile.sees_eof(s)
    assert isinstance(st.join(), InactiveFeatureError)
    assert asked == []


# -- a hostile back-end --------------------------------------------------------------------


def shmem_reply(count: int, sizes: Mapping[int, int], *, extra: bytes = b"") -> bytes:
    table = [0] * 256
    for shmid, size in sizes.items():
        table[shmid] = size
    body = SHMEM_BODY.pack(count, 0, *table) + extra
    return hostile.message(Req.GET_SHMEM_CONFIG, body, flags=OK_REPLY)


BAD = {
    "count-257": shmem_reply(257, {0: 4096}),
    "count-0xffffffff": shmem_reply(0xFFFFFFFF, {0: 4096}),
    "count-is-a-prefix-length": shmem_reply(6, {1: 4096, 5: 4096}),
    "count-2-one-size": shmem_reply(2, {0: 4096}),
    "body-8-bytes-longer": shmem_reply(1, {0: 4096}, extra=bytes(8)),
    "body-of-a-u64": hostile.message(Req.GET_SHMEM_CONFIG, U64.pack(1), flags=OK_REPLY),
}


@pytest.mark.parametrize("data", BAD.values(), ids=list(BAD))
def test_malformed_reply_is_a_protocol_error(tmp_sock_dir: Path, data: bytes) -> None:
    path = tmp_sock_dir / "hostile.sock"
    base = hostile.fd_count()

    def script(hb: HostileBackend, conn: socket.socket) -> None:
        play_negotiation(conn, int(PF.SHMEM | PF.REPLY_ACK))
        expect(conn, Req.GET_SHMEM_CONFIG)
        hostile.send(conn, data)
        saw_eof(hb, conn)

    hb = HostileBackend(path, script)
    with Frontend.connect(path, timeout=5.0) as fe:
        fe.negotiate(protocol_features=int(PF.SHMEM | PF.REPLY_ACK))
        with pytest.raises(ProtocolError, match=r"GET_SHMEM_CONFIG|shared memory"):
            fe.get_shmem_config()
        # Closed by us at once (the hostile side sees EOF), and unusable from now on.
        assert fe.broken and hb.event("peer-eof").wait(5)
        with pytest.raises(ClosedError):
            fe.get_shmem_config()
    hb.finish_hostile()
    well_behaved(hb)
    assert hostile.settle_fds(base) == base


def test_well_formed_reply_from_a_raw_back_end(tmp_sock_dir: Path) -> None:
    """The wire layout itself: u32 count of non-zero sizes, u32 padding, 256 u64 by shmid."""
    path = tmp_sock_dir / "raw.sock"

    def script(hb: HostileBackend, conn: socket.socket) -> None:
        play_negotiation(conn, int(PF.SHMEM | PF.REPLY_ACK))
        m = expect(conn, Req.GET_SHMEM_CONFIG)
        assert m.body == b""
        hostile.send(conn, shmem_reply(2, {1: 4096, 200: 2 * MiB}))
        saw_eof(hb, conn)

    hb = HostileBackend(path, script)
    with Frontend.connect(path, timeout=5.0) as fe:
        fe.negotiate(protocol_features=int(PF.SHMEM | PF.REPLY_ACK))
        assert fe.get_shmem_config() == ShmemConfig({1: 4096, 200: 2 * MiB})
    hb.finish_hostile()
    well_behaved(hb)


def test_shmem_config_value_checks_itself() -> None:
    assert ShmemConfig({2: 1, 1: 2}).regions == {1: 2, 2: 1}
    assert hash(ShmemConfig({1: 2})) == hash(ShmemConfig({1: 2}))
    with pytest.raises(InvalidParamError):
        ShmemConfig({256: 4096})
    with pytest.raises(InvalidParamError):
        ShmemConfig({0: 0})
