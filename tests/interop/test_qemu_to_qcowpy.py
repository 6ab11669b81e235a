"""QEMU writes, qcowpy reads: every byte qcowpy reads must equal `qemu-img convert -O raw`,
and block_status must agree with `qemu-img map --output=json`."""
from __future__ import annotations

import filecmp
import os
import random
import shutil

import pytest

import qcowpy

from .helpers import assert_map_like_qemu, assert_reads_like_qemu, read_all_qcowpy

pytestmark = pytest.mark.interop

KiB, MiB = 1024, 1024 * 1024
CLUSTER_SIZES = [512, 4 * KiB, 64 * KiB, 2 * MiB]

# (compat, refcount_bits): v2 images only have 16-bit refcounts
MATRIX = [(cs, compat, rb) for cs in CLUSTER_SIZES for compat, rb in
          [("1.1", 1), ("1.1", 16), ("1.1", 64), ("0.10", 16)]]


def image_size(cs: int) -> int:
    return max(4 * MiB, 16 * cs)


def random_file(tmp_path, n: int, seed: int) -> str:
    p = tmp_path / f"rand-{seed}-{n}.bin"
    p.write_bytes(random.Random(seed).randbytes(n))
    return str(p)


def mixed_workload(qemu, tmp_path, path: str, cs: int, size: int) -> None:
    """A qemu-io workload touching every cluster kind: data, partial writes, zero (with and
    without unmap), discard, compressed, COW over compressed, the image end, an L2 boundary."""
    rnd = random_file(tmp_path, 2 * cs, cs)
    cmds = [
        f"write -P 0x11 0 {3 * cs + 100}",
        f"write -s {rnd} {4 * cs + 7} {2 * cs}",
        f"write -P 0x22 {7 * cs} {2 * cs}",
        f"write -z {7 * cs} {2 * cs}",
        f"write -P 0x33 {9 * cs} {cs}",
        f"write -z -u {9 * cs} {cs}",
        f"write -P 0x44 {10 * cs} {3 * cs}",
        f"discard {11 * cs} {cs}",
        f"discard {12 * cs + 1} {cs // 2}",  # partial: ignored by qcow2
        f"write -c -P 0x55 {13 * cs} {cs}",
        f"write -P 0x66 {13 * cs + 10} 10",  # COW out of a compressed cluster
        f"write -P 0x77 {size - 1000} 1000",
        f"write -z {3 * cs + 50} 100",  # zeroes inside allocated data
    ]
    l2_span = cs * (cs // 8)
    if l2_span + 200 < size:
        cmds.append(f"write -P 0x88 {l2_span - 100} 200")
    qemu.io(path, *cmds)


@pytest.mark.parametrize("cs,compat,rb", MATRIX, ids=[f"cs{c}-v{'3' if p == '1.1' else '2'}-rb{r}"
                                                      for c, p, r in MATRIX])
def test_matrix_read_and_map(qemu, tmp_path, cs, compat, rb):
    path = str(tmp_path / "img.qcow2")
    size = image_size(cs)
    qemu.create(path, size, cluster_size=cs, compat=compat, refcount_bits=rb)
    mixed_workload(qemu, tmp_path, path, cs, size)
    qemu.assert_clean(path)
    assert_reads_like_qemu(qemu, path, tmp_path)
    assert_map_like_qemu(qemu, path)
    with qcowpy.open(path) as dev:
        assert dev.size == size
        # small unaligned reads agree with the whole-image read
        whole = dev.pread(size, 0)
        for off, n in [(1, 511), (cs - 3, 7), (3 * cs + 40, 130), (13 * cs + 5, 20), (size - 1001, 1001)]:
            assert dev.pread(n, off) == whole[off:off + n]


@pytest.mark.parametrize("ctype", ["zlib", "zstd"])
@pytest.mark.parametrize("cs", CLUSTER_SIZES)
def test_convert_compressed(qemu, tmp_path, cs, ctype):
    """qemu-img convert -c: compressible, incompressible (stored plainly), zero and partial clusters."""
    size = max(2 * MiB, 8 * cs) + 1536  # a partial last cluster
    rng = random.Random(cs)
    data = bytearray(size)
    for i in range(0, size, cs):
        kind = (i // cs) % 4
        n = min(cs, size - i)
        if kind == 0:
            data[i:i + n] = (b"qcowpy-%d " % i * (n // 8 + 1))[:n]
        elif kind == 1:
            data[i:i + n] = rng.randbytes(n)
        elif kind == 2:
            pass  # zeros
        else:
            data[i:i + n // 2] = rng.randbytes(n // 2)  # half random, half zeros
    src = tmp_path / "src.raw"
    src.write_bytes(bytes(data))
    dst = str(tmp_path / "c.qcow2")
    qemu.img("convert", "-c", "-f", "raw", "-O", "qcow2", "-o", f"cluster_size={cs},compression_type={ctype}",
             str(src), dst)
    qemu.assert_clean(dst)
    want = assert_reads_like_qemu(qemu, dst, tmp_path)
    assert want == bytes(data)
    assert_map_like_qemu(qemu, dst)
    # cluster-sized and odd-sized reads through the compressed-cluster cache
    assert read_all_qcowpy(dst, chunk=cs // 2 + 3) == bytes(data)


@pytest.mark.parametrize("ctype", ["zlib", "zstd"])
def test_compressed_then_overwritten(qemu, tmp_path, ctype):
    cs = 64 * KiB
    path = str(tmp_path / "c.qcow2")
    qemu.create(path, 4 * MiB, cluster_size=cs, compression_type=ctype)
    cmds = [f"write -c -P {0x10 + i} {i * cs} {cs}" for i in range(16)]
    cmds += [f"write -P 0xee {3 * cs + 100} 1000", f"write -z {5 * cs} {cs}", f"discard {6 * cs} {cs}",
             f"write -z -u {7 * cs} 4096"]
    qemu.io(path, *cmds)
    assert_reads_like_qemu(qemu, path, tmp_path)
    assert_map_like_qemu(qemu, path)


# ----------------------------------------------------------------------------- extended L2

@pytest.mark.parametrize("cs", [16 * KiB, 64 * KiB, 2 * MiB])
@pytest.mark.parametrize("with_backing", [False, True])
def test_extended_l2(qemu, tmp_path, cs, with_backing):
    sc = cs // 32
    size = max(4 * MiB, 4 * cs)
    backing = None
    if with_backing:
        backing = str(tmp_path / "base.qcow2")
        qemu.create(backing, size)
        qemu.io(backing, f"write -P 0xbb 0 {size}")
    path = str(tmp_path / "ext.qcow2")
    qemu.create(path, size, backing=backing, backing_fmt="qcow2" if backing else None,
                cluster_size=cs, extended_l2="on")
    rnd = random_file(tmp_path, 3 * sc, sc)
    qemu.io(path,
            f"write -P 0x11 {3 * sc} {2 * sc}",  # two whole subclusters
            f"write -P 0x12 {8 * sc + 100} 300",  # part of one subcluster (COW from backing)
            f"write -s {rnd} {cs - sc} {3 * sc}",  # across a cluster boundary
            f"write -z {12 * sc} {3 * sc}",  # zeroed subclusters
            f"write -z {20 * sc + 1} 17",  # zero inside a subcluster
            f"write -P 0x13 {cs + 5 * sc} {sc}",
            f"discard {cs + 5 * sc} {sc}",
            f"write -z -u {2 * cs} {cs}",  # a whole zero cluster
            f"write -c -P 0x14 {3 * cs} {cs}")  # compressed cluster
    qemu.assert_clean(path)
    assert_reads_like_qemu(qemu, path, tmp_path)
    # includes reserved-but-unallocated subclusters: QEMU reports their host offset when
    # nothing lies below them (no backing file or past its end)
    assert_map_like_qemu(qemu, path)


# ----------------------------------------------------------------------------- backing chains

@pytest.mark.parametrize("compat", ["1.1", "0.10"])
def test_raw_backing_shorter_than_overlay(qemu, tmp_path, compat):
    base = tmp_path / "base.raw"
    base.write_bytes(random.Random(1).randbytes(3 * MiB + 512) )
    top = str(tmp_path / "top.qcow2")
    qemu.create(top, 6 * MiB, backing="base.raw", backing_fmt="raw", compat=compat, cluster_size=4096)
    qemu.io(top, "write -P 0x41 4096 100", f"write -P 0x42 {3 * MiB} 8192", f"write -z {2 * MiB} 65536",
            f"discard {MiB} 65536", f"write -P 0x43 {5 * MiB} 700")
    assert_reads_like_qemu(qemu, top, tmp_path)
    assert_map_like_qemu(qemu, top)
    with qcowpy.open(top) as dev:
        assert dev.backing is not None and dev.backing.format == "raw"
        # past the end of the backing file the overlay reads zeros
        assert dev.pread(1024, 4 * MiB) == bytes(1024)


def test_qcow2_backing_shorter_than_overlay(qemu, tmp_path):
    base = str(tmp_path / "base.qcow2")
    qemu.create(base, 1 * MiB + 512, cluster_size=512)
    qemu.io(base, "write -P 0x61 0 1049088")
    top = str(tmp_path / "top.qcow2")
    qemu.create(top, 3 * MiB, backing=base, backing_fmt="qcow2", cluster_size=64 * KiB)
    qemu.io(top, f"write -P 0x62 {MiB - 100} 200", f"write -P 0x63 {2 * MiB + 7} 10")
    assert_reads_like_qemu(qemu, top, tmp_path)
    assert_map_like_qemu(qemu, top)


@pytest.mark.parametrize("compat", ["1.1", "0.10"])
def test_three_deep_chain(qemu, tmp_path, compat):
    cs = 4096
    base = str(tmp_path / "base.qcow2")
    mid = str(tmp_path / "mid.qcow2")
    top = str(tmp_path / "top.qcow2")
    qemu.create(base, 2 * MiB, cluster_size=cs, compat=compat)
    qemu.io(base, f"write -P 0xa1 0 {2 * MiB}")
    qemu.create(mid, 2 * MiB, backing="base.qcow2", backing_fmt="qcow2", cluster_size=cs * 2, compat=compat)
    qemu.io(mid, "write -P 0xb2 1000 20000", f"write -z {100 * cs} {8 * cs}", f"discard {200 * cs} {16 * cs}",
            f"write -c -P 0xb3 {300 * cs} {2 * cs}")
    qemu.create(top, 2 * MiB, backing="mid.qcow2", backing_fmt="qcow2", cluster_size=cs, compat=compat)
    qemu.io(top, "write -P 0xc3 5000 3000", f"write -z {104 * cs} {cs}", f"discard {400 * cs} {4 * cs}")
    assert_reads_like_qemu(qemu, top, tmp_path)
    assert_map_like_qemu(qemu, top)
    with qcowpy.open(top) as dev:
        assert [d.format for d in dev.chain] == ["qcow2", "qcow2", "qcow2"]
        depths = {e.depth for e in dev.block_status()}
        assert depths == {0, 1, 2}


def test_backing_without_format_is_probed(qemu, tmp_path):
    from qcowpy.format import constants as C
    from qcowpy.format.header import pack_header, parse_header
    base = str(tmp_path / "base.qcow2")
    qemu.create(base, MiB)
    qemu.io(base, "write -P 0x5a 0 4096")
    top = str(tmp_path / "top.qcow2")
    qemu.create(top, MiB, backing="base.qcow2", backing_fmt="qcow2")
    # qemu-img 7.2 refuses to write a backing name without a format: drop the extension ourselves
    with open(top, "r+b") as f:
        h = parse_header(f.read(65536))
        h.set_extension(C.EXT_BACKING_FORMAT, None)
        f.seek(0)
        f.write(pack_header(h).ljust(4096, b"\0"))
    info = qemu.info_json(top)
    assert "backing-filename-format" not in info and info["backing-filename"] == "base.qcow2"
    want = assert_reads_like_qemu(qemu, top, tmp_path)
    assert want[:4096] == b"\x5a" * 4096
    with qcowpy.open(top) as dev:
        assert dev.backing is not None and dev.backing.format == "qcow2"


def test_relative_backing_names(qemu, tmp_path, monkeypatch):
    """Relative names resolve against the overlay's directory, not the process's cwd."""
    d = tmp_path / "a" / "b"
    d.mkdir(parents=True)
    (tmp_path / "a" / "base.raw").write_bytes(random.Random(7).randbytes(MiB))
    mid = str(d / "mid.qcow2")
    qemu.create(mid, MiB, backing="../base.raw", backing_fmt="raw")
    qemu.io(mid, "write -P 0x01 0 512")
    top = str(d / "top.qcow2")
    qemu.create(top, MiB, backing="mid.qcow2", backing_fmt="qcow2")
    qemu.io(top, "write -P 0x02 4096 512")
    want = assert_reads_like_qemu(qemu, top, tmp_path)
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    assert read_all_qcowpy(top) == want  # absolute path, unrelated cwd
    assert read_all_qcowpy(os.path.relpath(top)) == want  # relative overlay path
    monkeypatch.chdir(tmp_path / "a")
    assert read_all_qcowpy("b/top.qcow2") == want


def test_backing_with_extended_l2_overlay_and_zero_plain(qemu, tmp_path):
    """v3 zero clusters never fall through to the backing file; unallocated ones do."""
    base = str(tmp_path / "base.qcow2")
    qemu.create(base, MiB, cluster_size=4096)
    qemu.io(base, f"write -P 0xff 0 {MiB}")
    top = str(tmp_path / "top.qcow2")
    qemu.create(top, MiB, backing=base, backing_fmt="qcow2", cluster_size=4096)
    qemu.io(top, "write -z 0 8192", "write -z -u 8192 8192", "discard 16384 8192")
    with qcowpy.open(top) as dev:
        assert dev.pread(24576, 0) == bytes(24576)
        assert dev.pread(4096, 24576) == b"\xff" * 4096
    assert_reads_like_qemu(qemu, top, tmp_path)
    assert_map_like_qemu(qemu, top)


# ----------------------------------------------------------------------------- preallocated images

@pytest.mark.parametrize("prealloc", ["metadata", "falloc", "full"])
def test_qemu_preallocated(qemu, tmp_path, prealloc):
    path = str(tmp_path / "p.qcow2")
    qemu.create(path, 3 * MiB + 512, preallocation=prealloc, cluster_size=4096)
    qemu.io(path, "write -P 0x9 12345 6789", f"write -z {MiB} 8192")
    assert_reads_like_qemu(qemu, path, tmp_path)
    assert_map_like_qemu(qemu, path)


def test_lazy_refcounts_and_zstd_image(qemu, tmp_path):
    path = str(tmp_path / "l.qcow2")
    qemu.create(path, 2 * MiB, lazy_refcounts="on", compression_type="zstd", refcount_bits=8)
    qemu.io(path, "write -P 1 0 100000", "write -c -P 2 131072 65536")
    assert_reads_like_qemu(qemu, path, tmp_path)
    assert_map_like_qemu(qemu, path)


@pytest.mark.parametrize("compat", ["0.10", "1.1"])
@pytest.mark.parametrize("backing", [False, True], ids=["alone", "backed"])
def test_write_zeroes_like_qemu_io(qemu, tmp_path, compat, backing):
    """``write -z`` leaves the very bytes qemu-io leaves: zero clusters on v3; on v2 whole clusters
    are unallocated when there is no backing file (QEMU's discard fallback) and written as
    explicit zeros when there is one."""
    extra = {}
    if backing:
        base = str(tmp_path / "base.qcow2")
        qemu.create(base, 4 * MiB)
        qemu.io(base, "write -P 7 0 4M")
        extra = {"backing": base, "backing_fmt": "qcow2"}
    src = str(tmp_path / "src.qcow2")
    qemu.create(src, 4 * MiB, compat=compat, **extra)
    qemu.io(src, "write -P 1 0 1M", "write -P 2 3M 64k")
    ops = [(65536, 131072), (1000, 10), (524288, 2 * MiB), (3 * MiB + 4096, 8192)]
    theirs, ours = str(tmp_path / "theirs.qcow2"), str(tmp_path / "ours.qcow2")
    shutil.copy(src, theirs)
    shutil.copy(src, ours)
    qemu.io(theirs, *[f"write -z {off} {n}" for off, n in ops])
    with qcowpy.open(ours, "r+") as dev:
        for off, n in ops:
            dev.write_zeroes(n, off)
    # the same clusters mapped the same way (qemu-io also punches the clusters it frees, which
    # qcowpy's API leaves to the caller's discard policy, so the freed bytes may differ)
    assert qemu.map_json(ours) == qemu.map_json(theirs)
    if not (compat == "0.10" and not backing):
        assert filecmp.cmp(theirs, ours, shallow=False)
    assert_reads_like_qemu(qemu, ours, tmp_path)
    assert "No errors" in qemu.img("check", ours).stdout
