"""A BlockDevice seen as a host file, so the qcow2 engine can keep an image inside a device: a
qcow2 image in an NBD export (block/nbdfile.py) or on an rbd image (block/rbdopen.py)."""
from __future__ import annotations

import errno

from ..errors import ReadOnlyError
from ..hostfile import zero_fill
from .device import BlockDevice, ReadsInto


class DeviceFile(ReadsInto):
    """Read-only file-like view of a BlockDevice, so the qcow2 engine can read an image held in an export."""

    writable = False
    unsafe = False
    dirty = False
    fd = -1

    def __init__(self, dev: BlockDevice):
        self.dev = dev
        self.path = dev.filename

    def size(self) -> int:
        return self.dev.size

    def preadinto(self, buf: memoryview, offset: int) -> None:
        """Bytes past the end read as zeros, as from a host file."""
        n = max(0, min(len(buf), self.dev.size - offset))
        if n:
            self.dev.preadinto(buf[:n], offset)
        if n < len(buf):
            zero_fill(buf[n:])

    def pwrite(self, data, offset: int) -> None:
        raise ReadOnlyError(f"'{self.path}' is opened read-only")

    truncate = allocate = pwrite

    def flush(self) -> None:
        pass

    def allocated_bytes(self) -> int:
        raise OSError(errno.ENOTSUP, "unknown for an image on a network store")

    def close(self) -> None:
        self.dev.close()
