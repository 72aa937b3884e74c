"""Virtio device models: config space decoders now, native and Python devices later.

:func:`decode_config` turns the raw config space a back-end returns (``GET_CONFIG``) into
named fields for the device types it knows; ``python -m vhost probe`` uses it.
"""

from __future__ import annotations

from .config import ConfigValue, decode_config

__all__ = ["ConfigValue", "decode_config"]
