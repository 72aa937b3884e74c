"""Issue 10: QEMU live-migrates a guest in the middle of disk I/O from one vhost-user-blk
back-end to another serving the same image (``tests/migration.py`` has the guest and the
driver; each run prints QEMU's migration times, shown by ``pytest -rP``).

qemu-storage-daemon is the control: it logs dirty pages, so the migration completes and
every read-back check passes on the destination. ``serve blk`` does not log yet: QEMU
refuses to migrate (no ``LOG_SHMFD``), which its tests assert through a strict xfail, so
they fail the day the daemon logs and the marker must go.
"""

from __future__ import annotations

import contextlib
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


def test_migration_catches_a_backend_that_does_not_log(tmp_sock_dir: Path) -> None:
    """The rig's own proof: the same control run, but the source's qemu-storage-daemon logs
    into a decoy (``LogHidingRelay``), so QEMU sees a back-end that offers ``LOG_SHMFD``
    and never marks a page. The destination must then find stale data in the page cache
    (pages that back-end filled during the precopy), or a passing run would prove nothing
    about our daemon's log."""
    image = make_image(tmp_sock_dir / "disk.img", migration.IMAGE_BYTES)
    with (
        qemu_storage_daemon_blk(image, tmp_sock_dir / "a.sock", locking=False) as a,
        qemu_storage_daemon_blk(image, tmp_sock_dir / "b.sock", locking=False) as b,
        migration.LogHidingRelay(tmp_sock_dir / "hide.sock", a.socket_path) as relay,
    ):
        with pytest.raises(AssertionError, match=r"workload checks failed") as failed:
            migration.migrate_mid_io(image, relay.listen_path, b.socket_path, tmp_sock_dir)
        assert "FAIL cached" in str(failed.value), str(failed.value)
        assert relay.hidden_pages() > 0, "the back-end never logged: the decoy proves nothing"
        assert relay.error is None, f"relay failed: {relay.error!r}"


class DirtyLogMissing(AssertionError):
    """QEMU refused the migration because the back-end does not log dirty pages."""


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


@pytest.mark.xfail(
    strict=True,
    raises=DirtyLogMissing,
    reason="issue 10: serve blk does not log dirty pages yet (QEMU refuses: LOG_SHMFD)",
)
@pytest.mark.parametrize("engine", ["native", "python"])
def test_migration_serve_blk(
    engine: str, tmp_sock_dir: Path, record_property: Callable[[str, object], None]
) -> None:
    """`serve blk` A -> `serve blk` B on one image, native device and ``--python``."""
    image = make_image(tmp_sock_dir / "disk.img", migration.IMAGE_BYTES)
    with (
        _serve_blk(image, tmp_sock_dir / "a.sock", engine) as a,
        _serve_blk(image, tmp_sock_dir / "b.sock", engine) as b,
    ):
        try:
            report = migration.migrate_mid_io(image, a.socket_path, b.socket_path, tmp_sock_dir)
        except migration.MigrationRefused as exc:
            if "LOG_SHMFD" in exc.reason:
                raise DirtyLogMissing(str(exc)) from exc
            raise
        assert a.alive() and b.alive(), f"a daemon died:\n{a.stderr()}\n{b.stderr()}"
    _report(report, record_property)
