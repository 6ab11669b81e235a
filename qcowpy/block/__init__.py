"""The block layer: one device interface, qcow2 and raw drivers, backing chains, a file adapter.

Programs that want qcowpy as their storage backend depend on this package only.
"""
from typing import Any

from .device import BlockDevice, Extent, LayerStatus

_LAZY = {"BlockFile": "fileio", "create_image": "create", "FORMATS": "open", "open_image": "open",
         "probe_format": "open", "resolve_backing_path": "open"}


def __getattr__(name: str) -> Any:
    """Drivers and helpers imported on first use (start-up of a command stays small)."""
    if name in _LAZY:
        import importlib
        return getattr(importlib.import_module(f".{_LAZY[name]}", __name__), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")

__all__ = ["BlockDevice", "BlockFile", "Extent", "FORMATS", "LayerStatus", "create_image", "open_image",
           "probe_format", "resolve_backing_path"]
