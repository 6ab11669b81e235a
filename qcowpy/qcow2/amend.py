"""What ``qemu-img amend`` changes in a qcow2 image (QEMU's qcow2_amend_options and helpers).

Each operation follows the QEMU function named in its docstring and leaves, at any kill, at
most leaked clusters with either the old or the new image readable (docs/reliability.md, "amend"):

* upgrade / downgrade end in one write of the header cluster; a downgrade first turns zero
  clusters into data clusters through the ordinary data path (each step reads the same);
* a refcount width change writes the new refcount blocks and table in clusters the old
  structure counts as used, then switches the header in one write, then frees the old ones.

Header fields, L1 and refcounts are still written only through the metadata owner.
"""
from __future__ import annotations

from typing import Callable

from ..errors import CorruptImage, CorruptTable, QcowError
from ..format import constants as C
from ..format.entries import ClusterType, l1_offset, pack_table, unpack_table
from ..format.entries import cluster_type as std_cluster_type
from ..format.header import feature_table_bytes
from ..format.refcount import decode_block, encode_block, entries_per_block
from ..units import c_hex
from .image import Qcow2Image

Status = Callable[[int, int], None]  # (done, total) of the current operation


class AmendError(QcowError):
    """An amend refusal with qemu-img's message (and, like QEMU's, an optional hint line)."""

    def __init__(self, message: str, hint: str | None = None):
        super().__init__(message)
        self.hint = hint


def mark_clean(img: Qcow2Image) -> None:
    """QEMU's qcow2_mark_clean: flush everything, then clear the dirty bit in the header."""
    meta = img.meta
    if img.header.incompatible_features & C.INCOMPAT_DIRTY:
        meta.sync()
        meta.set_incompatible(img.header.incompatible_features & ~C.INCOMPAT_DIRTY)


def _rewrite(img: Qcow2Image, **fields) -> None:
    """QEMU's qcow2_update_header: the whole header cluster from the fields in memory."""
    img.meta.sync()
    h = img.header.copy()
    for k, v in fields.items():
        setattr(h, k, v)
    h.set_extension(C.EXT_FEATURE_TABLE, feature_table_bytes() if h.version >= 3 and h.cluster_size > 4096 else None)
    img.meta.rewrite_header(h)
    img.file.flush()


def set_lazy_refcounts(img: Qcow2Image, on: bool, version: int) -> None:
    h = img.header
    if on == bool(h.compatible_features & C.COMPAT_LAZY_REFCOUNTS):
        return
    if on:
        if version < 3:
            raise AmendError("Lazy refcounts only supported with compatibility level 1.1 and above "
                             "(use compat=1.1 or greater)")
        _rewrite(img, compatible_features=h.compatible_features | C.COMPAT_LAZY_REFCOUNTS)
    else:
        mark_clean(img)
        _rewrite(img, compatible_features=h.compatible_features & ~C.COMPAT_LAZY_REFCOUNTS)


def upgrade(img: Qcow2Image, status: Status) -> None:
    """QEMU's qcow2_upgrade (v2 -> v3)."""
    from .snapshot import read_table, rewrite_table
    status(0, 2)
    if img.header.nb_snapshots and any(e.sn.disk_size is None for e in read_table(img)[0]):
        rewrite_table(img)  # v3 requires every entry's VM state and disk size in its extra data
    status(1, 2)
    _rewrite(img, version=3, refcount_order=4, header_length=C.V3_HEADER_SIZE)
    status(2, 2)


def downgrade(img: Qcow2Image, status: Status) -> None:
    """QEMU's qcow2_downgrade (v3 -> v2): refusals first, then the dirty bit, zero clusters
    turned into data clusters (qcow2_expand_zero_clusters), and a v2 header."""
    from .snapshot import read_table
    h = img.header
    if h.refcount_order != 4:
        raise AmendError("compat=0.10 requires refcount_bits=16")
    if img.external_data:
        raise AmendError("Cannot downgrade an image with a data file")
    if h.nb_snapshots:
        entries, _ = read_table(img)
        for e in entries:
            if (e.sn.vm_state_size or 0) > 0xFFFFFFFF or e.sn.disk_size != img.size:
                raise AmendError("Internal snapshots prevent downgrade of image")
    mark_clean(img)
    if h.incompatible_features & ~C.INCOMPAT_COMPRESSION:
        raise AmendError("Cannot downgrade an image with incompatible features "
                         f"0x{h.incompatible_features & ~C.INCOMPAT_COMPRESSION:x} set")
    try:
        expand_zero_clusters(img, status)
    except CorruptTable as e:  # QEMU prints the table's problem, then the failure with its errno
        raise AmendError(f"{e}\nFailed to turn zero into data clusters: {e.strerror}") from None
    except CorruptImage:  # the corruption was signalled (stderr); the failure is QEMU's EIO
        raise AmendError("Failed to turn zero into data clusters: Input/output error") from None
    ctype, incompat = h.compression_type, h.incompatible_features
    if incompat & C.INCOMPAT_COMPRESSION:
        if _has_compressed(img):
            raise AmendError("Cannot downgrade an image with zstd compression type and existing "
                             "compressed clusters")
        ctype, incompat = C.COMPRESSION_ZLIB, incompat & ~C.INCOMPAT_COMPRESSION
    _rewrite(img, version=2, compatible_features=0, autoclear_features=0, compression_type=ctype,
             incompatible_features=incompat, refcount_order=4, header_length=C.V2_HEADER_SIZE)


def _has_compressed(img: Qcow2Image) -> bool:
    for ext in img.layer_extents(0, img.size):
        if ext.kind == "compressed":
            return True
    return False


def expand_zero_clusters(img: Qcow2Image, status: Status) -> None:
    """QEMU's qcow2_expand_zero_clusters: in the active L1 table, then in every snapshot's, a
    zero cluster with no host cluster becomes unallocated (no backing file) or a new
    zero-filled cluster (counted as often as its L2 table is shared); one with a host cluster
    has it zero-filled and loses the flag. Tables are changed in place, shared or not, as QEMU
    does. Each new cluster's refcount and zeros reach the disk before the entry naming it."""
    from .snapshot import read_table, validate_l1
    meta = img.meta
    snapshots = read_table(img)[0] if img.header.nb_snapshots else []
    total = len(meta.l1) + sum(e.sn.l1_size for e in snapshots)
    visited = _expand_l1(img, meta.l1, True, 0, total, status)
    for e in snapshots:  # each snapshot's table is checked when its turn comes, as QEMU does
        validate_l1(img, e.sn)
        raw = img.file.pread(e.sn.l1_size * 8, e.sn.l1_table_offset) if e.sn.l1_size else b""
        visited = _expand_l1(img, unpack_table(raw), False, visited, total, status)


def _expand_l1(img: Qcow2Image, l1: list[int], active: bool, visited: int, total: int, status: Status) -> int:
    for i in range(len(l1)):
        l2_off = l1_offset(l1[i])
        if l2_off:
            if l2_off & (img.cluster_size - 1):
                raise img.meta.fatal_corruption(f"L2 table offset {l2_off:#x} unaligned (L1 index: {c_hex(i)})")
            _expand_l2(img, l2_off, i if active else None)
        visited += 1
        status(visited, total)
    return visited


def _expand_l2(img: Qcow2Image, l2_off: int, active_index: int | None) -> None:
    meta = img.meta
    cs = img.cluster_size
    shared = meta.refcounts.get(l2_off >> img.cluster_bits)
    if active_index is not None:
        table = meta.l2_table(active_index)
        assert table is not None
        entries = list(table.data)
    else:
        entries = unpack_table(img.file.pread(cs, l2_off))
    changed = False
    for j, entry in enumerate(list(entries)):
        t = std_cluster_type(entry)
        if t not in (ClusterType.ZERO_PLAIN, ClusterType.ZERO_ALLOC):
            continue
        old_host = entry & C.L2E_OFFSET_MASK
        if old_host & (cs - 1):
            raise meta.fatal_corruption(f"Cluster allocation offset {old_host:#x} unaligned "
                                        f"(L2 offset: {l2_off:#x}, L2 index: {c_hex(j)})")
        # A preallocated zero cluster that other tables still use (a snapshot's) must not be
        # zero-filled in place: QEMU 7.2 does, which corrupts the snapshot and leaves an
        # OFLAG_COPIED error; it gets a cluster of its own here instead.
        foreign = t == ClusterType.ZERO_ALLOC and meta.refcounts.get(old_host >> img.cluster_bits) > shared
        if t == ClusterType.ZERO_PLAIN and img.backing is None:
            new = 0
        else:
            if t == ClusterType.ZERO_PLAIN or foreign:
                host = meta.refcounts.alloc_clusters(1)
                if shared > 1:
                    meta.refcounts.change(host >> img.cluster_bits, shared - 1)
            else:
                host = old_host
            img.data.pwrite(bytes(cs), host)
            meta.sync()  # the refcount, then the zeros, before the entry names the cluster
            new = host | C.OFLAG_COPIED if shared == 1 else host
            if foreign:
                for _ in range(shared):  # each sharer's reference to the old cluster goes
                    meta.free_later(old_host, cs)
        if active_index is not None:
            meta.l2_table(active_index)[j] = new  # type: ignore[index]  # fetched again: sync may evict
        else:
            entries[j] = new
            changed = True
    if active_index is not None:
        meta.sync()
    elif changed:
        meta.file.flush()
        meta.write_inactive_l2(l2_off, entries)
        meta.file.flush()


def change_refcount_order(img: Qcow2Image, order: int, status: Status) -> None:
    """QEMU's qcow2_change_refcount_order: new refcount blocks (allocated in the old structure,
    until an allocation walk allocates nothing), a new refcount table, one header switch, then
    the old blocks and table freed in the new structure."""
    meta = img.meta
    meta.sync()
    rc = meta.refcounts
    cs = img.cluster_size
    new_bits = 1 << order
    new_per_block = entries_per_block(img.cluster_bits, order)
    entries_per_cluster = cs // 8

    def covered() -> int:
        return len(rc.table) * rc.per_block

    def values(bi: int) -> list[int] | None:
        """Old refcounts of the clusters new block ``bi`` describes (None: no old block there)."""
        c0, c1 = bi * new_per_block, min((bi + 1) * new_per_block, covered())
        out: list[int] = []
        found = False
        for ob in range(c0 // rc.per_block, -(-c1 // rc.per_block)):
            block = rc.block(ob) if ob < len(rc.table) and rc.table[ob] & C.REFT_OFFSET_MASK else None
            lo, hi = max(c0, ob * rc.per_block), min(c1, (ob + 1) * rc.per_block)
            if block is None:
                out += [0] * (hi - lo)
                continue
            found = True
            vals = decode_block(bytes(block.data), rc.order, rc.per_block)
            out += vals[lo - ob * rc.per_block:hi - ob * rc.per_block]
        return out if found else None

    def block_used(bi: int) -> bool:
        vals = values(bi)
        if not vals:
            return False
        for k, v in enumerate(vals):
            if v and new_bits < 64 and v >> new_bits:
                raise AmendError(f"Cannot decrease refcount entry width to {new_bits} bits: Cluster at offset "
                                 f"{(bi * new_per_block + k) << img.cluster_bits:#x} has a refcount of {v}")
        return any(vals)

    def walk_status(index: int, total: int) -> None:
        """QEMU's walk_over_reftable progress: one step per old refcount-table entry, walks
        counted as they come (a walk more than expected makes the figure go back, as in QEMU)."""
        n = len(rc.table)
        for r in range(n):
            status(index * n + r, total * n)
        status((index + 1) * n, total * n)

    new_table: list[int] = []
    table_offset = 0
    table_size = 0
    walks = 0
    while True:
        allocated = False
        walk_status(walks, max(walks + 2, 3))
        walks += 1
        bi = 0
        while bi * new_per_block < covered():
            if block_used(bi):
                if bi >= len(new_table):
                    size = -(-(bi + 1) // entries_per_cluster) * entries_per_cluster
                    if size * 8 > C.MAX_REFTABLE_SIZE_BYTES:
                        raise AmendError("This operation would make the refcount table grow beyond the maximum "
                                         "size supported by QEMU, aborting")
                    new_table += [0] * (size - len(new_table))
                    allocated = True
                if not new_table[bi]:
                    new_table[bi] = rc.alloc_clusters(1)
                    allocated = True
            bi += 1
        if not allocated:
            break
        if table_offset:
            rc.free(table_offset, table_size * 8)
        table_size = len(new_table)
        table_offset = rc.alloc_clusters(meta.clusters_for(table_size * 8))
    # the new blocks, then the new table (all in clusters the old structure counts as used)
    walk_status(walks, walks + 1)
    for bi, off in enumerate(new_table):
        if not off:
            continue
        img.file.pwrite(encode_block(values(bi) or [], order, cs), off)
    img.file.pwrite(pack_table(new_table), table_offset)
    rc.flush()
    meta.sync()
    old_table, old_offset, old_clusters = list(rc.table), rc.table_offset, rc.table_clusters
    meta.switch_refcounts(order, table_offset, meta.clusters_for(table_size * 8))
    # the old structure is garbage now: free it in the new one (a kill here only leaks)
    for off in old_table:
        off &= C.REFT_OFFSET_MASK
        if off:
            meta.refcounts.free(off, cs)
    meta.refcounts.free(old_offset, old_clusters * cs)
    meta.sync()


def set_data_file(img: Qcow2Image, name: str | None, raw: bool) -> None:
    """The external data file's name (``""`` drops it from the header, as QEMU does) and the
    raw flag, in one header rewrite (QEMU's qcow2_update_header after both are set)."""
    h = img.header.copy()
    if raw:
        h.autoclear_features |= C.AUTOCLEAR_DATA_FILE_RAW
    else:
        h.autoclear_features &= ~C.AUTOCLEAR_DATA_FILE_RAW
    if name is not None:
        h.set_extension(C.EXT_DATA_FILE, name.encode("utf-8", "surrogateescape") if name else None)
    img.meta.sync()
    img.meta.rewrite_header(h)
    img.file.flush()


def refcount_width_error(bits: int) -> str | None:
    if bits <= 0 or bits > 64 or bits & (bits - 1):
        return "Refcount width must be a power of two and may not exceed 64 bits"
    return None


__all__ = ["AmendError", "change_refcount_order", "downgrade", "expand_zero_clusters",
           "mark_clean", "refcount_width_error", "set_data_file", "set_lazy_refcounts", "upgrade"]
