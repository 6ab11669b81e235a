"""Hot loops, from the Cython kernels in ``qcowpy._ext`` when built, else pure-Python versions.

A source checkout without a build still works: every kernel has a reference implementation
here (``py_*``) with the same signature and results; tests/bench/test_kernels.py checks that
they agree. docs/performance.md records the benchmark that earned each kernel its place.
"""
from __future__ import annotations

import struct

_OFLAG_COMPRESSED = 1 << 62
_OFLAG_ZERO = 1
_L2E_OFFSET_MASK = 0x00FFFFFFFFFFFE00
_L2E_STD_RESERVED_MASK = 0x3F000000000001FE


def py_is_zero(buf) -> bool:
    """True if every byte of ``buf`` is zero."""
    b = bytes(memoryview(buf).cast("B"))
    return b == bytes(len(b))


def py_zero_runs(buf, offset: int, block: int) -> list[tuple[int, int, bool]]:
    """Maximal alternating runs ``(start, end, zero)`` of ``block``-aligned pieces (see _ext.zero_runs)."""
    if block <= 0:
        raise ValueError("block must be positive")
    mv = memoryview(buf).cast("B")
    n = len(mv)
    out: list[tuple[int, int, bool]] = []
    pos = 0
    run_start = 0
    cur: bool | None = None
    while pos < n:
        step = min(block - (offset + pos) % block, n - pos)
        z = py_is_zero(mv[pos:pos + step])
        if cur is None:
            cur = z
        elif z != cur:
            out.append((run_start, pos, cur))
            run_start, cur = pos, z
        pos += step
    if n:
        out.append((run_start, n, bool(cur)))
    return out


def _l2_type(e: int, cmask: int) -> int:
    if e & _OFLAG_COMPRESSED:
        return 4
    if e & _L2E_STD_RESERVED_MASK:
        return -1
    if e & _OFLAG_ZERO:
        return 2 if e & _L2E_OFFSET_MASK else 1
    if e & _L2E_OFFSET_MASK:
        return -2 if e & _L2E_OFFSET_MASK & cmask else 3
    return 0


def py_l2_runs(table: list[int], start: int, stop: int, cluster_bits: int,
               max_runs: int = -1) -> list[tuple[int, int, int, int]]:
    """Runs ``(type, first, count, host)`` of standard L2 entries ``table[start:stop]`` (see _ext.l2_runs)."""
    if start < 0 or stop > len(table) or start > stop:
        raise IndexError("l2_runs: range outside the table")
    cs = 1 << cluster_bits
    cmask = cs - 1
    out: list[tuple[int, int, int, int]] = []
    i = start
    while i < stop:
        if 0 <= max_runs <= len(out):
            break
        e = table[i]
        t = _l2_type(e, cmask)
        if t < 0:
            out.append((t, i, 1, e))
            break
        first = i
        host = e & _L2E_OFFSET_MASK if t in (2, 3) else 0
        nxt = host + cs
        i += 1
        while i < stop:
            e = table[i]
            if _l2_type(e, cmask) != t or (t in (2, 3) and e & _L2E_OFFSET_MASK != nxt):
                break
            nxt += cs
            i += 1
        out.append((t, first, i - first, host))
    return out


def py_find_offset_in(table: list[int], mask: int, lo: int, hi: int) -> int:
    """Index of the first entry with ``entry & mask`` nonzero and in ``[lo, hi)``, or -1."""
    for i, e in enumerate(table):
        o = e & mask
        if o and lo <= o < hi:
            return i
    return -1


_VRING_DESC = struct.Struct("<QIHH")


def py_vring_chain(table, head: int, limit: int, ram, win_start: int, win_end: int):  # type: ignore[no-untyped-def]
    """A split-virtqueue chain whose buffers all lie in one RAM window, or None (see _ext.vring_chain)."""
    if limit * 16 > len(table) or not 0 <= head < limit:
        return None
    out_sg: list[tuple[int, int]] = []
    in_sg: list[tuple[int, int]] = []
    out_iov: list = []
    in_iov: list = []
    out_len = in_len = count = 0
    i = head
    while True:
        count += 1
        if count > limit:
            return None
        addr, length, flags, nxt = _VRING_DESC.unpack_from(table, 16 * i)
        if flags & 4:  # INDIRECT
            return None
        if length and not (win_start <= addr and addr + length <= win_end):
            return None
        if flags & 2:  # WRITE
            in_sg.append((addr, length))
            if length:
                in_iov.append(ram[addr - win_start:addr - win_start + length])
                in_len += length
        else:
            if in_sg:
                return None
            out_sg.append((addr, length))
            if length:
                out_iov.append(ram[addr - win_start:addr - win_start + length])
                out_len += length
        if not flags & 1:  # no NEXT
            return out_sg, in_sg, out_iov, in_iov, out_len, in_len
        if nxt >= limit:
            return None
        i = nxt


def py_vring_chains(table, avail, limit: int, first: int, count: int, ram,  # type: ignore[no-untyped-def]
                    win_start: int, win_end: int) -> list:
    """The next ``count`` available chains, as far as vring_chain walks them (see _ext.vring_chains)."""
    out: list = []
    if limit <= 0 or limit * 16 > len(table) or 4 + 2 * limit > len(avail):
        return out
    for k in range(count):
        head = struct.unpack_from("<H", avail, 4 + 2 * ((first + k) % limit))[0]
        got = py_vring_chain(table, head, limit, ram, win_start, win_end)
        if got is None:
            break
        out.append((head,) + got)
    return out


try:
    from ._ext import (find_offset_in, is_zero, l2_runs, vring_chain, vring_chains,  # type: ignore[attr-defined]
                       zero_runs)
    HAVE_EXT = True
except ImportError:  # not built (or built from an older ext/): pure Python
    find_offset_in = py_find_offset_in
    is_zero = py_is_zero
    l2_runs = py_l2_runs
    vring_chain = py_vring_chain
    vring_chains = py_vring_chains
    zero_runs = py_zero_runs
    HAVE_EXT = False

__all__ = ["HAVE_EXT", "find_offset_in", "is_zero", "l2_runs", "py_find_offset_in", "py_is_zero", "py_l2_runs",
           "py_vring_chain", "py_vring_chains", "py_zero_runs", "vring_chain", "vring_chains", "zero_runs"]
