"""What opening an image refuses, in the order QEMU's qcow2_do_open refuses it.

Run before any table is read, so a hostile header fails with one clean message. ``check_mode``
is QEMU's BDRV_O_CHECK (qemu-img check's open): the snapshot table and a missing refcount
table are left to the check to report, as are tables running past the end of the file.
"""
from __future__ import annotations

from ..errors import CorruptImage, UnsupportedFeature
from ..format import bitmaps as B
from ..format import constants as C
from ..format.header import Header, unknown_incompatible_message
from ..format.snapshot import FIXED as SNAPSHOT_FIXED
from ..format.snapshot import read_entries
from .encryption import validate_method

MAX_BACKING_FORMAT = 15  # QEMU keeps the name in a 16-byte buffer with its terminating NUL


def validate_header(h: Header, fsize: int, check_mode: bool) -> None:
    """The header's own fields and its tables' placement (nothing is read from the file)."""
    cs = h.cluster_size
    validate_method(h)
    msg = unknown_incompatible_message(h)
    if msg:
        raise UnsupportedFeature(msg)
    if h.refcount_table_clusters == 0 and not check_mode:
        raise CorruptImage("Image does not contain a reference count table")
    _check_table(h.refcount_table_offset, h.refcount_table_clusters, cs, C.MAX_REFTABLE_SIZE_BYTES, cs,
                 fsize, "Reference count table", check_mode)
    if not check_mode:
        _check_table(h.snapshots_offset, h.nb_snapshots, SNAPSHOT_FIXED.size,
                     SNAPSHOT_FIXED.size * C.MAX_SNAPSHOTS, cs, None, "Snapshot table", check_mode)
    _check_table(h.l1_table_offset, h.l1_size, 8, C.MAX_L1_SIZE_BYTES, cs, fsize, "Active L1 table", check_mode)
    need = l1_entries_for(h, h.size)
    if need > C.INT_MAX:
        raise UnsupportedFeature("Image is too big")
    if h.l1_size < need:
        raise CorruptImage("L1 table is too small")
    _validate_extensions(h)


def validate_contents(h: Header, file, check_mode: bool) -> None:
    """What QEMU reads at open after the tables: the snapshot table (not in check mode) and the
    bitmap directory."""
    if not check_mode and h.nb_snapshots:
        # strict: extra data over QEMU's limit raises; past the end of the file reads zeros, as in QEMU
        for _ in read_entries(file.pread, h.snapshots_offset, h.nb_snapshots):
            pass
    ext = B.extension_of(h)
    if ext is not None and ext.nb_bitmaps:
        buf = file.pread(ext.directory_size, ext.directory_offset)  # zeros past the end, as QEMU reads
        msg = B.directory_error(buf, ext.nb_bitmaps, h.cluster_size, h.size & ~511)
        if msg:
            raise CorruptImage(msg)


def _validate_extensions(h: Header) -> None:
    for fmt in h.extensions:  # each copy, as QEMU reads them one by one
        if fmt.type == C.EXT_BACKING_FORMAT and len(fmt.data) > MAX_BACKING_FORMAT:
            raise CorruptImage(f"ERROR: ext_backing_format: len={len(fmt.data)} too large "
                               f"(>={MAX_BACKING_FORMAT + 1})")
    msg = B.extension_error(h, h.cluster_size)
    if msg:
        raise CorruptImage(msg)


def l1_entries_for(h: Header, size: int) -> int:
    """L1 entries a virtual size of ``size`` bytes needs."""
    span = h.cluster_size * (h.cluster_size // (16 if h.extended_l2 else 8))
    return (size + span - 1) // span


def _check_table(offset: int, entries: int, entry_size: int, max_bytes: int, cluster_size: int,
                 file_size: int | None, what: str, check_mode: bool) -> None:
    """QEMU's qcow2_validate_table, and (outside check mode, where qcowpy is stricter than QEMU)
    the end of the file."""
    size = entries * entry_size
    if size > max_bytes:
        raise CorruptImage(f"{what} too large")
    if offset & (cluster_size - 1) or offset + size > C.MAX_FILE_OFFSET:
        raise CorruptImage(f"{what} offset invalid")
    if file_size is not None and size and offset + size > file_size and not check_mode:
        raise CorruptImage(f"{what} lies past the end of the image file")
