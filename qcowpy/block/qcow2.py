"""The qcow2 driver: a BlockDevice over the engine in qcowpy.qcow2."""
from __future__ import annotations

from typing import Iterator

from ..qcow2.image import COMPRESSED, DATA, ZERO, Qcow2Image
from .device import BlockDevice, LayerStatus


class Qcow2Device(BlockDevice):
    format = "qcow2"

    def __init__(self, image: Qcow2Image, filename: str):
        self.image = image
        self.filename = filename
        self.read_only = not image.writable
        self.preadinto = image.preadinto  # type: ignore[method-assign]  # the hot path of device models: no extra frame

    def attach_backing(self, backing: BlockDevice) -> None:
        self.backing = backing
        self.image.backing = backing

    @property
    def size(self) -> int:
        return self.image.size

    def pread(self, length: int, offset: int) -> bytes:
        return self.image.pread(length, offset)

    def preadinto(self, buf: bytearray | memoryview, offset: int) -> None:
        self.image.preadinto(buf, offset)

    def pwrite(self, data: bytes | bytearray | memoryview, offset: int) -> None:
        self.image.pwrite(data, offset)

    def write_compressed(self, data: bytes, offset: int) -> None:
        self.image.write_compressed(data, offset)

    def write_zeroes(self, length: int, offset: int, unmap: bool = False) -> None:
        self.image.write_zeroes(length, offset, unmap=unmap)

    def discard(self, length: int, offset: int) -> None:
        self.image.discard(length, offset)

    def flush(self) -> None:
        self.image.flush()

    def truncate(self, size: int, preallocation: str = "off") -> None:
        self.image.resize(size, preallocation=preallocation)

    def layer_status(self, offset: int, length: int, max_extents: int | None = None) -> Iterator[LayerStatus]:
        for e in self.image.layer_extents(offset, length, max_extents):
            yield LayerStatus(e.start, e.length, data=e.kind in (DATA, COMPRESSED), zero=e.kind == ZERO,
                              offset=e.host_offset, filename=self.filename)

    def _close_self(self) -> None:
        self.image.close()
