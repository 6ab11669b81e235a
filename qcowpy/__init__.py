"""qcowpy: qcow2 images and a block layer for Python, with a qemu-img compatible CLI.

    import qcowpy
    qcowpy.create("disk.qcow2", 20 << 30)
    with qcowpy.open("disk.qcow2", "r+") as disk:
        disk.pwrite(b"hello", 0)
"""
from __future__ import annotations

from typing import TYPE_CHECKING, Any

from .errors import QcowError
from .lazy import lazy_attributes

if TYPE_CHECKING:
    from .block import BlockDevice, BlockFile, Extent

__version__ = "0.1.0"
_LAZY = {"BlockDevice": "block.device", "BlockFile": "block.fileio", "Extent": "block.device"}


__getattr__ = lazy_attributes(__name__, _LAZY)


def open(path: str, mode: str = "r", format: str | None = None, cache: str = "writeback",  # noqa: A001
         secret: bytes | str | None = None) -> BlockDevice:
    """Open an image (format probed when None) with its backing chain; ``mode`` is "r" or "r+";
    ``secret`` is the passphrase of an encrypted (LUKS or legacy AES) qcow2 image."""
    from .block.open import open_image
    return open_image(path, mode, format, cache=cache, secret=secret)


def create(path: str, size: int | str | None = None, format: str = "qcow2", **options: Any) -> None:
    """Create an image with qemu-img's ``-o`` options as keyword arguments; sizes may be "20G"."""
    from .block.create import create_image
    create_image(path, size, format, **options)


__all__ = ["BlockDevice", "BlockFile", "Extent", "QcowError", "create", "open", "__version__"]
