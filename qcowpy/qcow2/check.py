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

from array import array
from dataclasses import dataclass, field
from typing import Callable

from ..errors import CorruptImage, QcowError
from ..format import constants as C
from ..format import bitmaps as B
from ..format.entries import compressed_descriptor, csize_shift, pack_table, unpack_table
from ..format.header import Header, field_patch
from ..format.refcount import decode_block, encode_block, max_refcount
from ..format.snapshot import FIXED as SN_FIXED
from ..format.snapshot import MAX_EXTRA_DATA, Snapshot, read_entries, table_pieces_as_qemu
from ..hostfile import HostFile

FIX_LEAKS = 1
FIX_ERRORS = 2

_L2_BITMAP_ALL_ALLOC = 0xFFFFFFFF
_L2_BITMAP_ALL_ZEROES = 0xFFFFFFFF << 32
_CHECK_FRAG_INFO = 2


@dataclass
class CheckResult:
    """The counters of QEMU's BdrvCheckResult plus the messages printed while checking."""

    check_errors: int = 0
    corruptions: int = 0
    leaks: int = 0
    corruptions_fixed: int = 0
    leaks_fixed: int = 0
    image_end_offset: int = 0
    total_clusters: int = 0
    allocated_clusters: int = 0
    fragmented_clusters: int = 0
    compressed_clusters: int = 0
    messages: list[str] = field(default_factory=list)

    @property
    def clean(self) -> bool:
        """No corruptions and no internal errors (leaks are allowed)."""
        return not self.corruptions and not self.check_errors

    def add(self, other: "CheckResult", with_frag: bool) -> None:
        self.check_errors += other.check_errors
        self.corruptions += other.corruptions
        self.leaks += other.leaks
        self.corruptions_fixed += other.corruptions_fixed
        self.leaks_fixed += other.leaks_fixed
        self.messages += other.messages
        if with_frag:
            self.image_end_offset = other.image_end_offset
            self.total_clusters = other.total_clusters
            self.allocated_clusters = other.allocated_clusters
            self.fragmented_clusters = other.fragmented_clusters
            self.compressed_clusters = other.compressed_clusters


class Hint(str):
    """A hint line among the error reports of a failed check: printed without the program name."""


_SN_MAX_TABLE = 1024 * C.MAX_SNAPSHOTS  # QCOW_MAX_SNAPSHOTS_SIZE


class _InternalError(Exception):
    """An I/O-level failure that ends the check (QEMU returns -errno).

    ``lines`` are error reports printed before "Check failed" (with the program name prefix).
    """

    def __init__(self, message: str, lines: tuple[str, ...] = ()):
        super().__init__(message)
        self.lines = list(lines)


class _OnDisk:
    """The refcounts as stored in the image (reftable + refcount blocks), read and patched."""

    def __init__(self, file: HostFile, header: Header, reftable: list[int]):
        self.file = file
        self.cs = header.cluster_size
        self.order = header.refcount_order
        self.per_block_bits = header.cluster_bits + 3 - self.order
        self.per_block = 1 << self.per_block_bits
        self.reftable = reftable
        self.blocks: dict[int, list[int]] = {}
        self.dirty: set[int] = set()

    def _block(self, index: int) -> tuple[int, list[int]] | None:
        if index >= len(self.reftable):
            return None
        off = self.reftable[index] & C.REFT_OFFSET_MASK
        if not off:
            return None
        if off & (self.cs - 1):
            raise _InternalError("Input/output error")
        blk = self.blocks.get(off)
        if blk is None:
            if len(self.blocks) > 256 and not self.dirty:
                self.blocks.clear()
            blk = decode_block(self.file.pread(self.cs, off), self.order, self.per_block)
            self.blocks[off] = blk
        return off, blk

    def get(self, cluster: int) -> int:
        got = self._block(cluster >> self.per_block_bits)
        return got[1][cluster & (self.per_block - 1)] if got else 0

    def block_values(self, index: int) -> list[int] | None:
        got = self._block(index)
        return got[1] if got else None

    def set(self, cluster: int, value: int) -> bool:
        got = self._block(cluster >> self.per_block_bits)
        if not got:
            return False
        got[1][cluster & (self.per_block - 1)] = value
        self.dirty.add(got[0])
        return True

    def write_back(self) -> None:
        for off in sorted(self.dirty):
            self.file.pwrite(encode_block(self.blocks[off], self.order, self.cs), off)
        self.dirty.clear()

    def forget(self) -> None:
        self.blocks.clear()
        self.dirty.clear()


class _Checker:
    def __init__(self, file: HostFile, header: Header, log: Callable[[str], None]):
        self.file = file
        self.h = header
        self.cs = header.cluster_size
        self.cbits = header.cluster_bits
        self.extended = header.extended_l2
        self.l2_entries = self.cs // (16 if self.extended else 8)
        self.order = header.refcount_order
        self.rmax = max_refcount(self.order)
        self.log = log
        self.snapshots: list[Snapshot] = []
        self._sn_raw: list[tuple[bytes, bytes]] = []  # id and name bytes, for rewriting the table
        self.snapshots_size = 0
        self.file_len = file.size()
        self._load_reftable()

    # ---------------------------------------------------------------- setup
    def _load_reftable(self) -> None:
        h = self.h
        n = h.refcount_table_clusters * self.cs // 8
        raw = self.file.pread(n * 8, h.refcount_table_offset) if n else b""
        self.ondisk = _OnDisk(self.file, h, unpack_table(raw))

    def load_snapshots(self, res: CheckResult, fix: int = 0) -> None:
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
        h = self.h
        n = h.nb_snapshots
        if not n:
            return
        repair = bool(fix & FIX_ERRORS)
        reduced = dropped = 0
        sn_off = h.snapshots_offset
        if n > C.MAX_SNAPSHOTS and repair:
            self._msg(res, f"Discarding {n - C.MAX_SNAPSHOTS} overhanging snapshots")
            reduced += n - C.MAX_SNAPSHOTS
            n = C.MAX_SNAPSHOTS
        if n > C.MAX_SNAPSHOTS:
            res.check_errors += 1
            raise _InternalError("File too large", (
                "ERROR snapshot table too large",
                Hint(f"You can force-remove all {n - C.MAX_SNAPSHOTS} overhanging snapshots with "
                     "qemu-img check -r all")))
        if (1 << 63) - 1 - n * SN_FIXED.size < sn_off or sn_off & (self.cs - 1):
            res.check_errors += 1
            raise _InternalError("Invalid argument", ("ERROR snapshot table offset invalid",))
        snaps: list[Snapshot] = []
        self._sn_raw = []
        end = 0
        table_length = 0
        for i, e in enumerate(read_entries(self.file.pread, sn_off, n, lenient=True)):
            table_length = (table_length + 7) & ~7
            if e.extra_len > MAX_EXTRA_DATA:
                if not repair:
                    res.check_errors += 1
                    raise _InternalError("File too large", (
                        f"ERROR failed to read the snapshot table: Too much extra metadata in snapshot "
                        f"table entry {i}",
                        Hint("You can force-remove this extra metadata with qemu-img check -r all")))
                self._msg(res, f"Discarding too much extra metadata in snapshot table entry {i} "
                               f"({e.extra_len} > {MAX_EXTRA_DATA})")
                dropped += 1
            table_length += SN_FIXED.size + len(e.sn.extra_data) + len(e.id_b) + len(e.name_b)
            if table_length > _SN_MAX_TABLE or e.end > 0x7FFFFFFF:
                if not repair:
                    res.check_errors += 1
                    raise _InternalError("File too large", (
                        "ERROR failed to read the snapshot table: Snapshot table is too big",
                        Hint(f"You can force-remove all {n - i} overhanging snapshots with qemu-img "
                             "check -r all")))
                self._msg(res, f"Discarding {n - i} overhanging snapshots (snapshot table is too big)")
                reduced += n - i
                n = i
                break
            end = e.end
            id_b, name_b = e.id_b.split(b"\0")[0], e.name_b.split(b"\0")[0]
            sn = e.sn
            sn.id_str, sn.name = id_b.decode("utf-8", "replace"), name_b.decode("utf-8", "replace")
            snaps.append(sn)
            self._sn_raw.append((id_b, name_b))
        self.snapshots = snaps
        self.snapshots_size = end
        res.corruptions += reduced + dropped
        if reduced:
            # the count reaches the header before the refcount check, which relies on it; the
            # discarded snapshots' clusters are now leaks, which that check repairs
            h.nb_snapshots = n
            self.file.pwrite(*reversed(field_patch(h, "nb_snapshots")))
            self.file.flush()
            res.corruptions_fixed += reduced
            res.corruptions -= reduced
        if h.version >= 3:  # v3 entries need at least vm_state_size_large and disk_size
            for i, sn in enumerate(snaps):
                if len(sn.extra_data) < 16:
                    res.corruptions += 1
                    self._msg(res, f"{'Repairing' if repair else 'ERROR'} snapshot table entry {i} is incomplete")

    def fix_snapshot_table(self, res: CheckResult, fix: int) -> None:
        """QEMU's ``qcow2_check_fix_snapshot_table``: after the refcount check has made the
        refcounts trustworthy, a snapshot table with corruptions left is written anew (complete v3
        entries, extra data cut to size) in freshly allocated clusters, the header is pointed at it
        and the old table's clusters are freed."""
        if not (res.corruptions and fix & FIX_ERRORS):
            return
        try:
            self._write_snapshot_table()
        except (OSError, QcowError, _InternalError) as e:
            reason = getattr(e, "strerror", None) or str(e)
            res.check_errors += 1
            self._msg(res, f"ERROR failed to update snapshot table: {reason}")
            raise _InternalError(reason) from None
        res.corruptions_fixed += res.corruptions
        res.corruptions = 0

    def _write_snapshot_table(self) -> None:
        from .refcount import Refcounts
        h = self.h
        pieces = table_pieces_as_qemu([(sn, id_b, name_b) for sn, (id_b, name_b) in zip(self.snapshots, self._sn_raw)],
                                      h.size)
        size = pieces[-1][0] + len(pieces[-1][1]) if pieces else 0
        self.ondisk.write_back()
        self.ondisk.forget()
        refcounts = Refcounts(self.file, self.cbits, self.order, h.refcount_table_offset,
                              h.refcount_table_clusters, lambda off, clusters: None)
        new_off = refcounts.alloc_clusters((size + self.cs - 1) >> self.cbits) if size else 0
        refcounts.cache.flush()
        self.file.flush()
        if size:
            self._guarded_check(new_off, size, 0)
            for pos, body in pieces:
                self.file.pwrite(body, new_off + pos)
        self.file.flush()
        old_off, old_size = h.snapshots_offset, self.snapshots_size
        h.nb_snapshots, h.snapshots_offset, self.snapshots_size = len(self.snapshots), new_off, size
        self.file.pwrite(*reversed(field_patch(h, "nb_snapshots", "snapshots_offset")))
        self.file.flush()
        if old_size:
            failed = refcounts.try_free(old_off, old_size)
            refcounts.cache.flush()
            if failed:
                self.log(f"qcow2_free_clusters failed: {failed}")
        self.file.flush()
        self.file_len = self.file.size()

    def _msg(self, res: CheckResult, text: str) -> None:
        res.messages.append(text)
        self.log(text)

    # ---------------------------------------------------------------- in-memory refcounts
    def inc(self, res: CheckResult, table: array, offset: int, size: int) -> None:
        if size <= 0:
            return
        if offset + size - self.file_len >= self.cs:
            self._msg(res, "ERROR: counting reference for region exceeding the end of the file by one "
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
                self._msg(res, f"ERROR: overflow cluster offset={k << self.cbits:#x}")
                self._msg(res, "Use qemu-img amend to increase the refcount entry width or qemu-img convert "
                               "to create a clean copy if the image cannot be opened for writing")
                res.corruptions += 1
                continue
            table[k] = v + 1

    # ---------------------------------------------------------------- L1 / L2
    def _cluster_type(self, entry: int) -> str:
        if entry & C.OFLAG_COMPRESSED:
            return "compressed"
        if entry & C.OFLAG_ZERO and not self.extended:
            return "zero_alloc" if entry & C.L2E_OFFSET_MASK else "zero_plain"
        return "normal" if entry & C.L2E_OFFSET_MASK else "unallocated"

    def _fix_l2_by_zero(self, res: CheckResult, l2_offset: int, table: list[int], i: int,
                        active: bool = True) -> bool:
        if self.extended:
            bitmap = table[2 * i + 1]
            bitmap = (bitmap | (bitmap << 32)) & _L2_BITMAP_ALL_ZEROES
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
        except _InternalError:
            self._msg(res, "ERROR: Overlap check failed")
            res.check_errors += 1
            raise
        try:
            self.file.pwrite(data, where)
            self.file.flush()
        except (OSError, QcowError) as e:
            self._msg(res, f"ERROR: Failed to overwrite L2 table entry: {e}")
            res.check_errors += 1
            return False
        res.corruptions -= 1
        res.corruptions_fixed += 1
        return True

    def check_l2(self, res: CheckResult, table_rc: array, l2_offset: int, flags: int, fix: int,
                 active: bool = True) -> None:
        raw = self.file.pread(self.cs, l2_offset)
        table = unpack_table(raw)
        step = 2 if self.extended else 1
        next_contiguous = 0
        for i in range(self.l2_entries):
            entry = table[i * step]
            bitmap = table[i * step + 1] if self.extended else 0
            if not entry and not bitmap:
                continue
            t = self._cluster_type(entry)
            if t != "compressed" and entry & C.L2E_STD_RESERVED_MASK:
                self._msg(res, f"ERROR found l2 entry with reserved bits set: {entry:x}")
                res.corruptions += 1
            if t == "compressed":
                if entry & C.OFLAG_COPIED:
                    mask = (1 << csize_shift(self.cbits)) - 1
                    self._msg(res, f"ERROR: coffset={entry & mask:#x}: copied flag must never be set for "
                                   "compressed clusters")
                    entry &= ~C.OFLAG_COPIED
                    res.corruptions += 1
                if bitmap:
                    self._msg(res, f"ERROR compressed cluster {i} with non-zero subcluster allocation bitmap, "
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
                    self._msg(res, f"ERROR offset={offset:x}: Allocated cluster has corrupted subcluster "
                                   "allocation bitmap")
                if offset & (self.cs - 1):
                    res.corruptions += 1
                    contains_data = bool(bitmap & _L2_BITMAP_ALL_ALLOC) if self.extended else \
                        not entry & C.OFLAG_ZERO
                    if not contains_data:
                        self._msg(res, f"{'Repairing' if fix & FIX_ERRORS else 'ERROR'} offset={offset:x}: "
                                       "Preallocated cluster is not properly aligned; L2 entry corrupted.")
                        if fix & FIX_ERRORS and self._fix_l2_by_zero(res, l2_offset, table, i, active):
                            continue
                    else:
                        self._msg(res, f"ERROR offset={offset:x}: Data cluster is not properly aligned; "
                                       "L2 entry corrupted.")
                if flags & _CHECK_FRAG_INFO:
                    res.allocated_clusters += 1
                    if next_contiguous and offset != next_contiguous:
                        res.fragmented_clusters += 1
                    next_contiguous = offset + self.cs
                self.inc(res, table_rc, offset, self.cs)
            elif t == "unallocated":
                if bitmap & _L2_BITMAP_ALL_ALLOC:
                    res.corruptions += 1
                    self._msg(res, "ERROR: Unallocated cluster has non-zero subcluster allocation map")

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
                self._msg(res, f"ERROR found L1 entry with reserved bits set: {entry:x}")
                res.corruptions += 1
            l2_offset = entry & C.L1E_OFFSET_MASK
            self.inc(res, table_rc, l2_offset, self.cs)
            if l2_offset & (self.cs - 1):
                self._msg(res, f"ERROR l2_offset={l2_offset:x}: Table is not cluster aligned; L1 entry corrupted")
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
            if t_size > B.MAX_TABLE_SIZE or t_off & (self.cs - 1) or t_off + t_size * 8 > self.file_len:
                res.corruptions += 1
                continue
            for entry in unpack_table(self.file.pread(t_size * 8, t_off)):
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
                self._msg(res, f"ERROR refcount table entry {i} has reserved bits set")
                res.corruptions += 1
                rebuild = True
                continue
            if offset & (self.cs - 1):
                self._msg(res, f"ERROR refcount block {i} is not cluster aligned; refcount table entry corrupted")
                res.corruptions += 1
                rebuild = True
                continue
            if cluster >= len(table_rc):
                res.corruptions += 1
                self._msg(res, f"{'Repairing' if fix & FIX_ERRORS else 'ERROR'} refcount block {i} is outside image")
                if fix & FIX_ERRORS:
                    if offset + self.cs > C.MAX_CLUSTER_OFFSET + 1:
                        rebuild = True
                        self._msg(res, "ERROR could not resize image: Invalid argument")
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
                    self._msg(res, f"ERROR refcount block {i} refcount={table_rc[cluster]}")
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
                self._msg(res, f"ERROR snapshot {sn.id_str} ({sn.name}) l1_offset={sn.l1_table_offset:#x}: "
                               "L1 table is not cluster aligned; snapshot table entry corrupted")
                res.corruptions += 1
                continue
            if sn.l1_size > C.MAX_L1_SIZE_BYTES // 8:
                self._msg(res, f"ERROR snapshot {sn.id_str} ({sn.name}) l1_size={sn.l1_size:#x}: "
                               "L1 table is too large; snapshot table entry corrupted")
                res.corruptions += 1
                continue
            self.check_l1(res, table_rc, sn.l1_table_offset, sn.l1_size, 0, fix, active=False)
        self.inc(res, table_rc, h.snapshots_offset, self.snapshots_size)
        self.inc(res, table_rc, h.refcount_table_offset, len(self.ondisk.reftable) * 8)
        self.check_bitmaps(res, table_rc)
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
            except _InternalError as e:
                for i in range(first, last):
                    self._msg(res, f"Can't get refcount for cluster {i}: {e}")
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
                self._msg(res, f"{word} cluster {i} refcount={r1} reference={r2}")
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

    # ---------------------------------------------------------------- rebuild
    def _alloc_imrt(self, table_rc: array, count: int, first_free: list[int]) -> int:
        cluster = first_free[0]
        contiguous = 0
        first_gap = True
        n = len(table_rc)
        while cluster < n and contiguous < count:
            if not table_rc[cluster]:
                contiguous += 1
                if first_gap:
                    first_free[0] = cluster
                    first_gap = False
            else:
                contiguous = 0
            cluster += 1
        if contiguous < count:
            need = cluster + count - contiguous
            if need > len(table_rc):
                table_rc.extend(array("Q", bytes(8 * (need - len(table_rc)))))
        cluster -= contiguous
        for i in range(count):
            table_rc[cluster + i] = 1
        return cluster << self.cbits

    def _write_refblocks(self, table_rc: array, first_cluster: int, end_cluster: int,
                         reftable: list[int]) -> bool:
        od = self.ondisk
        grown = False
        first_free = [0]
        cluster = first_cluster
        while cluster < end_cluster:
            if cluster >= len(table_rc) or not table_rc[cluster]:
                cluster += 1
                continue
            index = cluster >> od.per_block_bits
            start = index << od.per_block_bits
            if index < len(reftable) and reftable[index]:
                block_off = reftable[index]
            else:
                if first_free[0] < start:
                    first_free[0] = start
                block_off = self._alloc_imrt(table_rc, 1, first_free)
                if (block_off >> self.cbits) >= end_cluster:
                    end_cluster = (block_off >> self.cbits) + 1
                if len(reftable) <= index:
                    entries = (((index + 1) * 8 + self.cs - 1) // self.cs) * self.cs // 8
                    reftable.extend([0] * (entries - len(reftable)))
                    grown = True
                reftable[index] = block_off
            self._overlap_check(block_off, self.cs, "ERROR writing refblock")
            values = table_rc[start:start + od.per_block].tolist()
            values += [0] * (od.per_block - len(values))
            self.file.pwrite(encode_block(values, self.order, self.cs), block_off)
            cluster = start + od.per_block
        return grown

    def rebuild(self, res: CheckResult, table_rc: array) -> None:
        """Write a new refcount structure from ``table_rc`` (the old one is leaked, as in QEMU)."""
        self.ondisk.forget()
        self._layout = self._current_layout()
        reftable: list[int] = []
        changed = self._write_refblocks(table_rc, 0, len(table_rc), reftable)
        assert changed
        rt_offset = -1
        rt_clusters = 0
        while changed:
            rt_clusters = (len(reftable) * 8 + self.cs - 1) // self.cs
            rt_offset = self._alloc_imrt(table_rc, rt_clusters, [0])
            start = rt_offset >> self.cbits
            changed = self._write_refblocks(table_rc, start, start + rt_clusters, reftable)
        if rt_clusters * self.cs > C.MAX_REFTABLE_SIZE_BYTES:
            raise _InternalError("File too large")
        self._overlap_check(rt_offset, len(reftable) * 8, "ERROR writing reftable")
        self.file.pwrite(pack_table(reftable), rt_offset)
        self.file.flush()
        self.h.refcount_table_offset = rt_offset
        self.h.refcount_table_clusters = rt_clusters
        self.file.pwrite(*reversed(field_patch(self.h, "refcount_table_offset", "refcount_table_clusters")))
        self.file.flush()
        self.file_len = self.file.size()
        self.ondisk = _OnDisk(self.file, self.h, reftable)

    def _current_layout(self):
        from .overlap import Layout
        h = self.h
        l1 = unpack_table(self.file.pread(h.l1_size * 8, h.l1_table_offset)) if h.l1_size else []
        return Layout(self.cs, h.l1_table_offset, l1, h.refcount_table_offset, list(self.ondisk.reftable),
                      h.snapshots_offset, self.snapshots_size,
                      [(s.l1_table_offset, s.l1_size) for s in self.snapshots], B.directory_location(h))

    def _guarded_check(self, offset: int, size: int, ignore: int, what: str | None = None) -> None:
        """Overlap check for a repair write against the image's current metadata (as QEMU checks its
        in-memory state before every repair write); an overlap marks the image corrupt and raises."""
        self._layout = self._current_layout()
        self._overlap_check(offset, size, what, ignore)

    def _overlap_check(self, offset: int, size: int, what: str | None, ignore: int = 0) -> None:
        from .overlap import find_overlap, overlap_message
        kind = find_overlap(self._layout, offset, size, ignore)
        if not kind:
            return
        self.log(f"qcow2: Marking image as corrupt: {overlap_message(kind)}; further corruption events "
                 "will be suppressed")
        self.h.incompatible_features |= C.INCOMPAT_CORRUPT
        self.file.pwrite(*reversed(field_patch(self.h, "incompatible_features")))
        self.file.flush()
        raise _InternalError("Input/output error", (f"{what}: Input/output error",) if what else ())

    # ---------------------------------------------------------------- OFLAG_COPIED
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
            except _InternalError:
                continue
            if (rc == 1) != bool(l1_entry & C.OFLAG_COPIED):
                res.corruptions += 1
                self._msg(res, f"{word} OFLAG_COPIED L2 cluster: l1_index={i} l1_entry={l1_entry:x} refcount={rc}")
                if repair:
                    new = l1_entry | C.OFLAG_COPIED if rc == 1 else l1_entry & ~C.OFLAG_COPIED
                    try:
                        self._guarded_check(h.l1_table_offset + 8 * i, 8, ignore=ACTIVE_L1)
                    except _InternalError:
                        res.check_errors += 1
                        raise
                    self.file.pwrite(pack_table([new]), h.l1_table_offset + 8 * i)
                    self.file.flush()
                    res.corruptions -= 1
                    res.corruptions_fixed += 1
            table = unpack_table(self.file.pread(self.cs, l2_offset))
            dirty = 0
            for j in range(self.l2_entries):
                e = table[j * step]
                t = self._cluster_type(e)
                if t not in ("normal", "zero_alloc"):
                    continue
                try:
                    rc = self.ondisk.get((e & C.L2E_OFFSET_MASK) >> self.cbits)
                except _InternalError:
                    continue
                if (rc == 1) != bool(e & C.OFLAG_COPIED):
                    res.corruptions += 1
                    self._msg(res, f"{word} OFLAG_COPIED data cluster: l2_entry={e:x} refcount={rc}")
                    if repair:
                        table[j * step] = e | C.OFLAG_COPIED if rc == 1 else e & ~C.OFLAG_COPIED
                        dirty += 1
            if dirty:
                try:
                    self._guarded_check(l2_offset, self.cs, ignore=ACTIVE_L2)
                except _InternalError:
                    self._msg(res, "ERROR: Could not write L2 table; metadata overlap check failed: "
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
        pre = _copy(res)
        r, highest = self.compare(res, 0, table_rc)
        rebuild = rebuild or r
        if rebuild and fix & FIX_ERRORS:
            old = _copy(res)
            fresh_leaks = 0
            self._msg(res, "Rebuilding refcount structure")
            self.rebuild(res, table_rc)
            res.corruptions = 0
            res.leaks = 0
            table_rc = array("Q", bytes(8 * len(table_rc)))
            self.calculate(res, 0, table_rc)
            if fix & FIX_LEAKS:
                saved = _copy(res)
                tmp = CheckResult()
                r, highest = self.compare(tmp, FIX_LEAKS, table_rc)
                saved.messages += tmp.messages
                if r:
                    self._msg(saved, "ERROR rebuilt refcount structure is still broken")
                fresh_leaks = tmp.leaks
                res.__dict__.update(saved.__dict__)
            if res.corruptions < old.corruptions:
                res.corruptions_fixed += old.corruptions - res.corruptions
            if res.leaks < old.leaks:
                res.leaks_fixed += old.leaks - res.leaks
            res.leaks += fresh_leaks
        elif fix:
            if rebuild:
                self._msg(res, "ERROR need to rebuild refcount structures")
                res.check_errors += 1
                raise _InternalError("Input/output error")
            if res.leaks or res.corruptions:
                msgs = res.messages
                res.__dict__.update(_copy(pre).__dict__)
                res.messages = msgs
                _, highest = self.compare(res, fix, table_rc)
        self.check_copied(res, fix)
        res.image_end_offset = (highest + 1) * self.cs


def _copy(res: CheckResult) -> CheckResult:
    c = CheckResult(**{k: v for k, v in res.__dict__.items() if k != "messages"})
    c.messages = list(res.messages)
    return c


def check_file(file: HostFile, header: Header, fix: int = 0,
               log: Callable[[str], None] | None = None) -> CheckResult:
    """Check (and with ``fix`` repair) the qcow2 image in ``file``, as ``qemu-img check`` does.

    ``header`` must already have been validated (the engine's open checks). Raises QcowError
    only for failures that end the check early (QEMU's "Check failed"); ``check_errors`` counts
    the internal errors met on the way. With a fix that leaves no corruption, the dirty and
    corrupt bits are cleared.
    """
    res = CheckResult()
    snapshot_res = CheckResult()  # kept apart, as QEMU does: the refcount repair decisions do not see it
    checker = _Checker(file, header, log or (lambda s: None))
    try:
        checker.load_snapshots(snapshot_res, fix)
    except _InternalError as e:
        res.add(snapshot_res, with_frag=False)
        raise CheckFailed(str(e), res, e.lines) from None
    try:
        checker.check_refcounts(res, fix)
    except _InternalError as e:
        res.add(snapshot_res, with_frag=False)
        raise CheckFailed(str(e), res, e.lines) from None
    try:
        checker.fix_snapshot_table(snapshot_res, fix)
    except _InternalError as e:
        res.add(snapshot_res, with_frag=False)
        raise CheckFailed(str(e), res, e.lines) from None
    res.add(snapshot_res, with_frag=False)
    if fix and not res.check_errors and not res.corruptions:
        bits = header.incompatible_features & ~(C.INCOMPAT_DIRTY | C.INCOMPAT_CORRUPT)
        if bits != header.incompatible_features:
            file.flush()
            header.incompatible_features = bits
            file.pwrite(*reversed(field_patch(header, "incompatible_features")))
            file.flush()
    return res


class CheckFailed(QcowError):
    """The check could not complete (exit status 1); ``result`` holds what was counted so far."""

    def __init__(self, message: str, result: CheckResult, lines: list[str] | None = None):
        super().__init__(message)
        self.result = result
        self.lines = lines or []


def repair_dirty(file: HostFile, header: Header, log: Callable[[str], None] | None = None) -> CheckResult:
    """What QEMU does when it opens a dirty (lazy refcounts) image read-write: repair everything.

    Raises CorruptImage when the repair cannot complete; clears the dirty bit on success.
    """
    try:
        res = check_file(file, header, FIX_LEAKS | FIX_ERRORS, log)
    except CheckFailed as e:
        raise CorruptImage(f"Could not repair dirty image: {e}") from None
    if res.check_errors:
        raise CorruptImage("Could not repair dirty image: Input/output error")
    return res
