"""The dirty log of live migration: which guest pages a back-end wrote.

While a VMM migrates a guest, it copies guest RAM page by page and must copy again every
page written after it was copied. The guest's own writes are tracked by the hypervisor; a
vhost back-end writes guest memory behind the guest's back (used rings, the buffers of
device-to-driver requests), so it records each write in a shared bitmap, the dirty log:
one bit per 4 KiB guest-physical page (:data:`~vhost.codes.VHOST_LOG_PAGE`), bit ``n % 8``
of byte ``n / 8`` for page ``n``, in the layout of the vhost-user spec and
``linux/vhost.h``.

:class:`DirtyLog` is that bitmap, mapped in this process (the Rust core does the bit work,
atomically: the other side sets or clears bits concurrently):

- a front-end :meth:`~DirtyLog.allocate`\\ s one for its guest memory, hands it to a
  vhost-user back-end with :meth:`vhost.user.Frontend.start_dirty_log` (or its
  :attr:`~DirtyLog.address` to kernel vhost's ``set_log_base``), and collects the dirty
  pages with :meth:`~DirtyLog.take`, which clears what it returns;
- a back-end written in Python :meth:`~DirtyLog.adopt`\\ s the log a front-end sent with
  ``SET_LOG_BASE`` and :meth:`~DirtyLog.mark`\\ s what it writes.
"""

from __future__ import annotations

import dataclasses
from typing import Self

from . import _core
from ._closing import NativeHandle
from .errors import InvalidParamError
from .types import DirtyLogRegion, _check_uint

__all__ = ["DirtyLog", "DirtyRange"]


@dataclasses.dataclass(frozen=True, slots=True)
class DirtyRange:
    """A run of dirty guest pages: guest-physical addresses ``[start, end)``, both
    multiples of 4 KiB."""

    start: int
    end: int

    @property
    def pages(self) -> int:
        """Number of 4 KiB pages in the run."""
        return (self.end - self.start) // 4096

    def __repr__(self) -> str:
        return f"DirtyRange(start={self.start:#x}, end={self.end:#x})"


class DirtyLog(NativeHandle[_core.DirtyLog]):
    """A dirty-page bitmap in shared memory (see the module documentation).

    Use it as a context manager, or :meth:`close` it: that unmaps the log and closes its
    fd (a back-end keeps its own mapping). Later calls raise
    :class:`~vhost.errors.ClosedError`.
    """

    __slots__ = ("_native",)

    def __init__(self, native: _core.DirtyLog) -> None:
        self._native = native

    @classmethod
    def allocate(cls, memory: _core.GuestMemory) -> Self:
        """A zeroed log covering every address of ``memory`` (up to the end of its highest
        region), in a new memfd sealed against resizing, sized in whole 64-bit words as
        QEMU sizes it."""
        return cls(_core.DirtyLog.allocate(memory))

    @classmethod
    def adopt(
        cls,
        fd: int | _core._HasFileno,
        mmap_size: int,
        mmap_offset: int,
        memory: _core.GuestMemory,
        *,
        require_sealed: bool = False,
    ) -> Self:
        """Back-end side: maps the log a front-end sent with ``SET_LOG_BASE`` (what
        :meth:`vhost.user.BackendHandler.set_log_base` receives). ``fd`` stays the
        caller's.

        Refused with :class:`~vhost.errors.InvalidMemoryError` before anything is mapped:
        a size of 0, ``mmap_offset + mmap_size`` overflowing 64 bits, a log with fewer bits
        than ``memory`` has pages, a file smaller than ``mmap_offset + mmap_size``, an fd
        that cannot be mapped (an eventfd, a socket, a read-only file) and, with
        ``require_sealed``, a file not sealed against shrinking. A size or offset that is
        not a u64 is :class:`~vhost.errors.InvalidParamError`.
        """
        size = _check_uint("DirtyLog.adopt", "mmap_size", mmap_size, 64)
        offset = _check_uint("DirtyLog.adopt", "mmap_offset", mmap_offset, 64)
        return cls(_core.DirtyLog.adopt(fd, size, offset, memory, require_sealed))

    @property
    def native(self) -> _core.DirtyLog:
        """The native log, for calls the facade does not wrap."""
        return self._native

    @property
    def region(self) -> DirtyLogRegion:
        """The shared area to hand to a back-end (``SET_LOG_BASE``); the fd stays owned
        by this log. Only an allocated log has one."""
        fd = self._native.fileno()
        if fd is None:
            raise InvalidParamError("an adopted dirty log has no fd to hand over")
        return DirtyLogRegion(mmap_size=self._native.size, mmap_offset=0, fd=fd)

    @property
    def size(self) -> int:
        """Bytes of the log."""
        return self._native.size

    @property
    def covers(self) -> int:
        """Guest-physical addresses below this are covered by the log."""
        return self._native.covers

    @property
    def address(self) -> int:
        """The log's address in this process: what kernel vhost's ``set_log_base`` takes."""
        return self._native.address

    def mark(self, gpa: int, length: int) -> None:
        """Marks every page a write of ``length`` bytes at ``gpa`` touched (``length`` 0
        marks nothing). A range past :attr:`covers` marks nothing and raises
        :class:`~vhost.errors.InvalidMemoryError`."""
        self._native.mark(gpa, length)

    def take(self) -> list[DirtyRange]:
        """The dirty pages, lowest first and coalesced into runs, clearing each bit as it
        is read (atomically: a page the back-end marks meanwhile is either in this result
        or still dirty for the next call)."""
        return [DirtyRange(start, end) for start, end in self._native.take()]

    def peek(self) -> list[DirtyRange]:
        """The dirty runs, as :meth:`take` returns them, without clearing anything."""
        return [DirtyRange(start, end) for start, end in self._native.peek()]

    def dirty_pages(self) -> int:
        """How many pages are dirty now (nothing is cleared)."""
        return self._native.dirty_pages()

    def __repr__(self) -> str:
        return repr(self._native).replace("<DirtyLog", "<vhost.DirtyLog", 1)
