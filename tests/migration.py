"""QEMU live migration (precopy) of a guest doing disk I/O, from one vhost-user-blk back-end
to another on the same image (issue 10).

The guest is self-contained, as migration needs (a 9p share blocks it): the harness's
kernel and busybox initramfs (``scripts/build_guest.sh``) plus one small initramfs
segment of our own, appended at run time (the kernel unpacks concatenated archives),
holding the workload as an init script that ``rdinit=`` runs instead of the harness's
``/init``. Its loop, on ``/dev/vda`` (the vhost-user-blk disk), one line per iteration on
the serial console:

1. write a pattern tagged with the iteration number to one of the :data:`SLOT_SETS`
   through the page cache and to one of the regions (:data:`REGION_MB`) bypassing it,
   then ``sync``;
2. check the other slot set and region, read back by the previous iteration, once more
   from the page cache (no disk read: the line reports ``cached_read=0``);
3. drop the page cache (``echo 3 > /proc/sys/vm/drop_caches``), read this iteration's
   slots and region back from the disk (``read=``) and compare checksums.

It stops when the host writes :data:`STOP_MARK` at the start of the image (or after
:data:`MAX_ITERATIONS`) and prints a summary.

:func:`migrate_mid_io` boots the source QEMU on one back-end and the destination
(``-incoming``, identical devices) on the other, migrates once the workload runs, waits
until the destination itself has run iterations, stops the workload and checks the
console of both QEMUs joined: every iteration passed, in order, and the summary says so.

Step 2 is what makes a back-end's dirty log matter: the pages the back-end read the
previous iteration's data into are written by nobody else (the guest only reads them;
``init_on_alloc=0`` keeps the kernel from zeroing them first), so across a migration they
reach the destination current only if the back-end logged its writes. When the
switch-over falls between a read-back and the next iteration's cached check, the
destination checks pages the source's back-end wrote during the precopy.
:class:`LogHidingRelay` hands a back-end a decoy log to show that this check catches a
back-end that does not log. QEMU refuses to even start when a vhost-user back-end lacks
``LOG_SHMFD``: that is :class:`MigrationRefused`.
"""

from __future__ import annotations

import contextlib
import gzip
import os
import re
import socket
import struct
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import guest
import peers
from vhost.codes import FrontendRequest

MEMORY_MB = 256
IMAGE_BYTES = 96 << 20
REGION_MB = ((64, 2), (66, 2))
"""Two regions (offset and size in MiB), used by odd and even iterations in turn: an
iteration writes its region whole, bypassing the page cache, reads it back through the
cache and checks it; the next iteration checks it again from the cache."""
SLOT_BYTES = 64 << 10
SLOT_SETS = (
    tuple(range(1, (REGION_MB[0][0] << 20) // SLOT_BYTES, 128)),
    tuple(range(65, (REGION_MB[0][0] << 20) // SLOT_BYTES, 128)),
)
"""Two sets of slot indices (units of :data:`SLOT_BYTES`) spread over the disk, used by
odd and even iterations in turn; slot 0 holds the stop mark."""
MAX_ITERATIONS = 400
IDLE_S = 1
"""Seconds each iteration idles after its read-back: time in which a switch-over leaves
pages the source's back-end filled for the destination to check."""
PRE_ITERATIONS = 2
"""Iterations the source finishes before the migration starts (the workload is running)."""
MIN_DEST_LINES = 3
"""Iteration lines the destination prints before the host stops the workload: at least
``MIN_DEST_LINES - 1`` iterations then ran wholly on the destination."""
STOP_MARK = b"PYVHOST-MIG-STOP"

MIGRATE_BANDWIDTH = 32 << 20
"""Bytes/s (``max-bandwidth``): the precopy of the ~100 MiB this guest uses then lasts about
3 s and spans workload iterations, so the back-end writes pages the precopy already sent.
QEMU's own default (about 1 s here) is what :func:`migrate_mid_io` uses with
``bandwidth=None``. The total time reported is bound by this cap."""
BOOT_TIMEOUT = 120.0
MIGRATE_TIMEOUT = 60.0
DEST_TIMEOUT = 60.0
POLL = 0.1
_HEADER = struct.Struct("<III")  # vhost-user message header: request, flags, size

INIT_PATH = "/pyvhost-migrate"
ITER = "PYVHOST-MIG-ITER"
SUMMARY = "PYVHOST-MIG-SUMMARY"
ITER_RE = re.compile(rf"{ITER} n=(\d+) read=(\d+) cached_read=(\d+) (ok|FAIL[^\n]*)\n")
READ_SECTORS = (len(SLOT_SETS[0]) * SLOT_BYTES + (REGION_MB[0][1] << 20)) // 512
"""Sectors each iteration reads back from the disk at least (``/sys/block/vda/stat``):
the drop of the page cache made the read-back reach the back-end."""
SUMMARY_RE = re.compile(rf"{SUMMARY} iterations=(\d+) failed=(\d+) stop=(\S+)\n")


_WORKLOAD = f"""#!/bin/sh
# The live-migration workload (tests/migration.py writes it; the kernel runs it as rdinit).
export PATH=/sbin:/bin:/usr/sbin:/usr/bin
mount -t proc proc /proc
mount -t sysfs sysfs /sys
mount -t devtmpfs devtmpfs /dev
mount -t tmpfs tmpfs /tmp
exec </dev/console >/dev/console 2>&1
n=0
failed=0
summary() {{
    sync
    printf '\\n{SUMMARY} iterations=%s failed=%s stop=%s\\n' "$n" "$failed" "$1"
    poweroff -f
    sleep 10
}}
modprobe virtio_blk || summary setup-modprobe-virtio_blk
tries=0
while [ ! -b /dev/vda ]; do
    tries=$((tries + 1))
    [ $tries -le 100 ] || summary setup-no-/dev/vda
    sleep 0.1
done
# Hold the disk open: the kernel drops a block device's page cache when its last opener
# closes it, and the cached checks below need the cache to outlive each dd.
exec 3</dev/vda
odd="{" ".join(map(str, SLOT_SETS[0]))}"
even="{" ".join(map(str, SLOT_SETS[1]))}"
# Region $2 ("offset size" in MiB) in generation $1: the expected bytes, never stored.
region_data() {{
    yes "PYVHOST-MIG-REGION gen=$1" | head -c $(($2 << 20))
}}
# Check region "$1 $2" (offset, size in MiB) as the page cache (or the disk) has it against
# checksum $3; $4 names the check.
region_check() {{
    [ "$(dd if=/dev/vda bs=1M skip=$1 count=$2 2>/dev/null | md5sum)" = "$3" ] || bad="$bad $4"
}}
sectors_read() {{
    set -- $(cat /sys/block/vda/stat) # field 3: sectors read from the disk
    echo $3
}}
prev=
while [ $n -lt {MAX_ITERATIONS} ]; do
    n=$((n + 1))
    bad=
    if [ $((n % 2)) -eq 1 ]; then
        slots=$odd region="{REGION_MB[0][0]} {REGION_MB[0][1]}"
    else
        slots=$even region="{REGION_MB[1][0]} {REGION_MB[1][1]}"
    fi
    # The previous iteration's slots, read back from the disk then, are still in the page
    # cache: check them again from there (no disk read).
    before=$(sectors_read)
    for s in $prev; do
        dd if=/dev/vda of=/tmp/r bs={SLOT_BYTES} skip=$s count=1 2>/dev/null &&
            [ "$(md5sum </tmp/r)" = "$(md5sum </tmp/w$s)" ] || bad="$bad cached@$s"
    done
    cached_read=$(($(sectors_read) - before))
    for s in $slots; do
        yes "PYVHOST-MIG gen=$n slot=$s" | head -c {SLOT_BYTES} >/tmp/w$s
        dd if=/tmp/w$s of=/dev/vda bs={SLOT_BYTES} seek=$s count=1 2>/dev/null ||
            bad="$bad write@$s"
    done
    region_data $n ${{region#* }} | dd of=/dev/vda bs=1M seek=${{region% *}} iflag=fullblock \
        oflag=direct 2>/dev/null || bad="$bad write-region@${{region% *}}"
    region_sum=$(region_data $n ${{region#* }} | md5sum)
    sync || bad="$bad sync"
    # The previous iteration's region, likewise, as late as possible: its pages only the
    # back-end wrote, so across a migration they reach the destination current only if it
    # logged its writes; the shorter the stretch from this check to the read-back below,
    # the likelier a switch-over falls where the destination checks such pages.
    before=$(sectors_read)
    [ -z "$prev" ] || region_check $prev_region "$prev_sum" cached-region@${{prev_region% *}}
    cached_read=$((cached_read + $(sectors_read) - before))
    echo 3 >/proc/sys/vm/drop_caches
    before=$(sectors_read)
    region_check $region "$region_sum" region@${{region% *}}
    for s in $slots; do
        if dd if=/dev/vda of=/tmp/r bs={SLOT_BYTES} skip=$s count=1 2>/dev/null; then
            [ "$(md5sum </tmp/r)" = "$(md5sum </tmp/w$s)" ] || bad="$bad checksum@$s"
        else
            bad="$bad read@$s"
        fi
    done
    read=$(($(sectors_read) - before))
    prev=$slots prev_region=$region prev_sum=$region_sum
    if [ -z "$bad" ]; then
        echo "{ITER} n=$n read=$read cached_read=$cached_read ok"
    else
        failed=$((failed + 1))
        echo "{ITER} n=$n read=$read cached_read=$cached_read FAIL$bad"
    fi
    [ "$(head -c {len(STOP_MARK)} /dev/vda)" = "{STOP_MARK.decode()}" ] && summary marker
    sleep {IDLE_S}
done
summary cap
"""


# --- the guest ----------------------------------------------------------------------


def _cpio_newc(files: dict[str, tuple[int, bytes]]) -> bytes:
    """A ``newc`` cpio archive of regular files (path -> (mode, content)), as the kernel
    unpacks into its initramfs."""
    out = bytearray()

    def entry(name: str, mode: int, data: bytes, ino: int) -> None:
        fields = (ino, mode, 0, 0, 1, 0, len(data), 0, 0, 0, 0, len(name) + 1, 0)
        out.extend(b"070701" + b"".join(b"%08X" % f for f in fields))
        out.extend(name.encode() + b"\0")
        out.extend(b"\0" * (-len(out) % 4))
        out.extend(data)
        out.extend(b"\0" * (-len(out) % 4))

    for ino, (name, (mode, data)) in enumerate(files.items(), start=1):
        entry(name, 0o100000 | mode, data, ino)
    entry("TRAILER!!!", 0, b"", 0)
    return bytes(out)


def workload_initrd(dest: Path) -> Path:
    """The harness's initramfs with the workload segment appended, written to ``dest``."""
    segment = _cpio_newc({INIT_PATH.lstrip("/"): (0o755, _WORKLOAD.encode())})
    dest.write_bytes(guest.guest_image().initrd.read_bytes() + gzip.compress(segment, mtime=0))
    return dest


# --- results ------------------------------------------------------------------------


class MigrationRefused(AssertionError):
    """QEMU refused to start the migration (``migrate`` answered an error): a migration
    blocker, such as a vhost-user back-end without ``LOG_SHMFD``."""

    def __init__(self, reason: str, detail: str) -> None:
        super().__init__(f"QEMU refused to migrate: {reason}\n{detail}")
        self.reason = reason


@dataclass(frozen=True)
class MigrationReport:
    """What a migration took (QEMU's ``query-migrate``) and where the workload ran."""

    total_time_ms: int
    downtime_ms: int
    setup_time_ms: int
    ram_transferred: int
    dirty_sync_count: int
    iterations: int
    """Workload iterations in all, every one passed."""
    source_lines: int
    """Iteration lines wholly on the source's console."""
    during_migration: int
    """Of those, printed while the migration ran."""
    destination_lines: int
    """Iteration lines wholly on the destination's console (printed after switch-over)."""
    statuses: tuple[str, ...] = ()
    """The migration states ``query-migrate`` went through, in order (``postcopy-active``
    when a postcopy switch-over happened)."""
    postcopy_requests: int = 0
    """Pages the destination asked the source for during postcopy (QEMU's
    ``ram.postcopy-requests``)."""

    def summary(self) -> str:
        return (
            f"migration completed: total {self.total_time_ms} ms, downtime "
            f"{self.downtime_ms} ms, setup {self.setup_time_ms} ms, "
            f"{self.ram_transferred / (1 << 20):.1f} MiB sent in {self.dirty_sync_count} "
            f"dirty syncs; workload: {self.iterations} iterations all passed, "
            f"{self.source_lines} on the source ({self.during_migration} during the "
            f"migration), {self.destination_lines} on the destination; states "
            f"{' -> '.join(self.statuses)}, {self.postcopy_requests} postcopy page requests"
        )


# --- the driver ---------------------------------------------------------------------


def _tails(source: guest.Guest, dest: guest.Guest) -> str:
    return (
        f"  source console tail:\n{guest._tail(source.output, 20)}\n"
        f"  destination console tail:\n{guest._tail(dest.output, 20)}"
    )


def _qmp(vm: guest.Guest) -> peers.Qmp:
    """A QMP connection to ``vm`` once its socket exists."""
    deadline = time.monotonic() + peers.START_TIMEOUT
    while not vm.qmp_path.is_socket():
        if not vm.alive() or time.monotonic() >= deadline:
            raise AssertionError(
                f"QEMU has no QMP socket {vm.qmp_path} (exit status {vm.proc.poll()})\n"
                f"  console tail:\n{guest._tail(vm.output)}"
            )
        time.sleep(POLL)
    return vm.qmp()


def _migrate(
    source: guest.Guest,
    dest: guest.Guest,
    uri: str,
    bandwidth: int | None,
    postcopy: bool = False,
) -> tuple[dict[str, Any], tuple[str, ...]]:
    """``migrate`` on the source, then ``query-migrate`` until ``completed``: its answer,
    and the states it went through.
    With ``postcopy``, the ``postcopy-ram`` capability is set on both QEMUs first and
    ``migrate-start-postcopy`` is sent as soon as the precopy is under way."""
    if postcopy:
        for vm in (dest, source):
            with _qmp(vm) as qmp:
                caps = [{"capability": "postcopy-ram", "state": True}]
                qmp.command("migrate-set-capabilities", capabilities=caps)
    with _qmp(source) as qmp:
        if bandwidth is not None:
            qmp.command("migrate-set-parameters", **{"max-bandwidth": bandwidth})
        try:
            qmp.command("migrate", uri=uri)
        except peers.QmpError as exc:
            raise MigrationRefused(str(exc), _tails(source, dest)) from exc
        deadline = time.monotonic() + MIGRATE_TIMEOUT
        switched = not postcopy
        statuses: list[str] = []
        while True:
            info: dict[str, Any] = qmp.command("query-migrate")
            status = info.get("status")
            if status and (not statuses or statuses[-1] != status):
                statuses.append(status)
            if not switched and status == "active":
                try:
                    qmp.command("migrate-start-postcopy")
                except peers.QmpError as exc:
                    raise MigrationRefused(str(exc), _tails(source, dest)) from exc
                switched = True
            if status == "completed":
                return info, tuple(statuses)
            if status in ("failed", "cancelled") or time.monotonic() >= deadline:
                why = info.get("error-desc", "no error-desc")
                late = "" if status in ("failed", "cancelled") else f" {MIGRATE_TIMEOUT:.0f}s in"
                raise AssertionError(
                    f"migration {status}{late}: {why}\n  query-migrate: {info}\n"
                    + _tails(source, dest)
                )
            time.sleep(POLL)


def _console(vm: guest.Guest) -> bytes:
    try:
        return vm.console_path.read_bytes()
    except OSError:
        return b""


def _text(raw: bytes) -> str:
    return raw.decode(errors="replace").replace("\r\n", "\n")


def _check_workload(joined: str, summary: re.Match[str]) -> int:
    """Every iteration on the joined console passed, numbered 1..N with no gap, and the
    summary agrees; returns N."""
    lines = [
        (int(m.group(1)), int(m.group(2)), int(m.group(3)), m.group(4))
        for m in ITER_RE.finditer(joined)
    ]
    numbers = [n for n, _, _, _ in lines]
    total, failed, stop = int(summary.group(1)), int(summary.group(2)), summary.group(3)
    bad = [f"n={n} {result}" for n, _, _, result in lines if result != "ok"]
    unread = [f"n={n} read {read}" for n, read, _, _ in lines if read < READ_SECTORS]
    uncached = [f"n={n} read {cached}" for n, _, cached, _ in lines if cached]
    problems = []
    if bad:
        problems.append(f"failed iterations: {'; '.join(bad)}")
    if unread:
        problems.append(
            f"iterations that read fewer than {READ_SECTORS} sectors back from the disk: "
            + "; ".join(unread)
        )
    if uncached:
        problems.append(
            "iterations whose checks from the page cache read the disk instead: "
            + "; ".join(uncached)
        )
    if numbers != list(range(1, total + 1)):
        problems.append(f"iteration lines {numbers} are not 1..{total}")
    if failed or stop != "marker":
        problems.append(f"summary: {summary.group(0).strip()} (expected failed=0 stop=marker)")
    if problems:
        raise AssertionError(
            "workload checks failed across the migration: "
            + "; ".join(problems)
            + f"\n  joined console tail:\n{guest._tail(joined)}"
        )
    return total


def migrate_mid_io(
    image: Path,
    source_socket: Path,
    dest_socket: Path,
    work_dir: Path,
    *,
    memory_mb: int = MEMORY_MB,
    bandwidth: int | None = MIGRATE_BANDWIDTH,
    postcopy: bool = False,
) -> MigrationReport:
    """Boot the workload on ``source_socket``'s back-end, live-migrate it to a QEMU on
    ``dest_socket``'s back-end (both serve ``image``, at least :data:`IMAGE_BYTES`), stop
    it once the destination has run iterations, and check them all.

    ``work_dir`` (short: it holds Unix sockets) receives the initramfs, both consoles
    and the QMP and migration sockets. ``bandwidth`` caps the migration (bytes/s, see
    :data:`MIGRATE_BANDWIDTH`; None: QEMU's default). Raises :class:`MigrationRefused`
    when QEMU will not migrate, AssertionError (with both consoles) for anything else
    that goes wrong. ``postcopy`` switches the migration to postcopy once it runs (see
    :func:`_migrate`).
    """
    if image.stat().st_size < IMAGE_BYTES:
        raise ValueError(f"image {image} is smaller than {IMAGE_BYTES} bytes")
    with open(image, "r+b") as f:  # no stop mark left by an earlier run
        f.write(bytes(len(STOP_MARK)))
    initrd = workload_initrd(work_dir / "migrate-initrd.gz")
    # init_on_alloc=0: Debian's kernel zeroes every page it allocates, so a page cache page
    # is dirtied by the CPU a moment before the disk's data lands in it, and QEMU resends it
    # whether or not the back-end logged its write: that would hide a back-end that does not.
    append = ["console=ttyS0", "quiet", "panic=-1", "init_on_alloc=0", f"rdinit={INIT_PATH}"]
    mig_uri = f"unix:{work_dir / 'mig.sock'}"

    def qemu(name: str, socket: Path, extra: list[str]) -> guest.Guest:
        qmp_path = work_dir / f"{name}.qmp"
        argv = guest.boot_args(
            initrd=initrd, append=append, memory_mb=memory_mb, smp=1, qmp_path=qmp_path
        )
        argv += [*guest.vhost_user_blk_args(socket), *extra]
        return guest.Guest(argv, work_dir, work_dir / f"{name}.console", qmp_path, ())

    with contextlib.ExitStack() as stack:
        dest = stack.enter_context(qemu("destination", dest_socket, ["-incoming", mig_uri]))
        source = stack.enter_context(qemu("source", source_socket, []))
        source.wait_for(ITER_RE, BOOT_TIMEOUT, count=PRE_ITERATIONS)
        with _qmp(dest) as qmp:
            state = qmp.query_status()
        if state != "inmigrate":
            raise AssertionError(f"destination QEMU is {state!r}, not 'inmigrate'")
        before = len(_console(source))
        info, statuses = _migrate(source, dest, mig_uri, bandwidth, postcopy)
        ram: dict[str, Any] = info.get("ram", {})

        dest.wait_for(ITER_RE, DEST_TIMEOUT, count=MIN_DEST_LINES)
        with open(image, "r+b") as f:
            f.write(STOP_MARK)
            f.flush()
            os.fsync(f.fileno())
        summary = dest.wait_for(SUMMARY_RE, DEST_TIMEOUT)
        ended = dest.wait(DEST_TIMEOUT)
        if ended.returncode != 0:
            raise AssertionError(
                f"destination QEMU exited with status {ended.returncode} after the "
                f"workload\n{_tails(source, dest)}"
            )
        src_raw, dst_raw = _console(source), _console(dest)
        total = _check_workload(_text(src_raw + dst_raw), summary)
        return MigrationReport(
            total_time_ms=int(info["total-time"]),
            downtime_ms=int(info.get("downtime", -1)),
            setup_time_ms=int(info.get("setup-time", -1)),
            ram_transferred=int(ram.get("transferred", 0)),
            dirty_sync_count=int(ram.get("dirty-sync-count", 0)),
            iterations=total,
            source_lines=len(ITER_RE.findall(_text(src_raw))),
            during_migration=len(ITER_RE.findall(_text(src_raw[before:]))),
            destination_lines=len(ITER_RE.findall(_text(dst_raw))),
            statuses=statuses,
            postcopy_requests=int(ram.get("postcopy-requests", 0)),
        )
    raise AssertionError("unreachable")  # for mypy: the with block returns or raises


# --- a back-end that does not log: the rig's own check ----------------------------------


class LogHidingRelay:
    """Listens on ``listen_path`` and relays one front-end to the back-end at
    ``backend_path``, handing the back-end a decoy (a fresh memfd of the same size) in
    place of the front-end's dirty log (``SET_LOG_BASE``). The back-end logs into the
    decoy; the front-end sees a back-end that offers ``LOG_SHMFD`` but never marks a page:
    what a daemon with a broken dirty log looks like to QEMU.

    The front-end's stream is relayed message by message (each read stays inside one
    message, so the descriptors a read brings belong to that message).
    """

    def __init__(self, listen_path: Path, backend_path: Path) -> None:
        self.listen_path = listen_path
        self.backend_path = backend_path
        self._decoys: list[int] = []
        self.error: BaseException | None = None
        self._listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
        self._listener.bind(os.fspath(listen_path))
        self._listener.listen(1)
        self._listener.settimeout(peers.START_TIMEOUT)
        self._socks: list[socket.socket] = []
        self._threads: list[threading.Thread] = []
        self._accept = threading.Thread(target=self._guard(self._run), daemon=True)

    def __enter__(self) -> LogHidingRelay:
        self._accept.start()
        return self

    def __exit__(self, *exc: object) -> None:
        for sock in (self._listener, *self._socks):
            with contextlib.suppress(OSError):
                sock.shutdown(socket.SHUT_RDWR)
        for thread in (self._accept, *self._threads):
            thread.join(peers.STOP_TIMEOUT)
        for sock in (self._listener, *self._socks):
            sock.close()
        for fd in self._decoys:
            os.close(fd)
        self._decoys.clear()
        with contextlib.suppress(FileNotFoundError):
            self.listen_path.unlink()

    def hidden_pages(self) -> int:
        """Pages the back-end marked in the decoy logs: what QEMU never saw."""
        marked = 0
        for fd in self._decoys:
            data = os.pread(fd, os.fstat(fd).st_size, 0)
            marked += sum(bin(byte).count("1") for byte in data)
        return marked

    def _guard(self, body: Callable[[], None]) -> Callable[[], None]:
        def run() -> None:
            try:
                body()
            except OSError as exc:  # a socket closed under the relay ends it
                if self.error is None and not isinstance(exc, ConnectionError):
                    self.error = exc

        return run

    def _run(self) -> None:
        front, _ = self._listener.accept()
        back = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
        self._socks += [front, back]
        back.connect(os.fspath(self.backend_path))
        self._threads = [
            threading.Thread(target=self._guard(lambda: self._requests(front, back))),
            threading.Thread(target=self._guard(lambda: self._replies(back, front))),
        ]
        for thread in self._threads:
            thread.start()

    @staticmethod
    def _read(sock: socket.socket, size: int, fds: list[int]) -> bytes | None:
        data = b""
        while len(data) < size:
            chunk, got, _flags, _addr = socket.recv_fds(sock, size - len(data), 16)
            fds += got
            if not chunk:
                return None
            data += chunk
        return data

    def _requests(self, front: socket.socket, back: socket.socket) -> None:
        while True:
            fds: list[int] = []
            try:
                header = self._read(front, _HEADER.size, fds)
                request, _flags, size = _HEADER.unpack(header) if header else (0, 0, 0)
                payload = self._read(front, size, fds) if header else None
                if header is None or payload is None:  # the front-end hung up
                    back.shutdown(socket.SHUT_WR)
                    return
                if request == FrontendRequest.SET_LOG_BASE and fds:
                    fds[0] = self._decoy_for(fds[0])
                message = header + payload
                sent = socket.send_fds(back, [message], fds) if fds else 0
                back.sendall(message[sent:])
            finally:
                for fd in fds:
                    os.close(fd)

    def _decoy_for(self, log_fd: int) -> int:
        """A fresh memfd as large as the front-end's log (which is closed), kept open here
        to count what the back-end marks in it."""
        decoy = os.memfd_create("pyvhost-decoy-log", os.MFD_CLOEXEC)
        os.ftruncate(decoy, os.fstat(log_fd).st_size)
        os.close(log_fd)
        self._decoys.append(os.dup(decoy))
        return decoy

    @staticmethod
    def _replies(back: socket.socket, front: socket.socket) -> None:
        while True:
            data, fds, _flags, _addr = socket.recv_fds(back, 65536, 16)
            try:
                if not data:
                    front.shutdown(socket.SHUT_WR)
                    return
                sent = socket.send_fds(front, [data], fds) if fds else 0
                front.sendall(data[sent:])
            finally:
                for fd in fds:
                    os.close(fd)
