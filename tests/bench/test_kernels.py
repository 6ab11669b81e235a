"""Every Cython kernel against its pure-Python reference (qcowpy/kernels.py), and timings of both.

The references are themselves checked against the format module (qcowpy.format.entries) and
against plain definitions, so kernel == reference == specification.
"""
from __future__ import annotations

import random
import struct

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from qcowpy import kernels as K
from qcowpy.format import constants as C
from qcowpy.format.entries import ClusterType, cluster_type, l2_offset, l2_reserved

ext = pytest.importorskip("qcowpy._ext", reason="Cython kernels not built (pip install -e .)")

COPIED = C.OFLAG_COPIED


# --------------------------------------------------------------------------- is_zero

@pytest.mark.parametrize("n", [0, 1, 15, 16, 17, 4095, 4096, 65537])
def test_is_zero_matches_reference(n: int) -> None:
    buf = bytearray(n)
    assert ext.is_zero(buf) is True and K.py_is_zero(buf) is True
    for pos in {0, n // 2, n - 1} if n else set():
        buf[pos] = 1
        assert ext.is_zero(buf) is False and K.py_is_zero(buf) is False
        buf[pos] = 0


@given(st.binary(max_size=300), st.integers(0, 299))
def test_is_zero_random(data: bytes, pos: int) -> None:
    buf = bytearray(data)
    assert ext.is_zero(buf) == K.py_is_zero(buf) == (not any(buf))
    if buf:
        buf[pos % len(buf)] = 0
        assert ext.is_zero(buf) == K.py_is_zero(buf) == (not any(buf))


# --------------------------------------------------------------------------- zero_runs

def _segments_buffer(segs: list[tuple[bool, int]]) -> bytes:
    return b"".join(bytes(n) if z else bytes([0x5A]) * n for z, n in segs)


@settings(max_examples=300)
@given(st.lists(st.tuples(st.booleans(), st.integers(1, 3000)), max_size=8),
       st.integers(0, 1 << 40), st.sampled_from([1, 7, 512, 4096, 65536]))
def test_zero_runs_matches_reference(segs, offset: int, block: int) -> None:
    buf = _segments_buffer(segs)
    got = ext.zero_runs(buf, offset, block)
    assert got == K.py_zero_runs(buf, offset, block)
    # the definition: runs tile the buffer, alternate, and each block-aligned piece has the run's zero-ness
    assert (got[0][0] if got else 0) == 0 and (got[-1][1] if got else 0) == len(buf)
    for (a, b, z), nxt in zip(got, got[1:] + [None]):
        if nxt is not None:
            assert nxt[0] == b and nxt[2] != z
        pos = a
        while pos < b:
            step = min(block - (offset + pos) % block, b - pos)
            assert (not any(buf[pos:pos + step])) == z
            pos += step
        if a:  # runs start on block boundaries (in image offsets)
            assert (offset + a) % block == 0


def test_zero_runs_rejects_bad_block() -> None:
    with pytest.raises(ValueError):
        ext.zero_runs(b"abc", 0, 0)
    with pytest.raises(ValueError):
        K.py_zero_runs(b"abc", 0, 0)


# --------------------------------------------------------------------------- l2_runs

def _entry(kind: str, host: int, cluster_bits: int) -> int:
    cs = 1 << cluster_bits
    if kind == "unalloc":
        return 0
    if kind == "zero":
        return C.OFLAG_ZERO
    if kind == "zero_alloc":
        return host * cs | C.OFLAG_ZERO | COPIED
    if kind == "normal":
        return host * cs | COPIED
    if kind == "normal_shared":
        return host * cs
    if kind == "compressed":
        return C.OFLAG_COMPRESSED | (host * 512 + 17)
    if kind == "bad_reserved":
        return host * cs | COPIED | (1 << 56)
    if kind == "bad_align":
        return (host * cs + 512) | COPIED
    raise AssertionError(kind)


@st.composite
def l2_tables(draw):
    cluster_bits = draw(st.integers(C.MIN_CLUSTER_BITS, C.MAX_CLUSTER_BITS))
    table: list[int] = []
    for _ in range(draw(st.integers(0, 12))):
        kind = draw(st.sampled_from(["unalloc", "zero", "zero_alloc", "normal", "normal", "normal_shared",
                                     "compressed", "bad_reserved", "bad_align"]))
        host = draw(st.integers(1, 1000))
        n = draw(st.integers(1, 6))
        contiguous = draw(st.booleans())
        for i in range(n):
            table.append(_entry(kind, host + (i if contiguous else 2 * i), cluster_bits))
    start = draw(st.integers(0, len(table)))
    stop = draw(st.integers(start, len(table)))
    max_runs = draw(st.integers(-1, 5))
    return table, start, stop, cluster_bits, max_runs


def _expand(runs, cluster_bits):
    """Runs back to per-entry (type, host) pairs."""
    out = []
    for t, first, count, host in runs:
        for i in range(count):
            out.append((first + i, t, host + (i << cluster_bits) if host else 0))
    return out


@settings(max_examples=500)
@given(l2_tables())
def test_l2_runs_matches_reference_and_format(args) -> None:
    table, start, stop, cluster_bits, max_runs = args
    got = ext.l2_runs(table, start, stop, cluster_bits, max_runs)
    assert got == K.py_l2_runs(table, start, stop, cluster_bits, max_runs)
    if max_runs >= 0:
        assert len(got) <= max_runs
    cs = 1 << cluster_bits
    # against the format module, entry by entry
    expected_end = stop if (max_runs < 0 and not (got and got[-1][0] < 0)) else None
    pos = start
    for idx, t, host in _expand(got, cluster_bits):
        assert idx == pos
        e = table[idx]
        if t == -1:
            assert l2_reserved(e)
        elif t == -2:
            assert not l2_reserved(e) and cluster_type(e) == ClusterType.NORMAL and l2_offset(e) & (cs - 1)
        else:
            assert not l2_reserved(e)
            assert t == cluster_type(e)
            assert host == (l2_offset(e) if t in (ClusterType.NORMAL, ClusterType.ZERO_ALLOC) else 0)
        pos += 1
    if expected_end is not None:
        assert pos == expected_end
    # maximal runs: neighbours could not have been merged
    for a, b in zip(got, got[1:]):
        if a[0] >= 0 and b[0] >= 0 and a[0] == b[0]:
            assert a[0] in (ClusterType.NORMAL, ClusterType.ZERO_ALLOC) and a[3] + (a[2] << cluster_bits) != b[3]
    if got and got[-1][0] < 0:
        assert got[-1][3] == table[got[-1][1]]


def test_l2_runs_range_checked() -> None:
    for fn in (ext.l2_runs, K.py_l2_runs):
        with pytest.raises(IndexError):
            fn([0, 0], 0, 3, 16)
        with pytest.raises(IndexError):
            fn([0, 0], 2, 1, 16)
        assert fn([0, 0], 2, 2, 16) == []


def test_l2_runs_resumes_where_it_stopped() -> None:
    rnd = random.Random(5)
    table = [_entry(rnd.choice(["unalloc", "zero", "normal"]), 10 + i, 16) for i in range(2000)]
    whole = ext.l2_runs(table, 0, len(table), 16)
    pieces: list = []
    idx = 0
    while idx < len(table):
        runs = ext.l2_runs(table, idx, len(table), 16, 3)
        pieces += runs
        idx = runs[-1][1] + runs[-1][2]
    assert pieces == whole


# --------------------------------------------------------------------------- timings (kernel vs reference)

def _realistic_l2(entries: int = 8192, cluster_bits: int = 16) -> list[int]:
    """An L2 table like a used disk's: runs of contiguous data, zeros, holes, a few compressed."""
    rnd = random.Random(42)
    table: list[int] = []
    host = 100
    while len(table) < entries:
        kind = rnd.choices(["normal", "unalloc", "zero", "compressed"], [6, 3, 1, 1])[0]
        n = rnd.randint(1, 64)
        for _ in range(n):
            table.append(_entry(kind, host, cluster_bits))
            host += 1
        host += rnd.randint(0, 3)
    return table[:entries]


TABLE = _realistic_l2()
MIXED = _segments_buffer([(i % 3 == 0, 4096 * (1 + i % 5)) for i in range(200)])[:4 << 20]


@pytest.mark.bench
@pytest.mark.parametrize("impl", ["cython", "python"])
def test_bench_l2_runs(benchmark, impl: str) -> None:
    fn = ext.l2_runs if impl == "cython" else K.py_l2_runs
    runs = benchmark(fn, TABLE, 0, len(TABLE), 16)
    assert sum(r[2] for r in runs) == len(TABLE)


@pytest.mark.bench
@pytest.mark.parametrize("impl", ["cython", "python"])
def test_bench_zero_runs_4m(benchmark, impl: str) -> None:
    fn = ext.zero_runs if impl == "cython" else K.py_zero_runs
    runs = benchmark(fn, MIXED, 0, 4096)
    assert runs[-1][1] == len(MIXED)


@pytest.mark.bench
@pytest.mark.parametrize("impl", ["cython", "python"])
def test_bench_is_zero_4m(benchmark, impl: str) -> None:
    fn = ext.is_zero if impl == "cython" else K.py_is_zero
    assert benchmark(fn, bytes(4 << 20)) is True


# --------------------------------------------------------------------------- find_offset_in

L1_MASK = C.L1E_OFFSET_MASK
REFT_MASK = 0xFFFFFFFFFFFFFE00


@settings(max_examples=300)
@given(st.lists(st.one_of(st.just(0), st.integers(0, (1 << 64) - 1), st.integers(1, 64).map(lambda c: c << 16)),
                max_size=40),
       st.integers(0, 70 << 16), st.integers(0, 8 << 16), st.sampled_from([L1_MASK, REFT_MASK]))
def test_find_offset_in_matches_reference(table, lo, span, mask) -> None:
    hi = lo + span
    got = ext.find_offset_in(table, mask, lo, hi)
    assert got == K.py_find_offset_in(table, mask, lo, hi)
    expected = next((i for i, e in enumerate(table) if e & mask and lo <= e & mask < hi), -1)
    assert got == expected


@pytest.mark.bench
@pytest.mark.parametrize("impl", ["cython", "python"])
def test_bench_find_offset_in_reftable(benchmark, impl: str) -> None:
    """A one-cluster refcount table (8192 entries, a few blocks) scanned for a range it lacks."""
    table = [0] * 8192
    table[:3] = [0x30000, 0x40000, 0x7770000]
    fn = ext.find_offset_in if impl == "cython" else K.py_find_offset_in
    assert benchmark(fn, table, REFT_MASK, 1 << 40, (1 << 40) + (4 << 20)) == -1


# --------------------------------------------------------------------------- vring_chain

WIN = (0x1000, 0x9000)  # the RAM window of the chain tests


def _desc_table(descs: list[tuple[int, int, int, int]]) -> bytearray:
    return bytearray(b"".join(struct.pack("<QIHH", *d) for d in descs))


def _plain(res):  # memoryview slices -> (offset into the window, bytes) for comparison
    if res is None:
        return None
    out_sg, in_sg, out_iov, in_iov, out_len, in_len = res
    return out_sg, in_sg, [bytes(v) for v in out_iov], [bytes(v) for v in in_iov], out_len, in_len


desc_st = st.tuples(st.one_of(st.integers(0, 0xA000), st.integers(0, (1 << 64) - 1)),
                    st.one_of(st.integers(0, 0x3000), st.integers(0, (1 << 32) - 1)),
                    st.integers(0, 7), st.integers(0, 9))


@settings(max_examples=400)
@given(st.lists(desc_st, min_size=1, max_size=8), st.integers(0, 9))
def test_vring_chain_matches_reference(descs, head) -> None:
    table = _desc_table(descs)
    ram = memoryview(bytes(range(256)) * ((WIN[1] - WIN[0]) // 256))
    got = ext.vring_chain(table, head, len(descs), ram, *WIN)
    assert _plain(got) == _plain(K.py_vring_chain(table, head, len(descs), ram, *WIN))


def test_vring_chain_cases() -> None:
    ram = memoryview(bytearray(WIN[1] - WIN[0]))
    nxt, wr, ind = 1, 2, 4
    ok = _desc_table([(0x1000, 16, nxt, 2), (0x3000, 1, wr, 0), (0x2000, 512, nxt | wr, 1)])
    for fn in (ext.vring_chain, K.py_vring_chain):
        res = fn(ok, 0, 3, ram, *WIN)
        assert res[0] == [(0x1000, 16)] and res[1] == [(0x2000, 512), (0x3000, 1)] and res[4:] == (16, 513)
        assert [len(v) for v in res[3]] == [512, 1]
        res[3][1][0] = 7  # the iovecs are the window itself
        assert ram[0x3000 - WIN[0]] == 7
        # every case the general walker must handle or report
        assert fn(_desc_table([(0x1000, 16, nxt, 0)]), 0, 1, ram, *WIN) is None             # loop
        assert fn(_desc_table([(0x1000, 16, nxt, 5)]), 0, 1, ram, *WIN) is None             # next out of range
        assert fn(_desc_table([(0x1000, 16, ind, 0)]), 0, 1, ram, *WIN) is None             # indirect
        assert fn(_desc_table([(0x8F00, 0x200, 0, 0)]), 0, 1, ram, *WIN) is None            # leaves the window
        assert fn(_desc_table([(2**64 - 8, 16, 0, 0)]), 0, 1, ram, *WIN) is None            # wraps around
        assert fn(_desc_table([(0x1000, 8, wr | nxt, 1), (0x1100, 8, 0, 0)]), 0, 2, ram, *WIN) is None
        assert fn(ok, 3, 3, ram, *WIN) is None                                              # head out of range
        assert fn(ok, 0, 4, ram, *WIN) is None                                              # table too short
        assert fn(_desc_table([(0xDEAD0000, 0, 0, 0)]), 0, 1, ram, *WIN)[0] == [(0xDEAD0000, 0)]  # empty buffer


def _avail_ring(heads: list[int], limit: int) -> bytearray:
    ring = [0] * limit
    for k, h in enumerate(heads[:limit]):
        ring[k] = h
    return bytearray(struct.pack(f"<HH{limit}H", 0, len(heads), *ring))


@settings(max_examples=300)
@given(st.lists(desc_st, min_size=1, max_size=8), st.lists(st.integers(0, 9), max_size=8),
       st.integers(0, 20), st.integers(0, 10))
def test_vring_chains_matches_reference(descs, heads, first, count) -> None:
    table = _desc_table(descs)
    avail = _avail_ring(heads, len(descs))
    ram = memoryview(bytes(range(256)) * ((WIN[1] - WIN[0]) // 256))
    got = ext.vring_chains(table, avail, len(descs), first, count, ram, *WIN)
    ref = K.py_vring_chains(table, avail, len(descs), first, count, ram, *WIN)
    assert [(g[0],) + _plain(g[1:]) for g in got] == [(r[0],) + _plain(r[1:]) for r in ref]


def test_vring_chains_stops_at_the_first_chain_for_the_walker() -> None:
    """Chains come in ring order from ``first`` (wrapping), each as vring_chain walks it; the
    first one vring_chain refuses ends the batch."""
    ram = memoryview(bytearray(WIN[1] - WIN[0]))
    nxt, wr, ind = 1, 2, 4
    table = _desc_table([(0x1000, 16, nxt, 1), (0x1100, 1, wr, 0), (0x1200, 16, ind, 0), (0x1300, 16, 0, 0)])
    for fn in (ext.vring_chains, K.py_vring_chains):
        avail = _avail_ring([3, 0, 3, 2, 0], 4)  # ring of 4: positions 0..3 hold 3, 0, 3, 2
        got = fn(table, avail, 4, 3, 3, ram, *WIN)  # positions 3, 0, 1: the indirect head 2 first
        assert got == []
        got = fn(table, avail, 4, 0, 4, ram, *WIN)
        assert [g[0] for g in got] == [3, 0, 3] and got[1][1:3] == ([(0x1000, 16)], [(0x1100, 1)])
        assert fn(table, _avail_ring([7], 4), 4, 0, 1, ram, *WIN) == []  # head out of range
        assert fn(table, avail, 4, 0, 0, ram, *WIN) == []
        assert fn(table, avail[:8], 4, 0, 1, ram, *WIN) == []  # driver ring too short for the queue
        assert fn(table, avail, 5, 0, 1, ram, *WIN) == []      # descriptor table too short


@pytest.mark.bench
@pytest.mark.parametrize("impl", ["cython", "python"])
def test_bench_vring_chain(benchmark, impl: str) -> None:
    """A virtio-blk read's chain: header, 64 KiB data, status byte."""
    ram = memoryview(bytearray(WIN[1] - WIN[0]))
    table = _desc_table([(0x1000, 16, 1, 1), (0x2000, 0x4000, 3, 2), (0x1010, 1, 2, 0)])
    fn = ext.vring_chain if impl == "cython" else K.py_vring_chain
    assert benchmark(fn, table, 0, 3, ram, *WIN)[5] == 0x4001
