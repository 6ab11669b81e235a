"""Persistent dirty bitmaps: QEMU's qcow2-bitmap.c semantics over the metadata owner.

An image's bitmaps are read from the bitmap directory at open (and their tables checked, as
QEMU's load does, so a damaged one refuses the open). On a read-write image the first change
(a guest write, a bitmap operation, a resize...) *activates* them: every consistent bitmap's
data is loaded into memory and its ``in_use`` flag is set in the directory on disk, with a
barrier, before anything else is written. From then on every written, zeroed or discarded
range sets bits in the enabled bitmaps. :meth:`Bitmaps.store` (at close) writes each bitmap
anew and switches to it:

1. data clusters and bitmap tables go to newly allocated clusters, and a new directory too;
2. ``Metadata.sync()``: their refcounts reach the disk, then a barrier;
3. the header (bitmaps extension and autoclear bit) is rewritten to name the new directory,
   then a barrier;
4. only then are the old directory, tables and data clusters freed (``free_later`` + sync).

A kill at any write leaves either the old directory (its bitmaps ``in_use``: inconsistent, as
QEMU leaves them after a crash) or the new one, and at most leaked clusters. Bitmaps found
``in_use`` at open are inconsistent: writes do not touch them, store keeps their entries as
they are, and only ``remove`` (or ``convert --skip-broken-bitmaps``) gets rid of them.
"""
from __future__ import annotations

from contextlib import contextmanager
from dataclasses import dataclass, replace
from typing import Iterator

from ..errors import CorruptImage, QcowError, UnsupportedFeature, with_hint
from ..format import bitmaps as B
from ..format import constants as C
from ..format.entries import pack_table, unpack_table
from .overlap import BITMAP_DIRECTORY, write_metadata

INCONSISTENT_HINT = "Try block-dirty-bitmap-remove to delete this bitmap from disk"


class BitmapError(QcowError):
    """A bitmap operation QEMU refuses (the message is QEMU's, without the operation prefix)."""


@dataclass
class Bitmap:
    """One persistent bitmap as this open image holds it."""

    name: bytes
    granularity_bits: int
    enabled: bool
    inconsistent: bool  # in_use when the image was opened: its data cannot be trusted
    entry: B.DirectoryEntry | None = None  # its directory entry on disk, None if not stored yet
    data: bytearray | None = None  # serialized bits (LSB first), loaded on demand

    @property
    def granularity(self) -> int:
        return 1 << self.granularity_bits

    @property
    def display(self) -> str:
        return self.name.decode("utf-8", "replace")


class Bitmaps:
    """The persistent bitmaps of one qcow2 image (``Qcow2Image.bitmaps``)."""

    def __init__(self, meta, size: int, node_name: str = "#block0"):
        self.meta = meta
        self.size = size
        self.node_name = node_name
        self.items: list[Bitmap] = []
        self.active = False  # in_use set on disk and data in memory: store at close
        self._dropped: list[B.DirectoryEntry] = []
        self._quiet = 0  # > 0 inside unmarked()  # removed bitmaps whose clusters are still referenced
        for e in self.disk_entries():
            if any(b.name == e.name for b in self.items):
                raise CorruptImage(f"Bitmap already exists: {e.name.decode('utf-8', 'replace')}")
            bm = Bitmap(e.name, e.granularity_bits, bool(e.flags & B.FLAG_AUTO),
                        bool(e.flags & B.FLAG_IN_USE), e)
            if not bm.inconsistent:
                self._check_table(bm)
            self.items.append(bm)

    # ------------------------------------------------------------------ reading
    def disk_entries(self) -> list[B.DirectoryEntry]:
        """The directory entries on disk (the header's extension, validated at open)."""
        loc = B.directory_location(self.meta.header)
        if loc is None:
            return []
        offset, size = loc
        ext = B.extension_of(self.meta.header)
        return B.parse_directory(self._read(size, offset), ext.nb_bitmaps)  # type: ignore[union-attr]

    def _read(self, length: int, offset: int) -> bytes:
        data = self.meta.file.pread(length, offset)
        return data + bytes(length - len(data))  # past the end of the file reads zeros, as in QEMU

    def _table(self, e: B.DirectoryEntry) -> list[int]:
        return unpack_table(self._read(e.table_size * 8, e.table_offset))

    def _check_table(self, bm: Bitmap) -> None:
        """What QEMU's load_bitmap refuses: a bad table entry, or a table of the wrong size."""
        e = bm.entry
        assert e is not None
        if not all(B.table_entry_valid(t, self.meta.cluster_size) for t in self._table(e)):
            raise CorruptImage(f"Could not read bitmap_table table from image for bitmap '{bm.display}': "
                               "Invalid argument")
        if B.table_entries(self.size, bm.granularity_bits, self.meta.cluster_size) != e.table_size:
            raise CorruptImage(f"Could not read bitmap '{bm.display}' from image: Invalid argument")

    def data(self, bm: Bitmap) -> bytearray:
        """The bitmap's bits (loaded from the image the first time)."""
        if bm.data is None:
            n = B.data_bytes(self.size, bm.granularity_bits)
            buf = bytearray(n)
            if bm.entry is not None and not bm.inconsistent:
                cs = self.meta.cluster_size
                for i, t in enumerate(self._table(bm.entry)):
                    start = i * cs
                    if start >= n:
                        break
                    off = t & B.TABLE_OFFSET_MASK
                    if off:
                        buf[start:start + cs] = self._read(cs, off)[:n - start]
                    elif t & B.TABLE_FLAG_ALL_ONES:
                        buf[start:start + cs] = b"\xff" * min(cs, n - start)
                B.clip_bits(buf, self.nbits(bm))
            bm.data = buf
        return bm.data

    def nbits(self, bm: Bitmap) -> int:
        return -(-self.size >> bm.granularity_bits)

    def find(self, name: bytes) -> Bitmap | None:
        for bm in self.items:
            if bm.name == name:
                return bm
        return None

    def lookup(self, name: bytes) -> Bitmap:
        bm = self.find(name)
        if bm is None:
            raise BitmapError(f"Dirty bitmap '{name.decode('utf-8', 'replace')}' not found")
        return bm

    def dirty_runs(self, bm: Bitmap) -> list[tuple[int, int]]:
        """(offset, length) byte ranges the bitmap marks dirty (whole granules, clipped to the size)."""
        g = bm.granularity_bits
        return [(first << g, min(self.size, (first + n) << g) - (first << g))
                for first, n in B.dirty_runs(self.data(bm), self.nbits(bm))]

    # ------------------------------------------------------------------ tracking writes
    def activate(self) -> None:
        """Before the first change of a read-write image: load every consistent bitmap and mark
        it in_use on disk (the directory rewritten in place, then a barrier), as QEMU's open does.
        Only flag words change, so a torn write leaves each entry either flagged or not."""
        if self.active or not self.meta.writable or not self.items:
            return
        self.active = True
        entries = self.disk_entries()
        if not any(not e.flags & B.FLAG_IN_USE for e in entries):
            return
        for bm in self.items:
            if not bm.inconsistent:
                self.data(bm)
        marked = [replace(e, flags=e.flags | B.FLAG_IN_USE) for e in entries]
        offset, size = B.directory_location(self.meta.header)  # type: ignore[misc]
        raw = B.pack_directory(marked)
        assert len(raw) == size
        self.meta.file.flush()
        write_metadata(self.meta.file, BITMAP_DIRECTORY, raw, offset)
        self.meta.file.flush()

    @contextmanager
    def unmarked(self) -> Iterator[None]:
        """Writes inside the block are the driver's own (QEMU's resize zeroing a grown area):
        they set no bits."""
        self._quiet += 1
        try:
            yield
        finally:
            self._quiet -= 1

    def mark(self, offset: int, length: int) -> None:
        """A write, zeroing or discard of [offset, offset+length): set the enabled bitmaps' bits."""
        if not length or not self.items or self._quiet:
            return
        self.activate()
        for bm in self.items:
            if bm.enabled and not bm.inconsistent:
                g = bm.granularity_bits
                B.set_bits(self.data(bm), offset >> g, ((offset + length - 1) >> g) + 1)

    def check_resizable(self) -> None:
        """QEMU's truncate check: an image whose bitmaps are not all usable keeps its size."""
        for bm in self.items:
            self._usable(bm)

    def resize(self, new_size: int) -> None:
        """The image's size changed: the bits of the new area are clear, those past a smaller
        end are dropped."""
        self.activate()
        for bm in self.items:
            data = self.data(bm)
            n = B.data_bytes(new_size, bm.granularity_bits)
            del data[n:]
            data.extend(bytes(n - len(data)))
            B.clip_bits(data, -(-new_size >> bm.granularity_bits))
        self.size = new_size

    # ------------------------------------------------------------------ operations (qemu-img bitmap)
    @staticmethod
    def _usable(bm: Bitmap) -> None:
        if bm.inconsistent:
            raise BitmapError(with_hint(f"Bitmap '{bm.display}' is inconsistent and cannot be used",
                                        INCONSISTENT_HINT))

    def default_granularity(self) -> int:
        return max(B.DEFAULT_GRANULARITY_MIN, min(B.DEFAULT_GRANULARITY_MAX, self.meta.cluster_size))

    def add(self, name: bytes, granularity: int | None = None, disabled: bool = False) -> Bitmap:
        """QMP block-dirty-bitmap-add with persistent=true, in QEMU's order of checks."""
        if not name:
            raise BitmapError("Bitmap name cannot be empty")
        if granularity is not None and (granularity < 512 or granularity & (granularity - 1)):
            raise BitmapError("Granularity must be power of 2 and at least 512")
        gran = granularity or self.default_granularity()
        if self.find(name) is not None:
            raise BitmapError(f"Bitmap already exists: {name.decode('utf-8', 'replace')}")
        prefix = f"Can't make bitmap '{name.decode('utf-8', 'replace')}' persistent in '{self.node_name}': "
        if self.meta.header.version < 3:
            raise BitmapError(prefix + "Cannot store dirty bitmaps in qcow2 v2 files")
        msg = B.constraints_error(name, gran, self.size, self.meta.cluster_size)
        if msg:
            raise BitmapError(prefix + msg)
        if len(self.items) + 1 > B.MAX_BITMAPS:
            raise BitmapError(prefix + "Maximum number of persistent bitmaps is already reached")
        if sum(B.entry_size(len(b.name)) for b in self.items) + B.entry_size(len(name)) > B.MAX_DIRECTORY_SIZE:
            raise BitmapError(prefix + "Not enough space in the bitmap directory")
        self.activate()
        gbits = gran.bit_length() - 1
        bm = Bitmap(name, gbits, not disabled, False, None, bytearray(B.data_bytes(self.size, gbits)))
        self.items.append(bm)
        self.active = True
        return bm

    def remove(self, name: bytes) -> None:
        bm = self.lookup(name)
        self.activate()
        self.items.remove(bm)
        if bm.entry is not None:
            self._dropped.append(bm.entry)

    def clear(self, name: bytes) -> None:
        bm = self.lookup(name)
        self._usable(bm)
        self.activate()
        bm.data = bytearray(B.data_bytes(self.size, bm.granularity_bits))

    def set_enabled(self, name: bytes, enabled: bool) -> None:
        bm = self.lookup(name)
        self._usable(bm)
        self.activate()
        bm.enabled = enabled

    def merge(self, target: bytes, source: "Bitmaps", source_name: bytes) -> None:
        """OR ``source_name`` of ``source`` (this image's bitmaps, or another image's) into ``target``."""
        dst = self.lookup(target)
        src = source.lookup(source_name)
        self._usable(dst)
        self._usable(src)
        if source.size != self.size:
            raise BitmapError(f"Bitmaps are of different sizes (destination size is {self.size}, source size "
                              f"is {source.size}) and can't be merged")
        self.activate()
        merged = merge_bits(self.data(dst), dst.granularity_bits, source.data(src), src.granularity_bits,
                            self.size)
        dst.data = merged

    # ------------------------------------------------------------------ storing
    def store(self) -> None:
        """Write every consistent bitmap anew and switch the header to the new directory (see the
        module docstring for the order); inconsistent bitmaps keep their entries."""
        if not self.active:
            return
        if all(b.inconsistent for b in self.items) and not self._dropped:
            self.active = False  # nothing QEMU would write: only inconsistent bitmaps, kept as they are
            return
        meta = self.meta
        cs = meta.cluster_size
        old_loc = B.directory_location(meta.header)
        freed: list[tuple[int, int]] = []
        entries: list[B.DirectoryEntry] = []
        # QEMU's order: the directory's bitmaps as they were, then the new ones newest first (its
        # list of in-memory bitmaps is built by inserting at the head)
        order = [b for b in self.items if b.entry is not None] + [b for b in reversed(self.items) if b.entry is None]
        for bm in order:
            if bm.inconsistent:
                assert bm.entry is not None
                entries.append(bm.entry)
                continue
            if bm.entry is not None:
                freed += self._clusters_of(bm.entry)
            entries.append(self._store_one(bm))
        for e in self._dropped:
            freed += self._clusters_of(e)
        h = meta.header.copy()
        if entries:
            raw = B.pack_directory(entries)
            if len(raw) > B.MAX_DIRECTORY_SIZE:
                raise QcowError("Bitmap directory is too large")
            dir_off = meta.refcounts.alloc_clusters(meta.clusters_for(len(raw)))
            meta.file.pwrite(raw, dir_off)
            h.set_extension(C.EXT_BITMAPS, B.pack_extension(len(entries), len(raw), dir_off))
            h.autoclear_features |= C.AUTOCLEAR_BITMAPS
        else:
            h.set_extension(C.EXT_BITMAPS, None)
            h.autoclear_features &= ~C.AUTOCLEAR_BITMAPS
        meta.sync()  # new clusters counted on disk, and written, before the header names them
        meta.rewrite_header(h)
        meta.file.flush()
        if old_loc is not None:
            freed.append((old_loc[0], meta.clusters_for(old_loc[1]) * cs))
        for offset, length in freed:
            meta.free_later(offset, length)
        meta.sync()
        self._dropped = []
        self.active = False
        on_disk = {e.name: e for e in entries}
        for bm in self.items:
            bm.entry = on_disk[bm.name]

    def _store_one(self, bm: Bitmap) -> B.DirectoryEntry:
        meta, cs = self.meta, self.meta.cluster_size
        data = self.data(bm)
        n_entries = B.table_entries(self.size, bm.granularity_bits, cs)
        table = [0] * n_entries
        for i in range(n_entries):
            chunk = data[i * cs:(i + 1) * cs]
            if any(chunk):
                off = meta.refcounts.alloc_clusters(1)
                meta.file.pwrite(bytes(chunk) + bytes(cs - len(chunk)), off)
                table[i] = off
        t_off = meta.refcounts.alloc_clusters(meta.clusters_for(n_entries * 8))
        meta.file.pwrite(pack_table(table), t_off)
        return B.DirectoryEntry(t_off, n_entries, B.FLAG_AUTO if bm.enabled else 0, B.TYPE_DIRTY_TRACKING,
                                bm.granularity_bits, len(bm.name), 0, bm.name)

    def _clusters_of(self, e: B.DirectoryEntry) -> list[tuple[int, int]]:
        """(offset, length) of an on-disk bitmap's table and data clusters."""
        cs, end = self.meta.cluster_size, self.meta.file.size()
        out = [(t & B.TABLE_OFFSET_MASK, cs) for t in self._table(e)
               if t & B.TABLE_OFFSET_MASK and B.table_entry_valid(t, cs)]
        out.append((e.table_offset, self.meta.clusters_for(e.table_size * 8) * cs))
        return [(off, n) for off, n in out if off < end]  # nothing past the end of the file is counted


def merge_bits(dst: bytearray, dst_bits: int, src: bytes, src_bits: int, size: int) -> bytearray:
    """``dst`` OR ``src`` in ``dst``'s granularity (QEMU's hbitmap_merge: a granule of the
    result is set where any byte it covers is set in either)."""
    if dst_bits == src_bits:
        n = len(dst)
        return bytearray((int.from_bytes(dst, "little") | int.from_bytes(src, "little")).to_bytes(n, "little"))
    out = bytearray(dst)
    for first, count in B.dirty_runs(src, -(-size >> src_bits)):
        a, b = first << src_bits, min(size, (first + count) << src_bits)
        B.set_bits(out, a >> dst_bits, ((b - 1) >> dst_bits) + 1)
    return out


def unsupported_bitmaps(node_name: str) -> UnsupportedFeature:
    """What adding a persistent bitmap to a format without them says (QEMU's ENOTSUP)."""
    return UnsupportedFeature(f"Can't store persistent bitmaps to {node_name}: Operation not supported")


__all__ = ["Bitmap", "BitmapError", "Bitmaps", "INCONSISTENT_HINT", "merge_bits", "unsupported_bitmaps"]
