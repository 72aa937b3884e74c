"""asyncio: the front-end, eventfds and the daemon on an event loop.

An orchestrator that drives many back-ends and front-ends at once wants no thread per
call. This module is the asyncio face of the package; switching from the blocking API is
adding ``await``:

- :class:`Frontend`: every request of :class:`vhost.user.Frontend` as a coroutine of the
  same name, arguments and result. The connection's socket is registered on the running
  loop (``add_reader``); the request is encoded, and its answer decoded and checked, by
  the same Rust code as the blocking front-end's (the core's ``calls``), fed with what the
  socket holds whenever it is readable. Bound a request with :func:`asyncio.timeout`.
- :class:`EventFd`: ``await call.wait()`` for a virtqueue's call (or kick) eventfd,
  returning its counter, so a Python driver or test rig runs its rings on the loop;
  :func:`wait_used` and :func:`setup_queue` are the loop's forms of
  :func:`vhost.virtio.wait_used` and :func:`vhost.virtio.setup_queue`.
- :class:`Daemon`: ``async with Daemon(device, path)`` serves a device while the block
  runs; ``await daemon.wait()``; cancelled, it stops. A Python device may define
  ``async def process(self, queue, batch)``: it runs on this loop, the queue's worker
  thread waiting for it.

Cancellation never leaves a connection out of step: a request cancelled before it was
sent changes nothing, and one cancelled after it was sent but before its answer arrived
closes the connection (the late answer would be taken for the next request's), so later
calls raise :class:`~vhost.errors.ClosedError`; connect a new front-end.
"""

from __future__ import annotations

import asyncio
import errno
import os
import socket
import uuid as _uuid
from collections.abc import Callable, Sequence
from types import TracebackType
from typing import Any, Literal, Self, TypeVar, cast

from . import _core
from . import daemon as _daemon
from . import user as _user
from .backend import EventFdLike, _region_tuple
from .codes import MigrationPhase, ProtocolFeature, TransferDirection
from .dirty_log import DirtyLog
from .errors import (
    ClosedError,
    InvalidParamError,
    ProtocolError,
    VhostOSError,
    VhostTimeoutError,
)
from .postcopy import PostcopyRegion
from .types import DirtyLogRegion, IotlbMessage, MemoryRegion, VringConfig
from .virtio import DeviceStatus, VirtioFeature, _check_ring_features, gpa_to_user

__all__ = ["Daemon", "EventFd", "Frontend", "setup_queue", "wait_used"]

_T = TypeVar("_T")

_LOG_ALL = int(VirtioFeature.LOG_ALL)
_U64_MASK = (1 << 64) - 1
#: The core's bound on a device state, as the blocking transfer applies it.
_MAX_DEVICE_STATE = _core.MAX_DEVICE_STATE


async def _ready(fd: int, *, write: bool = False) -> None:
    """Waits until ``fd`` is readable (or writable), on the running loop (no thread)."""
    loop = asyncio.get_running_loop()
    ready: asyncio.Future[None] = loop.create_future()

    def wake() -> None:
        if not ready.done():
            ready.set_result(None)

    if write:
        loop.add_writer(fd, wake)
    else:
        loop.add_reader(fd, wake)
    try:
        await ready
    finally:
        if write:
            loop.remove_writer(fd)
        else:
            loop.remove_reader(fd)


async def _readable(fd: int) -> None:
    """Waits until ``fd`` is readable, on the running loop."""
    await _ready(fd)


class Frontend:
    """A vhost-user front-end connection whose requests are coroutines.

    Each method is the :class:`vhost.user.Frontend` method of the same name, with the same
    arguments, result and errors, awaited. Requests on one connection run one at a time
    (an :class:`asyncio.Lock` orders concurrent callers), as the protocol requires.

    Timeouts: wrap calls in :func:`asyncio.timeout` (``async with asyncio.timeout(1):
    await fe.get_features()``); the ``timeout`` given to :meth:`connect` bounds the
    connect and a send the back-end does not take (a full socket buffer), not the wait
    for an answer.

    Cancellation (a timeout is one): a request cancelled while waiting for its turn, or
    before it was sent, changes nothing. A request cancelled after it was sent and before
    its answer arrived closes the connection, since the stream is then out of step (the
    late answer would be taken for the next request's): later calls raise
    :class:`~vhost.errors.ClosedError`. Either way the connection is completed or closed,
    never out of step.
    """

    #: See :attr:`vhost.user.Frontend.IMPLEMENTED_PROTOCOL_FEATURES`.
    IMPLEMENTED_PROTOCOL_FEATURES = _user.Frontend.IMPLEMENTED_PROTOCOL_FEATURES
    #: See :attr:`vhost.user.Frontend.DEFAULT_PROTOCOL_FEATURES`.
    DEFAULT_PROTOCOL_FEATURES = _user.Frontend.DEFAULT_PROTOCOL_FEATURES

    def __init__(self, native: _core.Frontend) -> None:
        # The blocking facade keeps the state both share (negotiated features, the dirty
        # log's bookkeeping, closing); its requests are never called from here.
        self._sync = _user.Frontend(native)
        self._calls: _core.FrontendCalls | None = _core.FrontendCalls(native)
        self._fd = native.fileno()
        self._turn = asyncio.Lock()

    @classmethod
    async def connect(cls, path: str | os.PathLike[str], *, timeout: float | None = 10.0) -> Self:
        """Client mode: connects to a back-end listening at ``path`` without blocking the
        loop. ``timeout`` bounds the connect (and a send the back-end does not take); a
        failure is the same ``OSError`` kind as :meth:`vhost.user.Frontend.connect`'s
        (:class:`~vhost.errors.VhostOSError` with ``filename``)."""
        target = os.fspath(path)
        loop = asyncio.get_running_loop()
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            sock.setblocking(False)
            try:
                async with asyncio.timeout(timeout):
                    await loop.sock_connect(sock, target)
            except TimeoutError:
                raise VhostOSError(
                    errno.ETIMEDOUT,
                    f"the listener did not take the connection within {timeout} s "
                    "(is the back-end stuck, not accepting?)",
                    target,
                    operation="connect to",
                ) from None
            except OSError as exc:
                raise VhostOSError(
                    exc.errno or 0, exc.strerror or str(exc), target, operation="connect to"
                ) from None
            # The native connection shares this file description: give it back blocking
            # (its answers are taken with MSG_DONTWAIT; the blocking facade's calls and
            # every send wait in bounded slices, which a non-blocking socket would spin).
            sock.setblocking(True)
            return cls(_core.Frontend.from_socket(sock, timeout))
        finally:
            sock.close()

    @classmethod
    async def accept(
        cls,
        path: str | os.PathLike[str],
        *,
        timeout: float | None = None,
        reply_timeout: float | None = 10.0,
    ) -> Self:
        """Server mode: listens at ``path`` until one back-end connects, waiting on the loop
        (the socket path is removed either way). ``timeout`` bounds the wait
        (:class:`~vhost.errors.VhostTimeoutError`), as :func:`asyncio.timeout` around the
        call does; ``reply_timeout`` is the blocking facade's (sends, here)."""
        target = os.fspath(path)
        with _core.Listener(target) as listener:
            try:
                async with asyncio.timeout(timeout):
                    await _readable(listener.fileno())
            except TimeoutError:
                raise VhostTimeoutError(
                    errno.ETIMEDOUT,
                    f"no back-end connected within {timeout} s",
                    target,
                    operation="accept on",
                ) from None
            return cls(listener.accept_frontend(0.0, reply_timeout))

    async def _run(self, start: Callable[[], _core.PendingCall]) -> Any:
        """Sends one call's request and feeds its answer to the core as it arrives."""
        async with self._turn:
            pending = start()
            try:
                while not pending.advance():
                    await _readable(self._fd)
            except BaseException:
                # Cancelled (or failed) with the answer not in: close rather than let it
                # be read as the next request's. A call that is over is left alone.
                pending.abandon()
                raise
            return pending.result()

    # -- the connection ---------------------------------------------------------------

    @property
    def native(self) -> _core.Frontend:
        """The native connection (shared with the blocking facade)."""
        return self._sync.native

    @property
    def sync(self) -> _user.Frontend:
        """The same connection's blocking facade: its properties are this one's; do not
        call its requests while this front-end may have one in flight (the core refuses
        with :class:`~vhost.errors.InvalidParamError`)."""
        return self._sync

    def fileno(self) -> int:
        """The connection's socket fd, registered on the loop while a request waits."""
        return self._fd

    def set_timeout(self, timeout: float | None) -> None:
        """Bounds a send the back-end does not take (answers: :func:`asyncio.timeout`)."""
        self._sync.set_timeout(timeout)

    @property
    def broken(self) -> bool:
        """True once the connection was closed (a protocol error, a cancelled request,
        :meth:`close`)."""
        return self._sync.broken

    @property
    def closed(self) -> bool:
        """Whether :meth:`close` was called."""
        return self._sync.closed

    @property
    def acked_features(self) -> int:
        """See :attr:`vhost.user.Frontend.acked_features`."""
        return self._sync.acked_features

    @property
    def acked_protocol_features(self) -> ProtocolFeature:
        """See :attr:`vhost.user.Frontend.acked_protocol_features`."""
        return self._sync.acked_protocol_features

    @property
    def offered_features(self) -> int | None:
        """See :attr:`vhost.user.Frontend.offered_features`."""
        return self._sync.offered_features

    @property
    def offered_protocol_features(self) -> ProtocolFeature | None:
        """See :attr:`vhost.user.Frontend.offered_protocol_features`."""
        return self._sync.offered_protocol_features

    def close(self) -> None:
        """Shuts the connection down and closes its socket; a request waiting for its
        answer fails, later ones raise :class:`~vhost.errors.ClosedError`."""
        # The calls share the native connection: drop them too, or the socket stays open.
        self._calls = None
        self._sync.close()

    async def __aenter__(self) -> Self:
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    def _calls_or_closed(self) -> _core.FrontendCalls:
        if self._calls is None:
            raise ClosedError("the vhost-user front-end connection is closed")
        return self._calls

    def __repr__(self) -> str:
        state = "closed" if self.closed else f"fd={self._fd}"
        return f"<vhost.aio.Frontend {state}>"

    # -- the VhostBackend requests ------------------------------------------------------

    async def get_features(self) -> int:
        """``GET_FEATURES``: the virtio feature bits the back-end offers."""
        return cast(int, await self._run(lambda: self._calls_or_closed().get_features()))

    async def set_features(self, features: int) -> None:
        """``SET_FEATURES``: the bits acked (``VHOST_F_LOG_ALL`` starts dirty logging)."""
        await self._run(lambda: self._calls_or_closed().set_features(features))

    async def set_owner(self) -> None:
        """``SET_OWNER``: the first request of a session."""
        await self._run(lambda: self._calls_or_closed().set_owner())

    async def reset_owner(self) -> None:
        """``RESET_OWNER`` (deprecated by the spec)."""
        await self._run(lambda: self._calls_or_closed().reset_owner())

    async def set_mem_table(self, regions: Sequence[MemoryRegion]) -> None:
        """``SET_MEM_TABLE``, checked against the dirty log as the blocking call is."""
        ends = {r.guest_phys_addr: r.guest_phys_addr + r.memory_size for r in regions}
        self._sync._check_log_covers(max(ends.values(), default=0), "SET_MEM_TABLE")
        table = [_region_tuple(r) for r in regions]
        await self._run(lambda: self._calls_or_closed().set_mem_table(table))
        self._sync._region_ends = ends

    async def set_log_base(self, base: int, region: DirtyLogRegion | None = None) -> None:
        """``SET_LOG_BASE`` with the shared-memory log ``region`` (base 0)."""
        log = None if region is None else (region.mmap_size, region.mmap_offset, region.fd)
        await self._run(lambda: self._calls_or_closed().set_log_base(base, log))

    async def set_log_fd(self, fd: int | EventFdLike | None) -> None:
        """``SET_LOG_FD``: the dirty log's eventfd (borrowed)."""
        await self._run(lambda: self._calls_or_closed().set_log_fd(fd))

    async def set_vring_num(self, index: int, num: int) -> None:
        """``SET_VRING_NUM``: ring ``index`` has ``num`` descriptors."""
        await self._run(lambda: self._calls_or_closed().set_vring_num(index, num))

    async def set_vring_addr(self, index: int, config: VringConfig) -> None:
        """``SET_VRING_ADDR`` (with ``VHOST_VRING_F_LOG`` while the dirty log is on, as the
        blocking call); the config is remembered for :meth:`start_dirty_log`."""
        flags = self._sync._vring_addr_flags(index, config)
        await self._run(
            lambda: self._calls_or_closed().set_vring_addr(
                index,
                config.desc_table_addr,
                config.used_ring_addr,
                config.avail_ring_addr,
                flags,
                config.log_addr or 0,
            )
        )
        self._sync._vring_configs[index] = config

    async def set_vring_base(self, index: int, base: int) -> None:
        """``SET_VRING_BASE``: where ring ``index`` resumes."""
        await self._run(lambda: self._calls_or_closed().set_vring_base(index, base))

    async def get_vring_base(self, index: int) -> int:
        """``GET_VRING_BASE``: stops ring ``index`` and returns its next available index."""
        base = cast(int, await self._run(lambda: self._calls_or_closed().get_vring_base(index)))
        self._sync._vring_configs.pop(index, None)
        return base

    async def set_vring_call(self, index: int, fd: int | EventFdLike | None) -> None:
        """``SET_VRING_CALL``: the eventfd signalled on used buffers (borrowed)."""
        await self._run(lambda: self._calls_or_closed().set_vring_call(index, fd))

    async def set_vring_kick(self, index: int, fd: int | EventFdLike | None) -> None:
        """``SET_VRING_KICK``: the eventfd the driver signals (borrowed)."""
        await self._run(lambda: self._calls_or_closed().set_vring_kick(index, fd))

    async def set_vring_err(self, index: int, fd: int | EventFdLike | None) -> None:
        """``SET_VRING_ERR``: the eventfd signalled on a broken ring (borrowed)."""
        await self._run(lambda: self._calls_or_closed().set_vring_err(index, fd))

    # -- beyond the base interface ------------------------------------------------------

    async def get_protocol_features(self) -> ProtocolFeature:
        """``GET_PROTOCOL_FEATURES``."""
        proto = await self._run(lambda: self._calls_or_closed().get_protocol_features())
        return ProtocolFeature(proto)

    async def set_protocol_features(self, features: int) -> None:
        """``SET_PROTOCOL_FEATURES`` (bits never offered are refused before sending)."""
        await self._run(lambda: self._calls_or_closed().set_protocol_features(int(features)))

    async def negotiate(
        self,
        features: int | None = None,
        protocol_features: int | None = None,
        *,
        packed: bool = False,
        event_idx: bool = True,
        log_all: bool = False,
    ) -> tuple[int, ProtocolFeature]:
        """The usual opening, as :meth:`vhost.user.Frontend.negotiate` (the core's one
        rule, run as one call of five requests): returns ``(features, protocol
        features)`` acked."""
        mask = None if features is None else int(features) & _U64_MASK
        proto = None if protocol_features is None else int(protocol_features)
        acked, acked_proto = await self._run(
            lambda: self._calls_or_closed().negotiate(
                mask, proto, packed=packed, event_idx=event_idx, log_all=log_all
            )
        )
        return acked, ProtocolFeature(acked_proto)

    @property
    def dirty_log(self) -> DirtyLog | None:
        """The log the back-end writes while logging is on (:meth:`start_dirty_log`)."""
        return self._sync.dirty_log

    async def start_dirty_log(self, log: DirtyLog) -> None:
        """See :meth:`vhost.user.Frontend.start_dirty_log` (same checks, same order)."""
        sync = self._sync
        region = sync._check_dirty_log(log)
        first = sync._dirty_log is None
        if first:
            sync._check_log_all(await self.get_features())
        await self.set_log_base(0, region)
        if not first:
            sync._dirty_log = log
            return
        await self.set_features(self.acked_features | _LOG_ALL)
        sync._dirty_log = log
        for index, config in list(sync._vring_configs.items()):
            await self.set_vring_addr(index, config)

    async def stop_dirty_log(self) -> None:
        """See :meth:`vhost.user.Frontend.stop_dirty_log`."""
        sync = self._sync
        if sync._dirty_log is None:
            return
        await self.set_features(self.acked_features & ~_LOG_ALL)
        sync._dirty_log = None
        for index, config in list(sync._vring_configs.items()):
            await self.set_vring_addr(index, config)

    async def get_queue_num(self) -> int:
        """``GET_QUEUE_NUM`` (needs ``MQ``)."""
        return cast(int, await self._run(lambda: self._calls_or_closed().get_queue_num()))

    async def set_vring_enable(self, index: int, enable: bool) -> None:
        """``SET_VRING_ENABLE``: starts or pauses ring ``index``."""
        await self._run(lambda: self._calls_or_closed().set_vring_enable(index, enable))

    async def set_vring_endian(self, index: int, big_endian: bool) -> None:
        """``SET_VRING_ENDIAN`` (needs ``CROSS_ENDIAN``)."""
        await self._run(lambda: self._calls_or_closed().set_vring_endian(index, big_endian))

    async def vring_kick(self, index: int) -> None:
        """In-band kick (needs ``INBAND_NOTIFICATIONS``)."""
        await self._run(lambda: self._calls_or_closed().vring_kick(index))

    async def get_config(self, offset: int, size: int, flags: int = 0) -> bytes:
        """``GET_CONFIG`` (needs ``CONFIG``): ``size`` bytes of the config space."""
        return cast(
            bytes, await self._run(lambda: self._calls_or_closed().get_config(offset, size, flags))
        )

    async def set_config(
        self, offset: int, data: bytes | bytearray | memoryview, flags: int = 0
    ) -> None:
        """``SET_CONFIG`` (needs ``CONFIG``): writes ``data`` at ``offset``."""
        payload = bytes(data)
        await self._run(lambda: self._calls_or_closed().set_config(offset, payload, flags))

    async def set_backend_req_fd(self) -> _user.FrontendChannel:
        """Opens the back-end request channel; serve the returned end with a handler."""
        return cast(
            _user.FrontendChannel,
            await self._run(lambda: self._calls_or_closed().set_backend_req_fd()),
        )

    async def get_inflight_fd(self, num_queues: int, queue_size: int) -> _user.InflightInfo:
        """``GET_INFLIGHT_FD`` (needs ``INFLIGHT_SHMFD``), checked as the blocking call."""
        raw = await self._run(
            lambda: self._calls_or_closed().get_inflight_fd(num_queues, queue_size)
        )
        return _user.InflightInfo(*raw)

    async def set_inflight_fd(self, info: _user.InflightInfo) -> None:
        """``SET_INFLIGHT_FD``: hands a reconnected back-end its inflight area back."""
        await self._run(
            lambda: self._calls_or_closed().set_inflight_fd(
                info.mmap_size, info.mmap_offset, info.num_queues, info.queue_size, info.fd
            )
        )

    async def get_max_mem_slots(self) -> int:
        """``GET_MAX_MEM_SLOTS`` (needs ``CONFIGURE_MEM_SLOTS``)."""
        return cast(int, await self._run(lambda: self._calls_or_closed().get_max_mem_slots()))

    async def add_mem_region(self, region: MemoryRegion) -> None:
        """``ADD_MEM_REG``; checked against the dirty log as :meth:`set_mem_table` is."""
        end = region.guest_phys_addr + region.memory_size
        self._sync._check_log_covers(end, "ADD_MEM_REG")
        await self._run(lambda: self._calls_or_closed().add_mem_region(_region_tuple(region)))
        self._sync._region_ends[region.guest_phys_addr] = end

    async def remove_mem_region(self, region: MemoryRegion) -> None:
        """``REM_MEM_REG`` (needs ``CONFIGURE_MEM_SLOTS``)."""
        await self._run(
            lambda: self._calls_or_closed().remove_mem_region(
                region.guest_phys_addr,
                region.memory_size,
                region.userspace_addr,
                region.mmap_offset,
            )
        )
        self._sync._region_ends.pop(region.guest_phys_addr, None)

    async def reset_device(self) -> None:
        """``RESET_DEVICE`` (needs ``RESET_DEVICE``)."""
        await self._run(lambda: self._calls_or_closed().reset_device())

    async def set_status(self, status: int) -> None:
        """``SET_STATUS`` (needs ``STATUS``)."""
        await self._run(lambda: self._calls_or_closed().set_status(int(status)))

    async def get_status(self) -> DeviceStatus:
        """``GET_STATUS`` (needs ``STATUS``)."""
        return DeviceStatus(await self._run(lambda: self._calls_or_closed().get_status()))

    async def net_set_mtu(self, mtu: int) -> None:
        """``NET_SET_MTU`` (needs ``MTU``)."""
        await self._run(lambda: self._calls_or_closed().net_set_mtu(mtu))

    async def send_rarp(self, mac: bytes) -> None:
        """``SEND_RARP`` (needs ``RARP``): ``mac`` is 6 bytes."""
        if len(mac) != 6:
            raise InvalidParamError("a MAC address is 6 bytes")
        await self._run(lambda: self._calls_or_closed().send_rarp(list(mac)))

    async def gpu_set_socket(self, fd: int | EventFdLike) -> None:
        """``GPU_SET_SOCKET`` (borrowed)."""
        await self._run(lambda: self._calls_or_closed().gpu_set_socket(fd))

    async def send_iotlb_msg(self, msg: IotlbMessage) -> None:
        """``IOTLB_MSG``: one IOTLB update or invalidation, once the back-end applied it."""
        await self._run(
            lambda: self._calls_or_closed().iotlb_msg(
                msg.iova, msg.size, msg.uaddr, int(msg.perm), int(msg.type)
            )
        )

    async def get_shared_object(self, uuid: _uuid.UUID) -> _core.FileDescriptor:
        """``GET_SHARED_OBJECT`` (needs ``SHARED_OBJECT``): a dma-buf the caller owns."""
        return cast(
            _core.FileDescriptor,
            await self._run(lambda: self._calls_or_closed().get_shared_object(list(uuid.bytes))),
        )

    async def set_device_state_fd(
        self, direction: int, phase: int, fd: int | EventFdLike
    ) -> _core.FileDescriptor | None:
        """``SET_DEVICE_STATE_FD`` (needs ``DEVICE_STATE``); the back-end's own fd, if any."""
        return cast(
            "_core.FileDescriptor | None",
            await self._run(
                lambda: self._calls_or_closed().set_device_state_fd(int(direction), int(phase), fd)
            ),
        )

    async def get_shmem_config(self) -> _user.ShmemConfig:
        """``GET_SHMEM_CONFIG`` (needs ``SHMEM``)."""
        regions = await self._run(lambda: self._calls_or_closed().get_shmem_config())
        return _user.ShmemConfig(dict(regions))

    async def check_device_state(self) -> None:
        """``CHECK_DEVICE_STATE``: a refusal raises
        :class:`~vhost.errors.RequestRefusedError`."""
        await self._run(lambda: self._calls_or_closed().check_device_state())

    async def save_device_state(self) -> bytes:
        """The back-end's whole device state (see
        :meth:`vhost.user.Frontend.save_device_state`): the pipe is read on the loop."""
        read, write = os.pipe2(os.O_CLOEXEC | os.O_NONBLOCK)
        try:
            theirs = await self.set_device_state_fd(
                TransferDirection.SAVE, MigrationPhase.STOPPED, write
            )
            os.close(write)
            write = -1
            state = await _read_state(theirs.fileno() if theirs is not None else read)
        finally:
            os.close(read)
            if write != -1:
                os.close(write)
        await self.check_device_state()
        return state

    async def load_device_state(self, state: bytes) -> None:
        """Loads ``state`` into the back-end (see
        :meth:`vhost.user.Frontend.load_device_state`): the pipe is written on the loop."""
        if len(state) > _MAX_DEVICE_STATE:
            raise InvalidParamError(
                f"device state of {len(state)} bytes is larger than the "
                f"{_MAX_DEVICE_STATE} bytes allowed"
            )
        read, write = os.pipe2(os.O_CLOEXEC | os.O_NONBLOCK)
        try:
            theirs = await self.set_device_state_fd(
                TransferDirection.LOAD, MigrationPhase.STOPPED, read
            )
            os.close(read)
            read = -1
            ours = theirs.fileno() if theirs is not None else write
            try:
                await _write_state(ours, bytes(state))
            except BrokenPipeError:
                await self.check_device_state()
                raise ProtocolError(
                    "SET_DEVICE_STATE_FD: the back-end stopped reading the device state"
                ) from None
        finally:
            if read != -1:
                os.close(read)
            os.close(write)
        await self.check_device_state()

    async def postcopy_advise(self) -> _core.FileDescriptor:
        """``POSTCOPY_ADVISE`` (needs ``PAGEFAULT``): the back-end's userfaultfd."""
        return cast(
            _core.FileDescriptor,
            await self._run(lambda: self._calls_or_closed().postcopy_advise()),
        )

    async def postcopy_listen(self) -> None:
        """``POSTCOPY_LISTEN``: memory tables take postcopy's form from now on."""
        await self._run(lambda: self._calls_or_closed().postcopy_listen())

    async def postcopy_end(self) -> None:
        """``POSTCOPY_END``."""
        await self._run(lambda: self._calls_or_closed().postcopy_end())

    def postcopy_regions(self) -> list[PostcopyRegion]:
        """See :meth:`vhost.user.Frontend.postcopy_regions` (no request: kept state)."""
        return self._sync.postcopy_regions()

    async def create_crypto_session(self, params: bytes) -> bytes:
        """``CREATE_CRYPTO_SESSION`` (needs ``CRYPTO_SESSION``)."""
        payload = bytes(params)
        return cast(
            bytes, await self._run(lambda: self._calls_or_closed().create_crypto_session(payload))
        )

    async def close_crypto_session(self, session_id: int) -> None:
        """``CLOSE_CRYPTO_SESSION``."""
        await self._run(lambda: self._calls_or_closed().close_crypto_session(session_id))


async def _read_state(fd: int) -> bytes:
    """Reads a device state to its end of file on the loop, bounded as the core bounds it."""
    os.set_blocking(fd, False)
    out = bytearray()
    while True:
        try:
            chunk = os.read(fd, 1 << 16)
        except BlockingIOError:
            await _readable(fd)
            continue
        if not chunk:
            return bytes(out)
        out += chunk
        if len(out) > _MAX_DEVICE_STATE:
            raise ProtocolError(
                f"SET_DEVICE_STATE_FD: the back-end sent more than {_MAX_DEVICE_STATE} "
                "bytes of device state"
            )


async def _write_state(fd: int, data: bytes) -> None:
    """Writes all of ``data`` to a pipe on the loop."""
    os.set_blocking(fd, False)
    view = memoryview(data)
    while view:
        try:
            view = view[os.write(fd, view) :]
            continue
        except BlockingIOError:
            pass
        await _ready(fd, write=True)


class EventFd:
    """An eventfd (a virtqueue's kick or call) whose wait is awaitable.

    ``await call.wait()`` waits on the running loop (``add_reader``, no thread) until the
    eventfd was signalled, then returns and clears its counter. Cancelled, it consumes
    nothing: the signal stays for the next wait. It has ``fileno()``, so it is passed to
    ``set_vring_call``/``set_vring_kick`` like :class:`vhost.EventFd`, which it wraps
    (``EventFd(existing)`` adopts one; the wrapper closes it in :meth:`close`).
    """

    def __init__(self, native: _core.EventFd | None = None) -> None:
        self._native = native if native is not None else _core.EventFd()

    @property
    def native(self) -> _core.EventFd:
        """The wrapped :class:`vhost.EventFd`."""
        return self._native

    def fileno(self) -> int:
        """The eventfd's fd (owned by this object)."""
        return self._native.fileno()

    def write(self, value: int = 1) -> None:
        """Signals: adds ``value`` to the counter (a kick, when this is a kick eventfd)."""
        self._native.write(value)

    def try_read(self) -> int | None:
        """Returns and clears the counter, or None when nothing was signalled."""
        return self._native.try_read()

    async def wait(self) -> int:
        """Waits until signalled and returns the counter, cleared."""
        while True:
            value = self._native.try_read()
            if value is not None:
                return value
            await _readable(self._native.fileno())

    def close(self) -> None:
        """Closes the eventfd."""
        self._native.close()

    @property
    def closed(self) -> bool:
        """Whether :meth:`close` was called."""
        return self._native.closed

    def __enter__(self) -> Self:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"<vhost.aio.EventFd {self._native!r}>"


async def wait_used(
    queue: _core.Virtqueue, call: EventFd, *, limit: float | None = 10.0
) -> list[tuple[int, int]]:
    """Waits on the loop until the device returned buffers on ``queue`` and returns them,
    as :func:`vhost.virtio.wait_used` (a call can come for nothing, so the ring is looked
    at before and after each). ``limit`` seconds without any is
    :class:`~vhost.errors.VhostTimeoutError` (None: no bound; an enclosing
    :func:`asyncio.timeout` works too)."""
    try:
        async with asyncio.timeout(limit):
            while True:
                done = queue.poll_used()
                if done:
                    return done
                await call.wait()
    except TimeoutError:
        raise VhostTimeoutError(
            f"wait_used: the device returned none of the {queue.in_flight} buffers in "
            f"flight within {limit} s"
        ) from None


async def setup_queue(  # noqa: PLR0917 - the blocking function's six positional arguments
    frontend: Frontend,
    index: int,
    memory: _core.GuestMemory,
    queue: _core.Virtqueue,
    kick: int | EventFdLike,
    call: int | EventFdLike,
    *,
    base: int | None = None,
    enable: bool = True,
) -> None:
    """Hands ``queue`` to the back-end, as :func:`vhost.virtio.setup_queue`:
    ``SET_VRING_NUM``, ``SET_VRING_ADDR``, ``SET_VRING_BASE``, ``SET_VRING_CALL``,
    ``SET_VRING_KICK`` and, when protocol features were negotiated, ``SET_VRING_ENABLE``."""
    _check_ring_features(index, frontend.acked_features, queue.packed, queue.event_idx)
    config = VringConfig(
        queue_max_size=queue.size,
        queue_size=queue.size,
        flags=0,
        desc_table_addr=gpa_to_user(memory, queue.desc),
        used_ring_addr=gpa_to_user(memory, queue.used),
        avail_ring_addr=gpa_to_user(memory, queue.avail),
        log_addr=queue.used,
        packed=queue.packed,
    )
    await frontend.set_vring_num(index, queue.size)
    await frontend.set_vring_addr(index, config)
    await frontend.set_vring_base(index, (1 << 15 if queue.packed else 0) if base is None else base)
    await frontend.set_vring_call(index, call)
    await frontend.set_vring_kick(index, kick)
    if enable and frontend.acked_features & VirtioFeature.PROTOCOL_FEATURES:
        await frontend.set_vring_enable(index, True)


class Daemon:
    """A :class:`vhost.daemon.Daemon` run from a coroutine: ``async with Daemon(device,
    path) as daemon:`` serves while the block runs and stops at its end (cancelled too).

    The arguments are :class:`vhost.daemon.Daemon`'s. A Python device whose ``process``
    is ``async def`` runs it on the loop that entered the block (the worker thread hands
    each batch over and waits); its exception is reported like a plain ``process``'s, and
    a loop that stops with a batch pending fails that batch within a quarter of a second.
    Stopping waits on the loop (never blocking it), so pending batches still run.
    """

    #: How often :meth:`wait` and the stop look at the native daemon.
    POLL = 0.02

    def __init__(
        self,
        device: _daemon.Device | _core.BlkDevice,
        path: str | os.PathLike[str],
        *,
        client: bool = False,
        stall_timeout: float = 5.0,
        poll_us: int = 0,
        require_sealed_memory: bool = False,
        postcopy_fault_timeout: float | None = _core.DEFAULT_POSTCOPY_FAULT_TIMEOUT,
        iommu_miss_timeout: float | None = None,
        transport: Literal["vhost-user", "vduse"] = "vhost-user",
        packed: bool = False,
    ) -> None:
        self.device = device
        self.path = os.fspath(path)
        self._options: dict[str, Any] = {
            "client": client,
            "stall_timeout": stall_timeout,
            "poll_us": poll_us,
            "require_sealed_memory": require_sealed_memory,
            "postcopy_fault_timeout": postcopy_fault_timeout,
            "iommu_miss_timeout": iommu_miss_timeout,
            "transport": transport,
            "packed": packed,
        }
        self._daemon: _daemon.Daemon | None = None

    @property
    def daemon(self) -> _daemon.Daemon:
        """The blocking daemon being served (its events, counters,
        :meth:`vhost.daemon.Daemon.resize`)."""
        if self._daemon is None:
            raise ClosedError(f"vhost.aio.Daemon {self.path!r} is not started")
        return self._daemon

    async def start(self) -> Self:
        """Starts serving (on the daemon's own threads) and returns at once."""
        if self._daemon is not None:
            return self
        loop = asyncio.get_running_loop()
        daemon = _daemon.Daemon(self.device, self.path, loop=loop, **self._options)
        daemon.start()
        self._daemon = daemon
        return self

    async def wait(self) -> None:
        """Waits until the daemon finished (stopped, or in client mode its session
        ended), re-raising the error that ended it; cancelled, it stops the daemon."""
        native = self.daemon._native
        try:
            while not native.wait(0.0):
                await asyncio.sleep(self.POLL)
        except asyncio.CancelledError:
            await self.stop()
            raise

    async def stop(self) -> None:
        """Stops serving and waits (on the loop) until the daemon's threads are gone."""
        daemon, self._daemon = self._daemon, None
        if daemon is None:
            return
        native = daemon._native
        native.stop()
        # Shielded: a cancelled stop still finishes, or threads would outlive the block.
        await asyncio.shield(_until_stopped(native, self.POLL))

    async def __aenter__(self) -> Self:
        return await self.start()

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.stop()

    def __repr__(self) -> str:
        return f"<vhost.aio.Daemon {self.path!r} running={self._daemon is not None}>"


async def _until_stopped(native: _core.Daemon, poll: float) -> None:
    while True:
        try:
            if native.wait(0.0):
                return
        except Exception:  # the error that ended it: stopping is what was asked
            return
        await asyncio.sleep(poll)
