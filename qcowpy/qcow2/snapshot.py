"""Internal snapshots: list, create, apply, delete, as QEMU 7.2's qcow2-snapshot.c does them.

A snapshot is a copy of the active L1 table plus one more reference on every L2 table and data
cluster it reaches; clusters with more than one reference lose OFLAG_COPIED, so the next write
to them copies first (the engine's write path already does that). The order of the on-disk
updates follows QEMU's, so a crash leaves at worst leaked clusters, and the bytes written are
the ones QEMU writes (checked against qemu-img in tests/cli/test_snapshot.py).
"""
from __future__ import annotations

import struct
import time
from dataclasses import dataclass

from ..errors import CorruptImage, QcowError
from ..format import constants as C
from ..format.entries import compressed_descriptor, pack_table, unpack_table
from ..format.snapshot import Snapshot, table_pieces_as_qemu
from .overlap import ACTIVE_L1, INACTIVE_L1, MAIN_HEADER, write_metadata
from .refcount import RefcountOverflow

_FIXED = struct.Struct(">QIHHIIQII")
_MAX_L1_BYTES = C.MAX_L1_SIZE_BYTES


class SnapshotNotFound(QcowError):
    pass


class SnapshotCreateFailed(QcowError):
    """Creation failed with QEMU's errno (qemu-img prints it as a number and a strerror)."""

    def __init__(self, errno_: int, text: str):
        super().__init__(f"{-errno_} ({text})")
        self.errno_ = errno_


@dataclass
class Entry:
    """A snapshot table entry with its id and name as the bytes on disk."""

    sn: Snapshot
    id_b: bytes
    name_b: bytes

    @property
    def id_str(self) -> str:
        return self.id_b.decode("utf-8", "replace")

    @property
    def name(self) -> str:
        return self.name_b.decode("utf-8", "replace")


def read_table(img) -> tuple[list[Entry], int]:
    """The snapshot table (entries, size in bytes), read as QEMU's qcow2_read_snapshots does."""
    h = img.header
    entries: list[Entry] = []
    off = h.snapshots_offset
    for i in range(h.nb_snapshots):
        off = (off + 7) & ~7
        (l1_off, l1_size, id_len, name_len, dsec, dnsec, clock, vmsize,
         extra_len) = _FIXED.unpack(img.file.pread(_FIXED.size, off))
        if extra_len > 1024:
            raise CorruptImage(f"Too much extra metadata in snapshot table entry {i}")
        off += _FIXED.size
        extra = img.file.pread(extra_len, off)
        off += extra_len
        id_b = img.file.pread(id_len, off)
        off += id_len
        name_b = img.file.pread(name_len, off)
        off += name_len
        entries.append(Entry(Snapshot(l1_off, l1_size, "", "", dsec, dnsec, clock, vmsize, extra), id_b, name_b))
    return entries, off - h.snapshots_offset if h.nb_snapshots else 0


def _find(entries: list[Entry], key: str, by_id: bool = True, by_name: bool = True) -> int:
    """QEMU's find_snapshot_by_id_or_name: an id match wins, then a name match."""
    for i, e in enumerate(entries):
        if by_id and e.id_str == key:
            return i
    for i, e in enumerate(entries):
        if by_name and e.name == key:
            return i
    return -1


def _validate_l1(img, sn: Snapshot) -> None:
    """qcow2_validate_table for a snapshot's L1 table."""
    if sn.l1_size * 8 > _MAX_L1_BYTES:
        raise CorruptImage("Snapshot L1 table too large")
    if sn.l1_table_offset & (img.cluster_size - 1) or \
            sn.l1_table_offset + sn.l1_size * 8 > (1 << 63) - 1:
        raise CorruptImage("Snapshot L1 table offset invalid")


def update_snapshot_refcount(img, l1_offset: int, l1_size: int, addend: int) -> None:
    """QEMU's qcow2_update_snapshot_refcount: add ``addend`` (-1, 0, 1) to the refcount of every
    cluster reachable from the L1 table at ``l1_offset`` and set OFLAG_COPIED exactly where the
    refcount is then 1. The active L1 is taken from memory (snapshot_goto relies on that)."""
    cs, cbits = img.cluster_size, img.cluster_bits
    rc = img.refcounts
    active = l1_offset == img.header.l1_table_offset
    l1 = img.l1 if active else unpack_table(img.file.pread(l1_size * 8, l1_offset))
    step = img.entry_words
    modified = False
    for i in range(l1_size):
        old_l1 = l1[i]
        if not old_l1:
            continue
        l2_off = old_l1 & C.L1E_OFFSET_MASK
        if l2_off & (cs - 1):
            raise CorruptImage(f"L2 table offset {l2_off:#x} unaligned (L1 index: {i:#x})")
        table = img.l2cache.get(l2_off)
        dirty = False
        for j in range(0, len(table), step):
            old = table[j]
            entry = old & ~C.OFLAG_COPIED
            host = entry & C.L2E_OFFSET_MASK
            if entry & C.OFLAG_COMPRESSED:
                if addend:
                    coffset, csize = compressed_descriptor(entry, cbits)
                    rc.change_range(coffset, csize, addend)
                refcount = 2  # compressed clusters are never written in place
            elif host:  # normal or preallocated zero cluster
                if host & (cs - 1):
                    raise CorruptImage(f"Cluster allocation offset {host:#x} unaligned (L2 offset: "
                                       f"{l2_off:#x}, L2 index: {j // step:#x})")
                if addend:
                    rc.change(host >> cbits, addend)
                refcount = rc.get(host >> cbits)
            else:
                refcount = 0
            if refcount == 1:
                entry |= C.OFLAG_COPIED
            if entry != old:
                table[j] = entry
                if not dirty:  # at once, as QEMU: a failure later still leaves this on disk
                    img.l2cache.mark_dirty(l2_off)
                    dirty = True
        if addend:
            rc.change(l2_off >> cbits, addend)
        refcount = rc.get(l2_off >> cbits)
        if refcount == 0:
            img.l2cache.discard(l2_off)  # freed: its cached copy must never be written back
        new_l1 = l2_off | (C.OFLAG_COPIED if refcount == 1 else 0)
        if new_l1 != old_l1:
            l1[i] = new_l1
            modified = True
    img._flush_all()
    if addend >= 0 and modified:
        write_metadata(img.file, ACTIVE_L1 if active else INACTIVE_L1, pack_table(l1[:l1_size]), l1_offset)
        img.file.flush()


def write_table(img, entries: list[Entry], old_size: int) -> None:
    """QEMU's qcow2_write_snapshots: the whole table in new clusters, then the header, then the
    old table's clusters freed."""
    h = img.header
    pieces = table_pieces_as_qemu([(e.sn, e.id_b, e.name_b) for e in entries], img.size)
    size = pieces[-1][0] + len(pieces[-1][1]) if pieces else 0
    new_off = img.refcounts.alloc_clusters((size + img.cluster_size - 1) >> img.cluster_bits) if size else 0
    img._flush_all()
    for pos, body in pieces:
        img.file.pwrite(body, new_off + pos)  # overlap-checked: the clusters must be free
    img.file.flush()
    write_metadata(img.file, MAIN_HEADER, struct.pack(">IQ", len(entries), new_off), 60)
    img.file.flush()
    old_off = h.snapshots_offset
    h.nb_snapshots, h.snapshots_offset = len(entries), new_off
    img.overlap_guard._snapshots = None  # the guard re-reads the table's layout
    if old_size:
        img.refcounts.free(old_off, old_size)
        img._flush_all()


def _next_id(entries: list[Entry]) -> str:
    """QEMU's find_new_snapshot_id: one more than the largest numeric id."""
    top = 0
    for e in entries:
        try:
            top = max(top, int(e.id_str))
        except ValueError:
            continue
    return str(top + 1)


def _prepare(img) -> None:
    img._require_writable()
    img._mark_dirty_if_lazy()
    img._compressed_cache = None
    img._flush_all()


def list_snapshots(img) -> list[Entry]:
    with img.lock:
        return read_table(img)[0]


def create(img, name: str, date: float | None = None) -> Entry:
    """``qemu-img snapshot -c NAME``: a snapshot of the current disk state (no VM state)."""
    with img.lock:
        _prepare(img)
        h = img.header
        entries, size = read_table(img)
        if len(entries) >= C.MAX_SNAPSHOTS:
            raise SnapshotCreateFailed(27, "File too large")
        usec = time.time_ns() // 1000 if date is None else int(date * 1e6)  # g_get_real_time()
        sec, nsec = usec // 1000000, usec % 1000000 * 1000
        extra = struct.pack(">QQQ", 0, img.size, 0)  # qemu-img's snapshot info is zeroed: icount 0
        l1_size = len(img.l1)
        l1_off = img.refcounts.alloc_clusters((l1_size * 8 + img.cluster_size - 1) >> img.cluster_bits) \
            if l1_size else 0
        if l1_size:
            img.file.pwrite(pack_table(img.l1), l1_off)
        try:
            update_snapshot_refcount(img, h.l1_table_offset, l1_size, 1)
        except RefcountOverflow:
            raise SnapshotCreateFailed(22, "Invalid argument") from None
        entry = Entry(Snapshot(l1_off, l1_size, "", "", sec, nsec, 0, 0, extra),
                      _next_id(entries).encode(), name.encode())
        with img.punching_freed():
            write_table(img, entries + [entry], size)
        return entry


def delete(img, key: str) -> None:
    """``qemu-img snapshot -d NAME``: drop the snapshot and the references it held."""
    with img.lock:
        _prepare(img)
        entries, size = read_table(img)
        i = _find(entries, key, by_id=False)  # qemu-img -d looks names up (bdrv_snapshot_find)
        if i < 0:
            raise SnapshotNotFound("snapshot not found")
        sn = entries[i].sn
        _validate_l1(img, sn)
        with img.punching_freed():
            write_table(img, entries[:i] + entries[i + 1:], size)
            update_snapshot_refcount(img, sn.l1_table_offset, sn.l1_size, -1)
            if sn.l1_size:
                img.refcounts.free(sn.l1_table_offset, sn.l1_size * 8)
            update_snapshot_refcount(img, img.header.l1_table_offset, len(img.l1), 0)


def apply(img, key: str) -> None:
    """``qemu-img snapshot -a``: make the active disk the snapshot's again (its size included)."""
    with img.lock:
        _prepare(img)
        entries, _ = read_table(img)
        i = _find(entries, key)
        if i < 0:
            raise SnapshotNotFound("snapshot not found")
        sn = entries[i].sn
        _validate_l1(img, sn)
        disk_size = sn.disk_size if sn.disk_size is not None else img.size
        if disk_size != img.size:
            img.resize(disk_size)
        if sn.l1_size > len(img.l1):
            img._grow_l1(sn.l1_size, exact=True)
            img._flush_all()
        with img.punching_freed():
            sn_l1 = unpack_table(img.file.pread(sn.l1_size * 8, sn.l1_table_offset)) + [0] * (len(img.l1) - sn.l1_size)
            update_snapshot_refcount(img, sn.l1_table_offset, sn.l1_size, 1)
            write_metadata(img.file, ACTIVE_L1, pack_table(sn_l1), img.header.l1_table_offset)
            img.file.flush()
            # the in-memory L1 still holds the old tables: drop their references, then take the new
            update_snapshot_refcount(img, img.header.l1_table_offset, len(img.l1), -1)
            img.l1[:] = sn_l1
            update_snapshot_refcount(img, img.header.l1_table_offset, len(img.l1), 0)



def load_tmp(img, snapshot_id: str | None, name: str | None) -> None:
    """QEMU's bdrv_snapshot_load_tmp (``qemu-nbd -l``): a read-only image shows the disk of the snapshot
    matching ``snapshot_id`` and/or ``name`` in place of the active one, in memory only."""
    if img.writable:
        raise QcowError("Cannot load a snapshot temporarily into an image opened read-write")
    with img.lock:
        entries, _ = read_table(img)
        found = [e for e in entries
                 if (snapshot_id is None or e.id_str == snapshot_id) and (name is None or e.name == name)]
        if not found:
            raise SnapshotNotFound("Can't find snapshot")
        sn = found[0].sn
        _validate_l1(img, sn)
        # the size stays the active disk's: QEMU swaps only the L1 table
        img.l1 = unpack_table(img.file.pread(sn.l1_size * 8, sn.l1_table_offset)) if sn.l1_size else []
