"""``resize``: qemu-img's messages and exit codes, and the very bytes qemu-img leaves behind.

Each scenario builds one image with qemu-img/qemu-io, copies it, resizes one copy with qemu-img
and the other with qcowpy, and requires identical files: L1 growth, QEMU's full discard of the
cropped clusters (L2 tables allocated or copied on the way, then freed), the L1 entries past the
end zeroed, unused refcount blocks dropped, freed clusters punched, the file cut after the last
cluster in use. Then ``qemu-img check`` must be clean.
"""
from __future__ import annotations

import filecmp
import shutil
import subprocess

import pytest

from .helpers import as_qemu, image_pair, qcowpy as run, qemu, qemu_io

# (create options, size, qemu-io writes, resize steps)
SCENARIOS = [
    ([], "1G", [], ["+1.5k", "--shrink 512M", "1G", "+0", "--shrink -512k", "5G", "--shrink 3000M",
                    "--preallocation=metadata 4G", "--shrink 100M", "--preallocation=metadata +1G",
                    "--shrink 1536k"]),
    ([], "2G", ["write -P 7 0 64k", "write -P 8 1500M 1M", "write -P 9 900M 64k"], ["--shrink 1600M"]),
    ([], "4G", ["write -P 7 0 64k", "write -P 8 1500M 1M", "write -P 3 3G 2M"], ["--shrink 1G", "2G"]),
    (["-o", "cluster_size=512"], "64M", ["write -P 7 0 64k", "write -P 8 20M 1M", "write -P 9 9M 2M"],
     ["--shrink 10M", "+7M"]),
    (["-o", "refcount_bits=1,cluster_size=4k"], "64M", ["write -P 8 20M 1M", "write -P 9 9M 2M"],
     ["--shrink 10M"]),
    (["-o", "refcount_bits=64"], "4G", ["write -P 8 3G 1M", "write -c -P 9 900M 64k"], ["--shrink 1G"]),
    (["-o", "extended_l2=on"], "2G", ["write -P 8 1500M 1M", "write -P 9 1023M 1M", "write -P 1 1000M 4k"],
     ["--shrink 1G", "--preallocation=metadata 3G"]),
    (["-o", "compat=0.10"], "2G", ["write -P 8 1500M 1M", "write -P 9 1023M 1M"], ["--shrink 1G", "8G"]),
    (["-o", "cluster_size=4k"], "64M", ["write -P 8 2M 32M"], ["--shrink 1M"]),
    (["-o", "cluster_size=2M"], "8G", ["write -P 8 0 4M", "write -P 3 5G 4M", "write -z 2G 8M"], ["--shrink 3G"]),
]


def _resize_both(qemu_img, a, b, step: str):
    *opts, size = step.split()
    want = qemu(qemu_img, "resize", *opts, a, size)
    got = run("resize", *opts, b, size)
    assert (got.code, got.out, as_qemu(got.err)) == (want.code, want.out, want.err), step
    return got


@pytest.mark.parametrize("opts,size,writes,steps", SCENARIOS,
                         ids=[" ".join(o + [s, str(len(w)), steps[0]]) for o, s, w, steps in SCENARIOS])
def test_resize_leaves_qemu_img_bytes(tmp_path, qemu_img, opts, size, writes, steps):
    a, b = image_pair(tmp_path, qemu_img, opts, size, writes)
    for step in steps:
        assert _resize_both(qemu_img, a, b, step).code == 0
        assert filecmp.cmp(a, b, shallow=False), f"files differ after 'resize {step}'"
    check = qemu(qemu_img, "check", b)
    assert check.code == 0 and "No errors were found" in check.out, check.out + check.err


@pytest.mark.parametrize("compat", ["1.1", "0.10"])
def test_resize_with_internal_snapshot(tmp_path, qemu_img, compat):
    """v3: the shared tables are copied before their entries go (refcounts drop, the snapshot keeps
    its data); v2 with snapshots is refused, as QEMU refuses it."""
    a, b = image_pair(tmp_path, qemu_img, ["-o", f"compat={compat}"], "4G", ["write -P 1 0 1M", "write -P 2 3G 1M"])
    for p in (a, b):
        assert qemu(qemu_img, "snapshot", "-c", "s1", p).code == 0
    shutil.copy(a, b)  # one snapshot table, the same timestamps
    for p in (a, b):
        qemu_io(qemu_img, p, "write -P 3 3G 64k", "write -P 4 2G 64k", "write -P 5 0 64k")
    got = _resize_both(qemu_img, a, b, "--shrink 1G")
    assert (got.code == 0) == (compat == "1.1")
    assert filecmp.cmp(a, b, shallow=False)
    check = qemu(qemu_img, "check", b)
    assert check.code == 0, check.out + check.err
    if compat == "1.1":  # reverting to the snapshot brings back its size and its data
        c = tmp_path / "reverted.qcow2"
        shutil.copy(b, c)
        assert qemu(qemu_img, "snapshot", "-a", "s1", c).code == 0
        qemu_io(qemu_img, c, "read -P 2 3G 1M", "read -P 1 0 1M")


ERRORS = ["abc", "1000", "-2G", "0", "--preallocation=metadata 512M", "--preallocation=bogus 2G",
          "--shrink --preallocation=full 512M", "16E", "+9999999T", "1e3", "--shrink 1000", "+1000",
          "-1k", "-q --shrink -512k", "-f raw 2G"]


@pytest.mark.parametrize("step", ERRORS)
def test_resize_messages_match(tmp_path, qemu_img, step):
    a, b = image_pair(tmp_path, qemu_img, [], "1G", [])
    _resize_both(qemu_img, a, b, step)
    assert filecmp.cmp(a, b, shallow=False)


def test_resize_raw(tmp_path, qemu_img):
    a, b = tmp_path / "a.raw", tmp_path / "b.raw"
    a.write_bytes(b"\x11" * 1000)
    b.write_bytes(b"\x11" * 1000)
    for step in ("-f raw 3000", "-f raw --shrink 100", "-f raw --preallocation=falloc 8192",
                 "-f raw --preallocation=full 12000", "-f raw --preallocation=metadata 20000", "-f raw +1k",
                 "-f raw --shrink -1k"):
        _resize_both(qemu_img, a, b, step)
        assert a.read_bytes() == b.read_bytes(), step


def test_resize_probed_raw_warns_like_qemu(tmp_path, qemu_img):
    a, b = tmp_path / "a.img", tmp_path / "b.img"
    a.write_bytes(bytes(4096))
    b.write_bytes(bytes(4096))
    want, got = qemu(qemu_img, "resize", a, "8k"), run("resize", b, "8k")
    assert (got.code, got.out, as_qemu(got.err).replace(str(b), str(a))) == (want.code, want.out, want.err)
    assert "probing guessed raw" in got.err and a.read_bytes() == b.read_bytes()


# (overlay create options, overlay size, qemu-io writes to the overlay, resize steps): the backing
# file (1M of 0x11) reaches past the overlay's end, so growing must zero the new area.
BACKED = [
    (["-o", "compat=1.1"], "300k", [], ["900k", "+2M"]),
    (["-o", "compat=1.1"], "1M", ["write -P 0x22 0 1M"], ["--shrink 520k", "567k"]),  # iotest 292
    (["-o", "compat=1.1,extended_l2=on"], "300k", ["write -P 0x22 0 100k"], ["900k"]),
    (["-o", "compat=1.1,cluster_size=4k"], "10k", [], ["--preallocation=metadata 700k"]),
    (["-o", "compat=0.10"], "1M", ["write -P 0x22 0 1M"], ["--shrink 520k", "567k"]),
    (["-o", "compat=0.10"], "512k", [], ["1M"]),  # v2 has no zero clusters: QEMU refuses
]


@pytest.mark.parametrize("opts,size,writes,steps", BACKED, ids=[" ".join(o + [s] + st) for o, s, _, st in BACKED])
def test_grow_over_longer_backing_reads_zeros(tmp_path, qemu_img, opts, size, writes, steps):
    """QEMU's truncate zero-fills the new area when the backing file reaches past the old end;
    the grown tail must read zeros, not the backing file's bytes, and the files match qemu-img's."""
    import json
    base = tmp_path / "base.qcow2"
    assert qemu(qemu_img, "create", "-q", "-f", "qcow2", base, "1M").code == 0
    qemu_io(qemu_img, base, "write -P 0x11 0 1M")
    a, b = image_pair(tmp_path, qemu_img, opts + ["-F", "qcow2", "-b", str(base)], size, writes)
    low = int(json.loads(qemu(qemu_img, "info", "--output=json", b).out)["virtual-size"])
    for step in steps:
        _resize_both(qemu_img, a, b, step)
        assert filecmp.cmp(a, b, shallow=False), f"files differ after 'resize {step}'"
        size_now = int(json.loads(qemu(qemu_img, "info", "--output=json", b).out)["virtual-size"])
        low = min(low, size_now)
    tail = size_now - low
    if tail:  # everything past the smallest size the image had reads as zeros
        read = subprocess.run(["qemu-io", "-f", "qcow2", "-c", f"read -P 0 {low} {tail}", str(b)],
                              capture_output=True, text=True)
        assert "verification failed" not in read.stdout and read.returncode == 0, read.stdout
    check = qemu(qemu_img, "check", b)
    assert check.code == 0, check.out + check.err
