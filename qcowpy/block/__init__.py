"""The block layer: one device interface, qcow2 and raw drivers, backing chains, a file adapter.

Programs that want qcowpy as their storage backend depend on this package only.
"""
from ..lazy import lazy_attributes
from .device import BlockDevice, Extent, LayerStatus

_LAZY = {"BlockFile": "fileio", "create_image": "create", "FORMATS": "open", "open_image": "open",
         "probe_format": "open", "resolve_backing_path": "open"}
__getattr__ = lazy_attributes(__name__, _LAZY)

__all__ = ["BlockDevice", "BlockFile", "Extent", "FORMATS", "LayerStatus", "create_image", "open_image",
           "probe_format", "resolve_backing_path"]
