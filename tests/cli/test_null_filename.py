"""``null-co://`` and ``null-aio://`` filenames (QEMU's null drivers by protocol name), as
qemu-img takes them: as images and as backing files."""
from __future__ import annotations

import pytest

import qcowpy as api

from .helpers import as_qemu, qcowpy, qemu


@pytest.mark.parametrize("args", [
    ["info", "null-co://"], ["info", "--output=json", "null-co://"], ["info", "null-aio://"],
    ["info", "-f", "qcow2", "null-co://"], ["info", "null-co://x"], ["info", "null-aio://y"],
    ["info", "-f", "raw", "null-co://"], ["compare", "null-co://", "null-aio://"],
], ids=lambda a: " ".join(a))
def test_null_filenames_as_qemu_img(tmp_path, qemu_img, args):
    want = qemu(qemu_img, *args, cwd=tmp_path)
    got = qcowpy(*args, cwd=tmp_path)
    assert (got.code, got.out, as_qemu(got.err)) == (want.code, want.out, want.err)


def test_null_backing_file(tmp_path, qemu_img, qemu):
    ours, theirs = tmp_path / "ours.qcow2", tmp_path / "theirs.qcow2"
    got = qcowpy("create", "-f", "qcow2", "-b", "null-co://", "-F", "raw", ours, "1440K")
    want = qemu.img("create", "-f", "qcow2", "-b", "null-co://", "-F", "raw", theirs, "1440K")
    assert got.code == 0 and got.out.replace(str(ours), str(theirs)) == want.stdout
    assert ours.read_bytes() == theirs.read_bytes()
    qemu.assert_clean(ours)
    info = [qcowpy("info", "--backing-chain", p).out.replace(str(p), "X") for p in (ours, theirs)]
    assert info[0] == qemu.img("info", "--backing-chain", theirs).stdout.replace(str(theirs), "X") == info[1]
    with api.open(str(ours), "r+") as dev:  # reads through to zeros, writes stay in the overlay
        assert dev.pread(4096, 8192) == bytes(4096)
        dev.pwrite(b"\x5a" * 512, 65536)
    qemu.io(str(ours), "read -P 0x5a 64k 512")  # (QEMU's null reads leave its buffer as it was: no -P 0)
    qemu.assert_clean(ours)
