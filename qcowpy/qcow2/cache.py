"""Write-back cache of metadata tables (L2 tables, refcount blocks) with ordered flushing.

A cached table is a :class:`Table`: changing one of its entries marks it dirty, so callers never
name tables by offset to say they changed them. A cache may depend on another one (QEMU's
qcow2-cache dependency): before any of its tables is written, the dependency is flushed and a
barrier (a host-file flush) separates the two sets of writes. ``Metadata.sync`` states the whole
order; the dependency keeps it when a dirty table is evicted between syncs.
"""
from __future__ import annotations

from collections import OrderedDict
from typing import Callable, Generic, TypeVar

from .overlap import announce

T = TypeVar("T")


class Table(Generic[T]):
    """One cached table: ``data`` is the decoded table (a list of entries or a bytearray);
    assigning through the table (``table[i] = v``, slices too) marks it dirty."""

    __slots__ = ("offset", "data", "dirty")

    def __init__(self, offset: int, data: T, dirty: bool = False):
        self.offset = offset
        self.data = data
        self.dirty = dirty

    def __getitem__(self, index):
        return self.data[index]  # type: ignore[index]

    def __setitem__(self, index, value) -> None:
        self.data[index] = value  # type: ignore[index]
        self.dirty = True

    def __len__(self) -> int:
        return len(self.data)  # type: ignore[arg-type]


class TableCache(Generic[T]):
    """At most ``capacity`` tables of ``table_size`` bytes; least recently used ones are evicted
    (written first when dirty). ``kind`` is the overlap-guard class the writes announce."""

    def __init__(self, file, table_size: int, capacity: int, decode: Callable[[bytes], T],
                 encode: Callable[[T], bytes], kind: int, depends_on: "TableCache | None" = None):
        self.file = file
        self.table_size = table_size
        self.capacity = max(2, capacity)
        self._decode = decode
        self._encode = encode
        self._kind = kind
        self._tables: OrderedDict[int, Table[T]] = OrderedDict()
        self.depends_on = depends_on

    def __contains__(self, offset: int) -> bool:
        return offset in self._tables

    def get(self, offset: int) -> Table[T]:
        table = self._tables.get(offset)
        if table is None:
            self._make_room()
            table = Table(offset, self._decode(self.file.pread(self.table_size, offset)))
            self._tables[offset] = table
        else:
            self._tables.move_to_end(offset)
        return table

    def put_new(self, offset: int, data: T) -> Table[T]:
        """Insert a freshly allocated table (never read from disk) as dirty."""
        self._make_room()
        table = self._tables[offset] = Table(offset, data, dirty=True)
        return table

    def discard(self, offset: int) -> None:
        """Forget a table whose cluster was freed (its contents no longer matter)."""
        self._tables.pop(offset, None)

    def clear(self) -> None:
        """Forget every table, dirty or not (the structures they came from are gone)."""
        self._tables.clear()

    @property
    def has_dirty(self) -> bool:
        return any(t.dirty for t in self._tables.values())

    def flush(self) -> None:
        """Write every dirty table (in offset order), after the dependency has reached the disk."""
        dirty = sorted(t.offset for t in self._tables.values() if t.dirty)
        if not dirty:
            return
        self._flush_dependency()
        for offset in dirty:
            self._write(self._tables[offset])

    def _flush_dependency(self) -> None:
        dep = self.depends_on
        if dep is not None:
            dep.flush()
            self.file.flush()  # barrier: dependency writes before ours (no-op if nothing pending)

    def _write(self, table: Table[T]) -> None:
        data = self._encode(table.data)
        announce(self.file, self._kind)
        self.file.pwrite(data, table.offset)
        table.dirty = False

    def _make_room(self) -> None:
        while len(self._tables) >= self.capacity:
            victim = next(iter(self._tables.values()))
            if victim.dirty:
                self._flush_dependency()
                self._write(victim)
            del self._tables[victim.offset]
