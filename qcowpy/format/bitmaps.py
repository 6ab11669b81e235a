"""The persistent-bitmaps header extension, the bitmap directory and bitmap table entries."""
from __future__ import annotations

import struct
from dataclasses import dataclass

from ..errors import CorruptImage
from . import constants as C

EXTENSION = struct.Struct(">IIQQ")  # nb_bitmaps, reserved, directory size, directory offset
DIR_ENTRY = struct.Struct(">QIIBBHI")  # table offset, table size, flags, type, granularity bits, name size, extra
TABLE_OFFSET_MASK = 0x00FFFFFFFFFFFE00  # BME_TABLE_ENTRY_OFFSET_MASK
TABLE_RESERVED_MASK = 0xFF000000000001FE
TABLE_FLAG_ALL_ONES = 1
MAX_TABLE_SIZE = 0x8000000  # entries (BME_MAX_TABLE_SIZE)
MAX_DIRECTORY_READ = 64 << 20  # what we read of a directory at most


@dataclass(frozen=True)
class BitmapsExtension:
    nb_bitmaps: int
    directory_size: int
    directory_offset: int


@dataclass(frozen=True)
class DirectoryEntry:
    table_offset: int
    table_size: int  # entries
    flags: int
    type: int
    granularity_bits: int
    name_size: int
    extra_data_size: int
    name: bytes  # cut short when the buffer ends inside it


def parse_extension(data: bytes) -> BitmapsExtension | None:
    """The extension's fields, or None when it is too short to hold them."""
    if len(data) < EXTENSION.size:
        return None
    nb, _reserved, size, offset = EXTENSION.unpack_from(data)
    return BitmapsExtension(nb, size, offset)


def extension_of(header) -> BitmapsExtension | None:
    """The bitmaps extension of a header whose autoclear bit says it is valid (else QEMU ignores it)."""
    if not header.autoclear_features & C.AUTOCLEAR_BITMAPS:
        return None
    ext = header.find_extension(C.EXT_BITMAPS)
    return parse_extension(ext.data) if ext is not None else None


def directory_location(header) -> tuple[int, int] | None:
    """(offset, size) of the bitmap directory, when the image has valid bitmaps."""
    ext = extension_of(header)
    return (ext.directory_offset, ext.directory_size) if ext and ext.nb_bitmaps else None


def parse_directory(buf: bytes, count: int, partial: bool = False) -> list[DirectoryEntry]:
    """Decode ``count`` directory entries (each 8-byte aligned). A buffer that ends before an
    entry's fixed part raises, or with ``partial`` ends the list there."""
    out: list[DirectoryEntry] = []
    pos = 0
    for _ in range(count):
        if pos + DIR_ENTRY.size > len(buf):
            if partial:
                return out
            raise CorruptImage("Bitmap directory is truncated")
        t_off, t_size, flags, btype, gran, name_size, extra = DIR_ENTRY.unpack_from(buf, pos)
        name_at = pos + DIR_ENTRY.size + extra
        out.append(DirectoryEntry(t_off, t_size, flags, btype, gran, name_size, extra,
                                  bytes(buf[name_at:name_at + name_size])))
        pos = (name_at + name_size + 7) & ~7
    return out


MAX_BITMAPS = 65535  # QCOW2_MAX_BITMAPS
MAX_DIRECTORY_SIZE = 1024 * MAX_BITMAPS
RESERVED_FLAGS = 0xFFFFFFFC  # every flag but in_use and auto
FLAG_IN_USE = 1
MIN_GRANULARITY_BITS, MAX_GRANULARITY_BITS = 9, 31
MAX_NAME_SIZE = 1023
MAX_PHYS_SIZE = 0x20000000  # bytes of bitmap table a bitmap may describe
TYPE_DIRTY_TRACKING = 1


def extension_error(header, cluster_size: int) -> str | None:
    """Why QEMU refuses to open an image for its bitmaps extension (None if it does not):
    a wrong length always, the field values only when the autoclear bit says it is valid."""
    ext = header.find_extension(C.EXT_BITMAPS)
    if ext is None:
        return None
    if len(ext.data) != EXTENSION.size:
        return "bitmaps_ext: Invalid extension length"
    if not header.autoclear_features & C.AUTOCLEAR_BITMAPS:
        return None
    nb, reserved, size, offset = EXTENSION.unpack_from(ext.data)
    if reserved:
        return "bitmaps_ext: Reserved field is not zero"
    if nb > MAX_BITMAPS:
        return f"bitmaps_ext: Image has {nb} bitmaps, exceeding the QEMU supported maximum of {MAX_BITMAPS}"
    if nb == 0:
        return "found bitmaps extension with zero bitmaps"
    if offset & (cluster_size - 1):
        return "bitmaps_ext: invalid bitmap directory offset"
    if size > MAX_DIRECTORY_SIZE:
        return (f"bitmaps_ext: bitmap directory size ({size}) exceeds the maximum supported size "
                f"({MAX_DIRECTORY_SIZE})")
    return None


def _entry_fits(e: DirectoryEntry, cluster_size: int, virtual_size: int) -> bool:
    """The constraints QEMU puts on one directory entry before it loads the bitmap."""
    if not e.table_size or not e.table_offset or e.table_offset & (cluster_size - 1) \
            or e.table_size > MAX_TABLE_SIZE or not MIN_GRANULARITY_BITS <= e.granularity_bits <= MAX_GRANULARITY_BITS \
            or e.flags & RESERVED_FLAGS or e.name_size > MAX_NAME_SIZE or e.type != TYPE_DIRTY_TRACKING:
        return False
    phys = e.table_size * cluster_size
    if phys > MAX_PHYS_SIZE:
        return False
    return bool(e.flags & FLAG_IN_USE) or virtual_size <= (phys * 8) << e.granularity_bits


def directory_error(buf: bytes, nb_bitmaps: int, cluster_size: int, virtual_size: int) -> str | None:
    """Why QEMU refuses the bitmap directory ``buf`` (the whole directory, zeros where it lies
    past the end of the file, as QEMU reads it) when it loads the bitmaps at open; None if not."""
    if not buf:
        return "Requested bitmap directory size is zero"
    pos = count = 0
    while pos < len(buf):
        if pos + DIR_ENTRY.size > len(buf):
            return "Broken bitmap directory"
        count += 1
        if count > nb_bitmaps:
            return "More bitmaps found than specified in header extension"
        e = parse_directory(buf[pos:], 1)[0]
        end = (pos + DIR_ENTRY.size + e.extra_data_size + e.name_size + 7) & ~7
        if end > len(buf):
            return "Broken bitmap directory"
        if e.extra_data_size:
            return "Bitmap extra data is not supported"
        if not _entry_fits(e, cluster_size, virtual_size):
            return f"Bitmap '{e.name.decode('utf-8', 'replace')}' doesn't satisfy the constraints"
        pos = end
    if count != nb_bitmaps:
        return "Less bitmaps found than specified in header extension"
    return None


# ---------------------------------------------------------------------- writing, and bitmap data
FLAG_AUTO = 2  # the bitmap is enabled: writes mark it
DEFAULT_GRANULARITY_MIN, DEFAULT_GRANULARITY_MAX = 4096, 65536


def pack_extension(nb_bitmaps: int, directory_size: int, directory_offset: int) -> bytes:
    return EXTENSION.pack(nb_bitmaps, 0, directory_size, directory_offset)


def entry_size(name_size: int, extra_data_size: int = 0) -> int:
    """Bytes one directory entry takes, 8-byte aligned (QEMU's calc_dir_entry_size)."""
    return (DIR_ENTRY.size + name_size + extra_data_size + 7) & ~7


def pack_directory(entries: list[DirectoryEntry]) -> bytes:
    """The directory bytes for ``entries`` (no extra data: QEMU writes none)."""
    out = bytearray()
    for e in entries:
        out += DIR_ENTRY.pack(e.table_offset, e.table_size, e.flags, e.type, e.granularity_bits,
                              len(e.name), 0) + e.name
        out += bytes(-len(out) % 8)
    return bytes(out)


def data_bytes(virtual_size: int, granularity_bits: int) -> int:
    """Serialized bitmap bytes for an image of ``virtual_size``: one bit per granule, in whole
    64-bit words (QEMU's hbitmap serialization unit)."""
    bits = -(-virtual_size >> granularity_bits) if virtual_size else 0
    return -(-bits // 64) * 8


def table_entries(virtual_size: int, granularity_bits: int, cluster_size: int) -> int:
    """Bitmap table entries (clusters of serialized data) for an image of ``virtual_size``."""
    return -(-data_bytes(virtual_size, granularity_bits) // cluster_size)


def table_entry_valid(entry: int, cluster_size: int) -> bool:
    """QEMU's check_table_entry: no reserved bits; with an offset, aligned and no all-ones flag."""
    if entry & TABLE_RESERVED_MASK:
        return False
    off = entry & TABLE_OFFSET_MASK
    return not off or not (entry & TABLE_FLAG_ALL_ONES or off & (cluster_size - 1))


def bytes_needed(virtual_size: int, granularity: int) -> int:
    """QEMU's get_bitmap_bytes_needed: whole bytes of bits for ``virtual_size``."""
    return -(-(-(-virtual_size // granularity)) // 8)


def constraints_error(name: bytes, granularity: int, virtual_size: int, cluster_size: int) -> str | None:
    """Why QEMU's check_constraints_on_bitmap refuses a bitmap (None if it does not)."""
    gbits = granularity.bit_length() - 1
    if gbits > MAX_GRANULARITY_BITS:
        return f"Granularity exceeds maximum ({1 << MAX_GRANULARITY_BITS} bytes)"
    if gbits < MIN_GRANULARITY_BITS:
        return f"Granularity is under minimum ({1 << MIN_GRANULARITY_BITS} bytes)"
    nbytes = bytes_needed(virtual_size, granularity)
    if nbytes > MAX_PHYS_SIZE or nbytes > MAX_TABLE_SIZE * cluster_size:
        return "Too much space will be occupied by the bitmap. Use larger granularity"
    if len(name) > MAX_NAME_SIZE:
        return f"Name length exceeds maximum ({MAX_NAME_SIZE} characters)"
    return None


def set_bits(buf: bytearray, first: int, end: int) -> None:
    """Set bits [first, end) of a little-endian bit array (bit i is bit i%8 of byte i//8)."""
    if first >= end:
        return
    fa, fb = first >> 3, end >> 3
    if fa == fb:
        buf[fa] |= ((1 << (end - first)) - 1) << (first & 7)
        return
    buf[fa] |= (0xFF << (first & 7)) & 0xFF
    if fb > fa + 1:
        buf[fa + 1:fb] = b"\xff" * (fb - fa - 1)
    if end & 7:
        buf[fb] |= (1 << (end & 7)) - 1


def clip_bits(buf: bytearray, nbits: int) -> None:
    """Clear every bit from ``nbits`` on (what lies past the end of the image)."""
    full = nbits >> 3
    if full < len(buf):
        if nbits & 7:
            buf[full] &= (1 << (nbits & 7)) - 1
            full += 1
        buf[full:] = bytes(len(buf) - full)


def dirty_runs(buf: bytes, nbits: int) -> list[tuple[int, int]]:
    """(first bit, count) runs of set bits below ``nbits``."""
    value = int.from_bytes(buf, "little") & ((1 << nbits) - 1)
    runs = []
    pos = 0
    while value:
        low = (value & -value).bit_length() - 1  # next set bit
        value >>= low
        pos += low
        ones = (~value & (value + 1)).bit_length() - 1  # length of the run of ones
        runs.append((pos, ones))
        value >>= ones
        pos += ones
    return runs
