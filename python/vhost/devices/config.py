"""Decoders of the device config space of the virtio device types ``vhost`` knows.

A back-end returns its device's config space as raw bytes (vhost-user ``GET_CONFIG``, vDPA
``VHOST_VDPA_GET_CONFIG``). :func:`decode_config` names the fields, following the layouts of
the VIRTIO specification (all multi-byte fields little-endian, as in virtio 1.x). It is used
by ``python -m vhost probe``, so it never raises on what a peer sent: a short buffer yields
only the fields it fully contains, extra bytes are ignored, a tag that is not UTF-8 is
decoded with replacement characters, and an unknown device type yields ``{}``.

Known device types: block, net, fs and vsock.
"""

from __future__ import annotations

import struct
from collections.abc import Callable
from typing import TypeAlias

from ..virtio import DeviceId

__all__ = ["ConfigValue", "decode_config"]

ConfigValue: TypeAlias = int | str | list[int]
"""The type of a decoded field: a number, a text (MAC address, file system tag), or a list."""

# (name, offset, struct code) of each fixed-size little-endian integer field.
_Field: TypeAlias = tuple[str, int, str]

_BLK_FIELDS: tuple[_Field, ...] = (
    ("capacity", 0, "Q"),
    ("size_max", 8, "I"),
    ("seg_max", 12, "I"),
    ("cylinders", 16, "H"),
    ("heads", 18, "B"),
    ("sectors", 19, "B"),
    ("blk_size", 20, "I"),
    ("physical_block_exp", 24, "B"),
    ("alignment_offset", 25, "B"),
    ("min_io_size", 26, "H"),
    ("opt_io_size", 28, "I"),
    ("writeback", 32, "B"),
    ("num_queues", 34, "H"),
    ("max_discard_sectors", 36, "I"),
    ("max_discard_seg", 40, "I"),
    ("discard_sector_alignment", 44, "I"),
    ("max_write_zeroes_sectors", 48, "I"),
    ("max_write_zeroes_seg", 52, "I"),
    ("write_zeroes_may_unmap", 56, "B"),
    ("max_secure_erase_sectors", 60, "I"),
    ("max_secure_erase_seg", 64, "I"),
    ("secure_erase_sector_alignment", 68, "I"),
    ("zone_sectors", 72, "I"),
    ("max_open_zones", 76, "I"),
    ("max_active_zones", 80, "I"),
    ("max_append_sectors", 84, "I"),
    ("write_granularity", 88, "I"),
    ("zoned_model", 92, "B"),
)
"""``struct virtio_blk_config``: geometry, topology and zoned characteristics flattened."""

_NET_FIELDS: tuple[_Field, ...] = (
    ("status", 6, "H"),
    ("max_virtqueue_pairs", 8, "H"),
    ("mtu", 10, "H"),
    ("speed", 12, "I"),
    ("duplex", 16, "B"),
    ("rss_max_key_size", 17, "B"),
    ("rss_max_indirection_table_length", 18, "H"),
    ("supported_hash_types", 20, "I"),
    ("supported_tunnel_types", 24, "I"),
)
"""``struct virtio_net_config`` after the 6-byte ``mac`` (decoded separately)."""

_NET_MAC_SIZE = 6

_FS_FIELDS: tuple[_Field, ...] = (
    ("num_request_queues", 36, "I"),
    ("notify_buf_size", 40, "I"),
)
"""``struct virtio_fs_config`` after the 36-byte ``tag`` (decoded separately)."""

_FS_TAG_SIZE = 36

_VSOCK_FIELDS: tuple[_Field, ...] = (("guest_cid", 0, "Q"),)
"""``struct virtio_vsock_config``."""


def _decode_fields(data: bytes, fields: tuple[_Field, ...], out: dict[str, ConfigValue]) -> None:
    for name, offset, code in fields:
        width = struct.calcsize(code)
        if offset + width <= len(data):
            (out[name],) = struct.unpack_from("<" + code, data, offset)


def _decode_blk(data: bytes) -> dict[str, ConfigValue]:
    out: dict[str, ConfigValue] = {}
    _decode_fields(data, _BLK_FIELDS, out)
    return out


def _decode_net(data: bytes) -> dict[str, ConfigValue]:
    out: dict[str, ConfigValue] = {}
    if len(data) >= _NET_MAC_SIZE:
        out["mac"] = ":".join(f"{octet:02x}" for octet in data[:_NET_MAC_SIZE])
    _decode_fields(data, _NET_FIELDS, out)
    return out


def _decode_fs(data: bytes) -> dict[str, ConfigValue]:
    out: dict[str, ConfigValue] = {}
    if len(data) >= _FS_TAG_SIZE:
        # NUL-padded UTF-8, not NUL-terminated when the tag fills all 36 bytes.
        raw_tag = data[:_FS_TAG_SIZE].split(b"\0", 1)[0]
        out["tag"] = raw_tag.decode("utf-8", errors="replace")
    _decode_fields(data, _FS_FIELDS, out)
    return out


def _decode_vsock(data: bytes) -> dict[str, ConfigValue]:
    out: dict[str, ConfigValue] = {}
    _decode_fields(data, _VSOCK_FIELDS, out)
    return out


_DECODERS: dict[int, Callable[[bytes], dict[str, ConfigValue]]] = {
    DeviceId.BLOCK: _decode_blk,
    DeviceId.NET: _decode_net,
    DeviceId.FS: _decode_fs,
    DeviceId.VSOCK: _decode_vsock,
}


def decode_config(device_id: int, data: bytes | bytearray | memoryview) -> dict[str, ConfigValue]:
    """Name the fields of a device config space, for the device types this module knows.

    ``device_id`` is a :class:`~vhost.virtio.DeviceId` (or its int value) and ``data`` the
    config space from offset 0. Only fields entirely inside ``data`` are returned, in
    layout order; an unknown device type gives ``{}``. Field names are the specification's;
    nested structures are flattened (virtio-blk ``geometry.cylinders`` is ``cylinders``,
    its ``zoned.model`` is ``zoned_model``). Reserved and padding fields are left out. The
    net ``mac`` is a ``"52:54:00:12:34:56"`` string and the fs ``tag`` a ``str``.
    """
    decoder = _DECODERS.get(int(device_id))
    if decoder is None:
        return {}
    return decoder(bytes(data))
