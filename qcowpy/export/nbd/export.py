"""What one export offers: a device, its name and flags, and the metadata contexts it can describe."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, Iterator, Sequence

from ...block.device import BlockDevice, status_at
from ...block import nbdproto as P

META_IDS = {P.CONTEXT_BASE_ALLOCATION: 0, P.CONTEXT_ALLOCATION_DEPTH: 1}  # ids as qemu-nbd numbers them
DIRTY_PREFIX = "qemu:dirty-bitmap:"
STATE_DIRTY = 1

#: what a dirty bitmap offers the server: (start, length, dirty) runs covering offset..offset+length
DirtyExtents = Callable[[int, int], Sequence[tuple[int, int, bool]]]
MAX_EXTENTS = 1 << 14  # block status answers at most this many runs (the client asks again for the rest)


@dataclass
class Export:
    """A BlockDevice exported under ``name``; every connection to it shares the one device.

    ``discard`` lets TRIM and unmapping zero writes free space (qemu-nbd's ``--discard=unmap``;
    qemu-nbd's default ignores TRIM). ``detect_zeroes`` ("off", "on", "unmap") turns writes of
    zeros into zero writes. ``multi_conn`` is set when several clients may connect: one shared
    device means a FLUSH on any connection covers writes made on all of them.
    """

    device: BlockDevice
    name: str = ""
    description: str | None = None
    read_only: bool = False
    allocation_depth: bool = False
    discard: bool = False
    detect_zeroes: str = "off"
    multi_conn: bool = False
    writethrough: bool = False
    guard_block0: bool = False  # the format was probed as raw: refuse writes that would change that
    bitmaps: dict[str, DirtyExtents] = field(default_factory=dict)  # name -> reader (qemu-nbd -B)
    size: int = field(init=False)

    def __post_init__(self) -> None:
        self.size = self.device.size & ~511  # whole sectors, as qemu-nbd exports

    @property
    def min_block(self) -> int:
        return 512 if self.guard_block0 else 1

    @property
    def flags(self) -> int:
        f = P.FLAG_HAS_FLAGS | P.FLAG_SEND_FLUSH | P.FLAG_SEND_FUA | P.FLAG_SEND_CACHE
        if self.multi_conn:
            f |= P.FLAG_CAN_MULTI_CONN
        if self.read_only:
            f |= P.FLAG_READ_ONLY
        else:
            f |= P.FLAG_SEND_TRIM | P.FLAG_SEND_WRITE_ZEROES | P.FLAG_SEND_FAST_ZERO
        return f

    @property
    def contexts(self) -> list[str]:
        names = [P.CONTEXT_BASE_ALLOCATION]
        if self.allocation_depth:
            names.append(P.CONTEXT_ALLOCATION_DEPTH)
        return names + [DIRTY_PREFIX + b for b in self.bitmaps]

    def context_id(self, name: str) -> int:
        """The id a context is announced with (bitmaps follow the fixed ones, in export order)."""
        if name in META_IDS:
            return META_IDS[name]
        return len(META_IDS) + list(self.bitmaps).index(name[len(DIRTY_PREFIX):])

    def match_contexts(self, query: str, listing: bool) -> list[str]:
        """Contexts a query names: exact names; when listing, also a bare namespace ("base:", "qemu:")."""
        if query in self.contexts:
            return [query]
        if listing and query.endswith(":"):
            return [c for c in self.contexts if c.startswith(query)]
        return []

    def status(self, offset: int, length: int, contexts: list[str], one: bool) -> dict[str, list[tuple[int, int]]]:
        """(length, flags) runs per context over ``offset``..``offset+length``, merged where equal."""
        out: dict[str, list[tuple[int, int]]] = {c: [] for c in contexts}
        for c in contexts:
            if c.startswith(DIRTY_PREFIX):
                out[c] = _dirty_runs(self.bitmaps[c[len(DIRTY_PREFIX):]], offset, length, one)
        plain = [c for c in contexts if not c.startswith(DIRTY_PREFIX)]
        if not plain:
            return out
        for ext in _runs(self.device, offset, length, 1 if one else MAX_EXTENTS):
            for c in plain:
                if c == P.CONTEXT_BASE_ALLOCATION:
                    value = (0 if ext.data else P.STATE_HOLE) | (P.STATE_ZERO if ext.zero else 0)
                else:
                    value = ext.depth + 1 if ext.present else 0
                runs = out[c]
                if runs and runs[-1][1] == value and not one:
                    runs[-1] = (runs[-1][0] + ext.length, value)
                else:
                    runs.append((ext.length, value))
        return out


def _runs(dev: BlockDevice, offset: int, length: int, limit: int) -> Iterator:
    pos, end = offset, offset + length
    while pos < end and limit > 0:
        ext = status_at(dev, pos, end - pos)
        yield ext
        pos += ext.length
        limit -= 1


def _dirty_runs(reader: DirtyExtents, offset: int, length: int, one: bool) -> list[tuple[int, int]]:
    """(length, NBD_STATE_DIRTY or 0) runs, merged, clipped to the request, at most MAX_EXTENTS."""
    runs: list[tuple[int, int]] = []
    end = offset + length
    for start, n, dirty in reader(offset, length):
        lo, hi = max(start, offset), min(start + n, end)
        if hi <= lo:
            continue
        value = STATE_DIRTY if dirty else 0
        if runs and runs[-1][1] == value:
            runs[-1] = (runs[-1][0] + hi - lo, value)
        else:
            runs.append((hi - lo, value))
    if not runs:
        runs = [(length, 0)]
    return runs[:1] if one else runs[:MAX_EXTENTS]
