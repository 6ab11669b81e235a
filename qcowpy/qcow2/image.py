"""The qcow2 data path: open an image, read, write (with copy-on-write), compress, zero, discard.

One ``Qcow2Image`` owns one host file. Its metadata lives in a :class:`~.metadata.Metadata`,
which alone changes it; this module only decides what the guest's requests mean for it.
Backing files are not opened here: the block layer hands in any object with
``pread(length, offset)``, ``preadinto`` and ``size`` (see qcowpy.block). Resizing,
preallocation and emptying live in resize.py, the read-side mapping in mapping.py.
"""
from __future__ import annotations

import threading
from typing import Protocol

from ..errors import CorruptImage, InvalidArgument, QcowError, ReadOnlyError
from ..format import constants as C
from ..format.entries import ClusterType, compressed_descriptor, l2_offset, make_compressed_entry
from ..format.entries import cluster_type as std_cluster_type
from ..format.header import Header, parse_header
from ..hostfile import HostFile, iov_slice, open_host_file, zero_fill
from . import codec
from .bitmaps import Bitmaps
from .extl2 import ExtendedL2Writes
from .mapping import COMPRESSED, DATA, UNALLOCATED, ZERO, LayerExtent, layer_extents
from .encryption import ImageCrypto, open_crypto
from .metadata import Metadata
from .opencheck import l1_entries_for, validate_contents, validate_header
from .compressed import read_compressed, write_compressed_many

__all__ = ["Qcow2Image", "l1_entries_for", "LayerExtent", "UNALLOCATED", "ZERO", "DATA", "COMPRESSED", "MAX_RUN_BYTES"]

MAX_RUN_BYTES = 16 << 20  # cap on one allocating write's buffer


class Backing(Protocol):
    size: int

    def pread(self, length: int, offset: int) -> bytes: ...

    def preadinto(self, buf: memoryview, offset: int) -> None: ...


class Qcow2Image:
    """A qcow2 image file. Thread-safe: every public method holds the image lock."""

    def __init__(self, file: HostFile, header: Header, writable: bool, l2_cache_tables: int | None = None,
                 check_mode: bool = False, crypto: ImageCrypto | None = None, data: HostFile | None = None):
        # check_mode: open as qemu-img check does, leaving the snapshot table to the check itself
        self._check_mode = check_mode
        self.header = header
        self.lock = threading.RLock()
        self.backing: Backing | None = None
        self.cluster_bits = header.cluster_bits
        self.cluster_size = 1 << self.cluster_bits
        self.extended = header.extended_l2
        self._metadata_prealloc: bool | None = None  # metadata_preallocated(), decided on first use
        self.size = header.size & ~511  # whole sectors, as QEMU (bs->total_sectors)
        self._closed = False
        self._compressed_cache: tuple[int, bytes] | None = None
        validate_header(header, file.size(), check_mode)
        validate_contents(header, file, check_mode)
        self.meta = Metadata(file, header, writable, l2_cache_tables)
        self.file = self.meta.file  # every write goes through the metadata owner's overlap guard
        # Guest data lives in ``data``: the external data file (incompatible bit 2), or this file.
        self.external_data = bool(header.incompatible_features & C.INCOMPAT_DATA_FILE)
        self.data = data if data is not None else self.file
        if data is not None:
            self.meta.guard.companion = data  # every barrier makes the data durable too
        self.subcluster_size = self.meta.cluster_size // C.SUBCLUSTERS_PER_CLUSTER if self.extended \
            else self.cluster_size
        self._ext = ExtendedL2Writes(self) if self.extended else None
        self.crypto = crypto  # encryption.ImageCrypto: every data cluster goes through it
        self.bitmaps = Bitmaps(self.meta, self.size)  # persistent dirty bitmaps (qcow2/bitmaps.py)

    @property
    def writable(self) -> bool:
        return self.meta.writable

    # ------------------------------------------------------------------ opening / closing
    @classmethod
    def open(cls, path: str, writable: bool = False, cache: str = "writeback",
             force_share: bool = False, secret: bytes | None = None, no_io: bool = False,
             encrypt_format: str | None = None, data_file: str | None = None) -> "Qcow2Image":
        """``secret`` unlocks an encrypted image; ``no_io`` opens one without it, for its
        header only (as qemu-img info does); ``encrypt_format`` is the format the caller
        expects (QEMU's ``encrypt.format`` open option); ``data_file`` overrides the external
        data file the header names (QEMU's ``data-file`` option)."""
        file = open_host_file(path, writable=writable, cache=cache, force_share=force_share)
        data: HostFile | None = None
        try:
            head = file.pread(min(file.size(), 1 << C.MAX_CLUSTER_BITS), 0)
            header = parse_header(head, file.size())
            validate_header(header, file.size(), False)  # validate before repairing, as any open does
            # unlocked before any repair, as in QEMU: a wrong passphrase leaves the file untouched
            crypto = open_crypto(header, file, secret, no_io, encrypt_format)
            if writable and header.incompatible_features & C.INCOMPAT_DIRTY and \
                    not header.incompatible_features & C.INCOMPAT_CORRUPT:
                from .check import repair_dirty
                repair_dirty(file, header)  # QEMU repairs a dirty image opened read-write
            data = open_data_file(header, data_file, writable, cache, force_share)
            img = cls(file, header, writable, crypto=crypto, data=data)
            if writable:
                img._open_read_write()
            return img
        except BaseException:
            if data is not None:
                data.close()
            file.close()
            raise

    def _open_read_write(self) -> None:
        h = self.header
        if h.incompatible_features & C.INCOMPAT_CORRUPT:
            raise CorruptImage("qcow2: Image is corrupt; cannot be opened read/write "
                               "(open it read-only, or repair it with 'qemu-img check -r all')")
        if h.incompatible_features & C.INCOMPAT_DIRTY:
            raise CorruptImage("qcow2: Image is dirty (lazy refcounts were not written back); "
                               "repair it with 'qemu-img check -r all' before opening it read/write")
        stale_bitmaps = not h.autoclear_features & C.AUTOCLEAR_BITMAPS and \
            h.find_extension(C.EXT_BITMAPS) is not None
        if h.autoclear_features & ~C.AUTOCLEAR_KNOWN or stale_bitmaps:
            # The spec: a writer that does not know an autoclear bit clears it on opening; and
            # bitmaps whose autoclear bit a program without bitmap support cleared are dropped
            # (their clusters leak until check -r), as QEMU does.
            h.autoclear_features &= C.AUTOCLEAR_KNOWN
            if stale_bitmaps:
                h.set_extension(C.EXT_BITMAPS, None)
            self.meta.rewrite_header()
            self.file.flush()

    def close(self) -> None:
        with self.lock:
            if self._closed:
                return
            try:
                if self.writable:
                    try:
                        self.bitmaps.store()  # a failure leaves them in_use (inconsistent), as in QEMU
                    finally:
                        self.meta.sync()
                    if self.header.incompatible_features & C.INCOMPAT_DIRTY:
                        self.meta.set_incompatible(self.header.incompatible_features & ~C.INCOMPAT_DIRTY)
            finally:
                self._closed = True
                try:
                    if self.data is not self.file:
                        self.data.close()
                finally:
                    self.file.close()

    def __enter__(self) -> "Qcow2Image":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # ------------------------------------------------------------------ mapping
    def check_range(self, offset: int, length: int) -> None:
        if offset < 0 or length < 0 or offset + length > self.size:
            raise InvalidArgument(f"Range {offset}+{length} is outside the image (size {self.size})")
        if self._closed:
            raise QcowError("Image is closed")

    def metadata_preallocated(self) -> bool:
        """QEMU's heuristic, decided once per open: far more clusters are in use than the host
        file has blocks, so data clusters may sit on holes of the file (block status then asks
        the file system)."""
        if self._metadata_prealloc is None:
            with self.lock:
                cs = self.cluster_size
                try:
                    real = self.file.allocated_bytes() // cs
                except (AttributeError, OSError):  # a test double or a store without block counts
                    self._metadata_prealloc = False
                    return False
                threshold = max(real * 10 // 9, real + 2)
                end_cluster = -(-self.file.size() // cs)
                self._metadata_prealloc = self.meta.refcounts.count_used(end_cluster, threshold) >= threshold
        return self._metadata_prealloc

    def layer_extents(self, offset: int, length: int, max_extents: int | None = None) -> list[LayerExtent]:
        """Status of ``[offset, offset+length)`` in this image alone, as maximal runs.

        ``max_extents`` stops the scan early (block status asks for one run at a time).
        """
        with self.lock:
            self.check_range(offset, length)
            out: list[LayerExtent] = []
            for ext in layer_extents(self.meta, offset, length):
                out.append(ext)
                if max_extents is not None and len(out) >= max_extents:
                    break
            return out

    # ------------------------------------------------------------------ reading
    # A read of one run of host bytes (a guest's or NBD client's request inside allocated data)
    # reads them after the lock is released, as QEMU reads data outside its s->lock: readers on
    # other threads overlap their host I/O; a write racing the range may be seen or not.
    def pread(self, length: int, offset: int) -> bytes:
        with self.lock:
            self.check_range(offset, length)
            host, exts = self._host_run(offset, length)
            if host is None:
                buf = bytearray(length)
                self._read_extents(memoryview(buf), exts, zeroed=True)
                return bytes(buf)
        return self.data.pread(length, host)  # no copy at all

    def _host_run(self, offset: int, length: int) -> tuple[int | None, list[LayerExtent]]:
        """Where ``[offset, offset+length)`` lies as one run of plain host bytes (else None,
        with the range's extents).

        A request inside one cluster whose entry is plain data (the small random read) is
        decided from its L2 entry alone; anything unusual in the entry goes to the general
        mapping, which knows every case and reports damage."""
        cs = self.cluster_size
        plain = self.crypto is None
        if plain and (offset & (cs - 1)) + length <= cs and length and not self.extended and not self.external_data:
            entry = self.meta.l2_entry(offset)[0]
            host = entry & C.L2E_OFFSET_MASK
            if host and not host & (cs - 1) and entry == host | (entry & C.OFLAG_COPIED):
                return host + (offset & (cs - 1)), []
        exts = self.layer_extents(offset, length)
        return (exts[0].host_offset if plain and len(exts) == 1 and exts[0].kind == DATA else None), exts

    def preadinto(self, buf: bytearray | memoryview, offset: int) -> None:
        """Read ``len(buf)`` guest bytes straight into ``buf`` (a device's DMA target): one copy."""
        view = buf if type(buf) is memoryview and buf.format == "B" else memoryview(buf).cast("B")
        with self.lock:
            self.check_range(offset, len(view))
            host, exts = self._host_run(offset, len(view))
            if host is None:
                self._read_extents(view, exts, zeroed=False)
                return
        self.data.preadinto(view, host)

    def preadv(self, bufs: list[memoryview], offset: int) -> None:
        """Fill ``bufs`` (byte views) from consecutive guest bytes at ``offset``: the range is
        mapped once and each host run is read with one vectored system call when it is all plain
        data in a local file; anything else (zeros, backing, compressed, encrypted) buffer by buffer."""
        total = sum(len(b) for b in bufs)
        with self.lock:
            self.check_range(offset, total)
            exts = self.layer_extents(offset, total)
            readv = getattr(self.data, "preadv", None)
            if readv is None or self.crypto is not None or any(e.kind != DATA for e in exts):
                for buf in bufs:
                    self.preadinto(buf, offset)
                    offset += len(buf)
                return
            pos = 0
            for ext in exts:
                readv(iov_slice(bufs, pos, ext.length), ext.host_offset)
                pos += ext.length

    def _read_extents(self, view: memoryview, exts: list[LayerExtent], zeroed: bool) -> None:
        pos = 0
        compressed: list[tuple[memoryview, int]] = []  # inflated together, after the loop
        for ext in exts:
            dst = view[pos:pos + ext.length]
            if ext.kind == DATA:
                self.read_data(dst, ext.host_offset, ext.start)  # type: ignore[arg-type]
            elif ext.kind == UNALLOCATED and self.backing is not None:
                self._read_backing_into(dst, ext.start)
            elif ext.kind == COMPRESSED:
                compressed.append((dst, ext.start))
            elif not zeroed:  # ZERO, or UNALLOCATED without a backing file
                zero_fill(dst)
            pos += ext.length
        if compressed:
            read_compressed(self, compressed)

    def read_data(self, dst: memoryview, host: int, guest: int) -> None:
        """Guest data stored at ``host`` into ``dst`` (decrypted on encrypted images)."""
        if self.crypto is None:
            self.data.preadinto(dst, host)
        else:
            self.crypto.read_into(self.data, dst, host, guest)

    def write_data(self, data, host: int, guest: int) -> None:
        """Store guest data (whole sectors on encrypted images) at ``host``."""
        if self.crypto is None:
            self.data.pwrite(data, host)
        else:
            self.data.pwrite(self.crypto.encrypt(data, host, guest), host)

    def _read_backing_into(self, dst: memoryview, offset: int) -> None:
        """Backing data, zeros past the end of a shorter backing file."""
        n = max(0, min(len(dst), self.backing.size - offset))  # type: ignore[union-attr]
        if n:
            self.backing.preadinto(dst[:n], offset)  # type: ignore[union-attr]
        if n < len(dst):
            zero_fill(dst[n:])

    def _compressed_desc(self, entry: int, file_size: int | None = None) -> tuple[int, int]:
        host, nbytes = compressed_descriptor(entry, self.cluster_bits)
        if host + nbytes > (self.file.size() if file_size is None else file_size) + C.COMPRESSED_SECTOR_SIZE:
            raise CorruptImage(f"Compressed cluster at {host:#x} lies past the end of the image file")
        return host, nbytes

    def _read_compressed_cluster(self, guest_cluster: int) -> bytes:
        entry = self.meta.l2_entry(guest_cluster)[0]
        if self._compressed_cache and self._compressed_cache[0] == entry:
            return self._compressed_cache[1]
        host, nbytes = self._compressed_desc(entry)
        data = codec.decompress(self.file.pread(nbytes, host), self.header.compression_type, self.cluster_size)
        self._compressed_cache = (entry, data)
        return data

    def read_cluster(self, guest_cluster: int) -> bytes:
        """Current guest contents of one whole cluster (for copy-on-write)."""
        n = min(self.cluster_size, self.size - guest_cluster)
        data = self.pread(n, guest_cluster)
        return data if n == self.cluster_size else data + bytes(self.cluster_size - n)

    # ------------------------------------------------------------------ writing
    def require_writable(self) -> None:
        if not self.writable:
            raise ReadOnlyError("Image is opened read-only")

    def begin_change(self) -> None:
        """Before any modification: writable, header bits first, no stale decompressed cluster."""
        self.require_writable()
        self.meta.before_change()
        self.bitmaps.activate()
        self._compressed_cache = None

    def pwrite(self, data: bytes | bytearray | memoryview, offset: int) -> None:
        with self.lock:
            self.require_writable()
            mv = memoryview(data).cast("B")
            self.check_range(offset, len(mv))
            if not len(mv):
                return
            self.begin_change()
            self.bitmaps.mark(offset, len(mv))
            if self.crypto is not None and (offset | len(mv)) % 512:
                mv, offset = self._whole_sectors(mv, offset)
            if self._ext is not None:
                self._ext.pwrite(mv, offset)
                return
            pos = offset
            end = offset + len(mv)
            span_bits = self.cluster_bits + self.meta.l2_bits
            while pos < end:
                # One run per L2 table: clusters written in place, or a batch of new clusters.
                span_end = min(end, ((pos >> span_bits) + 1) << span_bits)
                pos = self._write_span(mv, offset, pos, span_end)

    def _whole_sectors(self, mv: memoryview, offset: int) -> tuple[memoryview, int]:
        """Encryption works on 512-byte sectors (QEMU's request alignment): widen the write
        with the current contents of the sectors it cuts."""
        a = offset & ~511
        b = min(self.size, (offset + len(mv) + 511) & ~511)
        buf = bytearray(self.pread(b - a, a))
        buf[offset - a:offset - a + len(mv)] = mv
        return memoryview(buf), a

    def _write_span(self, mv: memoryview, base: int, pos: int, span_end: int) -> int:
        l1_index = pos >> (self.cluster_bits + self.meta.l2_bits)
        owned = self.meta.l2_table(l1_index) if self.meta.owns_l2(l1_index) else None
        pos = self._write_owned(mv, base, pos, span_end, owned.data if owned else None)
        if pos < span_end:
            pos = self._write_new_clusters(mv, base, pos, span_end, l1_index, owned.data if owned else None)
        return pos

    def _write_owned(self, mv: memoryview, base: int, pos: int, span_end: int, table: list[int] | None) -> int:
        """In-place writes into clusters this image owns (COPIED), physically contiguous
        clusters coalesced into one pwrite; returns where the first other cluster starts."""
        cs = self.cluster_size
        mask = self.meta.l2_entries - 1
        while pos < span_end:
            cstart = pos & ~(cs - 1)
            idx = (pos >> self.cluster_bits) & mask
            entry = table[idx] if table is not None else 0
            if not _owned_data(entry, self.external_data):
                break
            n = min(span_end, cstart + cs) - pos
            host = l2_offset(entry) + (pos - cstart)
            while pos + n < span_end:  # extend across physically contiguous owned clusters
                nidx = idx + (n + pos - cstart) // cs
                nentry = table[nidx]  # type: ignore[index]
                if not (_owned_data(nentry, self.external_data) and l2_offset(nentry) == host - (pos - cstart) + (nidx - idx) * cs):
                    break
                n = min(span_end - pos, n + cs)
            self.write_data(mv[pos - base:pos - base + n], host, pos)
            pos += n
        return pos

    def _write_new_clusters(self, mv: memoryview, base: int, pos: int, span_end: int, l1_index: int,
                            table: list[int] | None) -> int:
        """A run of clusters that need new host clusters: allocated as one batch, partial first
        and last clusters filled from their current contents (copy-on-write), data written in
        one pwrite, then the L2 entries set and the old clusters' references queued."""
        cs = self.cluster_size
        mask = self.meta.l2_entries - 1
        first = pos & ~(cs - 1)
        run_end = first
        while run_end < span_end:
            entry = table[(run_end >> self.cluster_bits) & mask] if table is not None else 0
            if _owned_data(entry, self.external_data):
                break
            run_end += cs
            if run_end - first >= MAX_RUN_BYTES:
                break
        nclusters = (run_end - first) // cs
        wend = min(span_end, run_end)
        if pos == first and wend == run_end:  # whole clusters: write the caller's bytes, no copy
            buf: bytearray | memoryview = mv[pos - base:wend - base]
        else:
            buf = bytearray(nclusters * cs)
            if pos > first:
                buf[:cs] = self.read_cluster(first)
            last = run_end - cs
            if wend < run_end and (last > first or pos == first):
                buf[last - first:] = self.read_cluster(last)
            buf[pos - first:wend - first] = mv[pos - base:wend - base]
        meta = self.meta
        meta.writable_l2(l1_index)  # like QEMU: the L2 table is allocated before the data clusters
        host = self.alloc_data(first, nclusters)
        self.write_data(buf, host, first)
        # The run lies in one L2 table: fetch it once (allocation may have evicted it) and set
        # the entries together; the table marks itself dirty.
        l2 = meta.writable_l2(l1_index)
        idx = (first >> self.cluster_bits) & mask
        for i in range(nclusters):
            old = l2.data[idx + i]
            l2[idx + i] = (host + i * cs) | C.OFLAG_COPIED
            if old:
                meta.free_entry_later(old)  # may sync everything before dropping the old references
        return wend

    def alloc_data(self, guest: int, nclusters: int) -> int:
        """Host offset for ``nclusters`` new data clusters at guest offset ``guest``: with an
        external data file the guest offset itself (QEMU keeps them 1:1 and counts no
        references for them), otherwise newly allocated clusters of this file."""
        if self.external_data:
            return guest
        return self.meta.refcounts.alloc_clusters(nclusters)

    def write_compressed(self, data: bytes, offset: int) -> None:
        """Write one whole cluster compressed (the last cluster may be short: zero-padded).

        An empty write ends the file on a sector boundary, as QEMU's does (qemu-img convert -c
        makes one last)."""
        with self.lock:
            self.require_writable()
            if not data:
                self.meta.sync()
                fsize = self.file.size()
                if fsize % 512:
                    self.file.truncate((fsize + 511) & ~511)
                return
        self.write_compressed_many([(data, offset)])

    def write_compressed_many(self, items: list[tuple[bytes, int]]) -> None:
        """Several whole clusters, compressed on the worker pool and then stored in list order
        (the file layout is the one cluster-by-cluster writes give)."""
        write_compressed_many(self, items)

    def store_compressed(self, offset: int, comp: bytes) -> None:
        """Point the L2 entry of the cluster at ``offset`` at ``comp``, new compressed bytes."""
        meta = self.meta
        meta.writable_l2(offset >> (self.cluster_bits + meta.l2_bits))  # L2 before data, as QEMU
        host = meta.refcounts.alloc_bytes(len(comp))
        self.file.pwrite(comp, host)
        old = meta.set_l2_entry(offset, make_compressed_entry(host, len(comp), self.cluster_bits))
        meta.free_entry_later(old[0])

    def write_zeroes(self, length: int, offset: int, unmap: bool = False) -> None:
        """Make a range read as zeros, allocating like QEMU: on v3 a cluster becomes a zero cluster
        when the request covers it or the rest of it already reads as zeros (on v2 without a
        backing file it is unallocated instead, QEMU's discard fallback); otherwise (and always on
        v2 with a backing file) explicit zeros are written."""
        with self.lock:
            self.require_writable()
            self.check_range(offset, length)
            if not length:
                return
            self.begin_change()
            self.bitmaps.mark(offset, length)
            if self._ext is not None:
                if self.header.autoclear_features & C.AUTOCLEAR_DATA_FILE_RAW:
                    self.data.pwrite(bytes(length), offset)  # the raw data file stays a readable raw image
                self._ext.write_zeroes(length, offset, unmap)
                return
            cs = self.cluster_size
            end = offset + length
            pos = offset
            while pos < end:
                cstart = pos & ~(cs - 1)
                cend = min(cstart + cs, self.size)
                n = min(end, cend) - pos
                whole = pos == cstart and pos + n == cend
                if (self.header.version >= 3 or self.backing is None) and \
                        (whole or self.reads_zero(cstart, cend, pos, pos + n)):
                    if self.header.autoclear_features & C.AUTOCLEAR_DATA_FILE_RAW:
                        self.data.pwrite(bytes(n), pos)  # the raw data file stays a readable raw image
                    self._zero_cluster(cstart, unmap)
                else:  # as QEMU's fallback: explicit zeros, even where the range reads zero
                    self.pwrite(bytes(n), pos)
                pos += n

    def reads_zero(self, a: int, b: int, skip_a: int = 0, skip_b: int = 0) -> bool:
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
        entry = self.meta.l2_entry(cstart)[0]
        t = std_cluster_type(entry)
        plain = C.OFLAG_ZERO if self.header.version >= 3 else 0  # v2: no zero flag, unallocated
        if plain and not unmap and entry & C.OFLAG_COPIED and (t in (ClusterType.NORMAL, ClusterType.ZERO_ALLOC) or
                                                               _owned_data(entry, self.external_data)):
            new = entry | C.OFLAG_ZERO  # keep the preallocated host cluster
        else:
            new = plain
        if new != entry:
            old = self.meta.set_l2_entry(cstart, new)[0]
            if new == plain:
                self.meta.free_entry_later(old)

    def discard(self, length: int, offset: int) -> None:
        """Drop whole clusters (partial ones are left alone, as QEMU does).

        Discarded clusters read as zeros on v3 (zero flag) and on v2 without a backing file.
        On v2 with a backing file the request is ignored, as QEMU does: without a zero flag the
        clusters could only fall through and expose stale backing data.
        """
        with self.lock:
            self.require_writable()
            self.check_range(offset, length)
            if length:  # QEMU marks the whole request, whatever it could discard
                self.bitmaps.mark(offset, length)
            cs = self.cluster_size
            start = (offset + cs - 1) & ~(cs - 1)
            end = offset + length if offset + length == self.size else (offset + length) & ~(cs - 1)
            if end <= start or (self.header.version < 3 and self.backing is not None):
                return
            self.begin_change()
            new = C.OFLAG_ZERO if self.header.version >= 3 else 0
            for cstart in range(start, end, cs):
                if self._ext is not None:
                    self._ext.discard_cluster(cstart)
                    continue
                entry = self.meta.l2_entry(cstart)[0]
                t = std_cluster_type(entry)
                if self.backing is None and t in (ClusterType.UNALLOCATED, ClusterType.ZERO_PLAIN):
                    continue
                if entry == new:
                    continue
                old = self.meta.set_l2_entry(cstart, new)[0]
                self.meta.free_entry_later(old)

    # ------------------------------------------------------------------ flushing
    def flush(self) -> None:
        with self.lock:
            if self.writable and not self._closed:
                self.meta.sync()


def _owned_data(entry: int, external: bool = False) -> bool:
    """A normal cluster this image alone references: written in place (with an external data
    file, ``COPIED`` at host offset 0 is guest cluster 0's data, as QEMU reads it)."""
    return bool(entry & C.OFLAG_COPIED) and (std_cluster_type(entry) == ClusterType.NORMAL or
                                             (external and entry == C.OFLAG_COPIED))


def open_data_file(header: Header, name: str | None, writable: bool, cache: str,
                   force_share: bool) -> HostFile | None:
    """The external data file an image needs (QEMU's rules: the ``data-file`` option wins over
    the header's name, which is opened as given, relative to the working directory)."""
    if not header.incompatible_features & C.INCOMPAT_DATA_FILE:
        if name:
            raise InvalidArgument("'data-file' can only be set for images with an external data file")
        if header.autoclear_features & C.AUTOCLEAR_DATA_FILE_RAW:
            raise InvalidArgument("data-file-raw requires a data file")
        return None
    name = name or header.data_file
    if not name:
        raise InvalidArgument("'data-file' is required for this image")
    return HostFile(name, writable=writable, cache=cache, force_share=force_share)

