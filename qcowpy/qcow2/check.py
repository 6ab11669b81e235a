"""Consistency check and repair of qcow2 images (what ``qemu-img check [-r leaks|all]`` does).

The check rebuilds every cluster's reference count in memory from everything that holds
clusters — the header, the active and snapshot L1/L2 tables (a compressed cluster counts once
per host cluster it touches), the snapshot table, the refcount table and blocks, the bitmap
directory and bitmap tables — and compares it with the refcounts on disk:

* on disk greater than computed: a leak (wasted space, harmless);
* on disk smaller than computed: a corruption (a cluster in use could be handed out again);
* referenced but on disk 0: the refcount structure itself must be rebuilt (``-r all``).

It also reports reserved bits, unaligned entries, entries past the end of the file, refcount
blocks that are shared or misplaced and OFLAG_COPIED mismatches. Messages are worded as QEMU's
``qcow2_check_refcounts`` words them so a user (or a test) can compare the two line by line.

The algorithm follows QEMU's block/qcow2-refcount.c (calculate, compare, rebuild, re-check,
then the COPIED flags); the code is our own. It works on the host file directly, so it also
runs on images that the engine would refuse to open read-write (corrupt or dirty).
"""
from __future__ import annotations

import sys
from array import array
from typing import Callable

from ..errors import CorruptImage, QcowError
from ..format import bitmaps as B
from .encryption import check_area
from ..format import constants as C
from ..format.entries import compressed_descriptor, csize_shift, pack_table, unpack_table
from ..format.header import Header
from ..hostfile import HostFile
from .check_rebuild import RebuildRefcounts
from .check_snapshots import fix_snapshot_table, load_snapshots
from .checkbase import (FIX_ERRORS, FIX_LEAKS, CheckAbort, CheckContext, CheckFailed, CheckResult,  # noqa: F401
                        Hint, copy_result, write_fields)

_CHECK_FRAG_INFO = 2


class _Checker(RebuildRefcounts, CheckContext):
    """The refcount check: compute every cluster's refcount, compare, repair or rebuild."""

    # ---------------------------------------------------------------- in-memory refcounts
    def inc(self, res: CheckResult, table: array, offset: int, size: int) -> None:
        if size <= 0:
            return
        if offset + size - self.file_len >= self.cs:
            self.msg(res, "ERROR: counting reference for region exceeding the end of the file by one "
                           f"cluster or more: offset {offset:#x} size {size:#x}")
            res.corruptions += 1
            return
        first = offset >> self.cbits
        last = (offset + size - 1) >> self.cbits
        if last >= len(table):
            table.extend(array("Q", bytes(8 * (last + 1 - len(table)))))
        for k in range(first, last + 1):
            v = table[k]
            if v == self.rmax:
                self.msg(res, f"ERROR: overflow cluster offset={k << self.cbits:#x}")
                self.msg(res, "Use qemu-img amend to increase the refcount entry width or qemu-img convert "
                               "to create a clean copy if the image cannot be opened for writing")
                res.corruptions += 1
                continue
            table[k] = v + 1

    # ---------------------------------------------------------------- L1 / L2
    @property
    def external_data(self) -> bool:
        """Data clusters live in an external data file: they carry no refcounts (as in QEMU)."""
        return bool(self.h.incompatible_features & C.INCOMPAT_DATA_FILE)

    def _cluster_type(self, entry: int) -> str:
        if entry & C.OFLAG_COMPRESSED:
            return "compressed"
        if entry & C.OFLAG_ZERO and not self.extended:
            return "zero_alloc" if entry & C.L2E_OFFSET_MASK else "zero_plain"
        if not entry & C.L2E_OFFSET_MASK and entry & C.OFLAG_COPIED and self.external_data:
            return "normal"  # offset 0 in the data file (guest cluster 0)
        return "normal" if entry & C.L2E_OFFSET_MASK else "unallocated"

    def _fix_l2_by_zero(self, res: CheckResult, l2_offset: int, table: list[int], i: int,
                        active: bool = True) -> bool:
        if self.extended:
            bitmap = table[2 * i + 1]
            bitmap = (bitmap | (bitmap << 32)) & C.L2_BITMAP_ALL_ZEROES
            table[2 * i], table[2 * i + 1] = 0, bitmap
            data = pack_table([0, bitmap])
            where = l2_offset + 16 * i
        else:
            table[i] = C.OFLAG_ZERO
            data = pack_table([C.OFLAG_ZERO])
            where = l2_offset + 8 * i
        from .overlap import ACTIVE_L2, INACTIVE_L2
        try:
            self._guarded_check(where, len(data), ignore=ACTIVE_L2 if active else INACTIVE_L2)
        except CheckAbort:
            self.msg(res, "ERROR: Overlap check failed")
            res.check_errors += 1
            raise
        try:
            self.file.pwrite(data, where)
            self.file.flush()
        except (OSError, QcowError) as e:
            self.msg(res, f"ERROR: Failed to overwrite L2 table entry: {e}")
            res.check_errors += 1
            return False
        res.corruptions -= 1
        res.corruptions_fixed += 1
        return True

    def check_l2(self, res: CheckResult, table_rc: array, l2_offset: int, flags: int, fix: int,
                 active: bool = True) -> None:
        table = _l2_table(self.file, self.cs, l2_offset)
        if table is None:
            return
        step = 2 if self.extended else 1
        next_contiguous = 0
        for i in range(self.l2_entries):
            entry = table[i * step]
            bitmap = table[i * step + 1] if self.extended else 0
            if not entry and not bitmap:
                continue
            t = self._cluster_type(entry)
            if t != "compressed" and entry & C.L2E_STD_RESERVED_MASK:
                self.msg(res, f"ERROR found l2 entry with reserved bits set: {entry:x}")
                res.corruptions += 1
            if t == "compressed":
                if entry & C.OFLAG_COPIED:
                    mask = (1 << csize_shift(self.cbits)) - 1
                    self.msg(res, f"ERROR: coffset={entry & mask:#x}: copied flag must never be set for "
                                   "compressed clusters")
                    entry &= ~C.OFLAG_COPIED
                    res.corruptions += 1
                if self.external_data:
                    self.msg(res, f"ERROR compressed cluster {i} with data file, entry={entry:#x}")
                    res.corruptions += 1
                    continue
                if bitmap:
                    self.msg(res, f"ERROR compressed cluster {i} with non-zero subcluster allocation bitmap, "
                                   f"entry={entry:#x}")
                    res.corruptions += 1
                    continue
                coffset, csize = compressed_descriptor(entry, self.cbits)
                self.inc(res, table_rc, coffset, csize)
                if flags & _CHECK_FRAG_INFO:
                    res.allocated_clusters += 1
                    res.compressed_clusters += 1
                    res.fragmented_clusters += 1
            elif t in ("normal", "zero_alloc"):
                offset = entry & C.L2E_OFFSET_MASK
                if (bitmap >> 32) & bitmap:
                    res.corruptions += 1
                    self.msg(res, f"ERROR offset={offset:x}: Allocated cluster has corrupted subcluster "
                                   "allocation bitmap")
                if offset & (self.cs - 1):
                    res.corruptions += 1
                    contains_data = bool(bitmap & C.L2_BITMAP_ALL_ALLOC) if self.extended else \
                        not entry & C.OFLAG_ZERO
                    if not contains_data:
                        self.msg(res, f"{'Repairing' if fix & FIX_ERRORS else 'ERROR'} offset={offset:x}: "
                                       "Preallocated cluster is not properly aligned; L2 entry corrupted.")
                        if fix & FIX_ERRORS and self._fix_l2_by_zero(res, l2_offset, table, i, active):
                            continue
                    else:
                        self.msg(res, f"ERROR offset={offset:x}: Data cluster is not properly aligned; "
                                       "L2 entry corrupted.")
                if flags & _CHECK_FRAG_INFO:
                    res.allocated_clusters += 1
                    if next_contiguous and offset != next_contiguous:
                        res.fragmented_clusters += 1
                    next_contiguous = offset + self.cs
                if not self.external_data:
                    self.inc(res, table_rc, offset, self.cs)
            elif t == "unallocated":
                if bitmap & C.L2_BITMAP_ALL_ALLOC:
                    res.corruptions += 1
                    self.msg(res, "ERROR: Unallocated cluster has non-zero subcluster allocation map")

    def check_l1(self, res: CheckResult, table_rc: array, l1_offset: int, l1_size: int, flags: int,
                 fix: int, active: bool = True) -> None:
        if not l1_size:
            return
        self.inc(res, table_rc, l1_offset, l1_size * 8)
        l1 = unpack_table(self.file.pread(l1_size * 8, l1_offset))
        for entry in l1:
            if not entry:
                continue
            if entry & C.L1E_RESERVED_MASK:
                self.msg(res, f"ERROR found L1 entry with reserved bits set: {entry:x}")
                res.corruptions += 1
            l2_offset = entry & C.L1E_OFFSET_MASK
            self.inc(res, table_rc, l2_offset, self.cs)
            if l2_offset & (self.cs - 1):
                self.msg(res, f"ERROR l2_offset={l2_offset:x}: Table is not cluster aligned; L1 entry corrupted")
                res.corruptions += 1
            self.check_l2(res, table_rc, l2_offset, flags, fix, active)

    # ---------------------------------------------------------------- bitmaps
    def check_bitmaps(self, res: CheckResult, table_rc: array) -> None:
        ext = B.extension_of(self.h)  # QEMU ignores the extension unless the autoclear bit is set
        if ext is None or ext.nb_bitmaps == 0:
            return
        dir_offset, dir_size = ext.directory_offset, ext.directory_size
        self.inc(res, table_rc, dir_offset, dir_size)
        if dir_size > B.MAX_DIRECTORY_READ or dir_offset & (self.cs - 1) or dir_offset + dir_size > self.file_len:
            res.corruptions += 1
            return
        try:
            entries = B.parse_directory(self.file.pread(dir_size, dir_offset), ext.nb_bitmaps)
        except CorruptImage:
            res.corruptions += 1
            return
        for d in entries:
            t_off, t_size = d.table_offset, d.table_size
            self.inc(res, table_rc, t_off, t_size * 8)
            if t_size > B.MAX_TABLE_SIZE or t_off & (self.cs - 1):
                res.corruptions += 1
                continue
            raw = self.file.pread(t_size * 8, t_off)  # past the end of the file: zeros, as QEMU reads
            for entry in unpack_table(raw + bytes(t_size * 8 - len(raw))):
                off = entry & B.TABLE_OFFSET_MASK
                if entry & B.TABLE_RESERVED_MASK or off & (self.cs - 1) or (off and entry & B.TABLE_FLAG_ALL_ONES):
                    res.corruptions += 1
                    continue
                if off:
                    self.inc(res, table_rc, off, self.cs)

    # ---------------------------------------------------------------- refcount structure
    def check_refblocks(self, res: CheckResult, fix: int, table_rc: array) -> bool:
        rebuild = False
        reftable = self.ondisk.reftable
        for i, raw in enumerate(reftable):
            offset = raw & C.REFT_OFFSET_MASK
            cluster = offset >> self.cbits
            if raw & C.REFT_RESERVED_MASK:
                self.msg(res, f"ERROR refcount table entry {i} has reserved bits set")
                res.corruptions += 1
                rebuild = True
                continue
            if offset & (self.cs - 1):
                self.msg(res, f"ERROR refcount block {i} is not cluster aligned; refcount table entry corrupted")
                res.corruptions += 1
                rebuild = True
                continue
            if cluster >= len(table_rc):
                res.corruptions += 1
                self.msg(res, f"{'Repairing' if fix & FIX_ERRORS else 'ERROR'} refcount block {i} is outside image")
                if fix & FIX_ERRORS:
                    if offset + self.cs > C.MAX_CLUSTER_OFFSET + 1:
                        rebuild = True
                        self.msg(res, "ERROR could not resize image: Invalid argument")
                        continue
                    self.file.truncate(offset + self.cs)
                    self.file_len = self.file.size()
                    n = (self.file_len + self.cs - 1) >> self.cbits
                    if n > len(table_rc):
                        table_rc.extend(array("Q", bytes(8 * (n - len(table_rc)))))
                    res.corruptions -= 1
                    res.corruptions_fixed += 1
                    self.inc(res, table_rc, offset, self.cs)
                continue
            if offset:
                self.inc(res, table_rc, offset, self.cs)
                if table_rc[cluster] != 1:
                    self.msg(res, f"ERROR refcount block {i} refcount={table_rc[cluster]}")
                    res.corruptions += 1
                    rebuild = True
        return rebuild

    def calculate(self, res: CheckResult, fix: int, table_rc: array) -> bool:
        """Fill ``table_rc`` with the computed refcounts; returns whether a rebuild is needed."""
        h = self.h
        self.inc(res, table_rc, 0, self.cs)
        self.check_l1(res, table_rc, h.l1_table_offset, h.l1_size, _CHECK_FRAG_INFO, fix)
        for sn in self.snapshots:
            if sn.l1_table_offset & (self.cs - 1):
                self.msg(res, f"ERROR snapshot {sn.id_str} ({sn.name}) l1_offset={sn.l1_table_offset:#x}: "
                               "L1 table is not cluster aligned; snapshot table entry corrupted")
                res.corruptions += 1
                continue
            if sn.l1_size > C.MAX_L1_SIZE_BYTES // 8:
                self.msg(res, f"ERROR snapshot {sn.id_str} ({sn.name}) l1_size={sn.l1_size:#x}: "
                               "L1 table is too large; snapshot table entry corrupted")
                res.corruptions += 1
                continue
            self.check_l1(res, table_rc, sn.l1_table_offset, sn.l1_size, 0, fix, active=False)
        if self.external_data and h.nb_snapshots:
            self.msg(res, f"ERROR {h.nb_snapshots} snapshots in image with data file")
            res.corruptions += 1
        self.inc(res, table_rc, h.snapshots_offset, self.snapshots_size)
        self.inc(res, table_rc, h.refcount_table_offset, len(self.ondisk.reftable) * 8)
        self.check_bitmaps(res, table_rc)
        area = check_area(h)  # the LUKS header area (QEMU counts it the same way)
        if area is not None:
            self.inc(res, table_rc, *area)
        return self.check_refblocks(res, fix, table_rc)

    def compare(self, res: CheckResult, fix: int, table_rc: array) -> tuple[bool, int]:
        """Compare computed with on-disk refcounts; returns (rebuild needed, highest used cluster)."""
        rebuild = False
        highest = 0
        od = self.ondisk
        n = len(table_rc)
        pbb = od.per_block_bits
        for bi in range(0, ((n - 1) >> pbb) + 1 if n else 0):
            first = bi << pbb
            last = min(n, first + od.per_block)
            try:
                disk = od.block_values(bi)
            except CheckAbort as e:
                for i in range(first, last):
                    self.msg(res, f"Can't get refcount for cluster {i}: {e}")
                    res.check_errors += 1
                continue
            for i in range(first, last):
                r1 = disk[i - first] if disk is not None else 0
                r2 = table_rc[i]
                if r1 or r2:
                    highest = i
                if r1 == r2:
                    continue
                fixed = False
                if r1 == 0:
                    rebuild = True
                elif r1 > r2 and fix & FIX_LEAKS:
                    fixed = True
                elif r1 < r2 and fix & FIX_ERRORS:
                    fixed = True
                word = "Repairing" if fixed else ("ERROR" if r1 < r2 else "Leaked")
                self.msg(res, f"{word} cluster {i} refcount={r1} reference={r2}")
                if fixed and od.set(i, r2):
                    if r1 > r2:
                        res.leaks_fixed += 1
                    else:
                        res.corruptions_fixed += 1
                    continue
                if r1 < r2:
                    res.corruptions += 1
                else:
                    res.leaks += 1
        if od.dirty:
            od.write_back()
            self.file.flush()
        return rebuild, highest

    def check_copied(self, res: CheckResult, fix: int) -> None:
        if fix & FIX_ERRORS:
            repair = True
        elif fix & FIX_LEAKS:
            repair = not res.check_errors and not res.corruptions and not res.leaks
        else:
            repair = False
        h = self.h
        if not h.l1_size:
            return
        from .overlap import ACTIVE_L1, ACTIVE_L2
        l1 = unpack_table(self.file.pread(h.l1_size * 8, h.l1_table_offset))
        step = 2 if self.extended else 1
        word = "Repairing" if repair else "ERROR"
        for i, l1_entry in enumerate(l1):
            l2_offset = l1_entry & C.L1E_OFFSET_MASK
            if not l2_offset:
                continue
            try:
                rc = self.ondisk.get(l2_offset >> self.cbits)
            except CheckAbort:
                continue
            if (rc == 1) != bool(l1_entry & C.OFLAG_COPIED):
                res.corruptions += 1
                self.msg(res, f"{word} OFLAG_COPIED L2 cluster: l1_index={i} l1_entry={l1_entry:x} refcount={rc}")
                if repair:
                    new = l1_entry | C.OFLAG_COPIED if rc == 1 else l1_entry & ~C.OFLAG_COPIED
                    try:
                        self._guarded_check(h.l1_table_offset + 8 * i, 8, ignore=ACTIVE_L1)
                    except CheckAbort:
                        res.check_errors += 1
                        raise
                    self.file.pwrite(pack_table([new]), h.l1_table_offset + 8 * i)
                    self.file.flush()
                    res.corruptions -= 1
                    res.corruptions_fixed += 1
            table = _l2_table(self.file, self.cs, l2_offset)
            if table is None:
                continue
            dirty = 0
            for j in range(self.l2_entries):
                e = table[j * step]
                # only allocated clusters (normal, zero_alloc) have a refcount to agree with
                if self._cluster_type(e) not in ("normal", "zero_alloc"):
                    continue
                if self.external_data:
                    rc = 1  # data-file clusters always count as referenced once (QEMU)
                else:
                    try:
                        rc = self.ondisk.get((e & C.L2E_OFFSET_MASK) >> self.cbits)
                    except CheckAbort:
                        continue
                if (rc == 1) != bool(e & C.OFLAG_COPIED):
                    res.corruptions += 1
                    self.msg(res, f"{word} OFLAG_COPIED data cluster: l2_entry={e:x} refcount={rc}")
                    if repair:
                        table[j * step] = e | C.OFLAG_COPIED if rc == 1 else e & ~C.OFLAG_COPIED
                        dirty += 1
            if dirty:
                try:
                    self._guarded_check(l2_offset, self.cs, ignore=ACTIVE_L2)
                except CheckAbort:
                    self.msg(res, "ERROR: Could not write L2 table; metadata overlap check failed: "
                                   "Input/output error")
                    res.check_errors += 1
                    raise
                self.file.pwrite(pack_table(table), l2_offset)
                self.file.flush()
                res.corruptions -= dirty
                res.corruptions_fixed += dirty

    # ---------------------------------------------------------------- the whole refcount check
    def check_refcounts(self, res: CheckResult, fix: int) -> None:
        h = self.h
        nb_clusters = (self.file_len + self.cs - 1) >> self.cbits
        res.total_clusters = (h.size + self.cs - 1) >> self.cbits
        table_rc = array("Q", bytes(8 * nb_clusters))
        rebuild = self.calculate(res, fix, table_rc)
        pre = copy_result(res)
        r, highest = self.compare(res, 0, table_rc)
        rebuild = rebuild or r
        if rebuild and fix & FIX_ERRORS:
            old = copy_result(res)
            fresh_leaks = 0
            self.msg(res, "Rebuilding refcount structure")
            self.rebuild(res, table_rc)
            res.corruptions = 0
            res.leaks = 0
            table_rc = array("Q", bytes(8 * len(table_rc)))
            self.calculate(res, 0, table_rc)
            if fix & FIX_LEAKS:
                saved = copy_result(res)
                tmp = CheckResult()
                r, highest = self.compare(tmp, FIX_LEAKS, table_rc)
                saved.messages += tmp.messages
                if r:
                    self.msg(saved, "ERROR rebuilt refcount structure is still broken")
                fresh_leaks = tmp.leaks
                res.__dict__.update(saved.__dict__)
            if res.corruptions < old.corruptions:
                res.corruptions_fixed += old.corruptions - res.corruptions
            if res.leaks < old.leaks:
                res.leaks_fixed += old.leaks - res.leaks
            res.leaks += fresh_leaks
        elif fix:
            if rebuild:
                self.msg(res, "ERROR need to rebuild refcount structures")
                res.check_errors += 1
                raise CheckAbort("Input/output error")
            if res.leaks or res.corruptions:
                msgs = res.messages
                res.__dict__.update(copy_result(pre).__dict__)
                res.messages = msgs
                _, highest = self.compare(res, fix, table_rc)
        self.check_copied(res, fix)
        res.image_end_offset = (highest + 1) * self.cs


def check_file(file: HostFile, header: Header, fix: int = 0,
               log: Callable[[str], None] | None = None) -> CheckResult:
    """Check (and with ``fix`` repair) the qcow2 image in ``file``, as ``qemu-img check`` does.

    ``header`` must already have been validated (the engine's open checks). Raises QcowError
    only for failures that end the check early (QEMU's "Check failed"); ``check_errors`` counts
    the internal errors met on the way. With a fix that leaves no corruption, the dirty and
    corrupt bits are cleared.
    """
    if fix and header.autoclear_features & ~C.AUTOCLEAR_KNOWN:
        # opening read-write clears the autoclear bits this writer does not know (the spec; QEMU)
        header.autoclear_features &= C.AUTOCLEAR_KNOWN
        write_fields(file, header, "autoclear_features")
    res = CheckResult()
    snapshot_res = CheckResult()  # kept apart, as QEMU does: the refcount repair decisions do not see it
    checker = _Checker(file, header, log or (lambda s: None))
    try:
        load_snapshots(checker, snapshot_res, fix)
    except CheckAbort as e:
        res.add(snapshot_res, with_frag=False)
        raise CheckFailed(str(e), res, e.lines) from None
    try:
        checker.check_refcounts(res, fix)
    except CheckAbort as e:
        res.add(snapshot_res, with_frag=False)
        raise CheckFailed(str(e), res, e.lines) from None
    try:
        fix_snapshot_table(checker, snapshot_res, fix)
    except CheckAbort as e:
        res.add(snapshot_res, with_frag=False)
        raise CheckFailed(str(e), res, e.lines) from None
    res.add(snapshot_res, with_frag=False)
    if fix and not res.check_errors and not res.corruptions:
        bits = header.incompatible_features & ~(C.INCOMPAT_DIRTY | C.INCOMPAT_CORRUPT)
        if bits != header.incompatible_features:
            file.flush()
            header.incompatible_features = bits
            write_fields(file, header, "incompatible_features")
            file.flush()
    return res


def stderr_log(line: str) -> None:
    """A check's finding as QEMU prints it: one line on stderr."""
    sys.stderr.write(line + "\n")


def repair_dirty(file: HostFile, header: Header, log: Callable[[str], None] | None = stderr_log) -> CheckResult:
    """What QEMU does when it opens a dirty (lazy refcounts) image read-write: repair everything.

    The check's findings go to stderr by default because QEMU's open prints them there (any
    program that opens the image read-write shows them: amend, commit, qemu-io). Raises
    CorruptImage when the repair cannot complete; clears the dirty bit on success.
    """
    try:
        res = check_file(file, header, FIX_LEAKS | FIX_ERRORS, log)
    except CheckFailed as e:
        raise CorruptImage(f"Could not repair dirty image: {e}") from None
    if res.check_errors:
        raise CorruptImage("Could not repair dirty image: Input/output error")
    return res


def _l2_table(file, cluster_size: int, offset: int) -> list[int] | None:
    """The L2 table at ``offset``, or None when every entry is zero (as past the end of the
    file): nothing in it to count, and a hostile L1 table may name thousands of them."""
    raw = file.pread(cluster_size, offset)
    return unpack_table(raw) if raw.strip(b"\0") else None
