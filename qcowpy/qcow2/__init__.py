"""The qcow2 engine: mapping, allocation, refcounts, metadata cache, codecs, creation."""
from .create import Qcow2Options, create_qcow2
from .image import Qcow2Image

__all__ = ["Qcow2Image", "Qcow2Options", "create_qcow2"]
