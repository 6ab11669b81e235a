"""Internal snapshots: list, create, apply, delete, as QEMU 7.2's qcow2-snapshot.c does them.

A snapshot is a copy of the active L1 table plus one more reference on every L2 table and data
cluster it reaches; clusters with more than one reference lose OFLAG_COPIED, so the next write
to them copies first (the engine's write path already does that). The order of the on-disk
updates follows QEMU's, so a crash leaves at worst leaked clusters, and the bytes written are
the ones QEMU writes (checked against qemu-img in tests/cli/test_snapshot.py).
"""
from __future__ import annotations

import time

from ..errors import CorruptImage, QcowError, RefcountOverflow, SnapshotNotFound
from ..format import constants as C
from ..format.entries import compressed_descriptor, pack_table, unpack_table
from ..format.snapshot import Snapshot, StoredEntry, known_extra, read_entries, table_pieces_as_qemu
from .resize import resize

_MAX_L1_BYTES = C.MAX_L1_SIZE_BYTES


class SnapshotCreateFailed(QcowError):
    """Creation failed with QEMU's errno (qemu-img prints it as a number and a strerror)."""

    def __init__(self, errno_: int, text: str):
        super().__init__(f"{-errno_} ({text})")
        self.errno_ = errno_


Entry = StoredEntry


def read_table(img) -> tuple[list[Entry], int]:
    """The snapshot table (entries, size in bytes), read as QEMU's qcow2_read_snapshots does."""
    h = img.header
    entries = list(read_entries(img.file.pread, h.snapshots_offset, h.nb_snapshots,
                                limit=max(0, img.file.size() - h.snapshots_offset)))
    return entries, entries[-1].end if entries else 0


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
    meta = img.meta
    rc = meta.refcounts
    active = l1_offset == img.header.l1_table_offset
    l1 = meta.l1 if active else unpack_table(img.file.pread(l1_size * 8, l1_offset))
    step = meta.entry_words
    modified = False
    for i in range(l1_size):
        old_l1 = l1[i]
        if not old_l1:
            continue
        l2_off = old_l1 & C.L1E_OFFSET_MASK
        if l2_off & (cs - 1):
            raise CorruptImage(f"L2 table offset {l2_off:#x} unaligned (L1 index: {i:#x})")
        table = meta.l2cache.get(l2_off)
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
                table[j] = entry  # dirty at once, as QEMU: a failure later still leaves this on disk
        if addend:
            rc.change(l2_off >> cbits, addend)
        refcount = rc.get(l2_off >> cbits)
        if refcount == 0:
            meta.l2cache.discard(l2_off)  # freed: its cached copy must never be written back
        new_l1 = l2_off | (C.OFLAG_COPIED if refcount == 1 else 0)
        if new_l1 != old_l1:
            l1[i] = new_l1
            modified = True
    meta.sync()
    if addend >= 0 and modified:
        meta.write_l1_table(l1[:l1_size], l1_offset)
        img.file.flush()


def write_table(img, entries: list[Entry], old_size: int) -> None:
    """QEMU's qcow2_write_snapshots: the whole table in new clusters, then the header, then the
    old table's clusters freed."""
    h = img.header
    pieces = table_pieces_as_qemu([(e.sn, e.id_b, e.name_b) for e in entries], img.size)
    size = pieces[-1][0] + len(pieces[-1][1]) if pieces else 0
    meta = img.meta
    new_off = meta.refcounts.alloc_clusters(meta.clusters_for(size)) if size else 0
    meta.sync()
    for pos, body in pieces:
        img.file.pwrite(body, new_off + pos)  # overlap-checked: the clusters must be free
    img.file.flush()
    old_off = h.snapshots_offset
    meta.update_header(nb_snapshots=len(entries), snapshots_offset=new_off)
    img.file.flush()
    meta.guard.snapshots_changed()
    if old_size:
        meta.refcounts.free(old_off, old_size)
        meta.sync()


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
    img.begin_change()
    img.meta.sync()


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
        extra = known_extra(0, img.size, 0)  # qemu-img's snapshot info is zeroed: icount 0
        meta = img.meta
        l1_size = len(meta.l1)
        l1_off = meta.refcounts.alloc_clusters(meta.clusters_for(l1_size * 8)) if l1_size else 0
        if l1_size:
            img.file.pwrite(pack_table(meta.l1), l1_off)
        try:
            update_snapshot_refcount(img, h.l1_table_offset, l1_size, 1)
        except RefcountOverflow:
            raise SnapshotCreateFailed(22, "Invalid argument") from None
        id_b, name_b = _next_id(entries).encode(), name.encode()
        entry = Entry(Snapshot(l1_off, l1_size, id_b.decode(), name, sec, nsec, 0, 0, extra), id_b, name_b,
                      len(extra), 0, 0)
        with meta.punching_freed():
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
        meta = img.meta
        with meta.punching_freed():
            write_table(img, entries[:i] + entries[i + 1:], size)
            update_snapshot_refcount(img, sn.l1_table_offset, sn.l1_size, -1)
            if sn.l1_size:
                meta.refcounts.free(sn.l1_table_offset, sn.l1_size * 8)
            update_snapshot_refcount(img, img.header.l1_table_offset, len(meta.l1), 0)


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
            resize(img, disk_size)
        meta = img.meta
        if sn.l1_size > len(meta.l1):
            meta.grow_l1(sn.l1_size, exact=True)
            meta.sync()
        with meta.punching_freed():
            sn_l1 = unpack_table(img.file.pread(sn.l1_size * 8, sn.l1_table_offset)) + [0] * (len(meta.l1) - sn.l1_size)
            update_snapshot_refcount(img, sn.l1_table_offset, sn.l1_size, 1)
            meta.write_l1_table(sn_l1)
            img.file.flush()
            # the in-memory L1 still holds the old tables: drop their references, then take the new
            update_snapshot_refcount(img, img.header.l1_table_offset, len(meta.l1), -1)
            meta.l1[:] = sn_l1
            update_snapshot_refcount(img, img.header.l1_table_offset, len(meta.l1), 0)

