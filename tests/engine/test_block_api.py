"""The block layer API: ranges, read-only enforcement, BlockFile, threads, chains, feature bits."""
from __future__ import annotations

import io
import json
import os
import random
import shutil
import struct
import threading

import pytest

import qcowpy
from qcowpy.errors import (CorruptImage, ImageNotFound, InvalidArgument, QcowError, ReadOnlyError,
                           UnsupportedFeature)
from qcowpy.format import constants as C
from qcowpy.format.header import parse_header

KiB, MiB = 1024, 1024 * 1024


def header_of(path) -> "object":
    with open(path, "rb") as f:
        return parse_header(f.read(1 << 21))


def snapshot_file(path) -> tuple[bytes, int]:
    st = os.stat(path)
    with open(path, "rb") as f:
        return f.read(), st.st_mtime_ns


@pytest.fixture
def qimg(tmp_path):
    p = str(tmp_path / "a.qcow2")
    qcowpy.create(p, 4 * MiB + 512, cluster_size=4096)
    return p


@pytest.fixture
def rawimg(tmp_path):
    p = tmp_path / "a.raw"
    p.write_bytes(random.Random(3).randbytes(MiB + 512))
    return str(p)


# ----------------------------------------------------------------------------- ranges

@pytest.mark.parametrize("kind", ["qcow2", "raw"])
def test_out_of_range_is_a_clear_error(qimg, rawimg, kind):
    path = qimg if kind == "qcow2" else rawimg
    with qcowpy.open(path, "r+") as dev:
        size = dev.size
        assert dev.pread(0, size) == b""
        assert len(dev.pread(1, size - 1)) == 1
        bad = [(1, size), (2, size - 1), (1, -1), (-1, 0), (size + 1, 0)]
        for length, off in bad:
            with pytest.raises(InvalidArgument, match="outside the image"):
                dev.pread(length, off)
            if length >= 0:
                with pytest.raises(InvalidArgument):
                    dev.pwrite(b"x" * length, off)
            with pytest.raises(InvalidArgument):
                dev.write_zeroes(length, off)
            with pytest.raises(InvalidArgument):
                dev.discard(length, off)
            if length >= 0:
                with pytest.raises(InvalidArgument):
                    dev.preadinto(bytearray(length), off)
        with pytest.raises(InvalidArgument):
            dev.block_status(size - 10, 11)
        # nothing was changed by the refused calls
        assert dev.pread(size, 0) == (bytes(size) if kind == "qcow2" else open(rawimg, "rb").read())


@pytest.mark.parametrize("kind", ["qcow2", "raw"])
def test_preadinto_fills_any_buffer_like_pread(qimg, rawimg, kind):
    """preadinto is pread without the intermediate bytes: same data into bytearrays, slices of a
    larger buffer and non-byte memoryviews, with zero, data and unallocated ranges mixed."""
    path = qimg if kind == "qcow2" else rawimg
    with qcowpy.open(path, "r+") as dev:
        if kind == "qcow2":
            dev.pwrite(random.Random(1).randbytes(10000), 3000)
            dev.write_zeroes(8192, 20480)
        size = dev.size
        for off, n in [(0, size), (1, 4095), (2999, 10003), (20000, 9000), (size - 700, 700)]:
            want = dev.pread(n, off)
            big = bytearray(b"\xee") * (n + 20)
            dev.preadinto(memoryview(big)[10:10 + n], off)
            assert bytes(big[10:10 + n]) == want
            assert big[:10] == big[-10:] == b"\xee" * 10  # nothing written outside the view
            if n % 4 == 0:
                words = memoryview(bytearray(n)).cast("I")
                dev.preadinto(words, off)
                assert words.tobytes() == want


def test_compressed_write_must_be_one_cluster(qimg):
    with qcowpy.open(qimg, "r+") as dev:
        with pytest.raises(InvalidArgument):
            dev.write_compressed(b"a" * 4096, 512)
        with pytest.raises(InvalidArgument):
            dev.write_compressed(b"a" * 4095, 0)
        with pytest.raises(InvalidArgument):
            dev.write_compressed(b"a" * 8192, 0)
        # the short last cluster is allowed (the image ends mid-cluster)
        dev.write_compressed(b"z" * 512, dev.size - 512)
        assert dev.pread(512, dev.size - 512) == b"z" * 512


def test_closed_device_refuses_io(qimg):
    dev = qcowpy.open(qimg, "r+")
    dev.close()
    dev.close()  # idempotent
    with pytest.raises(QcowError):
        dev.pread(1, 0)
    with pytest.raises(QcowError):
        dev.pwrite(b"1", 0)


def test_bad_mode_and_missing_file(tmp_path):
    with pytest.raises(InvalidArgument):
        qcowpy.open(str(tmp_path / "x"), "w")
    with pytest.raises(ImageNotFound, match="nope.qcow2"):
        qcowpy.open(str(tmp_path / "nope.qcow2"))


# ----------------------------------------------------------------------------- read-only

@pytest.mark.interop
def test_read_only_open_changes_nothing(qemu, tmp_path):
    base = str(tmp_path / "base.qcow2")
    top = str(tmp_path / "top.qcow2")
    qemu.create(base, 2 * MiB, lazy_refcounts="on")
    qemu.io(base, "write -P 7 0 300000", "write -c -P 8 1048576 65536")
    qemu.create(top, 2 * MiB, backing=base, backing_fmt="qcow2")
    qemu.io(top, "write -P 9 4096 8192")
    # an unknown autoclear bit would be cleared by a read-write open: a read-only one must not
    with open(top, "r+b") as f:
        f.seek(88)
        f.write(struct.pack(">Q", 1 << 20))
    before = {p: snapshot_file(p) for p in (base, top)}
    with qcowpy.open(top) as dev:
        assert dev.read_only and dev.backing.read_only
        dev.pread(dev.size, 0)
        dev.block_status()
        dev.flush()
        for call in (lambda: dev.pwrite(b"x", 0), lambda: dev.write_zeroes(512, 0), lambda: dev.discard(65536, 0),
                     lambda: dev.write_compressed(b"y" * 65536, 0)):
            with pytest.raises(ReadOnlyError):
                call()
        with pytest.raises(ReadOnlyError):
            dev.backing.pwrite(b"x", 0)
    # writing to the overlay read-write never touches the backing file
    with open(top, "r+b") as f:
        f.seek(88)
        f.write(struct.pack(">Q", 0))
    before[top] = snapshot_file(top)
    with qcowpy.open(top, "r+") as dev:
        dev.pwrite(b"q" * 70000, 10)
        dev.discard(65536 * 4, 0)
    assert snapshot_file(base) == before[base]
    qemu.assert_clean(top)


def test_raw_read_only(rawimg):
    before = snapshot_file(rawimg)
    with qcowpy.open(rawimg) as dev:
        assert dev.format == "raw"
        with pytest.raises(ReadOnlyError):
            dev.pwrite(b"x", 0)
        with pytest.raises(ReadOnlyError):
            dev.write_zeroes(10, 0)
        with pytest.raises(ReadOnlyError):
            dev.discard(10, 0)
    assert snapshot_file(rawimg) == before


# ----------------------------------------------------------------------------- BlockFile

def test_blockfile_semantics(qimg):
    dev = qcowpy.open(qimg, "r+")
    size = dev.size
    f = qcowpy.BlockFile(dev)
    assert isinstance(f, io.RawIOBase)
    assert f.readable() and f.writable() and f.seekable()
    assert f.tell() == 0
    assert f.write(b"hello") == 5
    assert f.tell() == 5
    assert f.seek(-2, io.SEEK_CUR) == 3
    assert f.read(10) == b"lo" + bytes(8)
    assert f.seek(0) == 0
    buf = bytearray(7)
    assert f.readinto(buf) == 7 and bytes(buf) == b"hello\0\0"
    assert f.seek(-3, io.SEEK_END) == size - 3
    assert f.read(100) == bytes(3)  # short read at the end
    assert f.read(100) == b""  # EOF
    assert f.seek(size + 100) == size + 100  # seeking past the end is allowed, reading gives EOF
    assert f.read(1) == b""
    with pytest.raises(InvalidArgument):
        f.write(b"past the end")
    with pytest.raises(ValueError):
        f.seek(-1)
    with pytest.raises(ValueError):
        f.seek(0, 7)
    # works with the io stack
    f.seek(0)
    r = io.BufferedReader(f, buffer_size=1000)
    assert r.read(5) == b"hello"
    f.seek(4096 - 2)
    w = io.BufferedWriter(f)
    w.write(b"ABCD")
    w.flush()
    assert dev.pread(4, 4094) == b"ABCD"
    f.seek(0)
    assert len(f.readall()) == size
    f.close()
    assert f.closed
    assert dev.pread(5, 0) == b"hello"  # close_device=False leaves the device open
    dev.close()
    with qcowpy.open(qimg) as ro:
        g = qcowpy.BlockFile(ro)
        assert not g.writable()
        with pytest.raises(ReadOnlyError):
            g.write(b"x")
        g.close()
    with qcowpy.open(qimg) as ro:
        with qcowpy.BlockFile(ro, close_device=True) as g:
            assert g.read(4) == b"hell"
        with pytest.raises(QcowError):
            ro.pread(1, 0)


# ----------------------------------------------------------------------------- threads

@pytest.mark.interop
@pytest.mark.parametrize("cs", [512, 65536])
def test_concurrent_writers_and_readers(qemu, tmp_path, cs):
    path = str(tmp_path / "t.qcow2")
    size = 4 * MiB
    qcowpy.create(path, size, cluster_size=cs)
    nthreads, chunk = 4, size // 4
    model = bytearray(size)
    errors: list[BaseException] = []
    dev = qcowpy.open(path, "r+")

    def writer(t: int) -> None:
        try:
            rng = random.Random(t)
            base = t * chunk
            for i in range(60):
                off = base + rng.randrange(chunk - 9000)
                n = rng.randrange(1, 9000)
                op = rng.randrange(4)
                if op == 0:
                    dev.write_zeroes(n, off, unmap=bool(i & 1))
                    model[off:off + n] = bytes(n)
                elif op == 1:
                    coff = (off + cs - 1) // cs * cs
                    if coff + cs <= base + chunk:
                        data = bytes([t + 1]) * cs
                        dev.write_compressed(data, coff)
                        model[coff:coff + cs] = data
                else:
                    data = rng.randbytes(n)
                    dev.pwrite(data, off)
                    model[off:off + n] = data
                # a thread's own range reads back what it wrote, whatever the others do
                assert dev.pread(n, off) == bytes(model[off:off + n])
        except BaseException as e:  # pragma: no cover - reported below
            errors.append(e)

    def reader() -> None:
        try:
            rng = random.Random(99)
            for _ in range(200):
                off = rng.randrange(size - 70000)
                assert len(dev.pread(70000, off)) == 70000
                dev.block_status(off, 70000)
        except BaseException as e:  # pragma: no cover
            errors.append(e)

    threads = [threading.Thread(target=writer, args=(t,)) for t in range(nthreads)]
    threads += [threading.Thread(target=reader) for _ in range(2)]
    flusher_stop = threading.Event()

    def flusher() -> None:
        while not flusher_stop.is_set():
            dev.flush()

    fl = threading.Thread(target=flusher)
    for t in threads:
        t.start()
    fl.start()
    for t in threads:
        t.join()
    flusher_stop.set()
    fl.join()
    assert not errors, errors
    assert dev.pread(size, 0) == bytes(model)
    dev.close()
    qemu.assert_clean(path)
    raw = tmp_path / "model.raw"
    raw.write_bytes(bytes(model))
    assert qemu.compare(path, str(raw), "qcow2", "raw").returncode == 0


# ----------------------------------------------------------------------------- chains

def test_missing_backing_file_names_the_path(tmp_path):
    base = str(tmp_path / "base.qcow2")
    qcowpy.create(base, MiB)
    top = str(tmp_path / "top.qcow2")
    qcowpy.create(top, MiB, backing_file="base.qcow2", backing_fmt="qcow2")
    os.unlink(base)
    with pytest.raises(ImageNotFound) as ei:
        qcowpy.open(top)
    assert base in str(ei.value)
    assert "backing" in str(ei.value).lower()


@pytest.mark.interop
def test_backing_loop_is_detected(qemu, tmp_path):
    a, b = str(tmp_path / "a.qcow2"), str(tmp_path / "b.qcow2")
    qemu.create(a, MiB)
    qemu.create(b, MiB, backing="a.qcow2", backing_fmt="qcow2")
    qemu.img("rebase", "-u", "-b", "b.qcow2", "-F", "qcow2", a)
    with pytest.raises(QcowError, match="loop"):
        qcowpy.open(b)
    # a self-referencing image too
    c = str(tmp_path / "c.qcow2")
    qemu.create(c, MiB)
    qemu.img("rebase", "-u", "-b", "c.qcow2", "-F", "qcow2", c)
    with pytest.raises(QcowError, match="loop"):
        qcowpy.open(c)
    # QEMU refuses these too
    p = qemu.img("info", "--backing-chain", b, check=False)
    assert p.returncode != 0 and "loop" in p.stderr


# ----------------------------------------------------------------------------- feature bits

@pytest.mark.interop
def test_lazy_refcounts_dirty_bit(qemu, tmp_path):
    path = str(tmp_path / "lazy.qcow2")
    qcowpy.create(path, 2 * MiB, lazy_refcounts=True, cluster_size=4096)
    assert not header_of(path).incompatible_features & C.INCOMPAT_DIRTY
    dev = qcowpy.open(path, "r+")
    dev.pread(4096, 0)
    assert not header_of(path).incompatible_features & C.INCOMPAT_DIRTY  # reads do not dirty it
    dev.pwrite(b"d" * 10000, 3000)
    assert header_of(path).incompatible_features & C.INCOMPAT_DIRTY
    # qcowpy holds the image lock while open: look with -U (force share), as one would with QEMU
    assert json.loads(qemu.img("info", "-U", "--output=json", path).stdout)["dirty-flag"] is True
    dev.flush()
    dev.write_zeroes(4096, 0)
    dev.discard(8192, 8192)
    dev.close()
    h = header_of(path)
    assert not h.incompatible_features & C.INCOMPAT_DIRTY
    assert h.compatible_features & C.COMPAT_LAZY_REFCOUNTS
    assert qemu.info_json(path)["dirty-flag"] is False
    qemu.assert_clean(path)
    want = bytearray(2 * MiB)
    want[3000:13000] = b"d" * 10000
    want[0:4096] = bytes(4096)
    want[8192:16384] = bytes(8192)
    with qcowpy.open(path) as dev:
        assert dev.pread(dev.size, 0) == bytes(want)


@pytest.mark.interop
def test_dirty_image_refused_read_write_but_readable(qemu, tmp_path):
    path = str(tmp_path / "lazy.qcow2")
    qcowpy.create(path, MiB, lazy_refcounts=True)
    dev = qcowpy.open(path, "r+")
    dev.pwrite(b"x" * 5000, 0)
    dev.flush()
    crashed = str(tmp_path / "crashed.qcow2")
    shutil.copy(path, crashed)  # as if the process died here
    dev.close()
    assert qemu.info_json(crashed)["dirty-flag"] is True
    with qcowpy.open(crashed) as ro:  # read-only always works and changes nothing
        assert ro.pread(5000, 0) == b"x" * 5000
    assert qemu.info_json(crashed)["dirty-flag"] is True
    # read-write: either refused with a clear message, or refcounts rebuilt first (as QEMU does)
    try:
        rw = qcowpy.open(crashed, "r+")
    except QcowError as e:
        assert "check -r" in str(e)
        qemu.img("check", "-r", "all", crashed)
        rw = qcowpy.open(crashed, "r+")
    with rw:
        assert rw.pread(5000, 0) == b"x" * 5000
        rw.pwrite(b"y", 0)
    assert qemu.info_json(crashed)["dirty-flag"] is False
    qemu.assert_clean(crashed)
    with qcowpy.open(crashed) as ro:
        assert ro.pread(5000, 0) == b"y" + b"x" * 4999


@pytest.mark.interop
def test_corrupt_bit_refuses_read_write(qemu, tmp_path):
    path = str(tmp_path / "c.qcow2")
    qemu.create(path, MiB)
    qemu.io(path, "write -P 0x42 0 65536")
    with open(path, "r+b") as f:
        f.seek(72)
        f.write(struct.pack(">Q", C.INCOMPAT_CORRUPT))
    before = snapshot_file(path)
    with pytest.raises(CorruptImage) as ei:
        qcowpy.open(path, "r+")
    assert "corrupt" in str(ei.value).lower() and "read" in str(ei.value).lower()
    with qcowpy.open(path) as dev:
        assert dev.pread(65536, 0) == b"\x42" * 65536
    assert snapshot_file(path) == before
    # QEMU agrees: read/write open fails, read-only works
    assert qemu.io(path, "read 0 512", check=False).returncode != 0 or \
        "corrupt" in qemu.io(path, "read 0 512", check=False).stderr.lower()
    assert qemu.img("convert", "-O", "raw", path, str(tmp_path / "x.raw"), check=False).returncode == 0


@pytest.mark.interop
@pytest.mark.parametrize("with_backing", [False, True])
def test_extended_l2_writes_refused_cleanly_or_correct(qemu, tmp_path, with_backing):
    """Writing extended-L2 images: either a clean UnsupportedFeature that leaves the file as it
    was, or (once supported) results QEMU agrees with."""
    backing = None
    model = bytearray(MiB)
    if with_backing:
        backing = str(tmp_path / "b.qcow2")
        qemu.create(backing, MiB)
        qemu.io(backing, f"write -P 0xbb 0 {MiB}")
        model[:] = b"\xbb" * MiB
    path = str(tmp_path / "e.qcow2")
    qemu.create(path, MiB, backing=backing, backing_fmt="qcow2" if backing else None,
                extended_l2="on", cluster_size=65536)
    qemu.io(path, "write -P 3 2048 4096")
    model[2048:6144] = b"\x03" * 4096
    before = snapshot_file(path)[0]
    ops = [
        lambda d: (d.pwrite(b"x" * 3000, 100), model.__setitem__(slice(100, 3100), b"x" * 3000)),
        lambda d: (d.write_zeroes(6000, 7000), model.__setitem__(slice(7000, 13000), bytes(6000))),
        lambda d: (d.write_zeroes(65536, 65536, unmap=True), model.__setitem__(slice(65536, 131072), bytes(65536))),
        lambda d: (d.write_compressed(b"y" * 65536, 196608), model.__setitem__(slice(196608, 262144), b"y" * 65536)),
        lambda d: (d.pwrite(b"z" * 70000, 300000), model.__setitem__(slice(300000, 370000), b"z" * 70000)),
    ]
    refused = 0
    with qcowpy.open(path, "r+") as dev:
        assert dev.pread(4096, 2048) == b"\x03" * 4096
        for op in ops:
            try:
                op(dev)
            except UnsupportedFeature:
                refused += 1
    if refused:
        assert refused == len(ops), "partly supported extended-L2 writes"
        assert snapshot_file(path)[0] == before
        model[:] = bytes(MiB) if not with_backing else b"\xbb" * MiB
        model[2048:6144] = b"\x03" * 4096
    qemu.assert_clean(path)
    raw = tmp_path / "m.raw"
    raw.write_bytes(bytes(model))
    p = qemu.compare(path, str(raw), "qcow2", "raw")
    assert p.returncode == 0, p.stdout


@pytest.mark.parametrize("field_offset,value,match", [
    (32, struct.pack(">I", 3), "Unsupported encryption method 3"),    # crypt_method (1, 2: tests/crypto)
])
def test_unsupported_images_refused_clearly(tmp_path, field_offset, value, match):
    p = str(tmp_path / "u.qcow2")
    qcowpy.create(p, MiB)
    with open(p, "r+b") as f:
        f.seek(field_offset)
        f.write(value)
    with pytest.raises(UnsupportedFeature, match=match):
        qcowpy.open(p)


@pytest.mark.interop
@pytest.mark.parametrize("table,bit", [("l2", 3), ("l2", 57), ("l1", 2), ("l1", 60)])
def test_reserved_bits_in_tables_are_refused(qemu, tmp_path, table, bit):
    """The spec requires reserved L1/L2 bits to be zero: reading such an entry is a clean error."""
    path = str(tmp_path / "r.qcow2")
    qemu.create(path, MiB, cluster_size=4096)
    qemu.io(path, "write -P 0x61 0 4096")
    with open(path, "r+b") as f:
        h = parse_header(f.read(4096))
        f.seek(h.l1_table_offset)
        l1e = struct.unpack(">Q", f.read(8))[0]
        where = h.l1_table_offset if table == "l1" else l1e & C.L1E_OFFSET_MASK
        f.seek(where)
        e = struct.unpack(">Q", f.read(8))[0]
        f.seek(where)
        f.write(struct.pack(">Q", e | (1 << bit)))
    with qcowpy.open(path) as dev:
        if table == "l1":
            # QEMU ignores L1 reserved bits when reading; qcowpy must at least read correctly
            assert dev.pread(4096, 0) == b"\x61" * 4096
        else:
            with pytest.raises(CorruptImage):
                dev.pread(4096, 0)
    if table == "l2":
        assert qemu.check(path).returncode != 0  # QEMU's check flags the entry too


def _views(sizes: list[int]) -> tuple[bytearray, list[memoryview]]:
    """Buffers of ``sizes`` carved from one bytearray, each followed by a 0xee guard byte (and
    one before the first)."""
    big = bytearray(b"\xee") * (sum(sizes) + len(sizes) + 1)
    views, pos = [], 1
    for n in sizes:
        views.append(memoryview(big)[pos:pos + n])
        pos += n + 1
    return big, views


def _guards_intact(big: bytearray, sizes: list[int]) -> bool:
    pos, ok = 0, big[0] == 0xEE
    for n in sizes:
        pos += n + 1
        ok = ok and big[pos] == 0xEE
    return ok


@pytest.mark.parametrize("kind", ["qcow2", "raw"])
def test_preadv_fills_buffers_like_consecutive_preads(qimg, rawimg, kind):
    """preadv (a device model's merged reads) is preadinto of each buffer at consecutive offsets:
    over data, zero and unallocated clusters mixed, and up to the end of the device."""
    path = qimg if kind == "qcow2" else rawimg
    rng = random.Random(5)
    with qcowpy.open(path, "r+") as dev:
        if kind == "qcow2":
            dev.pwrite(rng.randbytes(64 * KiB), 0)
            dev.pwrite(rng.randbytes(10000), 100 * KiB)
            dev.write_zeroes(8192, 20480)
        size = dev.size
        for off, sizes in [(0, [4096] * 16), (512, [1, 4095, 7000, 13]), (90 * KiB, [8192, 0, 20000]),
                           (size - 1536, [512, 1024])]:
            big, views = _views(sizes)
            dev.preadv(views, off)
            pos = off
            for v in views:
                assert bytes(v) == dev.pread(len(v), pos)
                pos += len(v)
            assert _guards_intact(big, sizes)
        with pytest.raises(InvalidArgument):
            dev.preadv(_views([512, 1024])[1], size - 1024)


def test_preadv_of_a_qemu_written_image_matches_qemu(qemu, tmp_path):
    """A fully written image (qemu-img convert, host runs in order): merged reads of 64 KiB
    requests land exactly the bytes qemu-img reads."""
    raw = tmp_path / "src.raw"
    raw.write_bytes(random.Random(8).randbytes(2 * MiB))
    img = str(tmp_path / "c.qcow2")
    qemu.img("convert", "-O", "qcow2", str(raw), img)
    with qcowpy.open(img) as dev:
        _, views = _views([64 * KiB] * 30)
        dev.preadv(views, 64 * KiB)
    assert b"".join(bytes(v) for v in views) == raw.read_bytes()[64 * KiB:31 * 64 * KiB]


def test_hostfile_preadv_short_read_at_end_of_file(tmp_path):
    from qcowpy.hostfile import HostFile, iov_slice
    p = tmp_path / "f"
    p.write_bytes(bytes(range(256)) * 10)  # 2560 bytes
    f = HostFile(str(p))
    big, views = _views([1000, 1000, 1000, 100])
    f.preadv(views, 500)  # the file ends 60 bytes into the third buffer
    f.close()
    assert _guards_intact(big, [1000, 1000, 1000, 100])
    assert bytes(views[0]) + bytes(views[1]) + bytes(views[2][:60]) == p.read_bytes()[500:]
    assert bytes(views[2][60:]) == bytes(940) and bytes(views[3]) == bytes(100)
    assert [bytes(v) for v in iov_slice(views, 990, 1020)] == [bytes(views[0][990:]), bytes(views[1]),
                                                                bytes(views[2][:10])]
    assert iov_slice(views, 0, 3100) is views
