"""Snapshot table entries: the one reader (strict for the engine, lenient for check) and the writer."""
from __future__ import annotations

import struct
from dataclasses import dataclass
from typing import Callable, Iterator

from ..errors import CorruptImage, with_hint
from . import constants as C

FIXED = struct.Struct(">QIHHIIQII")  # 40 bytes
MAX_EXTRA_DATA = 1024
MAX_TABLE_SIZE = 1024 * C.MAX_SNAPSHOTS  # QCOW_MAX_SNAPSHOTS_SIZE: what QEMU reads of a table
# QEMU's hint line after the error (printed unprefixed on the next line)
EXTRA_DATA_HINT = "You can force-remove this extra metadata with qemu-img check -r all"


@dataclass
class Snapshot:
    l1_table_offset: int
    l1_size: int
    id_str: str
    name: str
    date_sec: int = 0
    date_nsec: int = 0
    vm_clock_nsec: int = 0
    vm_state_size: int = 0
    extra_data: bytes = b""

    @property
    def vm_state_size_large(self) -> int:
        return struct.unpack_from(">Q", self.extra_data, 0)[0] if len(self.extra_data) >= 8 else self.vm_state_size

    @property
    def disk_size(self) -> int | None:
        return struct.unpack_from(">Q", self.extra_data, 8)[0] if len(self.extra_data) >= 16 else None

    @property
    def icount(self) -> int | None:
        return struct.unpack_from(">Q", self.extra_data, 16)[0] if len(self.extra_data) >= 24 else None


@dataclass
class StoredEntry:
    """One table entry as stored: its id and name as the bytes on disk, and where it ends."""

    sn: Snapshot
    id_b: bytes
    name_b: bytes
    extra_len: int  # as stored; ``sn.extra_data`` holds at most MAX_EXTRA_DATA of it (lenient reads)
    start: int  # offset of the entry within the table
    end: int  # offset just past its name (the table's size, after the last entry)

    @property
    def id_str(self) -> str:
        return self.id_b.decode("utf-8", "replace")

    @property
    def name(self) -> str:
        return self.name_b.decode("utf-8", "replace")


def cstr(raw: bytes) -> bytes:
    """An id or name as QEMU holds it: a C string, so it ends at the first NUL (for display,
    lookups, and the table QEMU rewrites with ``strlen``)."""
    return raw.split(b"\0", 1)[0]


def read_entries(pread: Callable[[int, int], bytes], offset: int, count: int, lenient: bool = False,
                 limit: int | None = None) -> Iterator[StoredEntry]:
    """The one snapshot-table reader: ``count`` entries from ``offset``, each 8-byte aligned.

    Strict (the engine, as QEMU's qcow2_read_snapshots): extra data over MAX_EXTRA_DATA raises.
    ``lenient`` (check): such an entry is yielded with its extra data cut to MAX_EXTRA_DATA and
    ``extra_len`` telling the truth, for the caller to report or repair. With ``limit`` (bytes
    available from ``offset``) an entry running past it raises instead of reading zeros.
    """
    pos = 0
    table_length = 0
    for i in range(count):
        pos = (pos + 7) & ~7
        table_length = (table_length + 7) & ~7
        if limit is not None and pos + FIXED.size > limit:
            raise CorruptImage("Snapshot table is truncated")
        (l1_off, l1_size, id_len, name_len, dsec, dnsec, clock, vmsize,
         extra_len) = FIXED.unpack(pread(FIXED.size, offset + pos))
        if extra_len > MAX_EXTRA_DATA and not lenient:
            raise CorruptImage(with_hint(f"Too much extra metadata in snapshot table entry {i}", EXTRA_DATA_HINT))
        p = pos + FIXED.size
        if limit is not None and p + extra_len + id_len + name_len > limit:
            raise CorruptImage("Snapshot table is truncated")
        extra = pread(min(extra_len, MAX_EXTRA_DATA), offset + p)
        p += extra_len
        id_b = pread(id_len, offset + p)
        p += id_len
        name_b = pread(name_len, offset + p)
        p += name_len
        table_length += FIXED.size + len(extra) + id_len + name_len  # the extra data as kept
        if not lenient and (table_length > MAX_TABLE_SIZE or p > C.INT_MAX):
            raise CorruptImage(with_hint("Snapshot table is too big", f"You can force-remove all {count - i} "
                                         "overhanging snapshots with qemu-img check -r all"))
        sn = Snapshot(l1_off, l1_size, cstr(id_b).decode("utf-8", "replace"), cstr(name_b).decode("utf-8", "replace"),
                      dsec, dnsec, clock, vmsize, extra)
        yield StoredEntry(sn, id_b, name_b, extra_len, pos, p)
        pos = p


def parse_snapshot_table(buf: bytes, count: int) -> list[Snapshot]:
    """Decode ``count`` strict entries from a buffer holding the table."""
    if count > C.MAX_SNAPSHOTS:
        raise CorruptImage("Snapshot table too large")
    mv = memoryview(buf)
    return [e.sn for e in read_entries(lambda n, off: bytes(mv[off:off + n]), 0, count, limit=len(buf))]


def pack_snapshot_table(snaps: list[Snapshot]) -> bytes:
    out = bytearray()
    for s in snaps:
        id_b, name_b = s.id_str.encode(), s.name.encode()
        out += FIXED.pack(s.l1_table_offset, s.l1_size, len(id_b), len(name_b), s.date_sec, s.date_nsec,
                           s.vm_clock_nsec, s.vm_state_size, len(s.extra_data))
        out += s.extra_data + id_b + name_b
        out += bytes(-len(out) % 8)
    return bytes(out)


def known_extra(vm_state_size: int, disk_size: int, icount: int) -> bytes:
    """The 24 bytes of extra data QEMU knows: vm_state_size_large, disk_size, icount."""
    return struct.pack(">QQQ", vm_state_size, disk_size, icount)


def table_pieces_as_qemu(entries: list[tuple[Snapshot, bytes, bytes]], default_disk_size: int) -> list[tuple[int, bytes]]:
    """The snapshot table QEMU's ``qcow2_write_snapshots`` writes for (snapshot, id bytes, name
    bytes) entries, as (offset in the table, bytes) pieces: one per entry, each starting on an
    8-byte boundary; the padding between them is not written (it keeps whatever the clusters
    held, as with QEMU). Every entry gets the 24 bytes of known extra data (vm_state_size_large,
    disk_size — ``default_disk_size`` when the entry had none — and icount, all-ones when
    unknown), then any unknown extra data it carried."""
    pieces = []
    pos = 0
    for sn, id_b, name_b in entries:
        id_b, name_b = cstr(id_b), cstr(name_b)
        pos = (pos + 7) & ~7
        vm_state = sn.vm_state_size_large
        disk_size = sn.disk_size if sn.disk_size is not None else default_disk_size
        icount = sn.icount if sn.icount is not None else (1 << 64) - 1
        unknown = sn.extra_data[24:]
        body = FIXED.pack(sn.l1_table_offset, sn.l1_size, len(id_b), len(name_b), sn.date_sec, sn.date_nsec,
                           sn.vm_clock_nsec, vm_state if vm_state <= 0xFFFFFFFF else 0, 24 + len(unknown))
        body += known_extra(vm_state, disk_size, icount) + unknown + id_b + name_b
        pieces.append((pos, body))
        pos += len(body)
    return pieces
