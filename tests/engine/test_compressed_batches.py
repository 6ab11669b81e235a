"""Compressed clusters in batches: big reads inflate on the worker pool, convert -c deflates on it.

The oracle is qemu-img/qemu-io: images whose compressed clusters QEMU wrote in shuffled order
(host order != guest order, plain clusters and holes between them) read identically through
every read shape, with one worker and with several; batches of compressed writes give the file
that one-by-one writes give, and QEMU reads it back.
"""
from __future__ import annotations

import random
import zlib

import pytest
import zstandard

import qcowpy
from qcowpy import workers
from qcowpy.errors import CorruptImage
from qcowpy.format import constants as C
from qcowpy.qcow2 import codec

KiB, MiB = 1024, 1024 * 1024


@pytest.fixture(params=[1, 2, 4], ids=lambda n: f"workers={n}")
def pool_size(request):
    before = workers.workers()
    workers.set_workers(request.param)
    yield request.param
    workers.set_workers(before)


@pytest.fixture(scope="module", params=["zlib", "zstd"])
def shuffled(request, tmp_path_factory):
    """A 4 MiB image (cluster 64 KiB) whose compressed clusters QEMU wrote in random order."""
    from tests.conftest import require_qemu_tools
    qemu = require_qemu_tools()
    d = tmp_path_factory.mktemp(f"shuffled-{request.param}")
    path = qemu.create(d / "s.qcow2", 4 * MiB, compression_type=request.param)
    rng = random.Random(7)
    clusters = list(range(64))
    rng.shuffle(clusters)
    cmds = []
    for i, c in enumerate(clusters):
        if i % 7 == 3:
            continue  # a hole
        cmd = "write" if i % 5 == 1 else "write -c"  # some plain clusters between compressed ones
        cmds.append(f"{cmd} -P {i % 250 + 1} {c * 64 * KiB} 64k")
    qemu.io(path, *cmds)
    want = qemu.to_raw(path, d / "want.raw")
    return path, want


def test_reads_match_qemu_in_every_shape(shuffled, pool_size):
    path, want = shuffled
    rng = random.Random(pool_size)
    with qcowpy.open(path) as dev:
        assert dev.pread(len(want), 0) == want  # one call: whole clusters in batches
        for _ in range(40):
            off = rng.randrange(len(want))
            n = rng.randrange(1, min(len(want) - off, 700 * KiB) + 1)
            assert dev.pread(n, off) == want[off:off + n], (off, n)
        buf = bytearray(3 * MiB)
        dev.preadinto(buf, 512 * KiB + 17)
        assert buf == want[512 * KiB + 17:512 * KiB + 17 + 3 * MiB]


def test_compressed_clusters_between_plain_ones_inflate_in_one_batch(qemu, tmp_path, monkeypatch):
    """convert -c keeps data that does not compress as plain clusters: a read over alternating
    plain and compressed clusters hands all its compressed ones to the pool at once (one batch
    per request, not one inline inflate per extent) and reads what QEMU reads."""
    from qcowpy.qcow2 import compressed
    path = qemu.create(tmp_path / "alt.qcow2", 2 * MiB)
    qemu.io(path, *[f"{'write -c' if i % 2 else 'write'} -P {i + 1} {i * 64 * KiB} 64k" for i in range(32)])
    want = qemu.to_raw(path, tmp_path / "alt.raw")
    batches: list[int] = []
    real = compressed.run_all
    monkeypatch.setattr(compressed, "run_all", lambda fn, items: batches.append(len(items)) or real(fn, items))
    with qcowpy.open(path) as dev:
        assert dev.pread(2 * MiB, 0) == want
    assert batches == [16]


def test_a_corrupt_cluster_in_a_batch_fails_the_read(qemu, tmp_path, pool_size):
    path = qemu.create(tmp_path / "c.qcow2", MiB)
    qemu.io(path, "write -c -P 1 0 512k")
    m = qemu.map_json(path)
    assert not m[0]["data"] or "offset" not in m[0]  # compressed: no plain host offset
    with open(path, "r+b") as f:  # the third cluster's stream (allocated in guest order)
        from qcowpy.format.header import parse_header
        f.seek(0)
        h = parse_header(f.read(4096))
        f.seek(h.l1_table_offset)
        l2 = int.from_bytes(f.read(8), "big") & C.L1E_OFFSET_MASK
        f.seek(l2 + 2 * 8)
        entry = int.from_bytes(f.read(8), "big")
        host = entry & ((1 << (62 - (h.cluster_bits - 8))) - 1)
        f.seek(host)
        f.write(b"\xff" * 64)
    with qcowpy.open(path) as dev:
        assert dev.pread(64 * KiB, 0) == b"\x01" * 64 * KiB
        with pytest.raises(CorruptImage):
            dev.pread(512 * KiB, 0)


@pytest.mark.parametrize("ctype", ["zlib", "zstd"])
def test_batched_compressed_writes_equal_one_by_one(qemu, tmp_path, ctype, pool_size):
    rng = random.Random(3)
    clusters = [rng.randbytes(20000) + bytes([i]) * 45536 for i in range(12)]
    clusters.insert(5, rng.randbytes(64 * KiB))  # does not shrink: stored plainly
    size = len(clusters) * 64 * KiB - 1024  # a short last cluster
    paths = []
    for name in ("one", "many"):
        p = str(tmp_path / f"{name}.qcow2")
        qcowpy.create(p, size, compression_type=ctype)
        with qcowpy.open(p, "r+") as dev:
            items = [(c if i < len(clusters) - 1 else c[:size - i * 64 * KiB], i * 64 * KiB)
                     for i, c in enumerate(clusters)]
            if name == "one":
                for data, off in items:
                    dev.write_compressed(data, off)
            else:
                dev.write_compressed_many(items)
        paths.append(p)
    one, many = (open(p, "rb").read() for p in paths)
    assert one == many
    qemu.assert_clean(paths[1])
    raw = tmp_path / "want.raw"
    raw.write_bytes(b"".join(clusters)[:size])
    assert qemu.compare(paths[1], raw, "qcow2", "raw").returncode == 0


def test_run_all_keeps_order_and_raises_the_first_error(pool_size):
    assert workers.run_all(lambda x: x * 2, range(100)) == [x * 2 for x in range(100)]

    def boom(x):
        if x in (30, 70):
            raise ValueError(x)
        return x
    with pytest.raises(ValueError) as e:
        workers.run_all(boom, range(100))
    assert e.value.args == (30,)


# ---------------------------------------------------------------- codec semantics (both libraries)

def _libraries():
    return ["zlib"] + (["zlib-ng"] if codec.fast_deflate_available() else [])


@pytest.fixture(params=_libraries())
def deflate_lib(request):
    previous = codec.set_deflate_library(request.param)
    yield request.param
    codec.set_deflate_library(previous)


def test_deflate_streams_interchange_and_keep_the_4k_window(deflate_lib):
    cs = 64 * KiB
    block = random.Random(1).randbytes(8 * KiB)
    data = block * 8  # repeats 8 KiB apart: a 4 KiB window cannot use them
    comp = codec.compress(data, C.COMPRESSION_ZLIB, 2 * cs)  # incompressible to a 4 KiB window
    assert zlib.decompressobj(-12).decompress(comp, cs) == data  # Python's zlib = QEMU's inflate
    assert codec.decompress(comp + b"junk", C.COMPRESSION_ZLIB, cs) == data
    far = zlib.compress(data)[2:-4]  # 32 KiB window: QEMU refuses it, so must we
    with pytest.raises(CorruptImage):
        codec.decompress(far, C.COMPRESSION_ZLIB, cs)


def test_zstd_declared_size_and_streams(deflate_lib):
    cs = 64 * KiB
    data = random.Random(2).randbytes(30000) + bytes(cs - 30000)
    one = zstandard.ZstdCompressor(level=3).compress(data)
    assert codec.decompress(one + b"\0" * 300, C.COMPRESSION_ZSTD, cs) == data  # sector padding
    two = zstandard.ZstdCompressor().compress(data[:1000]) + zstandard.ZstdCompressor().compress(data[1000:])
    assert codec.decompress(two, C.COMPRESSION_ZSTD, cs) == data  # frames read across
    nosize = zstandard.ZstdCompressor(write_content_size=False).compress(data)
    assert codec.decompress(nosize, C.COMPRESSION_ZSTD, cs) == data
    # QEMU (qcow2_zstd_decompress) fails a stream that inflates past the cluster: EIO
    for longer in (data + b"x", data[:1000] + data):
        for kw in ({}, {"write_content_size": False}):
            with pytest.raises(CorruptImage, match="inflates past"):
                codec.decompress(zstandard.ZstdCompressor(**kw).compress(longer), C.COMPRESSION_ZSTD, cs)
    # bounded memory: a frame of 64 MiB of zeros without a declared size stops at the cluster
    huge = zstandard.ZstdCompressor(write_content_size=False).compress(bytes(64 * MiB))
    with pytest.raises(CorruptImage, match="inflates past"):
        codec.decompress(huge, C.COMPRESSION_ZSTD, cs)
