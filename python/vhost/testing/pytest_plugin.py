"""pytest plugin of :mod:`vhost.testing` (registered through the ``pytest11`` entry point,
so installing pyvhost is enough; ``-p no:vhost`` turns it off).

The ``vhost_guest`` fixture boots guests for the test, stops them after it, and adds
each guest's commands and console to the report when the test fails::

    from vhost.testing import Device

    def test_my_rng(vhost_guest, my_rng_socket):
        guest = vhost_guest(Device("rng", my_rng_socket))
        assert len(guest.run("head -c 32 /dev/hwrng").stdout_bytes) == 32

``vhost_guest(*devices, **options)`` takes the arguments of :func:`vhost.testing.boot`
(its run dir defaults to one under the test's ``tmp_path``).
"""

from __future__ import annotations

from collections.abc import Generator, Iterator
from pathlib import Path
from typing import Any

import pytest

from .machine import Guest, boot
from .qemu import Device

__all__ = ["GuestFactory", "vhost_guest"]

_GUESTS = pytest.StashKey[list[Guest]]()


class GuestFactory:
    """What the ``vhost_guest`` fixture gives a test: call it to boot a guest."""

    def __init__(self, guests: list[Guest], tmp_path: Path) -> None:
        self._guests = guests
        self._tmp_path = tmp_path

    def __call__(self, *devices: Device, **options: Any) -> Guest:
        """Boot a guest with ``devices`` (options as for :func:`vhost.testing.boot`);
        it is stopped when the test ends."""
        if "run_dir" not in options:
            options["run_dir"] = self._tmp_path / f"guest-{len(self._guests)}"
        guest = boot(*devices, **options)
        self._guests.append(guest)
        return guest

    def __iter__(self) -> Iterator[Guest]:
        """The guests booted so far."""
        return iter(self._guests)


@pytest.fixture
def vhost_guest(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[GuestFactory]:
    """Boots Linux guests with vhost-user devices for this test (see the module doc)."""
    guests: list[Guest] = []
    request.node.stash[_GUESTS] = guests
    try:
        yield GuestFactory(guests, tmp_path)
    finally:
        for guest in guests:
            guest.close()


@pytest.hookimpl(wrapper=True)
def pytest_runtest_makereport(
    item: pytest.Item, call: pytest.CallInfo[None]
) -> Generator[None, pytest.TestReport, pytest.TestReport]:
    """Adds each guest's commands and console to the report of a failed test phase."""
    report = yield
    guests = item.stash.get(_GUESTS, [])
    if report.failed and guests:
        for i, guest in enumerate(guests):
            report.sections.append((f"vhost guest {i} ({report.when})", guest.report()))
    return report
