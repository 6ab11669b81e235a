"""The qcow2 engine: open an image, map guest ranges, read, write, zero, discard, flush.

One ``Qcow2Image`` owns one host file. Backing files are not opened here: the block layer
hands in any object with ``pread(length, offset)`` and ``size`` (see qcowpy.block).
"""
from __future__ import annotations

import struct
import threading
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Iterator, Protocol

from ..errors import CorruptImage, InvalidArgument, QcowError, ReadOnlyError, UnsupportedFeature
from ..format import constants as C
from ..format.entries import (ClusterType, compressed_descriptor, l1_offset, l2_offset, l2_reserved,
                              make_compressed_entry, pack_table, subcluster_type, unpack_table)
from ..format.entries import cluster_type as std_cluster_type
from ..format.header import Header, pack_header, parse_header, unknown_incompatible_message
from ..hostfile import HostFile, punch_hole, zero_fill
from ..kernels import l2_runs
from . import codec
from .cache import TableCache
from .extl2 import ExtendedL2Writes
from .refcount import Refcounts
from ..format.bitmaps import directory_location as bitmap_directory
from .overlap import ACTIVE_L1, MAIN_HEADER, write_metadata

# Layer-level extent kinds
UNALLOCATED = "unallocated"  # defer to the backing file
ZERO = "zero"
DATA = "data"
COMPRESSED = "compressed"


class Backing(Protocol):
    size: int

    def pread(self, length: int, offset: int) -> bytes: ...

    def preadinto(self, buf: memoryview, offset: int) -> None: ...


@dataclass(frozen=True)
class LayerExtent:
    """A run of guest bytes with one status in this image alone (not the chain)."""

    kind: str
    start: int
    length: int
    host_offset: int | None = None  # contiguous host bytes for DATA and preallocated ZERO


class Qcow2Image(ExtendedL2Writes):
    """A qcow2 image file. Thread-safe: every public method holds the image lock."""

    def __init__(self, file: HostFile, header: Header, writable: bool, l2_cache_tables: int | None = None,
                 check_mode: bool = False):
        # check_mode: open as qemu-img check does, leaving the snapshot table to the check itself
        self._check_mode = check_mode
        self.file = file
        self.header = header
        self.writable = writable
        self.lock = threading.RLock()
        self.backing: Backing | None = None
        self.cluster_bits = header.cluster_bits
        self.cluster_size = 1 << self.cluster_bits
        self.extended = header.extended_l2
        self.entry_words = 2 if self.extended else 1
        self.l2_entries = self.cluster_size // (8 * self.entry_words)
        self.l2_bits = self.l2_entries.bit_length() - 1
        self.subcluster_size = self.cluster_size // C.SUBCLUSTERS_PER_CLUSTER if self.extended else self.cluster_size
        self.size = header.size
        self._closed = False
        self._pending_frees: list[tuple[int, int]] = []
        self._compressed_cache: tuple[int, bytes] | None = None
        self._validate_tables()
        l1_bytes = header.l1_size * 8
        self.l1 = unpack_table(file.pread(l1_bytes, header.l1_table_offset)) if l1_bytes else []
        self.refcounts = Refcounts(file, self.cluster_bits, header.refcount_order,
                                   header.refcount_table_offset, header.refcount_table_clusters,
                                   self._write_reftable_location, _cache_tables(self.cluster_size) // 2)
        if l2_cache_tables is None:
            l2_cache_tables = _cache_tables(self.cluster_size)
        self.l2cache: TableCache[list[int]] = TableCache(file, self.cluster_size, l2_cache_tables,
                                                         unpack_table, pack_table)
        self.l2cache.depends_on = self.refcounts.cache
        self.refcounts.free_cluster_index = 0
        from .overlap import install as _install_overlap_guard
        self.overlap_guard = _install_overlap_guard(self)  # metadata overlap checks (qcow2/overlap.py)

    # ------------------------------------------------------------------ opening / closing
    @classmethod
    def open(cls, path: str, writable: bool = False, cache: str = "writeback",
             force_share: bool = False) -> "Qcow2Image":
        file = HostFile(path, writable=writable, cache=cache, force_share=force_share)
        try:
            head = file.pread(min(file.size(), 1 << C.MAX_CLUSTER_BITS), 0)
            header = parse_header(head, file.size())
            if writable and header.incompatible_features & C.INCOMPAT_DIRTY and \
                    not header.incompatible_features & C.INCOMPAT_CORRUPT:
                cls(file, header, False)  # validate before repairing, as any open does
                from .check import repair_dirty
                repair_dirty(file, header)  # QEMU repairs a dirty image opened read-write
            img = cls(file, header, writable)
            if writable:
                img._open_read_write()
            return img
        except BaseException:
            file.close()
            raise

    def _validate_tables(self) -> None:
        h = self.header
        fsize = self.file.size()
        if h.crypt_method:
            raise UnsupportedFeature("Encrypted qcow2 images are not supported")
        msg = unknown_incompatible_message(h)
        if msg:
            raise UnsupportedFeature(msg)
        if h.incompatible_features & C.INCOMPAT_DATA_FILE:
            raise UnsupportedFeature("qcow2 images with an external data file are not supported")
        if h.refcount_table_clusters * self.cluster_size > C.MAX_REFTABLE_SIZE_BYTES:
            raise CorruptImage("Reference count table too large")
        _check_table(h.refcount_table_offset, h.refcount_table_clusters * self.cluster_size, self.cluster_size,
                     fsize, "Reference count table")
        if h.l1_size * 8 > C.MAX_L1_SIZE_BYTES:
            raise CorruptImage("Active L1 table too large")
        needed = self._l1_entries_for(h.size)
        if h.l1_size < needed:
            raise CorruptImage("L1 table is too small")
        _check_table(h.l1_table_offset, h.l1_size * 8, self.cluster_size, fsize, "Active L1 table")
        if h.nb_snapshots > C.MAX_SNAPSHOTS and not self._check_mode:
            raise CorruptImage("Too many snapshots")

    def _l1_entries_for(self, size: int) -> int:
        span = self.l2_entries * self.cluster_size
        return (size + span - 1) // span

    def _open_read_write(self) -> None:
        h = self.header
        if h.incompatible_features & C.INCOMPAT_CORRUPT:
            raise CorruptImage("qcow2: Image is corrupt; cannot be opened read/write "
                               "(open it read-only, or repair it with 'qemu-img check -r all')")
        if h.incompatible_features & C.INCOMPAT_DIRTY:
            raise CorruptImage("qcow2: Image is dirty (lazy refcounts were not written back); "
                               "repair it with 'qemu-img check -r all' before opening it read/write")
        if h.autoclear_features & ~C.AUTOCLEAR_KNOWN:
            # The spec: a writer that does not know an autoclear bit clears it on opening.
            h.autoclear_features &= C.AUTOCLEAR_KNOWN
            self._write_header()
            self.file.flush()

    def close(self) -> None:
        with self.lock:
            if self._closed:
                return
            try:
                if self.writable:
                    self._flush_all()
                    if self.header.incompatible_features & C.INCOMPAT_DIRTY:
                        self.header.incompatible_features &= ~C.INCOMPAT_DIRTY
                        self._write_incompat()
                        self.file.flush()
            finally:
                self._closed = True
                self.file.close()

    def __enter__(self) -> "Qcow2Image":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # ------------------------------------------------------------------ header writes
    def _write_header(self) -> None:
        data = pack_header(self.header)
        write_metadata(self.file, MAIN_HEADER, data + bytes(self.cluster_size - len(data)), 0)

    def _write_incompat(self) -> None:
        write_metadata(self.file, MAIN_HEADER, struct.pack(">Q", self.header.incompatible_features), 72)

    def _write_reftable_location(self, offset: int, clusters: int) -> None:
        self.header.refcount_table_offset = offset
        self.header.refcount_table_clusters = clusters
        write_metadata(self.file, MAIN_HEADER, struct.pack(">QI", offset, clusters), 48)  # one sector: atomic

    def _write_l1_location(self) -> None:
        write_metadata(self.file, MAIN_HEADER,
                       struct.pack(">IQ", self.header.l1_size, self.header.l1_table_offset), 36)

    # ------------------------------------------------------------------ mapping
    def _check_range(self, offset: int, length: int) -> None:
        if offset < 0 or length < 0 or offset + length > self.size:
            raise InvalidArgument(f"Range {offset}+{length} is outside the image (size {self.size})")
        if self._closed:
            raise QcowError("Image is closed")

    def _l2_table(self, l1_index: int) -> tuple[int, list[int]] | None:
        if l1_index >= len(self.l1):
            return None
        entry = self.l1[l1_index]
        off = l1_offset(entry)
        if not off:
            return None
        if off & (self.cluster_size - 1):
            raise CorruptImage(f"L2 table offset {off:#x} unaligned (L1 index: {l1_index:#x})")
        if off not in self.l2cache and off + self.cluster_size > self.file.size():
            raise CorruptImage(f"L2 table offset {off:#x} is past the end of the image file")
        return off, self.l2cache.get(off)

    def _cluster_pieces(self, table: list[int] | None, idx: int) -> list[tuple[ClusterType, int, int, int]]:
        """(type, start within cluster, length, host offset or 0) for one cluster, merged."""
        cs = self.cluster_size
        if table is None:
            return [(ClusterType.UNALLOCATED, 0, cs, 0)]
        if not self.extended:
            entry = table[idx]
            if l2_reserved(entry):
                raise CorruptImage(f"L2 entry {entry:#x} has reserved bits set")
            t = std_cluster_type(entry)
            host = l2_offset(entry) if t in (ClusterType.NORMAL, ClusterType.ZERO_ALLOC) else 0
            if t == ClusterType.NORMAL and host & (cs - 1):
                raise CorruptImage(f"Cluster allocation offset {host:#x} unaligned (L2 entry {entry:#x})")
            return [(t, 0, cs, host)]
        entry, bitmap = table[2 * idx], table[2 * idx + 1]
        if l2_reserved(entry, extended=True):
            raise CorruptImage(f"L2 entry {entry:#x} has reserved bits set")
        base = l2_offset(entry) if not entry & C.OFLAG_COMPRESSED else 0
        if base & (cs - 1):
            raise CorruptImage(f"Cluster allocation offset {base:#x} unaligned (L2 entry {entry:#x})")
        if entry & C.OFLAG_COMPRESSED:
            if bitmap:
                raise CorruptImage("Compressed cluster with a nonzero subcluster bitmap")
            return [(ClusterType.COMPRESSED, 0, cs, 0)]
        sc = self.subcluster_size
        pieces: list[tuple[ClusterType, int, int, int]] = []
        for i in range(C.SUBCLUSTERS_PER_CLUSTER):
            t = subcluster_type(entry, bitmap, i)
            if t == ClusterType.INVALID:
                raise CorruptImage(f"Invalid subcluster bitmap {bitmap:#x} in L2 entry")
            # A reserved but unallocated subcluster reads from below yet keeps its host offset,
            # which block status reports when nothing below answers (as QEMU's map does).
            reserved = t == ClusterType.UNALLOCATED_ALLOC
            if reserved:
                t = ClusterType.UNALLOCATED
            host = base + i * sc if reserved or t in (ClusterType.NORMAL, ClusterType.ZERO_ALLOC) else 0
            prev_host = pieces[-1][3] if pieces else 0
            if pieces and pieces[-1][0] == t and (host == prev_host == 0 or
                                                  (host and prev_host and prev_host + pieces[-1][2] == host)):
                p = pieces[-1]
                pieces[-1] = (t, p[1], p[2] + sc, p[3])
            else:
                pieces.append((t, i * sc, sc, host))
        return pieces

    def layer_extents(self, offset: int, length: int, max_extents: int | None = None) -> list[LayerExtent]:
        """Status of ``[offset, offset+length)`` in this image alone, as maximal runs.

        ``max_extents`` stops the scan early (block status asks for one run at a time).
        """
        with self.lock:
            self._check_range(offset, length)
            out: list[LayerExtent] = []
            for ext in self._iter_extents(offset, length):
                out.append(ext)
                if max_extents is not None and len(out) >= max_extents:
                    break
            return out

    def _iter_extents(self, offset: int, length: int) -> Iterator[LayerExtent]:
        """Merge the raw runs into maximal extents (same kind, contiguous host bytes)."""
        cur: list = []  # [kind, start, length, host]
        for kind, a, b, h in self._raw_runs(offset, offset + length):
            if cur and cur[0] == kind and cur[1] + cur[2] == a and (
                    (cur[3] is None and h is None) or
                    (cur[3] is not None and h is not None and cur[3] + cur[2] == h)):
                cur[2] += b - a
            else:
                if cur:
                    yield LayerExtent(*cur)
                cur = [kind, a, b - a, h]
        if cur:
            yield LayerExtent(*cur)

    def _raw_runs(self, pos: int, end: int) -> Iterator[tuple[str, int, int, int | None]]:
        """(kind, start, end, host offset or None) runs, at most one L2 table's worth at a time."""
        cs = self.cluster_size
        span_bits = self.cluster_bits + self.l2_bits
        while pos < end:
            l1_index = pos >> span_bits
            got = self._l2_table(l1_index)
            table = got[1] if got else None
            base = l1_index << span_bits
            span_end = min(end, base + (1 << span_bits))
            if table is None or not self.extended:
                # Whole runs of clusters at a time (kernels.l2_runs), a bounded number per call so
                # a caller that stops after the first extent does not pay for the whole table.
                idx = (pos - base) >> self.cluster_bits
                stop = ((span_end - base - 1) >> self.cluster_bits) + 1
                while idx < stop:
                    if table is None:
                        runs = [(ClusterType.UNALLOCATED, idx, stop - idx, 0)]
                    else:
                        runs = l2_runs(table, idx, stop, self.cluster_bits, 64)
                    for t, first, count, host in runs:
                        if t < 0:
                            raise CorruptImage(f"L2 entry {host:#x} has reserved bits set" if t == -1 else
                                               f"Cluster allocation offset {l2_offset(host):#x} unaligned "
                                               f"(L2 entry {host:#x})")
                        rstart = base + (first << self.cluster_bits)
                        a = max(pos, rstart)
                        yield _KIND[t], a, min(span_end, rstart + (count << self.cluster_bits)), \
                            host + (a - rstart) if host else None
                        idx = first + count
            else:
                while pos < span_end:
                    cstart = pos & ~(cs - 1)
                    idx = (pos >> self.cluster_bits) & (self.l2_entries - 1)
                    for t, pstart, plen, host in self._cluster_pieces(table, idx):
                        a = max(pos, cstart + pstart)
                        b = min(span_end, cstart + pstart + plen)
                        if a < b:
                            yield _KIND[t], a, b, host + (a - cstart - pstart) if host else None
                    pos = cstart + cs
            pos = span_end

    # ------------------------------------------------------------------ reading
    def pread(self, length: int, offset: int) -> bytes:
        with self.lock:
            self._check_range(offset, length)
            exts = self.layer_extents(offset, length)
            if len(exts) == 1 and exts[0].kind == DATA:  # one contiguous host run: no copy at all
                return self.file.pread(length, exts[0].host_offset)  # type: ignore[arg-type]
            buf = bytearray(length)
            self._read_extents(memoryview(buf), exts, zeroed=True)
            return bytes(buf)

    def preadinto(self, buf: bytearray | memoryview, offset: int) -> None:
        """Read ``len(buf)`` guest bytes straight into ``buf`` (a device's DMA target): one copy."""
        view = buf if type(buf) is memoryview and buf.format == "B" else memoryview(buf).cast("B")
        with self.lock:
            self._check_range(offset, len(view))
            exts = self.layer_extents(offset, len(view))
            if len(exts) == 1 and exts[0].kind == DATA:
                self.file.preadinto(view, exts[0].host_offset)  # type: ignore[arg-type]
            else:
                self._read_extents(view, exts, zeroed=False)

    def _read_extents(self, view: memoryview, exts: list[LayerExtent], zeroed: bool) -> None:
        pos = 0
        for ext in exts:
            dst = view[pos:pos + ext.length]
            if ext.kind == DATA:
                self.file.preadinto(dst, ext.host_offset)  # type: ignore[arg-type]
            elif ext.kind == UNALLOCATED and self.backing is not None:
                self._read_backing_into(dst, ext.start)
            elif ext.kind == COMPRESSED:
                p = ext.start
                while p < ext.start + ext.length:
                    cstart = p & ~(self.cluster_size - 1)
                    n = min(ext.start + ext.length, cstart + self.cluster_size) - p
                    data = self._read_compressed_cluster(cstart)
                    dst[p - ext.start:p - ext.start + n] = memoryview(data)[p - cstart:p - cstart + n]
                    p += n
            elif not zeroed:  # ZERO, or UNALLOCATED without a backing file
                zero_fill(dst)
            pos += ext.length

    def _read_backing_into(self, dst: memoryview, offset: int) -> None:
        """Backing data, zeros past the end of a shorter backing file."""
        n = max(0, min(len(dst), self.backing.size - offset))  # type: ignore[union-attr]
        if n:
            self.backing.preadinto(dst[:n], offset)  # type: ignore[union-attr]
        if n < len(dst):
            zero_fill(dst[n:])

    def _l2_entry_at(self, guest_offset: int) -> int:
        got = self._l2_table(guest_offset >> (self.cluster_bits + self.l2_bits))
        if not got:
            return 0
        idx = (guest_offset >> self.cluster_bits) & (self.l2_entries - 1)
        return got[1][idx * self.entry_words]

    def _read_compressed_cluster(self, guest_cluster: int) -> bytes:
        entry = self._l2_entry_at(guest_cluster)
        if self._compressed_cache and self._compressed_cache[0] == entry:
            return self._compressed_cache[1]
        host, nbytes = compressed_descriptor(entry, self.cluster_bits)
        if host + nbytes > self.file.size() + C.COMPRESSED_SECTOR_SIZE:
            raise CorruptImage(f"Compressed cluster at {host:#x} lies past the end of the image file")
        data = codec.decompress(self.file.pread(nbytes, host), self.header.compression_type, self.cluster_size)
        self._compressed_cache = (entry, data)
        return data

    def _read_cluster_here(self, guest_cluster: int) -> bytes:
        """Current guest contents of one whole cluster (for copy-on-write)."""
        n = min(self.cluster_size, self.size - guest_cluster)
        data = self.pread(n, guest_cluster)
        return data if n == self.cluster_size else data + bytes(self.cluster_size - n)

    # ------------------------------------------------------------------ writing helpers
    def _require_writable(self) -> None:
        if not self.writable:
            raise ReadOnlyError("Image is opened read-only")

    def _mark_dirty_if_lazy(self) -> None:
        """Runs before every modification: header bits that must change before data does."""
        h = self.header
        if h.autoclear_features & C.AUTOCLEAR_BITMAPS:
            # We do not update dirty bitmaps, so they stop being trustworthy with this write.
            h.autoclear_features &= ~C.AUTOCLEAR_BITMAPS
            self._write_header()
            self.file.flush()
        if h.compatible_features & C.COMPAT_LAZY_REFCOUNTS and not h.incompatible_features & C.INCOMPAT_DIRTY:
            h.incompatible_features |= C.INCOMPAT_DIRTY
            self._write_incompat()
            self.file.flush()  # the dirty bit is on disk before any refcount may go stale

    def _writable_l2(self, l1_index: int) -> list[int]:
        """The L2 table for ``l1_index``, allocated or copied (if shared) so it may be modified."""
        if l1_index >= len(self.l1):
            self._grow_l1(l1_index + 1)
        entry = self.l1[l1_index]
        old = l1_offset(entry)
        if old and entry & C.OFLAG_COPIED:
            return self._l2_table(l1_index)[1]  # type: ignore[index]
        new = self.refcounts.alloc_clusters(1)
        table = list(self._l2_table(l1_index)[1]) if old else [0] * (self.l2_entries * self.entry_words)  # type: ignore[index]
        self.l2cache.put_new(new, table)
        # The new table (and its refcount) reaches the disk before the L1 entry points to it.
        self.l2cache.flush()
        self.file.flush()
        self.l1[l1_index] = new | C.OFLAG_COPIED
        write_metadata(self.file, ACTIVE_L1, struct.pack(">Q", self.l1[l1_index]),
                       self.header.l1_table_offset + 8 * l1_index)
        if old:
            self._free_later(old, self.cluster_size)
        return table

    def _grow_l1(self, min_entries: int, exact: bool = False) -> None:
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
        self.header.l1_table_offset, self.header.l1_size = new_off, new_size
        self._write_l1_location()
        self.file.flush()
        self.l1 = table
        if old_size:
            self._free_later(old_off, ((old_size * 8 + self.cluster_size - 1) // self.cluster_size) * self.cluster_size)

    def _free_later(self, offset: int, length: int) -> None:
        """Drop references only after the tables that held them are on disk (flush())."""
        self._pending_frees.append((offset, length))
        if len(self._pending_frees) > 4096:
            self._flush_all()

    def _free_entry_later(self, entry: int) -> None:
        t = std_cluster_type(entry)
        if t in (ClusterType.NORMAL, ClusterType.ZERO_ALLOC):
            self._free_later(l2_offset(entry), self.cluster_size)
        elif t == ClusterType.COMPRESSED:
            host, nbytes = compressed_descriptor(entry, self.cluster_bits)
            first = host >> self.cluster_bits
            last = (host + nbytes - 1) >> self.cluster_bits
            for c in range(first, last + 1):
                self._free_later(c << self.cluster_bits, 1)

    def _set_l2(self, guest_offset: int, value: int) -> int:
        """Set one L2 entry (allocating/copying the table as needed); returns the old entry."""
        l1_index = guest_offset >> (self.cluster_bits + self.l2_bits)
        table = self._writable_l2(l1_index)
        idx = (guest_offset >> self.cluster_bits) & (self.l2_entries - 1)
        old = table[idx]
        if old != value:
            table[idx] = value
            self.l2cache.mark_dirty(l1_offset(self.l1[l1_index]))
        return old

    # ------------------------------------------------------------------ writing
    def pwrite(self, data: bytes | bytearray | memoryview, offset: int) -> None:
        with self.lock:
            self._require_writable()
            mv = memoryview(data).cast("B")
            self._check_range(offset, len(mv))
            if not len(mv):
                return
            self._mark_dirty_if_lazy()
            self._compressed_cache = None
            if self.extended:
                self._ext_pwrite(mv, offset)
                return
            pos = offset
            end = offset + len(mv)
            while pos < end:
                # One run per L2 table: clusters written in place, or a batch of new clusters.
                span_end = min(end, ((pos >> (self.cluster_bits + self.l2_bits)) + 1) << (self.cluster_bits + self.l2_bits))
                pos = self._write_span(mv, offset, pos, span_end)

    def _write_span(self, mv: memoryview, base: int, pos: int, span_end: int) -> int:
        cs = self.cluster_size
        l1_index = pos >> (self.cluster_bits + self.l2_bits)
        got = self._l2_table(l1_index)
        table = got[1] if got and self.l1[l1_index] & C.OFLAG_COPIED else None
        # Phase 1: in-place writes into clusters we own.
        while pos < span_end:
            cstart = pos & ~(cs - 1)
            idx = (pos >> self.cluster_bits) & (self.l2_entries - 1)
            entry = table[idx] if table is not None else 0
            if not (entry & C.OFLAG_COPIED and std_cluster_type(entry) == ClusterType.NORMAL):
                break
            n = min(span_end, cstart + cs) - pos
            host = l2_offset(entry) + (pos - cstart)
            # extend across physically contiguous owned clusters
            while pos + n < span_end:
                nidx = idx + (n + pos - cstart) // cs
                nentry = table[nidx]
                if not (nentry & C.OFLAG_COPIED and std_cluster_type(nentry) == ClusterType.NORMAL
                        and l2_offset(nentry) == host - (pos - cstart) + (nidx - idx) * cs):
                    break
                n = min(span_end - pos, n + cs)
            self.file.pwrite(mv[pos - base:pos - base + n], host)
            pos += n
        if pos >= span_end:
            return pos
        # Phase 2: a run of clusters that need new host clusters (copy-on-write where partial).
        first = pos & ~(cs - 1)
        run_end = first
        while run_end < span_end:
            idx = (run_end >> self.cluster_bits) & (self.l2_entries - 1)
            entry = table[idx] if table is not None else 0
            if entry & C.OFLAG_COPIED and std_cluster_type(entry) == ClusterType.NORMAL:
                break
            run_end += cs
            if run_end - first >= _MAX_RUN_BYTES:
                break
        nclusters = (run_end - first) // cs
        wend = min(span_end, run_end)
        if pos == first and wend == run_end:  # whole clusters: write the caller's bytes, no copy
            buf: bytearray | memoryview = mv[pos - base:wend - base]
        else:
            buf = bytearray(nclusters * cs)
            if pos > first:
                buf[:cs] = self._read_cluster_here(first)
            last = run_end - cs
            if wend < run_end and (last > first or pos == first):
                buf[last - first:] = self._read_cluster_here(last)
            buf[pos - first:wend - first] = mv[pos - base:wend - base]
        self._writable_l2(l1_index)  # like QEMU: the L2 table is allocated before the data clusters
        host = self.refcounts.alloc_clusters(nclusters)
        # Trim the copy at the image end so the file does not grow past the last cluster's data need.
        self.file.pwrite(buf, host)
        # The run lies in one L2 table: fetch it once (allocation may have evicted it) and set
        # the entries together.
        table = self._writable_l2(l1_index)
        key = l1_offset(self.l1[l1_index])
        self.l2cache.mark_dirty(key)
        idx = (first >> self.cluster_bits) & (self.l2_entries - 1)
        for i in range(nclusters):
            old = table[idx + i]
            table[idx + i] = (host + i * cs) | C.OFLAG_COPIED
            if old:
                # may flush everything (the table included) before dropping the old references
                self._free_entry_later(old)
                self.l2cache.mark_dirty(key)
        return wend

    def write_compressed(self, data: bytes, offset: int) -> None:
        """Write one whole cluster compressed (the last cluster may be short: zero-padded)."""
        with self.lock:
            self._require_writable()
            cs = self.cluster_size
            if offset % cs or len(data) > cs or (len(data) < cs and offset + len(data) != self.size):
                raise InvalidArgument("Compressed writes must cover exactly one cluster")
            self._check_range(offset, len(data))
            self._mark_dirty_if_lazy()
            self._compressed_cache = None
            if len(data) < cs:
                data = bytes(data) + bytes(cs - len(data))
            comp = codec.compress(bytes(data), self.header.compression_type, cs)
            if comp is None:  # does not shrink: store it plainly, as QEMU does
                self.pwrite(data[:min(cs, self.size - offset)], offset)
                return
            self._writable_l2(offset >> (self.cluster_bits + self.l2_bits))  # L2 before data, as QEMU
            host = self.refcounts.alloc_bytes(len(comp))
            self.file.pwrite(comp, host)
            entry = make_compressed_entry(host, len(comp), self.cluster_bits)
            old = self._set_l2_pair(offset, entry, 0)[0] if self.extended else self._set_l2(offset, entry)
            self._free_entry_later(old)

    def write_zeroes(self, length: int, offset: int, unmap: bool = False) -> None:
        """Make a range read as zeros, allocating like QEMU: on v3 a cluster becomes a zero cluster
        when the request covers it or the rest of it already reads as zeros; otherwise (and always
        on v2) explicit zeros are written."""
        with self.lock:
            self._require_writable()
            self._check_range(offset, length)
            if not length:
                return
            self._mark_dirty_if_lazy()
            self._compressed_cache = None
            if self.extended:
                self._ext_write_zeroes(length, offset, unmap)
                return
            cs = self.cluster_size
            end = offset + length
            pos = offset
            while pos < end:
                cstart = pos & ~(cs - 1)
                cend = min(cstart + cs, self.size)
                n = min(end, cend) - pos
                whole = pos == cstart and pos + n == cend
                if self.header.version >= 3 and (whole or self._reads_zero(cstart, cend, pos, pos + n)):
                    self._zero_cluster(cstart, unmap)
                else:  # as QEMU's fallback: explicit zeros, even where the range reads zero
                    self.pwrite(bytes(n), pos)
                pos += n

    def _reads_zero(self, a: int, b: int, skip_a: int = 0, skip_b: int = 0) -> bool:
        """True if [a, b) outside [skip_a, skip_b) already reads as zeros (cheaply decided)."""
        for ext in self.layer_extents(a, b - a):
            lo, hi = ext.start, ext.start + ext.length
            if skip_a <= lo and hi <= skip_b:
                continue
            if ext.kind == ZERO:
                continue
            if ext.kind == UNALLOCATED and all(self._backing_reads_zero(x, y) for x, y in
                                               ((lo, min(hi, skip_a)), (max(lo, skip_b), hi)) if x < y):
                continue
            return False
        return True

    def _backing_reads_zero(self, a: int, b: int) -> bool:
        """True if the backing chain reads [a, b) as zeros by its block status (as QEMU's is_zero)."""
        if self.backing is None or a >= self.backing.size:
            return True
        status = getattr(self.backing, "block_status", None)
        if status is None:
            return False
        return all(e.zero for e in status(a, min(b, self.backing.size) - a))

    def _zero_cluster(self, cstart: int, unmap: bool) -> None:
        entry = self._l2_entry_at(cstart)
        t = std_cluster_type(entry)
        if not unmap and entry & C.OFLAG_COPIED and t in (ClusterType.NORMAL, ClusterType.ZERO_ALLOC):
            new = entry | C.OFLAG_ZERO  # keep the preallocated host cluster
        else:
            new = C.OFLAG_ZERO
        if new != entry:
            old = self._set_l2(cstart, new)
            if new == C.OFLAG_ZERO:
                self._free_entry_later(old)

    def discard(self, length: int, offset: int) -> None:
        """Drop whole clusters (partial ones are left alone, as QEMU does).

        Discarded clusters read as zeros on v3 (zero flag) and on v2 without a backing file.
        On v2 with a backing file the request is ignored, as QEMU does: without a zero flag the
        clusters could only fall through and expose stale backing data.
        """
        with self.lock:
            if not self.writable:
                raise ReadOnlyError("Image is opened read-only")
            self._check_range(offset, length)
            cs = self.cluster_size
            start = (offset + cs - 1) & ~(cs - 1)
            end = offset + length if offset + length == self.size else (offset + length) & ~(cs - 1)
            if end <= start or (self.header.version < 3 and self.backing is not None):
                return
            self._require_writable()
            self._mark_dirty_if_lazy()
            self._compressed_cache = None
            new = C.OFLAG_ZERO if self.header.version >= 3 else 0
            for cstart in range(start, end, cs):
                if self.extended:
                    self._ext_discard_cluster(cstart)
                    continue
                entry = self._l2_entry_at(cstart)
                t = std_cluster_type(entry)
                if self.backing is None and t in (ClusterType.UNALLOCATED, ClusterType.ZERO_PLAIN):
                    continue
                if entry == new:
                    continue
                old = self._set_l2(cstart, new)
                self._free_entry_later(old)

    # ------------------------------------------------------------------ flushing
    def _flush_all(self) -> None:
        self.l2cache.flush()  # refcount increases, then data, then L2 tables, with barriers
        if self._pending_frees:
            self.file.flush()  # dropped references are on disk before refcounts fall
            frees, self._pending_frees = self._pending_frees, []
            for off, length in frees:
                self.refcounts.free(off, length)
                self.l2cache.discard(off)
        self.refcounts.flush()
        self.file.flush()

    def flush(self) -> None:
        with self.lock:
            if self.writable and not self._closed:
                self._flush_all()

    def preallocate(self, mode: str, start: int = 0) -> None:
        """Map every unmapped cluster from ``start`` on to a host cluster (metadata), reserving
        (falloc) or zero-filling (full) the data, as ``-o preallocation=`` does."""
        with self.lock:
            self._require_writable()
            cs = self.cluster_size
            span = cs << self.l2_bits
            pos = start & ~(cs - 1)
            end_needed = 0
            while pos < self.size:
                span_end = min(self.size, (pos // span + 1) * span)
                self._writable_l2(pos // span)
                first = pos
                while first < span_end:
                    # runs of clusters that are not yet mapped
                    while first < span_end and self._l2_entry_at(first) & C.L2E_OFFSET_MASK:
                        first += cs
                    last = first
                    while last < span_end and not self._l2_entry_at(last) & C.L2E_OFFSET_MASK and last - first < _MAX_RUN_BYTES:
                        last += cs
                    if last == first:
                        break
                    n = (last - first + cs - 1) // cs
                    host = self.refcounts.alloc_clusters(n)
                    for i in range(n):
                        if self.extended:  # host cluster reserved; subclusters read as before
                            self._set_l2_pair(first + i * cs, (host + i * cs) | C.OFLAG_COPIED, 0)
                        else:
                            self._set_l2(first + i * cs, (host + i * cs) | C.OFLAG_COPIED)
                    used = min(last, self.size) - first
                    if mode == "falloc":
                        self.file.allocate(host, used)
                    elif mode == "full":
                        for off in range(0, used, _MAX_RUN_BYTES):
                            self.file.pwrite(bytes(min(_MAX_RUN_BYTES, used - off)), host + off)
                    end_needed = max(end_needed, host + used)
                    first = last
                pos = span_end
            self._flush_all()
            if self.file.size() < end_needed:
                self.file.truncate(end_needed)

    # ------------------------------------------------------------------ backing file
    def change_backing_file(self, name: str | None, fmt: str | None) -> None:
        """Point the header at another backing file (QEMU's qcow2_change_backing_file): the whole
        header cluster is rewritten, with the backing-format extension set, changed or dropped."""
        with self.lock:
            self._require_writable()
            if name and len(name.encode()) > 1023:
                raise InvalidArgument("Invalid argument")
            h = self.header.copy()
            h.backing_file = name or ""
            h.set_extension(C.EXT_BACKING_FORMAT, fmt.encode() if name and fmt else None)
            data = pack_header(h)  # raises if it does not fit in the header cluster
            self._flush_all()
            write_metadata(self.file, MAIN_HEADER, data + bytes(self.cluster_size - len(data)), 0)
            self.file.flush()
            cur = self.header  # others hold this object: update it in place
            cur.backing_file, cur.extensions = h.backing_file, h.extensions
            cur.backing_file_offset, cur.backing_file_size = h.backing_file_offset, h.backing_file_size

    # ------------------------------------------------------------------ resizing
    def resize(self, new_size: int, exact_l1: bool = True, preallocation: str = "off") -> None:
        """Change the virtual size as QEMU's ``qcow2_co_truncate`` does.

        Growing widens the L1 table (exactly, when asked) and, with ``preallocation``, maps the
        new area. Shrinking drops every cluster past the new end (the entries become unallocated),
        frees the L2 tables past it, drops refcount blocks left describing nothing, and cuts the
        file after the last cluster still in use."""
        with self.lock:
            self._require_writable()
            h = self.header
            if new_size % 512:
                raise InvalidArgument("The new size must be a multiple of 512")
            if h.nb_snapshots and h.version < 3:
                raise UnsupportedFeature("Can't resize a v2 image which has snapshots")
            if bitmap_directory(h) is not None:
                raise UnsupportedFeature("Cannot resize qcow2 with persistent bitmaps "
                                         "(qcowpy does not update bitmaps)")
            old_size = self.size
            if new_size < old_size:
                if preallocation != "off":
                    raise InvalidArgument("Preallocation can't be used for shrinking an image")
                self._mark_dirty_if_lazy()
                self._compressed_cache = None
                self._shrink(new_size)
            else:
                need = self._l1_entries_for(new_size)
                if need > len(self.l1):
                    self._grow_l1(need, exact=exact_l1)
                    self._flush_all()  # QEMU frees the old L1 at once: preallocation may reuse it
            self.size = h.size = new_size
            if new_size > old_size and preallocation != "off":
                self.preallocate(preallocation, start=old_size)
            self._flush_all()
            write_metadata(self.file, MAIN_HEADER, struct.pack(">Q", new_size), 24)
            self.file.flush()

    @contextmanager
    def punching_freed(self) -> Iterator[None]:
        """Clusters whose refcount falls to 0 inside the block are punched out of the host file
        at its end (QEMU's discard passthrough for QCOW2_DISCARD_ALWAYS/SNAPSHOT frees); those
        allocated again meanwhile are left alone."""
        self.refcounts.freed = []
        try:
            yield
            self._flush_all()
            cs = self.cluster_size
            for start, n in _runs(c for c in sorted(set(self.refcounts.freed)) if not self.refcounts.get(c)):
                punch_hole(self.file.fd, start * cs, n * cs)
        finally:
            self.refcounts.freed = None

    def _shrink(self, new_size: int) -> None:
        with self.punching_freed():
            self._full_discard((new_size + self.cluster_size - 1) & ~(self.cluster_size - 1), self.size)
            self._shrink_l1(self._l1_entries_for(new_size))
            self.refcounts.drop_unused_blocks()
        file_size = self.file.size()
        last = self.refcounts.last_cluster(file_size)
        if (last + 1) * self.cluster_size < file_size:
            self.file.truncate((last + 1) * self.cluster_size)

    def _full_discard(self, start: int, end: int) -> None:
        """QEMU's qcow2_cluster_discard(full_discard=true) of whole clusters [start, end): each L2
        table it touches is made writable first (allocated even when absent, or copied when
        shared, as get_cluster_table does), then the entries become 0 (unallocated)."""
        cs = self.cluster_size
        span_bits = self.cluster_bits + self.l2_bits
        for l1_index in range(start >> span_bits, ((end - 1) >> span_bits) + 1 if end > start else 0):
            table = self._writable_l2(l1_index)
            key = l1_offset(self.l1[l1_index])
            self.l2cache.mark_dirty(key)
            base = l1_index << span_bits
            first = (max(start, base) - base) >> self.cluster_bits
            last = (min(end, base + (1 << span_bits)) - base + cs - 1) >> self.cluster_bits
            step = self.entry_words
            for idx in range(first, last):
                old = table[idx * step]
                if old or (step == 2 and table[idx * step + 1]):
                    table[idx * step] = 0
                    if step == 2:
                        table[idx * step + 1] = 0
                    if old:
                        self._free_entry_later(old)
                        self.l2cache.mark_dirty(key)
            self.l2cache.mark_dirty(key)
            # QEMU frees each dropped cluster at once, so the next table allocated may reuse it
            self._flush_all()

    def _shrink_l1(self, new_l1: int) -> None:
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

    # ------------------------------------------------------------------ emptying
    def make_empty(self) -> None:
        """Drop every cluster of the active layer (what ``qemu-img commit`` leaves of the top),
        as QEMU's qcow2_make_empty: a v3 image without snapshots or bitmaps is rebuilt from
        scratch (header, one refcount table and block, an empty L1); otherwise everything is
        discarded cluster by cluster."""
        with self.lock:
            self._require_writable()
            h = self.header
            l1_clusters = -(-len(self.l1) * 8 // self.cluster_size)
            if h.version >= 3 and not h.nb_snapshots and bitmap_directory(h) is None and \
                    3 + l1_clusters <= self.refcounts.per_block:
                self._make_completely_empty(l1_clusters)
                return
            self._mark_dirty_if_lazy()
            self._compressed_cache = None
            with self.punching_freed():
                self._full_discard(0, self.size)

    def _make_completely_empty(self, l1_clusters: int) -> None:
        from .overlap import ALL
        cs, h = self.cluster_size, self.header
        self._flush_all()
        self.l2cache.clear()
        self.refcounts.cache.clear()
        self._compressed_cache = None
        if not h.incompatible_features & C.INCOMPAT_DIRTY:  # the refcounts are about to be wrong
            h.incompatible_features |= C.INCOMPAT_DIRTY
            self._write_incompat()
            self.file.flush()
        write_metadata(self.file, ALL, bytes(l1_clusters * cs), h.l1_table_offset)
        write_metadata(self.file, ALL, bytes((2 + l1_clusters) * cs), cs)
        # the reftable right after the header, its first block next, the L1 three clusters in
        write_metadata(self.file, ALL, struct.pack(">QQI", 3 * cs, cs, 1), 40)
        self.file.flush()
        h.l1_table_offset, h.refcount_table_offset, h.refcount_table_clusters = 3 * cs, cs, 1
        write_metadata(self.file, ALL, struct.pack(">Q", 2 * cs), cs)
        self.file.flush()
        self.refcounts.reload(cs, 1)
        self.l1 = [0] * len(self.l1)
        if self.refcounts.alloc_clusters(3 + l1_clusters) != 0:
            raise CorruptImage("First cluster in emptied image is in use")
        self._flush_all()
        h.incompatible_features &= ~C.INCOMPAT_DIRTY  # qcow2_mark_clean: the whole header anew
        self._write_header()
        self.file.flush()
        self.file.truncate((3 + l1_clusters) * cs)


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


def _cache_tables(cluster_size: int) -> int:
    """Tables per metadata cache: 64 for 64 KiB clusters, never fewer than 4 (memory stays bounded)."""
    return max(4, min(64, (4 << 20) // cluster_size))


_MAX_RUN_BYTES = 16 << 20  # cap on one allocating write's buffer

_KIND = {
    ClusterType.UNALLOCATED: UNALLOCATED,
    ClusterType.ZERO_PLAIN: ZERO,
    ClusterType.ZERO_ALLOC: ZERO,
    ClusterType.NORMAL: DATA,
    ClusterType.COMPRESSED: COMPRESSED,
}


def _check_table(offset: int, size: int, cluster_size: int, file_size: int, what: str) -> None:
    if offset & (cluster_size - 1):
        raise CorruptImage(f"{what} offset invalid (not cluster aligned)")
    if size and offset + size > file_size:
        raise CorruptImage(f"{what} lies past the end of the image file")
