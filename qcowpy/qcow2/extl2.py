"""Write paths for images with extended L2 entries (32 subclusters per cluster).

Kept apart from the standard-entry paths in image.py because the unit of allocation state is the
subcluster: a write allocates the host cluster but marks only the subclusters it touched, and
copy-on-write works on the partial subclusters at its edges, as QEMU does.
"""
from __future__ import annotations

from ..format import constants as C
from ..format.entries import l2_offset

ALL_ALLOC = (1 << 32) - 1
ALL_ZEROES = ALL_ALLOC << 32


def _mask(s0: int, s1: int) -> int:
    """Bitmap bits for subclusters [s0, s1)."""
    return ((1 << s1) - 1) ^ ((1 << s0) - 1)


class ExtendedL2Writes:
    """Mixin for Qcow2Image; relies on its mapping, allocation and table helpers."""

    def _l2_pair(self, cstart: int) -> tuple[int, int]:
        got = self._l2_table(cstart >> (self.cluster_bits + self.l2_bits))
        if not got:
            return 0, 0
        i = ((cstart >> self.cluster_bits) & (self.l2_entries - 1)) * 2
        return got[1][i], got[1][i + 1]

    def _set_l2_pair(self, cstart: int, entry: int, bitmap: int) -> tuple[int, int]:
        l1_index = cstart >> (self.cluster_bits + self.l2_bits)
        table = self._writable_l2(l1_index)
        i = ((cstart >> self.cluster_bits) & (self.l2_entries - 1)) * 2
        old = (table[i], table[i + 1])
        if old != (entry, bitmap):
            table[i], table[i + 1] = entry, bitmap
            self.l2cache.mark_dirty(self.l1[l1_index] & C.L1E_OFFSET_MASK)
        return old

    def _ext_pwrite(self, mv: memoryview, offset: int) -> None:
        cs = self.cluster_size
        pos, end = offset, offset + len(mv)
        while pos < end:
            n = min(end, (pos & ~(cs - 1)) + cs) - pos
            self._ext_write_cluster(mv[pos - offset:pos - offset + n], pos)
            pos += n

    def _ext_write_cluster(self, data: memoryview | bytes, pos: int) -> None:
        cs, sc = self.cluster_size, self.subcluster_size
        cstart = pos & ~(cs - 1)
        end = pos + len(data)
        s0 = (pos - cstart) // sc
        s1 = (end - cstart + sc - 1) // sc
        buf = bytearray((s1 - s0) * sc)
        if pos > cstart + s0 * sc or end < cstart + s1 * sc:
            # partial subclusters at the edges keep their current contents (COW from backing)
            buf[:] = self._read_cluster_here(cstart)[s0 * sc:s1 * sc]
        buf[pos - cstart - s0 * sc:end - cstart - s0 * sc] = data
        entry, bitmap = self._l2_pair(cstart)
        compressed = bool(entry & C.OFLAG_COMPRESSED)
        host = 0 if compressed else l2_offset(entry)
        alloc = _mask(s0, s1)
        new_bitmap = (bitmap | alloc) & ~(alloc << 32)
        if host and entry & C.OFLAG_COPIED:
            self.file.pwrite(buf, host + s0 * sc)
            self._set_l2_pair(cstart, entry, new_bitmap)
            return
        new_host = self.refcounts.alloc_clusters(1)
        if compressed or host:
            # the whole cluster moves: a compressed one becomes fully allocated, a shared one is copied
            full = bytearray(self._read_cluster_here(cstart) if compressed else self.file.pread(cs, host))
            full[s0 * sc:s1 * sc] = buf
            self.file.pwrite(full, new_host)
            if compressed:
                new_bitmap = ALL_ALLOC
        else:
            self.file.pwrite(buf, new_host + s0 * sc)  # only these subclusters: the file may end here, as QEMU's does
        old = self._set_l2_pair(cstart, new_host | C.OFLAG_COPIED, new_bitmap)
        self._free_entry_later(old[0])

    def _ext_write_zeroes(self, length: int, offset: int, unmap: bool) -> None:
        cs, sc = self.cluster_size, self.subcluster_size
        pos, end = offset, offset + length
        while pos < end:
            cstart = pos & ~(cs - 1)
            cend = min(cstart + cs, self.size)
            n = min(end, cend) - pos
            s0 = (pos - cstart + sc - 1) // sc
            s1 = 32 if pos + n == cend else (pos + n - cstart) // sc
            head_end = min(pos + n, cstart + s0 * sc)
            tail_start = max(head_end, cstart + s1 * sc) if s1 > s0 else head_end
            for a, b in ((pos, head_end), (tail_start, pos + n)):
                if b > a and not self._reads_zero(a, b):
                    self._ext_write_cluster(bytes(b - a), a)
            if s1 > s0:
                self._ext_zero_subclusters(cstart, s0, s1, unmap)
            pos += n

    def _ext_zero_subclusters(self, cstart: int, s0: int, s1: int, unmap: bool) -> None:
        entry, bitmap = self._l2_pair(cstart)
        owned = bool(entry & C.OFLAG_COPIED) and not entry & C.OFLAG_COMPRESSED and l2_offset(entry)
        if (s0, s1) == (0, 32) and (unmap or not owned):
            old = self._set_l2_pair(cstart, 0, ALL_ZEROES)
            self._free_entry_later(old[0])
            return
        if not owned and l2_offset(entry) | (entry & C.OFLAG_COMPRESSED):
            # a shared or compressed cluster: give this image its own copy first
            sc = self.subcluster_size
            self._ext_write_cluster(bytes((s1 - s0) * sc), cstart + s0 * sc)
            entry, bitmap = self._l2_pair(cstart)
        zero = _mask(s0, s1)
        self._set_l2_pair(cstart, entry, (bitmap | (zero << 32)) & ~zero)

    def _ext_discard_cluster(self, cstart: int) -> None:
        entry, bitmap = self._l2_pair(cstart)
        allocated = bool(l2_offset(entry) or entry & C.OFLAG_COMPRESSED)
        if self.backing is None and not allocated:
            return
        old = self._set_l2_pair(cstart, 0, ALL_ZEROES)
        self._free_entry_later(old[0])
