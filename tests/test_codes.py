"""Request codes, feature bits and virtio constants against the specifications; the
exception hierarchy of ``vhost.errors``.
"""

from __future__ import annotations

import errno
import pickle
import subprocess
import sys
from pathlib import Path

import pytest

from vhost import _core, codes, errors, virtio
from vhost.codes import (
    BackendRequest,
    FrontendRequest,
    MessageFlag,
    MigrationPhase,
    ProtocolFeature,
    TransferDirection,
)
from vhost.virtio import (
    BlkFeature,
    DeviceId,
    DeviceStatus,
    FsFeature,
    NetFeature,
    VirtioFeature,
    VsockFeature,
)

# ---------------------------------------------------------------------------------------
# vhost-user codes (QEMU docs/interop/vhost-user.rst and hw/virtio/vhost-user.c)
# ---------------------------------------------------------------------------------------

SPEC_FRONTEND_REQUESTS = {
    "GET_FEATURES": 1,
    "SET_FEATURES": 2,
    "SET_OWNER": 3,
    "RESET_OWNER": 4,
    "SET_MEM_TABLE": 5,
    "SET_LOG_BASE": 6,
    "SET_LOG_FD": 7,
    "SET_VRING_NUM": 8,
    "SET_VRING_ADDR": 9,
    "SET_VRING_BASE": 10,
    "GET_VRING_BASE": 11,
    "SET_VRING_KICK": 12,
    "SET_VRING_CALL": 13,
    "SET_VRING_ERR": 14,
    "GET_PROTOCOL_FEATURES": 15,
    "SET_PROTOCOL_FEATURES": 16,
    "GET_QUEUE_NUM": 17,
    "SET_VRING_ENABLE": 18,
    "SEND_RARP": 19,
    "NET_SET_MTU": 20,
    "SET_BACKEND_REQ_FD": 21,
    "IOTLB_MSG": 22,
    "SET_VRING_ENDIAN": 23,
    "GET_CONFIG": 24,
    "SET_CONFIG": 25,
    "CREATE_CRYPTO_SESSION": 26,
    "CLOSE_CRYPTO_SESSION": 27,
    "POSTCOPY_ADVISE": 28,
    "POSTCOPY_LISTEN": 29,
    "POSTCOPY_END": 30,
    "GET_INFLIGHT_FD": 31,
    "SET_INFLIGHT_FD": 32,
    "GPU_SET_SOCKET": 33,
    "RESET_DEVICE": 34,
    "VRING_KICK": 35,
    "GET_MAX_MEM_SLOTS": 36,
    "ADD_MEM_REG": 37,
    "REM_MEM_REG": 38,
    "SET_STATUS": 39,
    "GET_STATUS": 40,
    "GET_SHARED_OBJECT": 41,
    "SET_DEVICE_STATE_FD": 42,
    "CHECK_DEVICE_STATE": 43,
    "GET_SHMEM_CONFIG": 44,
    "GET_VRING_BASE_SKIP_DRAIN": 45,
}

SPEC_BACKEND_REQUESTS = {
    "IOTLB_MSG": 1,
    "CONFIG_CHANGE_MSG": 2,
    "VRING_HOST_NOTIFIER_MSG": 3,
    "VRING_CALL": 4,
    "VRING_ERR": 5,
    "SHARED_OBJECT_ADD": 6,
    "SHARED_OBJECT_REMOVE": 7,
    "SHARED_OBJECT_LOOKUP": 8,
    "SHMEM_MAP": 9,
    "SHMEM_UNMAP": 10,
}

SPEC_PROTOCOL_FEATURE_BITS = {
    "MQ": 0,
    "LOG_SHMFD": 1,
    "RARP": 2,
    "REPLY_ACK": 3,
    "MTU": 4,
    "BACKEND_REQ": 5,
    "CROSS_ENDIAN": 6,
    "CRYPTO_SESSION": 7,
    "PAGEFAULT": 8,
    "CONFIG": 9,
    "BACKEND_SEND_FD": 10,
    "HOST_NOTIFIER": 11,
    "INFLIGHT_SHMFD": 12,
    "RESET_DEVICE": 13,
    "INBAND_NOTIFICATIONS": 14,
    "CONFIGURE_MEM_SLOTS": 15,
    "STATUS": 16,
    "XEN_MMAP": 17,
    "SHARED_OBJECT": 18,
    "DEVICE_STATE": 19,
    "GET_VRING_BASE_INFLIGHT": 20,
    "GPA_ADDRESSES": 21,
    "SHMEM": 22,
    "GET_VRING_BASE_SKIP_DRAIN": 23,
}


def test_frontend_requests_match_the_spec_exactly() -> None:
    assert {m.name: m.value for m in FrontendRequest} == SPEC_FRONTEND_REQUESTS


def test_frontend_request_spot_values() -> None:
    assert FrontendRequest.GET_FEATURES.value == 1
    assert FrontendRequest.SET_VRING_KICK.value == 12
    assert FrontendRequest.SET_BACKEND_REQ_FD.value == 21
    assert FrontendRequest.GET_CONFIG.value == 24
    assert FrontendRequest.VRING_KICK.value == 35
    assert FrontendRequest.CHECK_DEVICE_STATE.value == 43
    assert FrontendRequest(37) is FrontendRequest.ADD_MEM_REG


def test_frontend_request_codes_are_contiguous() -> None:
    assert sorted(int(m) for m in FrontendRequest) == list(range(1, 46))


def test_backend_requests_match_the_spec_exactly() -> None:
    assert {m.name: m.value for m in BackendRequest} == SPEC_BACKEND_REQUESTS
    assert BackendRequest.IOTLB_MSG.value == 1
    assert BackendRequest.SHARED_OBJECT_LOOKUP.value == 8
    assert BackendRequest.SHMEM_MAP.value == 9
    assert BackendRequest.SHMEM_UNMAP.value == 10


def test_protocol_features_match_the_spec_exactly() -> None:
    assert {m.name: m.value for m in ProtocolFeature} == {
        name: 1 << bit for name, bit in SPEC_PROTOCOL_FEATURE_BITS.items()
    }


def test_protocol_feature_spot_values() -> None:
    assert ProtocolFeature.MQ.value == 0x1
    assert ProtocolFeature.REPLY_ACK.value == 0x8
    assert ProtocolFeature.BACKEND_REQ.value == 0x20
    assert ProtocolFeature.CONFIG.value == 0x200
    assert ProtocolFeature.CONFIGURE_MEM_SLOTS.value == 0x8000
    assert ProtocolFeature.SHARED_OBJECT.value == 0x4_0000
    assert ProtocolFeature.DEVICE_STATE.value == 0x8_0000
    assert ProtocolFeature.SHMEM.value == 1 << 22


def test_protocol_feature_alias_and_combination() -> None:
    assert ProtocolFeature["NET_MTU"] is ProtocolFeature.MTU
    combined = ProtocolFeature.MQ | ProtocolFeature.REPLY_ACK | ProtocolFeature.CONFIG
    assert int(combined) == 0x209
    assert ProtocolFeature.REPLY_ACK in combined
    assert ProtocolFeature.BACKEND_REQ not in combined
    # Bits the peer sends and we do not know survive the round trip.
    assert int(ProtocolFeature(combined | 1 << 40)) == 0x209 | 1 << 40


def test_header_constants() -> None:
    assert codes.VERSION == 1
    assert codes.VERSION_MASK == 0x3
    assert MessageFlag.REPLY.value == 0x4
    assert MessageFlag.NEED_REPLY.value == 0x8
    assert codes.VRING_IDX_MASK == 0xFF
    assert codes.VRING_NOFD_MASK == 0x100
    assert codes.VHOST_USER_F_PROTOCOL_FEATURES == 1 << 30
    assert codes.MAX_CONFIG_SIZE == 256
    assert codes.MAX_MSG_SIZE == 4096
    assert codes.MEMORY_BASELINE_NREGIONS == 8
    assert codes.MAX_MEM_TABLE_REGIONS == 32
    assert codes.MAX_SHMEM_REGIONS == 256
    assert codes.VHOST_LOG_PAGE == 4096


def test_device_state_enums() -> None:
    assert TransferDirection.SAVE.value == 0
    assert TransferDirection.LOAD.value == 1
    assert MigrationPhase.STOPPED.value == 0
    assert [m.name for m in MigrationPhase] == ["STOPPED"]


@pytest.mark.parametrize("code", [0, 46, 0xFFFF, 0xFFFFFFFF, -1])
def test_request_names_of_unassigned_codes_never_raise(code: int) -> None:
    assert codes.frontend_request_name(code) == f"UNKNOWN({code:#x})"
    with pytest.raises(ValueError):
        FrontendRequest(code)


def test_request_names_of_assigned_codes() -> None:
    assert codes.frontend_request_name(8) == "SET_VRING_NUM"
    assert codes.backend_request_name(2) == "CONFIG_CHANGE_MSG"
    assert codes.backend_request_name(11) == "UNKNOWN(0xb)"
    assert codes.backend_request_name(0) == "UNKNOWN(0x0)"


def test_python_codes_are_the_core_table() -> None:
    """The enums are written from the core's table (``scripts/gen_codes.py``): same names,
    codes and bits, front-end and back-end, and no member the core does not know."""
    table = _core.request_table()
    assert {m.name: int(m) for m in FrontendRequest} == {
        name: code for direction, code, name, *_ in table if direction == "frontend"
    }
    assert {m.name: int(m) for m in BackendRequest} == {
        name: code for direction, code, name, *_ in table if direction == "backend"
    }
    features = {m.name: int(m) for m in ProtocolFeature}
    assert features == {name: mask for name, mask, _ in _core.protocol_feature_table()}


def test_core_table_rows_describe_each_request() -> None:
    rows = {(row[0], row[2]): row for row in _core.request_table()}
    assert len(rows) == 45 + 10
    assert rows[("frontend", "SET_MEM_TABLE")][1:8] == (
        5,
        "SET_MEM_TABLE",
        None,
        "MemTable",
        "PerRegion",
        "Ack",
        False,
    )
    assert rows[("frontend", "GET_INFLIGHT_FD")][3:8] == (
        "INFLIGHT_SHMFD",
        "InflightDesc",
        "None",
        "Sized(24)",
        True,
    )
    assert rows[("frontend", "SET_VRING_KICK")][5] == "EventUnlessNofd"
    assert rows[("backend", "SHARED_OBJECT_LOOKUP")][6:8] == ("U64", True)
    assert all(row[8].strip() for row in rows.values()), "every request is documented"


def test_generated_codes_are_current() -> None:
    """What ``make lint`` runs: a stale ``codes.py`` (the table changed, the script was not
    run) fails."""
    script = Path(__file__).resolve().parent.parent / "scripts" / "gen_codes.py"
    done = subprocess.run(
        [sys.executable, str(script), "--check"],
        check=False,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == 0, done.stderr


# ---------------------------------------------------------------------------------------
# virtio (VIRTIO spec, linux/vhost_types.h for the vhost bits)
# ---------------------------------------------------------------------------------------


def test_virtio_transport_feature_bits() -> None:
    expected_bits = {
        "NOTIFY_ON_EMPTY": 24,
        "LOG_ALL": 26,
        "ANY_LAYOUT": 27,
        "RING_INDIRECT_DESC": 28,
        "RING_EVENT_IDX": 29,
        "PROTOCOL_FEATURES": 30,
        "VERSION_1": 32,
        "ACCESS_PLATFORM": 33,
        "RING_PACKED": 34,
        "IN_ORDER": 35,
        "ORDER_PLATFORM": 36,
        "SR_IOV": 37,
        "NOTIFICATION_DATA": 38,
        "NOTIF_CONFIG_DATA": 39,
        "RING_RESET": 40,
        "ADMIN_VQ": 41,
        "SUSPEND": 43,
    }
    assert {m.name: m.value for m in VirtioFeature} == {
        name: 1 << bit for name, bit in expected_bits.items()
    }
    assert VirtioFeature.PROTOCOL_FEATURES.value == codes.VHOST_USER_F_PROTOCOL_FEATURES


def test_virtio_feature_aliases() -> None:
    assert VirtioFeature["INDIRECT_DESC"] is VirtioFeature.RING_INDIRECT_DESC
    assert VirtioFeature["EVENT_IDX"] is VirtioFeature.RING_EVENT_IDX
    assert VirtioFeature["IOMMU_PLATFORM"] is VirtioFeature.ACCESS_PLATFORM


def test_device_ids() -> None:
    assert DeviceId.NET.value == 1
    assert DeviceId.BLOCK.value == 2
    assert DeviceId.CONSOLE.value == 3
    assert DeviceId.RNG.value == 4
    assert DeviceId.SCSI.value == 8
    assert DeviceId.GPU.value == 16
    assert DeviceId.INPUT.value == 18
    assert DeviceId.VSOCK.value == 19
    assert DeviceId.CRYPTO.value == 20
    assert DeviceId.SOUND.value == 25
    assert DeviceId.FS.value == 26
    assert DeviceId.GPIO.value == 41
    values = [int(m) for m in DeviceId]
    assert len(values) == len(set(values)), "no aliases among device ids"
    assert 0 not in values, "0 is the reserved invalid id"
    for unassigned in (14, 15, 37):
        assert unassigned not in values


def test_device_status_bits() -> None:
    assert {m.name: m.value for m in DeviceStatus} == {
        "ACKNOWLEDGE": 1,
        "DRIVER": 2,
        "DRIVER_OK": 4,
        "FEATURES_OK": 8,
        "SUSPEND": 16,
        "DEVICE_NEEDS_RESET": 64,
        "FAILED": 128,
    }


def test_blk_feature_bits() -> None:
    expected_bits = {
        "BARRIER": 0,
        "SIZE_MAX": 1,
        "SEG_MAX": 2,
        "GEOMETRY": 4,
        "RO": 5,
        "BLK_SIZE": 6,
        "SCSI": 7,
        "FLUSH": 9,
        "TOPOLOGY": 10,
        "CONFIG_WCE": 11,
        "MQ": 12,
        "DISCARD": 13,
        "WRITE_ZEROES": 14,
        "LIFETIME": 15,
        "SECURE_ERASE": 16,
        "ZONED": 17,
    }
    assert {m.name: m.value for m in BlkFeature} == {
        name: 1 << bit for name, bit in expected_bits.items()
    }


def test_net_feature_spot_bits() -> None:
    assert NetFeature.CSUM.value == 1 << 0
    assert NetFeature.MTU.value == 1 << 3
    assert NetFeature.MAC.value == 1 << 5
    assert NetFeature.MRG_RXBUF.value == 1 << 15
    assert NetFeature.STATUS.value == 1 << 16
    assert NetFeature.CTRL_VQ.value == 1 << 17
    assert NetFeature.MQ.value == 1 << 22
    assert NetFeature.CTRL_MAC_ADDR.value == 1 << 23
    assert NetFeature.RSS.value == 1 << 60
    assert NetFeature.SPEED_DUPLEX.value == 1 << 63


def test_other_device_feature_bits() -> None:
    assert FsFeature.NOTIFICATION.value == 1
    assert VsockFeature.STREAM.value == 1
    assert VsockFeature.SEQPACKET.value == 2
    assert VsockFeature.NO_IMPLIED_STREAM.value == 4


@pytest.mark.parametrize(
    "flag_type",
    [VirtioFeature, BlkFeature, NetFeature, FsFeature, VsockFeature, ProtocolFeature],
)
def test_feature_members_are_single_bits_in_a_u64(flag_type: type[int]) -> None:
    for member in flag_type:  # type: ignore[attr-defined]
        value = int(member)
        assert 0 < value < 1 << 64
        assert value & (value - 1) == 0, f"{member} is not a single bit"


def test_device_specific_bits_stay_below_the_transport_range() -> None:
    transport_low = 1 << 24
    for flag_type in (BlkFeature, FsFeature, VsockFeature):
        for member in flag_type:
            assert int(member) < transport_low
    for net_bit in NetFeature:
        assert int(net_bit) < transport_low or int(net_bit) >= 1 << 50


def test_virtio_module_exports() -> None:
    assert set(virtio.__all__) == {
        "BlkFeature",
        "DeviceId",
        "DeviceStatus",
        "FsFeature",
        "NetFeature",
        "VirtioFeature",
        "VsockFeature",
        # the device-type tables of probe and trace --device (tests/test_trace.py)
        "DEVICE_FEATURES",
        "DEVICE_NAMES",
        # the virtqueues (tests/test_virtqueue.py)
        "DescriptorChain",
        "DeviceQueue",
        "Virtqueue",
        "gpa_to_user",
        "place_rings",
        "ring_sizes",
        "setup_queue",
        "wait_used",
    }


# ---------------------------------------------------------------------------------------
# Exceptions
# ---------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("cls", "bases"),
    [
        (errors.ProtocolError, (errors.VhostError,)),
        (errors.PartialMessageError, (errors.ProtocolError,)),
        (errors.DisconnectedError, (errors.VhostError, ConnectionError, OSError)),
        (errors.InactiveFeatureError, (errors.VhostError,)),
        (errors.NotSupportedError, (errors.VhostError,)),
        (errors.RequestRefusedError, (errors.VhostError,)),
        (errors.InvalidParamError, (errors.VhostError, ValueError)),
        (errors.InvalidMemoryError, (errors.VhostError, ValueError)),
        (errors.InvalidQueueError, (errors.VhostError, ValueError)),
        (errors.KernelError, (errors.VhostError, OSError)),
        (errors.VhostTimeoutError, (errors.VhostError, TimeoutError, OSError)),
        (errors.ClosedError, (errors.VhostError,)),
    ],
)
def test_exception_hierarchy(cls: type[Exception], bases: tuple[type[Exception], ...]) -> None:
    for base in bases:
        assert issubclass(cls, base)
    assert issubclass(cls, errors.VhostError)


def test_blame_the_peer_errors_are_not_value_errors() -> None:
    for cls in (errors.ProtocolError, errors.PartialMessageError, errors.RequestRefusedError):
        assert not issubclass(cls, ValueError)


def test_every_public_exception_is_exported() -> None:
    exported = {getattr(errors, name) for name in errors.__all__}
    defined = {
        value
        for value in vars(errors).values()
        if isinstance(value, type)
        and issubclass(value, BaseException)
        and value.__module__ == errors.__name__
    }
    assert exported == defined


def test_kernel_error_is_built_like_oserror() -> None:
    exc = errors.KernelError(errno.EBUSY, "Device or resource busy", "/dev/vhost-net")
    assert exc.errno == errno.EBUSY
    assert exc.strerror == "Device or resource busy"
    assert exc.filename == "/dev/vhost-net"
    assert type(exc) is errors.KernelError, "no OSError subclass mapping for subclasses"
    with pytest.raises(OSError) as caught:
        raise errors.KernelError(errno.ENOBUFS, "No buffer space available")
    assert caught.value.errno == errno.ENOBUFS


def test_constructors_used_by_the_native_glue() -> None:
    # The Rust glue calls these classes positionally; keep the orders stable.
    inactive = errors.InactiveFeatureError("GET_CONFIG", "CONFIG", "custom message")
    assert (inactive.request, inactive.feature, str(inactive)) == (
        "GET_CONFIG",
        "CONFIG",
        "custom message",
    )
    refused = errors.RequestRefusedError("SET_MEM_TABLE", 1, "refused")
    assert (refused.request, refused.status, str(refused)) == ("SET_MEM_TABLE", 1, "refused")
    assert str(errors.ProtocolError("bad header")) == "bad header"
    assert errors.ProtocolError("bad header").request is None
    assert str(errors.DisconnectedError("peer disconnected")) == "peer disconnected"
    assert str(errors.VhostTimeoutError("timed out")) == "timed out"
    assert str(errors.InvalidMemoryError("outside")) == "outside"


def test_default_messages() -> None:
    assert str(errors.InactiveFeatureError("ADD_MEM_REG", "CONFIGURE_MEM_SLOTS")) == (
        "ADD_MEM_REG needs CONFIGURE_MEM_SLOTS, which was not negotiated"
    )
    assert "status 3" in str(errors.RequestRefusedError("SET_VRING_NUM", 3))


@pytest.mark.parametrize(
    "exc",
    [
        errors.VhostError("base"),
        errors.ProtocolError("bad size", "SET_VRING_NUM"),
        errors.PartialMessageError("eof in body", "SET_MEM_TABLE"),
        errors.DisconnectedError("peer disconnected"),
        errors.InactiveFeatureError("GET_CONFIG", "CONFIG"),
        errors.NotSupportedError("no", "GET_INFLIGHT_FD"),
        errors.RequestRefusedError("SET_VRING_ADDR", 1),
        errors.InvalidParamError("bad"),
        errors.InvalidMemoryError("outside every region", 0xDEAD000),
        errors.InvalidQueueError("no such queue", 256),
        errors.KernelError(errno.EINVAL, "Invalid argument"),
        errors.VhostTimeoutError("timed out"),
        errors.ClosedError("closed"),
    ],
    ids=lambda exc: type(exc).__name__,
)
def test_exceptions_pickle_with_their_attributes(exc: Exception) -> None:
    copy = pickle.loads(pickle.dumps(exc))
    assert type(copy) is type(exc)
    assert str(copy) == str(exc)
    assert copy.args == exc.args
    for attribute in ("request", "feature", "status", "address", "index", "errno", "strerror"):
        assert getattr(copy, attribute, None) == getattr(exc, attribute, None)
