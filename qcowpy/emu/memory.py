"""The memory API: MemoryRegions, AddressSpaces, flat views and access dispatch.

Modelled on QEMU's ``exec/memory.h``. A region is a container, RAM, I/O (backed by
:class:`MemoryRegionOps` callbacks) or an alias of part of another region. Subregions sit at
offsets inside containers; when they overlap, the higher priority wins, and among equal priorities
the one added last wins (QEMU's list order). An :class:`AddressSpace` renders its root region into
a flat list of non-overlapping ranges, caches it, and re-renders when any region's topology has
changed since (a generation counter stands in for QEMU's memory transactions).

Accesses follow QEMU's rules: a buffer access is cut into pieces that each fit one flat range and
the region's ``valid.max_access_size`` and alignment; each piece is checked against ``valid``
(rejected pieces read as 0 and writes are dropped, as QEMU's dispatch does); accepted pieces are
split or widened to ``impl`` sizes and byte-swapped for big-endian devices. Holes in the address
space (no region at all) read as all-ones and ignore writes.
"""
from __future__ import annotations

import bisect
import itertools
import mmap
import threading
from dataclasses import dataclass, field
from enum import Enum
from typing import Any, Callable, Optional

from .errors import EmuError

UINT64_MAX = (1 << 64) - 1
SIZE_2_64 = 1 << 64

#: The emulated target (x86) is little-endian; "native" device endianness means this.
TARGET_BIG_ENDIAN = False

_generation = itertools.count(1)
_generation_lock = threading.Lock()
_current_generation = 0


def _topology_changed() -> None:
    global _current_generation
    with _generation_lock:
        _current_generation = next(_generation)


def topology_generation() -> int:
    """Changes whenever any region's topology changes; mappings taken before are then stale."""
    return _current_generation


class Endianness(Enum):
    """How a device's registers order bytes (QEMU's ``enum device_endian``)."""

    NATIVE = "native"
    LITTLE = "little"
    BIG = "big"


@dataclass
class AccessConstraints:
    """``valid`` limits: what the guest may do. Size 0 means "no limit" (QEMU's compat rule)."""

    min_access_size: int = 0
    max_access_size: int = 0
    unaligned: bool = False
    accepts: Optional[Callable[[Any, int, int, bool], bool]] = None


@dataclass
class ImplConstraints:
    """``impl`` limits: what the callbacks can handle; dispatch adapts accesses to them."""

    min_access_size: int = 0
    max_access_size: int = 0
    unaligned: bool = False


@dataclass
class MemoryRegionOps:
    """Callbacks and constraints of an I/O region (QEMU's ``MemoryRegionOps``).

    ``read(opaque, addr, size) -> int`` and ``write(opaque, addr, value, size)`` get the offset
    inside the region and a size the ``impl`` constraints allow.
    """

    read: Optional[Callable[[Any, int, int], int]] = None
    write: Optional[Callable[[Any, int, int, int], None]] = None
    endianness: Endianness = Endianness.NATIVE
    valid: AccessConstraints = field(default_factory=AccessConstraints)
    impl: ImplConstraints = field(default_factory=ImplConstraints)


class RegionKind(Enum):
    CONTAINER = "container"
    RAM = "ram"
    IO = "io"
    ALIAS = "alias"


class MemoryRegion:
    """A named range of guest-visible memory; build one with the ``container``/``ram``/``io``/``alias``
    constructors (QEMU's ``memory_region_init_*``)."""

    def __init__(self, owner: Any, name: str, size: int, kind: RegionKind) -> None:
        if not 0 <= size <= SIZE_2_64:
            raise EmuError(f"memory region '{name}': bad size {size:#x}")
        self.owner = owner
        self.name = name
        self.size = size
        self.kind = kind
        self.addr = 0
        self.priority = 0
        self.enabled = True
        self.readonly = False
        self.container: Optional[MemoryRegion] = None
        self.subregions: list[MemoryRegion] = []  # kept in rendering order (QEMU's list order)
        self.ops: Optional[MemoryRegionOps] = None
        self.opaque: Any = None
        self.ram: Optional[mmap.mmap | bytearray] = None
        self.alias_of: Optional[MemoryRegion] = None
        self.alias_offset = 0
        self._direct: tuple[Optional[MemoryRegionOps], int] = (None, 0)  # see direct_sizes()

    # -- constructors ----------------------------------------------------------------------
    @classmethod
    def container_region(cls, owner: Any, name: str, size: int) -> "MemoryRegion":
        """A region that only holds subregions; its gaps are transparent."""
        return cls(owner, name, size, RegionKind.CONTAINER)

    @classmethod
    def ram_region(cls, owner: Any, name: str, size: int) -> "MemoryRegion":
        """Guest RAM: zero-filled, page-aligned anonymous memory (as QEMU's ``qemu_ram_mmap``).

        The alignment matters beyond faithfulness: a bytearray's bytes start 16 bytes into a
        page, and the kernel copies a 64 KiB read into such a buffer ~20% slower."""
        mr = cls(owner, name, size, RegionKind.RAM)
        mr.ram = mmap.mmap(-1, size) if size else bytearray()
        return mr

    @classmethod
    def io_region(cls, owner: Any, ops: MemoryRegionOps, opaque: Any, name: str, size: int) -> "MemoryRegion":
        """A region whose accesses call ``ops`` with ``opaque`` (usually the device)."""
        mr = cls(owner, name, size, RegionKind.IO)
        mr.ops = ops
        mr.opaque = opaque
        return mr

    @classmethod
    def alias_region(cls, owner: Any, name: str, orig: "MemoryRegion", offset: int, size: int) -> "MemoryRegion":
        """A window onto ``orig`` starting at ``offset``."""
        mr = cls(owner, name, size, RegionKind.ALIAS)
        mr.alias_of = orig
        mr.alias_offset = offset
        return mr

    # -- topology --------------------------------------------------------------------------
    def add_subregion(self, offset: int, sub: "MemoryRegion", priority: int = 0) -> None:
        """Place ``sub`` at ``offset``; a later region of equal priority hides earlier ones."""
        if sub.container is not None:
            raise EmuError(f"memory region '{sub.name}' is already in '{sub.container.name}'")
        sub.container = self
        sub.addr = offset
        sub.priority = priority
        for i, other in enumerate(self.subregions):
            if priority >= other.priority:
                self.subregions.insert(i, sub)
                break
        else:
            self.subregions.append(sub)
        _topology_changed()

    def add_subregion_overlap(self, offset: int, sub: "MemoryRegion", priority: int) -> None:
        self.add_subregion(offset, sub, priority)

    def del_subregion(self, sub: "MemoryRegion") -> None:
        if sub.container is not self:
            raise EmuError(f"memory region '{sub.name}' is not in '{self.name}'")
        self.subregions.remove(sub)
        sub.container = None
        _topology_changed()

    def set_enabled(self, enabled: bool) -> None:
        if self.enabled != enabled:
            self.enabled = enabled
            _topology_changed()

    def set_address(self, addr: int) -> None:
        """Move a mapped subregion, keeping its priority."""
        container = self.container
        if container is None:
            self.addr = addr
            return
        prio = self.priority
        container.del_subregion(self)
        container.add_subregion(addr, self, prio)

    def set_alias_offset(self, offset: int) -> None:
        self.alias_offset = offset
        _topology_changed()

    def set_size(self, size: int) -> None:
        self.size = size
        _topology_changed()

    def set_readonly(self, readonly: bool) -> None:
        self.readonly = readonly
        _topology_changed()

    @property
    def terminates(self) -> bool:
        return self.kind in (RegionKind.RAM, RegionKind.IO)

    @property
    def type_name(self) -> str:
        """The type word ``info mtree`` prints."""
        mr = self
        while mr.alias_of is not None:
            mr = mr.alias_of
        return "ram" if mr.kind is RegionKind.RAM else "i/o"

    def __repr__(self) -> str:
        return f"<MemoryRegion {self.name} {self.kind.value} size={self.size:#x}>"


@dataclass
class FlatRange:
    """One piece of a flat view: guest ``[start, end)`` maps to ``mr`` at ``offset``."""

    start: int
    end: int
    mr: MemoryRegion
    offset: int
    readonly: bool


class FlatView:
    """Sorted, non-overlapping ranges rendered from a root region."""

    def __init__(self, ranges: list[FlatRange]) -> None:
        self.ranges = ranges
        self._starts = [r.start for r in ranges]

    def lookup(self, addr: int) -> Optional[FlatRange]:
        i = bisect.bisect_right(self._starts, addr) - 1
        if i >= 0 and addr < self.ranges[i].end:
            return self.ranges[i]
        return None

    def next_start(self, addr: int) -> int:
        i = bisect.bisect_right(self._starts, addr)
        return self.ranges[i].start if i < len(self.ranges) else SIZE_2_64


def render(root: MemoryRegion) -> FlatView:
    """Flatten ``root`` the way QEMU's ``render_memory_region`` does."""
    covered: list[FlatRange] = []

    def insert(start: int, end: int, mr: MemoryRegion, region_base: int, readonly: bool) -> None:
        # Fill only the gaps of [start, end) not already covered by higher-precedence ranges.
        cur = start
        pieces = []
        for r in covered:
            if r.end <= cur or r.start >= end:
                continue
            if r.start > cur:
                pieces.append((cur, r.start))
            cur = max(cur, r.end)
            if cur >= end:
                break
        if cur < end:
            pieces.append((cur, end))
        for s, e in pieces:
            covered.append(FlatRange(s, e, mr, s - region_base, readonly))
        covered.sort(key=lambda r: r.start)

    def rec(mr: MemoryRegion, base: int, clip_start: int, clip_end: int, readonly: bool) -> None:
        if not mr.enabled:
            return
        base += mr.addr
        start = max(base, clip_start)
        end = min(base + mr.size, clip_end)
        if start >= end:
            return
        readonly = readonly or mr.readonly
        if mr.alias_of is not None:
            rec(mr.alias_of, base - mr.alias_offset - mr.alias_of.addr, start, end, readonly)
            return
        for sub in mr.subregions:
            rec(sub, base, start, end, readonly)
        if mr.terminates:
            insert(start, end, mr, base, readonly)

    rec(root, -root.addr, 0, SIZE_2_64, False)
    # merge neighbours that continue the same region (QEMU's flatview_simplify)
    merged: list[FlatRange] = []
    for r in covered:
        last = merged[-1] if merged else None
        if (last and last.mr is r.mr and last.end == r.start and last.readonly == r.readonly
                and last.offset + (last.end - last.start) == r.offset):
            last.end = r.end
        else:
            merged.append(r)
    return FlatView(merged)


def _bswap(value: int, size: int) -> int:
    return int.from_bytes(value.to_bytes(size, "little"), "big")


def _wrong_endian(mr: MemoryRegion) -> bool:
    assert mr.ops is not None
    e = mr.ops.endianness
    if e is Endianness.NATIVE:
        return False
    return (e is Endianness.BIG) != TARGET_BIG_ENDIAN


def access_valid(mr: MemoryRegion, addr: int, size: int, is_write: bool) -> bool:
    """QEMU's ``memory_region_access_valid``: accepts(), alignment, then size limits."""
    ops = mr.ops
    assert ops is not None
    v = ops.valid
    if v.accepts is not None and not v.accepts(mr.opaque, addr, size, is_write):
        return False
    if not v.unaligned and addr & (size - 1):
        return False
    if not v.max_access_size:
        return True
    return v.min_access_size <= size <= v.max_access_size


def _impl_sizes(mr: MemoryRegion) -> tuple[int, int]:
    impl = mr.ops.impl  # type: ignore[union-attr]
    return impl.min_access_size or 1, impl.max_access_size or 4


def dispatch_read(mr: MemoryRegion, addr: int, size: int) -> int:
    """Read ``size`` bytes from an I/O region, honouring valid/impl/endianness."""
    if not access_valid(mr, addr, size, False):
        return 0
    ops = mr.ops
    assert ops is not None
    lo, hi = _impl_sizes(mr)
    access = max(min(size, hi), lo)
    mask = (1 << (access * 8)) - 1
    big = _device_big_endian(mr)
    value = 0
    for i in range(0, size, access):
        shift = (size - access - i) * 8 if big else i * 8
        part = (ops.read(mr.opaque, addr + i, access) if ops.read else 0) & mask
        value |= part << shift if shift >= 0 else part >> -shift
    value &= (1 << (size * 8)) - 1
    return _bswap(value, size) if _wrong_endian(mr) else value


def dispatch_write(mr: MemoryRegion, addr: int, value: int, size: int) -> None:
    """Write ``size`` bytes to an I/O region, honouring valid/impl/endianness."""
    if not access_valid(mr, addr, size, True):
        return
    ops = mr.ops
    assert ops is not None
    value &= (1 << (size * 8)) - 1
    if _wrong_endian(mr):
        value = _bswap(value, size)
    lo, hi = _impl_sizes(mr)
    access = max(min(size, hi), lo)
    mask = (1 << (access * 8)) - 1
    big = _device_big_endian(mr)
    for i in range(0, size, access):
        shift = (size - access - i) * 8 if big else i * 8
        part = (value >> shift if shift >= 0 else value << -shift) & mask
        if ops.write:
            ops.write(mr.opaque, addr + i, part, access)


def direct_sizes(mr: MemoryRegion) -> int:
    """The access sizes (a mask of 1, 2, 4, 8) that reach ``mr``'s callbacks unchanged when
    aligned: valid without an ``accepts`` hook, served by one ``impl``-sized call, no byte swap.

    For those, :func:`dispatch_read`/:func:`dispatch_write` come down to one callback, so
    :meth:`AddressSpace.load`/:meth:`~AddressSpace.store` make that call directly. Worked out once
    per ops (QEMU's ops are constant for a region's life) and kept on the region."""
    ops = mr.ops
    cached, mask = mr._direct
    if cached is ops and ops is not None:
        return mask
    mask = 0
    if ops is not None and ops.valid.accepts is None and not _wrong_endian(mr):
        v = ops.valid
        lo, hi = _impl_sizes(mr)
        for size in (1, 2, 4, 8):
            valid = v.min_access_size <= size <= v.max_access_size if v.max_access_size else size <= 4
            if valid and lo <= size <= hi:
                mask |= size
    mr._direct = (ops, mask)
    return mask


def _device_big_endian(mr: MemoryRegion) -> bool:
    e = mr.ops.endianness  # type: ignore[union-attr]
    return TARGET_BIG_ENDIAN if e is Endianness.NATIVE else e is Endianness.BIG


def _access_size(mr: MemoryRegion, length: int, addr: int) -> int:
    """QEMU's ``memory_access_size``: largest power of two allowed by valid.max and alignment."""
    v = mr.ops.valid  # type: ignore[union-attr]
    max_size = v.max_access_size or 4
    if not v.unaligned:
        align = addr & -addr
        if align and align < max_size:
            max_size = align
    length = min(length, max_size)
    return 1 << (length.bit_length() - 1)


class AddressSpace:
    """A root region seen from one initiator (CPU memory, CPU I/O ports, a device's DMA)."""

    def __init__(self, root: MemoryRegion, name: str, unassigned_byte: int = 0xFF) -> None:
        self.root = root
        self.name = name
        self.unassigned_byte = unassigned_byte
        self._view: Optional[FlatView] = None
        self._view_generation = -1
        # load/store resolutions by (addr, size), like a CPU TLB's entries: dropped with the view
        self._tlb: dict[int, tuple[int, Optional[tuple[FlatRange, int]]]] = {}

    @property
    def flatview(self) -> FlatView:
        """The cached flat view, re-rendered after any topology change."""
        gen = _current_generation
        if self._view is None or self._view_generation != gen:
            self._view = render(self.root)
            self._view_generation = gen
        return self._view

    def read(self, addr: int, length: int) -> bytes:
        """Read guest bytes (QEMU's ``address_space_read``)."""
        view = self.flatview
        r = view.lookup(addr)
        if r is not None and r.mr.ram is not None and addr + length <= r.end:  # all in one RAM range
            off = r.offset + (addr - r.start)
            return bytes(memoryview(r.mr.ram)[off:off + length])
        out = bytearray()
        while length > 0:
            r = view.lookup(addr)
            if r is None:
                n = min(length, view.next_start(addr) - addr)
                out += bytes([self.unassigned_byte]) * n
            else:
                n = min(length, r.end - addr)
                off = r.offset + (addr - r.start)
                mr = r.mr
                if mr.ram is not None:
                    out += mr.ram[off:off + n]
                else:
                    n = _access_size(mr, n, off)
                    out += dispatch_read(mr, off, n).to_bytes(n, "little")
            addr += n
            length -= n
        return bytes(out)

    def write(self, addr: int, data: bytes) -> None:
        """Write guest bytes (QEMU's ``address_space_write``)."""
        view = self.flatview
        pos, length = 0, len(data)
        r = view.lookup(addr)
        if r is not None and r.mr.ram is not None and addr + length <= r.end:  # all in one RAM range
            if not r.readonly:
                off = r.offset + (addr - r.start)
                r.mr.ram[off:off + length] = data
            return
        while pos < length:
            r = view.lookup(addr)
            if r is None:
                n = min(length - pos, view.next_start(addr) - addr)
            else:
                n = min(length - pos, r.end - addr)
                off = r.offset + (addr - r.start)
                mr = r.mr
                if mr.ram is not None:
                    if not r.readonly:
                        mr.ram[off:off + n] = data[pos:pos + n]
                else:
                    n = _access_size(mr, n, off)
                    dispatch_write(mr, off, int.from_bytes(data[pos:pos + n], "little"), n)
            addr += n
            pos += n

    def _resolve(self, addr: int, size: int) -> Optional[tuple[FlatRange, int]]:
        """The flat range and region offset serving an access of ``size`` at ``addr`` when it
        stays inside one range, is RAM or reaches an I/O region's callback unchanged (aligned,
        a size in :func:`direct_sizes`); None when the full dispatch must split, widen, swap or
        check it (or for a hole). Remembered per (addr, size) until the topology changes."""
        key = addr << 4 | size
        cached = self._tlb.get(key)
        if cached is not None and cached[0] == _current_generation:
            return cached[1]
        r = self.flatview.lookup(addr)
        res: Optional[tuple[FlatRange, int]] = None
        if r is not None and addr + size <= r.end:
            off = r.offset + (addr - r.start)
            if r.mr.ram is not None or not (off & (size - 1) or not direct_sizes(r.mr) & size):
                res = r, off
        if len(self._tlb) >= 1024:
            self._tlb.clear()
        self._tlb[key] = (_current_generation, res)
        return res

    def load(self, addr: int, size: int) -> int:
        """A CPU-style load of 1, 2, 4 or 8 bytes, little-endian like the x86 target."""
        hit = self._resolve(addr, size)
        if hit is not None:
            r, off = hit
            mr = r.mr
            if mr.ram is not None:
                return int.from_bytes(mr.ram[off:off + size], "little")
            if mr.ops.read is not None:  # type: ignore[union-attr]
                return mr.ops.read(mr.opaque, off, size) & ((1 << (size * 8)) - 1)  # type: ignore[union-attr]
        return int.from_bytes(self.read(addr, size), "little")

    def store(self, addr: int, value: int, size: int) -> None:
        value &= (1 << (size * 8)) - 1
        hit = self._resolve(addr, size)
        if hit is not None:
            r, off = hit
            mr = r.mr
            if mr.ram is not None:
                if not r.readonly:
                    mr.ram[off:off + size] = value.to_bytes(size, "little")
                return
            if mr.ops.write is not None:  # type: ignore[union-attr]
                mr.ops.write(mr.opaque, off, value, size)  # type: ignore[union-attr]
                return
        self.write(addr, value.to_bytes(size, "little"))

    def map_ram(self, addr: int, length: int, writable: bool) -> Optional[memoryview]:
        """``[addr, addr + length)`` as a view of the RAM behind it when it is one piece of RAM
        (writable RAM if ``writable``), else None (QEMU's ``address_space_map`` without the
        bounce buffer). The view is good until :func:`topology_generation` changes."""
        r = self.flatview.lookup(addr)
        if r is None or r.mr.ram is None or addr + length > r.end or (writable and r.readonly):
            return None
        off = r.offset + (addr - r.start)
        return memoryview(r.mr.ram)[off:off + length]

    def translate(self, addr: int) -> Optional[tuple[MemoryRegion, int]]:
        """The region and offset that serve ``addr``, or None for a hole."""
        r = self.flatview.lookup(addr)
        return (r.mr, r.offset + addr - r.start) if r else None

    def __repr__(self) -> str:
        return f"<AddressSpace {self.name} root={self.root.name}>"
