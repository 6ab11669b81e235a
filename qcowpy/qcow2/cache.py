"""Write-back cache of metadata tables (L2 tables, refcount blocks) with ordered flushing.

The crash-safety contract (docs/architecture.md) is enforced here: a cache may name another
cache it depends on; flushing it first flushes the dependency and puts a barrier (a host-file
flush) between the two sets of writes, as QEMU's qcow2-cache.c does.
"""
from __future__ import annotations

from collections import OrderedDict
from typing import Callable, Generic, TypeVar

from ..hostfile import HostFile

T = TypeVar("T")


class TableCache(Generic[T]):
    def __init__(self, file: HostFile, table_size: int, capacity: int,
                 decode: Callable[[bytes], T], encode: Callable[[T], bytes],
                 before_write: Callable[[int, int], None] | None = None):
        self.file = file
        self.table_size = table_size
        self.capacity = max(2, capacity)
        self._decode = decode
        self._encode = encode
        self._before_write = before_write
        self._tables: OrderedDict[int, T] = OrderedDict()
        self._dirty: set[int] = set()
        self.depends_on: TableCache | None = None

    def __contains__(self, offset: int) -> bool:
        return offset in self._tables

    def get(self, offset: int) -> T:
        table = self._tables.get(offset)
        if table is None:
            self._make_room()
            table = self._decode(self.file.pread(self.table_size, offset))
            self._tables[offset] = table
        else:
            self._tables.move_to_end(offset)
        return table

    def put_new(self, offset: int, table: T) -> T:
        """Insert a freshly allocated table (never read from disk) as dirty."""
        self._make_room()
        self._tables[offset] = table
        self._dirty.add(offset)
        return table

    def mark_dirty(self, offset: int) -> None:
        self._dirty.add(offset)

    def discard(self, offset: int) -> None:
        """Forget a table whose cluster was freed (its contents no longer matter)."""
        self._tables.pop(offset, None)
        self._dirty.discard(offset)

    def clear(self) -> None:
        """Forget every table, dirty or not (the structures they came from are gone)."""
        self._tables.clear()
        self._dirty.clear()

    @property
    def has_dirty(self) -> bool:
        return bool(self._dirty)

    def flush(self) -> None:
        """Write every dirty table, after the dependency has reached the disk."""
        if not self._dirty:
            return
        self._flush_dependency()
        for offset in sorted(self._dirty):
            self._write(offset)
        self._dirty.clear()

    def _flush_dependency(self) -> None:
        dep = self.depends_on
        if dep is not None and dep.has_dirty:
            dep.flush()
        if dep is not None:
            self.file.flush()  # barrier: dependency writes before ours (no-op if nothing pending)

    def _write(self, offset: int) -> None:
        if self._before_write:
            self._before_write(offset, self.table_size)
        self.file.pwrite(self._encode(self._tables[offset]), offset)

    def _make_room(self) -> None:
        while len(self._tables) >= self.capacity:
            victim = next(iter(self._tables))
            if victim in self._dirty:
                self._flush_dependency()
                self._write(victim)
                self._dirty.discard(victim)
            del self._tables[victim]
