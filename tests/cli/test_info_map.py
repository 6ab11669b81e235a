"""``info`` and ``map`` on images qemu-img/qemu-io wrote: byte-for-byte qemu-img's output.

Both tools look at the very same files, so even ``actual-size``/``disk size`` (the host
file's allocated blocks) must agree; nothing is masked.
"""
from __future__ import annotations

import json

import pytest

from .helpers import as_qemu, qcowpy, qemu, qemu_io

WRITES = ("write -P 1 0 1M", "write -z 2M 64k", "write -P 3 5M 4k", "write -P 0 8M 64k", "write -P 9 9M 3M",
          "discard 10M 1M")


def _build(qemu_img, d):
    def img(*args):
        r = qemu(qemu_img, *args, cwd=d)
        assert r.code == 0, r.err

    names = []
    for cs in ("512", "64k", "2M"):
        for compat in ("0.10", "1.1"):
            n = f"c{cs}-{compat}.qcow2"
            img("create", "-q", "-f", "qcow2", "-o", f"cluster_size={cs},compat={compat}", n, "16M")
            qemu_io(qemu_img, d / n, *WRITES)
            names.append(n)
    img("create", "-q", "-f", "qcow2", "-o", "refcount_bits=1", "r1.qcow2", "20G")
    img("create", "-q", "-f", "qcow2", "-o", "refcount_bits=64,lazy_refcounts=on", "r64.qcow2", "1G")
    img("create", "-q", "-f", "qcow2", "-o", "extended_l2=on", "ext.qcow2", "16M")
    qemu_io(qemu_img, d / "ext.qcow2", "write -P 4 4k 8k", "write -z 64k 64k", "write -P 5 1M 64k")
    img("create", "-q", "-f", "qcow2", "-o", "preallocation=metadata", "meta.qcow2", "4M")
    names += ["r1.qcow2", "r64.qcow2", "ext.qcow2"]
    for ctype in ("zlib", "zstd"):
        img("convert", "-c", "-O", "qcow2", "-o", f"compression_type={ctype}", "c64k-1.1.qcow2", f"{ctype}.qcow2")
        names.append(f"{ctype}.qcow2")
    # chains: qcow2 over qcow2 over raw, a shorter backing file, a v2 overlay
    img("create", "-q", "-f", "raw", "base.raw", "4M")
    qemu_io(qemu_img, d / "base.raw", "write -P 7 0 1M", fmt="raw")
    img("create", "-q", "-f", "qcow2", "-b", "base.raw", "-F", "raw", "mid.qcow2", "8M")
    qemu_io(qemu_img, d / "mid.qcow2", "write -P 8 512k 1M", "write -z 3M 64k")
    img("create", "-q", "-f", "qcow2", "-b", "mid.qcow2", "-F", "qcow2", "top.qcow2", "16M")
    qemu_io(qemu_img, d / "top.qcow2", "write -P 6 0 64k", "write -z 6M 64k", "discard 512k 64k")
    img("create", "-q", "-f", "qcow2", "-o", "compat=0.10", "-b", "c64k-1.1.qcow2", "-F", "qcow2", "v2top.qcow2")
    qemu_io(qemu_img, d / "v2top.qcow2", "write -P 2 1M 128k", "discard 5M 64k")
    img("create", "-q", "-f", "qcow2", "-u", "-b", "missing.qcow2", "-F", "qcow2", "orphan.qcow2", "1M")
    names += ["base.raw", "mid.qcow2", "top.qcow2", "v2top.qcow2", "orphan.qcow2"]
    img("create", "-q", "-f", "qcow2", "snap.qcow2", "4M")
    qemu_io(qemu_img, d / "snap.qcow2", "write -P 1 0 1M")
    img("snapshot", "-c", "first", "snap.qcow2")
    qemu_io(qemu_img, d / "snap.qcow2", "write -P 2 0 64k")
    img("snapshot", "-c", "a-much-longer-snapshot-name", "snap.qcow2")
    names.append("snap.qcow2")
    return names


@pytest.fixture(scope="module")
def images(qemu_img, tmp_path_factory):
    d = tmp_path_factory.mktemp("infomap")
    return d, _build(qemu_img, d)


def _same(qemu_img, d, *args):
    want = qemu(qemu_img, *args, cwd=d)
    got = qcowpy(*args, cwd=d)
    assert (got.code, got.out, as_qemu(got.err)) == (want.code, want.out, want.err), args
    return got


def test_info_json_and_human(images, qemu_img):
    d, names = images
    for n in names:
        _same(qemu_img, d, "info", "--output=json", n)
        _same(qemu_img, d, "info", n)
        _same(qemu_img, d, "info", "-U", "--output", "human", n)


def test_info_json_types(images):
    d, _ = images
    info = json.loads(qcowpy("info", "--output=json", "top.qcow2", cwd=d).out)
    assert list(info) == ["backing-filename-format", "virtual-size", "filename", "cluster-size", "format",
                          "actual-size", "format-specific", "full-backing-filename", "backing-filename", "dirty-flag"]
    assert info["format-specific"]["data"] == {"compat": "1.1", "compression-type": "zlib", "lazy-refcounts": False,
                                               "refcount-bits": 16, "corrupt": False, "extended-l2": False}


def test_info_backing_chain(images, qemu_img):
    d, _ = images
    for n in ("top.qcow2", "v2top.qcow2", "mid.qcow2"):
        _same(qemu_img, d, "info", "--backing-chain", "--output=json", n)
        _same(qemu_img, d, "info", "--backing-chain", n)
    _same(qemu_img, d, "info", "--backing-chain", str(d / "top.qcow2"))  # absolute: full-backing-filename
    _same(qemu_img, d, "info", "-f", "raw", "top.qcow2")


def test_info_errors(images, qemu_img):
    d, _ = images
    _same(qemu_img, d, "info", "nonexist.qcow2")
    _same(qemu_img, d, "info", "--output=xml", "top.qcow2")
    _same(qemu_img, d, "info", "--backing-chain", "orphan.qcow2")


def test_map_json_and_human(images, qemu_img):
    d, names = images
    for n in names:
        if n == "ext.qcow2":
            continue  # see test_map_extended_l2
        _same(qemu_img, d, "map", "--output=json", n)
        _same(qemu_img, d, "map", n)  # compressed images: the same error, after the same header


def test_map_ranges(images, qemu_img):
    d, _ = images
    for extra in (["--start-offset=1M"], ["--max-length=3M"], ["-s", "512k", "-l", "5000000"],
                  ["--start-offset=20M"], ["-l", "0"]):
        _same(qemu_img, d, "map", "--output=json", *extra, "top.qcow2")
        _same(qemu_img, d, "map", *extra, "top.qcow2")
    _same(qemu_img, d, "map", "--output=json", "-f", "raw", "top.qcow2")
    _same(qemu_img, d, "map", "-s", "1x", "top.qcow2")
    _same(qemu_img, d, "map", "nonexist.qcow2")
    _same(qemu_img, d, "map", "orphan.qcow2")


def test_map_extended_l2(images, qemu_img):
    """Byte-identical, including the host offset QEMU prints for reserved-but-unallocated
    subclusters with nothing below them ("present": false, "zero": true, "offset": N)."""
    d, _ = images
    want = qemu(qemu_img, "map", "--output=json", "ext.qcow2", cwd=d).out
    got = qcowpy("map", "--output=json", "ext.qcow2", cwd=d).out
    assert '"present": false, "zero": true, "data": false, "offset"' in want
    assert got == want


@pytest.mark.parametrize("command", [["info"], ["info", "--output=json"], ["map", "--output=json"], ["map"],
                                     ["measure", "-O", "qcow2"], ["compare", "dense.raw"]])
def test_raw_files_of_unaligned_size(tmp_path, qemu_img, command):
    """A raw file counts whole sectors, as in QEMU: the tail of the last one reads as a hole."""
    import random
    (tmp_path / "dense.raw").write_bytes(random.Random(1).randbytes(3_000_000))
    with open(tmp_path / "sparse.raw", "wb") as f:
        f.truncate(3_000_000)
        f.seek(2_999_999)
        f.write(b"x")
    for name in ("dense.raw", "sparse.raw"):
        want = qemu(qemu_img, *command, name, cwd=tmp_path)
        got = qcowpy(*command, name, cwd=tmp_path)
        assert (got.code, got.out, as_qemu(got.err)) == (want.code, want.out, want.err), name


def test_info_snapshot_with_large_vm_state(tmp_path, qemu_img):
    """A snapshot whose VM state exceeds 4 GiB keeps the size only in the 64-bit extra-data field
    (the 32-bit one is 0, as QEMU writes it): info must report the 64-bit value, as qemu-img does."""
    import struct

    from qcowpy.format.header import parse_header
    path = tmp_path / "vm.qcow2"
    for args in (("create", "-q", "-f", "qcow2", str(path), "1M"), ("snapshot", "-c", "with-vm-state", str(path))):
        assert qemu(qemu_img, *args).code == 0
    raw = bytearray(path.read_bytes())
    h = parse_header(bytes(raw))
    entry = h.snapshots_offset
    big = 5 << 30
    struct.pack_into(">I", raw, entry + 32, 0)  # vm_state_size (32 bits)
    struct.pack_into(">Q", raw, entry + 40, big)  # extra data: vm_state_size_large
    path.write_bytes(bytes(raw))
    got = _same(qemu_img, tmp_path, "info", "--output=json", "vm.qcow2")
    assert json.loads(got.out)["snapshots"][0]["vm-state-size"] == big
    _same(qemu_img, tmp_path, "info", "vm.qcow2")
