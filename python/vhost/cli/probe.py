"""``probe SOCKET``: connect to any vhost-user back-end as a front-end and report what it
offers: features, protocol features, queue count, memory slots and config space.

The device type decides how feature bits 0-23 and the config space are read, and
vhost-user never states it, so it is named only from unambiguous evidence, the offered
device feature bits: the type must be the only known one (blk, net, fs, vsock) that
defines every device bit offered (legacy bits such as virtio-net's GSO count only when no
type fits without them), and at least one offered bit must be that type's alone
(virtio-blk's BLK_SIZE, virtio-net's MTU or CTRL_RX...). Otherwise the device is
"unknown; pass --device". A ``--device`` that the offered bits contradict is obeyed with
a warning. The socket is the argument or ``--socket``."""

from __future__ import annotations

import argparse
import json
import sys
from typing import Any

from ..codes import ProtocolFeature
from ..devices.config import decode_config
from ..errors import VhostError
from ..user import Frontend
from ..virtio import DEVICE_FEATURES, DEVICE_NAMES, DeviceId, VirtioFeature
from .common import CliError, connecting, plain, seconds_arg, socket_args, step

#: Config-space sizes of the device types we decode.
CONFIG_SIZES = {DeviceId.BLOCK: 60, DeviceId.NET: 12, DeviceId.FS: 44, DeviceId.VSOCK: 8}

DEVICE_SPECIFIC_BITS = ((1 << 24) - 1) | (((1 << 14) - 1) << 50)
"""Feature bits whose meaning depends on the device type (0-23 and 50-63); the others
are the transport's (``VirtioFeature``)."""


LEGACY_FEATURES = {DeviceId.NET: 1 << 6}
"""Device bits defined only for legacy (pre-1.0) drivers, which some back-ends still
offer: virtio-net's GSO (bit 6; DPDK's vhost PMD offers it)."""


def _defined(dev: DeviceId, legacy: bool = False) -> int:
    mask = LEGACY_FEATURES.get(dev, 0) if legacy else 0
    for m in DEVICE_FEATURES[dev]:
        mask |= m.value
    return mask


def _type_name(dev: DeviceId) -> str:
    return next(k for k, v in DEVICE_NAMES.items() if v == dev)


def _bits(mask: int) -> str:
    return ", ".join(str(b) for b in range(64) if mask >> b & 1)


def guess_device(features: int) -> tuple[DeviceId | None, list[str]]:
    """The device type the offered ``features`` prove, and why (or why not).

    vhost-user never states the device type, and the config space and the queue count
    carry no type tag, so the offered device-specific feature bits are the only evidence.
    The same bit means different things to different types (bit 9 is virtio-blk's FLUSH
    and virtio-net's GUEST_ECN), so: a type *fits* when it defines every device bit
    offered (a device offers no bit its type leaves undefined). The type is named when it
    is the only known type (blk, net, fs, vsock) that fits with the bits of virtio 1.x,
    or, when none does, the only one that fits counting legacy bits too
    (:data:`LEGACY_FEATURES`); and at least one offered bit must be defined by that type
    alone. Anything else (no device bits, bits several types define, bits no known type
    defines) is unknown: the user says with ``--device``.
    """
    offered = features & DEVICE_SPECIFIC_BITS
    if not offered:
        return None, ["no device-specific feature bits are offered"]
    fits = [d for d in DEVICE_FEATURES if offered & ~_defined(d) == 0]
    if not fits:
        fits = [d for d in DEVICE_FEATURES if offered & ~_defined(d, legacy=True) == 0]
    if len(fits) != 1:
        names = ", ".join(_type_name(d) for d in fits) or "none of the known types"
        return None, [f"the offered device bits ({_bits(offered)}) fit {names}"]
    (dev,) = fits
    others = 0
    for d in DEVICE_FEATURES:
        if d != dev:
            others |= _defined(d)
    unique = offered & _defined(dev) & ~others
    if not unique:
        return None, [f"no offered device bit ({_bits(offered)}) is {_type_name(dev)}'s alone"]
    flags = DEVICE_FEATURES[dev]
    names = ", ".join(f"{b} ({flags(1 << b).name})" for b in range(64) if unique >> b & 1)
    return dev, [
        f"only {_type_name(dev)} defines every offered device bit ({_bits(offered)})",
        f"bit(s) {names} are {_type_name(dev)}'s alone",
    ]


def contradiction(features: int, device: str) -> str | None:
    """Why the offered ``features`` contradict ``--device device``, or None."""
    dev = DEVICE_NAMES[device]
    foreign = features & DEVICE_SPECIFIC_BITS & ~_defined(dev, legacy=True)
    if foreign:
        return (
            f"the back-end offers device feature bit(s) {_bits(foreign)}, which {device} "
            "does not define"
        )
    guessed, evidence = guess_device(features)
    if guessed is not None and guessed != dev:
        return f"its feature bits say it is {_type_name(guessed)} ({'; '.join(evidence)})"
    return None


def add_parser(sub: Any) -> None:
    """Adds ``probe`` (report what any vhost-user back-end offers) and its options to the CLI."""
    p = sub.add_parser(
        "probe",
        help="report what any vhost-user back-end offers",
        description=plain(__doc__),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    socket_args(p, positional=True)
    p.add_argument("--json", action="store_true", help="print one JSON object")
    p.add_argument(
        "--device",
        choices=sorted(DEVICE_NAMES),
        help="device type, to decode its config and feature bits (default: named only from "
        "unambiguous evidence)",
    )
    p.add_argument(
        "--timeout", type=seconds_arg, default=5.0, help="seconds to wait for each reply"
    )
    p.set_defaults(run=run)


def collect(socket_path: str, device: str | None = None, timeout: float = 5.0) -> dict[str, Any]:
    """Negotiates with the back-end at ``socket_path`` and returns what it reported."""
    with Frontend.connect(socket_path, timeout=timeout) as fe:
        return collect_from(fe, device)


#: The protocol features ``probe`` acks: those that let it ask its questions (queue
#: count, memory slots, config space) and nothing a ring would need.
PROBE_PROTOCOL_FEATURES = (
    ProtocolFeature.MQ
    | ProtocolFeature.CONFIG
    | ProtocolFeature.CONFIGURE_MEM_SLOTS
    | ProtocolFeature.REPLY_ACK
)


def collect_from(fe: Frontend, device: str | None = None) -> dict[str, Any]:
    """Negotiates with the back-end ``fe`` is connected to (:meth:`Frontend.negotiate`,
    acking :data:`PROBE_PROTOCOL_FEATURES`) and returns what it offered and reported
    (``--device``, or the type the evidence names, decodes the config space)."""
    _, wanted = fe.negotiate(protocol_features=PROBE_PROTOCOL_FEATURES)
    features = fe.offered_features or 0
    proto = fe.offered_protocol_features or ProtocolFeature(0)
    result: dict[str, Any] = {
        "features": features,
        "feature_names": _flag_names(VirtioFeature, features),
        "protocol_features": int(proto),
        "protocol_feature_names": _flag_names(ProtocolFeature, int(proto)),
        "queue_num": 1,
        "max_mem_slots": None,
        "config": "",
        "device": None,
        "device_evidence": [],
        "warnings": [],
    }
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
    guessed, evidence = guess_device(features)
    result["device_evidence"] = evidence
    if device:
        dev: DeviceId | None = DEVICE_NAMES[device]
        why = contradiction(features, device)
        if why is not None:
            result["warnings"].append(f"--device {device} contradicts the evidence: {why}")
    else:
        dev = guessed
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


def socket_of(args: argparse.Namespace) -> str:
    """The socket, given as the argument or as ``--socket`` (one of them, or both the
    same)."""
    given = {x for x in (args.socket_pos, args.socket) if x is not None}
    if not given:
        raise CliError("probe needs the back-end's socket: probe SOCKET (or --socket SOCKET)")
    if len(given) > 1:
        raise CliError(f"two different sockets given: {args.socket_pos} and {args.socket}")
    return str(given.pop())


def run(args: argparse.Namespace) -> int:
    """``probe``: negotiates with the back-end at the socket and prints its features, protocol
    features and queues (text or JSON); returns the exit status."""
    socket = socket_of(args)
    with connecting(socket):
        fe = Frontend.connect(socket, timeout=args.timeout)
    with fe, step("probe", socket):
        info = collect_from(fe, args.device)
    for warning in info["warnings"]:
        print(f"warning: {warning}", file=sys.stderr)
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
    else:
        print(f"device:            unknown; pass --device {'|'.join(sorted(DEVICE_NAMES))}")
        print(f"                   ({'; '.join(info['device_evidence'])})")
    if info["config"]:
        print(f"config ({len(info['config']) // 2} bytes): {info['config']}")
        for key, value in info.get("config_decoded", {}).items():
            print(f"  {key}: {value}")
    elif "config_error" in info:
        print(f"config:            unavailable ({info['config_error']})")
    return 0
