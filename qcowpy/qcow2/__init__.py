"""The qcow2 engine: mapping, allocation, refcounts, metadata cache, codecs, creation."""
from ..lazy import lazy_attributes

__all__ = ["Qcow2Image", "Qcow2Options", "create_qcow2"]
_LAZY = {"Qcow2Image": "image", "Qcow2Options": "create", "create_qcow2": "create"}
__getattr__ = lazy_attributes(__name__, _LAZY)
