"""Guest memory of a vhost-user front-end: the regions of its memory table, mmapped from the
file descriptors it passed, as a :class:`qcowpy.virtio.split.GuestMemory`.

Descriptors carry guest physical addresses; ring addresses (SET_VRING_ADDR) are front-end
virtual addresses, translated with :meth:`MemoryTable.to_guest`.

SIGBUS: touching a mapping past the end of its file kills the process, and a front-end could
shrink its file after SET_MEM_TABLE. So a region whose file is shorter than the range it claims
is refused up front, and a region is *guarded* against shrinking: a memfd that already carries
F_SEAL_SHRINK (QEMU's memory-backend-memfd seals by default) or that we can seal now is safe for
good. A file that cannot be sealed (memory-backend-file, an unsealable memfd) is checked with
fstat before every batch of requests (:meth:`MemoryTable.check`); the front-end is dropped if it
shrank. That leaves a window between the check and the access for such files only.
"""
from __future__ import annotations

import fcntl
import mmap
import os
import stat
from typing import Optional

from qcowpy.virtio.split import GuestMemoryError

from .protocol import MAX_MEM_REGIONS, REGION, ProtocolError

_generation = 0


def _seal_shrink(fd: int) -> bool:
    """True when the file can no longer shrink (it was sealed, or we sealed it now)."""
    try:
        if fcntl.fcntl(fd, fcntl.F_GET_SEALS) & fcntl.F_SEAL_SHRINK:
            return True
        fcntl.fcntl(fd, fcntl.F_ADD_SEALS, fcntl.F_SEAL_SHRINK)
        return True
    except OSError:  # not a memfd/shmem file, created without sealing, or F_SEAL_SEAL set
        return False


class Region:
    __slots__ = ("gpa", "size", "uaddr", "map", "view", "fd", "end")

    def __init__(self, gpa: int, size: int, uaddr: int, fd: int, offset: int) -> None:
        st = os.fstat(fd)
        if size <= 0 or gpa + size > 1 << 64 or uaddr + size > 1 << 64:
            raise ProtocolError(f"memory region {gpa:#x}+{size:#x} is invalid")
        if stat.S_ISREG(st.st_mode) and st.st_size < offset + size:
            raise ProtocolError(f"memory region {gpa:#x}+{size:#x} lies past the end of its file")
        try:
            self.map = mmap.mmap(fd, offset + size, mmap.MAP_SHARED, mmap.PROT_READ | mmap.PROT_WRITE)
        except (OSError, ValueError, OverflowError) as e:
            raise ProtocolError(f"cannot map memory region {gpa:#x}+{size:#x}: {e}") from None
        self.gpa, self.size, self.uaddr = gpa, size, uaddr
        self.view = memoryview(self.map)[offset:offset + size]
        self.end = offset + size
        # an unguarded file is watched through a descriptor of our own (the message's is closed)
        self.fd = -1 if not stat.S_ISREG(st.st_mode) or _seal_shrink(fd) else os.dup(fd)

    def shrunk(self) -> bool:
        return self.fd >= 0 and os.fstat(self.fd).st_size < self.end

    def close(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1


class MemoryTable:
    """The front-end's memory, from one SET_MEM_TABLE message (which replaces the previous one)."""

    def __init__(self, payload: bytes = b"", fds: Optional[list[int]] = None) -> None:
        global _generation
        _generation += 1
        self._gen = _generation
        self.regions: list[Region] = []
        self._last: Optional[Region] = None
        if not payload:
            return
        fds = fds or []
        if len(payload) < 8:
            raise ProtocolError("memory table too short")
        n = int.from_bytes(payload[:4], "little")
        if n > MAX_MEM_REGIONS or n != len(fds) or len(payload) < 8 + n * REGION.size:
            raise ProtocolError(f"memory table of {n} regions with {len(fds)} descriptors")
        try:
            for i in range(n):
                gpa, size, uaddr, offset = REGION.unpack_from(payload, 8 + i * REGION.size)
                r = Region(gpa, size, uaddr, fds[i], offset)
                for other in self.regions:
                    if gpa < other.gpa + other.size and other.gpa < gpa + size:
                        raise ProtocolError(f"memory regions overlap at {gpa:#x}")
                self.regions.append(r)
        except BaseException:
            self.close()
            raise

    def close(self) -> None:
        """Drop the mappings (views still held elsewhere keep theirs alive until released)."""
        for r in self.regions:
            r.close()
            try:
                r.view.release()
                r.map.close()
            except BufferError:
                pass  # a queue still holds a slice; the mapping goes with it
        self.regions = []
        self._last = None

    def check(self) -> None:
        """Raise GuestMemoryError if an unguarded region's file no longer covers it."""
        for r in self.regions:
            if r.shrunk():
                raise GuestMemoryError(f"the file behind memory region {r.gpa:#x}+{r.size:#x} shrank")

    @property
    def guarded(self) -> bool:
        return all(r.fd < 0 for r in self.regions)

    # -- GuestMemory ------------------------------------------------------------------------------
    def generation(self) -> int:
        return self._gen

    def window(self) -> Optional[tuple[int, int, memoryview]]:
        r = self._last
        return (r.gpa, r.gpa + r.size, r.view) if r is not None else None

    def _find(self, addr: int) -> Region:
        r = self._last
        if r is not None and r.gpa <= addr < r.gpa + r.size:
            return r
        for r in self.regions:
            if r.gpa <= addr < r.gpa + r.size:
                self._last = r
                return r
        raise GuestMemoryError(f"guest address {addr:#x} is not in the memory table")

    def map(self, addr: int, length: int, writable: bool) -> list[memoryview]:
        if addr < 0 or length < 0 or addr + length > 1 << 64:
            raise GuestMemoryError(f"guest address range {addr:#x}+{length:#x} is invalid")
        out = []
        while True:
            r = self._find(addr)
            n = min(length, r.gpa + r.size - addr)
            out.append(r.view[addr - r.gpa:addr - r.gpa + n])
            addr += n
            length -= n
            if length <= 0:
                return out

    def to_guest(self, uaddr: int) -> int:
        """A front-end virtual address (ring addresses) as a guest physical address."""
        for r in self.regions:
            if r.uaddr <= uaddr < r.uaddr + r.size:
                return r.gpa + (uaddr - r.uaddr)
        raise GuestMemoryError(f"front-end address {uaddr:#x} is not in the memory table")
