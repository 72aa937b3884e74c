"""The back-end daemon framework: serve a virtio device to vhost-user front-ends.

The daemon owns the whole vhost-user control plane (features, memory table, rings,
config space, status, reset) and runs the data plane on one Rust thread per queue, which
waits on the kick eventfd, pops descriptor chains in batches, hands them to the device,
completes them and signals the call eventfd (with EVENT_IDX suppression). A device only
says what it is and processes requests. Two kinds of device fit:

- native devices in Rust, such as :class:`BlkDevice` (virtio-blk over a file or RAM);
- devices written in Python: subclass :class:`Device` and implement :meth:`Device.process`,
  which gets a :class:`Batch` of chains and completes them. See
  :mod:`vhost.devices.rng` for a whole example.

The daemon serves one front-end at a time and survives it: when the front-end disconnects
or dies, that session's workers stop, its mappings and fds are released, and the next
front-end (a restarted QEMU, or QEMU's ``reconnect``) is served::

    from vhost.daemon import BlkDevice, Daemon

    with Daemon(BlkDevice("disk.img", num_queues=2), "/run/blk.sock"):
        ...  # QEMU: -chardev socket,id=c0,path=/run/blk.sock -device vhost-user-blk-pci,chardev=c0

:meth:`Daemon.serve_forever` blocks until SIGINT or SIGTERM and then stops cleanly.

The daemon reports what happens as :class:`DaemonEvent` values (a session started, a
request refused and why, a queue stopped, a session ended and how):
:meth:`Daemon.next_events`, or ``serve_forever(on_event=...)``. A refusal is where a
front-end's vague failure ("vhost start failed") gets its reason.

:class:`BlkDevice` (and :class:`vhost.devices.blkdev.PythonBlkDevice`, through
:class:`ImageFile`) serves raw images only: a file starting with another format's
signature (qcow2, QED, VMDK, VDI, VHDX, VHD, LUKS, ...), an empty file, or one whose size
is not a multiple of 512 is refused with ``InvalidParamError``. The image is locked the
way QEMU locks it (``lock=True``): a writer refuses to start while another program
writes the image or forbids writers, and the other program (another back-end, a
qemu-storage-daemon, QEMU) then refuses too; readers share with readers.
``force_share=True`` (read-only only) reads whatever others do, as ``qemu-img -U``;
``lock=False`` takes no locks. A lock held elsewhere is a
:class:`~vhost.errors.VhostOSError` with errno ``EBUSY``, the image as ``filename`` and
the holder named.

A device talks back to its front-end through :class:`FrontendLink` (``Device.frontend``
for a Python device, :attr:`Daemon.frontend` for any): a config-change notification,
shared objects, shared memory mappings, all on the back-end channel the front-end set up
(``BACKEND_REQ``). :meth:`Daemon.resize` grows a served disk and tells the front-end, so
a guest sees the new capacity without a reboot.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import inspect
import mmap
import os
import signal
import threading
from abc import ABC, abstractmethod
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass
from enum import StrEnum
from types import FrameType, MappingProxyType, TracebackType
from typing import Any, ClassVar, Literal, NamedTuple, Protocol, Self, cast, runtime_checkable

from . import _core
from .codes import MAX_SHMEM_REGIONS
from .errors import ClosedError, DisconnectedError, InvalidParamError, NotSupportedError

__all__ = [
    "Batch",
    "BlkDevice",
    "Daemon",
    "DaemonEvent",
    "DescriptorChain",
    "Device",
    "EventKind",
    "FrontendLink",
    "ImageFile",
    "Resized",
    "SessionEnd",
]

Batch = _core.Batch
BlkDevice = _core.BlkDevice
DescriptorChain = _core.DescriptorChain
ImageFile = _core.ImageFile
FrontendLink = _core.FrontendLink


class Resized(NamedTuple):
    """What :meth:`Daemon.resize` did, in 512-byte sectors."""

    old: int
    new: int
    #: Whether the front-end being served was told (``CONFIG_CHANGE_MSG``) and took it;
    #: False when no front-end was connected or the size did not change.
    notified: bool


@runtime_checkable
class Resizable(Protocol):
    """A device whose capacity can grow while it is served (:class:`BlkDevice`,
    :class:`vhost.devices.blkdev.PythonBlkDevice`)."""

    def resize(self, size: int | None = None) -> tuple[int, int, bool]:
        """Grows the capacity to the backing's size now (``size`` None) or to ``size`` bytes and
        tells the front-end; returns ``(old, new, notified)`` in 512-byte sectors."""


class EventKind(StrEnum):
    """What a :class:`DaemonEvent` reports."""

    #: A front-end connected and is being served.
    SESSION_STARTED = "session-started"
    #: A request was refused (a NACK or a failure status); the session goes on.
    REFUSED = "refused"
    #: A queue stopped on a corrupt ring or a failing device; the session goes on.
    QUEUE_FAILED = "queue-failed"
    #: One request was failed and its queue went on (behind a vIOMMU: a translation it
    #: needed was not given within the miss bound).
    REQUEST_FAILED = "request-failed"
    #: The session is over (``end`` says how); its fds and mappings are released.
    SESSION_ENDED = "session-ended"


class SessionEnd(StrEnum):
    """How a session ended (:attr:`DaemonEvent.end`)."""

    #: The front-end closed the connection between two messages.
    CLOSED = "closed"
    #: The daemon was stopped.
    STOPPED = "stopped"
    #: The front-end stalled inside a message for longer than ``stall_timeout``.
    STALLED = "stalled"
    #: The front-end broke the protocol, or a request that cannot be refused failed.
    FAILED = "failed"


@dataclass(frozen=True)
class DaemonEvent:
    """Something that happened to a :class:`Daemon`, reported as it happened.

    Without events a front-end's failure (QEMU's "vhost start failed") has no visible
    cause on the back-end: the daemon's reasons are here. Sessions are numbered from 1.
    """

    kind: EventKind
    session: int
    #: The refused request's name (``"SET_VRING_ADDR"``), for :attr:`EventKind.REFUSED`.
    request: str | None = None
    #: The queue's index, for :attr:`EventKind.QUEUE_FAILED` and
    #: :attr:`EventKind.REQUEST_FAILED`.
    queue: int | None = None
    #: How the session ended, for :attr:`EventKind.SESSION_ENDED`.
    end: SessionEnd | None = None
    #: Why, in words (every kind but :attr:`EventKind.SESSION_STARTED`).
    reason: str | None = None
    #: What the front-end's user probably has to change, when the daemon can tell.
    hint: str | None = None
    #: Whether this reports a failure (a refusal, a queue failure, a session that ended
    #: on an error rather than a close or a stop).
    error: bool = False

    def __str__(self) -> str:
        if self.kind is EventKind.SESSION_STARTED:
            text = f"session {self.session}: front-end connected"
        elif self.kind is EventKind.REFUSED:
            text = f"session {self.session}: {self.request} refused: {self.reason}"
        elif self.kind is EventKind.QUEUE_FAILED:
            text = f"session {self.session}: queue {self.queue} stopped: {self.reason}"
        elif self.kind is EventKind.REQUEST_FAILED:
            text = f"session {self.session}: {self.reason}"
        else:
            text = f"session {self.session} ended: {self.reason}"
        return f"{text} (hint: {self.hint})" if self.hint else text


def _event(raw: _core._EventTuple) -> DaemonEvent:
    kind, session, request, queue, end, reason, hint, error = raw
    return DaemonEvent(
        EventKind(kind),
        session,
        request,
        queue,
        None if end is None else SessionEnd(end),
        reason,
        hint,
        error,
    )


class Device(ABC):
    """A virtio device written in Python, served by :class:`Daemon`.

    Class attributes describe the device; the daemon reads them once when it is created.
    :meth:`process` runs on the queue's worker thread with the GIL held, once per batch of
    chains the driver made available; every chain should be completed with
    :meth:`Batch.complete` before it returns (chains left over are returned to the driver
    with nothing written, and an exception is reported through
    :func:`sys.unraisablehook`, so a bug never hangs the guest).

    :meth:`process` may be a coroutine (``async def process``) for a device that talks to
    asyncio services: it then runs on the event loop given to the daemon
    (:class:`vhost.aio.Daemon` gives its own), the worker waiting for it; see
    :class:`Daemon`'s ``loop``.
    """

    #: virtio device id (2 block, 4 entropy source, ...).
    device_type: ClassVar[int]
    #: Device-specific feature bits (the daemon adds VERSION_1, EVENT_IDX, ...).
    features: int = 0
    #: vhost-user protocol features (:class:`vhost.codes.ProtocolFeature` masks) offered
    #: besides the daemon's own (MQ, REPLY_ACK, CONFIG, ...).
    protocol_features: int = 0
    #: VIRTIO Shared Memory Regions, shared memory id (0-255) to size in bytes (a
    #: positive multiple of the page size). Declaring any makes the daemon offer
    #: ``ProtocolFeature.SHMEM`` and answer ``GET_SHMEM_CONFIG`` with these sizes.
    shmem_regions: Mapping[int, int] = MappingProxyType({})
    num_queues: int = 1
    max_queue_size: int = 256
    #: Set by the :class:`Daemon` made for this device (see :attr:`frontend`).
    _frontend: _core.FrontendLink | None = None

    @property
    def frontend(self) -> _core.FrontendLink:
        """The front-end being served, for the requests a device sends it on the back-end
        channel: ``config_change()`` after :meth:`config` changed, ``shared_object_add``,
        ``shared_object_remove`` and ``shared_object_lookup`` (the dma-buf comes back as a
        :class:`~vhost.FileDescriptor` you own), ``shmem_map`` and ``shmem_unmap``.

        Each request blocks until the front-end took it (without the GIL; at most 10 s) and
        raises :class:`~vhost.errors.DisconnectedError` when no front-end is connected, and
        :class:`~vhost.errors.InactiveFeatureError` when the front-end did not set up the
        channel (``BACKEND_REQ``) or did not ack the feature the request needs (``CONFIG``,
        ``SHARED_OBJECT``, ``SHMEM``). Prefer a thread of your own: from :meth:`process`
        a request holds its queue meanwhile (a front-end that stops that ring in the
        meantime waits for it), and from :meth:`config`/:meth:`set_config` it would wait
        for a front-end that is waiting for the answer.
        """
        if self._frontend is None:
            raise DisconnectedError("no Daemon serves this device, so it has no front-end")
        return self._frontend

    def config(self) -> bytes:
        """The device configuration space (empty if the device has none)."""
        return b""

    def set_config(self, offset: int, data: bytes) -> None:
        """A driver write to the configuration space; refused unless overridden."""
        raise NotSupportedError("this device has no writable configuration")

    def reset(self) -> None:
        """The front-end reset the device or went away; drop per-session state."""
        return None

    def set_acked_features(self, features: int) -> None:
        """The front-end acked these virtio features (``SET_FEATURES``): device bits and
        transport bits such as ``VirtioFeature.RING_EVENT_IDX``. The device should use
        only what was acked. An exception is reported through :func:`sys.unraisablehook`."""
        return None

    def set_acked_protocol_features(self, protocol_features: int) -> None:
        """The front-end acked these protocol features (``SET_PROTOCOL_FEATURES``): the
        daemon's own and :attr:`protocol_features`. An exception is reported through
        :func:`sys.unraisablehook`."""
        return None

    def save_state(self) -> bytes:
        """The device's internal state for live migration (``SET_DEVICE_STATE_FD``,
        save), called with every ring stopped, on a thread of the daemon with the GIL.

        Whatever the destination's :meth:`load_state` needs for the driver to go on as if
        nothing happened, beyond the rings and guest memory the VMM migrates itself. The
        default is a stateless device: ``b""``. An exception fails the front-end's
        ``CHECK_DEVICE_STATE``, and its text is the daemon's ``refused`` event.
        """
        return b""

    def load_state(self, state: bytes) -> None:
        """Restores what :meth:`save_state` returned on the source, before the rings
        start. Raise when ``state`` is unusable, and keep the previous state then: the
        front-end's ``CHECK_DEVICE_STATE`` fails with the exception's text as the daemon's
        ``refused`` event. The default (stateless) accepts only ``b""``: anything else
        came from a device with state this one would silently lose.
        """
        if state:
            raise InvalidParamError(
                f"this device is stateless, but {len(state)} bytes of device state were sent"
            )

    @abstractmethod
    def process(self, queue: int, batch: _core.Batch) -> Awaitable[None] | None:
        """Handle the chains of ``batch``, popped from ``queue`` (a coroutine function
        runs on the daemon's event loop; see :class:`Daemon`)."""


class Daemon:
    """Serves ``device`` on the vhost-user socket ``path``.

    In server mode (the default) it listens on ``path``, replacing a stale socket, and
    serves front-ends one after another; with ``client=True`` it connects to a front-end
    listening there (QEMU ``-chardev socket,server=on``), retrying until it appears.

    ``stall_timeout`` bounds each message from its first byte to its last (header, body
    and fds: a front-end trickling a message one byte at a time is bounded too) and each
    reply's send; the session then ends ``stalled``. Between messages a front-end may idle
    for ever, and ``stop()`` (or SIGTERM to ``serve``) interrupts a message being read or
    a reply being sent. ``poll_us`` makes each queue worker keep polling its
    ring for that many microseconds after the last request before it sleeps: it burns a
    CPU meanwhile, and saves the wake-up (and the driver's kick) when requests keep coming,
    which pays when driver and device run on different CPUs.

    ``require_sealed_memory`` refuses guest memory whose fd is not sealed against
    shrinking (F_SEAL_SHRINK, as QEMU's ``memory-backend-memfd`` is by default): without
    it, a front-end that truncates its memory file under the daemon kills it with SIGBUS,
    which no user-space check can prevent. File-backed guest RAM cannot be sealed, so the
    policy is opt-in.

    ``transport="vduse"`` serves the device as a VDUSE device of the kernel this runs on
    instead, named ``path`` (``/dev/vduse/NAME``; needs ``modprobe vduse`` and root): after
    ``vdpa dev add name NAME mgmtdev vduse`` it is a virtio device of that kernel, bound to
    ``virtio_vdpa`` (a ``/dev/vdX`` of its own) or ``vhost_vdpa`` (for a VM, or
    :class:`vhost.vdpa.VhostVdpa`). :meth:`start` creates it, replacing a stale device of
    the same name that a killed daemon left; :meth:`stop` destroys it, which the kernel
    refuses (``KernelError`` EBUSY, from :meth:`wait`) while a vDPA device still uses it:
    ``vdpa dev del NAME`` first. A device a killed daemon left in use is taken over only
    when this start's device is the same (type, features, queue count and size,
    configuration space such as a disk's capacity), else :meth:`start` raises
    :class:`~vhost.errors.InvalidParamError` naming the field that differs. ``packed=True``
    offers packed virtqueues too (Linux accepts them over VDUSE); without it the rings are
    split, because after a crash only a split ring's position can be read back from the
    ring, so a device whose driver uses packed rings cannot be taken over.

    ``postcopy_fault_timeout`` bounds how long a queue's request may wait on guest memory
    while postcopy listens (a page the front-end has not copied in yet): a wait longer
    than that is taken as a fault the front-end will never resolve, and the session ends
    ``failed``, naming the queue. The native blk device fails the waiting request with
    IOERR and writes nothing; a Python device's :meth:`Batch.read` raises
    :class:`~vhost.errors.QueueError` instead of returning the zeros a page that never
    came reads as (``PythonBlkDevice`` answers IOERR). ``None`` (or ``math.inf``) waits
    as long as the front-end is connected.

    ``loop`` is the event loop that runs a device's ``async def process`` (required for
    one, ignored otherwise; :class:`vhost.aio.Daemon` passes the running loop): the worker
    thread hands each batch over with :func:`asyncio.run_coroutine_threadsafe` and waits
    for the coroutine, so the batch is completed before the worker pops the next one, as
    with a plain ``process``. The coroutine's exception is reported like a plain
    ``process``'s. A loop that is closed, or stops running, while a batch waits fails
    that batch with :class:`~vhost.errors.ClosedError` within a quarter of a second
    instead of holding the worker for ever.

    ``iommu_miss_timeout`` puts the device behind the front-end's vIOMMU: the daemon offers
    ``VIRTIO_F_ACCESS_PLATFORM``, and once acked, ring and buffer addresses are I/O virtual
    ones translated through the IOTLB the front-end's ``IOTLB_MSG`` s fill; a queue that
    misses asks on the back-end channel (``BACKEND_IOTLB_MSG``, counted in
    :attr:`iotlb_misses`); if no update comes within that many seconds
    (:data:`vhost._core.DEFAULT_IOTLB_MISS_TIMEOUT` is a sensible value) the request that
    needed it fails (blk: ``IOERR`` when its status byte is mapped, else it is returned
    with nothing written; an :attr:`EventKind.REQUEST_FAILED` event says which) and the
    queue goes on; a miss on the ring itself fails the queue. Dirty logging
    (``VHOST_F_LOG_ALL``) works behind the vIOMMU too: the pages marked are the
    guest-physical ones behind the I/O virtual addresses written. ``None`` (the default):
    no IOMMU.
    """

    def __init__(
        self,
        device: Device | _core.BlkDevice,
        path: str | os.PathLike[str],
        *,
        client: bool = False,
        stall_timeout: float = 5.0,
        poll_us: int = 0,
        require_sealed_memory: bool = False,
        postcopy_fault_timeout: float | None = _core.DEFAULT_POSTCOPY_FAULT_TIMEOUT,
        loop: asyncio.AbstractEventLoop | None = None,
        iommu_miss_timeout: float | None = None,
        transport: Literal["vhost-user", "vduse"] = "vhost-user",
        packed: bool = False,
    ) -> None:
        if transport not in ("vhost-user", "vduse"):
            raise InvalidParamError(
                f"Daemon: transport must be 'vhost-user' or 'vduse', not {transport!r}"
            )
        if transport == "vduse" and client:
            raise InvalidParamError("Daemon: client=True is for vhost-user, not VDUSE")
        if packed and transport != "vduse":
            raise InvalidParamError(
                "Daemon: packed=True is for VDUSE (vhost-user always offers packed rings)"
            )
        #: VDUSE: whether packed rings are offered too.
        self.packed = packed
        self.device = device
        self.path = os.fspath(path)
        self.client = client
        #: How the daemon meets its driver: a vhost-user socket, or a VDUSE device.
        self.transport: Literal["vhost-user", "vduse"] = transport
        served: Device | _core.BlkDevice = device
        if isinstance(device, Device):
            _check_shmem_regions(device)
            if inspect.iscoroutinefunction(device.process):
                if loop is None:
                    raise InvalidParamError(
                        f"{type(device).__name__}.process is a coroutine function: it needs "
                        "an event loop to run on (use vhost.aio.Daemon, or pass loop=)"
                    )
                served = cast(Device, _OnLoop(device, loop))
        self._native = _core.Daemon(
            # A Device's process may be a coroutine function: _OnLoop makes it plain.
            cast("_core.BlkDevice | _core._PythonDevice", served),
            stall_timeout=stall_timeout,
            poll_us=poll_us,
            require_sealed_memory=require_sealed_memory,
            postcopy_fault_timeout=postcopy_fault_timeout,
            iommu_miss_timeout=iommu_miss_timeout,
        )
        if isinstance(device, Device):
            device._frontend = self._native.frontend

    def start(self) -> Self:
        """Starts serving on a background thread and returns at once."""
        self._native.start(
            self.path, client=self.client, vduse=self.transport == "vduse", packed=self.packed
        )
        return self

    def stop(self, timeout: float | None = 10.0) -> None:
        """Stops serving (the current session is dropped cleanly) and waits for it."""
        self._native.stop()
        self._native.wait(timeout)

    def wait(self, timeout: float | None = None) -> bool:
        """Waits for the daemon to finish (it only does when stopped, or in client mode
        when its session ends); re-raises the error that ended it, if any."""
        return self._native.wait(timeout)

    def serve_forever(
        self,
        ready: Callable[[], None] | None = None,
        on_event: Callable[[DaemonEvent], None] | None = None,
    ) -> None:
        """Serves until SIGINT or SIGTERM (or :meth:`stop` from another thread).

        ``ready`` is called once the daemon is serving and the signals are handled, so a
        supervisor told "ready" can already stop it cleanly. ``on_event`` is called in
        this thread with each :class:`DaemonEvent` as it happens (the last ones, such as
        the end of the session a stop cut short, before this returns).
        """
        previous: signal.Handlers | None = None
        on_main = threading.current_thread() is threading.main_thread()
        if on_main:
            previous = signal.signal(signal.SIGTERM, _raise_interrupt)  # type: ignore[assignment]
        try:
            if not self.running:
                self.start()
            if ready is not None:
                ready()
            while True:
                if on_event is not None:
                    for event in self.next_events(0.2):
                        on_event(event)
                if self._native.wait(0.0 if on_event is not None else 0.2):
                    break
        except KeyboardInterrupt:
            pass
        finally:
            self.stop()
            if on_main and previous is not None:
                signal.signal(signal.SIGTERM, previous)
            if on_event is not None:
                for event in self.next_events():
                    on_event(event)

    @property
    def frontend(self) -> FrontendLink:
        """The front-end being served, for requests on its back-end channel (see
        :attr:`Device.frontend`); the same link across sessions and restarts."""
        return self._native.frontend

    def notify_config_changed(self) -> None:
        """Tells the front-end being served that the device's configuration space changed
        (``CONFIG_CHANGE_MSG``): it reads it again and interrupts the guest's driver.
        Raises :class:`~vhost.errors.DisconnectedError` with no front-end connected, and
        :class:`~vhost.errors.InactiveFeatureError` when it did not negotiate ``BACKEND_REQ``
        and ``CONFIG``."""
        self._native.frontend.config_change()

    def resize(self, size: int | None = None) -> Resized:
        """Grows the served disk while a guest runs, and tells the front-end.

        ``size`` None takes the image's size now (grow the file first, e.g. ``truncate -s
        +1G``); a size in bytes (a multiple of 512) grows the file to it. Shrinking is
        refused (:class:`~vhost.errors.InvalidParamError`): the sectors past the new end
        would vanish from under the guest's file systems. Every request and every config
        read sees either the old capacity or the new one. With no front-end connected the
        new size is simply what the next one reads (``notified`` False); a front-end that
        cannot be told (no back-end channel) raises
        :class:`~vhost.errors.InactiveFeatureError`, the disk being resized already.
        """
        if not isinstance(self.device, Resizable):
            raise NotSupportedError(f"{type(self.device).__name__} cannot be resized")
        return Resized(*self.device.resize(size))

    def next_events(self, timeout: float | None = 0.0) -> list[DaemonEvent]:
        """The events since the last call, waiting up to ``timeout`` seconds (None:
        forever) for the first. Ctrl-C interrupts the wait. The daemon keeps the latest
        1024 uncollected events (:attr:`events_dropped` counts the others)."""
        return [_event(e) for e in self._native.next_events(timeout)]

    @property
    def events_dropped(self) -> int:
        """Events dropped because nobody collected them in time."""
        return self._native.events_dropped

    @property
    def running(self) -> bool:
        """Whether the daemon is serving (or starting): its socket is in use until then."""
        return self._native.running

    @property
    def sessions_started(self) -> int:
        """Front-end sessions accepted so far."""
        return self._native.sessions_started

    @property
    def sessions_ended(self) -> int:
        """Front-end sessions over so far; one fewer than started while one is served."""
        return self._native.sessions_ended

    @property
    def active(self) -> bool:
        """Whether a front-end is being served now."""
        return self._native.active

    @property
    def last_error(self) -> str | None:
        """What ended (or was refused in) the latest session, if anything."""
        return self._native.last_error

    @property
    def completed(self) -> list[int]:
        """Descriptor chains completed per queue in the current or last session."""
        return self._native.completed

    @property
    def iotlb_misses(self) -> list[int]:
        """IOTLB misses each queue asked the front-end for (behind a vIOMMU only)."""
        return self._native.iotlb_misses

    def __enter__(self) -> Self:
        return self.start()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()

    def __repr__(self) -> str:
        return f"<Daemon {self.path!r} device={self.device!r} running={self.running}>"


#: How often a worker waiting for an ``async def process`` looks whether its loop still
#: runs (the bound on a batch stranded by a stopped or closed loop).
_LOOP_CHECK = 0.25


class _OnLoop:
    """Stands in for a :class:`Device` whose ``process`` is a coroutine function, so the
    native daemon calls a plain ``process``: it runs the coroutine on ``loop`` and waits
    for it on the worker thread (the GIL released meanwhile). Everything else is the
    device's own."""

    def __init__(self, device: Device, loop: asyncio.AbstractEventLoop) -> None:
        self._device = device
        self._loop = loop

    def __getattr__(self, name: str) -> Any:
        return getattr(self._device, name)

    def process(self, queue: int, batch: _core.Batch) -> None:
        """Hands the batch to the loop and waits until the device's coroutine is over."""
        where = f"{type(self._device).__name__}.process(queue {queue})"
        coro = self._device.process(queue, batch)
        try:
            future = asyncio.run_coroutine_threadsafe(cast("Any", coro), self._loop)
        except RuntimeError as exc:  # the loop is closed
            cast("Any", coro).close()
            raise ClosedError(
                f"{where}: its event loop is closed ({exc}); the batch was not processed"
            ) from None
        # Wait in slices (the GIL released), looking at the loop between them; the
        # coroutine's own exception (a TimeoutError too) comes out of result().
        while not concurrent.futures.wait([future], _LOOP_CHECK).done:
            if self._loop.is_closed() or not self._loop.is_running():
                future.cancel()
                raise ClosedError(
                    f"{where}: its event loop stopped with the batch pending; the "
                    "batch's chains go back to the driver unprocessed"
                )
        future.result()


def _check_shmem_regions(device: Device) -> None:
    """Refuses a declaration the protocol cannot carry, naming the device and the region."""
    for shmid, size in device.shmem_regions.items():
        where = f"{type(device).__name__}.shmem_regions[{shmid!r}]"
        if not isinstance(shmid, int) or not 0 <= shmid < MAX_SHMEM_REGIONS:
            raise InvalidParamError(f"{where}: a shared memory id is 0 to 255")
        if not isinstance(size, int) or size <= 0 or size >= 1 << 64 or size % mmap.PAGESIZE:
            raise InvalidParamError(
                f"{where}: size {size!r} is not a positive multiple of the page size "
                f"({mmap.PAGESIZE}) below 2**64"
            )


def _raise_interrupt(signum: int, frame: FrameType | None) -> None:
    raise KeyboardInterrupt
