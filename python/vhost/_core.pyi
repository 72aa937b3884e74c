"""Type stubs of the native module ``vhost._core`` (PyO3 glue over the Rust core)."""

import os
from collections.abc import Iterator, Mapping, Sequence
from types import TracebackType
from typing import Any, ClassVar, Final, Protocol, Self, final

from typing_extensions import Buffer

from .types import IotlbMessage, MemoryRegion

__all__ = [
    "DEFAULT_IOTLB_MISS_TIMEOUT",
    "DEFAULT_POSTCOPY_FAULT_TIMEOUT",
    "HEADER_SIZE",
    "MAX_BODY_SIZE",
    "MAX_DEVICE_STATE",
    "MAX_FDS",
    "BackendChannel",
    "BackendSession",
    "Batch",
    "BlkDevice",
    "BlkLoad",
    "Daemon",
    "DescriptorChain",
    "DeviceQueue",
    "DirtyLog",
    "EventFd",
    "FaultResolver",
    "FileDescriptor",
    "Frontend",
    "FrontendCalls",
    "FrontendChannel",
    "FrontendLink",
    "GuestMemory",
    "GuestView",
    "ImageFile",
    "KernelDevice",
    "Listener",
    "PendingCall",
    "VdpaDevice",
    "Virtqueue",
    "__version__",
    "describe",
    "place_rings",
    "protocol_feature_table",
    "request_table",
    "ring_sizes",
]

__version__: Final[str]
DEFAULT_POSTCOPY_FAULT_TIMEOUT: Final[float]
MAX_DEVICE_STATE: Final[int]
"""The largest device state a front-end moves (``save_device_state``/``load_device_state``)."""
DEFAULT_IOTLB_MISS_TIMEOUT: Final[float]

def ring_sizes(size: int, packed: bool = False) -> tuple[int, int, int]:
    """Bytes of the three areas of a ring of ``size`` entries (the core's layout)."""

def place_rings(base_gpa: int, size: int, packed: bool = False) -> tuple[int, int, int]:
    """Guest addresses ``(desc, avail, used)`` of a ring placed from ``base_gpa``."""

def request_table() -> list[tuple[str, int, str, str | None, str, str, str, bool, str]]:
    """The core's table of vhost-user requests, one row each, front-end ones first:
    direction (``"frontend"``/``"backend"``), code, name, gating protocol feature, body
    type, fd rule, reply rule, whether the reply may carry an fd, documentation. What
    ``scripts/gen_codes.py`` writes :mod:`vhost.codes` from."""

def protocol_feature_table() -> list[tuple[str, int, str]]:
    """The core's protocol features: name, mask and documentation, in bit order."""

HEADER_SIZE: Final[int]
"""Bytes in a vhost-user message header."""
MAX_BODY_SIZE: Final[int]
"""Largest body the core accepts in one message."""
MAX_FDS: Final[int]
"""Most fds one message may carry."""

def describe(
    channel: str,
    header: bytes,
    body: bytes,
    fds: Sequence[_Fd],
    request_body: bytes = ...,
) -> tuple[
    str | None,
    bool,
    tuple[int, int, int],
    int,
    list[tuple[str, str, object]],
    str | None,
    str | None,
]:
    """What one message of a ``channel`` (``"frontend"``: the main socket,
    ``"backend"``: the back-end channel) says, by the core's request table: name (None for
    an unknown code), whether it is a reply, (code, flags, size), fd count, fields as
    (name, kind, value), and why the core would refuse it with its hex, or None twice.
    ``request_body`` is the body of the request a reply answers. What :mod:`vhost.trace`
    prints; the fds are only borrowed."""

class _HasFileno(Protocol):
    """Anything with ``fileno()`` (a socket, an :class:`EventFd`, a file): accepted wherever an
    fd is, and borrowed for the call."""

    def fileno(self) -> int:
        """The fd number the object wraps, still owned by it."""

_Fd = int | _HasFileno
_Region = tuple[int, int, int, int, _Fd]
_LogRegion = tuple[int, int, _Fd]

class _VhostBackend:
    """The shared methods of the VhostBackend interface, generated once in the glue for
    Frontend, KernelDevice and VdpaDevice (stub only: no such class exists at runtime)."""

    def get_features(self) -> int:
        """``GET_FEATURES``: the virtio feature bits the device offers, to intersect with the
        driver's before ``set_features``."""
    def set_features(self, features: int) -> None:
        """``SET_FEATURES``: the feature bits acked (a subset of :meth:`get_features`);
        ``VHOST_F_LOG_ALL`` here starts dirty logging."""
    def set_owner(self) -> None:
        """``SET_OWNER``: claims the device for this connection or process; the first request of
        a session."""
    def reset_owner(self) -> None:
        """``RESET_OWNER``: gives up ownership, so the device can be set up anew (deprecated in
        vhost-user; kernel vhost still uses it)."""
    def set_mem_table(self, regions: Sequence[_Region]) -> None:
        """``SET_MEM_TABLE``: the guest memory the device may touch, as ``(guest_phys_addr,
        memory_size, userspace_addr, mmap_offset, fd)`` (fd -1 for none, as kernel vhost
        takes). Fds are borrowed for the call; bad ranges raise ``InvalidParamError``."""
    def set_log_base(self, base: int, region: _LogRegion | None = None) -> None:
        """``SET_LOG_BASE``: where dirty pages are logged; ``base`` is the log's address in this
        process (kernel vhost), or 0 with ``region`` ``(mmap_size, mmap_offset, fd)`` for a
        shared log (vhost-user ``LOG_SHMFD``)."""
    def set_log_fd(self, fd: _Fd | None) -> None:
        """``SET_LOG_FD``: an eventfd the device signals after logging (None unbinds where the
        family allows it)."""
    def set_vring_num(self, index: int, num: int) -> None:
        """``SET_VRING_NUM``: the size of ring ``index`` in descriptors (a power of two up to
        32768 for a split ring)."""
    def set_vring_addr(
        self, index: int, desc: int, used: int, avail: int, flags: int = 0, log: int = 0
    ) -> None:
        """``SET_VRING_ADDR``: where ring ``index`` lives (descriptor table, used and avail
        rings, in the front-end's address space); ``flags`` ``VHOST_VRING_F_LOG`` with the
        used ring's guest address ``log`` logs its writes."""
    def set_vring_base(self, index: int, base: int) -> None:
        """``SET_VRING_BASE``: where ring ``index`` starts (the next avail index; packed rings
        add the wrap counter in bit 15), to resume a ring stopped elsewhere."""
    def get_vring_base(self, index: int) -> int:
        """``GET_VRING_BASE``: stops ring ``index`` and returns where it stopped, for
        :meth:`set_vring_base` on the destination."""
    def set_vring_kick(self, index: int, fd: _Fd | None) -> None:
        """``SET_VRING_KICK``: the eventfd the driver signals when ring ``index`` has buffers
        (borrowed: the device keeps a duplicate); None polls instead, where supported."""
    def set_vring_call(self, index: int, fd: _Fd | None) -> None:
        """``SET_VRING_CALL``: the eventfd the device signals when ring ``index`` returned
        buffers; None disables interrupts."""
    def set_vring_err(self, index: int, fd: _Fd | None) -> None:
        """``SET_VRING_ERR``: the eventfd the device signals when ring ``index`` fails (a broken
        ring), so the VMM can notice."""

@final
class FileDescriptor:
    """An fd the package owns and closes, so a received fd (a dma-buf, a userfaultfd) is
    never leaked or closed twice."""

    def fileno(self) -> int:
        """The fd number, for ``os`` calls; still owned by this object. Raises ``ClosedError``
        once closed."""
    def detach(self) -> int:
        """Gives up ownership and returns the number, which the caller must close; the object is
        closed afterwards."""
    def close(self) -> None:
        """Closes the fd (idempotent); collection closes it too."""
    @property
    def closed(self) -> bool:
        """Whether :meth:`close` or :meth:`detach` ran."""
    def __enter__(self) -> Self: ...
    def __exit__(
        self,
        t: type[BaseException] | None,
        v: BaseException | None,
        tb: TracebackType | None,
        /,
    ) -> None: ...

@final
class EventFd:
    """A Linux eventfd: the kick and call signals of a virtqueue, passed to peers by SCM_RIGHTS."""

    def __new__(cls, nonblock: bool = False) -> Self: ...
    def fileno(self) -> int:
        """The eventfd's number, to pass to a peer (``set_vring_kick``) or a poll loop; owned by
        this object."""
    def write(self, value: int = 1) -> None:
        """Adds ``value`` (a u64) to the counter, waking a reader: a kick or a call."""
    def read(self) -> int:
        """Returns the counter and clears it; blocks while it is zero (unless created
        non-blocking). Ctrl-C interrupts the wait and leaves the EventFd usable."""
    def try_read(self) -> int | None:
        """The counter, cleared, or None at once when nothing was signalled; never blocks."""
    def wait(self, timeout: float | None = None) -> bool:
        """Waits up to ``timeout`` seconds (None: forever) for a signal without consuming it;
        True when signalled. Ctrl-C interrupts."""
    def close(self) -> None:
        """Closes the eventfd (idempotent); a peer holding a duplicate keeps its own."""
    @property
    def closed(self) -> bool:
        """Whether :meth:`close` ran; every other call then raises ``ClosedError``."""
    def __enter__(self) -> Self: ...
    def __exit__(
        self,
        t: type[BaseException] | None,
        v: BaseException | None,
        tb: TracebackType | None,
        /,
    ) -> None: ...

@final
class GuestMemory:
    """Guest RAM as this process maps it (memfd-backed, shareable with a back-end), with
    checked guest-address access."""

    @staticmethod
    def allocate(layout: Sequence[tuple[int, int]]) -> GuestMemory:
        """Guest RAM for a front-end: one sealed, shareable memfd region per ``(guest_phys_addr,
        size)`` pair (sizes in bytes). Overlaps raise ``InvalidMemoryError``; a
        failed memfd raises ``KernelError``."""
    @staticmethod
    def empty() -> GuestMemory:
        """A memory with no region, what a back-end has before ``SET_MEM_TABLE``."""
    def regions(self) -> list[MemoryRegion]:
        """The regions, each with its fd (borrowed: it lives as long as this memory)."""
    @property
    def total_size(self) -> int:
        """Bytes of guest RAM over all regions."""
    def __len__(self) -> int: ...
    def read(self, gpa: int, length: int) -> bytes:
        """Copies ``length`` bytes at guest-physical ``gpa`` (may span contiguous regions); a
        range outside memory raises ``InvalidMemoryError`` naming the address."""
    def read_into(self, gpa: int, buffer: Buffer) -> int:
        """Copies into a writable buffer from ``gpa``, without an intermediate bytes object;
        returns the bytes copied (the buffer's length)."""
    def write(self, gpa: int, data: Buffer) -> int:
        """Copies a bytes-like object to guest-physical ``gpa``; returns the bytes written. Out
        of range: ``InvalidMemoryError``."""
    def view(self, gpa: int, length: int) -> memoryview:
        """A writable memoryview of ``[gpa, gpa + length)``, which must lie in one region:
        zero-copy access that keeps the mapping alive even after the region is removed."""
    def user_to_gpa(self, uaddr: int) -> int:
        """The guest-physical address of a front-end virtual address (vhost-user ring addresses
        are those); ``InvalidMemoryError`` when no region maps it."""
    def contains(self, gpa: int, length: int) -> bool:
        """Whether ``[gpa, gpa + length)`` lies inside one region (no exception, for checks
        before access)."""
    def gpa_to_user(self, gpa: int) -> int:
        """The front-end virtual address that maps guest address ``gpa``;
        ``InvalidMemoryError`` (with the address) when no region maps it."""

@final
class GuestView:
    """The exporter behind :meth:`GuestMemory.view` (``memoryview.obj``)."""

    def __buffer__(self, flags: int, /) -> memoryview: ...

@final
class FaultResolver:
    """A back-end's userfaultfd, front-end side (``vhost.postcopy.FaultResolver`` wraps it)."""

    def __new__(cls, uffd: _Fd, regions: list[tuple[int, int, int]] = ...) -> FaultResolver: ...
    def set_regions(self, regions: list[tuple[int, int, int]]) -> None:
        """Replaces the back-end's mapping bases ``(guest_phys_addr, memory_size,
        backend_addr)``, after a new memory table."""
    def regions(self) -> list[tuple[int, int, int]]:
        """The mapping bases faults are translated with, as ``(guest_phys_addr, memory_size,
        backend_addr)``."""
    def next_fault(self, timeout: float | None = None) -> tuple[int, int, bool] | None:
        """Waits up to ``timeout`` seconds (None: forever) for the next fault:
        ``(guest_phys_addr, backend_addr, write)``, or None. Ctrl-C interrupts; a fault
        outside every region raises ``InvalidParamError``."""
    def copy(self, gpa: int, data: bytes | bytearray | memoryview) -> bool:
        """Puts whole pages of ``data`` at page-aligned ``gpa`` and wakes the waiters; False when
        the pages were already present (nothing overwritten). A failed ioctl raises
        ``KernelError``."""
    def zero(self, gpa: int, length: int) -> bool:
        """Resolves whole pages ``[gpa, gpa + length)`` with zeros; False when already present."""
    def wake(self, gpa: int, length: int) -> None:
        """Wakes threads waiting on ``[gpa, gpa + length)`` after the pages were placed another
        way (through a shared mapping)."""
    def fileno(self) -> int:
        """This handle's userfaultfd number, for a poll loop."""
    def close(self) -> None:
        """Closes this handle on the userfaultfd once no call uses it; the back-end keeps its
        own."""
    @property
    def closed(self) -> bool:
        """Whether :meth:`close` ran; every other call then raises ``ClosedError``."""

@final
class DirtyLog:
    """The dirty-page bitmap of live migration (``vhost.dirty_log.DirtyLog`` wraps it)."""

    @staticmethod
    def allocate(memory: GuestMemory) -> DirtyLog:
        """A zeroed log covering every address of ``memory`` (up to its highest region's end), in
        a sealed memfd a front-end hands to a back-end."""
    @staticmethod
    def adopt(
        fd: _Fd, mmap_size: int, mmap_offset: int, memory: GuestMemory, require_sealed: bool = False
    ) -> DirtyLog:
        """Back-end side: maps ``mmap_size`` bytes from ``mmap_offset`` of the log ``fd`` a
        front-end sent, checked to cover ``memory`` (``InvalidMemoryError`` otherwise); ``fd``
        stays the caller's."""
    @property
    def size(self) -> int:
        """Bytes of the log (a whole number of 64-bit words)."""
    @property
    def mmap_offset(self) -> int:
        """Where the log starts in its fd."""
    @property
    def covers(self) -> int:
        """Guest-physical addresses below this are covered."""
    @property
    def address(self) -> int:
        """The log's address in this process: what kernel vhost's ``set_log_base`` takes."""
    def fileno(self) -> int | None:
        """The memfd of an allocated log, owned by it; None for an adopted log."""
    def mark(self, gpa: int, length: int) -> None:
        """Marks every 4 KiB page a write of ``length`` bytes at ``gpa`` touched; past
        :attr:`covers` raises ``InvalidMemoryError``."""
    def take(self) -> list[tuple[int, int]]:
        """The dirty runs ``(start, end)`` in guest-physical bytes, clearing each bit as it is
        read (atomically against concurrent marks)."""
    def peek(self) -> list[tuple[int, int]]:
        """The dirty runs as :meth:`take` returns them, clearing nothing."""
    def dirty_pages(self) -> int:
        """How many pages are dirty now."""
    def close(self) -> None:
        """Unmaps the log and closes its fd once no call uses it."""
    @property
    def closed(self) -> bool:
        """Whether :meth:`close` ran; every other call then raises ``ClosedError``."""

@final
class Frontend(_VhostBackend):
    """The native vhost-user front-end; :class:`vhost.user.Frontend` adds types and
    context management."""

    @staticmethod
    def connect(path: str | os.PathLike[str], timeout: float | None = 10.0) -> Frontend:
        """Client mode: connects to a back-end listening at ``path``. ``timeout`` (seconds, None:
        forever) bounds the connect and then every reply; a missing socket raises
        ``VhostFileNotFoundError`` naming the path."""
    @staticmethod
    def from_socket(sock: _Fd, timeout: float | None = 10.0) -> Frontend:
        """Adopts a connected Unix socket (a duplicate of its fd), e.g. one end of
        ``socket.socketpair()``."""
    def set_timeout(self, timeout: float | None) -> None:
        """Bounds every later reply wait to ``timeout`` seconds (None: forever); a silent
        back-end then raises ``VhostTimeoutError``."""
    def fileno(self) -> int:
        """The socket's fd, for a poll loop; owned by the connection."""
    def shutdown(self) -> None:
        """Shuts the socket down from any thread: a thread waiting for a reply wakes up."""
    @property
    def broken(self) -> bool:
        """Whether the connection failed (a timeout, a malformed reply, an interrupted request):
        every later request raises ``ClosedError``."""
    @property
    def acked_features(self) -> int:
        """The feature bits last sent with ``SET_FEATURES`` (0 before)."""
    @property
    def acked_protocol_features(self) -> int:
        """The protocol feature bits last sent with ``SET_PROTOCOL_FEATURES``: what gated
        requests check."""
    @property
    def offered_features(self) -> int | None:
        """The back-end's last GET_FEATURES reply; None until asked."""
    @property
    def offered_protocol_features(self) -> int | None:
        """The back-end's last GET_PROTOCOL_FEATURES reply; None until asked."""
    IMPLEMENTED_PROTOCOL_FEATURES: ClassVar[int]
    """The protocol features this front-end implements (``negotiate`` acks no other)."""
    DEFAULT_PROTOCOL_FEATURES: ClassVar[int]
    """The protocol features ``negotiate`` acks when not told which."""
    def negotiate(
        self,
        features: int | None = None,
        protocol_features: int | None = None,
        packed: bool = False,
        event_idx: bool = True,
        log_all: bool = False,
    ) -> tuple[int, int]:
        """GET_FEATURES, SET_OWNER, protocol features, SET_FEATURES as the core decides;
        returns ``(features, protocol features)`` acked."""
    def add_mem_region(self, region: _Region) -> None:
        """``ADD_MEM_REG`` (needs ``CONFIGURE_MEM_SLOTS``): hot-plugs one region
        ``(guest_phys_addr, memory_size, userspace_addr, mmap_offset, fd)``."""
    def remove_mem_region(
        self, guest_phys_addr: int, memory_size: int, userspace_addr: int, mmap_offset: int
    ) -> None:
        """``REM_MEM_REG``: removes the region with these addresses; the back-end unmaps it."""
    def get_protocol_features(self) -> int:
        """``GET_PROTOCOL_FEATURES`` (needs ``PROTOCOL_FEATURES`` offered): the protocol
        extensions the back-end supports."""
    def set_protocol_features(self, features: int) -> None:
        """``SET_PROTOCOL_FEATURES``: the extensions to use, a subset of
        :meth:`get_protocol_features`."""
    def get_queue_num(self) -> int:
        """``GET_QUEUE_NUM`` (needs ``MQ``): how many queues the back-end has."""
    def set_vring_enable(self, index: int, enable: bool) -> None:
        """``SET_VRING_ENABLE``: starts or pauses ring ``index`` once ``PROTOCOL_FEATURES`` is
        acked."""
    def set_vring_endian(self, index: int, big_endian: bool) -> None:
        """``SET_VRING_ENDIAN`` (legacy devices, ``CROSS_ENDIAN``): ring ``index``'s byte order."""
    def vring_kick(self, index: int) -> None:
        """``VRING_KICK`` (needs ``INBAND_NOTIFICATIONS``): kicks ring ``index`` in-band instead
        of by eventfd."""
    def get_config(self, offset: int, size: int, flags: int = 0) -> bytes:
        """``GET_CONFIG`` (needs ``CONFIG``): ``size`` bytes of the device's config space from
        ``offset``."""
    def set_config(self, offset: int, data: bytes, flags: int = 0) -> None:
        """``SET_CONFIG`` (needs ``CONFIG``): writes ``data`` into the config space at
        ``offset``."""
    def set_backend_req_fd(self) -> FrontendChannel:
        """``SET_BACKEND_REQ_FD`` (needs ``BACKEND_REQ``): opens the channel for the back-end's
        own requests and returns this side of it."""
    def get_inflight_fd(
        self, num_queues: int, queue_size: int
    ) -> tuple[int, int, int, int, FileDescriptor]:
        """``GET_INFLIGHT_FD`` (needs ``INFLIGHT_SHMFD``): the back-end's inflight area,
        ``(mmap_size, mmap_offset, num_queues, queue_size, fd)``."""
    def set_inflight_fd(
        self, mmap_size: int, mmap_offset: int, num_queues: int, queue_size: int, fd: _Fd
    ) -> None:
        """``SET_INFLIGHT_FD``: hands a reconnected back-end its inflight area back, so it can
        resubmit what was in flight."""
    def get_max_mem_slots(self) -> int:
        """``GET_MAX_MEM_SLOTS`` (needs ``CONFIGURE_MEM_SLOTS``): how many regions the back-end
        can map."""
    def reset_device(self) -> None:
        """``RESET_DEVICE`` (needs ``RESET_DEVICE``): resets the device without dropping the
        connection."""
    def set_status(self, status: int) -> None:
        """``SET_STATUS`` (needs ``STATUS``): the virtio device status byte."""
    def get_status(self) -> int:
        """``GET_STATUS`` (needs ``STATUS``): the back-end's device status byte."""
    def net_set_mtu(self, mtu: int) -> None:
        """``NET_SET_MTU`` (needs ``MTU``): the MTU in bytes for a net back-end."""
    def send_rarp(self, mac: Sequence[int]) -> None:
        """``SEND_RARP`` (needs ``RARP``): asks a net back-end to announce the 6-byte ``mac``
        after migration."""
    def gpu_set_socket(self, fd: _Fd) -> None:
        """``GPU_SET_SOCKET``: hands a GPU back-end the socket of its display protocol."""
    def iotlb_msg(self, iova: int, size: int, uaddr: int, perm: int, kind: int) -> None:
        """``IOTLB_MSG`` (for a device with ``VIRTIO_F_ACCESS_PLATFORM``): one IOTLB update or
        invalidation (``vhost.user.Frontend.send_iotlb_msg`` takes an ``IotlbMessage``)."""
    def get_shared_object(self, uuid: Sequence[int]) -> FileDescriptor:
        """``GET_SHARED_OBJECT`` (needs ``SHARED_OBJECT``): the dma-buf of the object with this
        16-byte UUID, owned by the caller."""
    def set_device_state_fd(self, direction: int, phase: int, fd: _Fd) -> FileDescriptor | None:
        """``SET_DEVICE_STATE_FD`` (needs ``DEVICE_STATE``): starts a state transfer over ``fd``;
        returns the back-end's own fd when it prefers one."""
    def get_shmem_config(self) -> list[tuple[int, int]]:
        """``GET_SHMEM_CONFIG`` (needs ``SHMEM``): ``(shmid, size)`` of each shared memory region
        in use."""
    def check_device_state(self) -> None:
        """``CHECK_DEVICE_STATE``: whether the last state transfer succeeded; a refusal raises
        ``RequestRefusedError``."""
    def save_device_state(self) -> bytes:
        """The back-end's whole device state for a migration's source (pipe,
        ``SET_DEVICE_STATE_FD``, read, ``CHECK_DEVICE_STATE``); more than 64 MiB raises
        ``ProtocolError``."""
    def load_device_state(self, state: bytes) -> None:
        """Loads ``state`` into the back-end for a migration's destination (pipe,
        ``SET_DEVICE_STATE_FD``, write, ``CHECK_DEVICE_STATE``)."""
    def postcopy_advise(self) -> FileDescriptor:
        """``POSTCOPY_ADVISE`` (needs ``PAGEFAULT``): the back-end's userfaultfd, owned by the
        caller."""
    def postcopy_listen(self) -> None:
        """``POSTCOPY_LISTEN``: the back-end registers its memory with the userfaultfd."""
    def postcopy_end(self) -> None:
        """``POSTCOPY_END``: the back-end unregisters and closes its userfaultfd; a failure
        status raises ``RequestRefusedError``."""
    def postcopy_regions(self) -> list[tuple[int, int, int]]:
        """The back-end's mapping base of each region ``(guest_phys_addr, memory_size,
        backend_addr)``, from tables sent while postcopy listens."""
    def create_crypto_session(self, params: bytes) -> bytes:
        """``CREATE_CRYPTO_SESSION`` (needs ``CRYPTO_SESSION``): sends the session parameters,
        returns the back-end's answer."""
    def close_crypto_session(self, session_id: int) -> None:
        """``CLOSE_CRYPTO_SESSION``: closes the crypto session ``session_id``."""
    def send_raw(
        self,
        code: int,
        flags: int,
        body: bytes,
        fds: Sequence[_Fd] = ...,
        size: int | None = None,
        expect_reply: bool = False,
    ) -> tuple[int, int, bytes, list[FileDescriptor]] | None:
        """Sends a raw header and body (possibly malformed) with optional fds, for robustness
        tests of back-ends; returns ``(code, flags, body, fds)`` of the reply when
        ``expect_reply``."""

@final
class PendingCall:
    """One request in flight on a front-end connection, driven by an event loop
    (:mod:`vhost.aio`): :meth:`advance` when the socket is readable, :meth:`result` once
    it returned True. Dropped or abandoned before its answer came, it closes the
    connection (the answer would be read as the next request's)."""

    def advance(self) -> bool:
        """Takes what has arrived of the answer without waiting; True once the call is over.
        A failed call raises here."""
    def result(self) -> Any:
        """The call's value (once), after :meth:`advance` returned True."""
    def abandon(self) -> None:
        """Gives the call up; unanswered, the connection is closed."""
    @property
    def request(self) -> str:
        """The request whose answer is awaited (empty when none was)."""

@final
class FrontendCalls:
    """A :class:`Frontend`'s requests as non-blocking calls (same names and arguments),
    each sending its request and returning a :class:`PendingCall`: the core's encoder and
    decoder, driven by :mod:`vhost.aio`'s event loop."""

    def __new__(cls, frontend: Frontend) -> Self: ...
    def fileno(self) -> int:
        """The connection's socket, for the loop to wait on."""
    def get_features(self) -> PendingCall:
        """``GET_FEATURES``: an int."""
    def set_features(self, features: int) -> PendingCall:
        """``SET_FEATURES``."""
    def set_owner(self) -> PendingCall:
        """``SET_OWNER``."""
    def reset_owner(self) -> PendingCall:
        """``RESET_OWNER``."""
    def set_mem_table(self, regions: Sequence[_Region]) -> PendingCall:
        """``SET_MEM_TABLE`` (fds borrowed for the send)."""
    def set_log_base(self, base: int, region: _LogRegion | None = None) -> PendingCall:
        """``SET_LOG_BASE`` with a shared-memory log region (base 0)."""
    def set_log_fd(self, fd: _Fd | None) -> PendingCall:
        """``SET_LOG_FD``."""
    def set_vring_num(self, index: int, num: int) -> PendingCall:
        """``SET_VRING_NUM``."""
    def set_vring_addr(
        self, index: int, desc: int, used: int, avail: int, flags: int = 0, log: int = 0
    ) -> PendingCall:
        """``SET_VRING_ADDR``."""
    def set_vring_base(self, index: int, base: int) -> PendingCall:
        """``SET_VRING_BASE``."""
    def get_vring_base(self, index: int) -> PendingCall:
        """``GET_VRING_BASE``: an int."""
    def set_vring_kick(self, index: int, fd: _Fd | None) -> PendingCall:
        """``SET_VRING_KICK``."""
    def set_vring_call(self, index: int, fd: _Fd | None) -> PendingCall:
        """``SET_VRING_CALL``."""
    def set_vring_err(self, index: int, fd: _Fd | None) -> PendingCall:
        """``SET_VRING_ERR``."""
    def negotiate(
        self,
        features: int | None = None,
        protocol_features: int | None = None,
        packed: bool = False,
        event_idx: bool = True,
        log_all: bool = False,
    ) -> PendingCall:
        """The usual opening as one call: ``(features, protocol features)`` acked."""
    def add_mem_region(self, region: _Region) -> PendingCall:
        """``ADD_MEM_REG``."""
    def remove_mem_region(
        self, guest_phys_addr: int, memory_size: int, userspace_addr: int, mmap_offset: int
    ) -> PendingCall:
        """``REM_MEM_REG``."""
    def get_protocol_features(self) -> PendingCall:
        """``GET_PROTOCOL_FEATURES``: an int."""
    def set_protocol_features(self, features: int) -> PendingCall:
        """``SET_PROTOCOL_FEATURES``."""
    def get_queue_num(self) -> PendingCall:
        """``GET_QUEUE_NUM``: an int."""
    def set_vring_enable(self, index: int, enable: bool) -> PendingCall:
        """``SET_VRING_ENABLE``."""
    def set_vring_endian(self, index: int, big_endian: bool) -> PendingCall:
        """``SET_VRING_ENDIAN``."""
    def vring_kick(self, index: int) -> PendingCall:
        """``VRING_KICK``."""
    def get_config(self, offset: int, size: int, flags: int = 0) -> PendingCall:
        """``GET_CONFIG``: bytes."""
    def set_config(self, offset: int, data: bytes, flags: int = 0) -> PendingCall:
        """``SET_CONFIG``."""
    def set_backend_req_fd(self) -> PendingCall:
        """``SET_BACKEND_REQ_FD``: a :class:`FrontendChannel`."""
    def get_inflight_fd(self, num_queues: int, queue_size: int) -> PendingCall:
        """``GET_INFLIGHT_FD``: ``(mmap_size, mmap_offset, num_queues, queue_size, fd)``."""
    def set_inflight_fd(
        self, mmap_size: int, mmap_offset: int, num_queues: int, queue_size: int, fd: _Fd
    ) -> PendingCall:
        """``SET_INFLIGHT_FD``."""
    def get_max_mem_slots(self) -> PendingCall:
        """``GET_MAX_MEM_SLOTS``: an int."""
    def reset_device(self) -> PendingCall:
        """``RESET_DEVICE``."""
    def set_status(self, status: int) -> PendingCall:
        """``SET_STATUS``."""
    def get_status(self) -> PendingCall:
        """``GET_STATUS``: an int."""
    def net_set_mtu(self, mtu: int) -> PendingCall:
        """``NET_SET_MTU``."""
    def send_rarp(self, mac: Sequence[int]) -> PendingCall:
        """``SEND_RARP``."""
    def gpu_set_socket(self, fd: _Fd) -> PendingCall:
        """``GPU_SET_SOCKET``."""
    def iotlb_msg(self, iova: int, size: int, uaddr: int, perm: int, kind: int) -> PendingCall:
        """``IOTLB_MSG``."""
    def get_shared_object(self, uuid: Sequence[int]) -> PendingCall:
        """``GET_SHARED_OBJECT``: a :class:`FileDescriptor`."""
    def set_device_state_fd(self, direction: int, phase: int, fd: _Fd) -> PendingCall:
        """``SET_DEVICE_STATE_FD``: a :class:`FileDescriptor` or None."""
    def get_shmem_config(self) -> PendingCall:
        """``GET_SHMEM_CONFIG``: ``[(shmid, size)]``."""
    def check_device_state(self) -> PendingCall:
        """``CHECK_DEVICE_STATE``."""
    def postcopy_advise(self) -> PendingCall:
        """``POSTCOPY_ADVISE``: a :class:`FileDescriptor`."""
    def postcopy_listen(self) -> PendingCall:
        """``POSTCOPY_LISTEN``."""
    def postcopy_end(self) -> PendingCall:
        """``POSTCOPY_END``."""
    def create_crypto_session(self, params: bytes) -> PendingCall:
        """``CREATE_CRYPTO_SESSION``: bytes."""
    def close_crypto_session(self, session_id: int) -> PendingCall:
        """``CLOSE_CRYPTO_SESSION``."""

@final
class FrontendChannel:
    """The front-end's end of the back-end channel, where a back-end's own requests arrive."""

    def fileno(self) -> int:
        """The channel's socket fd, to poll for a back-end request before :meth:`process_one`."""
    def process_one(self, handler: Any) -> None:
        """Waits for one back-end request and runs the ``FrontendRequestHandler`` method for it,
        acking when asked; the handler's exception is re-raised after the NACK went out.
        Ctrl-C interrupts the wait."""
    def set_timeout(self, timeout: float | None) -> None:
        """Bounds an ack's send and a request's remainder once it started to arrive (None:
        forever); the wait for the next request has no bound."""
    @property
    def broken(self) -> bool:
        """Whether the channel failed; every later call raises ``ClosedError``."""
    def close(self) -> None:
        """Closes the channel; a thread blocked in :meth:`process_one` wakes up."""
    def __enter__(self) -> Self: ...
    def __exit__(
        self,
        t: type[BaseException] | None,
        v: BaseException | None,
        tb: TracebackType | None,
        /,
    ) -> None: ...

@final
class BackendChannel:
    """The back-end's end of the back-end channel, for requests a back-end sends its front-end."""

    def config_change(self) -> None:
        """``CONFIG_CHANGE_MSG``: the config space changed; the front-end re-reads it and tells
        the driver."""
    def vring_call(self, index: int) -> None:
        """``VRING_CALL`` (needs ``INBAND_NOTIFICATIONS``): an in-band interrupt for ring
        ``index``."""
    def vring_err(self, index: int) -> None:
        """``VRING_ERR``: reports ring ``index`` as failed, in-band."""
    def shared_object_add(self, uuid: Sequence[int]) -> None:
        """``SHARED_OBJECT_ADD``: registers an object this device exports, by 16-byte UUID."""
    def shared_object_remove(self, uuid: Sequence[int]) -> None:
        """``SHARED_OBJECT_REMOVE``: withdraws an object :meth:`shared_object_add` registered."""
    def shared_object_lookup(self, uuid: Sequence[int]) -> int:
        """``SHARED_OBJECT_LOOKUP``: the front-end's status for the object (0: found); see
        :meth:`shared_object_lookup_fd` for its fd."""
    def shared_object_lookup_fd(
        self, uuid: Sequence[int]
    ) -> tuple[int, FileDescriptor | None]:
        """The lookup's status and, when found, the object's dma-buf fd (owned by the caller)."""
    def send_iotlb_msg(self, msg: IotlbMessage) -> None:
        """``IOTLB_MSG`` from the back-end: a miss asking the front-end to translate
        ``msg.iova``, or an access failure; the name and argument of
        ``Frontend.send_iotlb_msg``. A non-zero ``asid`` raises ``InvalidParamError``."""
    def vring_host_notifier(
        self, index: int, size: int, offset: int, fd: _Fd | None = None
    ) -> None:
        """``VRING_HOST_NOTIFIER_MSG``: offers ``size`` bytes of ``fd`` at ``offset`` as ring
        ``index``'s doorbell page (no fd: withdraw it)."""
    def shmem_map(
        self,
        shmid: int,
        fd_offset: int,
        shm_offset: int,
        length: int,
        fd: _Fd,
        *,
        writable: bool = False,
    ) -> None:
        """``SHMEM_MAP`` (needs ``SHMEM``): maps ``length`` bytes of ``fd`` (borrowed) from
        ``fd_offset`` into shared memory region ``shmid`` at ``shm_offset``; the same order as
        ``FrontendLink.shmem_map``. Ranges are checked before sending (``InvalidParamError``)."""
    def shmem_unmap(self, shmid: int, shm_offset: int, length: int) -> None:
        """``SHMEM_UNMAP``: unmaps a range :meth:`shmem_map` mapped."""
    def set_timeout(self, timeout: float | None) -> None:
        """Bounds the wait for each ack (None: forever); a silent front-end then raises
        ``VhostTimeoutError``."""

@final
class BackendSession:
    """One vhost-user connection, back-end side: the core decodes and validates each request and
    calls the Python ``BackendHandler`` (``vhost.user``) with it."""

    @staticmethod
    def connect(path: str | os.PathLike[str]) -> BackendSession:
        """Client mode: connects to a front-end listening at ``path`` (Ctrl-C interrupts a
        connect waiting for a full backlog)."""
    @staticmethod
    def from_socket(sock: _Fd) -> BackendSession:
        """Adopts a connected Unix socket (its fd is duplicated)."""
    def fileno(self) -> int:
        """The socket's fd, for a poll loop around :meth:`handle_one`."""
    @property
    def memory(self) -> GuestMemory:
        """The session's guest memory, updated in place on every memory-table change (empty
        before)."""
    @property
    def acked_features(self) -> int:
        """The feature bits the front-end acked; ``InvalidParamError`` while another thread
        serves."""
    @property
    def acked_protocol_features(self) -> int:
        """The protocol feature bits the front-end acked; ``InvalidParamError`` while another
        thread serves."""
    def handle_one(self, handler: Any) -> bool:
        """Receives and handles one request with ``handler``; False when the front-end
        disconnected."""
    def serve(self, handler: Any) -> None:
        """Serves requests with ``handler`` until the front-end disconnects (returns) or breaks
        the protocol (raises ``ProtocolError``); the connection is closed either way, also on
        Ctrl-C."""
    def close(self) -> None:
        """Closes the connection; a thread blocked in :meth:`serve` wakes up and returns."""
    @property
    def closed(self) -> bool:
        """Whether the connection is closed."""
    def __enter__(self) -> Self: ...
    def __exit__(
        self,
        t: type[BaseException] | None,
        v: BaseException | None,
        tb: TracebackType | None,
        /,
    ) -> None: ...

@final
class Listener:
    """A listening Unix socket at ``path`` for whichever side is the server; the path is unlinked
    on :meth:`close`."""

    def __new__(cls, path: str | os.PathLike[str], replace_stale: bool = True) -> Self: ...
    @property
    def path(self) -> str:
        """The socket's path."""
    def fileno(self) -> int:
        """The listening fd, for a poll loop; ``ClosedError`` once closed."""
    def accept_backend(self, timeout: float | None = None) -> BackendSession:
        """Waits up to ``timeout`` seconds (None: forever) for a front-end and returns the
        back-end session; Ctrl-C interrupts and the listener keeps accepting."""
    def accept_frontend(
        self, timeout: float | None = None, reply_timeout: float | None = 10.0
    ) -> Frontend:
        """Server-mode front-end: waits for a back-end to connect; ``reply_timeout`` bounds each
        reply later."""
    def close(self) -> None:
        """Closes the listener and unlinks its path; a thread blocked in accept wakes up with
        ``ClosedError``."""
    def __enter__(self) -> Self: ...
    def __exit__(
        self,
        t: type[BaseException] | None,
        v: BaseException | None,
        tb: TracebackType | None,
        /,
    ) -> None: ...

@final
class DescriptorChain:
    """A buffer the driver made available, popped from a :class:`DeviceQueue`: its head and
    guest-memory segments, device-readable first."""

    @property
    def head(self) -> int:
        """What identifies the chain when it is returned (split: its head descriptor's index;
        packed: its buffer id)."""
    @property
    def segments(self) -> list[tuple[int, int, bool]]:
        """The chain's ``(gpa, length, writable)`` segments, readable ones first."""
    @property
    def readable_len(self) -> int:
        """Bytes the device may read (the request)."""
    @property
    def writable_len(self) -> int:
        """Bytes the device may write (room for the answer)."""
    def __len__(self) -> int: ...

@final
class DeviceQueue:
    """The device side of a virtqueue: a back-end pops the driver's buffers and returns them
    used. Addresses are guest-physical; layout and memory are checked when built."""

    def __new__(
        cls,
        memory: GuestMemory,
        size: int,
        desc: int,
        avail: int,
        used: int,
        *,
        packed: bool = False,
        event_idx: bool = False,
        indirect: bool = True,
    ) -> Self: ...
    @staticmethod
    def from_user(
        memory: GuestMemory,
        size: int,
        desc: int,
        avail: int,
        used: int,
        *,
        packed: bool = False,
        event_idx: bool = False,
        indirect: bool = True,
    ) -> DeviceQueue:
        """The same queue from the front-end's virtual addresses (as ``SET_VRING_ADDR`` carries
        them), converted with :meth:`GuestMemory.user_to_gpa`."""
    def set_memory(self, memory: GuestMemory) -> None:
        """Rebinds the queue to a new memory table (after ``SET_MEM_TABLE``); the ring areas must
        still be inside it."""
    def pop_batch(self, max: int = 64) -> list[DescriptorChain]:
        """Pops up to ``max`` available chains; a corrupt ring raises ``QueueError`` and marks
        the queue :attr:`broken`."""
    def read_chain(
        self, chain: DescriptorChain, offset: int = 0, length: int | None = None
    ) -> bytes:
        """Copies up to ``length`` (default: all) of the chain's readable bytes from ``offset``
        on, in one call."""
    def write_chain(self, chain: DescriptorChain, data: Buffer, offset: int = 0) -> int:
        """Writes ``data`` into the chain's writable segments from ``offset`` on; returns the
        bytes that fit."""
    def add_used(self, head: int, length: int) -> None:
        """Returns chain ``head`` to the driver with ``length`` bytes written; a head not in
        flight raises ``InvalidParamError``."""
    def add_used_batch(self, used: Sequence[tuple[int, int]]) -> None:
        """Returns several ``(head, length)`` chains with one index update."""
    def needs_notification(self) -> bool:
        """Whether the driver wants an interrupt for what was returned since the last call (event
        index or flags)."""
    def set_notification(self, enable: bool) -> bool:
        """Enables or disables kicks; after enabling, returns whether buffers are already
        available (process them before sleeping)."""
    @property
    def base(self) -> int:
        """The ring base as GET_VRING_BASE answers it; setting it is SET_VRING_BASE."""
    @base.setter
    def base(self, value: int) -> None:
        """Restores the ring position (SET_VRING_BASE); a base that does not fit is
        InvalidParamError."""
    @property
    def next_avail(self) -> int:
        """The next avail position to process (the low half of :attr:`base`)."""
    @property
    def next_used(self) -> int:
        """Where the next used element goes (packed: slot and wrap counter in bit 15)."""
    @property
    def broken(self) -> bool:
        """True once the ring was found corrupt: every data-path call then raises ``QueueError``."""
    @property
    def size(self) -> int:
        """The ring's size in descriptors."""
    @property
    def packed(self) -> bool:
        """Whether the ring is packed (``VIRTIO_F_RING_PACKED``) rather than split."""

@final
class Virtqueue:
    """The driver side of a virtqueue, what a front-end or test rig fills: add buffers, publish,
    kick, poll used. The ring areas are zeroed when built."""

    def __new__(
        cls,
        memory: GuestMemory,
        size: int,
        desc: int,
        avail: int,
        used: int,
        *,
        packed: bool = False,
        event_idx: bool = False,
    ) -> Self: ...
    def set_memory(self, memory: GuestMemory) -> None:
        """Rebinds the queue to a new memory snapshot; the ring areas must still be inside it."""
    def add(
        self, readable: Sequence[tuple[int, int]], writable: Sequence[tuple[int, int]]
    ) -> int:
        """Adds a buffer of device-readable then device-writable ``(gpa, len)`` segments; returns
        its head (split) or buffer id (packed). Visible after :meth:`publish`; a full ring
        raises ``QueueFullError``."""
    def publish(self) -> None:
        """Makes the buffers added so far visible to the device."""
    def kick_needed(self) -> bool:
        """Whether the device wants a kick for what was published since the last call."""
    def poll_used(self) -> list[tuple[int, int]]:
        """The buffers the device returned, as ``(head, bytes written)``."""
    def set_used_notification(self, enable: bool) -> bool:
        """Asks the device for interrupts (or not); after enabling, returns whether used buffers
        are already waiting."""
    @property
    def num_free(self) -> int:
        """Descriptors free for :meth:`add`."""
    @property
    def in_flight(self) -> int:
        """Buffers added and not yet returned by :meth:`poll_used`."""
    @property
    def broken(self) -> bool:
        """True once the device returned something impossible: every call then raises
        ``QueueError``."""
    @property
    def size(self) -> int:
        """The ring's size in descriptors."""
    @property
    def packed(self) -> bool:
        """Whether the ring is packed rather than split."""
    @property
    def event_idx(self) -> bool:
        """Whether the ring uses event suppression by index (``VIRTIO_F_EVENT_IDX``)."""
    @property
    def desc(self) -> int:
        """Guest-physical address of the descriptor table (packed: the ring)."""
    @property
    def avail(self) -> int:
        """Guest-physical address of the avail ring (packed: driver event area)."""
    @property
    def used(self) -> int:
        """Guest-physical address of the used ring (packed: device event area)."""

# ---- daemon framework -----------------------------------------------------------------

@final
class BlkDevice:
    """A virtio-blk device in Rust over a raw image (locked as QEMU locks it) or a RAM disk, for
    :class:`Daemon`. A missing or unusable image raises ``VhostOSError``/``InvalidParamError``
    naming the path."""

    def __new__(
        cls,
        path: str | os.PathLike[str],
        *,
        num_queues: int = 1,
        queue_size: int = 256,
        readonly: bool = False,
        serial: str | None = None,
        lock: bool = True,
        force_share: bool = False,
    ) -> Self: ...
    @staticmethod
    def ram(
        size: int,
        *,
        num_queues: int = 1,
        queue_size: int = 256,
        readonly: bool = False,
        serial: str | None = None,
    ) -> BlkDevice:
        """A RAM disk of ``size`` bytes (a multiple of 512), for tests and benchmarks."""
    @property
    def capacity(self) -> int:
        """Capacity in 512-byte sectors."""
    @property
    def num_queues(self) -> int:
        """Number of request queues offered."""
    @property
    def features(self) -> int:
        """The virtio feature bits the device offers."""
    def config(self) -> bytes:
        """The virtio-blk configuration space, as the driver reads it."""
    def resize(self, size: int | None = None) -> tuple[int, int, bool]:
        """Grows the disk to the image's size now (``size`` None) or to ``size`` bytes, and tells
        the front-end; returns ``(old, new, notified)`` in sectors."""

@final
class FrontendLink:
    """The front-end a daemon serves, as its device reaches it (the back-end channel)."""

    @property
    def connected(self) -> bool:
        """Whether a front-end is being served."""
    @property
    def has_channel(self) -> bool:
        """Whether that front-end set up the back-end channel (``BACKEND_REQ``), which every
        request here needs."""
    def config_change(self) -> None:
        """``CONFIG_CHANGE_MSG``: the front-end re-reads the config space and tells the driver.
        Without a front-end: ``DisconnectedError``."""
    def shared_object_add(self, uuid: Sequence[int]) -> None:
        """``SHARED_OBJECT_ADD``: registers an object (16-byte UUID) this device exports."""
    def shared_object_remove(self, uuid: Sequence[int]) -> None:
        """``SHARED_OBJECT_REMOVE``: withdraws an object :meth:`shared_object_add` registered."""
    def shared_object_lookup(self, uuid: Sequence[int]) -> FileDescriptor | None:
        """``SHARED_OBJECT_LOOKUP``: another device's object as a dma-buf the caller owns, or
        None when the front-end does not know it."""
    def shmem_map(
        self,
        shmid: int,
        fd_offset: int,
        shm_offset: int,
        length: int,
        fd: _Fd,
        *,
        writable: bool = False,
    ) -> None:
        """``SHMEM_MAP``: maps ``length`` bytes of ``fd`` (borrowed) from ``fd_offset`` into
        shared memory region ``shmid`` at ``shm_offset``; the same order as
        ``BackendChannel.shmem_map``."""
    def shmem_unmap(self, shmid: int, shm_offset: int, length: int) -> None:
        """``SHMEM_UNMAP``: unmaps a range :meth:`shmem_map` mapped."""

@final
class ImageFile:
    """An open, checked and locked raw image for a block device written in Python; the locks
    (QEMU's byte-range locks) last until :meth:`close`."""

    def __new__(
        cls,
        path: str | os.PathLike[str],
        *,
        readonly: bool = False,
        lock: bool = True,
        force_share: bool = False,
    ) -> Self: ...
    def fileno(self) -> int:
        """The file's fd, for ``os.pread``/``os.pwrite``; valid until :meth:`close`."""
    @property
    def size(self) -> int:
        """Size in bytes (a multiple of 512)."""
    @property
    def path(self) -> str:
        """The image's path, for messages."""
    @property
    def readonly(self) -> bool:
        """Whether the image was opened read-only."""
    @property
    def closed(self) -> bool:
        """Whether :meth:`close` ran."""
    def close(self) -> None:
        """Closes the file, which releases its locks."""
    def __enter__(self) -> Self: ...
    def __exit__(
        self,
        t: type[BaseException] | None,
        v: BaseException | None,
        tb: TracebackType | None,
    ) -> None: ...

# (kind, session, request, queue, end, reason, hint, error)
_EventTuple = tuple[
    str, int, str | None, int | None, str | None, str | None, str | None, bool
]

@final
class Batch:
    """One batch of descriptor chains handed to a Python device's ``process(queue, batch)``;
    completions count only while ``process`` runs."""

    def __len__(self) -> int: ...
    def __iter__(self) -> Iterator[DescriptorChain]: ...
    @property
    def chains(self) -> list[DescriptorChain]:
        """The chains of this batch, in ring order."""
    def read(
        self, chain: DescriptorChain, offset: int = 0, length: int | None = None
    ) -> bytes:
        """Copies the chain's readable bytes (from ``offset``, at most ``length``)."""
    def write(self, chain: DescriptorChain, data: Buffer, offset: int = 0) -> int:
        """Writes ``data`` into the chain's writable bytes from ``offset``; returns what fit."""
    def complete(self, chain: DescriptorChain, written: int) -> None:
        """Returns ``chain`` to the driver with ``written`` bytes written; a chain not of this
        batch raises ``InvalidParamError``."""

class _PythonDevice(Protocol):
    """The shape of a device written in Python (``vhost.daemon.Device``), as :class:`Daemon`
    reads it."""

    @property
    def device_type(self) -> int:
        """The virtio device id (2 for block, 4 for entropy)."""
    @property
    def num_queues(self) -> int:
        """How many queues the device has."""
    @property
    def max_queue_size(self) -> int:
        """The largest ring size the device accepts."""
    @property
    def features(self) -> int:
        """The virtio feature bits offered."""
    @property
    def protocol_features(self) -> int:
        """The vhost-user protocol feature bits offered beyond the daemon's own."""
    @property
    def shmem_regions(self) -> Mapping[int, int]:
        """Shared memory region id to size in bytes (``GET_SHMEM_CONFIG``)."""
    def config(self) -> bytes:
        """The config space bytes."""
    def set_config(self, offset: int, data: bytes) -> None:
        """The driver wrote ``data`` at ``offset`` of the config space."""
    def reset(self) -> None:
        """The device was reset: forget every request state."""
    def set_acked_features(self, features: int) -> None:
        """The feature bits the driver acked."""
    def set_acked_protocol_features(self, protocol_features: int) -> None:
        """The protocol feature bits the front-end acked."""
    def process(self, queue: int, batch: Batch) -> None:
        """Handles the available chains of ``queue`` in ``batch``."""

@final
class Daemon:
    """Serves one device to vhost-user front-ends on a background thread, natively
    (``vhost.daemon.Daemon`` wraps it)."""

    def __new__(
        cls,
        device: BlkDevice | _PythonDevice,
        *,
        stall_timeout: float = 5.0,
        poll_us: int = 0,
        require_sealed_memory: bool = False,
        postcopy_fault_timeout: float | None = ...,
        iommu_miss_timeout: float | None = None,
    ) -> Self: ...
    def start(
        self,
        path: str | os.PathLike[str],
        *,
        client: bool = False,
        vduse: bool = False,
        packed: bool = False,
    ) -> None:
        """Listens on ``path`` (server mode, replacing a stale socket) or, with ``client``,
        connects to a front-end there; a path in use raises ``VhostOSError`` naming it.
        With ``vduse``, ``path`` names a VDUSE device to create (a stale one of that name
        is replaced) and serve, offering packed rings too when ``packed``:
        ``KernelError`` (EBUSY) when that device is in use, ``NotSupportedError`` without
        VDUSE."""
    def stop(self) -> None:
        """Asks the daemon to stop; :meth:`wait` returns once it has."""
    def wait(self, timeout: float | None = None) -> bool:
        """Waits up to ``timeout`` seconds (None or ``math.inf``: forever) for the daemon to
        finish; returns whether it has. An error that ended it is raised here, once."""
    @property
    def running(self) -> bool:
        """Whether the daemon is serving or starting to."""
    @property
    def sessions_started(self) -> int:
        """Front-end sessions accepted so far."""
    @property
    def sessions_ended(self) -> int:
        """Front-end sessions that have ended, cleanly or not."""
    @property
    def active(self) -> bool:
        """Whether a front-end is being served now."""
    @property
    def last_error(self) -> str | None:
        """The error that ended (or was refused in) the latest session, if any."""
    @property
    def completed(self) -> list[int]:
        """Descriptor chains completed per queue in the current or last session."""
    @property
    def iotlb_misses(self) -> list[int]:
        """IOTLB misses each queue asked the front-end for in the current or last session."""
    def next_events(self, timeout: float | None = 0.0) -> list[_EventTuple]:
        """The events since the last call as ``(kind, session, request, queue, end, reason, hint,
        error)``, waiting up to ``timeout`` seconds for the first; Ctrl-C interrupts."""
    @property
    def events_dropped(self) -> int:
        """Events dropped because nobody collected them (the latest 1024 are kept)."""
    @property
    def frontend(self) -> FrontendLink:
        """The link to the front-end being served (config changes, shared objects, shared
        memory), valid across sessions."""

@final
class BlkLoad:
    """The native virtio-blk load loop of ``python -m vhost bench blk``."""

    def __new__(
        cls,
        memory: GuestMemory,
        size: int,
        desc: int,
        avail: int,
        used: int,
        kick: _Fd,
        call: _Fd,
        buffers: Sequence[tuple[int, int]],
        window: int,
        *,
        packed: bool = False,
        event_idx: bool = False,
        segment_size: int = 32768,
        socket: _Fd | None = None,
        frontend: Frontend | None = None,
        iommu_page: int | None = None,
        iommu_prefill: str = "none",
        iommu_strict: bool = False,
    ) -> Self:
        """With ``iommu_page``: the loop plays the IOMMU of ``frontend`` (pages of that
        many bytes, ``iommu_prefill`` ``none``/``all``, ``iommu_strict`` unmapping each
        request's data) and sets queue 0 up itself at I/O virtual addresses."""
    def run(
        self,
        rw: str,
        block_size: int,
        iodepth: int,
        offset: int,
        size: int,
        *,
        seconds: float | None = None,
        ios: int | None = None,
        seed: int = 1,
        busy_poll: float = 0.0,
        timeout: float = 10.0,
        verify: bool = False,
        generation: int = 1,
        fill: bool = True,
    ) -> dict[str, Any]:
        """Runs ``rw`` (``read``, ``write``, ``randread``, ``randwrite``) requests of
        ``block_size`` bytes in ``[offset, offset + size)``, ``iodepth`` in flight, for
        ``seconds`` or ``ios`` requests; returns the counts and latencies."""
    def max_iodepth(self, block_size: int) -> int:
        """The deepest queue ``block_size`` requests can keep (slots and descriptors)."""
    @property
    def iommu(self) -> dict[str, Any] | None:
        """Behind an IOMMU: ``page``, ``prefill``, ``strict``, ``pages``, ``iova_base`` and
        the counts so far (``misses``, ``unmapped_misses``, ``updates``,
        ``invalidations``); ``None`` for a flat memory table."""
    @property
    def queue_size(self) -> int:
        """The ring's size in descriptors."""
    @property
    def slots(self) -> int:
        """Request slots, one per ``(header, data)`` pair of ``buffers``."""
    @property
    def window(self) -> int:
        """Bytes of each slot's data window (the largest request it carries)."""

_Iotlb = tuple[int, int, int, int, int, int]

@final
class KernelDevice(_VhostBackend):
    """A kernel vhost device (``/dev/vhost-net``, ``/dev/vhost-vsock``...), driven by ioctls;
    ``vhost.kern.KernelBackend`` wraps it."""

    @staticmethod
    def open(path: str | os.PathLike[str]) -> KernelDevice:
        """Opens a vhost character device and checks that it is one (``KernelError`` ENOTTY
        otherwise; a missing path names it)."""
    @staticmethod
    def from_fd(fd: _Fd) -> KernelDevice:
        """Adopts a duplicate of an open vhost fd (the caller keeps its own)."""
    def fileno(self) -> int:
        """The device's fd (owned by this object)."""
    def close(self) -> None:
        """Closes the device once no call uses it."""
    @property
    def closed(self) -> bool:
        """Whether :meth:`close` ran; every other call then raises ``ClosedError``."""
    def __enter__(self) -> Self: ...
    def __exit__(
        self,
        t: type[BaseException] | None,
        v: BaseException | None,
        tb: TracebackType | None,
        /,
    ) -> None: ...
    def get_backend_features(self) -> int:
        """``VHOST_GET_BACKEND_FEATURES``: the kernel's vhost extensions (IOTLB message v2,
        batching)."""
    def set_backend_features(self, features: int) -> None:
        """``VHOST_SET_BACKEND_FEATURES``: the extensions to use."""
    def set_vring_endian(self, index: int, big_endian: bool) -> None:
        """``VHOST_SET_VRING_ENDIAN`` (legacy cross-endian rings): ring ``index``'s byte order."""
    def get_vring_endian(self, index: int) -> bool:
        """``VHOST_GET_VRING_ENDIAN``: whether ring ``index`` is big-endian."""
    def set_vring_busyloop_timeout(self, index: int, usecs: int) -> None:
        """``VHOST_SET_VRING_BUSYLOOP_TIMEOUT``: how long (microseconds) the kernel polls ring
        ``index`` before sleeping."""
    def get_vring_busyloop_timeout(self, index: int) -> int:
        """``VHOST_GET_VRING_BUSYLOOP_TIMEOUT``: that time in microseconds."""
    def net_set_backend(self, index: int, fd: _Fd | None) -> None:
        """``VHOST_NET_SET_BACKEND``: the tap or socket fd ring ``index`` moves packets to (None
        detaches)."""
    def vsock_set_guest_cid(self, cid: int) -> None:
        """``VHOST_VSOCK_SET_GUEST_CID``: the guest's vsock context id (3 or above)."""
    def vsock_set_running(self, running: bool) -> None:
        """``VHOST_VSOCK_SET_RUNNING``: starts or stops the vsock device."""
    def send_iotlb(
        self, iova: int, size: int, uaddr: int, perm: int, kind: int, asid: int = 0
    ) -> None:
        """Writes one IOTLB message (``struct vhost_msg_v2``) to the device."""
    def recv_iotlb(self, timeout: float | None = None) -> _Iotlb | None:
        """Waits up to ``timeout`` seconds for the kernel's next IOTLB message ``(iova, size,
        uaddr, perm, kind, asid)``; None on timeout."""

@final
class VdpaDevice(_VhostBackend):
    """A vDPA device (``/dev/vhost-vdpa-N``): the vhost interface plus config space, status and
    DMA mapping; ``vhost.vdpa.VhostVdpa`` wraps it."""

    @staticmethod
    def open(path: str | os.PathLike[str]) -> VdpaDevice:
        """Opens a vhost-vdpa character device; a missing path raises ``VhostOSError`` naming it."""
    def device(self) -> KernelDevice:
        """A :class:`KernelDevice` sharing this fd, for the generic vhost requests."""
    def fileno(self) -> int:
        """The device's fd (owned by this object)."""
    def close(self) -> None:
        """Closes the device once no call uses it."""
    @property
    def closed(self) -> bool:
        """Whether :meth:`close` ran; every other call then raises ``ClosedError``."""
    def get_device_id(self) -> int:
        """The virtio device id (1 net, 2 block...)."""
    def get_status(self) -> int:
        """The virtio device status byte."""
    def set_status(self, status: int) -> None:
        """Sets the virtio device status byte (``DRIVER_OK`` starts the device)."""
    def get_config(self, offset: int, size: int) -> bytes:
        """``size`` bytes of the config space from ``offset``."""
    def set_config(self, offset: int, data: bytes) -> None:
        """Writes ``data`` into the config space at ``offset``."""
    def set_vring_enable(self, index: int, enable: bool) -> None:
        """Starts or stops ring ``index``."""
    def get_vring_num(self) -> int:
        """The largest ring size the device supports."""
    def get_vring_size(self, index: int) -> int:
        """The largest size of ring ``index`` (``VHOST_VDPA_GET_VRING_SIZE``)."""
    def set_config_call(self, fd: _Fd | None) -> None:
        """The eventfd signalled on a config change (None unbinds)."""
    def get_iova_range(self) -> tuple[int, int]:
        """The usable I/O virtual addresses as ``(first, last)``, inclusive."""
    def get_config_size(self) -> int:
        """Bytes of the config space."""
    def get_vqs_count(self) -> int:
        """How many virtqueues the device has."""
    def get_group_num(self) -> int:
        """How many virtqueue groups the device has."""
    def get_as_num(self) -> int:
        """How many address spaces the device has."""
    def get_vring_group(self, index: int) -> int:
        """The group of ring ``index``."""
    def get_vring_desc_group(self, index: int) -> int:
        """The group of ring ``index``'s descriptor table (``DESC_ASID``)."""
    def set_group_asid(self, group: int, asid: int) -> None:
        """Binds virtqueue ``group`` to address space ``asid``."""
    def suspend(self) -> None:
        """Suspends the device, keeping its rings' state (``VHOST_BACKEND_F_SUSPEND``)."""
    def resume(self) -> None:
        """Resumes a suspended device."""
    def dma_map(
        self, iova: int, size: int, vaddr: int, readonly: bool = False, asid: int = 0
    ) -> None:
        """Maps ``size`` bytes of this process at ``vaddr`` at I/O virtual address ``iova`` in
        address space ``asid`` (an IOTLB update); overlaps raise ``InvalidMemoryError``."""
    def dma_unmap(self, iova: int, size: int, asid: int = 0) -> None:
        """Unmaps ``[iova, iova + size)`` in ``asid``; a range nothing maps raises
        ``InvalidMemoryError``."""
    def iotlb_batch(self, begin: bool, asid: int = 0) -> None:
        """Begins or ends a batch of IOTLB updates, applied together."""
    def mappings(self) -> list[tuple[int, int, int]]:
        """The ``dma_map`` mappings in place now, as ``(asid, iova, size)``."""
