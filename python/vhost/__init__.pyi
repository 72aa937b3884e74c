"""Typed public surface of :mod:`vhost` (see ``__init__.py``; kept true by stubtest)."""

from ._core import EventFd as EventFd
from ._core import FileDescriptor as FileDescriptor
from ._core import GuestMemory as GuestMemory
from ._core import __version__ as __version__
from .backend import EventFdLike as EventFdLike
from .backend import VhostBackend as VhostBackend
from .codes import BackendRequest as BackendRequest
from .codes import FrontendRequest as FrontendRequest
from .codes import ProtocolFeature as ProtocolFeature
from .dirty_log import DirtyLog as DirtyLog
from .dirty_log import DirtyRange as DirtyRange
from .errors import ClosedError as ClosedError
from .errors import DisconnectedError as DisconnectedError
from .errors import InactiveFeatureError as InactiveFeatureError
from .errors import InvalidMemoryError as InvalidMemoryError
from .errors import InvalidParamError as InvalidParamError
from .errors import InvalidQueueError as InvalidQueueError
from .errors import KernelError as KernelError
from .errors import NotSupportedError as NotSupportedError
from .errors import PartialMessageError as PartialMessageError
from .errors import ProtocolError as ProtocolError
from .errors import QueueError as QueueError
from .errors import QueueFullError as QueueFullError
from .errors import RequestRefusedError as RequestRefusedError
from .errors import VhostError as VhostError
from .errors import VhostOSError as VhostOSError
from .errors import VhostTimeoutError as VhostTimeoutError
from .types import DirtyLogRegion as DirtyLogRegion
from .types import IotlbAccess as IotlbAccess
from .types import IotlbMessage as IotlbMessage
from .types import IotlbType as IotlbType
from .types import MemoryRegion as MemoryRegion
from .types import VringAddrs as VringAddrs
from .types import VringConfig as VringConfig
from .virtio import VirtioFeature as VirtioFeature

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
