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
