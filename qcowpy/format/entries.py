"""L1/L2 table entries (standard and extended) and compressed cluster descriptors.

Pure functions over integers: the engine never picks bits out of table entries itself.
"""
from __future__ import annotations

import struct
from enum import IntEnum

from . import constants as C


class ClusterType(IntEnum):
    """What a (sub)cluster of guest space maps to, as QEMU classifies it."""

    UNALLOCATED = 0  # read from the backing file (or zeros)
    ZERO_PLAIN = 1  # reads as zeros, no host cluster
    ZERO_ALLOC = 2  # reads as zeros, host cluster preallocated
    NORMAL = 3  # data in a host cluster
    COMPRESSED = 4  # compressed data
    UNALLOCATED_ALLOC = 5  # extended L2: host cluster reserved but subcluster not allocated
    INVALID = 6


def l1_offset(entry: int) -> int:
    return entry & C.L1E_OFFSET_MASK


def l1_reserved(entry: int) -> int:
    return entry & C.L1E_RESERVED_MASK


def l2_offset(entry: int) -> int:
    return entry & C.L2E_OFFSET_MASK


def l2_reserved(entry: int, extended: bool = False) -> int:
    """Reserved bits that must be zero in a standard-cluster L2 entry (bit 0 is reserved with extended L2)."""
    if entry & C.OFLAG_COMPRESSED:
        return 0
    mask = C.L2E_STD_RESERVED_MASK | (C.OFLAG_ZERO if extended else 0)
    return entry & mask


def cluster_type(entry: int) -> ClusterType:
    """Type of a whole cluster in a standard (non-extended) L2 entry."""
    if entry & C.OFLAG_COMPRESSED:
        return ClusterType.COMPRESSED
    if entry & C.OFLAG_ZERO:
        return ClusterType.ZERO_ALLOC if entry & C.L2E_OFFSET_MASK else ClusterType.ZERO_PLAIN
    return ClusterType.NORMAL if entry & C.L2E_OFFSET_MASK else ClusterType.UNALLOCATED


def subcluster_type(entry: int, bitmap: int, index: int, data_file: bool = False) -> ClusterType:
    """Type of subcluster ``index`` (0..31) of an extended L2 entry. With an external data file
    offset 0 is a real host offset, told from "unallocated" by the COPIED bit (QEMU's rule)."""
    alloc = (bitmap >> index) & 1
    zero = (bitmap >> (32 + index)) & 1
    if entry & C.OFLAG_COMPRESSED:
        return ClusterType.INVALID if bitmap else ClusterType.COMPRESSED
    if entry & C.L2E_OFFSET_MASK or (data_file and entry & C.OFLAG_COPIED):
        if alloc and zero:
            return ClusterType.INVALID
        if zero:
            return ClusterType.ZERO_ALLOC
        return ClusterType.NORMAL if alloc else ClusterType.UNALLOCATED_ALLOC
    if alloc:
        return ClusterType.INVALID
    return ClusterType.ZERO_PLAIN if zero else ClusterType.UNALLOCATED


# Compressed cluster descriptors: the split between host offset and sector count moves with cluster_bits.

def csize_shift(cluster_bits: int) -> int:
    return 62 - (cluster_bits - 8)


def compressed_descriptor(entry: int, cluster_bits: int) -> tuple[int, int]:
    """Return (host offset, byte length to read) of a compressed cluster, as QEMU computes them."""
    shift = csize_shift(cluster_bits)
    offset = entry & ((1 << shift) - 1)
    nb_sectors = ((entry >> shift) & ((1 << (cluster_bits - 8)) - 1)) + 1
    return offset, nb_sectors * C.COMPRESSED_SECTOR_SIZE - (offset & (C.COMPRESSED_SECTOR_SIZE - 1))


def make_compressed_entry(offset: int, length: int, cluster_bits: int) -> int:
    """Encode a compressed descriptor for ``length`` bytes of compressed data at ``offset``."""
    shift = csize_shift(cluster_bits)
    if offset >> shift:
        raise ValueError("compressed cluster offset too large for this cluster size")
    extra = ((offset + length - 1) >> 9) - (offset >> 9)
    if extra >= 1 << (cluster_bits - 8):
        raise ValueError("compressed data longer than the descriptor can express")
    return C.OFLAG_COMPRESSED | (extra << shift) | offset


def compressed_host_clusters(entry: int, cluster_bits: int) -> range:
    """Host cluster indices a compressed cluster touches (each holds one reference for it)."""
    offset, _ = compressed_descriptor(entry, cluster_bits)
    shift = csize_shift(cluster_bits)
    extra = (entry >> shift) & ((1 << (cluster_bits - 8)) - 1)
    last = (offset & ~511) + extra * 512 + 511
    return range(offset >> cluster_bits, (last >> cluster_bits) + 1)


def unpack_table(buf: bytes) -> list[int]:
    """Big-endian u64 table (L1, L2, refcount table) to a list of ints."""
    return list(struct.unpack(f">{len(buf) // 8}Q", buf))


def pack_table(entries: list[int]) -> bytes:
    return struct.pack(f">{len(entries)}Q", *entries)
