"""Postcopy live migration, front-end side: resolving a back-end's page faults.

In postcopy migration the destination guest runs before all of its memory has arrived;
a page is fetched from the source when something touches it. A vhost-user back-end
touches guest memory behind the guest's back, so it takes part: with
``ProtocolFeature.PAGEFAULT`` negotiated, :meth:`vhost.user.Frontend.postcopy_advise`
returns the back-end's *userfaultfd*, :meth:`~vhost.user.Frontend.postcopy_listen` makes
the back-end register its mappings of guest memory with it, and from then on a device
that reads or writes a page this memory does not have yet (a fresh memfd page nobody
wrote) waits in the kernel. The memory table sent while listening is answered with the
back-end's own address of each region (:meth:`~vhost.user.Frontend.postcopy_regions`),
which is how a fault address, which is in the back-end's address space, becomes a
guest-physical one.

:class:`FaultResolver` is the loop a VMM runs meanwhile: :meth:`~FaultResolver.next_fault`
reports the page the back-end waits for by guest-physical address, and
:meth:`~FaultResolver.copy` puts the page's bytes in (``UFFDIO_COPY`` into the back-end's
mapping), which wakes the device. Where the bytes come from (the migration stream) is
the caller's business. :meth:`~vhost.user.Frontend.postcopy_end` ends it: the back-end
unregisters and closes its userfaultfd.

A typical sequence (``fe`` negotiated ``PAGEFAULT``)::

    uffd = fe.postcopy_advise()
    fe.postcopy_listen()
    fe.set_mem_table(regions_of(ram))      # answered with the back-end's bases
    with FaultResolver(uffd, fe.postcopy_regions()) as resolver:
        while (fault := resolver.next_fault(timeout=1.0)) is not None:
            resolver.copy(fault.guest_phys_addr, fetch_page(fault.guest_phys_addr))
    fe.postcopy_end()
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterable

from . import _core
from ._closing import NativeHandle
from .types import _check_uint

__all__ = ["PAGE_SIZE", "FaultResolver", "PageFault", "PostcopyRegion"]

PAGE_SIZE = 4096
"""Faults are reported and resolved in whole 4 KiB pages (shared memory's page size)."""


@dataclasses.dataclass(frozen=True, slots=True)
class PostcopyRegion:
    """Where the back-end mapped one region of guest memory: its answer to a memory table
    sent while postcopy listens. ``backend_addr`` is the back-end's address of
    ``guest_phys_addr``."""

    guest_phys_addr: int
    memory_size: int
    backend_addr: int

    def __repr__(self) -> str:
        return (
            f"PostcopyRegion(guest_phys_addr={self.guest_phys_addr:#x}, "
            f"memory_size={self.memory_size:#x}, backend_addr={self.backend_addr:#x})"
        )


@dataclasses.dataclass(frozen=True, slots=True)
class PageFault:
    """A page the back-end waits for: its guest-physical address (page-aligned), the
    back-end's address of it, and whether the device was writing (filling a buffer)
    rather than reading."""

    guest_phys_addr: int
    backend_addr: int
    write: bool

    def __repr__(self) -> str:
        return (
            f"PageFault(guest_phys_addr={self.guest_phys_addr:#x}, "
            f"backend_addr={self.backend_addr:#x}, write={self.write})"
        )


def _tuples(regions: Iterable[PostcopyRegion]) -> list[tuple[int, int, int]]:
    return [(r.guest_phys_addr, r.memory_size, r.backend_addr) for r in regions]


class FaultResolver(NativeHandle[_core.FaultResolver]):
    """Reads a back-end's page faults from the userfaultfd that
    :meth:`vhost.user.Frontend.postcopy_advise` returned, and resolves them by
    guest-physical address (see the module documentation).

    ``uffd`` stays the caller's (a duplicate is kept); ``regions`` are the back-end's
    mapping bases (:meth:`vhost.user.Frontend.postcopy_regions`), which
    :meth:`set_regions` replaces after a new memory table. One thread may wait in
    :meth:`next_fault` while others :meth:`copy`. Use it as a context manager or
    :meth:`close` it; later calls raise :class:`~vhost.errors.ClosedError`.

    A back-end blocked on a fault stays blocked until the page is resolved, the back-end
    unregisters (``POSTCOPY_END``), or its session ends (the daemon then unregisters,
    and the device sees a zero page where nothing was copied).
    """

    __slots__ = ("_native",)

    def __init__(
        self, uffd: int | _core._HasFileno, regions: Iterable[PostcopyRegion] = ()
    ) -> None:
        self._native = _core.FaultResolver(uffd, _tuples(regions))

    def set_regions(self, regions: Iterable[PostcopyRegion]) -> None:
        """Replaces the back-end's mapping bases (after a new memory table)."""
        self._native.set_regions(_tuples(regions))

    @property
    def regions(self) -> list[PostcopyRegion]:
        """The mapping bases faults are translated with."""
        return [PostcopyRegion(*r) for r in self._native.regions()]

    def next_fault(self, timeout: float | None = None) -> PageFault | None:
        """Waits up to ``timeout`` seconds (``None``: no bound) for the back-end's next
        fault; ``None`` if none came. Ctrl-C interrupts the wait. A fault outside every
        known region raises :class:`~vhost.errors.InvalidParamError` naming the address
        (stale bases: call :meth:`set_regions`); that faulting thread stays blocked."""
        fault = self._native.next_fault(timeout)
        return None if fault is None else PageFault(*fault)

    def copy(self, gpa: int, data: bytes | bytearray | memoryview) -> bool:
        """Puts ``data`` (whole pages) into the back-end's memory at guest-physical
        ``gpa`` (page-aligned, inside one region) and wakes whoever waits there. Returns
        ``False`` when the pages were already present: nothing is overwritten (the
        waiters are woken all the same). Bad ranges raise
        :class:`~vhost.errors.InvalidParamError`; a failed ioctl is
        :class:`~vhost.errors.KernelError` naming the address."""
        return self._native.copy(_check_uint("FaultResolver.copy", "gpa", gpa, 64), data)

    def zero(self, gpa: int, length: int) -> bool:
        """Resolves whole pages ``[gpa, gpa + length)`` with zeros (a page the source
        never wrote); ``False`` if they were already present."""
        return self._native.zero(
            _check_uint("FaultResolver.zero", "gpa", gpa, 64),
            _check_uint("FaultResolver.zero", "length", length, 64),
        )

    def wake(self, gpa: int, length: int) -> None:
        """Wakes the back-end's threads waiting on ``[gpa, gpa + length)`` after the pages
        were placed another way: written through the front-end's own mapping of the same
        shared memory, as QEMU does."""
        self._native.wake(
            _check_uint("FaultResolver.wake", "gpa", gpa, 64),
            _check_uint("FaultResolver.wake", "length", length, 64),
        )

    def fileno(self) -> int:
        """This resolver's handle on the userfaultfd (for a poll loop)."""
        return self._native.fileno()

    def __repr__(self) -> str:
        return repr(self._native).replace("<FaultResolver", "<vhost.FaultResolver", 1)
