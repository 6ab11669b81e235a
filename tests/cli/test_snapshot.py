"""``snapshot``: internal snapshots created, applied and deleted as qemu-img 7.2 does them.

Each scenario starts from one qemu-io-written image copied twice; every step runs on one copy with
qemu-img and on the other with qcowpy (guest writes in between go to both with qemu-io). After
each step both tools must have said the same, the two files must be the same disk to qemu-img
(size, contents, every snapshot's listing and contents: helpers.assert_same_disks), ``qemu-img
check`` must find nothing at all in ours, and ``qcowpy snapshot -l`` must list what qemu-img lists
on the same file. The files' layouts differ on purpose: our snapshot operations switch all their
metadata with one header write (qcow2/txn.py), so a crash never leaves corruption; QEMU's do not.
"""
from __future__ import annotations

import shutil

import pytest

from .helpers import as_qemu, assert_same_disks, image_pair, qcowpy as run, qemu, qemu_io

# (create options, size, initial writes, steps); a step is "io:<qemu-io command>" for both files,
# or qemu-img snapshot arguments
SCENARIOS = [
    ([], "1G", ["write -P 1 0 1M", "write -P 2 500M 64k"],
     ["-c s1", "io:write -P 3 0 64k", "io:write -P 4 700M 128k", "-c s2", "io:discard 500M 64k",
      "-a s1", "io:write -P 5 64k 64k", "-d s2", "-c s3", "-a 1", "-d s1", "-d s3"]),
    (["-o", "cluster_size=4k,refcount_bits=4"], "64M", ["write -P 1 0 3M", "write -c -P 2 8M 4k"],
     ["-c a", "io:write -P 3 1M 8k", "-c b", "-a a", "-d a", "-a b", "-d b"]),
    (["-o", "extended_l2=on"], "256M", ["write -P 1 0 1M", "write -P 2 100M 4k"],
     ["-c x", "io:write -P 3 100M 8k", "io:write -z 0 64k", "-a x", "-d x"]),
    (["-o", "compat=0.10"], "128M", ["write -P 1 0 1M", "write -z 2M 1M"],
     ["-c v2", "io:write -P 9 0 4k", "-c v2b", "-d v2", "-a v2b", "-d v2b"]),
    (["-o", "cluster_size=512,refcount_bits=64"], "8M", ["write -P 1 0 512k"],
     ["-c s", "io:write -P 2 0 4k", "-a s", "-d s"]),
]


@pytest.mark.parametrize("opts,size,writes,steps", SCENARIOS, ids=[" ".join(o) or "default" for o, *_ in SCENARIOS])
def test_snapshots_leave_qemu_img_bytes(tmp_path, qemu_img, opts, size, writes, steps):
    a, b = image_pair(tmp_path, qemu_img, opts, size, writes)
    for step in steps:
        if step.startswith("io:"):
            for p in (a, b):
                qemu_io(qemu_img, p, step[3:])
            continue
        flag, name = step.split()
        want = qemu(qemu_img, "snapshot", flag, name, a)
        got = run("snapshot", flag, name, b)
        assert (got.code, got.out, as_qemu(got.err)) == (want.code, want.out, want.err), step
        assert_same_disks(qemu_img, a, b, step)
        listing = qemu(qemu_img, "snapshot", "-l", b)
        assert run("snapshot", "-l", b).out == listing.out
    compare = qemu(qemu_img, "compare", a, b)
    assert compare.code == 0, compare.out + compare.err


def test_apply_brings_back_size_and_data(tmp_path, qemu_img):
    a, b = image_pair(tmp_path, qemu_img, [], "1G", ["write -P 1 0 1M", "write -P 2 900M 64k"])
    for p in (a, b):
        assert qemu(qemu_img, "snapshot", "-c", "before", p).code == 0
        assert qemu(qemu_img, "resize", "--shrink", p, "512M").code == 0
        qemu_io(qemu_img, p, "write -P 3 0 64k")
    want, got = qemu(qemu_img, "snapshot", "-a", "before", a), run("snapshot", "-a", "before", b)
    assert (got.code, got.err) == (want.code, want.err) == (0, "")
    assert_same_disks(qemu_img, a, b, "apply")
    qemu_io(qemu_img, b, "read -P 1 0 1M", "read -P 2 900M 64k")


ERRORS = [["-a", "nope"], ["-d", "nope"], ["-d", "1"], ["-l", "-c", "x"], ["-a", "a", "-d", "b"]]


@pytest.mark.parametrize("args", ERRORS, ids=" ".join)
def test_snapshot_messages_match(tmp_path, qemu_img, args):
    a, b = image_pair(tmp_path, qemu_img, [], "16M", ["write 0 64k"])
    for p in (a, b):
        assert qemu(qemu_img, "snapshot", "-c", "s", p).code == 0
    shutil.copy(a, b)
    want, got = qemu(qemu_img, "snapshot", *args, a), run("snapshot", *args, b)
    assert (got.code, got.out, as_qemu(got.err)) == (want.code, want.out, want.err)
    assert a.read_bytes() == b.read_bytes()


def test_refcount_overflow_fails_like_qemu(tmp_path, qemu_img):
    """refcount_bits=1 cannot count a second reference: both fail alike; QEMU leaves a leak
    behind, we find the overflow before writing anything and leave the file as it was."""
    a, b = image_pair(tmp_path, qemu_img, ["-o", "refcount_bits=1"], "16M", ["write 0 64k"])
    before = b.read_bytes()
    want, got = qemu(qemu_img, "snapshot", "-c", "s", a), run("snapshot", "-c", "s", b)
    assert (got.code, as_qemu(got.err)) == (want.code, want.err) == (1, want.err)
    assert "-22 (Invalid argument)" in got.err
    assert b.read_bytes() == before
    assert qemu(qemu_img, "check", b).code == 0


def test_list_and_noop(tmp_path, qemu_img):
    a, b = image_pair(tmp_path, qemu_img, [], "16M", [])
    assert run("snapshot", "-l", b).out == "" and run("snapshot", b).code == 0
    assert a.read_bytes() == b.read_bytes()


@pytest.mark.parametrize("args", [["-c", "s"], ["-a", "s"], ["-d", "s"], ["-l"]], ids=" ".join)
def test_raw_images_have_no_snapshots(tmp_path, qemu_img, args):
    """A probed raw file: qemu-img's warning (twice for -a, which reopens it) and its refusal."""
    for side in ("a", "b"):
        (tmp_path / side).mkdir()
        (tmp_path / side / "disk.img").write_bytes(bytes(1 << 20))
    want = qemu(qemu_img, "snapshot", *args, "disk.img", cwd=tmp_path / "a")
    got = run("snapshot", *args, "disk.img", cwd=tmp_path / "b")
    assert (got.code, got.out, as_qemu(got.err)) == (want.code, want.out, want.err)
