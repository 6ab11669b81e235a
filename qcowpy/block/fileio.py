"""A file-like view (io.RawIOBase) of a BlockDevice, for code that wants seek/read/write."""
from __future__ import annotations

import io

from .device import BlockDevice


class BlockFile(io.RawIOBase):
    """Reads stop at the device end; writes past it raise (a disk does not grow by writing)."""

    def __init__(self, device: BlockDevice, close_device: bool = False):
        super().__init__()
        self.device = device
        self._pos = 0
        self._close_device = close_device

    def readable(self) -> bool:
        return True

    def writable(self) -> bool:
        return not self.device.read_only

    def seekable(self) -> bool:
        return True

    def tell(self) -> int:
        return self._pos

    def seek(self, offset: int, whence: int = io.SEEK_SET) -> int:
        if whence == io.SEEK_SET:
            pos = offset
        elif whence == io.SEEK_CUR:
            pos = self._pos + offset
        elif whence == io.SEEK_END:
            pos = self.device.size + offset
        else:
            raise ValueError(f"invalid whence ({whence})")
        if pos < 0:
            raise ValueError(f"negative seek position {pos}")
        self._pos = pos
        return pos

    def readinto(self, buf) -> int:  # type: ignore[override]
        mv = memoryview(buf).cast("B")
        n = max(0, min(len(mv), self.device.size - self._pos))
        if n:
            self.device.preadinto(mv[:n], self._pos)
            self._pos += n
        return n

    def write(self, data) -> int:  # type: ignore[override]
        n = len(memoryview(data).cast("B"))
        self.device.pwrite(data, self._pos)
        self._pos += n
        return n

    def flush(self) -> None:
        if not self.closed and not self.device.read_only:
            self.device.flush()

    def close(self) -> None:
        if not self.closed:
            try:
                self.flush()
            finally:
                super().close()
                if self._close_device:
                    self.device.close()
