"""``blk {read,write,info}``: act as a virtio-blk driver on any vhost-user-blk back-end.

- ``blk info --socket S``: capacity, block size, features, read-only, device id;
- ``blk read --socket S --offset N --length N [--output FILE]``: hexdump, or the raw
  bytes to FILE (``-``: standard output);
- ``blk write --socket S --offset N (--input FILE | --pattern BYTE) [--length N]``
  (``--input -`` reads standard input).

Offsets and lengths are bytes (multiples of 512; ``k``/``m``/``g`` suffixes accepted);
I/O past the end of the disk is refused before it is sent (exit status 1). A request the
device fails is reported with its virtio-blk status name (``IOERR``, ``UNSUPP``) and exit
status 2, as is a write to a read-only device.
"""

from __future__ import annotations

import argparse
import json
from contextlib import nullcontext
from typing import TYPE_CHECKING, Any

from ..virtio import BlkFeature, VirtioFeature
from .common import (
    EXIT_FAILED,
    CliError,
    OutputFile,
    connecting,
    plain,
    read_input,
    seconds_arg,
    socket_args,
    step,
)
from .probe import _flag_names

if TYPE_CHECKING:
    from ..devices.blk import BlkDriver, BlkIOError

SECTOR_SIZE = 512

_SUFFIXES = {"k": 1 << 10, "m": 1 << 20, "g": 1 << 30, "t": 1 << 40}

MAX_BYTES = (1 << 63) - 1
"""Largest byte count an argument takes (a disk's size in bytes fits in 63 bits)."""


def size_arg(text: str) -> int:
    """``4096``, ``0x1000``, ``4k``, ``1M``, ``2T``: a byte count."""
    t = text.strip().lower().removesuffix("b").removesuffix("i")
    mult = 1
    if t and t[-1] in _SUFFIXES:
        mult = _SUFFIXES[t[-1]]
        t = t[:-1]
    try:
        value = int(t, 0) * mult
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a byte count: {text!r}") from None
    if value < 0:
        raise argparse.ArgumentTypeError(f"negative byte count: {text!r}")
    if value > MAX_BYTES:
        raise argparse.ArgumentTypeError(f"too large: {text!r} (at most 8 EiB)")
    return value


def length_arg(text: str) -> int:
    """A byte count above zero (a request of no bytes does nothing)."""
    value = size_arg(text)
    if value == 0:
        raise argparse.ArgumentTypeError(f"must be more than 0 bytes: {text!r}")
    return value


def byte_arg(text: str) -> int:
    """A pattern byte: ``0xab``, ``171``."""
    try:
        value = int(text, 0)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a byte: {text!r}") from None
    if not 0 <= value <= 0xFF:
        raise argparse.ArgumentTypeError(f"a byte is 0..255: {text!r}")
    return value


def add_parser(sub: Any) -> None:
    """Adds ``blk`` (``info``, ``read``, ``write``: this package as the virtio-blk driver of any
    back-end) and its options to the CLI."""
    p = sub.add_parser(
        "blk",
        help="be the virtio-blk driver of any vhost-user-blk back-end: info, read, write",
        description=plain(__doc__),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    blk = p.add_subparsers(dest="blk_command", required=True, metavar="COMMAND")

    def common(q: argparse.ArgumentParser) -> None:
        socket_args(q)
        q.add_argument(
            "--timeout", type=seconds_arg, default=10.0, help="seconds per reply (default 10)"
        )
        q.add_argument("--packed", action="store_true", help="use a packed virtqueue")

    info = blk.add_parser(
        "info",
        help="capacity, block size, features, read-only, id",
        description="Print the disk's capacity, block size, features, read-only flag and id.",
    )
    common(info)
    info.add_argument("--json", action="store_true", help="print one JSON object")
    info.set_defaults(run=run_info)

    read = blk.add_parser(
        "read",
        help="read bytes: hexdump, or raw to --output",
        description="Read --length bytes at --offset: a hexdump, or the raw bytes to --output.",
    )
    common(read)
    read.add_argument("--offset", type=size_arg, required=True, help="bytes (512 multiple)")
    read.add_argument("--length", type=length_arg, required=True, help="bytes (512 multiple)")
    read.add_argument(
        "--output", metavar="FILE", help="write the raw bytes to FILE ('-' for stdout)"
    )
    read.set_defaults(run=run_read)

    write = blk.add_parser(
        "write",
        help="write a file's bytes or a repeated byte",
        description="Write a file's bytes (--input) or a repeated byte (--pattern) at --offset.",
    )
    common(write)
    write.add_argument("--offset", type=size_arg, required=True, help="bytes (512 multiple)")
    src = write.add_mutually_exclusive_group(required=True)
    src.add_argument("--input", metavar="FILE", help="the bytes to write ('-' for stdin)")
    src.add_argument("--pattern", type=byte_arg, help="a byte value to repeat")
    write.add_argument(
        "--length",
        type=length_arg,
        help="bytes to write (default: 512 with --pattern, the file's size with --input)",
    )
    write.add_argument("--flush", action="store_true", help="flush after writing")
    write.set_defaults(run=run_write)


BLK_QUEUE_SIZES = [128, 64, 32, 16, 8]
"""Ring sizes ``blk`` asks for, in turn, until the back-end accepts one."""


class RingRefusedError(CliError):
    """The back-end refused every ring size tried (``SET_VRING_NUM``): ``refused``."""

    def __init__(self, message: str, refused: list[int]) -> None:
        super().__init__(message, EXIT_FAILED)
        self.refused = refused


def _ring_refused(exc: CliError) -> bool:
    from ..errors import RequestRefusedError  # noqa: PLC0415

    cause = exc.__cause__
    return isinstance(cause, RequestRefusedError) and cause.request == "SET_VRING_NUM"


def open_driver(
    socket: str,
    timeout: float,
    queue_sizes: list[int],
    action: str = "set up a virtio-blk queue on",
    **options: Any,
) -> tuple[BlkDriver, list[int]]:
    """Connects to the back-end at ``socket`` and sets up its queue 0 with the first of
    ``queue_sizes`` it accepts (a back-end refuses a ring too big for it in
    ``SET_VRING_NUM``); returns the driver and the sizes refused first. Each step's
    failure is a :class:`CliError` naming it (connecting: exit status 1, with a hint;
    setting up the device, ``action``: 2)."""
    # Imported here: the driver needs the native virtqueues, `probe` and `demo` do not.
    from ..devices.blk import BlkDriver  # noqa: PLC0415
    from ..user import Frontend  # noqa: PLC0415

    refused: list[int] = []
    for size in queue_sizes:
        with connecting(socket):
            fe = Frontend.connect(socket, timeout=timeout)
        try:
            with step(action, socket):
                return BlkDriver(fe, timeout=timeout, queue_size=size, **options), refused
        except CliError as exc:
            fe.close()
            if not _ring_refused(exc):
                raise
            refused.append(size)
        except BaseException:
            fe.close()
            raise
    raise RingRefusedError(
        f"{action} {socket}: SET_VRING_NUM refused, the back-end takes "
        f"no ring of {', '.join(map(str, refused))} entries",
        refused,
    )


def _connect(args: argparse.Namespace, action: str = "set up a virtio-blk queue on") -> BlkDriver:
    disk, _ = open_driver(
        args.socket, args.timeout, BLK_QUEUE_SIZES, action=action, packed=args.packed
    )
    return disk


def device_error(exc: BlkIOError, action: str, socket: str) -> CliError:
    """``ACTION SOCKET: REASON`` for a request the device failed (its status name) or
    the driver refused without sending it (a write to a read-only device); exit status
    2 either way."""
    reason = str(exc) if exc.local else f"device status VIRTIO_BLK_S_{exc.status_name}"
    return CliError(f"{action} {socket}: {reason}", EXIT_FAILED)


def hexdump(data: bytes, base: int = 0) -> str:
    """``hexdump -C`` style lines; runs of identical 16-byte lines collapse into ``*``."""
    lines: list[str] = []
    previous: bytes | None = None
    starred = False
    for off in range(0, len(data), 16):
        chunk = data[off : off + 16]
        if chunk == previous and off + 16 < len(data):
            if not starred:
                lines.append("*")
                starred = True
            continue
        previous, starred = chunk, False
        hexes = " ".join(f"{b:02x}" for b in chunk)
        if len(chunk) > 8:
            hexes = hexes[:23] + " " + hexes[23:]
        text = "".join(chr(b) if 32 <= b < 127 else "." for b in chunk)
        lines.append(f"{base + off:08x}  {hexes:<49} |{text}|")
    lines.append(f"{base + len(data):08x}")
    return "\n".join(lines)


def run_info(args: argparse.Namespace) -> int:
    """``blk info``: prints the disk's capacity, features and limits; returns the exit status."""
    from ..devices.blk import BlkIOError  # noqa: PLC0415

    with _connect(args, "read the disk's configuration from") as disk, step("query", args.socket):
        try:
            ident = disk.get_id()
        except BlkIOError as exc:
            ident_text = f"unavailable (VIRTIO_BLK_S_{exc.status_name})"
            ident = b""
        else:
            ident_text = ident.rstrip(b"\0").decode("ascii", errors="replace")
        names = _flag_names(VirtioFeature, disk.features, BlkFeature)
        info: dict[str, Any] = {
            "capacity": disk.capacity,
            "size": disk.size,
            "block_size": disk.block_size,
            "read_only": disk.read_only,
            "features": disk.features,
            "feature_names": names,
            "offered_features": disk.offered_features,
            "num_queues": disk.num_queues,
            "max_request": disk.max_request,
            "packed": disk.packed,
            "event_idx": disk.event_idx,
            "id": ident_text,
            "id_hex": ident.hex(),
            "config": {k: v for k, v in disk.config.items()},
        }
    if args.json:
        print(json.dumps(info, sort_keys=True))
        return 0
    print(f"capacity:    {info['capacity']} sectors ({info['size']} bytes)")
    print(f"block size:  {info['block_size']}")
    print(f"read-only:   {'yes' if info['read_only'] else 'no'}")
    print(f"queues:      {info['num_queues']}")
    print(f"features:    {info['features']:#018x}")
    print(f"             {' '.join(names)}")
    print(f"id:          {ident_text!r}")
    return 0


def run_read(args: argparse.Namespace) -> int:
    """``blk read``: reads ``--length`` bytes at ``--offset`` to stdout or a file; returns the
    exit status."""
    from ..devices.blk import BlkIOError  # noqa: PLC0415

    _check(args.offset, args.length)
    # The output is opened before the read is sent: a missing directory is an error
    # before any I/O, not after.
    with OutputFile(args.output) if args.output is not None else nullcontext() as out:
        with _connect(args) as disk, step("read from", args.socket):
            try:
                data = disk.read(args.offset, args.length)
            except BlkIOError as exc:
                raise device_error(exc, "read from", args.socket) from exc
        if out is None:
            print(hexdump(data, args.offset))
            return 0
        out.write(data)
    if args.output != "-":
        print(f"read {len(data)} bytes at offset {args.offset} into {args.output}")
    return 0


def run_write(args: argparse.Namespace) -> int:
    """``blk write``: writes a file, stdin or a pattern at ``--offset``; returns the exit status."""
    from ..devices.blk import BlkIOError  # noqa: PLC0415

    if args.pattern is not None:
        length = SECTOR_SIZE if args.length is None else args.length
        data = bytes([args.pattern]) * length
    else:
        raw = read_input(args.input)
        data = raw if args.length is None else raw[: args.length]
        if args.length is not None and len(data) < args.length:
            raise CliError(
                f"read {args.input}: holds only {len(raw)} bytes, --length asks for {args.length}"
            )
        if not data:
            raise CliError(f"read {args.input}: empty, nothing to write")
        if args.length is None and len(data) % SECTOR_SIZE:
            raise CliError(_unaligned_input(args.input, len(data)))
    _check(args.offset, len(data))
    with _connect(args) as disk, step("write to", args.socket):
        try:
            disk.write(args.offset, data)
            if args.flush:
                disk.flush()
        except BlkIOError as exc:
            raise device_error(exc, "write to", args.socket) from exc
    print(f"wrote {len(data)} bytes at offset {args.offset}")
    return 0


def _unaligned_input(path: str, size: int) -> str:
    """The error for an input whose size is not whole sectors (no ``--length`` given)."""
    where = "standard input" if path == "-" else path
    whole = size // SECTOR_SIZE * SECTOR_SIZE
    tip = f"--length {whole} writes its first {whole} bytes; or pad it" if whole else "pad it"
    return f"read {where}: its size, {size} bytes, is not a multiple of {SECTOR_SIZE} ({tip})"


def _check(offset: int, length: int) -> None:
    """Refuses unaligned I/O before connecting."""
    for what, value in (("--offset", offset), ("--length", length)):
        if value % SECTOR_SIZE:
            raise CliError(f"{what} must be a multiple of {SECTOR_SIZE}: {value}")
