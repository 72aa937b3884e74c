"""The exceptions of ``vhost``: one hierarchy, rooted at :class:`VhostError`.

Every failure the package reports is a :class:`VhostError`. Where a failure is also an
instance of a built-in category, the class inherits that category too, so generic code
keeps working: an ``except OSError`` around an ioctl still catches :class:`KernelError`,
an ``except FileNotFoundError`` around a connect catches a missing socket, and an
``except ValueError`` around argument handling still catches :class:`InvalidParamError`.

::

    VhostError (Exception)
    +-- ProtocolError              the peer broke the vhost-user protocol
    |   +-- PartialMessageError    ... by stopping in the middle of a message
    +-- DisconnectedError          (also ConnectionError) clean close on a message boundary
    +-- InactiveFeatureError       a request needs a feature that was not negotiated
    +-- NotSupportedError          the peer or the handler does not implement a request
    +-- RequestRefusedError        the peer answered a REPLY_ACK with a non-zero status
    +-- InvalidParamError          (also ValueError) a value the protocol or the API forbids
    +-- InvalidMemoryError         (also ValueError) an address, size or file that does not fit
    +-- InvalidQueueError          (also ValueError) a bad queue index or queue state
    +-- QueueError                 a virtqueue's ring is corrupt; the queue stays broken
    |   +-- QueueFullError         ... or has no room for a buffer (the queue stays usable)
    +-- KernelError                (also OSError) a system call failed; carries ``errno``
    +-- VhostOSError               (also OSError) connecting to or binding a socket path
    |   |                          failed; ``filename`` is the path, ``operation`` the step
    |   +-- VhostFileNotFoundError      (also FileNotFoundError)      ENOENT
    |   +-- VhostConnectionRefusedError (also ConnectionRefusedError) ECONNREFUSED
    |   +-- VhostPermissionError        (also PermissionError)        EACCES, EPERM
    |   +-- VhostNotADirectoryError     (also NotADirectoryError)     ENOTDIR
    |   +-- VhostTimeoutError           (also TimeoutError) ETIMEDOUT; also the peer did
    |                                   not answer a request in time
    +-- ClosedError                the object was closed, or failed earlier and stays failed

Where each error of the Rust core surfaces (the native glue converts each one in a single
place, so a Rust error never reaches Python as a bare ``RuntimeError``):

=============================================  ================================================
Rust core error (``user::Error`` and friends)  Python exception
=============================================  ================================================
``Disconnected``                               :class:`DisconnectedError`
``PartialMessage``                             :class:`PartialMessageError`
``InvalidHeader``, ``UnknownRequest``,         :class:`ProtocolError`
``OversizedMessage``, ``InvalidSize``,
``FdCount``, ``TooManyFds``,
``ReplyMismatch``
``InvalidParam``                               :class:`InvalidParamError`
``InactiveFeature``                            :class:`InactiveFeatureError`
``NotSupported``                               :class:`NotSupportedError`
``Refused``                                    :class:`RequestRefusedError`
``Handler`` (a back-end handler failed)        :class:`VhostError` with the handler's message
``Timeout``, ``ReplyTimeout`` (names the       :class:`VhostTimeoutError`
request and the bound)
``sys::PathError`` (connect or bind on a       :class:`VhostOSError`, the subclass for its
socket path)                                   errno (see the tree above), ``filename`` set
``Closed``                                     :class:`ClosedError`
``Memory`` (guest memory layer)                :class:`InvalidMemoryError`
``Io`` (sockets, mmap, eventfd), kernel vhost  :class:`KernelError` with that ``errno``
and vDPA ioctls                                (``EIO`` when the error carries none)
``VringError::InvalidSize``, ``Misaligned``    :class:`InvalidQueueError`
``VringError::Memory``                         :class:`InvalidMemoryError`
``VringError::QueueFull``                      :class:`QueueFullError`
``VringError``, a bad caller argument          :class:`InvalidParamError`
(``add_used`` head or length, empty buffer)
``VringError``, any other (corrupt ring,       :class:`QueueError`
``Broken``)
=============================================  ================================================

Design notes:

- :class:`InvalidMemoryError` is a ``ValueError``: every case (a guest address outside all
  regions, overlapping regions, a size that overflows, a file smaller than the region)
  is a value that does not fit the memory map, whoever supplied it. Failures of the
  system calls themselves (``mmap`` returning ``ENOMEM``) are :class:`KernelError`.
- The Rust glue builds these exceptions positionally, in the order of each ``__init__``
  (``InactiveFeatureError(request, feature, message)``,
  ``RequestRefusedError(request, status, message)``, ``KernelError(errno, strerror)``).
- :class:`VhostOSError` is ``KernelError``'s sibling for socket paths: ``KernelError`` is
  for ioctls and syscalls on objects we hold, ``VhostOSError`` for a path that could not be
  connected to or bound. Like ``OSError`` itself, ``VhostOSError(errno, strerror,
  filename, operation=...)`` returns the subclass for ``errno``; ``str()`` reads
  ``"connect to /run/vhost.sock: No such file or directory"``. A path longer than a Unix
  socket address holds (107 bytes) is ``ENAMETOOLONG`` with the limit in the message.
- Ctrl-C: every blocking call of the package (reply waits, accept, connect, eventfd reads)
  raises ``KeyboardInterrupt`` promptly. An interrupted front-end request leaves the
  connection closed (:class:`ClosedError` afterwards: a late reply would desynchronise the
  stream); an interrupted ``EventFd.read`` or ``accept`` leaves the object usable.
- :class:`ProtocolError` is not a ``ValueError``: it blames the peer, not the caller. After
  a protocol error the connection is closed, and later calls raise :class:`ClosedError`.
- The classes that take extra attributes pickle with them (they cross process boundaries
  in test rigs that use ``multiprocessing``).
"""

from __future__ import annotations

import errno as _errno
import os
from typing import Any, Self, cast

__all__ = [
    "ClosedError",
    "DisconnectedError",
    "InactiveFeatureError",
    "InvalidMemoryError",
    "InvalidParamError",
    "InvalidQueueError",
    "KernelError",
    "NotSupportedError",
    "PartialMessageError",
    "ProtocolError",
    "QueueError",
    "QueueFullError",
    "RequestRefusedError",
    "VhostConnectionRefusedError",
    "VhostError",
    "VhostFileNotFoundError",
    "VhostNotADirectoryError",
    "VhostOSError",
    "VhostPermissionError",
    "VhostTimeoutError",
]


class VhostError(Exception):
    """Base class of every exception raised by ``vhost``.

    Catch this to handle any failure of the package; catch a subclass to handle one kind.
    """

    #: The constructor's arguments in order, by attribute name (``"message"``: the
    #: message), so a subclass with extra fields pickles and copies whole (an error
    #: crossing a process boundary keeps its request name, status, address...).
    _init_args: tuple[str, ...] = ()

    def __reduce__(self) -> str | tuple[Any, ...]:
        if not self._init_args:
            return super().__reduce__()
        args = tuple(
            _message(self) if name == "message" else getattr(self, name)
            for name in self._init_args
        )
        return (type(self), args, self.__dict__)


class ProtocolError(VhostError):
    """The peer broke the vhost-user protocol.

    Raised for a malformed header (wrong version, reserved or misplaced flag bits), an
    unknown request code, a body whose size does not match the request, the wrong number
    of file descriptors, or a reply that does not answer the request it follows. The
    connection is closed when this is raised (with a NACK first if the peer asked for a
    REPLY_ACK).

    ``request`` names the request involved (``"SET_VRING_NUM"``) when it is known.
    """

    _init_args = ("message", "request")
    request: str | None

    def __init__(self, message: str, request: str | None = None) -> None:
        super().__init__(message)
        self.request = request


class PartialMessageError(ProtocolError):
    """The peer closed or stalled in the middle of a message (header, body or fds).

    A close exactly on a message boundary is :class:`DisconnectedError` instead.
    """


class DisconnectedError(VhostError, ConnectionError):
    """The peer closed the connection cleanly, between two messages.

    A ``ConnectionError``, so generic socket code catches it. (A send that fails because
    the peer has gone is a :class:`KernelError` with ``EPIPE`` or ``ECONNRESET``.)
    """


class InactiveFeatureError(VhostError):
    """A request needs a (protocol) feature that was not negotiated.

    For example ``GET_CONFIG`` without ``ProtocolFeature.CONFIG``, or ``ADD_MEM_REG``
    without ``ProtocolFeature.CONFIGURE_MEM_SLOTS``. ``request`` is the request name and
    ``feature`` the name of the missing feature.
    """

    _init_args = ("request", "feature", "message")
    request: str
    feature: str

    def __init__(self, request: str, feature: str, message: str | None = None) -> None:
        if message is None:
            message = f"{request} needs {feature}, which was not negotiated"
        super().__init__(message)
        self.request = request
        self.feature = feature


class NotSupportedError(VhostError):
    """The peer, or the local request handler, does not implement a request.

    ``request`` names the request when it is known.
    """

    _init_args = ("message", "request")
    request: str | None

    def __init__(self, message: str, request: str | None = None) -> None:
        super().__init__(message)
        self.request = request


class RequestRefusedError(VhostError):
    """The peer answered a request sent with NEED_REPLY (REPLY_ACK) with a non-zero status.

    The connection stays usable: the peer followed the protocol and said no. ``request``
    is the request name and ``status`` the u64 the peer returned.
    """

    _init_args = ("request", "status", "message")
    request: str
    status: int

    def __init__(self, request: str, status: int, message: str | None = None) -> None:
        if message is None:
            message = f"{request} was refused by the peer (status {status})"
        super().__init__(message)
        self.request = request
        self.status = status


class InvalidParamError(VhostError, ValueError):
    """An argument, or a field of a well-framed message, has a value that is not allowed.

    Raised by the validation of the value types in :mod:`vhost.types`, and when a peer
    sends, for example, feature bits that were never offered or a second ``SET_OWNER``.
    """


class InvalidMemoryError(VhostError, ValueError):
    """An address, size or file does not fit the guest memory map.

    Raised for a guest address (or range) outside every region, regions that overlap,
    a region whose file is smaller than its offset plus size, or a log area too small for
    the memory it must cover. ``address`` is the offending address when there is one.
    """

    _init_args = ("message", "address")
    address: int | None

    def __init__(self, message: str, address: int | None = None) -> None:
        super().__init__(message)
        self.address = address


class InvalidQueueError(VhostError, ValueError):
    """A queue index is out of range, or the queue is not in a state that allows the call.

    For example an index not below the number of queues, a size that is not allowed for
    the ring layout, or a change to a queue that is running. ``index`` is the queue index
    when there is one.
    """

    _init_args = ("message", "index")
    index: int | None

    def __init__(self, message: str, index: int | None = None) -> None:
        super().__init__(message)
        self.index = index


class QueueError(VhostError):
    """A virtqueue cannot go on: the peer wrote something invalid into the ring.

    A descriptor loop, a chain longer than the queue, a head out of range or offered twice,
    an index that jumps, a used element for a buffer not in flight... The queue is broken
    afterwards (its ``broken`` property is true): every later data-path call raises
    ``QueueError`` again until the queue is rebuilt (after a device reset).
    """


class QueueFullError(QueueError):
    """The driver side has too few free descriptors for the buffer; the queue stays usable.

    Collect used buffers (``Virtqueue.poll_used``) and try again.
    """


class KernelError(VhostError, OSError):
    """A system call failed: a kernel vhost or vDPA ioctl, mmap, sendmsg, eventfd...

    Constructed like ``OSError``: ``KernelError(errno, strerror[, filename])``; ``errno``,
    ``strerror`` and ``filename`` have their ``OSError`` meaning. It is an ``OSError``, so
    code that checks ``exc.errno`` (``EBUSY`` for a second ``VHOST_SET_OWNER``, ``ENOBUFS``
    for a queue index out of range) works unchanged.
    """


class VhostOSError(VhostError, OSError):
    """An operation on a file-system path failed: connecting to or binding a Unix
    socket, opening or locking a disk image.

    Constructed like ``OSError``: ``VhostOSError(errno, strerror, filename,
    operation="connect to")``, and like ``OSError`` it returns the subclass that matches
    ``errno`` (:class:`VhostFileNotFoundError` for ``ENOENT``...), so ``except
    FileNotFoundError`` and ``except VhostError`` both work. ``filename`` is the
    path, ``operation`` what was tried (``"connect to"``, ``"bind"``, ``"listen on"``,
    ``"open image"``, ``"lock image"``: a lock held elsewhere is ``EBUSY``), and ``str()``
    says both: ``"connect to /run/vhost.sock: No such file or directory"``.
    """

    operation: str | None

    def __new__(cls, *args: Any, operation: str | None = None) -> Self:
        chosen: type[VhostOSError] = cls
        if cls is VhostOSError and args and isinstance(args[0], int):
            chosen = _BY_ERRNO.get(args[0], VhostOSError)
        return cast(Self, super().__new__(chosen, *args))

    def __init__(self, *args: Any, operation: str | None = None) -> None:
        super().__init__(*args)
        self.operation = operation

    def __str__(self) -> str:
        if self.operation is not None and self.filename is not None:
            return f"{self.operation} {os.fsdecode(self.filename)}: {self.strerror}"
        return super().__str__()


class VhostFileNotFoundError(VhostOSError, FileNotFoundError):
    """The socket path does not exist (``ENOENT``): is the back-end running?"""


class VhostConnectionRefusedError(VhostOSError, ConnectionRefusedError):
    """Nobody listens at the path (``ECONNREFUSED``): a stale socket left by a back-end
    that exited, or a file that is not a socket."""


class VhostPermissionError(VhostOSError, PermissionError):
    """The socket, or a directory on its path, may not be used (``EACCES``, ``EPERM``)."""


class VhostNotADirectoryError(VhostOSError, NotADirectoryError):
    """A component of the socket path is not a directory (``ENOTDIR``)."""


class VhostTimeoutError(VhostOSError, TimeoutError):
    """The peer did not answer within the configured timeout.

    For a request, the message names the request and the bound, and says when nothing at
    all has come back on the connection yet (a back-end serving one front-end at a time,
    like ``python -m vhost serve blk``, answers the next only when the current one
    disconnects). The connection is closed afterwards: a late reply would desynchronise
    the stream. For a connect (``ETIMEDOUT``, ``filename`` set), the listener's backlog
    stayed full: the back-end is not accepting.
    """


#: The subclass :class:`VhostOSError` picks for an errno (others stay ``VhostOSError``).
_BY_ERRNO: dict[int, type[VhostOSError]] = {
    _errno.ENOENT: VhostFileNotFoundError,
    _errno.ECONNREFUSED: VhostConnectionRefusedError,
    _errno.EACCES: VhostPermissionError,
    _errno.EPERM: VhostPermissionError,
    _errno.ENOTDIR: VhostNotADirectoryError,
    _errno.ETIMEDOUT: VhostTimeoutError,
}


class ClosedError(VhostError):
    """The object was closed, or an earlier fatal error left it closed for good.

    Raised by every call on a closed back-end, connection or mapping, instead of an
    ``EBADF`` on a file descriptor number that may by now belong to another file.
    """


def _message(exc: BaseException) -> str:
    """The message an exception was built with (its first argument), for ``__reduce__``."""
    return str(exc.args[0]) if exc.args else ""
