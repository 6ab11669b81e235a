"""Metadata overlap checks: refuse any write that would land on qcow2 metadata it is not meant for.

QEMU runs ``qcow2_pre_write_overlap_check`` before every data and metadata write; its default
mode, ``overlap-check=cached``, checks the header, the active L1 and L2 tables, the refcount table
and blocks, the snapshot table, the snapshots' L1 tables and the bitmap directory (everything but
the snapshots' L2 tables, which would have to be read from disk). We check the same set.

A would-be overlap sets the corrupt bit on disk, stops every further write to the image and
raises :class:`~qcowpy.errors.CorruptImage` — the offending write never happens.

:class:`OverlapGuard` wraps the engine's host file. Writes are classified by what the engine
says it is doing, never guessed from their size or place: metadata caches announce their kind (an
L2 table may overwrite an active L2 table, a refcount block a refcount block), and the engine's own
header, L1-entry and refcount-table-entry updates announce theirs (:func:`write_metadata`); an
announcement covers exactly the next write. Every unannounced write (guest data, compressed
data, newly placed tables and blocks) must not touch any metadata at all — so a
hostile image whose data cluster points into the header, L1 table or refcount table is caught
whatever the size of the guest write.
"""
from __future__ import annotations

from dataclasses import dataclass, field

from ..errors import CorruptImage
from ..format import constants as C
from ..format.bitmaps import directory_location
from ..format.snapshot import read_entries
from ..kernels import find_offset_in

MAIN_HEADER = 1 << 0
ACTIVE_L1 = 1 << 1
ACTIVE_L2 = 1 << 2
REFCOUNT_TABLE = 1 << 3
REFCOUNT_BLOCK = 1 << 4
SNAPSHOT_TABLE = 1 << 5
INACTIVE_L1 = 1 << 6
INACTIVE_L2 = 1 << 7
BITMAP_DIRECTORY = 1 << 8
ALL = (1 << 9) - 1
CACHED = ALL & ~INACTIVE_L2  # QEMU's default overlap-check mode

NAMES = {
    MAIN_HEADER: "qcow2_header",
    ACTIVE_L1: "active L1 table",
    ACTIVE_L2: "active L2 table",
    REFCOUNT_TABLE: "refcount table",
    REFCOUNT_BLOCK: "refcount block",
    SNAPSHOT_TABLE: "snapshot table",
    INACTIVE_L1: "inactive L1 table",
    INACTIVE_L2: "inactive L2 table",
    BITMAP_DIRECTORY: "bitmap directory",
}

@dataclass
class Layout:
    """Where an image's metadata lives (offsets in bytes)."""

    cluster_size: int
    l1_offset: int = 0
    l1: list[int] = field(default_factory=list)
    reftable_offset: int = 0
    reftable: list[int] = field(default_factory=list)
    snapshots_offset: int = 0
    snapshots_size: int = 0
    snapshot_l1s: list[tuple[int, int]] = field(default_factory=list)  # (offset, entries)
    bitmap_directory: tuple[int, int] | None = None  # (offset, size)


def _overlaps(a: int, alen: int, b: int, blen: int) -> bool:
    return alen > 0 and blen > 0 and a < b + blen and b < a + alen


def find_overlap(layout: Layout, offset: int, size: int, ignore: int = 0, check: int = CACHED) -> int:
    """The first metadata kind (one bit) that ``[offset, offset+size)`` would overwrite, or 0."""
    chk = check & ~ignore
    if size <= 0:
        return 0
    cs = layout.cluster_size
    if chk & MAIN_HEADER and offset < cs:
        return MAIN_HEADER
    # QEMU compares whole clusters
    end = (offset + size + cs - 1) & ~(cs - 1)
    offset &= ~(cs - 1)
    size = end - offset
    if chk & ACTIVE_L1 and _overlaps(offset, size, layout.l1_offset, len(layout.l1) * 8):
        return ACTIVE_L1
    if chk & REFCOUNT_TABLE and _overlaps(offset, size, layout.reftable_offset, len(layout.reftable) * 8):
        return REFCOUNT_TABLE
    if chk & SNAPSHOT_TABLE and _overlaps(offset, size, layout.snapshots_offset, layout.snapshots_size):
        return SNAPSHOT_TABLE
    if chk & INACTIVE_L1:
        for off, n in layout.snapshot_l1s:
            if n and _overlaps(offset, size, off, n * 8):
                return INACTIVE_L1
    # find_offset_in (qcowpy.kernels): first nonzero ``entry & mask`` in [offset, end), or -1
    if chk & ACTIVE_L2 and find_offset_in(layout.l1, C.L1E_OFFSET_MASK, offset, end) >= 0:
        return ACTIVE_L2
    if chk & REFCOUNT_BLOCK and find_offset_in(layout.reftable, C.REFT_OFFSET_MASK, offset, end) >= 0:
        return REFCOUNT_BLOCK
    if chk & BITMAP_DIRECTORY and layout.bitmap_directory:
        if _overlaps(offset, size, *layout.bitmap_directory):
            return BITMAP_DIRECTORY
    return 0


def announce(file, kind: int) -> None:
    """Tell the overlap guard under ``file`` (if any) that its next write updates metadata of
    ``kind`` (one of the bits above): the engine's own header, L1-entry and refcount-table-entry
    writes call this; guest data writes never do."""
    hook = getattr(file, "announce", None)
    if hook is not None:
        hook(kind)


def write_metadata(file, kind: int, data, offset: int) -> None:
    """Write ``data`` at ``offset`` as the engine's own update of metadata of ``kind``. The data is
    computed before the announcement, so an announcement can never outlive its write."""
    announce(file, kind)
    file.pwrite(data, offset)


def overlap_message(kind: int) -> str:
    return f"Preventing invalid write on metadata (overlaps with {NAMES[kind]})"


def snapshot_layout(file, header) -> tuple[int, list[tuple[int, int]]]:
    """(snapshot table size in bytes, [(L1 offset, L1 entries)]) — empty if unreadable."""
    if not header.nb_snapshots or header.nb_snapshots > C.MAX_SNAPSHOTS:
        return 0, []
    try:
        entries = list(read_entries(file.pread, header.snapshots_offset, header.nb_snapshots,
                                    limit=max(0, file.size() - header.snapshots_offset)))
    except Exception:  # noqa: BLE001 - a broken table protects nothing; open/check report it
        return 0, []
    return entries[-1].end, [(e.sn.l1_table_offset, e.sn.l1_size) for e in entries]


class OverlapGuard:
    """A host file stand-in that checks every write of an image against its metadata.

    ``owner`` (the image's Metadata) supplies the layout: ``header``, ``cluster_size``, ``l1``
    and ``refcounts``; a tripped guard clears its ``writable``."""

    def __init__(self, file, owner):
        self._file = file
        self._image = owner
        self.pread = file.pread  # reads need no check: bound directly, no __getattr__ per call
        self.preadinto = file.preadinto
        self._pending = 0
        self._snapshots: tuple[int, list[tuple[int, int]]] | None = None
        self.tripped: str | None = None

    def __getattr__(self, name):
        return getattr(self._file, name)

    @property
    def dirty(self) -> bool:
        return self._file.dirty

    @dirty.setter
    def dirty(self, value: bool) -> None:
        self._file.dirty = value

    def announce(self, kind: int) -> None:
        """The next write is the engine's own update of metadata of ``kind`` (see :func:`announce`)."""
        self._pending = kind

    def snapshots_changed(self) -> None:
        """The snapshot table moved or changed: read its layout again at the next check."""
        self._snapshots = None

    def layout(self) -> Layout:
        img = self._image
        h = img.header
        if self._snapshots is None:
            self._snapshots = snapshot_layout(self._file, h)
        rc = getattr(img, "refcounts", None)
        return Layout(img.cluster_size, h.l1_table_offset, getattr(img, "l1", []),
                      rc.table_offset if rc else h.refcount_table_offset, rc.table if rc else [],
                      h.snapshots_offset, self._snapshots[0], self._snapshots[1], directory_location(h))

    def pwrite(self, data, offset: int) -> None:
        self._check(offset, len(memoryview(data).cast("B")))
        self._file.pwrite(data, offset)

    def punch(self, offset: int, length: int) -> bool:
        """Deallocate host bytes (freed clusters): checked like a data write, never metadata."""
        self._check(offset, length)
        punch = getattr(self._file, "punch", None)
        return bool(punch(offset, length)) if punch is not None else False

    def _check(self, offset: int, size: int) -> None:
        if self.tripped:
            raise CorruptImage(f"qcow2: image is marked corrupt after an invalid write was prevented "
                               f"({self.tripped}); no further writes")
        ignore, self._pending = self._pending, 0
        kind = find_overlap(self.layout(), offset, size, ignore)
        if kind:
            self._trip(overlap_message(kind))

    @property
    def raw_file(self):
        """The host file under the guard (for the one write a tripped image still makes)."""
        return self._file

    def _trip(self, message: str) -> None:
        self.tripped = message
        raise CorruptImage(self._image.mark_corrupt(message))

