"""Driver-owned guest RAM (virtqueue rings, request headers) as the driver reaches it.

A real guest keeps its rings in its own RAM and its CPU reads and writes them without leaving the
guest; only the notification register is MMIO. A :class:`RamArea` works on a mapping of its bytes
when the qtest transport can share guest RAM (in-process, :meth:`QTest.map_ram`) and through qtest
memory accesses otherwise (a socket to QEMU or to this emulator in another process). The bytes
the device sees are the same either way; only the cost of each access differs.
"""
from __future__ import annotations

import struct
from typing import Optional

from .qtest import QTest

_U16 = struct.Struct("<H")


class RamArea:
    """``length`` bytes of guest RAM at ``addr``, read and written by offset.

    Call :meth:`sync` before a run of accesses (each driver entry point does): it maps the area
    again after a memory-topology change, the way QEMU's MemoryRegionCache is refreshed."""

    __slots__ = ("qts", "addr", "length", "view", "_gen")

    def __init__(self, qts: QTest, addr: int, length: int) -> None:
        self.qts = qts
        self.addr = addr
        self.length = length
        self.view: Optional[memoryview] = None
        self._gen: Optional[int] = None

    def sync(self) -> Optional[memoryview]:
        """The current mapping, or None when accesses go through qtest."""
        gen = self.qts.ram_generation()
        if gen != self._gen:
            self.view = self.qts.map_ram(self.addr, self.length)
            self._gen = gen
        return self.view

    def r16(self, off: int) -> int:
        v = self.view
        return _U16.unpack_from(v, off)[0] if v is not None else self.qts.readw(self.addr + off)

    def w16(self, off: int, value: int) -> None:
        v = self.view
        if v is not None:
            _U16.pack_into(v, off, value & 0xFFFF)
        else:
            self.qts.writew(self.addr + off, value)

    def read(self, off: int, n: int) -> bytes:
        v = self.view
        return bytes(v[off:off + n]) if v is not None else self.qts.memread(self.addr + off, n)

    def write(self, off: int, data: bytes) -> None:
        v = self.view
        if v is not None:
            v[off:off + len(data)] = data
        else:
            self.qts.memwrite(self.addr + off, data)
