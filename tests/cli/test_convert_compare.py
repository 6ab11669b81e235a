"""``convert`` outputs checked by qemu-img (check, compare, byte equality) and ``compare`` vs qemu-img."""
from __future__ import annotations

import filecmp
import json
import os

import pytest

from qcowpy.qcow2 import codec
from qcowpy.tools.convert import Progress

from .helpers import as_qemu, qcowpy, qemu, qemu_io


@pytest.fixture(scope="module")
def src(qemu_img, tmp_path_factory):
    d = tmp_path_factory.mktemp("convert")

    def img(*args):
        r = qemu(qemu_img, *args, cwd=d)
        assert r.code == 0, r.err

    img("create", "-q", "-f", "qcow2", "base.qcow2", "32M")
    qemu_io(qemu_img, d / "base.qcow2", "write -P 1 0 1M", "write -z 2M 64k", "write -P 3 5M 4k",
            "write -P 0 10M 1M", "write -P 4 20M 3M")
    img("create", "-q", "-f", "qcow2", "-b", "base.qcow2", "-F", "qcow2", "top.qcow2", "40M")
    qemu_io(qemu_img, d / "top.qcow2", "write -P 5 512k 1M", "write -z 5M 4k", "write -P 6 39M 7k")
    img("create", "-q", "-f", "raw", "odd.raw", "1000")
    qemu_io(qemu_img, d / "odd.raw", "write -P 9 0 512", fmt="raw")
    return d


def _clean(qemu_img, d, name, fmt="qcow2"):
    r = qemu(qemu_img, "check", "-f", fmt, name, cwd=d)
    assert r.code == 0 and "No errors were found" in r.out, r.out + r.err


@pytest.mark.parametrize("args", [["-O", "qcow2"], ["-c", "-O", "qcow2"], ["-O", "raw"], [],
                                  ["-O", "qcow2", "-B", "base.qcow2", "-F", "qcow2"],
                                  ["-O", "qcow2", "-o", "cluster_size=4k,refcount_bits=64"],
                                  ["-O", "qcow2", "-o", "cluster_size=2M"], ["-O", "qcow2", "-S", "64k"],
                                  ["-c", "-O", "qcow2", "-o", "cluster_size=512"],
                                  # -S 0: fully allocated, zeros as data (and compressed) (iotests 122, 150)
                                  ["-O", "qcow2", "-S", "0"], ["-c", "-O", "qcow2", "-S", "0"],
                                  ["-O", "qcow2", "-o", "compat=0.10"]],
                         ids=lambda a: " ".join(a) or "default")
def test_convert_identical_to_qemu_img(src, qemu_img, args, deflate_as_qemu):
    """Same bytes as qemu-img's own output (allocation order, sparseness and compression included;
    compressed with Python's zlib, as qemu-img's, see test_fast_deflate_valid_for_qemu)."""
    got = qcowpy("convert", *args, "top.qcow2", "ours", cwd=src)
    assert (got.code, got.out, got.err) == (0, "", "")
    assert qemu(qemu_img, "convert", *args, "top.qcow2", "theirs", cwd=src).code == 0
    assert filecmp.cmp(src / "ours", src / "theirs", shallow=False)
    assert qemu(qemu_img, "compare", "top.qcow2", "ours", cwd=src).code == 0
    if "qcow2" in args:
        _clean(qemu_img, src, "ours")
    os.unlink(src / "ours")
    os.unlink(src / "theirs")


def _layout(qemu_img, d, name):
    """qemu-img map's view without host offsets: which ranges are data, zero, compressed."""
    r = qemu(qemu_img, "map", "--output=json", name, cwd=d)
    assert r.code == 0, r.err
    return [{k: v for k, v in e.items() if k != "offset"} for e in json.loads(r.out)]


@pytest.mark.skipif(not codec.fast_deflate_available(), reason="zlib-ng is not installed")
@pytest.mark.parametrize("opts", ["cluster_size=65536", "cluster_size=512", "cluster_size=2M"])
def test_fast_deflate_valid_for_qemu(src, qemu_img, opts):
    """zlib-ng's streams (the default codec) differ from qemu-img's bytes but read back the same in
    QEMU, with the same clusters compressed, and check clean."""
    assert codec.deflate_library() == "zlib-ng"
    got = qcowpy("convert", "-c", "-O", "qcow2", "-o", opts, "top.qcow2", "ours", cwd=src)
    assert (got.code, got.out, got.err) == (0, "", "")
    assert qemu(qemu_img, "convert", "-c", "-O", "qcow2", "-o", opts, "top.qcow2", "theirs", cwd=src).code == 0
    assert qemu(qemu_img, "compare", "top.qcow2", "ours", cwd=src).code == 0
    _clean(qemu_img, src, "ours")
    assert _layout(qemu_img, src, "ours") == _layout(qemu_img, src, "theirs")
    os.unlink(src / "ours")
    os.unlink(src / "theirs")


@pytest.mark.parametrize("args", [["-c", "-O", "qcow2", "-o", "compression_type=zstd"], ["-O", "qcow2", "-S", "0"],
                                  ["-O", "raw", "-S", "0"], ["-O", "qcow2", "-o", "compat=0.10"],
                                  ["-O", "qcow2", "-o", "preallocation=full"]],
                         ids=lambda a: " ".join(a))
def test_convert_valid(src, qemu_img, args):
    assert qcowpy("convert", *args, "top.qcow2", "out", cwd=src).code == 0
    assert qemu(qemu_img, "compare", "top.qcow2", "out", cwd=src).code == 0
    if "qcow2" in args:
        _clean(qemu_img, src, "out")
    os.unlink(src / "out")


def test_convert_existing_target_and_concat(src, qemu_img):
    qemu(qemu_img, "create", "-q", "-f", "qcow2", "t.qcow2", "40M", cwd=src)
    qemu_io(qemu_img, src / "t.qcow2", "write -P 8 0 40M")  # old contents must be overwritten or zeroed
    assert qcowpy("convert", "-n", "-O", "qcow2", "top.qcow2", "t.qcow2", cwd=src).code == 0
    assert qemu(qemu_img, "compare", "top.qcow2", "t.qcow2", cwd=src).code == 0
    _clean(qemu_img, src, "t.qcow2")
    # odd sizes are rounded up to sectors and sources are concatenated, as qemu-img does
    assert qcowpy("convert", "-O", "raw", "odd.raw", "odd.raw", "cat.raw", cwd=src).code == 0
    assert qemu(qemu_img, "convert", "-O", "raw", "odd.raw", "odd.raw", "qcat.raw", cwd=src).code == 0
    assert filecmp.cmp(src / "cat.raw", src / "qcat.raw", shallow=False)
    assert os.path.getsize(src / "cat.raw") == 2048


CONVERT_ERRORS = [
    ["-O", "vmdk2", "top.qcow2", "x"], ["-c", "-O", "raw", "top.qcow2", "x"], ["-O", "qcow2", "missing", "x"],
    ["-O", "qcow2", "-B", "base.qcow2", "top.qcow2", "x"], ["-O", "qcow2", "-o", "foo=bar", "top.qcow2", "x"],
    ["-O", "qcow2", "-S", "1000", "top.qcow2", "x"], ["top.qcow2"], ["x"], [],
    ["-O", "qcow2", "-o", "cluster_size=3k", "top.qcow2", "x"], ["-n", "top.qcow2", "odd.raw"], ["-O", "qcow2", "-S", "1x", "top.qcow2", "x"],
    ["-c", "-O", "qcow2", "-o", "preallocation=full", "top.qcow2", "x"], ["-m", "17", "top.qcow2", "x"],
    ["-O", "qcow2", "-B", "base.qcow2", "-F", "qcow2", "top.qcow2", "odd.raw", "x"],
]


@pytest.mark.parametrize("args", CONVERT_ERRORS, ids=lambda a: " ".join(a))
def test_convert_errors_match(src, qemu_img, args):
    want = qemu(qemu_img, "convert", *args, cwd=src)
    got = qcowpy("convert", *args, cwd=src)
    assert want.code == 1
    assert (got.code, got.out, as_qemu(got.err)) == (want.code, want.out, want.err)
    for f in ("x",):
        if (src / f).exists():
            os.unlink(src / f)


def test_convert_progress(src):
    r = qcowpy("convert", "-p", "-O", "qcow2", "top.qcow2", "p.qcow2", cwd=src)
    assert r.code == 0
    steps = r.out.split("\r")
    assert steps[0] == "    (0.00/100%)" and steps[-2] == "    (100.00/100%)" and steps[-1] == "\n"
    values = [float(s.strip()[1:].split("/")[0]) for s in steps[:-1]]
    assert values == sorted(values) and len(values) > 3
    assert qcowpy("convert", "-p", "-q", "-O", "qcow2", "top.qcow2", "p2.qcow2", cwd=src).out == ""


def test_progress_min_skip():
    import io
    s = io.StringIO()
    p = Progress(True, 2.0, s)
    for v in (0, 1, 2.5, 3, 50, 100):
        p.set(v)
    p.end()
    assert s.getvalue() == "    (0.00/100%)\r    (2.50/100%)\r    (50.00/100%)\r    (100.00/100%)\r\n"


@pytest.fixture(scope="module")
def pair(src, qemu_img):
    d = src

    def img(*args):
        assert qemu(qemu_img, *args, cwd=d).code == 0

    img("convert", "-O", "raw", "top.qcow2", "same.raw")
    img("create", "-q", "-f", "qcow2", "diff.qcow2", "40M")
    img("convert", "-n", "-O", "qcow2", "top.qcow2", "diff.qcow2")
    qemu_io(qemu_img, d / "diff.qcow2", "write -P 1 21M 3")
    img("create", "-q", "-f", "qcow2", "big.qcow2", "48M")
    img("convert", "-n", "-O", "qcow2", "top.qcow2", "big.qcow2")
    img("create", "-q", "-f", "qcow2", "bigdirty.qcow2", "48M")
    img("convert", "-n", "-O", "qcow2", "top.qcow2", "bigdirty.qcow2")
    qemu_io(qemu_img, d / "bigdirty.qcow2", "write -P 1 45M 512")
    img("create", "-q", "-f", "qcow2", "zeros.qcow2", "40M")
    qemu_io(qemu_img, d / "zeros.qcow2", "write -z 0 40M")
    img("create", "-q", "-f", "qcow2", "empty.qcow2", "40M")
    return d


COMPARES = [
    ["top.qcow2", "same.raw"], ["-F", "raw", "top.qcow2", "same.raw"], ["top.qcow2", "diff.qcow2"],
    ["diff.qcow2", "top.qcow2"], ["top.qcow2", "big.qcow2"], ["big.qcow2", "top.qcow2"],
    ["top.qcow2", "bigdirty.qcow2"], ["-s", "top.qcow2", "big.qcow2"], ["zeros.qcow2", "empty.qcow2"],
    ["-s", "zeros.qcow2", "empty.qcow2"], ["empty.qcow2", "top.qcow2"], ["top.qcow2", "empty.qcow2"],
    ["-q", "top.qcow2", "diff.qcow2"], ["top.qcow2", "missing"], ["top.qcow2"], ["-f", "raw", "top.qcow2", "top.qcow2"],
    ["-T", "bogus", "top.qcow2", "top.qcow2"],
]


@pytest.mark.parametrize("args", COMPARES, ids=lambda a: " ".join(a))
def test_compare_matches(pair, qemu_img, args):
    want = qemu(qemu_img, "compare", *args, cwd=pair)
    got = qcowpy("compare", *args, cwd=pair)
    assert (got.code, got.out, as_qemu(got.err)) == (want.code, want.out, want.err)


def test_coroutines_option_caps_the_codec_threads(src, qemu_img):
    """``-m N`` runs the (de)compression on at most N threads for that command only; the
    output does not depend on it."""
    from qcowpy import workers
    before = workers.workers()
    outs = []
    for m in ("1", "2", "16"):
        name = f"m{m}"
        got = qcowpy("convert", "-m", m, "-c", "-O", "qcow2", "top.qcow2", name, cwd=src)
        assert (got.code, got.err) == (0, "")
        assert workers.workers() == before
        outs.append((src / name).read_bytes())
        assert qemu(qemu_img, "compare", "top.qcow2", name, cwd=src).code == 0
        os.unlink(src / name)
    assert outs[0] == outs[1] == outs[2]
