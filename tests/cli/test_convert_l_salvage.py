"""``convert -l`` (an internal snapshot as the source) and ``convert --salvage``: qemu-img side by side."""
from __future__ import annotations

import struct

import pytest

from .helpers import as_qemu, qcowpy as run, qemu, qemu_io


def _same(tmp_path, qemu_img, args):
    want = qemu(qemu_img, *args, "a.out", cwd=tmp_path)
    got = run(*args, "b.out", cwd=tmp_path)
    assert (got.code, got.out, as_qemu(got.err).replace("b.out", "a.out")) == (want.code, want.out, want.err)
    a, b = tmp_path / "a.out", tmp_path / "b.out"
    assert a.exists() == b.exists()
    if want.code == 0:
        assert a.read_bytes() == b.read_bytes()


@pytest.fixture
def snapped(tmp_path, qemu_img):
    assert qemu(qemu_img, "create", "-q", "-f", "qcow2", "sn.qcow2", "1M", cwd=tmp_path).code == 0
    qemu_io(qemu_img, tmp_path / "sn.qcow2", "write -P 1 0 64k", "write -P 3 512k 4k")
    assert qemu(qemu_img, "snapshot", "-c", "s1", "sn.qcow2", cwd=tmp_path).code == 0
    qemu_io(qemu_img, tmp_path / "sn.qcow2", "write -P 2 0 128k", "write -z 512k 64k")
    assert qemu(qemu_img, "snapshot", "-c", "2", "sn.qcow2", cwd=tmp_path).code == 0  # a name that is an id
    qemu_io(qemu_img, tmp_path / "sn.qcow2", "write -P 4 0 4k")
    return tmp_path


@pytest.mark.parametrize("args", [
    ["-l", "s1", "-O", "raw"], ["-l", "1", "-O", "raw"], ["-l", "2", "-O", "raw"],
    ["-l", "snapshot.name=s1", "-O", "qcow2"], ["-l", "snapshot.id=2", "-O", "raw"],
    ["-l", "snapshot.id=1,snapshot.name=s1", "-O", "qcow2", "-c"],
    ["-l", "snapshot.id=1,snapshot.name=2", "-O", "raw"], ["-l", "nope", "-O", "raw"],
    ["-l", "snapshot.bogus=1", "-O", "raw"],
], ids=lambda a: " ".join(a))
def test_convert_l_matches_qemu_img(snapped, qemu_img, args):
    _same(snapped, qemu_img, ["convert", *args, "sn.qcow2"])


def test_convert_l_refuses_concatenation_and_raw(snapped, qemu_img):
    _same(snapped, qemu_img, ["convert", "-l", "s1", "sn.qcow2", "sn.qcow2"])
    (snapped / "r.raw").write_bytes(bytes(65536))
    _same(snapped, qemu_img, ["convert", "-l", "snapshot.id=1", "-f", "raw", "r.raw"])


@pytest.fixture
def damaged(tmp_path, qemu_img):
    """A compressed image whose second cluster's stream is garbage: reading it fails with EIO."""
    (tmp_path / "r.raw").write_bytes(bytes(range(256)) * 1024)
    assert qemu(qemu_img, "convert", "-c", "-f", "raw", "-O", "qcow2", "r.raw", "c.qcow2", cwd=tmp_path).code == 0
    with open(tmp_path / "c.qcow2", "r+b") as f:
        head = f.read(104)
        (l1_offset,) = struct.unpack_from(">Q", head, 40)
        f.seek(l1_offset)
        l2 = struct.unpack(">Q", f.read(8))[0] & ((1 << 56) - 1) & ~511
        f.seek(l2 + 8)
        entry = struct.unpack(">Q", f.read(8))[0]
        assert entry >> 62 == 1  # compressed
        f.seek(entry & ((1 << 54) - 1))  # 64k clusters: 54 offset bits
        f.write(b"\xff" * 64)
    return tmp_path


@pytest.mark.parametrize("args", [["--salvage"], ["--salvage", "-q"], ["--salvage", "-O", "qcow2"]],
                         ids=lambda a: " ".join(a))
def test_salvage_reads_what_it_can_as_qemu_img(damaged, qemu_img, args):
    _same(damaged, qemu_img, ["convert", *args, "c.qcow2"])


def test_salvage_refuses_copy_offloading(damaged, qemu_img):
    _same(damaged, qemu_img, ["convert", "--salvage", "-C", "c.qcow2"])


@pytest.mark.parametrize("args", [["-S", "4k"], ["-c"], ["-c", "-S", "8k"]], ids=" ".join)
def test_copy_offloading_refused_with_compression_or_sparse_size(damaged, qemu_img, args):
    _same(damaged, qemu_img, ["convert", "-C", *args, "-O", "qcow2", "c.qcow2"])
