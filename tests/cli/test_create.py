"""``create``: the Formatting line, the image bytes and the error messages, equal to qemu-img's."""
from __future__ import annotations

import filecmp

import pytest

import qcowpy

from .helpers import as_qemu, qcowpy as run, qemu

# (arguments before the file name, size or None). Every one must give qemu-img's output and file.
IDENTICAL = [
    (["-f", "qcow2"], "20G"),
    (["-f", "qcow2", "-o", "cluster_size=2M,compat=0.10"], "1G"),
    (["-f", "qcow2", "-o", "cluster_size=512"], "1G"),
    (["-f", "qcow2", "-o", "cluster_size=4k"], "1M"),
    (["-f", "qcow2", "-o", "compat=v3,lazy_refcounts=on,refcount_bits=64,compression_type=zstd"], "1M"),
    (["-f", "qcow2", "-o", "refcount_bits=1"], "100M"),
    (["-f", "qcow2", "-o", "refcount_bits=0x10"], "1M"),  # strtoull bases
    (["-f", "qcow2", "-o", "refcount_bits=32,cluster_size=1k"], "3G"),
    (["-f", "qcow2", "-o", "preallocation=metadata"], "10M"),
    (["-f", "qcow2", "-o", "extended_l2=on"], "1G"),
    (["-f", "qcow2", "-o", "cluster_size=2M,extended_l2=on,preallocation=metadata"], "100M"),
    (["-f", "qcow2", "-o", "compat=1.1", "-o", "lazy_refcounts"], "1M"),
    (["-f", "qcow2", "-o", "size=2M"], None),
    (["-f", "qcow2", "-b", "base.qcow2", "-F", "qcow2"], None),
    (["-f", "qcow2", "-b", "base.qcow2", "-F", "qcow2"], "2G"),
    (["-f", "qcow2", "-o", "backing_file=base.qcow2,backing_fmt=qcow2"], None),
    (["-f", "qcow2", "-b", "base.raw", "-F", "raw"], None),
    (["-f", "qcow2", "-u", "-b", "nonexist", "-F", "raw"], "1G"),
    (["-f", "qcow2", "-u", "-o", "backing_file=a,,b", "-F", "raw"], "1M"),
    (["-f", "qcow2"], "1.5k"),
    (["-q", "-f", "qcow2"], "1M"),
    (["-f", "raw"], "1M"),
    (["-f", "raw"], "7000"),  # raw files are created in whole sectors
    (["-f", "raw", "-o", "preallocation=full"], "1M"),
    ([], "1.5k"),
]


@pytest.fixture
def workdir(tmp_path, qemu_img):
    qemu(qemu_img, "create", "-q", "-f", "qcow2", "base.qcow2", "1G", cwd=tmp_path)
    qemu(qemu_img, "create", "-q", "-f", "raw", "base.raw", "3M", cwd=tmp_path)
    return tmp_path


@pytest.mark.parametrize("opts,size", IDENTICAL, ids=[" ".join(o + [s or ""]) for o, s in IDENTICAL])
def test_create_identical(workdir, qemu_img, opts, size):
    tail = [size] if size else []
    want = qemu(qemu_img, "create", *opts, "img", *tail, cwd=workdir)
    (workdir / "img").rename(workdir / "want")
    got = run("create", *opts, "img", *tail, cwd=workdir)
    assert want.code == 0
    assert (got.code, got.out, got.err) == (0, want.out, "")
    assert filecmp.cmp(workdir / "img", workdir / "want", shallow=False)


def test_preallocated_images_are_valid(workdir, qemu_img):
    """falloc/full lay out refcount blocks differently from QEMU (engine), but are clean and equal."""
    for mode in ("falloc", "full"):
        got = run("create", "-f", "qcow2", "-o", f"preallocation={mode}", f"{mode}.qcow2", "3M", cwd=workdir)
        want = qemu(qemu_img, "create", "-f", "qcow2", "-o", f"preallocation={mode}", f"q{mode}.qcow2", "3M",
                    cwd=workdir)
        assert got.out.replace(mode, "X") == want.out.replace(f"q{mode}", "X").replace(mode, "X")
        assert qemu(qemu_img, "check", f"{mode}.qcow2", cwd=workdir).code == 0
        assert qemu(qemu_img, "compare", f"{mode}.qcow2", f"q{mode}.qcow2", cwd=workdir).code == 0


ERRORS = [
    ["-f", "qcow2", "-o", "foo=1", "x", "1M"],
    ["-f", "qcow2", "-o", "cluster_size=1000", "x", "1M"],
    ["-f", "qcow2", "-o", "cluster_size=1x", "x", "1M"],
    ["-f", "qcow2", "-o", "compat=0.9", "x", "1M"],
    ["-f", "qcow2", "-o", "refcount_bits=3", "x", "1M"],
    ["-f", "qcow2", "-o", "refcount_bits=-1", "x", "1M"],  # strtoull: wraps, then fails the width check
    ["-f", "qcow2", "-o", "refcount_bits=1.5", "x", "1M"],
    ["-f", "qcow2", "-o", "refcount_bits=99999999999999999999999", "x", "1M"],
    ["-f", "qcow2", "-o", "refcount_bits=8,compat=0.10", "x", "1M"],
    ["-f", "qcow2", "-o", "lazy_refcounts=maybe", "x", "1M"],
    ["-f", "qcow2", "-o", "compat=0.10,lazy_refcounts=on", "x", "1M"],
    ["-f", "qcow2", "-o", "compression_type=lz4", "x", "1M"],
    ["-f", "qcow2", "-o", "compat=0.10,compression_type=zstd", "x", "1M"],
    ["-f", "qcow2", "-o", "compat=0.10,extended_l2=on", "x", "1M"],
    ["-f", "qcow2", "-o", "extended_l2=on,cluster_size=4k", "x", "1M"],
    ["-f", "qcow2", "-o", "preallocation=bad", "x", "1M"],
    ["-f", "qcow2", "-o", "backing_fmt=raw", "x", "1M"],
    ["-f", "qcow2", "-o", "size=2M", "x", "1M"],
    ["-f", "qcow2", "-o", ",", "x", "1M"],
    ["-f", "qcow2", "-o", "cluster_size=4k,,x", "x", "1M"],
    ["-f", "qcow2", "-o", "backing_file=base.qcow2,preallocation=metadata", "-F", "qcow2", "x", "1M"],
    ["-f", "qcow2", "-b", "missing.qcow2", "x"],
    ["-f", "qcow2", "-b", "base.qcow2", "x"],
    ["-f", "qcow2", "-u", "-b", "base.qcow2", "x", "1M"],
    ["-f", "qcow2", "-b", "x", "-F", "qcow2", "x", "1M"],
    ["-f", "raw", "-b", "base.qcow2", "x", "1M"],
    ["-f", "vmdk2", "x", "1M"],
    ["-f", "qcow2", "x"],
    ["-f", "qcow2", "x", "1.5"],
    ["-f", "qcow2", "x", "16E"],
    ["-f", "qcow2", "x", "1M", "extra"],
    ["-f", "qcow2"],
    ["-z"],
    ["-f"],
    ["-f", "qcow2", "nodir/x", "1M"],
    ["-f", "qcow2", "-o", "cluster_size=512", "x", "1T"],
]


@pytest.mark.parametrize("args", ERRORS, ids=[" ".join(a) for a in ERRORS])
def test_create_errors_match(workdir, qemu_img, args):
    want = qemu(qemu_img, "create", *args, cwd=workdir)
    got = run("create", *args, cwd=workdir)
    assert want.code == 1
    assert (got.code, got.out, as_qemu(got.err)) == (want.code, want.out, want.err)
    assert not (workdir / "x").exists() or want.code == 0


def test_option_help(qemu_img):
    got = run("create", "-f", "qcow2", "-o", "help")
    want = qemu(qemu_img, "create", "-f", "qcow2", "-o", "help")
    assert got.code == 0 and got.out.startswith("Supported qcow2 options:\n")
    ours = [l for l in got.out.splitlines() if l.startswith("  ")]
    theirs = set(want.out.splitlines())
    assert ours and all(line in theirs for line in ours)  # a subset: the options qcowpy implements
    assert got.out.endswith("Specify the target filename to include those options.\n")
    assert run("create", "-f", "raw", "-o", "?", "x").out.startswith("Supported options:\n")


@pytest.mark.parametrize("args", [["create", "-o", "help"], ["create", "-f", "raw", "-o", "help"],
                                  ["convert", "-o", "help"], ["create", "-f", "bochs", "-o", "help"],
                                  ["convert", "-O", "bochs", "-o", "help"], ["create", "-f", "dmg", "x", "1M"],
                                  ["convert", "-O", "cloop", "s.raw", "x"]],
                         ids=" ".join)
def test_help_without_filename_and_read_only_formats(tmp_path, qemu_img, args):
    """raw's own options without a filename (preallocation is the file protocol's), and formats
    QEMU knows but cannot create, as qemu-img words them."""
    (tmp_path / "s.raw").write_bytes(bytes(4096))
    want = qemu(qemu_img, *args, cwd=tmp_path)
    got = run(*args, cwd=tmp_path)
    assert (got.code, got.out, as_qemu(got.err)) == (want.code, want.out, want.err)


def test_api_create_accepts_same_options(tmp_path, qemu_img):
    qcowpy.create(str(tmp_path / "a.qcow2"), 1 << 30, cluster_size=65536, lazy_refcounts="on")
    qemu(qemu_img, "create", "-q", "-f", "qcow2", "-o", "lazy_refcounts=on", str(tmp_path / "b.qcow2"), "1G")
    assert filecmp.cmp(tmp_path / "a.qcow2", tmp_path / "b.qcow2", shallow=False)


def test_empty_20g_is_small(tmp_path):
    assert run("create", "-q", "-f", "qcow2", str(tmp_path / "t.qcow2"), "20G").code == 0
    assert (tmp_path / "t.qcow2").stat().st_size == 3 * 65536 + 320
