"""External data files (incompatible bit 2, extension 0x44415441, autoclear bit 1) against qemu-img.

Both directions: the files ``qcowpy create`` makes are byte-identical to qemu-img's (qcow2 file and
data file); what qcowpy writes through the API reads back through qemu-io and checks clean; what
qemu-io writes reads back through qcowpy, whose check and map agree with qemu-img's. Names of
data files are relative to the working directory, as QEMU opens them, so every test runs in its
own directory.
"""
from __future__ import annotations

import json
import os
import random

import pytest

import qcowpy
from tests.cli.helpers import as_qemu, qcowpy as run_qcowpy, qemu as run_qemu

pytestmark = pytest.mark.interop

MiB = 1 << 20


@pytest.fixture
def here(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    return tmp_path


def _files(d) -> dict[str, bytes]:
    return {n: (d / n).read_bytes() for n in sorted(os.listdir(d))}


@pytest.mark.parametrize("opts,size", [
    ("data_file=d.raw", "10M"),
    ("data_file=d.raw,data_file_raw=on", "10M"),
    ("data_file=d.raw,data_file_raw=on,cluster_size=4k", "3M"),
    ("data_file=d.raw,preallocation=metadata", "5M"),
    ("data_file=d.raw,preallocation=full", "3M"),
    ("data_file=d.raw,preallocation=falloc,cluster_size=512", "1M"),
    ("data_file=d.raw,lazy_refcounts=on,refcount_bits=1", "7M"),
    ("data_file=d.raw,extended_l2=on", "5M"),
    ("data_file=d.raw,extended_l2=on,data_file_raw=on", "3M"),
])
def test_create_is_byte_identical(qemu_img, tmp_path, opts, size):
    ours, theirs = tmp_path / "ours", tmp_path / "theirs"
    ours.mkdir()
    theirs.mkdir()
    a = run_qcowpy("create", "-f", "qcow2", "-o", opts, "a.qcow2", size, cwd=ours)
    b = run_qemu(qemu_img, "create", "-f", "qcow2", "-o", opts, "a.qcow2", size, cwd=theirs)
    assert (a.code, as_qemu(a.out), as_qemu(a.err)) == (b.code, b.out, b.err)
    assert _files(ours) == _files(theirs)


@pytest.mark.parametrize("opts,extra", [
    ("compat=0.10,data_file=x.raw", ()),
    ("data_file_raw=on", ()),
    ("data_file=g.raw,data_file_raw=on", ("-b", "base.qcow2", "-F", "qcow2")),
])
def test_create_refusals_match(qemu_img, tmp_path, opts, extra):
    for side in ("ours", "theirs"):
        (tmp_path / side).mkdir()
        run_qemu(qemu_img, "create", "-q", "-f", "qcow2", "base.qcow2", "1M", cwd=tmp_path / side)
    a = run_qcowpy("create", "-f", "qcow2", "-o", opts, *extra, "f.qcow2", "1M", cwd=tmp_path / "ours")
    b = run_qemu(qemu_img, "create", "-f", "qcow2", "-o", opts, *extra, "f.qcow2", "1M", cwd=tmp_path / "theirs")
    assert (a.code, as_qemu(a.out), as_qemu(a.err)) == (b.code, b.out, b.err)
    assert b.code == 1
    assert sorted(os.listdir(tmp_path / "ours")) == sorted(os.listdir(tmp_path / "theirs"))


def _random_ops(rng: random.Random, size: int, n: int):
    for _ in range(n):
        kind = rng.choice(["write", "write", "write", "zero", "zero_unmap", "discard"])
        off = rng.randrange(0, size - 1)
        length = rng.randint(1, min(size - off, 300_000))
        if kind != "write":
            off &= ~511
            length = max(512, length & ~511)
            length = min(length, size - off)
        yield kind, off, length, rng.randrange(1, 256)


def _apply_model(model: bytearray, kind: str, off: int, length: int, pat: int, cluster: int, size: int) -> None:
    if kind == "write":
        model[off:off + length] = bytes([pat]) * length
    elif kind in ("zero", "zero_unmap"):
        model[off:off + length] = bytes(length)
    else:  # discard: whole clusters read as zeros afterwards (v3), partial ones unchanged
        start = (off + cluster - 1) // cluster * cluster
        end = off + length if off + length == size else (off + length) // cluster * cluster
        if end > start:
            model[start:end] = bytes(end - start)


@pytest.mark.parametrize("ext", [False, True], ids=["std", "extl2"])
@pytest.mark.parametrize("raw", [False, True])
@pytest.mark.parametrize("seed", [1, 2])
def test_qcowpy_writes_qemu_reads(qemu, here, raw, seed, ext):
    size, cs = 4 * MiB, 65536
    opts = "data_file=d.raw" + (",data_file_raw=on" if raw else "") + (",extended_l2=on" if ext else "")
    assert run_qcowpy("create", "-q", "-f", "qcow2", "-o", opts, "a.qcow2", str(size)).code == 0
    rng = random.Random(seed)
    model = bytearray(size)
    with qcowpy.open("a.qcow2", "r+") as dev:
        for kind, off, length, pat in _random_ops(rng, size, 60):
            if kind == "write":
                dev.pwrite(bytes([pat]) * length, off)
            elif kind == "discard":
                dev.discard(length, off)
            else:
                dev.write_zeroes(length, off, unmap=kind == "zero_unmap")
            _apply_model(model, kind, off, length, pat, cs, size)
    (here / "model.raw").write_bytes(bytes(model))
    qemu.assert_clean("a.qcow2")
    p = qemu.compare("a.qcow2", "model.raw", "qcow2", "raw")
    assert p.returncode == 0, p.stdout + p.stderr
    if raw:  # the raw data file keeps the whole size (1:1 mapping)
        assert os.path.getsize("d.raw") == size
    # qemu-io reads uniform 512-byte pieces with the expected pattern too (qemu-io -P checks them)
    cmds = [f"read -P {model[o]} {o} 512" for o in range(0, size, 97 * 512)
            if model[o:o + 512] == bytes([model[o]]) * 512]
    assert cmds
    p = qemu.io("a.qcow2", *cmds)
    assert "Pattern verification failed" not in p.stdout + p.stderr


def test_data_file_raw_stays_a_raw_image(qemu, here):
    """Writes and zero writes (no discards) keep the raw data file equal to the disk."""
    assert run_qcowpy("create", "-q", "-f", "qcow2", "-o", "data_file=d.raw,data_file_raw=on", "a.qcow2",
                      "2M").code == 0
    rng = random.Random(7)
    model = bytearray(2 * MiB)
    with qcowpy.open("a.qcow2", "r+") as dev:
        for kind, off, length, pat in _random_ops(rng, 2 * MiB, 40):
            if kind == "discard":
                continue
            if kind == "write":
                dev.pwrite(bytes([pat]) * length, off)
            else:
                dev.write_zeroes(length, off, unmap=kind == "zero_unmap")
            _apply_model(model, kind, off, length, pat, 65536, 2 * MiB)
    assert (here / "d.raw").read_bytes() == bytes(model)
    qemu.assert_clean("a.qcow2")


@pytest.mark.parametrize("ext", [False, True], ids=["std", "extl2"])
@pytest.mark.parametrize("raw", [False, True])
def test_qemu_writes_qcowpy_reads(qemu, qemu_img, here, raw, ext):
    opts = "data_file=d.raw" + (",data_file_raw=on" if raw else "") + (",extended_l2=on" if ext else "")
    qemu.img("create", "-q", "-f", "qcow2", "-o", opts, "a.qcow2", "3M")
    qemu.io("a.qcow2", "write -P 0x11 0 70000", "write -z 131072 65536", "write -P 0x22 300000 5000",
            "write -z -u 393216 131072", "discard 655360 65536", "write -P 0x33 2000000 1000000")
    want = qemu.to_raw("a.qcow2", str(here / "oracle.raw"))
    with qcowpy.open("a.qcow2") as dev:
        assert dev.pread(dev.size, 0) == want
    for args in (("map", "--output=json"), ("map",), ("check",), ("check", "--output=json"),
                 ("info", "--output=json"), ("info",)):
        a = run_qcowpy(*args, "a.qcow2")
        b = run_qemu(qemu_img, *args, "a.qcow2")
        if args[0] == "info":  # disk size is the host's allocation
            a.out = "\n".join(x for x in a.out.splitlines() if "size" not in x or "virtual" in x)
            b.out = "\n".join(x for x in b.out.splitlines() if "size" not in x or "virtual" in x)
        assert (a.code, a.out) == (b.code, b.out), args


def test_we_write_qemu_writes_again(qemu, here):
    """Alternate writers on one image: each reads what the other wrote."""
    assert run_qcowpy("create", "-q", "-f", "qcow2", "-o", "data_file=d.raw", "a.qcow2", "1M").code == 0
    with qcowpy.open("a.qcow2", "r+") as dev:
        dev.pwrite(b"\x44" * 65536, 0)  # guest cluster 0: L2 entry 0x8000000000000000
        dev.write_zeroes(65536, 65536)
    qemu.io("a.qcow2", "read -P 0x44 0 65536", "read -P 0 65536 65536", "write -P 0x55 4096 512",
            "write -z 0 512")
    with qcowpy.open("a.qcow2") as dev:
        got = dev.pread(65536, 0)
    assert got == bytes(512) + b"\x44" * 3584 + b"\x55" * 512 + b"\x44" * (65536 - 4608)
    qemu.assert_clean("a.qcow2")


def test_override_with_image_opts_and_json(qemu_img, here):
    assert run_qcowpy("create", "-q", "-f", "qcow2", "-o", "data_file=d.raw", "a.qcow2", "1M").code == 0
    with qcowpy.open("a.qcow2", "r+") as dev:
        dev.pwrite(b"\x66" * 1000, 5000)
    os.rename("d.raw", "moved.raw")
    for tool in (run_qcowpy, lambda *a: run_qemu(qemu_img, *a)):
        r = tool("convert", "-O", "raw", "a.qcow2", "x.raw")
        assert r.code == 1 and "Could not open 'd.raw': No such file or directory" in r.err
        r = tool("convert", "--image-opts", "-O", "raw",
                 "driver=qcow2,file.filename=a.qcow2,data-file.driver=file,data-file.filename=moved.raw", "x.raw")
        assert r.code == 0, r.err
        assert open("x.raw", "rb").read()[5000:6000] == b"\x66" * 1000
        spec = json.dumps({"driver": "qcow2", "file": {"driver": "file", "filename": "a.qcow2"},
                           "data-file": {"driver": "file", "filename": "moved.raw"}})
        r = tool("compare", "x.raw", "json:" + spec)
        assert r.code == 0, r.err


def test_open_refusals(qemu_img, here):
    run_qemu(qemu_img, "create", "-q", "-f", "qcow2", "plain.qcow2", "1M")
    run_qemu(qemu_img, "create", "-q", "-f", "raw", "d.raw", "1M")
    opts = "driver=qcow2,file.filename=plain.qcow2,data-file.driver=file,data-file.filename=d.raw"
    a = run_qcowpy("convert", "--image-opts", "-O", "raw", opts, "x.raw")
    b = run_qemu(qemu_img, "convert", "--image-opts", "-O", "raw", opts, "x.raw")
    assert a.code == b.code == 1
    assert "'data-file' can only be set for images with an external data file" in a.err
    assert "'data-file' can only be set for images with an external data file" in b.err
    # the flag without a name in the header
    data = bytearray(open("plain.qcow2", "rb").read())
    data[72:80] = (4).to_bytes(8, "big")
    open("noname.qcow2", "wb").write(data)
    a = run_qcowpy("convert", "-O", "raw", "noname.qcow2", "x.raw")
    b = run_qemu(qemu_img, "convert", "-O", "raw", "noname.qcow2", "x.raw")
    assert a.code == b.code == 1
    assert "'data-file' is required for this image" in a.err and "'data-file' is required for this image" in b.err


def test_read_only_open_changes_nothing(here):
    assert run_qcowpy("create", "-q", "-f", "qcow2", "-o", "data_file=d.raw", "a.qcow2", "1M").code == 0
    with qcowpy.open("a.qcow2", "r+") as dev:
        dev.pwrite(b"\x01" * 70000, 1000)
    before = _files(here)
    stat = {n: os.stat(n).st_mtime_ns for n in before}
    with qcowpy.open("a.qcow2") as dev:
        dev.pread(dev.size, 0)
        list(dev.block_status(0, dev.size))
    for args in (("info", "a.qcow2"), ("map", "a.qcow2"), ("check", "a.qcow2"), ("compare", "a.qcow2", "a.qcow2")):
        assert run_qcowpy(*args).code == 0
    assert _files(here) == before
    assert {n: os.stat(n).st_mtime_ns for n in before} == stat


@pytest.mark.parametrize("action", ["-c", "-a", "-d", "-l"])
def test_snapshots_refused_like_qemu(qemu_img, tmp_path, action):
    for side in ("ours", "theirs"):
        (tmp_path / side).mkdir()
        run_qemu(qemu_img, "create", "-q", "-f", "qcow2", "-o", "data_file=d.raw", "a.qcow2", "1M",
                 cwd=tmp_path / side)
    args = ("snapshot", action) + (("s",) if action != "-l" else ()) + ("a.qcow2",)
    a = run_qcowpy(*args, cwd=tmp_path / "ours")
    b = run_qemu(qemu_img, *args, cwd=tmp_path / "theirs")
    assert (a.code, a.out, as_qemu(a.err)) == (b.code, b.out, b.err)
    assert _files(tmp_path / "ours") == _files(tmp_path / "theirs")


def test_convert_to_and_from_data_file_images(qemu, qemu_img, here):
    qemu.img("create", "-q", "-f", "qcow2", "src.qcow2", "2M")
    qemu.io("src.qcow2", "write -P 0x5a 0 100000", "write -P 0x6b 1048576 4096")
    for tool, tag in ((run_qcowpy, "o"), (lambda *a: run_qemu(qemu_img, *a), "q")):
        r = tool("convert", "-O", "qcow2", "-o", f"data_file={tag}.raw", "src.qcow2", f"{tag}.qcow2")
        assert r.code == 0, r.err
        r = tool("convert", "-O", "qcow2", "-o", f"data_file={tag}r.raw,data_file_raw=on", "src.qcow2",
                 f"{tag}r.qcow2")
        assert r.code == 0, r.err
    for name in ("o.qcow2", "q.qcow2", "or.qcow2", "qr.qcow2"):
        qemu.assert_clean(name)
        assert qemu.compare("src.qcow2", name).returncode == 0
        r = run_qcowpy("convert", "-O", "qcow2", name, name + ".back")
        assert r.code == 0 and qemu.compare(name + ".back", "src.qcow2").returncode == 0
    for a, b in (("o.raw", "q.raw"), ("or.raw", "qr.raw")):
        assert open(a, "rb").read() == open(b, "rb").read(), (a, b)
    a = run_qcowpy("convert", "-c", "-O", "qcow2", "-o", "data_file=c1.raw", "src.qcow2", "c1.qcow2")
    b = run_qemu(qemu_img, "convert", "-c", "-O", "qcow2", "-o", "data_file=c2.raw", "src.qcow2", "c2.qcow2")
    assert (a.code, as_qemu(a.err)) == (b.code, b.err)


@pytest.mark.parametrize("args", [("resize", "--shrink", "s.qcow2", "1M"), ("resize", "s.qcow2", "+3M"),
                                  ("resize", "--preallocation=full", "s.qcow2", "+1M"),
                                  ("resize", "--preallocation=metadata", "s.qcow2", "+1M")])
def test_resize_matches_qemu_img(qemu_img, tmp_path, args):
    """The data file follows the size (QEMU forwards the truncate, shrinking included)."""
    for side in ("ours", "theirs"):
        d = tmp_path / side
        d.mkdir()
        run_qemu(qemu_img, "create", "-q", "-f", "qcow2", "-o", "data_file=s.raw", "s.qcow2", "4M", cwd=d)
        run_qemu(qemu_img.replace("qemu-img", "qemu-io"), "-c", "write -P 2 0 4M", "s.qcow2", cwd=d)
    a = run_qcowpy(*args, cwd=tmp_path / "ours")
    b = run_qemu(qemu_img, *args, cwd=tmp_path / "theirs")
    assert (a.code, a.out, as_qemu(a.err)) == (b.code, b.out, b.err)
    assert _files(tmp_path / "ours") == _files(tmp_path / "theirs")


def test_commit_of_a_data_file_overlay_matches_qemu_img(qemu_img, tmp_path):
    """Emptying the committed overlay discards its data-file clusters, as QEMU's SNAPSHOT-type
    frees are passed down to the data file."""
    io = qemu_img.replace("qemu-img", "qemu-io")
    for side in ("ours", "theirs"):
        d = tmp_path / side
        d.mkdir()
        run_qemu(qemu_img, "create", "-q", "-f", "qcow2", "base.qcow2", "4M", cwd=d)
        run_qemu(io, "-c", "write -P 1 0 4M", "base.qcow2", cwd=d)
        run_qemu(qemu_img, "create", "-q", "-f", "qcow2", "-b", "base.qcow2", "-F", "qcow2", "-o",
                 "data_file=top.raw", "top.qcow2", cwd=d)
        run_qemu(io, "-c", "write -P 2 0 128k", "-c", "write -z 1M 64k", "-c", "write -P 3 2M 64k", "top.qcow2",
                 cwd=d)
    a = run_qcowpy("commit", "top.qcow2", cwd=tmp_path / "ours")
    b = run_qemu(qemu_img, "commit", "top.qcow2", cwd=tmp_path / "theirs")
    assert (a.code, a.out, as_qemu(a.err)) == (b.code, b.out, b.err)
    for name in ("top.qcow2", "top.raw"):
        assert (tmp_path / "ours" / name).read_bytes() == (tmp_path / "theirs" / name).read_bytes(), name
    assert run_qemu(qemu_img, "compare", "base.qcow2", "../theirs/base.qcow2", cwd=tmp_path / "ours").code == 0


@pytest.mark.parametrize("raw", [False, True])
def test_extended_l2_writes_are_qemu_io_bytes(qemu, here, raw):
    """Extended L2 with a data file: the same requests through qcowpy and through qemu-io leave
    byte-identical qcow2 files and data files (guest cluster 0 sits at data-file offset 0)."""
    opts = "data_file=d.raw,extended_l2=on" + (",data_file_raw=on" if raw else "")
    for side in ("q", "o"):
        (here / side).mkdir()
        os.chdir(here / side)  # the data file's name is relative to where the image is used
        qemu.img("create", "-q", "-f", "qcow2", "-o", opts, "a.qcow2", "4M")
    os.chdir(here / "q")
    qemu.io("a.qcow2", "write -P 1 1000 70000", "write -z 200k 100k", "write -P 2 1M 6k", "discard 2M 128k",
            "write -z -u 3M 64k")
    os.chdir(here / "o")
    with qcowpy.open("a.qcow2", "r+") as dev:
        dev.pwrite(b"\x01" * 70000, 1000)
        dev.write_zeroes(100 << 10, 200 << 10)
        dev.pwrite(b"\x02" * 6144, 1 << 20)
        dev.discard(128 << 10, 2 << 20)
        dev.write_zeroes(64 << 10, 3 << 20, unmap=True)
    assert _files(here / "q") == _files(here / "o")
    qemu.assert_clean("a.qcow2")
