"""The read side of the mapping: guest ranges of one image as maximal runs of one kind.

Reads, zero detection and block status all build on :func:`layer_extents`, so this is the one
place that decodes L2 entries (through ``format/entries.py`` and the ``l2_runs`` kernel) and
range-checks them.
"""
from __future__ import annotations

import sys
from dataclasses import dataclass
from typing import Iterator

from ..errors import CorruptedRead, CorruptImage
from ..units import c_hex
from ..format import constants as C
from ..format.entries import ClusterType, l2_offset, l2_reserved, subcluster_type
from ..format.entries import cluster_type as std_cluster_type
from ..kernels import l2_runs
from .metadata import Metadata

# Layer-level extent kinds
UNALLOCATED = "unallocated"  # defer to the backing file
ZERO = "zero"
DATA = "data"
COMPRESSED = "compressed"

_KIND = {
    ClusterType.UNALLOCATED: UNALLOCATED,
    ClusterType.ZERO_PLAIN: ZERO,
    ClusterType.ZERO_ALLOC: ZERO,
    ClusterType.NORMAL: DATA,
    ClusterType.COMPRESSED: COMPRESSED,
}


@dataclass(frozen=True)
class LayerExtent:
    """A run of guest bytes with one status in this image alone (not the chain)."""

    kind: str
    start: int
    length: int
    host_offset: int | None = None  # contiguous host bytes for DATA and preallocated ZERO


def layer_extents(meta: Metadata, offset: int, length: int) -> Iterator[LayerExtent]:
    """Merge the raw runs of ``[offset, offset+length)`` into maximal extents (same kind,
    contiguous host bytes). A generator: a caller that stops early pays only for what it took."""
    cur: list = []  # [kind, start, length, host]
    for kind, a, b, h in _raw_runs(meta, offset, offset + length):
        if cur and cur[0] == kind and cur[1] + cur[2] == a and (
                (cur[3] is None and h is None) or
                (cur[3] is not None and h is not None and cur[3] + cur[2] == h)):
            cur[2] += b - a
        else:
            if cur:
                yield LayerExtent(*cur)
            cur = [kind, a, b - a, h]
    if cur:
        yield LayerExtent(*cur)


_ZERO_TYPES = (ClusterType.ZERO_PLAIN, ClusterType.ZERO_ALLOC)


def _v2_zero_entry(meta: Metadata, l1_index: int, l2_index: int, guest_offset: int) -> None:
    """A v2 image has no zero clusters: QEMU fails the access with EIO rather than guess what
    the entry means."""
    _signal_corruption(meta, f"Zero cluster entry found in pre-v3 image (L2 offset: "
                             f"{meta.l1[l1_index] & C.L1E_OFFSET_MASK:#x}, L2 index: {c_hex(l2_index)})", guest_offset)


def _signal_corruption(meta: Metadata, event: str, guest_offset: int) -> None:
    """QEMU's qcow2_signal_corruption for a broken L2 entry met on access: fatal on a writable
    image (the corrupt bit is set, nothing more is written), reported once on a read-only one;
    either way the access fails with EIO."""
    if meta.writable:
        meta.fatal_corruption(event)
    elif not meta.signaled_corruption:  # QEMU suppresses every event after the first
        meta.signaled_corruption = True
        sys.stderr.write(f"qcow2: Image is corrupt: {event}; further non-fatal corruption events will be "
                         "suppressed\n")
    raise CorruptedRead(event, guest_offset)


def _raw_runs(meta: Metadata, pos: int, end: int) -> Iterator[tuple[str, int, int, int | None]]:
    """(kind, start, end, host offset or None) runs, at most one L2 table's worth at a time.

    One loop for both entry forms: it works in allocation units (clusters, or subclusters on
    extended-L2 images) and asks a run decoder for (type, first unit, units, host) tuples —
    the ``l2_runs`` kernel for standard entries, :func:`_extended_runs` for extended ones — a
    bounded number per call, so a caller that stops after the first extent does not pay for
    the whole table."""
    cbits = meta.cluster_bits
    ubits = cbits - C.SUBCLUSTER_BITS if meta.extended else cbits
    span_bits = cbits + meta.l2_bits
    while pos < end:
        l1_index = pos >> span_bits
        table = meta.l2_table(l1_index)
        base = l1_index << span_bits
        span_end = min(end, base + (1 << span_bits))
        idx = (pos - base) >> ubits
        stop = ((span_end - base - 1) >> ubits) + 1
        while idx < stop:
            if table is None:
                runs = [(ClusterType.UNALLOCATED, idx, stop - idx, 0)]
            elif meta.extended:
                runs = _extended_runs(meta, table.data, idx, stop, 64)
            elif meta.external_data and l1_index == 0 and idx == 0 and table.data[0] == C.OFLAG_COPIED:
                runs = [(ClusterType.NORMAL, 0, 1, 0)]  # guest cluster 0 at data-file offset 0
            else:
                runs = l2_runs(table.data, idx, stop, cbits, 64)
            for t, first, count, host in runs:
                if t == -1:
                    raise CorruptImage(f"L2 entry {host:#x} has reserved bits set")
                if t < 0:
                    index = first >> (C.SUBCLUSTER_BITS if meta.extended else 0)
                    _signal_corruption(meta, f"Cluster allocation offset {l2_offset(host):#x} unaligned (L2 offset: "
                                             f"{meta.l1[l1_index] & C.L1E_OFFSET_MASK:#x}, L2 index: {c_hex(index)})",
                                       base + (first << ubits))
                rstart = base + (first << ubits)
                if meta.external_data:
                    _check_external(meta, t, rstart, host, (first << ubits) >> cbits)
                a = max(pos, rstart)
                if t in _ZERO_TYPES and meta.header.version < 3:
                    _v2_zero_entry(meta, l1_index, (a - base) >> ubits, a)
                yield _KIND[t], a, min(span_end, rstart + (count << ubits)), \
                    host + (a - rstart) if host or (meta.external_data and t == ClusterType.NORMAL) else None
                idx = first + count
        pos = span_end


def _check_external(meta: Metadata, t: int, guest: int, host: int, l2_index: int) -> None:
    """QEMU's rules for images with an external data file: no compressed clusters, and every
    data cluster at the host offset equal to its guest offset."""
    if t == ClusterType.COMPRESSED:
        raise CorruptImage(f"Compressed cluster entry found in image with external data file "
                           f"(L2 index: {c_hex(l2_index)})")
    if t in (ClusterType.NORMAL, ClusterType.ZERO_ALLOC) and host != guest:
        raise CorruptImage(f"External data file host cluster offset {host:#x} does not match guest cluster "
                           f"offset: {guest:#x}, L2 index: {c_hex(l2_index)})")


def _extended_runs(meta: Metadata, table: list[int], start: int, stop: int,
                   max_runs: int) -> list[tuple[int, int, int, int]]:
    """``l2_runs`` for extended entries: (type, first subcluster, count, host) for subclusters
    [start, stop) of one table, decoded a whole cluster at a time."""
    sbits = meta.cluster_bits - C.SUBCLUSTER_BITS
    out: list[tuple[int, int, int, int]] = []
    u = start
    while u < stop and len(out) < max_runs:
        c = u >> C.SUBCLUSTER_BITS
        for t, pstart, plen, host in cluster_pieces(meta, table, c):
            first = (c << C.SUBCLUSTER_BITS) + (pstart >> sbits)
            a, b = max(first, u), min(first + (plen >> sbits), stop)
            if a < b:
                out.append((t, a, b - a, host + ((a - first) << sbits) if host else 0))
        u = (c + 1) << C.SUBCLUSTER_BITS
    return out


def cluster_pieces(meta: Metadata, table: list[int] | None, idx: int) -> list[tuple[ClusterType, int, int, int]]:
    """(type, start within cluster, length, host offset or 0) for one cluster, merged."""
    cs = meta.cluster_size
    if table is None:
        return [(ClusterType.UNALLOCATED, 0, cs, 0)]
    if not meta.extended:
        entry = table[idx]
        if l2_reserved(entry):
            raise CorruptImage(f"L2 entry {entry:#x} has reserved bits set")
        t = std_cluster_type(entry)
        host = l2_offset(entry) if t in (ClusterType.NORMAL, ClusterType.ZERO_ALLOC) else 0
        if t == ClusterType.NORMAL and host & (cs - 1):
            raise CorruptImage(f"Cluster allocation offset {host:#x} unaligned (L2 entry {entry:#x})")
        return [(t, 0, cs, host)]
    entry, bitmap = table[2 * idx], table[2 * idx + 1]
    if l2_reserved(entry, extended=True):
        raise CorruptImage(f"L2 entry {entry:#x} has reserved bits set")
    base = l2_offset(entry) if not entry & C.OFLAG_COMPRESSED else 0
    if base & (cs - 1):
        raise CorruptImage(f"Cluster allocation offset {base:#x} unaligned (L2 entry {entry:#x})")
    if entry & C.OFLAG_COMPRESSED:
        if bitmap:
            raise CorruptImage("Compressed cluster with a nonzero subcluster bitmap")
        return [(ClusterType.COMPRESSED, 0, cs, 0)]
    sc = cs // C.SUBCLUSTERS_PER_CLUSTER
    pieces: list[tuple[ClusterType, int, int, int]] = []
    for i in range(C.SUBCLUSTERS_PER_CLUSTER):
        t = subcluster_type(entry, bitmap, i, meta.external_data)
        if t == ClusterType.INVALID:
            raise CorruptImage(f"Invalid subcluster bitmap {bitmap:#x} in L2 entry")
        # A reserved but unallocated subcluster reads from below yet keeps its host offset,
        # which block status reports when nothing below answers (as QEMU's map does).
        reserved = t == ClusterType.UNALLOCATED_ALLOC
        if reserved:
            t = ClusterType.UNALLOCATED
        host = base + i * sc if reserved or t in (ClusterType.NORMAL, ClusterType.ZERO_ALLOC) else 0
        prev_host = pieces[-1][3] if pieces else 0
        if pieces and pieces[-1][0] == t and (host == prev_host == 0 or
                                              (host and prev_host and prev_host + pieces[-1][2] == host)):
            p = pieces[-1]
            pieces[-1] = (t, p[1], p[2] + sc, p[3])
        else:
            pieces.append((t, i * sc, sc, host))
    return pieces
