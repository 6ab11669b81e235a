"""The write strategy for images with extended L2 entries (32 subclusters per cluster).

Kept apart from the standard-entry paths in image.py because the unit of allocation state is the
subcluster: a write allocates the host cluster but marks only the subclusters it touched, and
copy-on-write works on the partial subclusters at its edges, as QEMU does.
"""
from __future__ import annotations

from ..format import constants as C
from ..format.entries import l2_offset

ALL_ALLOC = C.L2_BITMAP_ALL_ALLOC
ALL_ZEROES = C.L2_BITMAP_ALL_ZEROES


def _mask(s0: int, s1: int) -> int:
    """Bitmap bits for subclusters [s0, s1)."""
    return ((1 << s1) - 1) ^ ((1 << s0) - 1)


class ExtendedL2Writes:
    """The write strategy of an image with extended L2 entries; the image hands it writes,
    zero writes and cluster discards, and it works on the image's metadata owner."""

    def __init__(self, image):
        self.image = image
        self.meta = image.meta
        self.cluster_size = image.cluster_size
        self.subcluster_size = self.cluster_size // C.SUBCLUSTERS_PER_CLUSTER

    def pwrite(self, mv: memoryview, offset: int) -> None:
        cs = self.cluster_size
        pos, end = offset, offset + len(mv)
        while pos < end:
            n = min(end, (pos & ~(cs - 1)) + cs) - pos
            self._write_cluster(mv[pos - offset:pos - offset + n], pos)
            pos += n

    def _write_cluster(self, data: memoryview | bytes, pos: int) -> None:
        cs, sc = self.cluster_size, self.subcluster_size
        meta = self.meta
        cstart = pos & ~(cs - 1)
        end = pos + len(data)
        s0 = (pos - cstart) // sc
        s1 = (end - cstart + sc - 1) // sc
        buf = bytearray((s1 - s0) * sc)
        if pos > cstart + s0 * sc or end < cstart + s1 * sc:
            # partial subclusters at the edges keep their current contents (COW from backing)
            buf[:] = self.image.read_cluster(cstart)[s0 * sc:s1 * sc]
        buf[pos - cstart - s0 * sc:end - cstart - s0 * sc] = data
        entry, bitmap = meta.l2_entry(cstart)
        compressed = bool(entry & C.OFLAG_COMPRESSED)
        host = 0 if compressed else l2_offset(entry)
        alloc = _mask(s0, s1)
        new_bitmap = (bitmap | alloc) & ~(alloc << 32)
        write = self.image.write_data
        if host and entry & C.OFLAG_COPIED:
            write(buf, host + s0 * sc, cstart + s0 * sc)
            meta.set_l2_entry(cstart, entry, new_bitmap)
            return
        new_host = self.image.alloc_data(cstart, 1)  # with a data file: the guest offset itself
        if compressed or host:
            # the whole cluster moves: a compressed one becomes fully allocated, a shared one is copied
            full = bytearray(cs)
            if compressed:
                full[:] = self.image.read_cluster(cstart)
            else:
                self.image.read_data(memoryview(full), host, cstart)
            full[s0 * sc:s1 * sc] = buf
            write(full, new_host, cstart)
            if compressed:
                new_bitmap = ALL_ALLOC
        else:
            write(buf, new_host + s0 * sc, cstart + s0 * sc)  # only these subclusters: the file may end here, as QEMU's does
        old = meta.set_l2_entry(cstart, new_host | C.OFLAG_COPIED, new_bitmap)
        meta.free_entry_later(old[0])

    def write_zeroes(self, length: int, offset: int, unmap: bool) -> None:
        cs, sc = self.cluster_size, self.subcluster_size
        pos, end = offset, offset + length
        while pos < end:
            cstart = pos & ~(cs - 1)
            cend = min(cstart + cs, self.image.size)
            n = min(end, cend) - pos
            s0 = (pos - cstart + sc - 1) // sc
            s1 = 32 if pos + n == cend else (pos + n - cstart) // sc
            head_end = min(pos + n, cstart + s0 * sc)
            tail_start = max(head_end, cstart + s1 * sc) if s1 > s0 else head_end
            for a, b in ((pos, head_end), (tail_start, pos + n)):
                if b > a and not self.image.reads_zero(a, b):
                    self._write_cluster(bytes(b - a), a)
            if s1 > s0:
                self._zero_subclusters(cstart, s0, s1, unmap)
            pos += n

    def _zero_subclusters(self, cstart: int, s0: int, s1: int, unmap: bool) -> None:
        meta = self.meta
        entry, bitmap = meta.l2_entry(cstart)
        owned = bool(entry & C.OFLAG_COPIED) and not entry & C.OFLAG_COMPRESSED and l2_offset(entry)
        if (s0, s1) == (0, 32) and (unmap or not owned):
            old = meta.set_l2_entry(cstart, 0, ALL_ZEROES)
            meta.free_entry_later(old[0])
            return
        if not owned and l2_offset(entry) | (entry & C.OFLAG_COMPRESSED):
            # a shared or compressed cluster: give this image its own copy first
            sc = self.subcluster_size
            self._write_cluster(bytes((s1 - s0) * sc), cstart + s0 * sc)
            entry, bitmap = meta.l2_entry(cstart)
        zero = _mask(s0, s1)
        meta.set_l2_entry(cstart, entry, (bitmap | (zero << 32)) & ~zero)

    def discard_cluster(self, cstart: int) -> None:
        meta = self.meta
        entry, bitmap = meta.l2_entry(cstart)
        allocated = bool(l2_offset(entry) or entry & C.OFLAG_COMPRESSED)
        if self.image.backing is None and not allocated:
            return
        old = meta.set_l2_entry(cstart, 0, ALL_ZEROES)
        meta.free_entry_later(old[0])
