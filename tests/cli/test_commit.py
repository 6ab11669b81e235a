"""``commit``: the chain qemu-img 7.2 leaves behind, with its messages and exit codes.

A chain base <- mid <- top (top larger than its backing files) is built with qemu-img/qemu-io and
copied twice; qemu-img commits in one copy, qcowpy in the other. The emptied top (QEMU's
qcow2_make_empty: rebuilt from scratch on v3, discarded cluster by cluster on v2 or with
snapshots) and every untouched image must be byte-identical; the image committed into must read
exactly like QEMU's and like the top did before (QEMU's mirror job may place its clusters in
another order), and pass qemu-img check.
"""
from __future__ import annotations

import filecmp
import json
import shutil

import pytest

from .helpers import as_qemu, qcowpy as run, qemu, qemu_io

NAMES = ("base.qcow2", "mid.qcow2", "top.qcow2")


@pytest.fixture(params=[[], ["-o", "compat=0.10"], ["-o", "cluster_size=4k"], ["-o", "extended_l2=on"], "snapshot"],
                ids=["v3", "v2", "4k", "extl2", "top-snapshot"])
def chain(request, tmp_path, qemu_img):
    opts = [] if request.param == "snapshot" else request.param
    src = tmp_path / "src"
    src.mkdir()

    def make(name, size, *writes, backing=None):
        extra = ["-b", backing, "-F", "qcow2"] if backing else []
        assert qemu(qemu_img, "create", "-q", "-f", "qcow2", *opts, *extra, name, *([size] if size else []),
                    cwd=src).code == 0
        if writes:
            qemu_io(qemu_img, src / name, *writes)
    make("base.qcow2", "64M", "write -P 1 0 8M", "write -P 2 20M 3M")
    make("mid.qcow2", None, "write -P 3 4M 1M", "write -z 21M 512k", "write -P 8 33M 70k", backing="base.qcow2")
    make("top.qcow2", "96M", "write -P 4 0 64k", "write -P 5 30M 100k", "write -z 2M 1M", "write -P 9 80M 2M",
         backing="mid.qcow2")
    if request.param == "snapshot":
        assert qemu(qemu_img, "snapshot", "-c", "s", src / "top.qcow2").code == 0
        qemu_io(qemu_img, src / "top.qcow2", "write -P 6 1M 64k")
    for side in ("a", "b"):
        shutil.copytree(src, tmp_path / side)
    return tmp_path


@pytest.mark.parametrize("args,target", [([], "mid.qcow2"), (["-d"], "mid.qcow2"), (["-q"], "mid.qcow2"),
                                         (["-b", "base.qcow2"], "base.qcow2")], ids=["default", "-d", "-q", "-b"])
def test_commit_matches_qemu_img(chain, qemu_img, args, target):
    a, b = chain / "a", chain / "b"
    before = chain / "before.raw"
    assert qemu(qemu_img, "convert", "-O", "raw", a / "top.qcow2", before).code == 0
    want = qemu(qemu_img, "commit", *args, "top.qcow2", cwd=a)
    got = run("commit", *args, "top.qcow2", cwd=b)
    assert (got.code, got.out, as_qemu(got.err)) == (want.code, want.out, want.err) and want.code == 0
    for name in NAMES:
        if name != target:
            assert filecmp.cmp(a / name, b / name, shallow=False), f"{name} differs"
    cmp = qemu(qemu_img, "compare", "-U", a / target, b / target)
    assert cmp.code == 0, cmp.out + cmp.err
    check = qemu(qemu_img, "check", b / target)
    assert check.code == 0, check.out + check.err
    # the committed image now reads what the top read (over the top's length)
    view = qemu(qemu_img, "compare", "-f", "qcow2", "-F", "raw", b / target, before)
    assert view.code == 0, view.out + view.err


@pytest.mark.parametrize("args,setup", [([], "nobacking"), (["-b", "nothere.qcow2"], None), (["-t", "bogus"], None),
                                        ([], "raw")], ids=["no-backing", "base-not-in-chain", "bad-cache", "raw"])
def test_commit_errors_match(tmp_path, qemu_img, args, setup):
    for side in ("a", "b"):
        d = tmp_path / side
        d.mkdir()
        if setup == "raw":
            qemu(qemu_img, "create", "-q", "-f", "raw", "img", "1M", cwd=d)
        else:
            qemu(qemu_img, "create", "-q", "-f", "qcow2", "base.qcow2", "1M", cwd=d)
            extra = [] if setup == "nobacking" else ["-b", "base.qcow2", "-F", "qcow2"]
            qemu(qemu_img, "create", "-q", "-f", "qcow2", *extra, "img", "1M", cwd=d)
    want = qemu(qemu_img, "commit", *args, "img", cwd=tmp_path / "a")
    got = run("commit", *args, "img", cwd=tmp_path / "b")
    assert (got.code, got.out, as_qemu(got.err)) == (want.code, want.out, want.err)
    assert (tmp_path / "a" / "img").read_bytes() == (tmp_path / "b" / "img").read_bytes()


@pytest.mark.parametrize("args", [["-b", "base.qcow2"], []], ids=["-b base", "default"])
def test_commit_past_a_short_middle_image(tmp_path, qemu_img, args):
    """Past the end of a short middle image the top reads zeros, not the base's bytes: QEMU counts
    those zeros as allocated in the short layer (iotest 274), so committing into the base writes
    them there, and the base then reads like the top did."""
    for side in ("a", "b"):
        d = tmp_path / side
        d.mkdir()
        assert qemu(qemu_img, "create", "-q", "-f", "qcow2", d / "base.qcow2", "4M").code == 0
        qemu_io(qemu_img, d / "base.qcow2", "write -P 1 0 4M")
        assert qemu(qemu_img, "create", "-q", "-f", "qcow2", "-b", "base.qcow2", "-F", "qcow2", "mid.qcow2", "1M",
                    cwd=d).code == 0
        qemu_io(qemu_img, d / "mid.qcow2", "write -P 2 512k 64k")
        assert qemu(qemu_img, "create", "-q", "-f", "qcow2", "-b", "mid.qcow2", "-F", "qcow2", "top.qcow2", "4M",
                    cwd=d).code == 0
        qemu_io(qemu_img, d / "top.qcow2", "write -P 3 3M 64k")
    before = tmp_path / "before.raw"
    assert qemu(qemu_img, "convert", "-O", "raw", tmp_path / "a" / "top.qcow2", before).code == 0
    want = qemu(qemu_img, "commit", *args, "top.qcow2", cwd=tmp_path / "a")
    got = run("commit", *args, "top.qcow2", cwd=tmp_path / "b")
    assert (got.code, got.out, as_qemu(got.err)) == (want.code, want.out, want.err) and want.code == 0
    target = "base.qcow2" if args else "mid.qcow2"
    maps = [qemu(qemu_img, "map", "--output=json", "-U", tmp_path / s / target).out for s in ("a", "b")]
    strip = [[{k: v for k, v in e.items() if k != "offset"} for e in json.loads(m)] for m in maps]
    assert strip[0] == strip[1]
    view = qemu(qemu_img, "compare", "-f", "qcow2", "-F", "raw", tmp_path / "b" / target, before)
    assert view.code == 0, view.out + view.err
    assert qemu(qemu_img, "check", tmp_path / "b" / target).code == 0
