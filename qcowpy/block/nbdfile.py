"""qcow2 images held in an NBD export: the export as the qcow2 engine's host file.

QEMU stacks a qcow2 node on an nbd protocol node; so does this module, the way rbdopen.py does
for rbd: ``nbd`` names are registered in ``hostfile.PROTOCOLS`` with :class:`NbdFile`, so the
engine creates, opens, writes and checks an image in an export with the code it uses for a
local file (``qemu-img convert -O qcow2 SRC nbd+unix:///exp?socket=S`` writes a qcow2 image
straight into an export, as iotest 302 does into a tar file). An export has a fixed size, as in
QEMU: the image must fit, and "creating" on it keeps the size (QEMU's simple create over a node
that cannot be created) — only the first clusters the header needs are written.
"""
from __future__ import annotations

from .. import hostfile
from ..errors import ReadOnlyError, UnsupportedFeature
from .devicefile import DeviceFile
from .nbd import SCHEMES, NbdDevice


class NbdFile(DeviceFile):
    """A host file in an NBD export: reads and writes within its fixed size."""

    def __init__(self, dev: NbdDevice, writable: bool, unsafe: bool = False):
        super().__init__(dev)
        self.writable = writable
        self.unsafe = unsafe

    def _within(self, end: int) -> None:
        if not self.writable:
            raise ReadOnlyError(f"'{self.path}' is opened read-only")
        if end > self.dev.size:
            raise UnsupportedFeature("Cannot grow NBD nodes")

    def pwrite(self, data, offset: int) -> None:
        self._within(offset + len(memoryview(data).cast("B")))
        self.dev.pwrite(data, offset)
        self.dirty = True

    def truncate(self, size: int) -> None:
        """QEMU's inexact truncate of an nbd node: a size it already has room for is kept."""
        self._within(size)

    def allocate(self, offset: int, length: int) -> None:
        self._within(offset + length)

    def punch(self, offset: int, length: int) -> bool:
        return False  # a trimmed range of an export need not read back as zeros

    def flush(self) -> None:
        if self.dirty and self.writable and not self.unsafe:
            self.dev.flush()
        self.dirty = False

    def close(self) -> None:
        try:
            self.flush()
        finally:
            self.dev.close()


def open_host(path: str, writable: bool = False, create: bool = False, cache: str = "writeback",
               force_share: bool = False) -> NbdFile:
    """hostfile.open_host_file for NBD URIs (``create`` keeps the export as it is)."""
    return NbdFile(NbdDevice(path, read_only=not writable), writable, cache == "unsafe")


for _scheme in SCHEMES:
    hostfile.PROTOCOLS[_scheme] = open_host
