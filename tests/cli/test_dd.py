"""``dd``: the output file qemu-img 7.2 writes (raw or qcow2), with its messages and exit codes."""
from __future__ import annotations

import random

import pytest

from .helpers import as_qemu, qcowpy as run, qemu, qemu_io

CASES = [
    "if=in.qcow2 of=OUT", "if=in.qcow2 of=OUT bs=1M", "-O qcow2 if=in.qcow2 of=OUT",
    "-O qcow2 if=in.qcow2 of=OUT bs=64k count=20 skip=3", "-O qcow2 if=in.raw of=OUT bs=4k",
    "if=in.raw of=OUT bs=1000 count=7 skip=2", "-f raw if=in.raw of=OUT bs=1M skip=5",
    "-O qcow2 if=in.qcow2 of=OUT bs=3M skip=4", "if=in.raw of=OUT bs=512 count=3", "if=in.raw of=OUT bs=1M skip=50",
    # errors
    "if=in.qcow2 of=OUT bs=0", "if=in.qcow2 of=OUT bs=abc", "if=in.qcow2 of=OUT count=-1",
    "if=in.qcow2 of=OUT foo=1", "if=in.qcow2 of=OUT junk", "if=in.qcow2", "of=OUT", "if=nope.qcow2 of=OUT",
    "-O foo if=in.qcow2 of=OUT",
]


@pytest.fixture(scope="module")
def inputs(tmp_path_factory, qemu_img):
    d = tmp_path_factory.mktemp("dd")
    qemu(qemu_img, "create", "-q", "-f", "qcow2", "in.qcow2", "8M", cwd=d)
    qemu_io(qemu_img, d / "in.qcow2", "write -P 1 0 1M", "write -P 2 3M 100k", "write -z 5M 1M")
    (d / "in.raw").write_bytes(random.Random(3).randbytes(3_000_000))
    return d


@pytest.mark.parametrize("args", CASES)
def test_dd_matches_qemu_img(inputs, qemu_img, args):
    want = qemu(qemu_img, "dd", *args.replace("OUT", "a.out").split(), cwd=inputs)
    got = run("dd", *args.replace("OUT", "b.out").split(), cwd=inputs)
    assert (got.code, got.out, as_qemu(got.err).replace("b.out", "a.out")) == (want.code, want.out, want.err)
    a, b = inputs / "a.out", inputs / "b.out"
    assert a.exists() == b.exists()
    if a.exists():
        assert a.read_bytes() == b.read_bytes()
        a.unlink()
        b.unlink()
