"""The raw format: guest bytes are the file's bytes; holes in a sparse file read as zeros."""
from __future__ import annotations

from typing import Iterator

from ..errors import ReadOnlyError, UnsupportedFeature
from ..hostfile import HostFile, data_or_hole
from .device import BlockDevice, LayerStatus


class RawDevice(BlockDevice):
    format = "raw"

    def __init__(self, path: str, read_only: bool = True, cache: str = "writeback", force_share: bool = False):
        self.filename = path
        self.read_only = read_only
        self.file = HostFile(path, writable=not read_only, cache=cache, force_share=force_share)
        self._size = self.file.size()

    @property
    def size(self) -> int:
        """Whole 512-byte sectors, as QEMU's block layer counts a raw file (the tail of the last
        sector reads as zeros)."""
        return (self._size + 511) & ~511

    def pread(self, length: int, offset: int) -> bytes:
        self.check_range(offset, length)
        return self.file.pread(length, offset)

    def preadinto(self, buf: bytearray | memoryview, offset: int) -> None:
        view = memoryview(buf).cast("B")
        self.check_range(offset, len(view))
        self.file.preadinto(view, offset)

    def preadv(self, bufs: list[memoryview], offset: int) -> None:
        self.check_range(offset, sum(len(b) for b in bufs))
        self.file.preadv(bufs, offset)

    def pwrite(self, data: bytes | bytearray | memoryview, offset: int) -> None:
        self._writable()
        self.check_range(offset, len(memoryview(data).cast("B")))
        self.file.pwrite(data, offset)

    def write_zeroes(self, length: int, offset: int, unmap: bool = False) -> None:
        self._writable()
        self.check_range(offset, length)
        if unmap and self.file.punch(offset, length):
            self.file.dirty = True
            return
        chunk = 1 << 20
        zeros = bytes(min(chunk, length))
        pos = offset
        while pos < offset + length:
            n = min(chunk, offset + length - pos)
            self.file.pwrite(zeros[:n], pos)
            pos += n

    def discard(self, length: int, offset: int) -> None:
        self._writable()
        self.check_range(offset, length)
        if self.file.punch(offset, length):
            self.file.dirty = True

    def flush(self) -> None:
        self.file.flush()

    def truncate(self, size: int, preallocation: str = "off") -> None:
        """Set the file length; growing with ``falloc`` reserves the new bytes, with ``full``
        writes zeros into them (file-posix's modes; ``metadata`` means nothing for a raw file)."""
        self._writable()
        if preallocation not in ("off", "falloc", "full"):
            raise UnsupportedFeature(f"Unsupported preallocation mode: {preallocation}")
        old = self._size
        self.file.truncate(size)
        self._size = size
        if size > old and preallocation == "falloc":
            self.file.allocate(old, size - old)
        elif size > old and preallocation == "full":
            self.write_zeroes(size - old, old)
        self.file.flush()

    def layer_status(self, offset: int, length: int, max_extents: int | None = None) -> Iterator[LayerStatus]:
        """Data and holes as the file system reports them (SEEK_DATA/SEEK_HOLE)."""
        self.check_range(offset, length)
        end = offset + length
        pos = offset
        while pos < end:
            is_data, run_end = data_or_hole(self.file.fd, pos, self._size, self.size)
            run_end = min(run_end, end)
            yield LayerStatus(pos, run_end - pos, data=is_data, zero=not is_data, offset=pos, filename=self.filename)
            pos = run_end

    def allocated_size(self) -> int | None:
        try:
            return self.file.allocated_bytes()
        except OSError:
            return None

    def _writable(self) -> None:
        if self.read_only:
            raise ReadOnlyError(f"'{self.filename}' is opened read-only")

    def _close_self(self) -> None:
        self.file.close()
