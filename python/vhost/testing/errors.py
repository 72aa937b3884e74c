"""Exceptions of :mod:`vhost.testing`; each message says what failed and where."""

from __future__ import annotations

__all__ = ["CommandFailed", "GuestError", "GuestFailed", "GuestSetupError"]


class GuestError(Exception):
    """Base of every error :mod:`vhost.testing` raises."""


class GuestSetupError(GuestError):
    """The guest cannot be started: QEMU, the kernel package or a build tool is missing
    (the message names it and how to install it), or an argument is unusable."""


class GuestFailed(GuestError, AssertionError):
    """The guest misbehaved: it did not boot, died, timed out, or a check on its result
    failed. The message carries the tail of the guest's serial console. It is an
    :class:`AssertionError` so that pytest reports it as a test failure."""


class CommandFailed(GuestFailed):
    """A command run in the guest exited with an unexpected status."""
