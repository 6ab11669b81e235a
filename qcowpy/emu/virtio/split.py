"""Split virtqueues (VIRTIO 1.x section 2.7), independent of any transport.

The engine reads the descriptor table and the driver ring and writes the device ring through a
*guest-memory accessor*: any object with ``read(addr, length) -> bytes`` and
``write(addr, data)`` that raises :class:`GuestMemoryError` for an address that is not guest RAM.
:class:`AddressSpaceMemory` adapts an emulator :class:`~qcowpy.emu.memory.AddressSpace` (a PCI
device's bus-master view) and :class:`BytesMemory` a plain ``bytearray`` (for tests and a future
vhost-user back-end).

Nothing the guest puts in memory is trusted. A descriptor index outside the queue, a chain longer
than the queue (a loop), a nested or misaligned indirect table, a device-readable buffer after a
device-writable one, a buffer outside guest RAM or an available index that runs more than a queue
size ahead all raise :class:`VirtQueueError`; the transport answers with DEVICE_NEEDS_RESET, as
QEMU's ``virtio_error`` does.
"""
from __future__ import annotations

import struct
from dataclasses import dataclass, field
from typing import Optional, Protocol

from ..errors import EmuError

VRING_DESC_F_NEXT = 1
VRING_DESC_F_WRITE = 2
VRING_DESC_F_INDIRECT = 4
VRING_AVAIL_F_NO_INTERRUPT = 1
VRING_USED_F_NO_NOTIFY = 1

VIRTQUEUE_MAX_SIZE = 1024
DESC_SIZE = 16

_DESC = struct.Struct("<QIHH")
_U16 = struct.Struct("<H")
_USED_ELEM = struct.Struct("<II")


class VirtQueueError(EmuError):
    """The driver broke the virtqueue rules; the device must enter DEVICE_NEEDS_RESET."""


class GuestMemoryError(VirtQueueError):
    """A guest physical address range that is not (entirely) guest RAM."""


class GuestMemory(Protocol):
    def read(self, addr: int, length: int) -> bytes: ...
    def write(self, addr: int, data: bytes) -> None: ...


class BytesMemory:
    """Guest memory that is a bytearray starting at guest physical address 0."""

    def __init__(self, buf: bytearray) -> None:
        self.buf = buf

    def _check(self, addr: int, length: int) -> None:
        if addr < 0 or length < 0 or addr + length > len(self.buf):
            raise GuestMemoryError(f"guest address range {addr:#x}+{length:#x} is outside guest RAM")

    def read(self, addr: int, length: int) -> bytes:
        self._check(addr, length)
        return bytes(self.buf[addr:addr + length])

    def write(self, addr: int, data: bytes) -> None:
        self._check(addr, len(data))
        self.buf[addr:addr + len(data)] = data


class AddressSpaceMemory:
    """RAM reachable through an AddressSpace; holes, MMIO and disabled bus mastering are errors."""

    def __init__(self, address_space) -> None:  # type: ignore[no-untyped-def]
        self.address_space = address_space

    def _pieces(self, addr: int, length: int):  # type: ignore[no-untyped-def]
        if addr < 0 or length < 0 or addr + length > 1 << 64:
            raise GuestMemoryError(f"guest address range {addr:#x}+{length:#x} is invalid")
        view = self.address_space.flatview
        while length > 0:
            r = view.lookup(addr)
            if r is None or r.mr.ram is None:
                raise GuestMemoryError(f"guest address {addr:#x} is not RAM")
            n = min(length, r.end - addr)
            off = r.offset + (addr - r.start)
            yield r, off, n
            addr += n
            length -= n

    def read(self, addr: int, length: int) -> bytes:
        parts = [bytes(r.mr.ram[off:off + n]) for r, off, n in self._pieces(addr, length)]
        return parts[0] if len(parts) == 1 else b"".join(parts)

    def write(self, addr: int, data: bytes) -> None:
        mv = memoryview(data)
        pos = 0
        pieces = list(self._pieces(addr, len(data)))  # validate everything before writing anything
        for r, off, n in pieces:
            if not r.readonly:
                r.mr.ram[off:off + n] = mv[pos:pos + n]
            pos += n


@dataclass
class VirtQueueElement:
    """One available chain: its head index and the device-readable / device-writable buffers."""

    index: int
    out_sg: list[tuple[int, int]] = field(default_factory=list)
    in_sg: list[tuple[int, int]] = field(default_factory=list)

    @property
    def out_len(self) -> int:
        return sum(n for _, n in self.out_sg)

    @property
    def in_len(self) -> int:
        return sum(n for _, n in self.in_sg)


def vring_need_event(event_idx: int, new_idx: int, old: int) -> bool:
    """True when ``event_idx`` lies in (old, new], all modulo 2**16 (VIRTIO 1.x 2.7.10)."""
    return ((new_idx - event_idx - 1) & 0xFFFF) < ((new_idx - old) & 0xFFFF)


class SplitVirtQueue:
    """The device side of one split virtqueue.

    Layout: descriptor table at ``desc`` (16 bytes per entry); driver ring (``avail``): flags,
    idx, ring[num], used_event; device ring (``used``): flags, idx, ring[num] of (id, len),
    avail_event. ``indirect`` and ``event_idx`` follow the negotiated features.
    """

    def __init__(self, mem: GuestMemory, max_size: int = 256) -> None:
        self.mem = mem
        self.max_size = max_size
        self.indirect = False
        self.event_idx = False
        self.reset()

    def reset(self) -> None:
        self.num = self.max_size
        self.desc = self.avail = self.used = 0
        self.ready = False
        self.last_avail_idx = 0
        self.used_idx = 0
        self.signalled_used: Optional[int] = None  # used_idx at the last interrupt (event idx)
        self.inflight = 0

    # -- driver ring --------------------------------------------------------------------------
    def _avail_idx(self) -> int:
        return _U16.unpack(self.mem.read(self.avail + 2, 2))[0]

    def _avail_flags(self) -> int:
        return _U16.unpack(self.mem.read(self.avail, 2))[0]

    def _used_event(self) -> int:
        return _U16.unpack(self.mem.read(self.avail + 4 + 2 * self.num, 2))[0]

    def available(self) -> int:
        """How many chains the driver has made available and we have not popped."""
        n = (self._avail_idx() - self.last_avail_idx) & 0xFFFF
        if n > self.num:
            raise VirtQueueError(f"guest moved available index from {self.last_avail_idx} by {n}"
                                 f" (queue size {self.num})")
        return n

    def pop(self) -> Optional[VirtQueueElement]:
        """The next available chain, or None when the ring is empty."""
        if not self.ready:
            return None
        if self.available() == 0:
            if self.event_idx:
                self._set_avail_event(self._avail_idx())
            return None
        slot = self.last_avail_idx % self.num
        head = _U16.unpack(self.mem.read(self.avail + 4 + 2 * slot, 2))[0]
        elem = self._walk(head)
        self.last_avail_idx = (self.last_avail_idx + 1) & 0xFFFF
        if self.event_idx:
            self._set_avail_event(self.last_avail_idx)
        self.inflight += 1
        return elem

    def _set_avail_event(self, idx: int) -> None:
        self.mem.write(self.used + 4 + 8 * self.num, _U16.pack(idx))

    def _read_desc(self, table: int, i: int) -> tuple[int, int, int, int]:
        return _DESC.unpack(self.mem.read(table + DESC_SIZE * i, DESC_SIZE))

    def _walk(self, head: int) -> VirtQueueElement:
        if head >= self.num:
            raise VirtQueueError(f"guest chain head {head} >= queue size {self.num}")
        elem = VirtQueueElement(head)
        table, limit, i = self.desc, self.num, head
        addr, length, flags, nxt = self._read_desc(table, i)
        if flags & VRING_DESC_F_INDIRECT:
            if not self.indirect:
                raise VirtQueueError("indirect descriptor but VIRTIO_F_INDIRECT_DESC not negotiated")
            if flags & VRING_DESC_F_NEXT:
                raise VirtQueueError("descriptor has both INDIRECT and NEXT")
            if length == 0 or length % DESC_SIZE:
                raise VirtQueueError(f"invalid indirect table size {length}")
            limit = length // DESC_SIZE
            if limit > VIRTQUEUE_MAX_SIZE:
                raise VirtQueueError(f"indirect table of {limit} descriptors is too long")
            self.mem.read(addr, length)  # the whole table must be RAM
            table, i = addr, 0
            addr, length, flags, nxt = self._read_desc(table, i)
        count = 0
        while True:
            count += 1
            if count > limit:
                raise VirtQueueError("descriptor chain is longer than its table (loop?)")
            if flags & VRING_DESC_F_INDIRECT:
                raise VirtQueueError("indirect descriptor inside a chain or an indirect table")
            if length:
                _check_ram(self.mem, addr, length)
            if flags & VRING_DESC_F_WRITE:
                elem.in_sg.append((addr, length))
            else:
                if elem.in_sg:
                    raise VirtQueueError("device-readable descriptor after a device-writable one")
                elem.out_sg.append((addr, length))
            if not flags & VRING_DESC_F_NEXT:
                return elem
            if nxt >= limit:
                raise VirtQueueError(f"next descriptor {nxt} out of range ({limit})")
            i = nxt
            addr, length, flags, nxt = self._read_desc(table, i)

    # -- device ring ----------------------------------------------------------------------------
    def push(self, elem: VirtQueueElement, length: int) -> None:
        """Return ``elem`` to the driver with ``length`` bytes written (fill + flush)."""
        slot = self.used_idx % self.num
        self.mem.write(self.used + 4 + 8 * slot, _USED_ELEM.pack(elem.index, length))
        self.used_idx = (self.used_idx + 1) & 0xFFFF
        self.mem.write(self.used + 2, _U16.pack(self.used_idx))
        self.inflight = max(0, self.inflight - 1)

    def should_notify(self, old_used: int) -> bool:
        """Whether the driver wants an interrupt after the used index moved from ``old_used``."""
        if self.event_idx:
            return vring_need_event(self._used_event(), self.used_idx, old_used)
        return not self._avail_flags() & VRING_AVAIL_F_NO_INTERRUPT

    # -- layout helpers ----------------------------------------------------------------------------
    @staticmethod
    def sizes(num: int) -> tuple[int, int, int]:
        """Bytes of the descriptor table, driver ring and device ring for a queue of ``num``."""
        return DESC_SIZE * num, 6 + 2 * num, 6 + 8 * num


def _check_ram(mem: GuestMemory, addr: int, length: int) -> None:
    check = getattr(mem, "check", None)
    if check is not None:
        check(addr, length)
        return
    if isinstance(mem, AddressSpaceMemory):
        for _ in mem._pieces(addr, length):
            pass
    elif isinstance(mem, BytesMemory):
        mem._check(addr, length)
    else:
        mem.read(addr, min(length, 1))
        mem.read(addr + length - 1, 1)


def sg_read(mem: GuestMemory, sg: list[tuple[int, int]], offset: int = 0, length: Optional[int] = None) -> bytes:
    """Gather ``length`` bytes (default: all) starting ``offset`` bytes into a scatter list."""
    out = []
    remaining = sum(n for _, n in sg) - offset if length is None else length
    for addr, n in sg:
        if remaining <= 0:
            break
        if offset >= n:
            offset -= n
            continue
        take = min(n - offset, remaining)
        out.append(mem.read(addr + offset, take))
        remaining -= take
        offset = 0
    return b"".join(out)


def sg_write(mem: GuestMemory, sg: list[tuple[int, int]], data: bytes, offset: int = 0) -> int:
    """Scatter ``data`` into ``sg`` starting ``offset`` bytes in; returns bytes written."""
    mv = memoryview(data)
    pos = 0
    for addr, n in sg:
        if pos >= len(mv):
            break
        if offset >= n:
            offset -= n
            continue
        take = min(n - offset, len(mv) - pos)
        mem.write(addr + offset, mv[pos:pos + take])
        pos += take
        offset = 0
    return pos
