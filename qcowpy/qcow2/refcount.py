"""Reference counts and cluster allocation.

Allocation follows QEMU: scan upward from a hint for free clusters (past the end of the image
everything is free), then raise their refcounts. A missing refcount block is created in place,
describing itself when it falls in its own range (and, when the block that must count it is
missing too, after that block: an explicit stack, see :meth:`Refcounts._new_block`); a full
refcount table is replaced by a larger one placed past the end of the image together with the
blocks that describe it.
"""
from __future__ import annotations

from typing import Callable

from ..errors import CorruptImage, CorruptTable, QcowError, RefcountOverflow
from ..units import c_hex
from ..format import constants as C
from ..format.entries import pack_table, unpack_table
from ..format.refcount import (decode_block, entries_per_block, get_refcount, leading_free, max_refcount, set_refcount,
                               set_refcounts)
from ..hostfile import HostFile
from .cache import Table, TableCache
from .overlap import REFCOUNT_BLOCK, REFCOUNT_TABLE, write_metadata


class Refcounts:
    def __init__(self, file: HostFile, cluster_bits: int, refcount_order: int,
                 reftable_offset: int, reftable_clusters: int,
                 update_header: Callable[[int, int], None], cache_tables: int = 32):
        """``update_header(offset, clusters)`` records a moved refcount table in the header."""
        self.file = file
        self.cluster_bits = cluster_bits
        self.cluster_size = 1 << cluster_bits
        self.order = refcount_order
        self.max = max_refcount(refcount_order)
        self.per_block_bits = cluster_bits + 3 - refcount_order
        self.per_block = entries_per_block(cluster_bits, refcount_order)
        self.table_offset = reftable_offset
        self.table_clusters = reftable_clusters
        self._update_header = update_header
        size = reftable_clusters * self.cluster_size
        if size > C.MAX_REFTABLE_SIZE_BYTES:
            raise CorruptImage("Reference count table too large")
        self.table = unpack_table(file.pread(size, reftable_offset)) if size else []
        self.cache: TableCache[bytearray] = TableCache(file, self.cluster_size, cache_tables, bytearray, bytes,
                                                       REFCOUNT_BLOCK)
        self.free_cluster_index = 0
        self.free_byte_offset = 0  # where the next compressed cluster may start
        self.freed: list[int] | None = None  # clusters whose refcount fell to 0, while recording

    def reload(self, reftable_offset: int, reftable_clusters: int) -> None:
        """Start over from a refcount table written anew (the image was rebuilt under us)."""
        self.table_offset, self.table_clusters = reftable_offset, reftable_clusters
        self.table = unpack_table(self.file.pread(reftable_clusters * self.cluster_size, reftable_offset))
        self.cache.clear()
        self.free_cluster_index = 0
        self.free_byte_offset = 0

    # --- reading -------------------------------------------------------------------------
    def block(self, block_index: int) -> Table[bytearray] | None:
        """Refcount block ``block_index`` (cached), or None where the table has none."""
        if block_index >= len(self.table):
            return None
        off = self.table[block_index] & C.REFT_OFFSET_MASK
        if not off:
            return None
        if off & (self.cluster_size - 1):
            raise CorruptImage(f"Refblock offset {off:#x} unaligned (reftable index: {c_hex(block_index)})")
        if off > C.MAX_CLUSTER_OFFSET:
            raise CorruptImage(f"Refblock offset {off:#x} is invalid (reftable index: {c_hex(block_index)})")
        return self.cache.get(off)

    def get(self, cluster: int) -> int:
        block = self.block(cluster >> self.per_block_bits)
        if block is None:
            return 0
        return get_refcount(block.data, cluster & (self.per_block - 1), self.order)

    # --- changing ------------------------------------------------------------------------
    def change(self, cluster: int, delta: int) -> int:
        bi = cluster >> self.per_block_bits
        block = self.block(bi)
        if block is None:
            if delta < 0:
                raise CorruptImage(f"Refcount of cluster {cluster} would drop below zero")
            block = self._new_block(bi)
        idx = cluster & (self.per_block - 1)
        value = get_refcount(block.data, idx, self.order) + delta
        if value < 0:
            raise CorruptImage(f"Refcount of cluster {cluster} would drop below zero")
        if value > self.max:
            raise RefcountOverflow(f"Refcount of cluster {cluster} would exceed {self.max} (refcount_bits too small)")
        set_refcount(block, idx, self.order, value)  # type: ignore[arg-type]  # the table marks itself dirty
        if value == 0:
            if self.freed is not None:
                self.freed.append(cluster)
            if cluster < self.free_cluster_index:
                self.free_cluster_index = cluster
            if self.free_byte_offset and (self.free_byte_offset - 1) >> self.cluster_bits == cluster:
                self.free_byte_offset = 0  # never pack compressed data into a cluster we gave back
        return value

    def change_range(self, offset: int, length: int, delta: int) -> None:
        """All or nothing, like QEMU's update_refcount: a failure undoes the clusters done."""
        first = offset >> self.cluster_bits
        last = (offset + length - 1) >> self.cluster_bits
        for cluster in range(first, last + 1):
            try:
                self.change(cluster, delta)
            except QcowError:
                for done in range(first, cluster):
                    self.change(done, -delta)
                raise

    # --- allocation ----------------------------------------------------------------------
    def _free_run(self, start: int, n: int) -> int:
        """How many of the ``n`` clusters from ``start`` are free before the first used one,
        a refcount block at a time (clusters without a block are free)."""
        run = 0
        while run < n:
            c = start + run
            bi = c >> self.per_block_bits
            k = min(n - run, ((bi + 1) << self.per_block_bits) - c)
            block = self.block(bi)
            z = k if block is None else leading_free(block.data, c & (self.per_block - 1), k, self.order)
            run += z
            if z < k:
                break
        return run

    def _find_free(self, n: int) -> int:
        """First run of ``n`` free clusters at or after the hint (nothing is marked yet)."""
        start = self.free_cluster_index
        while True:
            run = self._free_run(start, n)
            if run == n:
                self.free_cluster_index = start + n
                return start
            start += run + 1

    def alloc_clusters(self, n: int = 1) -> int:
        """Allocate ``n`` contiguous clusters and return the host offset of the first."""
        while True:
            start = self._find_free(n)
            done = self._take_run(start, n)
            if done == n:
                return start << self.cluster_bits
            # Creating refcount blocks took clusters inside the run; give ours back, retry past them.
            for j in range(done):
                self.change(start + j, -1)

    def _take_run(self, start: int, n: int) -> int:
        """Raise the refcounts of free clusters ``start..start+n-1`` to 1, a block's worth at a
        time; returns how many it took (fewer when one turned out to be in use)."""
        done = 0
        while done < n:
            c = start + done
            bi = c >> self.per_block_bits
            block = self.block(bi)
            if block is None:  # creating the block may take a cluster of the run: one at a time
                if self.get(c):
                    return done
                self.change(c, 1)
                done += 1
                continue
            idx = c & (self.per_block - 1)
            k = min(n - done, self.per_block - idx)
            if leading_free(block.data, idx, k, self.order) < k:
                return done
            set_refcounts(block, idx, k, self.order, 1)  # type: ignore[arg-type]
            done += k
        return done

    def alloc_bytes(self, size: int) -> int:
        """Allocate ``size`` bytes for compressed data, packing byte-contiguously like QEMU.

        Every host cluster the bytes touch gains one reference.
        """
        cs = self.cluster_size
        off = self.free_byte_offset
        if off and off % cs and self.get(off >> self.cluster_bits) < self.max:
            start = off
            end = start + size
            first_new = (start >> self.cluster_bits) + 1
            needed = ((end - 1) >> self.cluster_bits) + 1 - first_new
            if needed > 0:
                # The continuation must be the very next clusters; otherwise start afresh.
                if all(self.get(first_new + i) == 0 for i in range(needed)):
                    if first_new <= self.free_cluster_index < first_new + needed:
                        self.free_cluster_index = first_new + needed
                else:
                    start = -1
            if start >= 0:
                self.change_range(start, size, 1)
                self.free_byte_offset = end
                return start
        start = self._find_free((size + cs - 1) // cs) << self.cluster_bits
        self.change_range(start, size, 1)
        self.free_byte_offset = start + size
        return start

    def free(self, offset: int, length: int) -> None:
        self.change_range(offset, length, -1)

    def try_free(self, offset: int, length: int) -> str | None:
        """Free a range the way QEMU's ``qcow2_free_clusters`` does for ranges it cannot vouch
        for: all or nothing. A cluster without a refcount block gets one created first and the
        call fails with EAGAIN's message (the block stays); a refcount already 0 fails with
        EINVAL's. Returns None when freed, else the strerror text QEMU prints."""
        first = offset >> self.cluster_bits
        last = (offset + length - 1) >> self.cluster_bits
        for cluster in range(first, last + 1):
            bi = cluster >> self.per_block_bits
            if self.block(bi) is None:
                self._new_block(bi)
                return "Resource temporarily unavailable"
            if self.get(cluster) == 0:
                return "Invalid argument"
        self.change_range(offset, length, -1)
        return None

    # --- refcount blocks and table -------------------------------------------------------
    def _new_block(self, block_index: int) -> Table[bytearray]:
        """Create refcount block ``block_index`` as QEMU's alloc_refcount_block lays it out.

        Its cluster is the first free one. It counts itself when that cluster lies in its own
        range; otherwise the block covering the cluster counts it. When that block is missing
        too, the answer is "that block first": it is created the same way (its cluster chosen
        after ours) before this one is placed. An explicit stack of waiting blocks replaces the
        recursion through change() — the clusters chosen and the bytes written are the same.
        """
        waiting: list[tuple[int, int]] = []  # (block index, the cluster chosen for it)
        bi = block_index
        while True:
            if bi >= len(self.table):
                self._grow_table(bi)
            block = self.block(bi)
            if block is None:
                start = self._find_free(1)
                owner = start >> self.per_block_bits
                if owner != bi and self.block(owner) is None:
                    waiting.append((bi, start))
                    bi = owner
                    continue
                block = self._place_block(bi, start)
            if not waiting:
                return block
            bi, start = waiting.pop()
            if self.block(bi) is not None:  # created meanwhile (its cluster was never taken)
                self.free_cluster_index = min(self.free_cluster_index, start)
                continue
            self._place_block(bi, start)

    def _place_block(self, block_index: int, cluster: int) -> Table[bytearray]:
        """Write a new, empty refcount block at ``cluster`` and enter it in the table. The
        block covering ``cluster`` (itself, or one that exists) counts it."""
        first = block_index << self.per_block_bits
        block = bytearray(self.cluster_size)
        if first <= cluster < first + self.per_block:
            set_refcount(block, cluster - first, self.order, 1)  # the block describes itself
        else:
            self.change(cluster, 1)
        offset = cluster << self.cluster_bits
        # The new block, and the refcount of its cluster, reach the disk before the table entry.
        self.cache.flush()
        self.file.pwrite(block, offset)
        self.file.flush()
        self.table[block_index] = offset
        self._write_table_entry(block_index)
        self.file.flush()
        return self.cache.get(offset)

    def _write_table_entry(self, index: int) -> None:
        write_metadata(self.file, REFCOUNT_TABLE, self.table[index].to_bytes(8, "big"),
                       self.table_offset + index * 8)

    def drop_unused_blocks(self, signal: Callable[[str], Exception]) -> None:
        """QEMU's ``qcow2_shrink_reftable``: refcount blocks that count nothing but (maybe)
        themselves leave the table (rewritten whole) and their clusters are freed.

        Damage met on the way is a fatal corruption, as in QEMU: ``signal(event)`` marks the
        image and returns the error to raise (an unaligned block before the table is written;
        a dropped block no remaining block counts, or counts other than once, after)."""
        self.flush()
        keep = []
        for i, entry in enumerate(self.table):
            off = entry & C.REFT_OFFSET_MASK
            if not off:
                keep.append(0)
                continue
            if off & (self.cluster_size - 1):
                raise signal(f"Cannot get entry from refcount block cache: Offset {off:#x} is unaligned")
            block = bytearray(self.cache.get(off).data)
            own = off >> self.cluster_bits
            if own >> self.per_block_bits == i:  # it counts itself: ignore that one entry
                set_refcount(block, own & (self.per_block - 1), self.order, 0)
            keep.append(0 if not block.strip(b"\0") else entry)
        if keep == self.table:
            return
        write_metadata(self.file, REFCOUNT_TABLE, pack_table(keep), self.table_offset)
        self.file.flush()
        for i, entry in enumerate(self.table):
            if entry and not keep[i]:
                off = entry & C.REFT_OFFSET_MASK
                self._discard_block(off, signal)
                self.table[i] = 0
        self.flush()

    def _discard_block(self, off: int, signal: Callable[[str], Exception]) -> None:
        """Free the dropped refcount block at ``off`` in the block that counts it."""
        cluster = off >> self.cluster_bits
        index = cluster >> self.per_block_bits
        covering = self.table[index] & C.REFT_OFFSET_MASK if index < len(self.table) else 0
        if not covering:
            raise signal(f"Refblock at {off:#x} is not covered by the refcount structures")
        count = self.get(cluster)
        if count != 1:  # QEMU fails this one with EINVAL, not EIO
            event = str(signal(f"Invalid refcount: refblock offset {covering:#x}, reftable index {index}, "
                               f"block offset {off:#x}, refcount {c_hex(count)}"))
            raise CorruptTable(event, CorruptTable.EINVAL)
        self.change(cluster, -1)
        self.cache.discard(off)

    def last_cluster(self, file_size: int) -> int:
        """The highest cluster below ``file_size`` with a nonzero refcount (QEMU's
        ``qcow2_get_last_cluster``); -1 if there is none."""
        for cluster in range((file_size + self.cluster_size - 1) // self.cluster_size - 1, -1, -1):
            block = self.block(cluster >> self.per_block_bits)
            if block is None:
                continue
            if get_refcount(block.data, cluster & (self.per_block - 1), self.order):
                return cluster
        return -1

    def count_used(self, end_cluster: int, limit: int) -> int:
        """How many of the clusters below ``end_cluster`` have a nonzero refcount, counting no
        further than ``limit`` (QEMU's metadata-preallocation heuristic stops there too)."""
        count = 0
        for bi in range((end_cluster + self.per_block - 1) >> self.per_block_bits):
            if count >= limit:
                break
            block = self.block(bi)
            if block is not None:
                n = min(self.per_block, end_cluster - (bi << self.per_block_bits))
                count += sum(1 for r in decode_block(block.data, self.order, n) if r)
        return min(count, limit)

    def image_end_cluster(self) -> int:
        """One past the highest cluster with a nonzero refcount (scans the blocks)."""
        for bi in range(len(self.table) - 1, -1, -1):
            block = self.block(bi)
            if block is None:
                continue
            for i in range(self.per_block - 1, -1, -1):
                if get_refcount(block.data, i, self.order):
                    return (bi << self.per_block_bits) + i + 1
        return 0

    def _grow_table(self, needed_index: int) -> None:
        """Move the refcount table to a larger area past the image end, with blocks for it."""
        cs = self.cluster_size
        old_len = len(self.table)
        # Start where only new blocks describe the area, so no existing block needs an update.
        end = max(self.image_end_cluster(), (self.file.size() + cs - 1) // cs, self.free_cluster_index,
                  old_len << self.per_block_bits)
        new_len = max(needed_index + 1, old_len + old_len // 2, 1)
        while True:
            table_clusters = (new_len * 8 + cs - 1) // cs
            new_len = table_clusters * cs // 8
            # New blocks cover every block index from old_len up to the area's last cluster.
            n_blocks = 0
            while True:
                area_end = end + n_blocks + table_clusters
                need = max(0, ((area_end - 1) >> self.per_block_bits) + 1 - old_len)
                if need <= n_blocks:
                    break
                n_blocks = need
            if old_len + n_blocks <= new_len:
                break
            new_len = old_len + n_blocks + 1
        if table_clusters * cs > C.MAX_REFTABLE_SIZE_BYTES:
            raise QcowError("Image would need a refcount table larger than QEMU allows")
        blocks_start = end
        table_start = end + n_blocks
        new_table = self.table + [0] * (new_len - old_len)
        for k in range(n_blocks):
            bi = old_len + k
            block = bytearray(cs)
            first = bi << self.per_block_bits
            for c in range(blocks_start, table_start + table_clusters):
                if first <= c < first + self.per_block:
                    set_refcount(block, c - first, self.order, 1)
            off = (blocks_start + k) << self.cluster_bits
            new_table[bi] = off
            self.file.pwrite(block, off)
        self.file.pwrite(pack_table(new_table), table_start << self.cluster_bits)
        self.file.flush()
        old_offset, old_clusters = self.table_offset, self.table_clusters
        self.table = new_table
        self.table_offset = table_start << self.cluster_bits
        self.table_clusters = table_clusters
        self._update_header(self.table_offset, table_clusters)
        self.file.flush()
        self.free_cluster_index = min(self.free_cluster_index, blocks_start)
        if old_clusters:
            self.free(old_offset, old_clusters * cs)

    def flush(self) -> None:
        self.cache.flush()
