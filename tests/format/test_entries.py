"""L1/L2 entries (standard and extended), compressed descriptors, refcount entries, snapshots.

The reference decoders here are written from docs/interop/qcow2.txt, independently of qcowpy.
"""
from __future__ import annotations

import json
import struct
import zlib

import pytest
import zstandard
from hypothesis import given, settings
from hypothesis import strategies as st

from qcowpy.format import constants as C
from qcowpy.format.entries import (ClusterType, cluster_type, compressed_descriptor, compressed_host_clusters,
                                   csize_shift, l1_offset, l1_reserved, l2_offset, l2_reserved,
                                   make_compressed_entry, pack_table, subcluster_type, unpack_table)
from qcowpy.format.header import parse_header
from qcowpy.format.refcount import (entries_per_block, get_refcount, leading_free, max_refcount, set_refcount,
                                   set_refcounts)
from qcowpy.format.snapshot import pack_snapshot_table, parse_snapshot_table

KiB, MiB = 1024, 1024 * 1024
u64 = st.integers(0, (1 << 64) - 1)


def bits(lo: int, hi: int) -> int:
    """Mask of bits lo..hi inclusive."""
    return ((1 << (hi + 1)) - 1) & ~((1 << lo) - 1)


# ----------------------------------------------------------------------------- L1 / L2 entries

@given(u64)
def test_l1_entry_fields(e):
    # L1: bits 9-55 L2 offset, 63 COPIED, everything else (0-8, 56-62) reserved
    assert l1_offset(e) == e & bits(9, 55)
    assert l1_reserved(e) == e & (bits(0, 8) | bits(56, 62))


@given(u64)
def test_standard_l2_entry_fields(e):
    compressed = bool(e >> 62 & 1)
    if compressed:
        assert cluster_type(e) == ClusterType.COMPRESSED
        assert l2_reserved(e) == 0
        return
    off = e & bits(9, 55)
    assert l2_offset(e) == off
    assert l2_reserved(e) == e & (bits(1, 8) | bits(56, 61))
    assert l2_reserved(e, extended=True) == e & (bits(0, 8) | bits(56, 61))
    zero = e & 1
    want = {(0, 0): ClusterType.UNALLOCATED, (0, 1): ClusterType.NORMAL,
            (1, 0): ClusterType.ZERO_PLAIN, (1, 1): ClusterType.ZERO_ALLOC}[(zero, int(off != 0))]
    assert cluster_type(e) == want


@given(st.sampled_from([0, 0x50000, 1 << 62 | 0x12345]), st.integers(0, (1 << 64) - 1), st.integers(0, 31))
def test_extended_l2_subcluster_types(entry, bitmap, i):
    alloc = bitmap >> i & 1
    zero = bitmap >> (32 + i) & 1
    t = subcluster_type(entry, bitmap, i)
    if entry & (1 << 62):
        # compressed clusters have no subclusters; the bitmap must be all zero
        assert t == (ClusterType.COMPRESSED if bitmap == 0 else ClusterType.INVALID)
    elif entry & bits(9, 55):
        want = {(0, 0): ClusterType.UNALLOCATED_ALLOC, (1, 0): ClusterType.NORMAL,
                (0, 1): ClusterType.ZERO_ALLOC, (1, 1): ClusterType.INVALID}[(alloc, zero)]
        assert t == want
    else:
        want = {(0, 0): ClusterType.UNALLOCATED, (1, 0): ClusterType.INVALID,
                (0, 1): ClusterType.ZERO_PLAIN, (1, 1): ClusterType.INVALID}[(alloc, zero)]
        assert t == want


@given(st.lists(u64, max_size=64))
def test_tables_are_big_endian_u64(entries):
    data = pack_table(entries)
    assert data == b"".join(struct.pack(">Q", e) for e in entries)
    assert unpack_table(data) == entries


# ----------------------------------------------------------------------------- compressed descriptors

def spec_descriptor(entry: int, cluster_bits: int) -> tuple[int, int]:
    """qcow2.txt: x = 62 - (cluster_bits - 8); bits 0..x-1 host offset; x..61 additional 512-byte
    sectors. QEMU reads nb_sectors*512 - (offset % 512) bytes."""
    x = 62 - (cluster_bits - 8)
    off = entry & ((1 << x) - 1)
    extra = (entry >> x) & ((1 << (61 - x + 1)) - 1)
    return off, (extra + 1) * 512 - (off & 511)


@pytest.mark.parametrize("cluster_bits", range(9, 22))
@settings(max_examples=60, deadline=None)
@given(data=st.data())
def test_compressed_descriptor_every_cluster_size(cluster_bits, data):
    x = 62 - (cluster_bits - 8)
    assert csize_shift(cluster_bits) == x
    cs = 1 << cluster_bits
    offset = data.draw(st.integers(cs, (1 << min(x, 56)) - 2 * cs - 1))
    length = data.draw(st.integers(1, cs))  # compressed data is never longer than a cluster
    e = make_compressed_entry(offset, length, cluster_bits)
    assert e >> 62 == 1  # only the compressed flag above bit 61 (COPIED is never set)
    # QEMU's encoding: nb_csectors = last sector - first sector, stored at x
    assert (e >> x) & ((1 << (cluster_bits - 8)) - 1) == ((offset + length - 1) >> 9) - (offset >> 9)
    assert compressed_descriptor(e, cluster_bits) == spec_descriptor(e, cluster_bits)
    host, n = compressed_descriptor(e, cluster_bits)
    assert host == offset and n >= length and (host + n) % 512 == 0
    hosts = compressed_host_clusters(e, cluster_bits)
    assert hosts == range(offset >> cluster_bits, ((offset + n - 1) >> cluster_bits) + 1)


@pytest.mark.parametrize("cluster_bits", range(9, 22))
def test_compressed_descriptor_limits(cluster_bits):
    x = 62 - (cluster_bits - 8)
    with pytest.raises(ValueError):
        make_compressed_entry(1 << x, 10, cluster_bits)
    cs = 1 << cluster_bits
    # the widest descriptor: every sector-count bit set
    e = make_compressed_entry(511, (1 << (cluster_bits - 8)) * 512 - 511, cluster_bits)
    assert spec_descriptor(e, cluster_bits) == compressed_descriptor(e, cluster_bits)
    assert compressed_descriptor(e, cluster_bits)[1] == 2 * cs - 511


def walk_l2(buf: bytes, header) -> list[tuple[int, int]]:
    """(guest offset, L2 entry) of every allocated entry, straight from the file."""
    cs = header.cluster_size
    out = []
    l1 = struct.unpack_from(f">{header.l1_size}Q", buf, header.l1_table_offset)
    per = cs // 8
    for i, l1e in enumerate(l1):
        l2off = l1e & bits(9, 55)
        if not l2off:
            continue
        l2 = struct.unpack_from(f">{per}Q", buf, l2off)
        for j, e in enumerate(l2):
            if e:
                out.append(((i * per + j) * cs, e))
    return out


@pytest.mark.interop
@pytest.mark.parametrize("ctype", ["zlib", "zstd"])
@pytest.mark.parametrize("cluster_bits", range(9, 22))
def test_decode_qemu_compressed_clusters(qemu, tmp_path, cluster_bits, ctype):
    """Descriptors qemu-img convert -c wrote decode to streams that inflate to the source data."""
    cs = 1 << cluster_bits
    n = 6 if cluster_bits < 20 else 3
    src = bytearray()
    for i in range(n):
        src += (b"cluster %d of %d; " % (i, cs) * (cs // 10 + 1))[:cs]
    (tmp_path / "s.raw").write_bytes(bytes(src))
    dst = str(tmp_path / "c.qcow2")
    qemu.img("convert", "-c", "-O", "qcow2", "-o", f"cluster_size={cs},compression_type={ctype}",
             str(tmp_path / "s.raw"), dst)
    buf = open(dst, "rb").read()
    h = parse_header(buf)
    entries = walk_l2(buf, h)
    assert len(entries) == n
    for guest, e in entries:
        assert cluster_type(e) == ClusterType.COMPRESSED
        host, nbytes = compressed_descriptor(e, cluster_bits)
        assert (host, nbytes) == spec_descriptor(e, cluster_bits)
        assert host + nbytes <= len(buf) + 511
        raw = buf[host:host + nbytes]
        if ctype == "zlib":
            out = zlib.decompressobj(-12).decompress(raw, cs)
        else:
            out = zstandard.ZstdDecompressor().stream_reader(raw, read_across_frames=True).read(cs)
        assert out == bytes(src[guest:guest + cs])


# ----------------------------------------------------------------------------- refcount entries

def spec_get(block: bytes, index: int, order: int) -> int:
    width = 1 << order
    bitpos = index * width
    if width >= 8:
        return int.from_bytes(block[bitpos // 8:bitpos // 8 + width // 8], "big")
    # sub-byte: bit 0 is the least significant bit of the byte
    return (block[bitpos // 8] >> (bitpos % 8)) & ((1 << width) - 1)


@pytest.mark.parametrize("order", range(7))
@settings(max_examples=40, deadline=None)
@given(data=st.data())
def test_refcount_entries_every_order(order, data):
    cluster_bits = 9
    n = entries_per_block(cluster_bits, order)
    assert n == 512 * 8 // (1 << order)
    assert max_refcount(order) == (1 << (1 << order)) - 1
    block = bytearray(data.draw(st.binary(min_size=512, max_size=512)))
    orig = bytes(block)
    idx = data.draw(st.integers(0, n - 1))
    assert get_refcount(block, idx, order) == spec_get(block, idx, order)
    v = data.draw(st.integers(0, max_refcount(order)))
    set_refcount(block, idx, order, v)
    assert get_refcount(block, idx, order) == v == spec_get(block, idx, order)
    # no other entry changed
    for j in range(n):
        if j != idx:
            assert spec_get(block, j, order) == spec_get(orig, j, order)


@pytest.mark.parametrize("order", range(7))
@settings(max_examples=60)
@given(data=st.data())
def test_refcount_runs_every_order(order, data):
    """leading_free / set_refcounts (the allocator's block-at-a-time scans) against spec_get on
    sparse blocks: mostly zero entries with a few set, runs starting at any index."""
    n = entries_per_block(9, order)
    block = bytearray(512)
    for j in data.draw(st.lists(st.integers(0, n - 1), max_size=6)):
        set_refcount(block, j, order, data.draw(st.integers(1, max_refcount(order))))
    idx = data.draw(st.integers(0, n - 1))
    count = data.draw(st.integers(0, n - idx))
    want = 0
    while want < count and spec_get(block, idx + want, order) == 0:
        want += 1
    assert leading_free(block, idx, count, order) == want
    orig, v = bytes(block), data.draw(st.integers(0, max_refcount(order)))
    set_refcounts(block, idx, count, order, v)
    assert [spec_get(block, j, order) for j in range(n)] == \
        [v if idx <= j < idx + count else spec_get(orig, j, order) for j in range(n)]


@pytest.mark.interop
@pytest.mark.parametrize("rb", [1, 2, 4, 8, 16, 32, 64])
def test_refcounts_of_qemu_images(qemu, tmp_path, rb):
    """Decode QEMU's refcount blocks: snapshots raise data/L2 refcounts, metadata stays at 1."""
    order = rb.bit_length() - 1
    path = str(tmp_path / "r.qcow2")
    qemu.create(path, MiB, cluster_size=4096, refcount_bits=rb)
    qemu.io(path, "write -P 1 0 20000", "write -P 2 500000 9000")
    nsnap = min(2, max_refcount(order) - 1)
    for i in range(nsnap):
        qemu.img("snapshot", "-c", f"s{i}", path)
    buf = open(path, "rb").read()
    h = parse_header(buf)
    cs = h.cluster_size
    rt = struct.unpack_from(f">{h.refcount_table_clusters * cs // 8}Q", buf, h.refcount_table_offset)
    per = entries_per_block(h.cluster_bits, order)

    def refcount(cluster: int) -> int:
        blk = rt[cluster // per] & bits(9, 55)
        return get_refcount(buf[blk:blk + cs], cluster % per, order) if blk else 0

    data_clusters = {e & bits(9, 55) for _, e in walk_l2(buf, h)}
    l2_tables = {e & bits(9, 55) for e in struct.unpack_from(f">{h.l1_size}Q", buf, h.l1_table_offset)} - {0}
    assert len(data_clusters) == 5 + 3  # 20000 bytes at 0, 9000 at 500000 (4k clusters)
    for off in data_clusters | l2_tables:
        assert refcount(off // cs) == 1 + nsnap
    assert refcount(0) == 1  # header
    assert refcount(h.refcount_table_offset // cs) == 1
    nclusters = (len(buf) + cs - 1) // cs
    assert refcount(nclusters + 5) == 0
    # qemu-img check's image end is one past the last cluster with a nonzero refcount
    last_used = max(c for c in range(nclusters) if refcount(c))
    check = json.loads(qemu.img("check", "--output=json", path).stdout)
    assert check["image-end-offset"] == (last_used + 1) * cs
    assert sum(1 for c in range(nclusters) if refcount(c)) >= len(data_clusters) + len(l2_tables) + 3


# ----------------------------------------------------------------------------- snapshots

@pytest.mark.interop
@pytest.mark.parametrize("compat", ["1.1", "0.10"])
def test_snapshot_table_from_qemu(qemu, tmp_path, compat):
    path = str(tmp_path / "s.qcow2")
    qemu.create(path, 2 * MiB, compat=compat)
    names = ["first", "zweiter snapshot", "x" * 100]
    for i, name in enumerate(names):
        qemu.io(path, f"write -P {i + 1} {i * 65536} 65536")
        qemu.img("snapshot", "-c", name, path)
    buf = open(path, "rb").read()
    h = parse_header(buf)
    assert h.nb_snapshots == len(names)
    table = buf[h.snapshots_offset:]
    snaps = parse_snapshot_table(table, h.nb_snapshots)
    info = qemu.info_json(path)["snapshots"]
    assert [s.name for s in snaps] == [i["name"] for i in info] == names
    for s, i in zip(snaps, info):
        assert s.id_str == i["id"]
        assert s.date_sec == i["date-sec"] and s.date_nsec == i["date-nsec"]
        assert s.vm_clock_nsec == i["vm-clock-sec"] * 10 ** 9 + i["vm-clock-nsec"]
        assert s.vm_state_size_large == i["vm-state-size"]
        assert s.l1_size == h.l1_size and s.l1_table_offset % h.cluster_size == 0
        if compat == "1.1":
            assert s.disk_size == 2 * MiB
    # re-encoding gives QEMU's bytes back
    packed = pack_snapshot_table(snaps)
    assert packed == (table + bytes(8))[:len(packed)]  # the file may end before the last entry's padding
    assert parse_snapshot_table(packed, len(snaps)) == snaps


def test_snapshot_table_limits():
    from qcowpy.errors import CorruptImage
    with pytest.raises(CorruptImage):
        parse_snapshot_table(bytes(39), 1)
    with pytest.raises(CorruptImage):
        parse_snapshot_table(struct.pack(">QIHHIIQII", 0, 0, 0, 0, 0, 0, 0, 0, 5000) + bytes(6000), 1)
    with pytest.raises(CorruptImage):
        parse_snapshot_table(b"", C.MAX_SNAPSHOTS + 1)
