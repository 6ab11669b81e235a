"""Split virtqueues (VIRTIO 1.x section 2.7), independent of any transport.

The engine works on guest memory through a *guest-memory accessor* (:class:`GuestMemory`):
``map(addr, length, writable)`` returns the guest RAM behind a range as memoryviews (QEMU's
``dma_memory_map``) and ``generation()`` changes whenever that mapping may have changed.
:class:`BytesMemory` is a plain ``bytearray`` (tests); the emulator adapts its PCI bus-master
address space (``qcowpy.emu.virtio.memory``) and the vhost-user back-end the regions of its memory
table (``qcowpy.export.vhost_user.memory``). Nothing here knows about a transport.

Like QEMU's vring region caches, the descriptor table, driver ring and device ring are mapped once
(and again after a memory-topology change) and then read and written in place; each of them must
lie in one piece of guest RAM. A popped element carries its buffers both as guest addresses
(``out_sg``/``in_sg``) and mapped (``out_iov``/``in_iov``), so a device moves data straight between
guest RAM and its back-end.

Nothing the guest puts in memory is trusted. A descriptor index outside the queue, a chain longer
than the queue (a loop), a nested or misaligned indirect table, a device-readable buffer after a
device-writable one, a buffer or ring outside guest RAM or an available index that runs more than
a queue size ahead all raise :class:`VirtQueueError`; the transport answers with DEVICE_NEEDS_RESET,
as QEMU's ``virtio_error`` does.
"""
from __future__ import annotations

import struct
from typing import Optional, Protocol

from ..errors import QcowError
from ..hostfile import iov_slice
from ..kernels import vring_chain, vring_chains

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


class VirtQueueError(QcowError):
    """The driver broke the virtqueue rules; the device must enter DEVICE_NEEDS_RESET
    (emulator) or the back-end stops serving the queue (vhost-user)."""

    qmp_class = "GenericError"


class GuestMemoryError(VirtQueueError):
    """A guest physical address range that is not (entirely) guest RAM."""


class GuestMemory(Protocol):
    def map(self, addr: int, length: int, writable: bool) -> list[memoryview]: ...
    def generation(self) -> int: ...

    def window(self) -> Optional[tuple[int, int, memoryview]]:
        """A block of writable guest RAM ``(start, end, bytes)`` (the one mapped last), or None;
        buffers inside it can be sliced from it directly."""


def _outside(addr: int, length: int) -> GuestMemoryError:
    return GuestMemoryError(f"guest address range {addr:#x}+{length:#x} is outside guest RAM")


class BytesMemory:
    """Guest memory that is a bytearray starting at guest physical address 0."""

    def __init__(self, buf: bytearray) -> None:
        self.buf = buf
        self.view = memoryview(buf)

    def map(self, addr: int, length: int, writable: bool) -> list[memoryview]:
        if addr < 0 or length < 0 or addr + length > len(self.buf):
            raise _outside(addr, length)
        return [self.view[addr:addr + length]]

    def generation(self) -> int:
        return 0

    def window(self) -> Optional[tuple[int, int, memoryview]]:
        return 0, len(self.buf), self.view


def map_one(mem: GuestMemory, addr: int, length: int, writable: bool, what: str) -> memoryview:
    """One contiguous mapping of ``length`` bytes, or VirtQueueError (QEMU: "Cannot map ...")."""
    views = mem.map(addr, length, writable)
    if len(views) != 1:
        raise VirtQueueError(f"cannot map {what} at {addr:#x}+{length:#x}: not one piece of guest RAM")
    return views[0]


class VirtQueueElement:
    """One available chain: its head index and its device-readable / device-writable buffers,
    as guest (address, length) pairs and as mapped memoryviews."""

    __slots__ = ("index", "out_sg", "in_sg", "out_iov", "in_iov", "out_len", "in_len")

    def __init__(self, index: int, out_sg: Optional[list[tuple[int, int]]] = None,
                 in_sg: Optional[list[tuple[int, int]]] = None, out_iov: Optional[list[memoryview]] = None,
                 in_iov: Optional[list[memoryview]] = None, out_len: int = 0, in_len: int = 0) -> None:
        self.index = index
        self.out_sg = [] if out_sg is None else out_sg
        self.in_sg = [] if in_sg is None else in_sg
        self.out_iov = [] if out_iov is None else out_iov
        self.in_iov = [] if in_iov is None else in_iov
        self.out_len = out_len  # total bytes of out_sg / in_sg
        self.in_len = in_len


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
        self.filled = 0  # used elements written since the last flush (QEMU's virtqueue_fill/flush)
        self.known_avail = 0  # chains seen at the last read of the driver's index, not yet popped
        self._maps_key: Optional[tuple[int, ...]] = None
        self._desc_v = self._avail_v = self._used_v = memoryview(b"")
        self._window: Optional[tuple[int, int, memoryview]] = None

    def attach(self, desc: int, avail: int, used: int, last_avail_idx: int) -> None:
        """Start the queue on rings the driver set up elsewhere (a vhost-user back-end taking
        over): map and bounds-check them now, and continue from the used index in guest memory
        and the available index the front-end handed over. Raises VirtQueueError."""
        self.desc, self.avail, self.used = desc, avail, used
        self.last_avail_idx = last_avail_idx & 0xFFFF
        self.known_avail = self.inflight = self.filled = 0
        self._maps_key = None
        self._maps()
        self.used_idx = _U16.unpack_from(self._used_v, 2)[0]
        self.ready = True

    def set_memory(self, mem: GuestMemory) -> None:
        """Use another guest-memory accessor (the front-end sent a new memory table)."""
        self.mem = mem
        self._maps_key = None
        self._desc_v = self._avail_v = self._used_v = memoryview(b"")
        self._window = None

    def _maps(self) -> None:
        """(Re)map the three rings when their addresses, size or the memory topology changed."""
        key = (self.desc, self.avail, self.used, self.num, self.event_idx, self.mem.generation())
        if key == self._maps_key:
            return
        extra = 2 if self.event_idx else 0  # used_event / avail_event exist only with EVENT_IDX
        num = self.num
        self._desc_v = map_one(self.mem, self.desc, DESC_SIZE * num, False, "descriptor table")
        self._avail_v = map_one(self.mem, self.avail, 4 + 2 * num + extra, False, "driver ring")
        self._used_v = map_one(self.mem, self.used, 4 + 8 * num + extra, True, "device ring")
        self._window = self.mem.window()  # the RAM block the rings live in: chains usually do too
        self._maps_key = key

    # -- driver ring --------------------------------------------------------------------------
    def available(self) -> int:
        """How many chains the driver has made available and we have not popped."""
        self._maps()
        idx = _U16.unpack_from(self._avail_v, 2)[0]
        n = (idx - self.last_avail_idx) & 0xFFFF
        if n > self.num:
            raise VirtQueueError(f"guest moved available index from {self.last_avail_idx} by {n}"
                                 f" (queue size {self.num})")
        self.known_avail = n
        return n

    def pop(self) -> Optional[VirtQueueElement]:
        """The next available chain, or None when the ring is empty.

        The driver's index is re-read only once the chains seen at the last read are used up
        (QEMU's shadow_avail_idx)."""
        if not self.ready:
            return None
        if not self.known_avail:
            if self.available() == 0:
                if self.event_idx:
                    self._set_avail_event(self.last_avail_idx)
                return None
        # else: still inside the batch the last read announced (one process_queue call under the
        # machine lock), so the ring mappings made for that read are current
        head = _U16.unpack_from(self._avail_v, 4 + 2 * (self.last_avail_idx % self.num))[0]
        elem = self._walk(head)
        self.last_avail_idx = idx = (self.last_avail_idx + 1) & 0xFFFF
        self.known_avail -= 1
        if self.event_idx:
            _U16.pack_into(self._used_v, 4 + 8 * self.num, idx)  # avail_event
        self.inflight += 1
        return elem

    def pop_many(self) -> list[VirtQueueElement]:
        """The chains the last read of the driver's index announced, in one kernel call — up to
        the first one that needs the general walker (indirect, outside the RAM window, or broken);
        :meth:`pop` takes that one next, so chains are still served and reported in ring order.
        Reads the driver's index when nothing is left of the last read; an empty list with
        ``known_avail`` 0 means the ring is empty (and, as :meth:`pop` does, asks for a
        notification at the next chain when event idx is on)."""
        if not self.ready:
            return []
        if not self.known_avail and not self.available():
            if self.event_idx:
                self._set_avail_event(self.last_avail_idx)
            return []
        if self._window is None:
            return []
        start, end, ram = self._window
        got = vring_chains(self._desc_v, self._avail_v, self.num, self.last_avail_idx, self.known_avail,
                           ram, start, end)
        n = len(got)
        if n:
            self.last_avail_idx = idx = (self.last_avail_idx + n) & 0xFFFF
            self.known_avail -= n
            if self.event_idx:
                _U16.pack_into(self._used_v, 4 + 8 * self.num, idx)  # avail_event
            self.inflight += n
        return [VirtQueueElement(*g) for g in got]

    def rewind(self, n: int) -> None:
        """Hand back the last ``n`` popped elements unserved: the next pops return them again
        (QEMU's ``virtqueue_rewind``)."""
        if n:
            self.last_avail_idx = (self.last_avail_idx - n) & 0xFFFF
            self.known_avail += n
            self.inflight -= n
            if self.event_idx:
                self._set_avail_event(self.last_avail_idx)

    def _set_avail_event(self, idx: int) -> None:
        _U16.pack_into(self._used_v, 4 + 8 * self.num, idx)

    def _walk(self, head: int) -> VirtQueueElement:
        if head >= self.num:
            raise VirtQueueError(f"guest chain head {head} >= queue size {self.num}")
        mem = self.mem
        win = self._window
        if win is not None:  # the common case in one call: a direct chain with buffers in one RAM block
            got = vring_chain(self._desc_v, head, self.num, win[2], win[0], win[1])
            if got is not None:
                return VirtQueueElement(head, *got)
        elem = VirtQueueElement(head)
        # everything else, and every broken rule with its message: step by step
        table, limit = self._desc_v, self.num
        addr, length, flags, nxt = _DESC.unpack_from(table, DESC_SIZE * head)
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
            table = map_one(mem, addr, length, False, "indirect descriptor table")
            addr, length, flags, nxt = _DESC.unpack_from(table, 0)
        out_sg, in_sg, out_iov, in_iov, gmap = elem.out_sg, elem.in_sg, elem.out_iov, elem.in_iov, mem.map
        count = 0
        while True:
            count += 1
            if count > limit:
                raise VirtQueueError("descriptor chain is longer than its table (loop?)")
            if flags & VRING_DESC_F_INDIRECT:
                raise VirtQueueError("indirect descriptor inside a chain or an indirect table")
            if flags & VRING_DESC_F_WRITE:
                in_sg.append((addr, length))
                if length:
                    in_iov += gmap(addr, length, True)
                    elem.in_len += length
            else:
                if in_sg:
                    raise VirtQueueError("device-readable descriptor after a device-writable one")
                out_sg.append((addr, length))
                if length:
                    out_iov += gmap(addr, length, False)
                    elem.out_len += length
            if not flags & VRING_DESC_F_NEXT:
                return elem
            if nxt >= limit:
                raise VirtQueueError(f"next descriptor {nxt} out of range ({limit})")
            addr, length, flags, nxt = _DESC.unpack_from(table, DESC_SIZE * nxt)

    # -- device ring ----------------------------------------------------------------------------
    def push(self, elem: VirtQueueElement, length: int) -> None:
        """Return ``elem`` to the driver with ``length`` bytes written (fill + flush)."""
        self.fill(elem, length)
        self.flush()

    def fill(self, elem: VirtQueueElement, length: int) -> None:
        """Write ``elem``'s used element (``length`` bytes written) after those filled before;
        the driver sees it at the next :meth:`flush` (QEMU's ``virtqueue_fill``).

        Uses the ring mappings of the pop that produced ``elem``."""
        _USED_ELEM.pack_into(self._used_v, 4 + 8 * ((self.used_idx + self.filled) % self.num), elem.index, length)
        self.filled += 1

    def flush(self) -> None:
        """Publish the filled elements with one used-index update (QEMU's ``virtqueue_flush``)."""
        n = self.filled
        if n:
            self.filled = 0
            self.used_idx = (self.used_idx + n) & 0xFFFF
            _U16.pack_into(self._used_v, 2, self.used_idx)
            self.inflight = max(0, self.inflight - n)

    def should_notify(self, old_used: int) -> bool:
        """Whether the driver wants an interrupt after the used index moved from ``old_used``."""
        if self.event_idx:
            return vring_need_event(_U16.unpack_from(self._avail_v, 4 + 2 * self.num)[0], self.used_idx, old_used)
        return not _U16.unpack_from(self._avail_v, 0)[0] & VRING_AVAIL_F_NO_INTERRUPT

    # -- layout helpers ----------------------------------------------------------------------------
    @staticmethod
    def sizes(num: int) -> tuple[int, int, int]:
        """Bytes of the descriptor table, driver ring and device ring for a queue of ``num``."""
        return DESC_SIZE * num, 6 + 2 * num, 6 + 8 * num


# -- scatter/gather over mapped buffers (QEMU's iov_to_buf / iov_from_buf) ----------------------

def iov_size(iov: list[memoryview]) -> int:
    return sum(len(v) for v in iov)


def iov_to_bytes(iov: list[memoryview], offset: int = 0, length: Optional[int] = None) -> bytes:
    """Gather ``length`` bytes (default: all) starting ``offset`` bytes into ``iov``."""
    if len(iov) == 1:
        v = iov[0]
        return bytes(v[offset:] if length is None else v[offset:offset + length])
    remaining = iov_size(iov) - offset if length is None else length
    return b"".join(iov_slice(iov, offset, remaining)) if remaining > 0 else b""


def iov_from_bytes(iov: list[memoryview], data: bytes | bytearray | memoryview, offset: int = 0) -> int:
    """Scatter ``data`` into ``iov`` starting ``offset`` bytes in; returns bytes written."""
    mv = memoryview(data)
    pos = 0
    for v in iov:
        if pos >= len(mv):
            break
        n = len(v)
        if offset >= n:
            offset -= n
            continue
        take = min(n - offset, len(mv) - pos)
        v[offset:offset + take] = mv[pos:pos + take]
        pos += take
        offset = 0
    return pos


def iov_split_tail(iov: list[memoryview], n: int) -> tuple[list[memoryview], list[memoryview]]:
    """Split off the last ``n`` bytes: (head views, tail views)."""
    head = list(iov)
    tail: list[memoryview] = []
    while n > 0 and head:
        v = head.pop()
        if len(v) > n:
            head.append(v[:len(v) - n])
            tail.insert(0, v[len(v) - n:])
            break
        tail.insert(0, v)
        n -= len(v)
    return head, tail
