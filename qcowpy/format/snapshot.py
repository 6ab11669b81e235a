"""Snapshot table entries (parsed and re-encoded; snapshot operations build on this later)."""
from __future__ import annotations

import struct
from dataclasses import dataclass

from ..errors import CorruptImage
from . import constants as C

_FIXED = struct.Struct(">QIHHIIQII")  # 40 bytes
MAX_EXTRA_DATA = 1024


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


def parse_snapshot_table(buf: bytes, count: int) -> list[Snapshot]:
    """Decode ``count`` entries; each entry is padded to a multiple of 8 bytes."""
    if count > C.MAX_SNAPSHOTS:
        raise CorruptImage("Snapshot table too large")
    snaps = []
    off = 0
    for _ in range(count):
        if off + _FIXED.size > len(buf):
            raise CorruptImage("Snapshot table is truncated")
        (l1_off, l1_size, id_len, name_len, dsec, dnsec, clock, vmsize, extra_len) = _FIXED.unpack_from(buf, off)
        off += _FIXED.size
        if extra_len > MAX_EXTRA_DATA:
            raise CorruptImage("Too much extra metadata in snapshot table entry")
        end = off + extra_len + id_len + name_len
        if end > len(buf):
            raise CorruptImage("Snapshot table is truncated")
        extra = bytes(buf[off:off + extra_len])
        off += extra_len
        id_str = bytes(buf[off:off + id_len]).decode("utf-8", "replace")
        off += id_len
        name = bytes(buf[off:off + name_len]).decode("utf-8", "replace")
        off += name_len
        off = (off + 7) & ~7
        snaps.append(Snapshot(l1_off, l1_size, id_str, name, dsec, dnsec, clock, vmsize, extra))
    return snaps


def pack_snapshot_table(snaps: list[Snapshot]) -> bytes:
    out = bytearray()
    for s in snaps:
        id_b, name_b = s.id_str.encode(), s.name.encode()
        out += _FIXED.pack(s.l1_table_offset, s.l1_size, len(id_b), len(name_b), s.date_sec, s.date_nsec,
                           s.vm_clock_nsec, s.vm_state_size, len(s.extra_data))
        out += s.extra_data + id_b + name_b
        out += bytes(-len(out) % 8)
    return bytes(out)


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
        pos = (pos + 7) & ~7
        vm_state = sn.vm_state_size_large
        disk_size = sn.disk_size if sn.disk_size is not None else default_disk_size
        icount = sn.icount if sn.icount is not None else (1 << 64) - 1
        unknown = sn.extra_data[24:]
        body = _FIXED.pack(sn.l1_table_offset, sn.l1_size, len(id_b), len(name_b), sn.date_sec, sn.date_nsec,
                           sn.vm_clock_nsec, vm_state if vm_state <= 0xFFFFFFFF else 0, 24 + len(unknown))
        body += struct.pack(">QQQ", vm_state, disk_size, icount) + unknown + id_b + name_b
        pieces.append((pos, body))
        pos += len(body)
    return pieces
