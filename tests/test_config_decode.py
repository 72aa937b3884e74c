"""Device config space decoders (``vhost.devices.config``) on hand-built byte layouts.

The layouts are built here with ``struct`` from the VIRTIO specification's field list, so
a wrong offset in the decoder shows up as a wrong value. Pure Python: runs without the
native module.
"""

from __future__ import annotations

import struct

import pytest
from hypothesis import given
from hypothesis import strategies as st

from vhost.devices.config import decode_config
from vhost.virtio import DeviceId


def _blk_config() -> bytes:
    """A full 96-byte ``struct virtio_blk_config`` with a distinct value in every field."""
    layout = "".join(
        [
            "<QII",  # capacity, size_max, seg_max
            "HBB",  # geometry
            "I",  # blk_size
            "BBHI",  # topology
            "BBH",  # writeback, unused0, num_queues
            "III",  # discard
            "II",  # write zeroes
            "B3x",  # write_zeroes_may_unmap, unused1
            "III",  # secure erase
            "IIIIIB3x",  # zoned characteristics
        ]
    )
    raw = struct.pack(
        layout,
        0x1_0000_0000,  # capacity
        0x10_0000,  # size_max
        126,  # seg_max
        1024,  # geometry.cylinders
        16,  # geometry.heads
        63,  # geometry.sectors
        4096,  # blk_size
        3,  # topology.physical_block_exp
        1,  # topology.alignment_offset
        8,  # topology.min_io_size
        256,  # topology.opt_io_size
        1,  # writeback
        0xEE,  # unused0 (must not be reported)
        4,  # num_queues
        0xFFFF,  # max_discard_sectors
        32,  # max_discard_seg
        8,  # discard_sector_alignment
        0x1_0000,  # max_write_zeroes_sectors
        16,  # max_write_zeroes_seg
        1,  # write_zeroes_may_unmap
        0x2_0000,  # max_secure_erase_sectors
        64,  # max_secure_erase_seg
        128,  # secure_erase_sector_alignment
        0x8_0000,  # zoned.zone_sectors
        14,  # zoned.max_open_zones
        15,  # zoned.max_active_zones
        0x400,  # zoned.max_append_sectors
        4096,  # zoned.write_granularity
        2,  # zoned.model
    )
    assert len(raw) == 96
    return raw


BLK_EXPECTED: dict[str, int] = {
    "capacity": 0x1_0000_0000,
    "size_max": 0x10_0000,
    "seg_max": 126,
    "cylinders": 1024,
    "heads": 16,
    "sectors": 63,
    "blk_size": 4096,
    "physical_block_exp": 3,
    "alignment_offset": 1,
    "min_io_size": 8,
    "opt_io_size": 256,
    "writeback": 1,
    "num_queues": 4,
    "max_discard_sectors": 0xFFFF,
    "max_discard_seg": 32,
    "discard_sector_alignment": 8,
    "max_write_zeroes_sectors": 0x1_0000,
    "max_write_zeroes_seg": 16,
    "write_zeroes_may_unmap": 1,
    "max_secure_erase_sectors": 0x2_0000,
    "max_secure_erase_seg": 64,
    "secure_erase_sector_alignment": 128,
    "zone_sectors": 0x8_0000,
    "max_open_zones": 14,
    "max_active_zones": 15,
    "max_append_sectors": 0x400,
    "write_granularity": 4096,
    "zoned_model": 2,
}

# Offset and width of each blk field, from the spec, to predict truncated decodes.
BLK_EXTENTS: dict[str, tuple[int, int]] = {
    "capacity": (0, 8),
    "size_max": (8, 4),
    "seg_max": (12, 4),
    "cylinders": (16, 2),
    "heads": (18, 1),
    "sectors": (19, 1),
    "blk_size": (20, 4),
    "physical_block_exp": (24, 1),
    "alignment_offset": (25, 1),
    "min_io_size": (26, 2),
    "opt_io_size": (28, 4),
    "writeback": (32, 1),
    "num_queues": (34, 2),
    "max_discard_sectors": (36, 4),
    "max_discard_seg": (40, 4),
    "discard_sector_alignment": (44, 4),
    "max_write_zeroes_sectors": (48, 4),
    "max_write_zeroes_seg": (52, 4),
    "write_zeroes_may_unmap": (56, 1),
    "max_secure_erase_sectors": (60, 4),
    "max_secure_erase_seg": (64, 4),
    "secure_erase_sector_alignment": (68, 4),
    "zone_sectors": (72, 4),
    "max_open_zones": (76, 4),
    "max_active_zones": (80, 4),
    "max_append_sectors": (84, 4),
    "write_granularity": (88, 4),
    "zoned_model": (92, 1),
}


def test_blk_full_config() -> None:
    decoded = decode_config(DeviceId.BLOCK, _blk_config())
    assert decoded == BLK_EXPECTED
    assert list(decoded) == list(BLK_EXPECTED), "fields come in layout order"
    assert "unused0" not in decoded


def test_blk_virtio_1_0_sized_config() -> None:
    # Older back-ends (QEMU's qemu-storage-daemon among them) report 60 bytes or fewer.
    decoded = decode_config(2, _blk_config()[:60])
    assert decoded["capacity"] == 0x1_0000_0000
    assert decoded["write_zeroes_may_unmap"] == 1
    assert "max_secure_erase_sectors" not in decoded


@pytest.mark.parametrize("length", range(97))
def test_blk_truncated_configs_give_only_complete_fields(length: int) -> None:
    decoded = decode_config(DeviceId.BLOCK, _blk_config()[:length])
    expected = {
        name: BLK_EXPECTED[name]
        for name, (offset, width) in BLK_EXTENTS.items()
        if offset + width <= length
    }
    assert decoded == expected


def test_blk_is_little_endian() -> None:
    decoded = decode_config(DeviceId.BLOCK, bytes([1, 2, 0, 0, 0, 0, 0, 0]))
    assert decoded == {"capacity": 0x0201}


def test_net_config() -> None:
    raw = struct.pack(
        "<6sHHHIBBHII",
        bytes([0x52, 0x54, 0x00, 0x12, 0x34, 0xAB]),
        1,  # status: LINK_UP
        8,  # max_virtqueue_pairs
        9000,  # mtu
        10000,  # speed
        1,  # duplex
        40,  # rss_max_key_size
        128,  # rss_max_indirection_table_length
        0x1FF,  # supported_hash_types
        0x3,  # supported_tunnel_types
    )
    assert len(raw) == 28
    assert decode_config(DeviceId.NET, raw) == {
        "mac": "52:54:00:12:34:ab",
        "status": 1,
        "max_virtqueue_pairs": 8,
        "mtu": 9000,
        "speed": 10000,
        "duplex": 1,
        "rss_max_key_size": 40,
        "rss_max_indirection_table_length": 128,
        "supported_hash_types": 0x1FF,
        "supported_tunnel_types": 0x3,
    }


def test_net_config_main_fields_only() -> None:
    raw = struct.pack("<6sHHH", b"\x02\x00\x00\x00\x00\x01", 0, 1, 1500)
    assert decode_config(DeviceId.NET, raw) == {
        "mac": "02:00:00:00:00:01",
        "status": 0,
        "max_virtqueue_pairs": 1,
        "mtu": 1500,
    }
    assert decode_config(DeviceId.NET, raw[:5]) == {}
    assert decode_config(DeviceId.NET, raw[:7]) == {"mac": "02:00:00:00:00:01"}


def test_fs_config() -> None:
    raw = struct.pack("<36sII", b"myfs", 2, 4096)
    assert decode_config(DeviceId.FS, raw) == {
        "tag": "myfs",
        "num_request_queues": 2,
        "notify_buf_size": 4096,
    }
    assert decode_config(DeviceId.FS, raw[:40]) == {"tag": "myfs", "num_request_queues": 2}
    assert decode_config(DeviceId.FS, raw[:35]) == {}


def test_fs_tag_filling_all_36_bytes_has_no_terminator() -> None:
    tag = "t" * 34 + "é"  # 36 bytes of UTF-8
    raw = tag.encode() + struct.pack("<I", 1)
    assert decode_config(DeviceId.FS, raw)["tag"] == tag


def test_fs_tag_stops_at_the_first_nul() -> None:
    raw = b"share\0garbage" + bytes(23) + struct.pack("<I", 1)
    assert decode_config(DeviceId.FS, raw)["tag"] == "share"


def test_fs_tag_that_is_not_utf8_does_not_raise() -> None:
    raw = b"ab\xff\xfecd" + bytes(30) + struct.pack("<I", 1)
    tag = decode_config(DeviceId.FS, raw)["tag"]
    assert isinstance(tag, str)
    assert tag.startswith("ab")
    assert tag.endswith("cd")
    assert "\ufffd" in tag


def test_vsock_config() -> None:
    assert decode_config(DeviceId.VSOCK, struct.pack("<Q", 3)) == {"guest_cid": 3}
    assert decode_config(DeviceId.VSOCK, struct.pack("<Q", 1 << 40)) == {"guest_cid": 1 << 40}
    assert decode_config(DeviceId.VSOCK, bytes(7)) == {}


@pytest.mark.parametrize("device_id", [0, DeviceId.CONSOLE, DeviceId.GPU, 0xFFFF, -1])
def test_unknown_devices_decode_to_nothing(device_id: int) -> None:
    assert decode_config(device_id, _blk_config()) == {}


def test_bytes_like_inputs() -> None:
    raw = struct.pack("<Q", 9)
    assert decode_config(DeviceId.VSOCK, bytearray(raw)) == {"guest_cid": 9}
    assert decode_config(DeviceId.VSOCK, memoryview(raw)) == {"guest_cid": 9}


def test_extra_bytes_are_ignored() -> None:
    assert decode_config(DeviceId.VSOCK, struct.pack("<Q", 5) + bytes(248)) == {"guest_cid": 5}


@given(
    device_id=st.sampled_from([DeviceId.BLOCK, DeviceId.NET, DeviceId.FS, DeviceId.VSOCK]),
    data=st.binary(max_size=300),
)
def test_decoding_hostile_bytes_never_raises(device_id: DeviceId, data: bytes) -> None:
    decoded = decode_config(device_id, data)
    for name, value in decoded.items():
        assert isinstance(name, str)
        assert isinstance(value, int | str | list)
