"""``measure``: qemu-img 7.2's figures, output and messages for new images and for inputs."""
from __future__ import annotations

import pytest

from qcowpy.tools.measure import qcow2_prealloc_size

from .helpers import as_qemu, qcowpy as run, qemu, qemu_io

CASES = [
    "-O qcow2 --size 20G", "-O qcow2 --size 20G --output=json", "-O qcow2 m.qcow2",
    "-O qcow2 m.qcow2 --output=json", "m.qcow2", "-O raw --size 1000",
    "-O qcow2 -o cluster_size=4k,extended_l2=on,refcount_bits=1 m.qcow2",
    "-O qcow2 -o preallocation=full --size 1G", "-O qcow2 -o preallocation=metadata --size 3G",
    "-O qcow2 -o cluster_size=4k --size 1G", "-O qcow2 -o cluster_size=2M,refcount_bits=64 --size 7T",
    "-O qcow2 -o backing_file=x --size 1G", "-O qcow2 -o cluster_size=512 --size 100G",
    "-O raw -o preallocation=full --size 1G", "-O qcow2 mb.qcow2", "-O qcow2 -o backing_file=m.qcow2 mb.qcow2",
    "-O qcow2 m.raw", "-O qcow2 -f raw m.raw", "-O qcow2 bm.qcow2", "-O qcow2 bm.qcow2 --output=json",
    "-O qcow2 -o compat=0.10 bm.qcow2", "-O raw bm.qcow2",
    # errors
    "-O vmdk --size 1G", "-O qcow2 -o bogus=1 --size 1G", "-O raw -o bogus=1 --size 1G", "--size 1G m.qcow2",
    "-O qcow2 -o compat=v3 --size 1G", "-O qcow2 -o compat=0.10,refcount_bits=8 --size 1G",
    "-O qcow2 -o refcount_bits=3 --size 1G", "-O qcow2 -o cluster_size=3k --size 1G",
    "-O qcow2 -o cluster_size=1k,extended_l2=on --size 1G", "-O qcow2 -o preallocation=bogus --size 1G",
    "-O qcow2 --size 1000P", "", "-O qcow2 a b", "-O foo --size 1G", "-O qcow2 -f qcow2 --size 1G",
    "-O qcow2 --size abc", "--output=xml --size 1G",
]


@pytest.fixture(scope="module")
def images(tmp_path_factory, qemu_img):
    d = tmp_path_factory.mktemp("measure")
    qemu(qemu_img, "create", "-q", "-f", "qcow2", "m.qcow2", "1G", cwd=d)
    qemu_io(qemu_img, d / "m.qcow2", "write 0 10M", "write -z 20M 1M", "write -c 30M 64k", "write 100M 1k")
    qemu(qemu_img, "create", "-q", "-f", "qcow2", "-b", "m.qcow2", "-F", "qcow2", "mb.qcow2", cwd=d)
    qemu_io(qemu_img, d / "mb.qcow2", "write 200M 3M")
    qemu(qemu_img, "convert", "-O", "raw", "m.qcow2", "m.raw", cwd=d)
    qemu(qemu_img, "convert", "-O", "qcow2", "m.qcow2", "bm.qcow2", cwd=d)
    qemu(qemu_img, "bitmap", "--add", "bm.qcow2", "b0", cwd=d)
    qemu(qemu_img, "bitmap", "--add", "-g", "4k", "bm.qcow2", "longername1234", cwd=d)
    return d


@pytest.mark.parametrize("args", CASES, ids=lambda a: a or "no-args")
def test_measure_matches_qemu_img(images, qemu_img, args):
    want = qemu(qemu_img, "measure", *args.split(), cwd=images)
    got = run("measure", *args.split(), cwd=images)
    assert (got.code, got.out, as_qemu(got.err)) == (want.code, want.out, want.err)


@pytest.mark.parametrize("opts,size", [([], "1G"), (["-o", "cluster_size=4k,refcount_bits=1"], "64M"),
                                       (["-o", "extended_l2=on"], "3G")])
def test_fully_allocated_size_is_a_full_preallocation(tmp_path, qemu_img, opts, size):
    """The formula against a real image: qemu-img's preallocation=full file has exactly that size."""
    p = tmp_path / "full.qcow2"
    assert qemu(qemu_img, "create", "-q", "-f", "qcow2", "-o", "preallocation=full", *opts, p, size).code == 0
    got = run("measure", "-O", "qcow2", "-o", "preallocation=full", *opts, "--size", size)
    assert got.out.splitlines()[1] == f"fully allocated size: {p.stat().st_size}"
    cs = 4096 if opts and "cluster_size=4k" in opts[1] else 65536
    order = 0 if opts and "refcount_bits=1" in opts[1] else 4
    assert qcow2_prealloc_size(int(size[:-1]) << {"M": 20, "G": 30}[size[-1]], cs, order,
                               bool(opts) and "extended_l2" in opts[1]) == p.stat().st_size


@pytest.mark.parametrize("param", ["s1", "snapshot.name=s1", "snapshot.id=1", "nope", "snapshot.id=9",
                                   "snapshot.bogus=1", "1"])
def test_measure_internal_snapshot_like_qemu_img(tmp_path, qemu_img, param):
    """``measure -l``: the input as the snapshot sees it (QEMU's bdrv_snapshot_load_tmp), with
    qemu-img's messages when the snapshot or the parameter is wrong."""
    img = tmp_path / "m.qcow2"
    assert qemu(qemu_img, "create", "-q", "-f", "qcow2", img, "64M").code == 0
    qemu_io(qemu_img, img, "write -P 1 0 8M")
    assert qemu(qemu_img, "snapshot", "-c", "s1", img).code == 0
    qemu_io(qemu_img, img, "write -P 2 16M 16M")
    for out_fmt in ("qcow2", "raw"):
        args = ["measure", "-O", out_fmt, "--output=json", "-l", param, str(img)]
        want, got = qemu(qemu_img, *args), run(*args)
        assert (got.code, got.out, as_qemu(got.err)) == (want.code, want.out, want.err)
