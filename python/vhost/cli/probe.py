"""``probe SOCKET``: connect to any vhost-user back-end as a front-end and report what it
offers: features, protocol features, queue count, memory slots and config space."""

from __future__ import annotations

import argparse
import json
from typing import Any

from ..codes import ProtocolFeature
from ..devices.config import decode_config
from ..errors import VhostError
from ..user import Frontend
from ..virtio import BlkFeature, DeviceId, FsFeature, NetFeature, VirtioFeature, VsockFeature

#: Config-space sizes of the device types we decode.
CONFIG_SIZES = {DeviceId.BLOCK: 60, DeviceId.NET: 12, DeviceId.FS: 44, DeviceId.VSOCK: 8}
DEVICE_NAMES = {
    "blk": DeviceId.BLOCK,
    "net": DeviceId.NET,
    "fs": DeviceId.FS,
    "vsock": DeviceId.VSOCK,
}

#: Device-specific feature bits (below bit 24) of the device types we know.
DEVICE_FEATURES: dict[DeviceId, Any] = {
    DeviceId.BLOCK: BlkFeature,
    DeviceId.NET: NetFeature,
    DeviceId.FS: FsFeature,
    DeviceId.VSOCK: VsockFeature,
}

_BLK_HINTS = BlkFeature.SEG_MAX | BlkFeature.BLK_SIZE | BlkFeature.FLUSH | BlkFeature.TOPOLOGY


def guess_device(features: int) -> DeviceId | None:
    """Block devices are recognisable by their feature bits; others need --device."""
    if features & int(_BLK_HINTS):
        return DeviceId.BLOCK
    return None


def add_parser(sub: Any) -> None:
    p = sub.add_parser("probe", help=__doc__.splitlines()[0] if __doc__ else None)
    p.add_argument("socket", help="path of the back-end's vhost-user socket")
    p.add_argument("--json", action="store_true", help="print one JSON object")
    p.add_argument("--device", choices=sorted(DEVICE_NAMES), help="device type (default: guess)")
    p.add_argument("--timeout", type=float, default=5.0, help="seconds to wait for each reply")
    p.set_defaults(run=run)


def collect(socket_path: str, device: str | None = None, timeout: float = 5.0) -> dict[str, Any]:
    """Negotiates with the back-end and returns what it reported."""
    with Frontend.connect(socket_path, timeout=timeout) as fe:
        features = fe.get_features()
        fe.set_owner()
        result: dict[str, Any] = {
            "features": features,
            "feature_names": _flag_names(VirtioFeature, features),
            "protocol_features": 0,
            "protocol_feature_names": [],
            "queue_num": 1,
            "max_mem_slots": None,
            "config": "",
            "device": None,
        }
        if not features & VirtioFeature.PROTOCOL_FEATURES:
            _device(features, device, result)
            return result
        proto = fe.get_protocol_features()
        result["protocol_features"] = int(proto)
        result["protocol_feature_names"] = _flag_names(ProtocolFeature, int(proto))
        # Ack everything we know how to use for the questions below.
        wanted = proto & (
            ProtocolFeature.MQ
            | ProtocolFeature.CONFIG
            | ProtocolFeature.CONFIGURE_MEM_SLOTS
            | ProtocolFeature.REPLY_ACK
        )
        fe.set_protocol_features(wanted)
        if wanted & ProtocolFeature.MQ:
            result["queue_num"] = fe.get_queue_num()
        if wanted & ProtocolFeature.CONFIGURE_MEM_SLOTS:
            result["max_mem_slots"] = fe.get_max_mem_slots()
        dev = _device(features, device, result)
        if wanted & ProtocolFeature.CONFIG and dev is not None:
            try:
                data = fe.get_config(0, CONFIG_SIZES[dev])
            except VhostError as exc:
                result["config_error"] = str(exc)
            else:
                result["config"] = data.hex()
                result["config_decoded"] = decode_config(int(dev), data)
        return result


def _device(features: int, device: str | None, result: dict[str, Any]) -> DeviceId | None:
    """The device type (given or guessed); names it and its feature bits in ``result``
    with the same spelling ``--device`` takes."""
    dev = DEVICE_NAMES[device] if device else guess_device(features)
    if dev is not None:
        result["device"] = next(k for k, v in DEVICE_NAMES.items() if v == dev)
        result["feature_names"] = _flag_names(VirtioFeature, features, DEVICE_FEATURES[dev])
    return dev


def _flag_names(flags: Any, value: int, device_flags: Any = None) -> list[str]:
    """Names of the bits set in ``value``; ``device_flags`` names the device-specific
    bits, which ``flags`` (the transport bits) does not cover."""
    if device_flags is not None:
        device_mask = 0
        for m in device_flags:
            device_mask |= m.value
        names = [m.name for m in device_flags if m.value & value and m.name]
        return names + _flag_names(flags, value & ~device_mask)
    names = [m.name for m in flags if m.value & value and m.name]
    known = 0
    for m in flags:
        known |= m.value
    unknown = value & ~known
    if unknown:
        names.append(f"unknown({unknown:#x})")
    return names


def run(args: argparse.Namespace) -> int:
    info = collect(args.socket, args.device, args.timeout)
    if args.json:
        print(json.dumps(info, sort_keys=True))
        return 0
    print(f"features:          {info['features']:#018x}")
    print(f"                   {' '.join(info['feature_names'])}")
    print(f"protocol features: {info['protocol_features']:#018x}")
    print(f"                   {' '.join(info['protocol_feature_names'])}")
    print(f"queues:            {info['queue_num']}")
    if info["max_mem_slots"] is not None:
        print(f"max memory slots:  {info['max_mem_slots']}")
    if info["device"]:
        print(f"device:            {info['device']}")
    if info["config"]:
        print(f"config ({len(info['config']) // 2} bytes): {info['config']}")
        for key, value in info.get("config_decoded", {}).items():
            print(f"  {key}: {value}")
    elif "config_error" in info:
        print(f"config:            unavailable ({info['config_error']})")
    return 0
