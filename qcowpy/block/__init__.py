"""The block layer: one device interface, qcow2 and raw drivers, backing chains, a file adapter.

Programs that want qcowpy as their storage backend depend on this package only.
"""
from .create import create_image
from .device import BlockDevice, Extent, LayerStatus
from .fileio import BlockFile
from .open import FORMATS, open_image, probe_format, resolve_backing_path

__all__ = ["BlockDevice", "BlockFile", "Extent", "FORMATS", "LayerStatus", "create_image", "open_image",
           "probe_format", "resolve_backing_path"]
