"""Atomic snapshot operations: every metadata change of a snapshot create, apply or delete takes
effect at one single-sector header write.

Why: ``qemu-img check`` requires, for every cluster the active tables reach, that OFLAG_COPIED
is set exactly when the refcount is 1. A snapshot operation changes refcounts (in refcount
blocks) and COPIED flags (in L2 tables) of many clusters; done in place, as QEMU 7.2 does, a
crash between the two writes leaves COPIED errors (corruption), which QEMU does after about a
quarter of the kill points. Here nothing the current header reaches is changed in place:

1. The new state is computed in memory: refcount deltas from walking the L1 tables that gain or
   lose a reference (as QEMU's update_snapshot_refcount counts them), the snapshot table, and an
   active L1 table whose L2 tables carry the right COPIED flags. An L2 table the active image
   reaches now and whose flags must change is copied to a new cluster; one it does not reach
   (a snapshot's) is corrected in place, since no check looks at its flags.
2. Every new structure (L1 tables, L2 copies, snapshot table) goes to clusters allocated the
   ordinary way (a crash leaves leaks), then the refcount blocks that change are copied, with
   the deltas applied, to new clusters under a new refcount table.
3. After a barrier, one write of header bytes 36..71 switches the L1 table, the refcount table
   and the snapshot table together; after another barrier the superseded structures are freed
   in the new refcount structure (a crash there leaks, never corrupts).

The result reads the same as QEMU's in every snapshot and in the active image, and passes
``qemu-img check`` with no leaks; its layout differs from QEMU's (the active L1, the refcount
structure and the copied L2 tables move), which docs/cli.md lists as a deliberate difference.
"""
from __future__ import annotations

from collections import defaultdict

from ..errors import CorruptImage, CorruptTable, RefcountOverflow
from ..units import c_hex
from ..format import constants as C
from ..format.entries import compressed_host_clusters, pack_table, unpack_table
from ..format.refcount import set_refcount


class SnapshotTransaction:
    """One snapshot operation's new metadata, built beside the old and switched in at once."""

    def __init__(self, img):
        self.img = img
        self.meta = img.meta
        self.rc = img.meta.refcounts
        self.cs = img.cluster_size
        self.cbits = img.cluster_bits
        self.deltas: dict[int, int] = defaultdict(int)  # cluster -> refcount change
        self.reached = {e & C.L1E_OFFSET_MASK for e in self.meta.l1 if e & C.L1E_OFFSET_MASK}

    # ------------------------------------------------------------------ phase 1: refcount deltas
    def walk(self, l1: list[int], addend: int) -> None:
        """Count one reference more (or less) to every L2 table and cluster ``l1`` reaches."""
        step = self.meta.entry_words
        for i, e in enumerate(l1):
            l2_off = e & C.L1E_OFFSET_MASK
            if not l2_off:
                continue
            if l2_off & (self.cs - 1):
                raise CorruptImage(f"L2 table offset {l2_off:#x} unaligned (L1 index: {c_hex(i)})")
            self.deltas[l2_off >> self.cbits] += addend
            table = self._table(l2_off)
            for j in range(0, len(table), step):
                entry = table[j]
                if entry & C.OFLAG_COMPRESSED:
                    for c in compressed_host_clusters(entry, self.cbits):
                        self.deltas[c] += addend
                    continue
                host = entry & C.L2E_OFFSET_MASK
                if host:
                    if host & (self.cs - 1):
                        raise CorruptImage(f"Cluster allocation offset {host:#x} unaligned (L2 offset: "
                                           f"{l2_off:#x}, L2 index: {c_hex(j // step)})")
                    self.deltas[host >> self.cbits] += addend

    def release(self, offset: int, length: int) -> None:
        """Drop this image's reference to whole clusters [offset, offset+length) in the new state."""
        if length:
            for c in range(offset >> self.cbits, ((offset + length - 1) >> self.cbits) + 1):
                self.deltas[c] -= 1

    def final_refcount(self, cluster: int) -> int:
        return self.rc.get(cluster) + self.deltas.get(cluster, 0)

    def validate(self) -> None:
        """Every changed refcount stays within 0..max and has a refcount block (before anything
        is written). A cluster gaining a reference with no block to count it is one a damaged
        table names past the image: QEMU fails there too, with EFBIG when the refcount table
        would pass its limit and EAGAIN when it added the block (its callers do not retry)."""
        for c, d in self.deltas.items():
            if not d:
                continue
            if d > 0:
                self._require_block(c >> self.rc.per_block_bits)
            value = self.rc.get(c) + d
            if value < 0:
                raise CorruptImage(f"Refcount of cluster {c} would drop below zero")
            if value > self.rc.max:
                raise RefcountOverflow(f"Refcount of cluster {c} would exceed {self.rc.max} "
                                       "(refcount_bits too small)")

    def _require_block(self, bi: int) -> None:
        if bi < len(self.rc.table) and self.rc.table[bi] & C.REFT_OFFSET_MASK:
            return
        # QEMU compares the block count with the table's byte limit (qcow2_refcount_area)
        errno_ = CorruptTable.EFBIG if bi + 1 > C.MAX_REFTABLE_SIZE_BYTES else CorruptTable.EAGAIN
        raise CorruptTable(f"Refcount block {bi} is missing for clusters in use", errno_)

    # ------------------------------------------------------------------ phase 2: new structures
    def _table(self, l2_off: int) -> list[int]:
        return unpack_table(self.img.file.pread(self.cs, l2_off))

    def write_new(self, data: bytes) -> int:
        """``data`` in newly allocated clusters (counted in the old structure: a crash leaks them)."""
        if not data:
            return 0
        offset = self.rc.alloc_clusters(self.meta.clusters_for(len(data)))
        self.img.file.pwrite(data, offset)
        return offset

    def active_l1(self, pointers: list[int]) -> list[int]:
        """The active L1 entries for L2 tables ``pointers`` (offsets, 0 for none), each table
        with the COPIED flags the new refcounts call for (copied first when the active image
        reaches it now), and each entry's own flag set where its table's refcount is then 1."""
        step = self.meta.entry_words
        moved: dict[int, int] = {}
        for l2_off in dict.fromkeys(p for p in pointers if p):
            table = self._table(l2_off)
            fixed = list(table)
            for j in range(0, len(fixed), step):
                e = fixed[j] & ~C.OFLAG_COPIED
                host = e & C.L2E_OFFSET_MASK
                if host and not e & C.OFLAG_COMPRESSED and self.final_refcount(host >> self.cbits) == 1:
                    e |= C.OFLAG_COPIED
                fixed[j] = e
            if fixed == table:
                continue
            if l2_off in self.reached:  # reached now: the new flags go to a copy
                moved[l2_off] = self.write_new(pack_table(fixed))
                self.deltas[l2_off >> self.cbits] -= 1
            else:  # a snapshot's table: nothing checks its flags until the switch
                self.meta.l2cache.discard(l2_off)
                self.img.file.pwrite(pack_table(fixed), l2_off)
        out = []
        for p in pointers:
            p = moved.get(p, p)
            out.append(p | (C.OFLAG_COPIED if p and self.final_refcount(p >> self.cbits) == 1 else 0))
        return out

    # ------------------------------------------------------------------ phase 3: the switch
    def commit(self, l1: list[int], nb_snapshots: int, snapshots_offset: int) -> None:
        """Write the new refcount structure and the new active L1, then switch the header."""
        meta, rc, file = self.meta, self.rc, self.img.file
        old_l1 = (self.img.header.l1_table_offset, len(meta.l1) * 8)
        l1_off = self.write_new(pack_table(l1)) if l1 else self.img.header.l1_table_offset
        self.release(*old_l1)
        touched = sorted({c >> rc.per_block_bits for c, d in self.deltas.items() if d})
        copies = {bi: rc.alloc_clusters(1) for bi in touched}
        table_clusters = rc.table_clusters
        table_off = rc.alloc_clusters(table_clusters)
        while rc.table_clusters != table_clusters:  # the allocations outgrew the table: again
            rc.free(table_off, table_clusters * self.cs)
            table_clusters = rc.table_clusters
            table_off = rc.alloc_clusters(table_clusters)
        meta.sync()
        self.validate()
        freed = []
        new_table = list(rc.table)
        for bi, off in copies.items():
            block = rc.block(bi)
            if block is None:
                raise CorruptImage(f"Refcount block {bi} is missing for clusters in use")
            data = bytearray(block.data)
            first = bi << rc.per_block_bits
            for c in range(first, first + rc.per_block):
                d = self.deltas.get(c)
                if d:
                    value = rc.get(c) + d
                    set_refcount(data, c - first, rc.order, value)
                    if not value:
                        freed.append(c)
            file.pwrite(data, off)
            new_table[bi] = off
        file.pwrite(pack_table(new_table) + bytes(table_clusters * self.cs - 8 * len(new_table)), table_off)
        old_blocks = [rc.table[bi] & C.REFT_OFFSET_MASK for bi in touched]
        old_table = (rc.table_offset, rc.table_clusters * self.cs)
        file.flush()
        meta.update_header(l1_size=len(l1), l1_table_offset=l1_off, refcount_table_offset=table_off,
                           refcount_table_clusters=table_clusters, nb_snapshots=nb_snapshots,
                           snapshots_offset=snapshots_offset)
        file.flush()
        meta.adopt(l1)
        with meta.punching_freed():
            meta.refcounts.freed.extend(freed)
            for off in old_blocks:
                if off:
                    meta.refcounts.free(off, self.cs)
            meta.refcounts.free(*old_table)
