"""``qcowpy amend`` against ``qemu-img amend``: the same image prepared twice (by qemu-img/qemu-io),
amended once by each; output, exit status and the resulting files must be byte-identical (QEMU's
amend is deterministic for these), and the amended image must check clean and read as before."""
from __future__ import annotations

import pytest

from tests.cli.helpers import as_qemu, qcowpy as run_qcowpy, qemu as run_qemu

pytestmark = pytest.mark.interop


def _prepare(qemu, d, create: str, size: str, io: tuple[str, ...] = (), backing: bool = False) -> None:
    d.mkdir()
    args = ["create", "-q", "-f", "qcow2"]
    if backing:
        qemu.img("create", "-q", "-f", "qcow2", str(d / "base.qcow2"), size)
        qemu.io(str(d / "base.qcow2"), "write -P 0x77 0 1M")
        args += ["-b", "base.qcow2", "-F", "qcow2"]
    if create:
        args += ["-o", create]
    qemu.img(*args, str(d / "a.qcow2"), size)
    if io:
        qemu.io(str(d / "a.qcow2"), *io)


IO = ("write -P 0x11 0 100k", "write -z 200k 64k", "write -z 512k 128k", "write -P 0x22 1M 64k",
      "write -z -u 1M 64k", "write -P 0x33 2M 10k", "discard 3M 64k", "write -c -P 0x44 4M 64k")


@pytest.mark.parametrize("create,size,io,backing,amend", [
    ("", "8M", IO, False, "compat=0.10"),
    ("", "8M", IO, True, "compat=0.10"),
    ("cluster_size=4k", "2M", ("write -z 0 8k", "write -P 1 8k 4k", "write -z 16k 4k"), True, "compat=0.10"),
    ("compat=0.10", "8M", ("write -P 0x11 0 100k",), False, "compat=1.1"),
    ("compat=0.10", "8M", ("write -P 0x11 0 100k",), False, "compat=1.1,refcount_bits=1"),
    ("", "8M", IO, False, "refcount_bits=64"),
    ("", "8M", IO, False, "refcount_bits=1"),
    ("refcount_bits=8,cluster_size=512", "4M", ("write -P 1 0 3M",), False, "refcount_bits=2"),
    ("", "8M", IO, False, "lazy_refcounts=on"),
    ("lazy_refcounts=on", "8M", IO, False, "lazy_refcounts=off"),
    ("", "8M", IO, False, "size=16M"),
    ("", "8M", IO, False, "size=3M"),
    ("", "8M", IO, True, "backing_file=base.qcow2,backing_fmt=qcow2"),
    ("", "8M", IO, True, "backing_file=other.qcow2"),
    ("", "8M", IO, False, "refcount_bits=16,lazy_refcounts=on,compat=1.1"),
    ("compression_type=zstd", "8M", ("write -P 1 0 64k",), False, "compat=0.10"),
    ("compression_type=zstd", "8M", ("write -c -P 1 0 64k",), False, "compat=0.10"),
    ("refcount_bits=8", "8M", IO, False, "compat=0.10"),
    ("extended_l2=on", "8M", ("write -P 1 0 64k",), False, "compat=0.10"),
    ("", "8M", IO, False, "compat=0.10,refcount_bits=8"),
    ("data_file=d.raw", "8M", ("write -P 1 0 64k",), False, "compat=0.10"),
    ("data_file=d.raw,data_file_raw=on", "8M", ("write -P 1 0 64k",), False, "data_file_raw=off"),
    ("data_file=d.raw", "8M", ("write -P 1 0 64k",), False, "data_file=e.raw"),
    ("data_file=d.raw", "8M", ("write -P 1 0 64k",), False, "data_file="),
    ("data_file=d.raw", "8M", ("write -P 1 0 64k",), False, "data_file_raw=on"),
    ("", "8M", IO, False, "compat=0.10,lazy_refcounts=on"),
    ("", "8M", IO, False, "encrypt.new-secret=x"),
])
def test_amend_matches_qemu_img(qemu, qemu_img, tmp_path, monkeypatch, create, size, io, backing, amend):
    ours, theirs = tmp_path / "ours", tmp_path / "theirs"
    _prepare(qemu, ours, create, size, io, backing)
    _prepare(qemu, theirs, create, size, io, backing)
    before = qemu.to_raw(str(ours / "a.qcow2"), str(tmp_path / "before.raw")) if "data_file=" not in amend else None
    monkeypatch.chdir(ours)
    a = run_qcowpy("amend", "-o", amend, "a.qcow2")
    monkeypatch.chdir(theirs)
    b = run_qemu(qemu_img, "amend", "-o", amend, "a.qcow2")
    assert (a.code, a.out, as_qemu(a.err).replace("'qcowpy rebase'", "'qemu-img rebase'")) == (b.code, b.out, b.err)
    for name in sorted(p.name for p in theirs.iterdir()):
        assert (ours / name).read_bytes() == (theirs / name).read_bytes(), name
    if a.code == 0 and before is not None:
        monkeypatch.chdir(ours)
        qemu.assert_clean("a.qcow2")
        after = qemu.to_raw("a.qcow2", str(tmp_path / "after.raw"))
        n = min(len(before), len(after))
        assert after[:n] == before[:n]


@pytest.mark.parametrize("args", [
    ("-f", "qcow2", "-o", "help"),
    ("-f", "raw", "-o", "help"),
    ("-o", "help", "a.qcow2"),
    ("-o", "size=1M", "-f", "raw", "a.qcow2"),
    ("a.qcow2",),
    ("-o", "size=1M"),
    ("-o", "size=1M", "-t", "bogus", "a.qcow2"),
    ("-o", "lazy_refcounts=maybe", "a.qcow2"),
    ("-o", "size=1M", "missing.qcow2"),
    ("-p", "-o", "compat=0.10", "a.qcow2"),
    ("-q", "-p", "-o", "refcount_bits=8", "a.qcow2"),
    ("--image-opts", "-o", "refcount_bits=4", "driver=qcow2,file.filename=a.qcow2"),
])
def test_cli_matches_qemu_img(qemu, qemu_img, tmp_path, monkeypatch, args):
    ours, theirs = tmp_path / "ours", tmp_path / "theirs"
    _prepare(qemu, ours, "", "4M", IO[:3])
    _prepare(qemu, theirs, "", "4M", IO[:3])
    monkeypatch.chdir(ours)
    a = run_qcowpy("amend", *args)
    monkeypatch.chdir(theirs)
    b = run_qemu(qemu_img, "amend", *args)
    # qemu-img's stdout was read with universal newlines: its progress line's \r became \n
    assert (a.code, a.out.replace("\r\n", "\n").replace("\r", "\n"), as_qemu(a.err)) == (b.code, b.out, b.err)
    assert (ours / "a.qcow2").read_bytes() == (theirs / "a.qcow2").read_bytes()


def test_refcount_bits_round_trip_with_snapshots_and_compression(qemu, tmp_path, monkeypatch):
    """A busier image (internal snapshot, compressed clusters, shared refcounts): we narrow and
    widen the refcount width; the result checks clean and reads the same, snapshot included."""
    d = tmp_path / "x"
    _prepare(qemu, d, "cluster_size=4k", "4M", ("write -P 1 0 1M", "write -c -P 2 1M 64k"))
    monkeypatch.chdir(d)
    qemu.img("snapshot", "-c", "s1", "a.qcow2")
    qemu.io("a.qcow2", "write -P 3 0 64k")
    before = qemu.to_raw("a.qcow2", "before.raw")
    for bits in ("8", "64", "1", "16"):
        r = run_qcowpy("amend", "-o", f"refcount_bits={bits}", "a.qcow2")
        if bits == "1":  # the snapshot shares clusters: refcount 2 does not fit in one bit
            assert r.code == 1 and "Cannot decrease refcount entry width to 1 bits" in r.err
            continue
        assert r.code == 0, r.err
        qemu.assert_clean("a.qcow2")
        assert qemu.to_raw("a.qcow2", "after.raw") == before
    p = qemu.img("convert", "-l", "s1", "-O", "raw", "a.qcow2", "snap.raw")
    assert p.returncode == 0


@pytest.mark.parametrize("backing", [False, True])
def test_downgrade_with_snapshots_matches_qemu_img(qemu, qemu_img, tmp_path, monkeypatch, backing):
    """Zero clusters in tables the snapshot shares and in the snapshot's own tables are
    expanded as QEMU does (in place, new clusters counted once per sharer); the image is
    prepared once and copied, so both sides start from the same bytes (snapshot dates included)."""
    import shutil
    ours, theirs = tmp_path / "ours", tmp_path / "theirs"
    _prepare(qemu, ours, "", "4G", ("write -z 0 64k", "write -z 1G 64k", "write -z 2G 64k", "write -P 5 3G 64k"),
             backing)
    monkeypatch.chdir(ours)
    qemu.img("snapshot", "-c", "foo", "a.qcow2")
    qemu.io("a.qcow2", "write -z 64k 64k", "write -P 1 1G 4k", "write -z -u 1G 64k", "write -z 3G 4k")
    shutil.copytree(ours, theirs)
    before = qemu.to_raw("a.qcow2", str(tmp_path / "before.raw"))
    a = run_qcowpy("amend", "-p", "-o", "compat=0.10", "a.qcow2")
    monkeypatch.chdir(theirs)
    b = run_qemu(qemu_img, "amend", "-p", "-o", "compat=0.10", "a.qcow2")
    assert (a.code, a.out.replace("\r\n", "\n").replace("\r", "\n"), as_qemu(a.err)) == (b.code, b.out, b.err)
    assert (ours / "a.qcow2").read_bytes() == (theirs / "a.qcow2").read_bytes()
    monkeypatch.chdir(ours)
    qemu.assert_clean("a.qcow2")
    assert qemu.to_raw("a.qcow2", str(tmp_path / "after.raw")) == before


def test_downgrade_does_not_zero_a_cluster_a_snapshot_uses(qemu, tmp_path, monkeypatch):
    """A preallocated zero cluster whose host cluster the snapshot still reads: QEMU 7.2
    zero-fills it in place (the snapshot then reads zeros and check reports OFLAG_COPIED);
    qcowpy gives the active layer a new zero cluster, so both the disk and the snapshot keep
    their contents and the image checks clean."""
    d = tmp_path / "x"
    _prepare(qemu, d, "", "4M", ("write -P 5 1M 64k",), backing=True)
    monkeypatch.chdir(d)
    qemu.img("snapshot", "-c", "foo", "a.qcow2")
    qemu.io("a.qcow2", "write -z 1M 64k")  # keeps the shared host cluster: ZERO_ALLOC
    disk = qemu.to_raw("a.qcow2", "disk.raw")
    snap = qemu.img("convert", "-l", "foo", "-O", "raw", "a.qcow2", "snap.raw")
    assert snap.returncode == 0
    snap_before = (d / "snap.raw").read_bytes()
    assert snap_before[1 << 20:(1 << 20) + 65536] == b"\x05" * 65536
    r = run_qcowpy("amend", "-o", "compat=0.10", "a.qcow2")
    assert r.code == 0, r.err
    qemu.assert_clean("a.qcow2")
    assert qemu.to_raw("a.qcow2", "after.raw") == disk
    assert qemu.img("convert", "-l", "foo", "-O", "raw", "a.qcow2", "snap2.raw").returncode == 0
    assert (d / "snap2.raw").read_bytes() == snap_before


def test_refcount_width_progress_and_walks_match_qemu_img(qemu, qemu_img, tmp_path, monkeypatch):
    """iotest 112's "multiple walks" case: the first new refcount block is exactly full, so the
    allocation walk runs once more; progress goes back (66.67% -> 50.00%) as in QEMU, and the
    file is byte-identical."""
    outs = []
    for side, tool in (("ours", lambda *a: run_qcowpy(*a)), ("theirs", lambda *a: run_qemu(qemu_img, *a))):
        d = tmp_path / side
        _prepare(qemu, d, "refcount_bits=1,cluster_size=512", "64k", (f"write 0 {58 * 512}",))
        monkeypatch.chdir(d)
        r = tool("amend", "-o", "refcount_bits=64", "-p", "a.qcow2")
        assert r.code == 0, r.err
        outs.append(r.out.replace("\r\n", "\n").replace("\r", "\n"))
        qemu.assert_clean("a.qcow2")
    assert outs[0] == outs[1]
    assert "(66.67/100%)\n    (50.00/100%)" in outs[0]
    assert (tmp_path / "ours" / "a.qcow2").read_bytes() == (tmp_path / "theirs" / "a.qcow2").read_bytes()


def test_upgrade_gives_v2_snapshots_the_v3_extra_data_as_qemu_img(qemu, qemu_img, tmp_path, monkeypatch):
    """iotest 261: a v2 snapshot entry may carry no extra data; the upgrade rewrites the table
    (new clusters, then the header) with every entry's disk size and an unknown icount, the
    same bytes as QEMU's."""
    import shutil
    import struct
    ours, theirs = tmp_path / "ours", tmp_path / "theirs"
    ours.mkdir()
    monkeypatch.chdir(ours)
    qemu.img("create", "-q", "-f", "qcow2", "-o", "compat=0.10", "a.qcow2", "64M")
    qemu.io("a.qcow2", "write -P 3 0 64k")
    qemu.img("snapshot", "-c", "sn0", "a.qcow2")
    buf = bytearray((ours / "a.qcow2").read_bytes())
    table = struct.unpack_from(">Q", buf, 64)[0]
    id_len, name_len = struct.unpack_from(">HH", buf, table + 12)
    extra = struct.unpack_from(">I", buf, table + 36)[0]
    assert extra == 24  # qemu-img writes the v3 extra data even into v2 images
    tail = bytes(buf[table + 40 + extra:table + 40 + extra + id_len + name_len])
    struct.pack_into(">I", buf, table + 36, 0)  # the entry as an old QEMU wrote it: no extra data
    buf[table + 40:table + 40 + extra + id_len + name_len] = tail + bytes(extra)
    (ours / "a.qcow2").write_bytes(buf)
    shutil.copytree(ours, theirs)
    a = run_qcowpy("amend", "-o", "compat=1.1", "a.qcow2")
    monkeypatch.chdir(theirs)
    b = run_qemu(qemu_img, "amend", "-o", "compat=1.1", "a.qcow2")
    assert (a.code, a.out, as_qemu(a.err)) == (b.code, b.out, b.err) == (0, "", "")
    assert (ours / "a.qcow2").read_bytes() == (theirs / "a.qcow2").read_bytes()
    monkeypatch.chdir(ours)
    qemu.assert_clean("a.qcow2")
