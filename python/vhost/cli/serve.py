"""``python -m vhost serve {blk,rng}``: run a vhost-user back-end daemon until SIGINT or
SIGTERM.

``serve blk --socket SOCK --image FILE [--queues N] [--readonly]`` serves a raw disk image
(the native Rust device; ``--python`` serves it through the Python device path instead).
The image is locked the way QEMU locks it, so a qemu-storage-daemon or another ``serve
blk`` on the same image is refused (``--force-share``, ``--no-lock``). ``serve rng --socket
SOCK`` serves the Python virtio-rng example device. ``--client`` connects to a front-end
listening on SOCK instead of listening (waiting until one does).

``--vduse NAME`` instead of ``--socket`` serves the device as a VDUSE device of the kernel
this runs on (``modprobe vduse``, root): ``vdpa dev add name NAME mgmtdev vduse`` then
binds it to ``virtio_vdpa`` (the kernel's own ``/dev/vdX``) or ``vhost_vdpa`` (for a VM).
A device of that name left by a killed daemon is replaced, or, while a vDPA device still
uses it, taken over if it is the same device (type, features, queues, configuration such
as the capacity; else refused, naming what differs); stopping destroys it, which the
kernel refuses while a vDPA device uses it (``vdpa dev del NAME`` first). ``--packed``
offers packed virtqueues too. Linux 6.12 lets VDUSE create virtio-blk and virtio-net
devices only (``serve rng --vduse`` is refused, saying so).

SIGINT (Ctrl-C) or SIGTERM stops the server cleanly, with exit status 0: that is a
server's normal stop (what systemd expects), not the 130 other commands exit with.
SIGHUP makes ``serve blk`` re-read its image's size and grow the disk to it, telling the
front-end, so a guest sees the new capacity without a reboot.

A session that ends on an error, or after a refused request, is reported in one line on
stderr with the reason; ``--verbose`` reports every session and refusal as it happens.
"""

from __future__ import annotations

import argparse
import errno
import math
import os
import signal
import stat
import sys
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from types import FrameType

from .. import _core
from ..daemon import BlkDevice, Daemon, DaemonEvent, Device, EventKind
from ..devices.blkdev import PythonBlkDevice
from ..devices.rng import RngDevice
from ..errors import InvalidParamError, NotSupportedError, VhostError
from .common import EXIT_USAGE, CliError, connect_hint, path_kind, plain

#: Most queues `serve blk` runs (one worker thread each).
MAX_QUEUES = 256
#: Largest ring the vhost-user protocol allows.
MAX_QUEUE_SIZE = 32768

SERVE_EXIT_STATUS = """\
exit status:
  0    stopped by SIGINT (Ctrl-C) or SIGTERM: a server's normal stop; with
       --client, also the end of the front-end's session
  1    bad arguments, an image that cannot be opened or locked, a socket path
       that cannot be listened on or connected to; with --client, a session
       that ended on an error; with --vduse, a device the kernel refuses to
       create (a type it does not allow: EINVAL; a name in use), or one a dead
       daemon left bound that this start cannot take over (named: vdpa dev del)
  2    --vduse: stopped, but the kernel kept the device because a vDPA device
       still uses it (vdpa dev del NAME; the next start takes it over)"""

STOPPING = """\
It runs until SIGINT (Ctrl-C) or SIGTERM, then drops the session cleanly and
exits with status 0 (a server's normal stop). With --client it connects to a
front-end that listens on --socket (QEMU's server=on), waiting until one does,
serves that one session and exits when it ends."""

BLK_DESCRIPTION = f"""\
Serve a disk image as a vhost-user-blk back-end on --socket, or as VDUSE device
--vduse NAME of this kernel (then: vdpa dev add name NAME mgmtdev vduse; bound to
virtio_vdpa it is a /dev/vdX here, bound to vhost_vdpa a VM can use it).

The image must be raw: a file that starts with another format's signature
(qcow2, QED, VMDK, VDI, VHDX, VHD, LUKS...; convert it with qemu-img convert
-O raw), an empty file, a size that is not a multiple of 512 bytes, and
anything but a regular file or a block device are refused, naming the file.

The image is locked the way QEMU locks it, so QEMU, qemu-storage-daemon,
qemu-img and other serve blk processes see each other: a writable serve is
refused while another program writes the image, and keeps writers out while it
runs. --readonly shares the image with other readers; --readonly --force-share
reads it whatever others do (QEMU's force-share=on); --no-lock takes no locks
(QEMU's locking=off), for those who coordinate access themselves.

Resize: grow the image file (truncate -s +1G FILE) and send SIGHUP: serve
blk re-reads the image's size, grows the disk and tells the front-end
(CONFIG_CHANGE_MSG), and the guest sees the new capacity without a reboot. It
prints the new size on stderr. A smaller image is refused (a disk is never
shrunk under a guest); the disk keeps its size.

{STOPPING}"""

RNG_DESCRIPTION = f"""\
Serve the virtio-rng example device (written in Python) as a vhost-user
back-end on --socket (QEMU: -device vhost-user-rng-pci).

{STOPPING}"""


def add_parser(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """Adds ``serve`` (``serve blk``, ``serve rng``: run a back-end of this package) and its
    options to the CLI."""
    raw = argparse.RawDescriptionHelpFormatter
    p = sub.add_parser(
        "serve",
        help="run a vhost-user back-end daemon",
        description=plain(__doc__),
        epilog=SERVE_EXIT_STATUS,
        formatter_class=raw,
    )
    kinds = p.add_subparsers(dest="device", required=True)

    def page(name: str, summary: str, description: str) -> argparse.ArgumentParser:
        return kinds.add_parser(
            name,
            help=summary,
            description=description,
            epilog=SERVE_EXIT_STATUS,
            formatter_class=raw,
        )

    blk = page("blk", "virtio-blk over a raw image file", BLK_DESCRIPTION)
    _common(blk)
    blk.add_argument("--image", required=True, help="disk image file (raw)")
    blk.add_argument(
        "--queues", type=int, default=1, help=f"number of request queues (1-{MAX_QUEUES})"
    )
    blk.add_argument(
        "--queue-size",
        type=int,
        default=256,
        help=f"largest ring size the front-end may use (3-{MAX_QUEUE_SIZE})",
    )
    blk.add_argument("--readonly", action="store_true", help="refuse guest writes")
    blk.add_argument("--serial", default="pyvhost", help="serial number (GET_ID)")
    blk.add_argument(
        "--no-lock",
        action="store_true",
        help="do not lock the image (QEMU's locking=off): only if you coordinate access",
    )
    blk.add_argument(
        "--force-share",
        action="store_true",
        help="with --readonly, read the image even while another program writes it "
        "(QEMU's force-share=on)",
    )
    blk.add_argument(
        "--python", action="store_true", help="use the Python device instead of the native one"
    )
    blk.add_argument(
        "--iommu",
        action="store_true",
        help="offer VIRTIO_F_ACCESS_PLATFORM: serve a front-end with a vIOMMU (I/O virtual "
        "addresses, IOTLB misses asked on the back-end channel; their count in the last "
        "session is printed on stop)",
    )
    blk.add_argument(
        "--iommu-miss-timeout",
        type=float,
        default=_core.DEFAULT_IOTLB_MISS_TIMEOUT,
        metavar="SECONDS",
        help="with --iommu, fail a request whose IOTLB miss is not answered within this, "
        "and go on with the queue (a miss on the ring itself fails the queue) "
        "(default %(default)s)",
    )
    blk.set_defaults(run=run_blk)

    rng = page("rng", "virtio-rng written in Python (the example device)", RNG_DESCRIPTION)
    _common(rng)
    rng.set_defaults(run=run_rng)


def _common(p: argparse.ArgumentParser) -> None:
    where = p.add_mutually_exclusive_group(required=True)
    where.add_argument("--socket", help="vhost-user socket path")
    where.add_argument(
        "--vduse",
        metavar="NAME",
        help="serve as VDUSE device NAME of this kernel instead (/dev/vduse/NAME; needs "
        "modprobe vduse; then: vdpa dev add name NAME mgmtdev vduse)",
    )
    p.add_argument("--client", action="store_true", help="connect to a listening front-end instead")
    p.add_argument(
        "--packed",
        action="store_true",
        help="with --vduse, offer packed virtqueues too (a device whose driver uses them "
        "cannot be taken over after a crash; vhost-user always offers them)",
    )
    p.add_argument(
        "--poll-us",
        type=int,
        default=0,
        metavar="US",
        help="keep polling each ring this long after the last request before sleeping",
    )
    p.add_argument(
        "--postcopy-fault-timeout",
        type=float,
        default=_core.DEFAULT_POSTCOPY_FAULT_TIMEOUT,
        metavar="SECONDS",
        help="fail the session when a request waits longer than this on a postcopy page "
        "the front-end never copies in (0: wait as long as it is connected; default "
        "%(default)s)",
    )
    p.add_argument(
        "--require-sealed-memory",
        action="store_true",
        help="refuse guest memory not sealed against shrinking (no SIGBUS from truncation)",
    )
    p.add_argument(
        "-v",
        "--verbose",
        action="store_true",
        help="report every session start and end and every refused request on stderr",
    )


def _check(ok: bool, message: str) -> None:
    if not ok:
        raise InvalidParamError(message)


def _check_common(args: argparse.Namespace) -> None:
    _check(args.poll_us >= 0, f"--poll-us must be 0 or more microseconds, not {args.poll_us}")
    _check(args.poll_us <= 10**9, f"--poll-us {args.poll_us} is more than 1000 seconds")
    t = args.postcopy_fault_timeout
    _check(
        math.isfinite(t) and 0 <= t <= 10**6,
        f"--postcopy-fault-timeout must be between 0 and 1000000 seconds, not {t}",
    )
    _check(
        not args.packed or args.vduse is not None,
        "--packed is for --vduse (a vhost-user socket always offers packed rings)",
    )
    if args.client:
        _check(args.vduse is None, "--client is for a vhost-user socket, not --vduse")
        _check_client_path(args.socket)


def _check_client_path(path: str) -> None:
    """``--client`` waits for a front-end to listen on ``path`` (a missing or stale
    socket is fine: one will appear), but a path no front-end can ever listen on (a
    file that is not a socket, a missing directory) is refused at once."""
    try:
        mode = os.stat(path).st_mode
    except FileNotFoundError:
        hint = connect_hint(path, errno.ENOENT)
        if hint is not None and hint.startswith("there is no directory"):
            raise CliError(
                f"connect to {path}: {os.strerror(errno.ENOENT)}", EXIT_USAGE, hint
            ) from None
        return
    except OSError as exc:
        reason = os.strerror(exc.errno) if exc.errno else str(exc)
        raise CliError(
            f"connect to {path}: {reason}", EXIT_USAGE, connect_hint(path, exc.errno)
        ) from None
    if not stat.S_ISSOCK(mode):
        raise CliError(f"connect to {path}: it is {path_kind(path)}, not a socket", EXIT_USAGE)


def run_blk(args: argparse.Namespace) -> int:
    """``serve blk``: serves an image (or RAM disk) as vhost-user-blk until Ctrl-C or SIGTERM;
    returns the exit status."""
    _check_common(args)
    _check(
        1 <= args.queues <= MAX_QUEUES,
        f"--queues must be between 1 and {MAX_QUEUES}, not {args.queues}",
    )
    _check(
        3 <= args.queue_size <= MAX_QUEUE_SIZE,
        f"--queue-size must be between 3 and {MAX_QUEUE_SIZE}, not {args.queue_size}",
    )
    _check(len(args.serial.encode()) <= 20, f"--serial is at most 20 bytes, not {args.serial!r}")
    t = args.iommu_miss_timeout
    _check(
        math.isfinite(t) and 0 < t <= 10**6,
        f"--iommu-miss-timeout must be more than 0 and at most 1000000 seconds, not {t}",
    )
    _check(
        not args.force_share or args.readonly,
        "--force-share needs --readonly (a writer cannot share the image safely)",
    )
    device: Device | BlkDevice
    # Both devices take the same arguments; only the data path differs.
    device_class = PythonBlkDevice if args.python else BlkDevice
    try:
        device = device_class(
            args.image,
            num_queues=args.queues,
            queue_size=args.queue_size,
            readonly=args.readonly,
            serial=args.serial,
            lock=not args.no_lock,
            force_share=args.force_share,
        )
        sectors = device.capacity
    except OSError as exc:
        raise _image_failure(args, exc) from None
    kind = "python" if args.python else "native"
    mode = " read-only" if args.readonly else ""
    daemon = Daemon(
        device,
        args.socket or args.vduse,
        client=args.client,
        transport="vduse" if args.vduse else "vhost-user",
        packed=args.packed,
        poll_us=args.poll_us,
        require_sealed_memory=args.require_sealed_memory,
        postcopy_fault_timeout=args.postcopy_fault_timeout or None,
        iommu_miss_timeout=args.iommu_miss_timeout if args.iommu else None,
    )
    with _on_signal(signal.SIGHUP, _Resizer(daemon, args.image)):
        status = _serve(
            daemon, f"blk ({kind}, {sectors} sectors, {args.queues} queue(s){mode})", args.verbose
        )
    if args.iommu and status == 0:
        # The one place a `serve blk` process reports how often the vIOMMU was asked.
        misses = daemon.iotlb_misses
        per_queue = ", ".join(f"queue {i}: {n}" for i, n in enumerate(misses))
        _say(f"IOTLB misses in the last session: {sum(misses)} ({per_queue or 'no queues'})")
    return status


@contextmanager
def _on_signal(signum: signal.Signals, action: Callable[[], None]) -> Iterator[None]:
    """Runs ``action`` (in the main thread, between two waits of the daemon) on each
    ``signum`` while the block runs."""

    def handler(signum: int, frame: FrameType | None) -> None:
        action()

    previous = signal.signal(signum, handler)
    try:
        yield
    finally:
        signal.signal(signum, previous)


class _Resizer:
    """The SIGHUP action. A second SIGHUP can arrive while a resize waits for the
    front-end's ack (the wait runs signal handlers): it is not nested into the first, which
    holds the device's resize lock, but makes the first run once more when it is done."""

    def __init__(self, daemon: Daemon, image: str) -> None:
        self.daemon = daemon
        self.image = image
        self.busy = False
        self.again = False

    def __call__(self) -> None:
        if self.busy:
            self.again = True
            return
        self.busy = True
        try:
            self.again = True
            while self.again:
                self.again = False
                _resize(self.daemon, self.image)
        finally:
            self.busy = False


def _resize(daemon: Daemon, image: str) -> None:
    """SIGHUP: grows the disk to the image's size now and tells the front-end; one line
    on stderr either way (a failure never stops the server)."""
    device = daemon.device
    before = device.capacity if isinstance(device, BlkDevice | PythonBlkDevice) else None
    try:
        old, new, notified = daemon.resize()
    except (VhostError, OSError) as exc:
        after = device.capacity if isinstance(device, BlkDevice | PythonBlkDevice) else None
        if after != before:
            _say(f"resized {image} to {after} sectors, but the guest was not told: {exc}")
        else:
            _say(f"error: resize {image}: {exc}; the disk keeps its size ({before} sectors)")
        return
    if new == old:
        _say(f"resize {image}: the size is unchanged ({new} sectors)")
        return
    told = "the front-end was notified" if notified else "no front-end is connected"
    _say(f"resized {image}: {old} -> {new} sectors ({new * 512} bytes); {told}")


def _image_failure(args: argparse.Namespace, exc: OSError) -> CliError:
    """The one-line error for an image that could not be opened or locked, with a hint."""
    reason = exc.strerror or str(exc)
    if exc.errno == errno.EBUSY:
        return CliError(
            f"lock image {args.image}: {reason}; stop it first, or serve it with --readonly "
            "--force-share to read it anyway (--no-lock: no locking at all)"
        )
    if exc.errno in (errno.EACCES, errno.EPERM, errno.EROFS) and not args.readonly:
        return CliError(f"open image {args.image}: {reason}; use --readonly to serve it")
    return CliError(f"open image {args.image}: {reason}")


def run_rng(args: argparse.Namespace) -> int:
    """``serve rng``: serves a virtio-rng device until Ctrl-C or SIGTERM (SIGHUP is
    reported and ignored); returns the exit status."""
    _check_common(args)
    daemon = Daemon(
        RngDevice(),
        args.socket or args.vduse,
        client=args.client,
        transport="vduse" if args.vduse else "vhost-user",
        packed=args.packed,
        poll_us=args.poll_us,
        require_sealed_memory=args.require_sealed_memory,
        postcopy_fault_timeout=args.postcopy_fault_timeout or None,
    )
    with _on_signal(signal.SIGHUP, _nothing_to_reload):
        return _serve(daemon, "rng (python)", args.verbose)


def _nothing_to_reload() -> None:
    """SIGHUP for ``serve rng``: a daemon's reload signal, and the rng has nothing to
    reload; one line says so, and the daemon serves on (SIGHUP's default would kill it)."""
    print("serve rng: SIGHUP: nothing to reload; still serving", file=sys.stderr, flush=True)


class _Reporter:
    """Prints the daemon's events on stderr: all of them with ``--verbose``; otherwise one
    line when a session ends on an error or after a refusal (the first one, which is
    usually the cause of what follows)."""

    def __init__(self, verbose: bool) -> None:
        self.verbose = verbose
        self.trouble: dict[int, DaemonEvent] = {}
        #: A session's failure was printed (in client mode it is also the daemon's).
        self.failure_shown = False

    def __call__(self, event: DaemonEvent) -> None:
        if event.kind is EventKind.SESSION_ENDED and event.error:
            self.failure_shown = True
        if self.verbose:
            _say(str(event))
            return
        if event.kind is not EventKind.SESSION_ENDED:
            if event.error:
                self.trouble.setdefault(event.session, event)
            return
        first = self.trouble.pop(event.session, None)
        if first is None:
            if event.error:
                _say(str(event))
            return
        _say(f"{event}, after: {str(first).split(': ', 1)[1]}")


def _say(line: str) -> None:
    print(line, file=sys.stderr, flush=True)


def _serve(daemon: Daemon, what: str, verbose: bool) -> int:
    vduse = daemon.transport == "vduse"
    try:
        daemon.start()
    except OSError as exc:
        if vduse:
            # The message names the device and says what to do (vdpa dev del, modprobe).
            raise CliError(str(exc.strerror or exc)) from None
        action = "connect to" if daemon.client else "listen on"
        raise CliError(f"{action} {daemon.path}: {exc.strerror or exc}") from None
    except NotSupportedError as exc:
        raise CliError(str(exc)) from None

    def ready() -> None:
        if vduse:
            print(
                f"serving {what} as VDUSE device {daemon.path} (/dev/vduse/{daemon.path}; "
                f"vdpa dev add name {daemon.path} mgmtdev vduse)",
                flush=True,
            )
        elif daemon.client:
            print(
                f"waiting for a front-end to listen on {daemon.path}, to serve {what}",
                flush=True,
            )
        else:
            print(f"serving {what} on {daemon.path}", flush=True)

    reporter = _Reporter(verbose)

    def on_event(event: DaemonEvent) -> None:
        if daemon.client and event.kind is EventKind.SESSION_STARTED:
            print(f"connected to {daemon.path}: serving {what}", flush=True)
        reporter(event)

    try:
        daemon.serve_forever(ready, on_event=on_event)
    except VhostError:
        # Client mode: the one session failed, and its event already said why.
        if not reporter.failure_shown:
            raise
        return 1
    _say(f"stopped after {daemon.sessions_started} session(s)")
    return 0
