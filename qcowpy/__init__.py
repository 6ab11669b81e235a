"""qcowpy: qcow2 images and a block layer for Python, with a qemu-img compatible CLI.

    import qcowpy
    qcowpy.create("disk.qcow2", 20 << 30)
    with qcowpy.open("disk.qcow2", "r+") as disk:
        disk.pwrite(b"hello", 0)
"""
from __future__ import annotations

from typing import Any

from .block import BlockDevice, BlockFile, Extent, open_image
from .block.create import create_image
from .errors import QcowError

__version__ = "0.1.0"


def open(path: str, mode: str = "r", format: str | None = None, cache: str = "writeback",  # noqa: A001
         secret: bytes | str | None = None) -> BlockDevice:
    """Open an image (format probed when None) with its backing chain; ``mode`` is "r" or "r+";
    ``secret`` is the passphrase of an encrypted (LUKS or legacy AES) qcow2 image."""
    return open_image(path, mode, format, cache=cache, secret=secret)


def create(path: str, size: int | str | None = None, format: str = "qcow2", **options: Any) -> None:
    """Create an image with qemu-img's ``-o`` options as keyword arguments; sizes may be "20G"."""
    create_image(path, size, format, **options)


__all__ = ["BlockDevice", "BlockFile", "Extent", "QcowError", "create", "open", "__version__"]
