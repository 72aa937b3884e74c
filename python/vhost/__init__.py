"""pyvhost: vhost, vhost-user and vDPA for Python, on a Rust core.

The three back-end families share one interface, :class:`VhostBackend`:

- :mod:`vhost.user`: the vhost-user protocol, front-end and back-end;
- :mod:`vhost.kern`: kernel vhost (``/dev/vhost-net``, ``/dev/vhost-vsock``);
- :mod:`vhost.vdpa`: vDPA (``/dev/vhost-vdpa-N``).

Every error raised by the package derives from :class:`VhostError`.
"""

from __future__ import annotations

from ._core import EventFd, FileDescriptor, GuestMemory
from ._core import __version__ as __version__
from .backend import EventFdLike, VhostBackend
from .codes import BackendRequest, FrontendRequest, ProtocolFeature
from .dirty_log import DirtyLog, DirtyRange
from .errors import (
    ClosedError,
    DisconnectedError,
    InactiveFeatureError,
    InvalidMemoryError,
    InvalidParamError,
    InvalidQueueError,
    KernelError,
    NotSupportedError,
    PartialMessageError,
    ProtocolError,
    QueueError,
    QueueFullError,
    RequestRefusedError,
    VhostError,
    VhostOSError,
    VhostTimeoutError,
)
from .types import (
    DirtyLogRegion,
    IotlbAccess,
    IotlbMessage,
    IotlbType,
    MemoryRegion,
    VringAddrs,
    VringConfig,
)
from .virtio import VirtioFeature

__all__ = [
    "BackendRequest",
    "ClosedError",
    "DirtyLog",
    "DirtyLogRegion",
    "DirtyRange",
    "DisconnectedError",
    "EventFd",
    "EventFdLike",
    "FileDescriptor",
    "FrontendRequest",
    "GuestMemory",
    "InactiveFeatureError",
    "InvalidMemoryError",
    "InvalidParamError",
    "InvalidQueueError",
    "IotlbAccess",
    "IotlbMessage",
    "IotlbType",
    "KernelError",
    "MemoryRegion",
    "NotSupportedError",
    "PartialMessageError",
    "ProtocolError",
    "ProtocolFeature",
    "QueueError",
    "QueueFullError",
    "RequestRefusedError",
    "VhostBackend",
    "VhostError",
    "VhostOSError",
    "VhostTimeoutError",
    "VirtioFeature",
    "VringAddrs",
    "VringConfig",
]
