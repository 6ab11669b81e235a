"""``check -r all`` when the refcount structure itself is broken: a new refcount table and blocks
written from the refcounts the check computed, in free space, as QEMU's rebuild_refcount_structure
does (the old structure is leaked). A part of the checker (qcow2/check.py), kept apart for size.
"""
from __future__ import annotations

from array import array

from ..format import constants as C
from ..format.entries import pack_table
from ..format.refcount import encode_block
from .checkbase import CheckAbort, CheckResult, OnDiskRefcounts, write_fields


class RebuildRefcounts:
    """Mixed into the checker, whose state (file, header, cluster geometry, on-disk refcounts,
    overlap guard) these methods use."""

    def _alloc_imrt(self, table_rc: array, count: int, first_free: list[int]) -> int:
        cluster = first_free[0]
        contiguous = 0
        first_gap = True
        n = len(table_rc)
        while cluster < n and contiguous < count:
            if not table_rc[cluster]:
                contiguous += 1
                if first_gap:
                    first_free[0] = cluster
                    first_gap = False
            else:
                contiguous = 0
            cluster += 1
        if contiguous < count:
            need = cluster + count - contiguous
            if need > len(table_rc):
                table_rc.extend(array("Q", bytes(8 * (need - len(table_rc)))))
        cluster -= contiguous
        for i in range(count):
            table_rc[cluster + i] = 1
        return cluster << self.cbits

    def _write_refblocks(self, table_rc: array, first_cluster: int, end_cluster: int,
                         reftable: list[int]) -> bool:
        od = self.ondisk
        grown = False
        first_free = [0]
        cluster = first_cluster
        while cluster < end_cluster:
            if cluster >= len(table_rc) or not table_rc[cluster]:
                cluster += 1
                continue
            index = cluster >> od.per_block_bits
            start = index << od.per_block_bits
            if index < len(reftable) and reftable[index]:
                block_off = reftable[index]
            else:
                if first_free[0] < start:
                    first_free[0] = start
                block_off = self._alloc_imrt(table_rc, 1, first_free)
                if (block_off >> self.cbits) >= end_cluster:
                    end_cluster = (block_off >> self.cbits) + 1
                if len(reftable) <= index:
                    entries = (((index + 1) * 8 + self.cs - 1) // self.cs) * self.cs // 8
                    reftable.extend([0] * (entries - len(reftable)))
                    grown = True
                reftable[index] = block_off
            self._overlap_check(block_off, self.cs, "ERROR writing refblock")
            values = table_rc[start:start + od.per_block].tolist()
            values += [0] * (od.per_block - len(values))
            self.file.pwrite(encode_block(values, self.order, self.cs), block_off)
            cluster = start + od.per_block
        return grown

    def rebuild(self, res: CheckResult, table_rc: array) -> None:
        """Write a new refcount structure from ``table_rc`` (the old one is leaked, as in QEMU)."""
        self.ondisk.forget()
        self._layout = self._current_layout()
        reftable: list[int] = []
        changed = self._write_refblocks(table_rc, 0, len(table_rc), reftable)
        assert changed
        rt_offset = -1
        rt_clusters = 0
        while changed:
            rt_clusters = (len(reftable) * 8 + self.cs - 1) // self.cs
            rt_offset = self._alloc_imrt(table_rc, rt_clusters, [0])
            start = rt_offset >> self.cbits
            changed = self._write_refblocks(table_rc, start, start + rt_clusters, reftable)
        if rt_clusters * self.cs > C.MAX_REFTABLE_SIZE_BYTES:
            raise CheckAbort("File too large")
        self._overlap_check(rt_offset, len(reftable) * 8, "ERROR writing reftable")
        self.file.pwrite(pack_table(reftable), rt_offset)
        self.file.flush()
        self.h.refcount_table_offset = rt_offset
        self.h.refcount_table_clusters = rt_clusters
        write_fields(self.file, self.h, "refcount_table_offset", "refcount_table_clusters")
        self.file.flush()
        self.file_len = self.file.size()
        self.ondisk = OnDiskRefcounts(self.file, self.h, reftable)
