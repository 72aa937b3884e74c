"""The closing protocol the facade's resource holders share, written once.

A class holding an fd, a mapping or a connection is closed by :meth:`close` and is a
context manager that closes on exit, so no resource outlives its ``with`` block
(ADVERSARIAL: no leaked fd, thread or mapping). :class:`Closing` gives the
``with`` half to any class with a ``close()``; :class:`NativeHandle` also forwards
``close()`` and ``closed`` to the native object that owns the resource, for the thin
wrappers over a ``vhost._core`` class.
"""

from __future__ import annotations

import abc
from types import TracebackType
from typing import TYPE_CHECKING, Generic, Protocol, Self, TypeVar

__all__ = ["Closing", "NativeHandle"]


class _Closable(Protocol):
    """What :class:`NativeHandle` needs of its native object."""

    def close(self) -> None:
        """Releases the resource; idempotent."""

    @property
    def closed(self) -> bool:
        """Whether :meth:`close` ran."""


_N = TypeVar("_N", bound=_Closable)


class Closing(abc.ABC):
    """Mixin: ``with obj:`` returns ``obj`` and calls ``obj.close()`` on exit, also when
    the block raises (the exception then propagates)."""

    __slots__ = ()

    @abc.abstractmethod
    def close(self) -> None:
        """Releases what the object holds; idempotent."""

    def __enter__(self) -> Self:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()


class NativeHandle(Closing, Generic[_N]):
    """Mixin for a facade class over a native object (``self._native``) that owns the
    resource: :meth:`close` and :attr:`closed` are the native object's. Once closed,
    every other call raises :class:`~vhost.errors.ClosedError`."""

    __slots__ = ()

    if TYPE_CHECKING:
        _native: _N

    @property
    def closed(self) -> bool:
        """Whether :meth:`close` ran; every other call then raises ``ClosedError``."""
        return self._native.closed

    def close(self) -> None:
        """Releases the fd and mapping this object holds (idempotent); a peer that got
        them (a back-end) keeps its own copies."""
        self._native.close()
