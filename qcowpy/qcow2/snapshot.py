"""Internal snapshots: list, create, apply, delete, as QEMU 7.2's qcow2-snapshot.c does them.

A snapshot is a copy of the active L1 table plus one more reference on every L2 table and data
cluster it reaches; clusters with more than one reference lose OFLAG_COPIED, so the next write
to them copies first (the engine's write path already does that). The order of the on-disk
updates follows QEMU's, so a crash leaves at worst leaked clusters, and the bytes written are
the ones QEMU writes (checked against qemu-img in tests/cli/test_snapshot.py).
"""
from __future__ import annotations

import errno
import os
import time

from ..errors import CorruptTable, QcowError, RefcountOverflow, SnapshotNotFound
from ..format import constants as C
from ..format.entries import pack_table, unpack_table
from ..format.snapshot import Snapshot, StoredEntry, known_extra, read_entries, table_pieces_as_qemu
from .resize import resize
from .txn import SnapshotTransaction

_MAX_L1_BYTES = C.MAX_L1_SIZE_BYTES


class SnapshotCreateFailed(QcowError):
    """Creation failed with QEMU's errno (qemu-img prints it as a number and a strerror)."""

    def __init__(self, errno_: int):
        super().__init__(f"{-errno_} ({os.strerror(errno_)})")
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


def validate_l1(img, sn: Snapshot) -> None:
    """qcow2_validate_table for a snapshot's L1 table."""
    if sn.l1_size * 8 > _MAX_L1_BYTES:
        raise CorruptTable("Snapshot L1 table too large", CorruptTable.EFBIG)
    if sn.l1_table_offset & (img.cluster_size - 1) or \
            sn.l1_table_offset + sn.l1_size * 8 > (1 << 63) - 1:
        raise CorruptTable("Snapshot L1 table offset invalid", CorruptTable.EINVAL)


def _table_bytes(img, entries: list[Entry]) -> bytes:
    """The snapshot table as QEMU's qcow2_write_snapshots lays it out (padding zeroed)."""
    pieces = table_pieces_as_qemu([(e.sn, e.id_b, e.name_b) for e in entries], img.size)
    out = bytearray(pieces[-1][0] + len(pieces[-1][1]) if pieces else 0)
    for pos, body in pieces:
        out[pos:pos + len(body)] = body
    return bytes(out)


def _switch(txn: SnapshotTransaction, img, entries: list[Entry], old_size: int | None, active: list[int]) -> None:
    """Point the image at ``active`` (L2 table offsets) and, unless ``old_size`` is None, at a
    new table holding ``entries``: all of it in one header write (qcow2/txn.py)."""
    h = img.header
    txn.validate()
    nb, table_off = h.nb_snapshots, h.snapshots_offset
    if old_size is not None:
        txn.release(h.snapshots_offset, old_size)
        nb, table_off = len(entries), txn.write_new(_table_bytes(img, entries))
    txn.commit(txn.active_l1(active), nb, table_off)


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
        if img.external_data:  # QEMU: no snapshots with a data file (-ENOTSUP, listed as none)
            return []
        return read_table(img)[0]


def create(img, name: str, date: float | None = None) -> Entry:
    """``qemu-img snapshot -c NAME``: a snapshot of the current disk state (no VM state)."""
    with img.lock:
        if img.external_data:
            raise SnapshotCreateFailed(errno.EOPNOTSUPP)
        if img.header.nb_snapshots >= C.MAX_SNAPSHOTS:  # counted before the table is read, as QEMU does
            raise SnapshotCreateFailed(CorruptTable.EFBIG)
        _prepare(img)
        entries, size = read_table(img)
        usec = time.time_ns() // 1000 if date is None else int(date * 1e6)  # g_get_real_time()
        sec, nsec = usec // 1000000, usec % 1000000 * 1000
        extra = known_extra(0, img.size, 0)  # qemu-img's snapshot info is zeroed: icount 0
        meta = img.meta
        txn = SnapshotTransaction(img)
        txn.walk(meta.l1, 1)  # the snapshot's L1 reaches what the active one does
        try:
            txn.validate()
        except RefcountOverflow:
            raise SnapshotCreateFailed(CorruptTable.EINVAL) from None
        except CorruptTable as e:  # QEMU reports only the errno of a failed refcount update
            raise SnapshotCreateFailed(e.errno_) from None
        l1_off = txn.write_new(pack_table(meta.l1))  # as QEMU: a copy of the active L1, flags and all
        id_b, name_b = _next_id(entries).encode(), name.encode()
        entry = Entry(Snapshot(l1_off, len(meta.l1), id_b.decode(), name, sec, nsec, 0, 0, extra), id_b, name_b,
                      len(extra), 0, 0)
        _switch(txn, img, entries + [entry], size, [e & C.L1E_OFFSET_MASK for e in meta.l1])
        return entry


def rewrite_table(img) -> None:
    """QEMU's qcow2_write_snapshots alone, as amend's upgrade to v3 uses it: every entry gets
    the v3 extra data (a disk size, icount unknown). The new table goes to new clusters, one
    header write switches to it, then the old one is freed: a crash leaks, never corrupts."""
    with img.lock:
        _prepare(img)
        entries, size = read_table(img)
        meta = img.meta
        data = _table_bytes(img, entries)
        offset = meta.refcounts.alloc_clusters(meta.clusters_for(len(data))) if data else 0
        if data:
            img.file.pwrite(data, offset)
        meta.sync()
        img.file.flush()
        old = img.header.snapshots_offset
        meta.update_header(nb_snapshots=len(entries), snapshots_offset=offset)
        img.file.flush()
        if size:
            with meta.punching_freed():
                meta.refcounts.free(old, size)


def delete(img, key: str) -> None:
    """``qemu-img snapshot -d NAME``: drop the snapshot and the references it held."""
    with img.lock:
        _prepare(img)
        entries, size = read_table(img)
        i = _find(entries, key, by_id=False)  # qemu-img -d looks names up (bdrv_snapshot_find)
        if i < 0 or img.external_data:
            raise SnapshotNotFound("snapshot not found")
        sn = entries[i].sn
        validate_l1(img, sn)
        txn = SnapshotTransaction(img)
        txn.walk(unpack_table(img.file.pread(sn.l1_size * 8, sn.l1_table_offset)), -1)
        txn.release(sn.l1_table_offset, sn.l1_size * 8)
        _switch(txn, img, entries[:i] + entries[i + 1:], size, [e & C.L1E_OFFSET_MASK for e in img.meta.l1])


def apply(img, key: str) -> None:
    """``qemu-img snapshot -a``: make the active disk the snapshot's again (its size included)."""
    with img.lock:
        if img.external_data:
            raise QcowError("Operation not supported")
        _prepare(img)
        entries, _ = read_table(img)
        i = _find(entries, key)
        if i < 0:
            raise SnapshotNotFound("snapshot not found")
        sn = entries[i].sn
        try:
            validate_l1(img, sn)
        except CorruptTable as e:
            e.report = str(e)  # type: ignore[attr-defined]  # QEMU prints why, then fails the load with the errno
            raise
        disk_size = sn.disk_size if sn.disk_size is not None else img.size
        if disk_size != img.size:
            resize(img, disk_size)
        meta = img.meta
        sn_l1 = unpack_table(img.file.pread(sn.l1_size * 8, sn.l1_table_offset))
        txn = SnapshotTransaction(img)
        txn.walk(sn_l1, 1)
        txn.validate()  # as QEMU, which takes the snapshot's references before dropping the old ones
        txn.walk(meta.l1, -1)
        pointers = [e & C.L1E_OFFSET_MASK for e in sn_l1] + [0] * (len(meta.l1) - sn.l1_size)
        _switch(txn, img, entries, None, pointers)


def load_tmp(img, snapshot_id: str | None, name: str | None) -> None:
    """QEMU's bdrv_snapshot_load_tmp (``qemu-nbd -l``): a read-only image shows the disk of the snapshot
    matching ``snapshot_id`` and/or ``name`` in place of the active one, in memory only."""
    if img.writable:
        raise QcowError("Cannot load a snapshot temporarily into an image opened read-write")
    with img.lock:
        entries, _ = read_table(img)
        found = [e for e in entries if not img.external_data
                 if (snapshot_id is None or e.id_str == snapshot_id) and (name is None or e.name == name)]
        if not found:
            raise SnapshotNotFound("Can't find snapshot")
        sn = found[0].sn
        validate_l1(img, sn)
        # the size stays the active disk's: QEMU swaps only the L1 table
        img.meta.l1 = unpack_table(img.file.pread(sn.l1_size * 8, sn.l1_table_offset)) if sn.l1_size else []
