"""Guest memory for the virtio engine as the emulator sees it: a PCI device's bus-master view."""
from __future__ import annotations

from typing import Optional

from qcowpy.virtio.split import GuestMemoryError

from ..memory import topology_generation


class AddressSpaceMemory:
    """RAM reachable through an AddressSpace; holes, MMIO and disabled bus mastering are errors.

    Writable mappings of read-only RAM (ROM) get a scratch buffer, so device writes there are
    dropped, as QEMU's bounce buffer does for them."""

    def __init__(self, address_space) -> None:  # type: ignore[no-untyped-def]
        self.address_space = address_space
        # the RAM range of the last mapping: (generation, start, end, view of the range), so a
        # run of buffers in the same RAM block skips the flat-view lookup
        self._last: tuple[int, int, int, memoryview] = (-1, 0, 0, memoryview(b""))

    def generation(self) -> int:
        return topology_generation()

    def window(self) -> Optional[tuple[int, int, memoryview]]:
        gen, start, end, ram = self._last
        return (start, end, ram) if gen == topology_generation() else None

    def map(self, addr: int, length: int, writable: bool) -> list[memoryview]:
        gen, start, end, ram = self._last
        if start <= addr and addr + length <= end and gen == topology_generation():
            return [ram[addr - start:addr - start + length]]
        if addr < 0 or length < 0 or addr + length > 1 << 64:
            raise GuestMemoryError(f"guest address range {addr:#x}+{length:#x} is invalid")
        view = self.address_space.flatview
        out = []
        while True:
            r = view.lookup(addr)
            if r is None or r.mr.ram is None:
                raise GuestMemoryError(f"guest address {addr:#x} is not RAM")
            n = min(length, r.end - addr)
            off = r.offset + (addr - r.start)
            if r.readonly:  # never cached: writable mappings of ROM get a scratch buffer
                out.append(memoryview(bytearray(n)) if writable else memoryview(r.mr.ram)[off:off + n])
            else:
                ram = memoryview(r.mr.ram)[r.offset:r.offset + (r.end - r.start)]
                self._last = (topology_generation(), r.start, r.end, ram)
                out.append(ram[addr - r.start:addr - r.start + n])
            addr += n
            length -= n
            if length <= 0:
                return out
