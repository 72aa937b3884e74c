"""``Frontend.negotiate()`` acks only what this package implements and what the caller's
rings allow, and ``setup_queue()`` refuses a ring that does not match what was acked
(issue 9). Peers: our own virtio-blk daemon (it offers ``RING_PACKED`` and
``INFLIGHT_SHMFD``), qemu-storage-daemon (it offers no packed rings), and a raw back-end
that offers every bit there is (in ``test_adversarial_frontend.py``)."""

from __future__ import annotations

import struct
from collections.abc import Iterator
from pathlib import Path

import pytest

import peers
from vhost import EventFd, GuestMemory, _core
from vhost.codes import ProtocolFeature as PF
from vhost.daemon import BlkDevice, Daemon
from vhost.errors import (
    InvalidParamError,
    InvalidQueueError,
    NotSupportedError,
    VhostTimeoutError,
)
from vhost.user import Frontend, regions_of
from vhost.virtio import VirtioFeature, Virtqueue, place_rings, setup_queue, wait_used

PACKED = int(VirtioFeature.RING_PACKED)
EVENT_IDX = int(VirtioFeature.RING_EVENT_IDX)


@pytest.fixture
def ours(tmp_sock_dir: Path) -> Iterator[Path]:
    """Our native virtio-blk back-end, which offers packed rings and EVENT_IDX."""
    sock = tmp_sock_dir / "blk.sock"
    with Daemon(BlkDevice.ram(1 << 20), sock):
        yield sock


def test_default_acks_a_split_ring_with_event_idx_and_no_inflight_area(ours: Path) -> None:
    with Frontend.connect(ours, timeout=5.0) as fe:
        offered = fe.get_features()
        assert offered & PACKED and offered & EVENT_IDX  # the daemon offers both
        features, proto = fe.negotiate()
        assert not features & PACKED  # was acked before issue 9: the ring is split
        assert features & EVENT_IDX
        assert features == fe.acked_features
        offered_proto = fe.get_protocol_features()
        assert offered_proto & PF.INFLIGHT_SHMFD
        assert not proto & PF.INFLIGHT_SHMFD
        assert proto == offered_proto & Frontend.DEFAULT_PROTOCOL_FEATURES


@pytest.mark.parametrize(("packed", "event_idx"), [(True, True), (True, False), (False, False)])
def test_ring_format_and_event_idx_follow_the_typed_parameters(
    ours: Path, packed: bool, event_idx: bool
) -> None:
    with Frontend.connect(ours, timeout=5.0) as fe:
        features, _ = fe.negotiate(packed=packed, event_idx=event_idx)
        assert bool(features & PACKED) == packed
        assert bool(features & EVENT_IDX) == event_idx
        # A ring built as negotiated is accepted, and I/O-ready.
        ram = GuestMemory.allocate([(0, 1 << 20)])
        fe.set_mem_table(regions_of(ram))
        vq = Virtqueue(
            ram, 64, *place_rings(0x1000, 64, packed), packed=packed, event_idx=event_idx
        )
        with EventFd() as kick, EventFd() as call:
            setup_queue(fe, 0, ram, vq, kick, call)


def test_inflight_area_is_acked_when_asked_for(ours: Path) -> None:
    with Frontend.connect(ours, timeout=5.0) as fe:
        _, proto = fe.negotiate(
            protocol_features=Frontend.DEFAULT_PROTOCOL_FEATURES | PF.INFLIGHT_SHMFD
        )
        assert proto & PF.INFLIGHT_SHMFD
        info = fe.get_inflight_fd(1, 64)
        with info.fd:
            assert info.mmap_size > 0


def test_unimplemented_protocol_features_are_refused_before_anything_is_sent(
    ours: Path,
) -> None:
    with Frontend.connect(ours, timeout=5.0) as fe:
        for bits, name in (
            (PF.GPA_ADDRESSES, "GPA_ADDRESSES"),
            (PF.XEN_MMAP | PF.REPLY_ACK, "XEN_MMAP"),
            (1 << 40, "bit 40"),
        ):
            with pytest.raises(InvalidParamError, match=f"protocol features {name} are not"):
                fe.negotiate(protocol_features=int(bits))
        assert fe.acked_features == 0  # nothing was negotiated
        features, _ = fe.negotiate()
        assert features & VirtioFeature.VERSION_1


def test_packed_mask_contradiction_is_a_caller_error(ours: Path) -> None:
    with (
        Frontend.connect(ours, timeout=5.0) as fe,
        pytest.raises(InvalidParamError, match="excludes VIRTIO_F_RING_PACKED"),
    ):
        fe.negotiate(features=~PACKED, packed=True)


def test_packed_ring_on_a_backend_without_one_is_not_supported(tmp_sock_dir: Path) -> None:
    image = peers.make_image(tmp_sock_dir / "disk.img", 1 << 20)
    sock = tmp_sock_dir / "qsd.sock"
    with peers.qemu_storage_daemon_blk(image, sock), Frontend.connect(sock, timeout=5.0) as fe:
        with pytest.raises(NotSupportedError, match="does not offer VIRTIO_F_RING_PACKED"):
            fe.negotiate(packed=True)
        assert not fe.broken


# -- setup_queue() against what was acked ------------------------------------------------

# name: (negotiated packed, event_idx), (ring packed, event_idx), the error's words
MISMATCHES = {
    "packed-ring-split-negotiation": ((False, True), (True, True), "ring is packed but"),
    "split-ring-packed-negotiation": ((True, True), (False, True), "ring is split but"),
    "event-idx-ring-no-event-idx": ((False, False), (False, True), "ring uses EVENT_IDX but"),
    "plain-ring-with-event-idx": ((False, True), (False, False), "ring has no EVENT_IDX but"),
}


@pytest.mark.parametrize("case", MISMATCHES.values(), ids=list(MISMATCHES))
def test_setup_queue_refuses_a_ring_that_does_not_match_the_acked_features(
    ours: Path, case: tuple[tuple[bool, bool], tuple[bool, bool], str]
) -> None:
    (neg_packed, neg_event_idx), (packed, event_idx), words = case
    with Frontend.connect(ours, timeout=5.0) as fe:
        fe.negotiate(packed=neg_packed, event_idx=neg_event_idx)
        ram = GuestMemory.allocate([(0, 1 << 20)])
        fe.set_mem_table(regions_of(ram))
        rings = place_rings(0x1000, 64, packed)
        vq = Virtqueue(ram, 64, *rings, packed=packed, event_idx=event_idx)
        with EventFd() as kick, EventFd() as call:
            with pytest.raises(InvalidQueueError, match=f"queue 0: the {words}") as raised:
                setup_queue(fe, 0, ram, vq, kick, call)
            assert raised.value.index == 0
            del raised  # its traceback would keep this frame's fds alive until a gc
            # Nothing reached the back-end: the right ring still sets up on queue 0.
            assert not fe.broken
            rings = place_rings(0x1000, 64, neg_packed)
            good = Virtqueue(ram, 64, *rings, packed=neg_packed, event_idx=neg_event_idx)
            setup_queue(fe, 0, ram, good, kick, call)


def test_setup_queue_checks_the_format_of_a_ring_given_as_addresses(ours: Path) -> None:
    with Frontend.connect(ours, timeout=5.0) as fe:
        fe.negotiate()
        ram = GuestMemory.allocate([(0, 1 << 20)])
        fe.set_mem_table(regions_of(ram))
        ring = (64, *place_rings(0x1000, 64, True))
        with (
            EventFd() as kick,
            EventFd() as call,
            pytest.raises(InvalidQueueError, match="queue 1: the ring is packed"),
        ):
            setup_queue(fe, 1, ram, ring, kick, call, packed=True)


# -- wait_used(): what the README's example waits with ------------------------------------


def test_wait_used_looks_past_a_call_that_came_for_nothing(ours: Path) -> None:
    with Frontend.connect(ours, timeout=5.0) as fe:
        features, _ = fe.negotiate()
        ram = GuestMemory.allocate([(0, 1 << 20)])
        fe.set_mem_table(regions_of(ram))
        vq = Virtqueue(
            ram, 64, *place_rings(0x1000, 64), event_idx=bool(features & VirtioFeature.EVENT_IDX)
        )
        with EventFd() as kick, EventFd() as call:
            setup_queue(fe, 0, ram, vq, kick, call)
            call.write(1)  # a call for nothing, as back-ends send at set-up
            # The naive wait: the call is there, the used ring is empty.
            assert call.wait(5.0)
            call.read()
            assert vq.poll_used() == []
            ram.write(0x10000, struct.pack("<IIQ", 0, 0, 0))  # VIRTIO_BLK_T_IN, sector 0
            head = vq.add([(0x10000, 16)], [(0x11000, 512), (0x12000, 1)])
            call.write(1)  # and another one before the real completion
            vq.publish()
            kick.write(1)
            assert wait_used(vq, call, timeout=10.0) == [(head, 513)]
            assert ram.read(0x12000, 1) == b"\0"
            with pytest.raises(VhostTimeoutError, match="none of the 0 buffers in flight"):
                wait_used(vq, call, timeout=0.2)


# -- one rule, in the core (issue 11) -------------------------------------------------------


def test_the_facade_is_the_core_negotiate(ours: Path) -> None:
    """The facade's constants and results are the native ``Frontend.negotiate``'s: the
    rule lives in the core, and ``vhost.user`` and ``probe`` only call it."""
    assert int(Frontend.IMPLEMENTED_PROTOCOL_FEATURES) == (
        _core.Frontend.IMPLEMENTED_PROTOCOL_FEATURES
    )
    assert int(Frontend.DEFAULT_PROTOCOL_FEATURES) == _core.Frontend.DEFAULT_PROTOCOL_FEATURES
    for kwargs in ({}, {"packed": True, "event_idx": False}):
        with Frontend.connect(ours, timeout=5.0) as fe:
            typed = fe.negotiate(**kwargs)
        with Frontend.connect(ours, timeout=5.0) as raw:
            native = raw.native.negotiate(**kwargs)
        assert (typed[0], int(typed[1])) == native
        assert isinstance(typed[1], PF)


def test_a_feature_the_backend_does_not_offer_is_named_with_its_request(
    tmp_sock_dir: Path,
) -> None:
    image = peers.make_image(tmp_sock_dir / "disk.img", 1 << 20)
    sock = tmp_sock_dir / "qsd.sock"
    with peers.qemu_storage_daemon_blk(image, sock), Frontend.connect(sock, timeout=5.0) as fe:
        for kwargs, feature in (
            ({"packed": True}, "VIRTIO_F_RING_PACKED"),
            ({"log_all": True}, "VHOST_F_LOG_ALL"),
        ):
            offered = fe.get_features()
            if feature == "VHOST_F_LOG_ALL" and offered & VirtioFeature.LOG_ALL:
                continue  # this qemu-storage-daemon logs: nothing to refuse
            # Straight from the glue too: the core names the feature, not the facade.
            for call in (fe.negotiate, fe.native.negotiate):
                with pytest.raises(NotSupportedError) as raised:
                    call(**kwargs)
                assert raised.value.request == "SET_FEATURES"
                assert f"does not offer {feature} (offered {offered:#x})" in str(raised.value)
                del raised
        assert not fe.broken
        assert fe.acked_features == 0  # refused before SET_OWNER and SET_FEATURES


def test_native_negotiate_refuses_bad_masks_as_invalid_params(ours: Path) -> None:
    with Frontend.connect(ours, timeout=5.0) as fe:
        with pytest.raises(InvalidParamError, match="protocol features GPA_ADDRESSES are not"):
            fe.native.negotiate(None, int(PF.GPA_ADDRESSES))
        with pytest.raises(InvalidParamError, match="excludes VIRTIO_F_RING_PACKED"):
            fe.native.negotiate(0, None, packed=True)
        with pytest.raises(InvalidParamError, match=r"^negotiate: features: -1 is out of range"):
            fe.native.negotiate(-1)
        with pytest.raises(
            InvalidParamError, match=r"^negotiate: protocol_features: -4097 is out of range"
        ):
            fe.negotiate(protocol_features=~int(PF.INFLIGHT_SHMFD))
        assert fe.get_features()  # nothing was sent before the refusals
