"""Refcount block entries of width 1..64 bits, laid out as QEMU does.

Sub-byte widths pack entries from the least significant bit of each byte upward; 8 bits and
wider are big-endian integers.
"""
from __future__ import annotations

import struct


def entries_per_block(cluster_bits: int, refcount_order: int) -> int:
    return 1 << (cluster_bits + 3 - refcount_order)


def max_refcount(refcount_order: int) -> int:
    return (1 << (1 << refcount_order)) - 1


def get_refcount(block: bytearray | bytes, index: int, refcount_order: int) -> int:
    if refcount_order >= 3:
        width = 1 << (refcount_order - 3)
        start = index * width
        return int.from_bytes(block[start:start + width], "big")
    bits = 1 << refcount_order
    per_byte = 8 >> refcount_order
    shift = (index % per_byte) * bits
    return (block[index // per_byte] >> shift) & ((1 << bits) - 1)


def set_refcount(block: bytearray, index: int, refcount_order: int, value: int) -> None:
    if refcount_order >= 3:
        width = 1 << (refcount_order - 3)
        start = index * width
        block[start:start + width] = value.to_bytes(width, "big")
        return
    bits = 1 << refcount_order
    per_byte = 8 >> refcount_order
    shift = (index % per_byte) * bits
    mask = ((1 << bits) - 1) << shift
    b = index // per_byte
    block[b] = (block[b] & ~mask) | ((value << shift) & mask)


def leading_free(block: bytearray | bytes, index: int, count: int, refcount_order: int) -> int:
    """How many of the ``count`` entries from ``index`` are zero before the first nonzero one.
    Whole zero bytes are skipped at C speed, which is what makes free-space scans cheap."""
    if refcount_order >= 3:
        width = 1 << (refcount_order - 3)
        seg = block[index * width:(index + count) * width]
        return (len(seg) - len(seg.lstrip(b"\0"))) // width
    per_byte = 8 >> refcount_order
    n = 0
    while n < count and (index + n) % per_byte:  # up to a byte boundary
        if get_refcount(block, index + n, refcount_order):
            return n
        n += 1
    first, whole = (index + n) // per_byte, (count - n) // per_byte
    seg = block[first:first + whole]
    zero_bytes = len(seg) - len(seg.lstrip(b"\0"))
    n += zero_bytes * per_byte
    while n < count and not get_refcount(block, index + n, refcount_order):
        n += 1
    return n


def set_refcounts(block: bytearray, index: int, count: int, refcount_order: int, value: int) -> None:
    """Set ``count`` consecutive entries to ``value``."""
    if refcount_order >= 3:
        width = 1 << (refcount_order - 3)
        block[index * width:(index + count) * width] = value.to_bytes(width, "big") * count
        return
    for i in range(index, index + count):
        set_refcount(block, i, refcount_order, value)


_WORD = {4: "H", 5: "I", 6: "Q"}


def decode_block(block: bytes, refcount_order: int, n: int) -> list[int]:
    """The first ``n`` refcounts of a block as a list (check works on whole blocks at once)."""
    if refcount_order == 3:
        return list(block[:n])
    if refcount_order >= 4:
        return list(struct.unpack_from(f">{n}{_WORD[refcount_order]}", block))
    bits = 1 << refcount_order
    per = 8 >> refcount_order
    mask = (1 << bits) - 1
    return [(block[i // per] >> ((i % per) * bits)) & mask for i in range(n)]


def encode_block(values, refcount_order: int, cluster_size: int) -> bytes:
    """A whole refcount block (``cluster_size`` bytes) holding ``values`` from entry 0 on."""
    if refcount_order == 3:
        out = bytes(values)
    elif refcount_order >= 4:
        out = struct.pack(f">{len(values)}{_WORD[refcount_order]}", *values)
    else:
        bits = 1 << refcount_order
        per = 8 >> refcount_order
        buf = bytearray(cluster_size)
        for i, v in enumerate(values):
            if v:
                buf[i // per] |= v << ((i % per) * bits)
        return bytes(buf)
    return out + bytes(cluster_size - len(out))
