"""``convert -S 0``: qemu-img writes every range, zeros included, as data (``-c``: every cluster
compressed), so the target is fully allocated. Both tools convert the same sources; the targets
must map alike (qemu-img map), read alike (qemu-img compare), check clean and be the same file."""
from __future__ import annotations

import json

import pytest

from .helpers import qcowpy, qemu, qemu_io

SIZE = "4M"
WRITES = ["write -P 1 0 64k", "write -z 1M 128k", "write -P 0 2M 64k", "write -P 3 3M 1k"]


def _map(qemu_img, path) -> list[dict]:
    rows = json.loads(qemu(qemu_img, "map", "--output=json", path).out)
    return [{k: v for k, v in r.items() if k != "offset"} for r in rows]


@pytest.mark.parametrize("args", [
    ["-O", "qcow2"], ["-O", "qcow2", "-o", "compat=0.10"], ["-O", "qcow2", "-c"], ["-O", "qcow2", "-c", "-o", "cluster_size=4k"],
    ["-O", "raw"], ["-O", "qcow2", "-o", "cluster_size=512"],
], ids=lambda a: " ".join(a))
@pytest.mark.parametrize("chain", [False, True], ids=["standalone", "with-backing"])
def test_sparse_zero_fully_allocates_as_qemu_img(tmp_path, qemu_img, args, chain, deflate_as_qemu):
    src = tmp_path / "src.qcow2"
    if chain:
        base = tmp_path / "base.qcow2"
        assert qemu(qemu_img, "create", "-q", "-f", "qcow2", base, SIZE).code == 0
        qemu_io(qemu_img, base, "write -P 0x11 0 2M")
        assert qemu(qemu_img, "create", "-q", "-f", "qcow2", "-b", base, "-F", "qcow2", src).code == 0
    else:
        assert qemu(qemu_img, "create", "-q", "-f", "qcow2", src, SIZE).code == 0
    qemu_io(qemu_img, src, *WRITES)
    theirs, ours = tmp_path / "theirs.img", tmp_path / "ours.img"
    want = qemu(qemu_img, "convert", "-S", "0", *args, src, theirs)
    got = qcowpy("convert", "-S", "0", *args, src, ours)
    assert (got.code, got.out, got.err) == (want.code, want.out, want.err) == (0, "", "")
    assert _map(qemu_img, ours) == _map(qemu_img, theirs)
    assert all(r["data"] for r in _map(qemu_img, ours))
    assert qemu(qemu_img, "compare", theirs, ours).code == 0
    if "raw" not in args:
        assert qemu(qemu_img, "check", ours).code == 0
    assert ours.read_bytes() == theirs.read_bytes()  # the same file, layout included


def test_sparse_zero_into_existing_target(tmp_path, qemu_img):
    src = tmp_path / "src.qcow2"
    assert qemu(qemu_img, "create", "-q", "-f", "qcow2", src, SIZE).code == 0
    qemu_io(qemu_img, src, *WRITES)
    for name, tool in (("theirs", lambda *a: qemu(qemu_img, *a)), ("ours", qcowpy)):
        target = tmp_path / f"{name}.qcow2"
        assert qemu(qemu_img, "create", "-q", "-f", "qcow2", target, SIZE).code == 0
        qemu_io(qemu_img, target, "write -P 9 0 4M")
        assert tool("convert", "-n", "-S", "0", "-O", "qcow2", src, target).code == 0
    assert _map(qemu_img, tmp_path / "ours.qcow2") == _map(qemu_img, tmp_path / "theirs.qcow2")
    assert qemu(qemu_img, "compare", tmp_path / "theirs.qcow2", tmp_path / "ours.qcow2").code == 0
