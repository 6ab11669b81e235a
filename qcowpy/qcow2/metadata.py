"""The metadata owner: the one object that changes an open image's qcow2 metadata.

It holds the header, the active L1 table, the L2 table cache, the refcounts, the references
waiting to be dropped and the overlap guard, and it is the only code that writes any of them.
Everything else (the data path, resize, snapshots) asks it. :meth:`Metadata.sync` states the
crash-safety order in one place; the cache dependency (L2 tables depend on refcount blocks, as
in QEMU) keeps the same order when a dirty table is evicted between two syncs.
"""
from __future__ import annotations

import sys
from contextlib import contextmanager
from dataclasses import replace
from typing import Iterator

from ..errors import CorruptImage, InvalidArgument, QcowError
from ..units import c_hex
from ..format import constants as C
from ..format.entries import ClusterType, compressed_descriptor, l1_offset, l2_offset, pack_table, unpack_table
from ..format.entries import cluster_type as std_cluster_type
from ..format.header import Header, field_patch, pack_header_cluster
from .cache import Table, TableCache
from .overlap import ACTIVE_L1, ACTIVE_L2, ALL, INACTIVE_L1, INACTIVE_L2, MAIN_HEADER, OverlapGuard, write_metadata
from ..format.refcount import set_refcount
from .refcount import Refcounts

MAX_PENDING_FREES = 4096  # dropped references kept in memory before a sync releases them


def cache_tables(cluster_size: int) -> int:
    """Tables per metadata cache: 64 for 64 KiB clusters, never fewer than 4 (memory stays bounded)."""
    return max(4, min(64, (4 << 20) // cluster_size))


class Metadata:
    """An image's metadata in memory, and the order in which changes to it reach the disk."""

    def __init__(self, file, header: Header, writable: bool, l2_cache_tables: int | None = None):
        self.header = header
        self.writable = writable
        self.cluster_bits = header.cluster_bits
        self.cluster_size = 1 << self.cluster_bits
        self.extended = header.extended_l2
        self.entry_words = 2 if self.extended else 1
        self.l2_entries = self.cluster_size // (8 * self.entry_words)
        self.l2_bits = self.l2_entries.bit_length() - 1
        # Every write of the image, data included, goes through the guard (qcow2/overlap.py).
        self.guard = OverlapGuard(file, self)
        self.file = self.guard
        l1_bytes = header.l1_size * 8
        self.l1: list[int] = unpack_table(file.pread(l1_bytes, header.l1_table_offset)) if l1_bytes else []
        self.refcounts = Refcounts(self.file, self.cluster_bits, header.refcount_order,
                                   header.refcount_table_offset, header.refcount_table_clusters,
                                   self._reftable_moved, cache_tables(self.cluster_size) // 2)
        self.l2cache: TableCache[list[int]] = TableCache(
            self.file, self.cluster_size, l2_cache_tables or cache_tables(self.cluster_size),
            unpack_table, pack_table, ACTIVE_L2, depends_on=self.refcounts.cache)
        self.pending_frees: list[tuple[int, int]] = []
        # With an external data file, data clusters carry no references (QEMU counts none).
        self.external_data = bool(header.incompatible_features & C.INCOMPAT_DATA_FILE)
        self.data_punches: list[int] = []  # data-file clusters to discard (see punching_freed)
        self.signaled_corruption = False  # a corruption event was reported (QEMU reports one per image)

    # ------------------------------------------------------------------ the crash-safety order
    def sync(self) -> None:
        """Write everything held in memory, in the order that leaves every crash point safe
        (at worst leaked clusters, never a reference to a cluster that is free or unwritten):

        1. refcount blocks: every increase, so no table names a cluster still free on disk;
        2. barrier — guest data and new tables written so far are durable as well;
        3. L2 tables, which may now point at those clusters;
        4. barrier — no table on disk still names the clusters whose references were dropped;
        5. only now do their refcounts fall (refcount blocks written again);
        6. barrier.
        """
        self.refcounts.cache.flush()                    # 1
        self.file.flush()                               # 2
        self.l2cache.flush()                            # 3
        if self.pending_frees:
            self.file.flush()                           # 4
            frees, self.pending_frees = self.pending_frees, []
            for offset, length in frees:
                self.refcounts.free(offset, length)
                self.l2cache.discard(offset)            # a freed table is never written back
        self.refcounts.cache.flush()                    # 5
        self.file.flush()                               # 6

    def free_later(self, offset: int, length: int) -> None:
        """Drop a reference only at the next sync, after the tables that held it are on disk."""
        self.pending_frees.append((offset, length))
        if len(self.pending_frees) > MAX_PENDING_FREES:
            self.sync()

    def free_entry_later(self, entry: int) -> None:
        """Release what a standard L2 entry (or an extended entry's first word) referenced."""
        if self.external_data:
            # nothing is counted; inside punching_freed the data-file cluster is discarded (QEMU
            # passes ALWAYS/SNAPSHOT frees down to the data file)
            if self.refcounts.freed is not None and (entry == C.OFLAG_COPIED or std_cluster_type(entry) in (
                    ClusterType.NORMAL, ClusterType.ZERO_ALLOC)):
                self.data_punches.append(l2_offset(entry))
            return
        t = std_cluster_type(entry)
        if t in (ClusterType.NORMAL, ClusterType.ZERO_ALLOC):
            self.free_later(l2_offset(entry), self.cluster_size)
        elif t == ClusterType.COMPRESSED:
            host, nbytes = compressed_descriptor(entry, self.cluster_bits)
            for c in range(host >> self.cluster_bits, ((host + nbytes - 1) >> self.cluster_bits) + 1):
                self.free_later(c << self.cluster_bits, 1)

    @contextmanager
    def punching_freed(self) -> Iterator[None]:
        """Clusters whose refcount falls to 0 inside the block are punched out of the host file
        at its end (QEMU's discard passthrough for QCOW2_DISCARD_ALWAYS/SNAPSHOT frees); those
        allocated again meanwhile are left alone."""
        self.refcounts.freed = []
        self.data_punches = []
        try:
            yield
            self.sync()
            cs = self.cluster_size
            for start, n in _runs(c for c in sorted(set(self.refcounts.freed)) if not self.refcounts.get(c)):
                self.file.punch(start * cs, n * cs)
            data = self.guard.companion
            if data is not None:  # the L2 entries that named them are on disk (sync above)
                for start, n in _runs(iter(sorted({o >> self.cluster_bits for o in self.data_punches}))):
                    data.punch(start * cs, n * cs)
        finally:
            self.refcounts.freed = None
            self.data_punches = []

    # ------------------------------------------------------------------ the header
    def mark_corrupt(self, event: str) -> str:
        """QEMU's fatal corruption signal on a writable image: the corrupt bit goes to disk at
        once (past the overlap guard: the header is not metadata a guard protects from itself),
        and nothing else is written, caches included. Returns the message to report."""
        self.header.incompatible_features |= C.INCOMPAT_CORRUPT
        self.signaled_corruption = True
        try:
            if self.header.version < 3:  # v2 has no feature fields: the mark stays in memory (QEMU)
                return self._corrupt_message(event)
            offset, data = field_patch(self.header, "incompatible_features")
            self.guard.raw_file.pwrite(data, offset)
            self.guard.raw_file.flush()
        finally:
            self.writable = False
        return self._corrupt_message(event)

    def fatal_corruption(self, event: str) -> CorruptImage:
        """QEMU's fatal qcow2_signal_corruption: the image is marked corrupt and the event goes
        to stderr at once (QEMU prints it there, whatever the program, before the operation's
        own error); returns the EIO-like error for the caller to raise."""
        sys.stderr.write(self.mark_corrupt(event) + "\n")
        return CorruptImage(event)

    @staticmethod
    def _corrupt_message(event: str) -> str:
        return f"qcow2: Marking image as corrupt: {event}; further corruption events will be suppressed"

    def update_header(self, **fields: int) -> None:
        """Write the named (adjacent) header fields in place, then keep them in memory: one
        sector, so the update is atomic."""
        names = sorted(fields, key=lambda n: field_patch(self.header, n)[0])
        offset, data = field_patch(replace(self.header, **fields), names[0], names[-1])
        write_metadata(self.file, MAIN_HEADER, data, offset)
        for name, value in fields.items():
            setattr(self.header, name, value)

    def rewrite_header(self, header: Header | None = None) -> None:
        """Write the whole header cluster (extensions and backing name included) from ``header``
        (default: the one in memory), then make it the one in memory."""
        h = header or self.header
        write_metadata(self.file, MAIN_HEADER, pack_header_cluster(h), 0)
        if h is not self.header:  # others hold the header object: update it in place
            self.header.__dict__.update(h.__dict__)

    def change_backing_file(self, name: str | None, fmt: str | None) -> None:
        """Point the header at another backing file (QEMU's qcow2_change_backing_file): the whole
        header cluster is rewritten, with the backing-format extension set, changed or dropped."""
        if name and len(name.encode()) > 1023:
            raise InvalidArgument("Invalid argument")
        h = self.header.copy()
        h.backing_file = name or ""
        h.set_extension(C.EXT_BACKING_FORMAT, fmt.encode() if name and fmt else None)
        pack_header_cluster(h)  # raises if it does not fit in the header cluster
        self.sync()
        self.rewrite_header(h)
        self.file.flush()

    def switch_refcounts(self, order: int, table_offset: int, table_clusters: int) -> None:
        """Point the header at another refcount structure of another entry width (amend's
        refcount_bits): the table and its blocks are on disk; one header write (bytes 48..99)
        switches offset, size and width together, between barriers; then start over from it."""
        self.sync()
        self.update_header(refcount_table_offset=table_offset, refcount_table_clusters=table_clusters,
                           refcount_order=order)
        self.file.flush()
        self.refcounts = Refcounts(self.file, self.cluster_bits, order, table_offset, table_clusters,
                                   self._reftable_moved, cache_tables(self.cluster_size) // 2)
        self.l2cache.depends_on = self.refcounts.cache

    def _reftable_moved(self, offset: int, clusters: int) -> None:
        self.update_header(refcount_table_offset=offset, refcount_table_clusters=clusters)

    def before_change(self) -> None:
        """Runs before every modification: header bits that must reach the disk before data does."""
        h = self.header
        if h.compatible_features & C.COMPAT_LAZY_REFCOUNTS and not h.incompatible_features & C.INCOMPAT_DIRTY:
            self.set_incompatible(h.incompatible_features | C.INCOMPAT_DIRTY)
            # the dirty bit is on disk before any refcount may go stale

    def set_incompatible(self, bits: int) -> None:
        self.update_header(incompatible_features=bits)
        self.file.flush()

    # ------------------------------------------------------------------ L1 and L2 tables
    def l2_table(self, l1_index: int) -> Table[list[int]] | None:
        """The (validated) L2 table that L1 entry ``l1_index`` points to, or None."""
        if l1_index >= len(self.l1):
            return None
        off = l1_offset(self.l1[l1_index])
        if not off:
            return None
        if off & (self.cluster_size - 1):
            raise CorruptImage(f"L2 table offset {off:#x} unaligned (L1 index: {c_hex(l1_index)})")
        if off not in self.l2cache and off + self.cluster_size > self.file.size():
            raise CorruptImage(f"L2 table offset {off:#x} is past the end of the image file")
        return self.l2cache.get(off)

    def owns_l2(self, l1_index: int) -> bool:
        """True if the L2 table is this image's alone (COPIED): it may be changed in place."""
        return l1_index < len(self.l1) and bool(self.l1[l1_index] & C.OFLAG_COPIED)

    def writable_l2(self, l1_index: int) -> Table[list[int]]:
        """The L2 table for ``l1_index``, allocated or copied (if shared) so it may be modified."""
        if l1_index >= len(self.l1):
            self.grow_l1(l1_index + 1)
        entry = self.l1[l1_index]
        old = l1_offset(entry)
        if old and entry & C.OFLAG_COPIED:
            return self.l2_table(l1_index)  # type: ignore[return-value]
        new = self.refcounts.alloc_clusters(1)
        data = self.l2_table(l1_index).data[:] if old else [0] * (self.l2_entries * self.entry_words)  # type: ignore[union-attr]
        table = self.l2cache.put_new(new, data)
        # The new table (and its refcount) reaches the disk before the L1 entry points to it.
        self.l2cache.flush()
        self.file.flush()
        self.l1[l1_index] = new | C.OFLAG_COPIED
        self.write_l1_entries(l1_index, l1_index + 1)
        if old:
            self.free_later(old, self.cluster_size)
        return table

    def write_l1_entries(self, first: int, end: int) -> None:
        """Write the in-memory L1 entries [first, end) in place."""
        write_metadata(self.file, ACTIVE_L1, pack_table(self.l1[first:end]), self.header.l1_table_offset + 8 * first)

    def write_inactive_l2(self, offset: int, entries: list[int]) -> None:
        """Write a snapshot's L2 table in place (amend's zero-cluster expansion, as QEMU's
        expand_zero_clusters_in_l1 does); a copy in the cache is dropped first."""
        self.l2cache.discard(offset)
        write_metadata(self.file, INACTIVE_L2 | ACTIVE_L2, pack_table(entries), offset)

    def write_l1_table(self, entries: list[int], offset: int | None = None) -> None:
        """Write a whole L1 table in place: the active one (default), or a snapshot's at ``offset``."""
        active = offset is None or offset == self.header.l1_table_offset
        write_metadata(self.file, ACTIVE_L1 if active else INACTIVE_L1, pack_table(entries),
                       self.header.l1_table_offset if offset is None else offset)

    def grow_l1(self, min_entries: int, exact: bool = False) -> None:
        """Move the L1 table to a larger area (QEMU's qcow2_grow_l1_table): the copy is durable
        before the header points at it; the old area is released at the next sync."""
        if min_entries * 8 > C.MAX_L1_SIZE_BYTES:
            raise QcowError("Image would need an L1 table larger than QEMU allows")
        new_size = min_entries if exact or not self.l1 else max(min_entries, len(self.l1) * 3 // 2 + 1)
        new_size = min(new_size, C.MAX_L1_SIZE_BYTES // 8)
        table = self.l1 + [0] * (new_size - len(self.l1))
        nclusters = (new_size * 8 + self.cluster_size - 1) // self.cluster_size
        new_off = self.refcounts.alloc_clusters(nclusters)
        self.refcounts.flush()
        self.file.pwrite(pack_table(table), new_off)
        self.file.flush()
        old_off, old_size = self.header.l1_table_offset, self.header.l1_size
        self.update_header(l1_size=new_size, l1_table_offset=new_off)
        self.file.flush()
        self.l1 = table
        if old_size:
            self.free_later(old_off, self.clusters_for(old_size * 8) * self.cluster_size)

    def shrink_l1(self, new_l1: int) -> None:
        """QEMU's qcow2_shrink_l1_table: the entries past ``new_l1`` are zeroed on disk (the L1
        keeps its size) and their L2 tables freed."""
        if new_l1 >= len(self.l1):
            return
        write_metadata(self.file, ACTIVE_L1, bytes(8 * (len(self.l1) - new_l1)),
                       self.header.l1_table_offset + 8 * new_l1)
        self.file.flush()
        for i in range(len(self.l1) - 1, new_l1 - 1, -1):
            off = l1_offset(self.l1[i])
            if off:
                self.l2cache.discard(off)
                self.refcounts.free(off, self.cluster_size)
                self.l1[i] = 0
        self.refcounts.flush()
        self.file.flush()

    def clusters_for(self, nbytes: int) -> int:
        return (nbytes + self.cluster_size - 1) >> self.cluster_bits

    # ------------------------------------------------------------------ single L2 entries
    def _l2_slot(self, guest_offset: int) -> tuple[int, int]:
        return (guest_offset >> (self.cluster_bits + self.l2_bits),
                ((guest_offset >> self.cluster_bits) & (self.l2_entries - 1)) * self.entry_words)

    def l2_entry(self, guest_offset: int) -> tuple[int, int]:
        """(entry, subcluster bitmap or 0) of the cluster at ``guest_offset``; (0, 0) if unmapped."""
        l1_index, i = self._l2_slot(guest_offset)
        table = self.l2_table(l1_index)
        if table is None:
            return 0, 0
        return table.data[i], table.data[i + 1] if self.extended else 0

    def set_l2_entry(self, guest_offset: int, entry: int, bitmap: int = 0) -> tuple[int, int]:
        """Set the cluster's L2 entry (and bitmap on extended images), making the table writable
        first; returns the old (entry, bitmap)."""
        l1_index, i = self._l2_slot(guest_offset)
        table = self.writable_l2(l1_index)
        if self.extended:
            old = (table.data[i], table.data[i + 1])
            if old != (entry, bitmap):
                table[i:i + 2] = [entry, bitmap]
            return old
        old = (table.data[i], 0)
        if old[0] != entry:
            table[i] = entry
        return old

    def adopt(self, l1: list[int]) -> None:
        """The header now names a new L1 table (``l1``), refcount table and snapshot table
        (qcow2/txn.py switched them): start over from them."""
        self.l1 = list(l1)
        self.l2cache.clear()
        self.refcounts.reload(self.header.refcount_table_offset, self.header.refcount_table_clusters)
        self.guard.snapshots_changed()

    # ------------------------------------------------------------------ starting over
    def rebuild_empty(self, l1_clusters: int) -> None:
        """QEMU's make_completely_empty, made atomic: the image ends as QEMU leaves it (header,
        the refcount table right after it, its one block next, an empty L1 three clusters in,
        the file cut there), but through two header switches instead of QEMU's in-place rewrite
        under the dirty bit, which ``qemu-img check`` reports as corrupt if a crash cuts it.

        1. An empty image's structures are written past everything in use and switched to: all
           old clusters are free at once.
        2. QEMU's compact structures are written at clusters 1.., free since step 1, and switched
           to; the file is cut after them."""
        cs, h = self.cluster_size, self.header
        self.sync()
        start = max(self.clusters_for(self.file.size()), 3 + l1_clusters)
        self._switch_to_empty(start, l1_clusters)
        self._switch_to_empty(1, l1_clusters)
        self.file.truncate((3 + l1_clusters) * cs)
        h.incompatible_features &= ~C.INCOMPAT_DIRTY  # qcow2_mark_clean: the whole header anew
        self.rewrite_header()
        self.file.flush()

    def _switch_to_empty(self, first: int, l1_clusters: int) -> None:
        """Write, from cluster ``first`` on, a refcount table, its blocks and an empty L1 that
        count only themselves and the header, then point the header at them (one write)."""
        cs, pbb = self.cluster_size, self.refcounts.per_block_bits
        table_clusters, n_blocks = 1, 1
        while True:  # the blocks count the header's range and the new clusters' own
            used = [0] + list(range(first, first + table_clusters + n_blocks + l1_clusters))
            blocks = sorted({c >> pbb for c in used})
            need = self.clusters_for((blocks[-1] + 1) * 8)
            if len(blocks) == n_blocks and need == table_clusters:
                break
            n_blocks, table_clusters = len(blocks), max(table_clusters, need)
        table_off = first * cs
        block_offs = {bi: (first + table_clusters + i) * cs for i, bi in enumerate(blocks)}
        l1_off = (first + table_clusters + len(blocks)) * cs
        table = [0] * (table_clusters * cs // 8)
        for bi, off in block_offs.items():
            block = bytearray(cs)
            for c in used:
                if c >> pbb == bi:
                    set_refcount(block, c - (bi << pbb), self.refcounts.order, 1)
            write_metadata(self.file, ALL, block, off)
            table[bi] = off
        write_metadata(self.file, ALL, pack_table(table), table_off)
        write_metadata(self.file, ALL, bytes(l1_clusters * cs), l1_off)
        self.file.flush()
        self.update_header(l1_table_offset=l1_off, refcount_table_offset=table_off,
                           refcount_table_clusters=table_clusters)
        self.file.flush()
        self.adopt([0] * len(self.l1))


def _runs(clusters: Iterator[int]) -> Iterator[tuple[int, int]]:
    """(first, count) runs of consecutive numbers from an ascending sequence."""
    first = count = 0
    for c in clusters:
        if count and c == first + count:
            count += 1
            continue
        if count:
            yield first, count
        first, count = c, 1
    if count:
        yield first, count
