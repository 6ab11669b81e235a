"""``rebase``: the overlay qemu-img 7.2 leaves, byte for byte, with its messages and exit codes.

A chain base1 <- mid <- top (and an unrelated newb) is built with qemu-img/qemu-io; each case
rebases one copy of top with qemu-img and another with qcowpy. The files must be identical, and
a safe rebase must not change what the overlay reads (qemu-img compare against the original).
"""
from __future__ import annotations

import filecmp
import shutil

import pytest

from .helpers import as_qemu, qcowpy as run, qemu, qemu_io

CASES = [
    ["-b", "newb.qcow2", "-F", "qcow2"],        # an unrelated backing file: differences copied
    ["-b", "base1.qcow2", "-F", "qcow2"],       # further down the chain (prefix): only mid's data
    ["-b", "mid.qcow2", "-F", "qcow2"],         # the current one: nothing to copy
    ["-b", ""],                                 # no backing file: everything the chain gave
    ["-b", "small.qcow2", "-F", "qcow2"],       # smaller than the overlay: the tail compared with zeros
    ["-b", "newb.qcow2", "-F", "raw"],          # a format the file does not have: qemu-img does not check
    ["-u", "-b", "newb.qcow2", "-F", "qcow2"],  # unsafe: only the header
    ["-u"],                                     # unsafe without -b: the backing file is dropped
    ["-b", "newb.qcow2"],                       # no -F: data copied, then the header change refused
    ["-b", "nonexist.qcow2", "-F", "qcow2"],
    [],
]


def test_rebase_down_the_chain_keeps_zeros_past_a_shorter_old_backing(tmp_path, qemu_img):
    """iotest 024's case: the overlay is larger than its backing file, whose own backing file is
    larger again; past the old backing file's end the overlay read zeros and must keep reading
    them after rebasing onto the bottom image (qemu-io verifies; qemu-img leaves the same file)."""
    def make(name, size, *writes, backing=None):
        extra = ["-b", backing, "-F", "qcow2"] if backing else []
        assert qemu(qemu_img, "create", "-q", "-f", "qcow2", *extra, name, size, cwd=tmp_path).code == 0
        if writes:
            qemu_io(qemu_img, tmp_path / name, *writes)
    make("base.qcow2", "1M", "write -P 0x11 0 1M")
    make("mid.qcow2", "384k", "write -P 0x22 64k 64k", backing="base.qcow2")
    make("top.qcow2", "1M", "write -P 0x33 0 32k", backing="mid.qcow2")
    shutil.copy(tmp_path / "top.qcow2", tmp_path / "a.qcow2")
    want = qemu(qemu_img, "rebase", "-b", "base.qcow2", "-F", "qcow2", "a.qcow2", cwd=tmp_path)
    got = run("rebase", "-b", "base.qcow2", "-F", "qcow2", "top.qcow2", cwd=tmp_path)
    assert (got.code, got.err) == (want.code, want.err) == (0, "")
    qemu_io(qemu_img, tmp_path / "top.qcow2", "read -P 0x33 0 32k", "read -P 0x11 32k 32k",
            "read -P 0x22 64k 64k", "read -P 0x11 128k 256k", "read -P 0 384k 640k")
    assert filecmp.cmp(tmp_path / "a.qcow2", tmp_path / "top.qcow2", shallow=False)


@pytest.fixture(params=[[], ["-o", "cluster_size=4k"], ["-o", "extended_l2=on"], ["-o", "compat=0.10"]],
                ids=["default", "4k", "extl2", "v2"])
def chain(request, tmp_path, qemu_img):
    def make(name, size, *writes, backing=None, opts=()):
        extra = ["-b", backing, "-F", "qcow2"] if backing else []
        assert qemu(qemu_img, "create", "-q", "-f", "qcow2", *opts, *extra, name, *([size] if size else []),
                    cwd=tmp_path).code == 0
        if writes:
            qemu_io(qemu_img, tmp_path / name, *writes)
    make("base1.qcow2", "64M", "write -P 1 0 8M", "write -P 2 20M 3M", "write -P 6 60M 4M")
    make("mid.qcow2", None, "write -P 3 4M 1M", "write -z 21M 512k", "write -P 8 33M 70k", backing="base1.qcow2")
    make("top.qcow2", None, "write -P 4 0 64k", "write -P 5 30M 100k", "write -P 9 59M 2M",
         backing="mid.qcow2", opts=request.param)
    make("newb.qcow2", "64M", "write -P 1 0 2M", "write -P 7 40M 1M", "write -P 3 4M 512k")
    make("small.qcow2", "24M", "write -P 1 0 8M")
    return tmp_path


@pytest.mark.parametrize("args", CASES, ids=lambda a: " ".join(a) or "none")
def test_rebase_matches_qemu_img(chain, qemu_img, args):
    shutil.copy(chain / "top.qcow2", chain / "a.qcow2")
    shutil.copy(chain / "top.qcow2", chain / "b.qcow2")
    want = qemu(qemu_img, "rebase", *args, "a.qcow2", cwd=chain)
    got = run("rebase", *args, "b.qcow2", cwd=chain)
    assert (got.code, got.out, as_qemu(got.err)) == (want.code, want.out, want.err)
    assert filecmp.cmp(chain / "a.qcow2", chain / "b.qcow2", shallow=False)
    if want.code == 0 and "-u" not in args:  # a safe rebase keeps the guest view
        cmp = qemu(qemu_img, "compare", "top.qcow2", "b.qcow2", cwd=chain)
        assert cmp.code == 0, cmp.out + cmp.err
    check = qemu(qemu_img, "check", "b.qcow2", cwd=chain)
    assert check.code == 0, check.out + check.err


@pytest.mark.parametrize("args", [["-b", "other.img", "-F", "raw"], ["-u", "-b", "other.img"], ["-b", "nope.qcow2", "-F", "qcow2"]],
                         ids=" ".join)
def test_rebase_of_a_raw_image(tmp_path, qemu_img, args):
    for side in ("a", "b"):
        (tmp_path / side).mkdir()
        for name in ("disk.img", "other.img"):
            (tmp_path / side / name).write_bytes(bytes(1 << 20))
    want = qemu(qemu_img, "rebase", *args, "disk.img", cwd=tmp_path / "a")
    got = run("rebase", *args, "disk.img", cwd=tmp_path / "b")
    assert (got.code, got.out, as_qemu(got.err)) == (want.code, want.out, want.err)
