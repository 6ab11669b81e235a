"""qcowpy's commands on images with persistent bitmaps, side by side with qemu-img 7.2.

Each case runs one command line with qemu-img on one copy of an image and with qcowpy on
another: the messages and exit code must be qemu-img's, and afterwards QEMU must see the same
bitmaps (``qemu-img info``) with the same dirty ranges (``qemu-nbd -B`` + ``nbdinfo --map``),
and ``qemu-img check`` must find qcowpy's copy clean.
"""
from __future__ import annotations

import json
import re
import shutil
import struct

import pytest

from tests.cli.helpers import as_qemu, qcowpy as run

from . import oracle as Q

MiB = 1 << 20


@pytest.fixture(scope="module")
def images(tmp_path_factory):
    d = tmp_path_factory.mktemp("bm")
    base = d / "base.qcow2"
    assert Q.img("create", "-q", "-f", "qcow2", base, "64M").returncode == 0
    for args in (["z"], ["a"], ["m"], ["-g", "4k", "--disable", "y"]):
        assert Q.img("bitmap", "--add", *args[:-1], base, args[-1]).returncode == 0
    Q.io(base, "write -P 1 0 100k", "write -P 2 3M 1M")
    assert Q.img("bitmap", "--enable", base, "y").returncode == 0
    Q.io(base, "write -P 3 20M 5k")
    assert Q.img("bitmap", "--disable", base, "y").returncode == 0
    inuse = d / "inuse.qcow2"
    shutil.copy(base, inuse)
    _set_in_use(inuse, "z")
    other = d / "other.qcow2"
    assert Q.img("create", "-q", "-f", "qcow2", other, "32M").returncode == 0
    assert Q.img("bitmap", "--add", other, "x").returncode == 0
    v2 = d / "v2.qcow2"
    assert Q.img("create", "-q", "-f", "qcow2", "-o", "compat=0.10", v2, "64M").returncode == 0
    raw = d / "r.raw"
    assert Q.img("create", "-q", "-f", "raw", raw, "64M").returncode == 0
    return {"base": base, "inuse": inuse, "other": other, "v2": v2, "raw": raw}


def _set_in_use(path, name: str) -> None:
    """Flag one bitmap in_use in the directory, as a QEMU that crashed while open leaves it."""
    data = bytearray(path.read_bytes())
    off = (struct.unpack_from(">I", data, 100)[0] + 7) & ~7
    while True:
        etype, elen = struct.unpack_from(">II", data, off)
        assert etype, "no bitmaps extension"
        if etype == 0x23852875:
            _, _, dsize, doff = struct.unpack_from(">IIQQ", data, off + 8)
            break
        off += 8 + ((elen + 7) & ~7)
    pos = doff
    while pos < doff + dsize:
        nsize, extra = struct.unpack_from(">HI", data, pos + 18)
        if data[pos + 24 + extra:pos + 24 + extra + nsize] == name.encode():
            struct.pack_into(">I", data, pos + 12, struct.unpack_from(">I", data, pos + 12)[0] | 1)
        pos = (pos + 24 + nsize + extra + 7) & ~7
    path.write_bytes(bytes(data))


def _norm(text: str, name: str) -> str:
    return re.sub(r"#block\d+", "#blockN", as_qemu(text).replace(name, "IMG"))


def _same_bitmaps(a, b) -> None:
    """QEMU sees the same bitmaps, flags and dirty ranges in both images."""
    ia, ib = Q.bitmaps(a), Q.bitmaps(b)
    assert ia == ib
    for bm in ia:
        if "in-use" not in bm["flags"]:
            assert Q.dirty_map(a, bm["name"]) == Q.dirty_map(b, bm["name"]), bm["name"]


def _side_by_side(tmp_path, image, args: list[str], check: bool = True):
    theirs, mine = tmp_path / "q.qcow2", tmp_path / "p.qcow2"
    shutil.copy(image, theirs)
    shutil.copy(image, mine)
    want = Q.img(*[theirs if a == "IMG" else a for a in args])
    got = run(*[mine if a == "IMG" else a for a in args])
    assert (got.code, _norm(got.err, str(mine))) == (want.returncode, _norm(want.stderr, str(theirs))), args
    assert got.out.replace(str(mine), "IMG") == want.stdout.replace(str(theirs), "IMG")
    _same_bitmaps(theirs, mine)
    if check:
        Q.assert_clean(mine)
    return theirs, mine


BITMAP_CASES = [
    ["--add", "IMG", "new"], ["--add", "IMG", "z"], ["--add", "-g", "256", "IMG", "q"],
    ["--add", "-g", "4G", "IMG", "q"], ["--add", "-g", "1G", "IMG", "q"], ["--add", "-g", "512", "IMG", "q"],
    ["--add", "--disable", "IMG", "q"], ["--clear", "IMG", "nope"], ["IMG", "nope"], ["--add", "IMG"],
    ["-g", "512", "--clear", "IMG", "z"], ["-F", "qcow2", "--clear", "IMG", "z"], ["-b", "x", "--clear", "IMG", "z"],
    ["--add", "IMG", ""], ["--add", "--add", "IMG", "dup"], ["--add", "--clear", "--disable", "--remove", "--add", "IMG", "s"],
    ["--remove", "IMG", "z"], ["--remove", "--remove", "IMG", "z"], ["--clear", "IMG", "z"], ["--enable", "IMG", "y"],
    ["--disable", "IMG", "z"], ["--merge", "y", "IMG", "z"], ["--merge", "z", "IMG", "y"],
    ["--merge", "z", "--merge", "y", "--clear", "IMG", "a"], ["--remove", "--add", "-g", "8k", "IMG", "m"],
    ["--add", "IMG", "x" * 1023], ["--add", "IMG", "x" * 1024], ["--foo", "IMG", "y"], ["--merge"],
    ["-f", "qcow2", "--image-opts", "--add", "IMG", "n"], ["--object", "secret,id=s0,data=x", "--add", "IMG", "n"],
]


@pytest.mark.parametrize("args", BITMAP_CASES, ids=lambda a: " ".join(a)[:60])
def test_bitmap_command(tmp_path, images, args):
    _side_by_side(tmp_path, images["base"], ["bitmap", *args])


@pytest.mark.parametrize("args", [["--clear"], ["--enable"], ["--disable"], ["--remove"], ["--merge", "y"],
                                  ["--add"]], ids=" ".join)
def test_bitmap_command_on_inconsistent_bitmaps(tmp_path, images, args):
    _side_by_side(tmp_path, images["inuse"], ["bitmap", *args, "IMG", "z"])


def test_bitmap_command_merges_from_other_files(tmp_path, images):
    _side_by_side(tmp_path, images["base"], ["bitmap", "--merge", "z", "-b", images["base"], "IMG", "y"])
    _side_by_side(tmp_path, images["base"], ["bitmap", "--merge", "z", "-b", images["base"], "-F", "qcow2", "IMG", "a"])
    _side_by_side(tmp_path, images["base"], ["bitmap", "--merge", "x", "-b", images["other"], "IMG", "z"])
    _side_by_side(tmp_path, images["base"], ["bitmap", "--merge", "x", "-b", images["raw"], "IMG", "z"])


def test_bitmap_command_on_images_without_bitmap_support(tmp_path, images):
    _side_by_side(tmp_path, images["v2"], ["bitmap", "--add", "IMG", "x"])
    _side_by_side(tmp_path, images["raw"], ["bitmap", "--add", "-f", "raw", "IMG", "x"], check=False)


@pytest.mark.parametrize("args", [["+1M"], ["1G"], ["--shrink", "10M"], ["--shrink", "63M"], ["65M"]], ids=" ".join)
def test_resize_keeps_bitmaps(tmp_path, images, args):
    _side_by_side(tmp_path, images["base"], ["resize", *args[:-1], "IMG", args[-1]])


def test_resize_refuses_inconsistent_bitmaps(tmp_path, images):
    _side_by_side(tmp_path, images["inuse"], ["resize", "IMG", "+1M"])


CONVERT_CASES = [
    (["--bitmaps", "-O", "qcow2"], "base"), (["--bitmaps", "-O", "raw"], "base"), (["--bitmaps", "-O", "qcow2"], "inuse"),
    (["--bitmaps", "--skip-broken-bitmaps", "-O", "qcow2"], "inuse"), (["--skip-broken-bitmaps", "-O", "qcow2"], "inuse"),
    (["--bitmaps", "-O", "qcow2", "-o", "compat=0.10"], "base"),
    (["--bitmaps", "-c", "-O", "qcow2", "-o", "cluster_size=4k"], "base"), (["--bitmaps", "-O", "qcow2"], "raw"),
    (["--bitmaps", "-f", "raw", "-O", "qcow2"], "raw"), (["-O", "qcow2"], "base"),
]


@pytest.mark.parametrize("args,src", CONVERT_CASES, ids=lambda v: " ".join(v) if isinstance(v, list) else v)
def test_convert_bitmaps(tmp_path, images, args, src):
    theirs, mine = tmp_path / "q.out", tmp_path / "p.out"
    want = Q.img("convert", *args, images[src], theirs)
    got = run("convert", *args, images[src], mine)
    assert (got.code, as_qemu(got.err).replace(str(mine), "OUT")) == \
        (want.returncode, want.stderr.replace(str(theirs), "OUT"))
    assert theirs.exists() == mine.exists()
    if mine.exists() and "raw" not in args:
        _same_bitmaps(theirs, mine)
        Q.assert_clean(mine)


def test_convert_n_marks_the_targets_bitmaps(tmp_path, images):
    """convert -n writes into an existing image: its enabled bitmaps see every range written."""
    target = tmp_path / "t.qcow2"
    assert Q.img("create", "-q", "-f", "qcow2", target, "64M").returncode == 0
    assert Q.img("bitmap", "--add", "-g", "512", target, "t").returncode == 0
    Q.io(target, "write -P 9 10M 3M")
    src = tmp_path / "s.qcow2"
    assert Q.img("create", "-q", "-f", "qcow2", src, "64M").returncode == 0
    Q.io(src, "write -P 1 1M 64k", "write -P 2 30M 100k")
    theirs, mine = tmp_path / "q.qcow2", tmp_path / "p.qcow2"
    shutil.copy(target, theirs)
    shutil.copy(target, mine)
    assert Q.img("convert", "-n", "-O", "qcow2", src, theirs).returncode == 0
    assert run("convert", "-n", "-O", "qcow2", src, mine).code == 0
    assert Q.bitmaps(mine) == Q.bitmaps(theirs)
    got = Q.dirty_map(mine, "t")
    # every range convert -n wrote is dirty: at least the data and the stale range it zeroed
    for off, n in [(1 * MiB, 64 << 10), (30 * MiB, 100 << 10), (10 * MiB, 3 * MiB)]:
        assert any(a <= off and off + n <= a + m for a, m in got), (off, got)
    Q.assert_clean(mine)


def test_commit_rebase_and_snapshots_with_bitmaps(tmp_path, images):
    """commit marks the base's bitmaps for what it writes (the top is emptied without marks),
    rebase marks the overlay for what it copies, snapshot operations leave bitmaps as they are."""
    base = tmp_path / "base.qcow2"
    top = tmp_path / "top.qcow2"
    assert Q.img("create", "-q", "-f", "qcow2", base, "16M").returncode == 0
    assert Q.img("bitmap", "--add", "-g", "4k", base, "bb").returncode == 0
    Q.io(base, "write -P 1 0 1M")
    assert Q.img("create", "-q", "-f", "qcow2", "-b", base, "-F", "qcow2", top).returncode == 0
    assert Q.img("bitmap", "--add", "-g", "4k", top, "tb").returncode == 0
    Q.io(top, "write -P 2 512k 100k", "write -P 3 5M 8k")
    for cmd in (["commit", "IMG"], ["commit", "-d", "IMG"], ["rebase", "-b", "", "IMG"],
                ["snapshot", "-c", "s1", "IMG"], ["snapshot", "-l", "IMG"]):
        d = tmp_path / "_".join(cmd).replace("-", "")
        d.mkdir()
        shutil.copy(base, d / "base.qcow2")
        shutil.copy(top, d / "top.qcow2")
        (d / "q").mkdir()
        (d / "p").mkdir()
        for side in ("q", "p"):
            shutil.copy(d / "base.qcow2", d / side / "base.qcow2")
            shutil.copy(d / "top.qcow2", d / side / "top.qcow2")
            Q.img("rebase", "-u", "-b", "base.qcow2", "-F", "qcow2", d / side / "top.qcow2")
        want = Q.img(*[d / "q" / "top.qcow2" if a == "IMG" else a for a in cmd])
        got = run(*[d / "p" / "top.qcow2" if a == "IMG" else a for a in cmd])
        assert got.code == want.returncode, (cmd, got.err, want.stderr)
        if cmd[1] != "-l":
            assert got.out == want.stdout
        for name in ("base.qcow2", "top.qcow2"):
            _same_bitmaps(d / "q" / name, d / "p" / name)
            Q.assert_clean(d / "p" / name)


def test_measure_counts_bitmaps(tmp_path, images):
    for src in ("base", "inuse", "v2", "raw"):
        for out_fmt in ("qcow2", "raw"):
            want = Q.img("measure", "--output=json", "-O", out_fmt, images[src])
            got = run("measure", "--output=json", "-O", out_fmt, images[src])
            assert (got.code, json.loads(got.out)) == (want.returncode, json.loads(want.stdout)), (src, out_fmt)


def test_info_lists_bitmaps_like_qemu_img(images):
    for name in ("base", "inuse", "v2"):
        for output in ("human", "json"):
            want = Q.img("info", f"--output={output}", images[name])
            got = run("info", f"--output={output}", images[name])
            assert got.code == want.returncode == 0
            assert re.sub(r"disk size: .*|\"actual-size\": \d+", "", got.out) == \
                re.sub(r"disk size: .*|\"actual-size\": \d+", "", want.stdout)


@pytest.mark.parametrize("args", [["-a", "s1"], ["-a", "nope"], ["-d", "s1"], ["-c", "s2"]], ids=" ".join)
def test_snapshot_operations_with_bitmaps(tmp_path, args):
    """qemu-img refuses to apply a snapshot while the image has bitmaps (block/snapshot.c:
    "Device has active dirty bitmaps"); creating and deleting leave the bitmaps as they are."""
    img = tmp_path / "s.qcow2"
    assert Q.img("create", "-q", "-f", "qcow2", img, "16M").returncode == 0
    assert Q.img("bitmap", "--add", "-g", "4k", img, "b").returncode == 0
    Q.io(img, "write 0 64k")
    assert Q.img("snapshot", "-c", "s1", img).returncode == 0
    Q.io(img, "write 1M 64k")
    (tmp_path / "w").mkdir()
    _side_by_side(tmp_path / "w", img, ["snapshot", *args, "IMG"])


@pytest.mark.parametrize("target", ["same-name", "bigger"])
def test_convert_bitmaps_into_existing_targets(tmp_path, images, target):
    """convert -n --bitmaps: a bitmap the target already has, or a target of another size, fails
    as in qemu-img (Failed to create / Failed to populate, the half-made bitmap removed)."""
    src = tmp_path / "t.qcow2"
    assert Q.img("create", "-q", "-f", "qcow2", src, "64M" if target == "same-name" else "128M").returncode == 0
    if target == "same-name":
        assert Q.img("bitmap", "--add", src, "z").returncode == 0
    _side_by_side(tmp_path, src, ["convert", "-n", "--bitmaps", "-O", "qcow2", images["base"], "IMG"])


def test_resize_over_a_longer_backing_file_sets_no_bits(tmp_path):
    """Growing an overlay whose backing file is longer zeroes the new area inside the driver
    (QEMU's BDRV_REQ_ZERO_WRITE truncate): bitmaps get no dirty bits for it, as in QEMU."""
    base, top = tmp_path / "base.qcow2", tmp_path / "top.qcow2"
    assert Q.img("create", "-q", "-f", "qcow2", base, "32M").returncode == 0
    Q.io(base, "write -P 1 0 32M")
    assert Q.img("create", "-q", "-f", "qcow2", "-b", base, "-F", "qcow2", top, "8M").returncode == 0
    assert Q.img("bitmap", "--add", "-g", "4k", top, "b").returncode == 0
    Q.io(top, "write 1M 4k")
    (tmp_path / "w").mkdir()
    theirs, mine = _side_by_side(tmp_path / "w", top, ["resize", "IMG", "16M"])
    assert Q.dirty_map(mine, "b") == [(1 << 20, 4096)]
