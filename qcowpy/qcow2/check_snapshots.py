"""The snapshot table part of a qcow2 check (QEMU's qcow2_check_read_snapshot_table and
qcow2_check_fix_snapshot_table): read leniently, report what QEMU reports, and with ``-r all``
drop or trim what QEMU drops, rewriting the table once the refcounts can be trusted."""
from __future__ import annotations

from ..errors import QcowError
from ..format import constants as C
from ..format.snapshot import FIXED as SN_FIXED
from ..format.snapshot import MAX_EXTRA_DATA, MAX_TABLE_SIZE, Snapshot, cstr, read_entries, table_pieces_as_qemu
from .checkbase import FIX_ERRORS, CheckAbort, CheckContext, CheckResult, Hint, write_fields
from .refcount import Refcounts



def load_snapshots(ck: CheckContext, res: CheckResult, fix: int = 0) -> None:
    """Read the snapshot table as QEMU's check does (``qcow2_check_read_snapshot_table``).

    The count and offset are validated first; entries are then read one by one, bytes past the
    end of the file reading as zeros (so a table past EOF yields empty, incomplete entries that
    are reported as corruptions). Too many snapshots, too much extra data in an entry or a
    table larger than QEMU allows end the check ("Check failed: File too large"), with QEMU's
    hint. With ``-r all`` they are repaired as QEMU repairs them: overhanging snapshots are
    dropped at once (the header count is rewritten, their clusters become leaks for the
    refcount check), oversized extra data is cut to 1024 bytes, and the table is rewritten
    after the refcount check (:meth:`fix_snapshot_table`).
    """
    h = ck.h
    n = h.nb_snapshots
    if not n:
        return
    repair = bool(fix & FIX_ERRORS)
    reduced = dropped = 0
    sn_off = h.snapshots_offset
    if n > C.MAX_SNAPSHOTS and repair:
        ck.msg(res, f"Discarding {n - C.MAX_SNAPSHOTS} overhanging snapshots")
        reduced += n - C.MAX_SNAPSHOTS
        n = C.MAX_SNAPSHOTS
    if n > C.MAX_SNAPSHOTS:
        res.check_errors += 1
        raise CheckAbort("File too large", (
            "ERROR snapshot table too large",
            Hint(f"You can force-remove all {n - C.MAX_SNAPSHOTS} overhanging snapshots with "
                 "qemu-img check -r all")))
    if (1 << 63) - 1 - n * SN_FIXED.size < sn_off or sn_off & (ck.cs - 1):
        res.check_errors += 1
        raise CheckAbort("Invalid argument", ("ERROR snapshot table offset invalid",))
    kept, dropped = _read_entries(ck, res, sn_off, n, repair)
    reduced += n - kept
    n = kept
    res.corruptions += reduced + dropped
    if reduced:
        # the count reaches the header before the refcount check, which relies on it; the
        # discarded snapshots' clusters are now leaks, which that check repairs
        h.nb_snapshots = n
        write_fields(ck.file, h, "nb_snapshots")
        ck.file.flush()
        res.corruptions_fixed += reduced
        res.corruptions -= reduced
    if h.version >= 3:  # v3 entries need at least vm_state_size_large and disk_size
        for i, sn in enumerate(ck.snapshots):
            if len(sn.extra_data) < 16:
                res.corruptions += 1
                ck.msg(res, f"{'Repairing' if repair else 'ERROR'} snapshot table entry {i} is incomplete")


def _read_entries(ck: CheckContext, res: CheckResult, sn_off: int, n: int, repair: bool) -> tuple[int, int]:
    """Read ``n`` entries into ``ck.snapshots``, stopping where the table grows past QEMU's limit;
    returns (entries kept, entries whose extra data was cut)."""
    dropped = 0
    snaps: list[Snapshot] = []
    ck.sn_raw = []
    end = 0
    table_length = 0
    for i, e in enumerate(read_entries(ck.file.pread, sn_off, n, lenient=True)):
        table_length = (table_length + 7) & ~7
        if e.extra_len > MAX_EXTRA_DATA:
            if not repair:
                res.check_errors += 1
                raise CheckAbort("File too large", (
                    f"ERROR failed to read the snapshot table: Too much extra metadata in snapshot "
                    f"table entry {i}",
                    Hint("You can force-remove this extra metadata with qemu-img check -r all")))
            ck.msg(res, f"Discarding too much extra metadata in snapshot table entry {i} "
                           f"({e.extra_len} > {MAX_EXTRA_DATA})")
            dropped += 1
        table_length += SN_FIXED.size + len(e.sn.extra_data) + len(e.id_b) + len(e.name_b)
        if table_length > MAX_TABLE_SIZE or e.end > C.INT_MAX:
            if not repair:
                res.check_errors += 1
                raise CheckAbort("File too large", (
                    "ERROR failed to read the snapshot table: Snapshot table is too big",
                    Hint(f"You can force-remove all {n - i} overhanging snapshots with qemu-img "
                         "check -r all")))
            ck.msg(res, f"Discarding {n - i} overhanging snapshots (snapshot table is too big)")
            break
        end = e.end
        id_b, name_b = cstr(e.id_b), cstr(e.name_b)
        sn = e.sn
        sn.id_str, sn.name = id_b.decode("utf-8", "replace"), name_b.decode("utf-8", "replace")
        snaps.append(sn)
        ck.sn_raw.append((id_b, name_b))
    ck.snapshots = snaps
    ck.snapshots_size = end
    return len(snaps), dropped


def fix_snapshot_table(ck: CheckContext, res: CheckResult, fix: int) -> None:
    """QEMU's ``qcow2_check_fix_snapshot_table``: after the refcount check has made the
    refcounts trustworthy, a snapshot table with corruptions left is written anew (complete v3
    entries, extra data cut to size) in freshly allocated clusters, the header is pointed at it
    and the old table's clusters are freed."""
    if not (res.corruptions and fix & FIX_ERRORS):
        return
    try:
        _write_snapshot_table(ck)
    except (OSError, QcowError, CheckAbort) as e:
        reason = getattr(e, "strerror", None) or str(e)
        res.check_errors += 1
        ck.msg(res, f"ERROR failed to update snapshot table: {reason}")
        raise CheckAbort(reason) from None
    res.corruptions_fixed += res.corruptions
    res.corruptions = 0


def _write_snapshot_table(ck: CheckContext) -> None:
    h = ck.h
    pieces = table_pieces_as_qemu([(sn, id_b, name_b) for sn, (id_b, name_b) in zip(ck.snapshots, ck.sn_raw)],
                                  h.size)
    size = pieces[-1][0] + len(pieces[-1][1]) if pieces else 0
    ck.ondisk.write_back()
    ck.ondisk.forget()
    refcounts = Refcounts(ck.file, ck.cbits, ck.order, h.refcount_table_offset,
                          h.refcount_table_clusters, lambda off, clusters: None)
    new_off = refcounts.alloc_clusters((size + ck.cs - 1) >> ck.cbits) if size else 0
    refcounts.cache.flush()
    ck.file.flush()
    if size:
        ck._guarded_check(new_off, size, 0)
        for pos, body in pieces:
            ck.file.pwrite(body, new_off + pos)
    ck.file.flush()
    old_off, old_size = h.snapshots_offset, ck.snapshots_size
    h.nb_snapshots, h.snapshots_offset, ck.snapshots_size = len(ck.snapshots), new_off, size
    write_fields(ck.file, h, "nb_snapshots", "snapshots_offset")
    ck.file.flush()
    if old_size:
        failed = refcounts.try_free(old_off, old_size)
        refcounts.cache.flush()
        if failed:
            ck.log(f"qcow2_free_clusters failed: {failed}")
    ck.file.flush()
    ck.file_len = ck.file.size()
