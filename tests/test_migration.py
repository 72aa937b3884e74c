"""Issue 10: QEMU live-migrates a guest in the middle of disk I/O from one vhost-user-blk
back-end to another serving the same image (``tests/migration.py`` has the guest and the
driver; each run prints QEMU's migration times, shown by ``pytest -rP``).

qemu-storage-daemon is the control: it logs dirty pages, so the migration completes and
every read-back check passes on the destination; with its log hidden from QEMU the same
run must fail (the rig can tell a back-end that logs from one that does not). ``serve
blk`` (native and ``--python``) then passes the same run only if its own log is right.
"""

from __future__ import annotations

import contextlib
import shutil
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

import migration
from daemon_util import ServeProc
from peers import make_image, qemu_storage_daemon_blk

# Arguments both `serve blk` daemons take to serve one image at once (source and
# destination of the migration). `serve blk` locks its image the way QEMU does, and the
# destination's daemon must be serving before the source's stops, so both opt out, like
# qemu-storage-daemon's locking=off below; a lock handover at switch-over would drop this.
SHARED_IMAGE_ARGS: tuple[str, ...] = ("--no-lock",)


def _report(report: migration.MigrationReport, record: Callable[[str, object], None]) -> None:
    print(report.summary())
    record("migration_total_time_ms", report.total_time_ms)
    record("migration_downtime_ms", report.downtime_ms)


def test_migration_qemu_storage_daemon(
    tmp_sock_dir: Path, record_property: Callable[[str, object], None]
) -> None:
    """The control: qemu-storage-daemon as source and destination back-end on one image
    (``locking=off`` on both: each daemon would otherwise hold the image's write lock)."""
    image = make_image(tmp_sock_dir / "disk.img", migration.IMAGE_BYTES)
    with (
        qemu_storage_daemon_blk(image, tmp_sock_dir / "a.sock", locking=False) as a,
        qemu_storage_daemon_blk(image, tmp_sock_dir / "b.sock", locking=False) as b,
    ):
        report = migration.migrate_mid_io(image, a.socket_path, b.socket_path, tmp_sock_dir)
        assert a.alive() and b.alive(), f"a back-end died:\n{a.output()}\n{b.output()}"
    _report(report, record_property)


# Migrations the rig gets to catch a back-end that does not log: one catches it when the
# switch-over falls between a read-back and the next cached check (7 of 8 runs measured).
CATCH_ATTEMPTS = 3


def test_migration_catches_a_backend_that_does_not_log() -> None:
    """The rig's own proof: the control run, but the source's qemu-storage-daemon logs into
    a decoy (``LogHidingRelay``), so QEMU sees a back-end that offers ``LOG_SHMFD`` and
    never marks a page. The destination must then find stale data in its page cache
    (pages that back-end filled during the precopy): else a passing run on our daemon
    would prove nothing about its log."""
    passed = []
    for attempt in range(CATCH_ATTEMPTS):
        work = Path(tempfile.mkdtemp(prefix="pv-", dir="/tmp"))  # short: Unix sockets
        try:
            image = make_image(work / "disk.img", migration.IMAGE_BYTES)
            with (
                qemu_storage_daemon_blk(image, work / "a.sock", locking=False) as a,
                qemu_storage_daemon_blk(image, work / "b.sock", locking=False) as b,
                migration.LogHidingRelay(work / "hide.sock", a.socket_path) as relay,
            ):
                try:
                    report = migration.migrate_mid_io(image, relay.listen_path, b.socket_path, work)
                except AssertionError as exc:
                    assert "workload checks failed" in str(exc), str(exc)
                    assert "FAIL cached" in str(exc), str(exc)
                    assert relay.hidden_pages() > 0, "the back-end never logged: no proof"
                    assert relay.error is None, f"relay failed: {relay.error!r}"
                    print(f"caught at attempt {attempt + 1}: {str(exc).splitlines()[0]}")
                    return
                passed.append(report.summary())
        finally:
            shutil.rmtree(work, ignore_errors=True)
    pytest.fail(
        f"{CATCH_ATTEMPTS} migrations with the dirty log hidden all passed:\n" + "\n".join(passed)
    )


@contextlib.contextmanager
def _serve_blk(image: Path, socket: Path, engine: str) -> Iterator[ServeProc]:
    args = ["blk", "--image", str(image), *SHARED_IMAGE_ARGS]
    if engine == "python":
        args.append("--python")
    daemon = ServeProc(args, socket, socket.with_suffix(".log"))
    try:
        yield daemon
    finally:
        daemon.close()


@pytest.mark.parametrize("engine", ["native", "python"])
def test_migration_serve_blk(
    engine: str, tmp_sock_dir: Path, record_property: Callable[[str, object], None]
) -> None:
    """`serve blk` A -> `serve blk` B on one image, native device and ``--python``: the
    daemon logs what it writes into guest memory, so the destination's cached checks of
    pages A filled during the precopy pass (see the test above for what a missing log
    does). Before the daemon logged, QEMU refused: "Migration disabled: vhost-user backend
    lacks VHOST_USER_PROTOCOL_F_LOG_SHMFD feature." (``migration.MigrationRefused``)."""
    image = make_image(tmp_sock_dir / "disk.img", migration.IMAGE_BYTES)
    with (
        _serve_blk(image, tmp_sock_dir / "a.sock", engine) as a,
        _serve_blk(image, tmp_sock_dir / "b.sock", engine) as b,
    ):
        report = migration.migrate_mid_io(image, a.socket_path, b.socket_path, tmp_sock_dir)
        assert a.alive() and b.alive(), f"a daemon died:\n{a.stderr()}\n{b.stderr()}"
    _report(report, record_property)


@pytest.mark.parametrize("engine", ["native", "python"])
def test_postcopy_migration_serve_blk(
    engine: str, tmp_sock_dir: Path, record_property: Callable[[str, object], None]
) -> None:
    """The same migration switched to postcopy (``postcopy-ram`` on both QEMUs,
    ``migrate-start-postcopy`` as soon as the precopy runs): the destination's
    ``serve blk`` gets POSTCOPY_ADVISE, LISTEN, the memory region in postcopy's form
    (ADD_MEM_REG answered with its base, then QEMU's ack) and END, and registers guest
    memory with its userfaultfd in between, so its device waits for pages QEMU has not
    received yet while the guest runs its checks on the destination. Before the daemon
    offered PAGEFAULT, ``migrate`` failed (QEMU's vhost-user postcopy probe refuses a
    back-end without it)."""
    image = make_image(tmp_sock_dir / "disk.img", migration.IMAGE_BYTES)
    with (
        _serve_blk(image, tmp_sock_dir / "a.sock", engine) as a,
        _serve_blk(image, tmp_sock_dir / "b.sock", engine) as b,
    ):
        report = migration.migrate_mid_io(
            image, a.socket_path, b.socket_path, tmp_sock_dir, postcopy=True
        )
        assert a.alive() and b.alive(), f"a daemon died:\n{a.stderr()}\n{b.stderr()}"
    _report(report, record_property)
    assert "postcopy-active" in report.statuses, report.summary()
    assert report.postcopy_requests > 0, report.summary()
