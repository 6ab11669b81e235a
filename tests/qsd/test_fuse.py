"""The FUSE export: the image as a regular file on the host. Oracles: a byte model of every
read/write/fallocate, the kernel's ext4 on a loop device over the file, then qemu-img check,
QEMU's raw conversion, e2fsck and debugfs."""
from __future__ import annotations

import errno
import hashlib
import os
import random
import shutil
import subprocess

import pytest

from .conftest import _require, need_tool

FALLOC_FL_KEEP_SIZE, FALLOC_FL_PUNCH_HOLE, FALLOC_FL_ZERO_RANGE = 1, 2, 0x10


@pytest.fixture
def fuse_ok():
    if not os.path.exists("/dev/fuse"):
        pytest.skip("/dev/fuse is missing: this machine cannot mount FUSE file systems")
    _require("fusermount3 (Debian package fuse3)", shutil.which("fusermount3") is not None)
    from qcowpy.export.keyval import OptionError
    from qcowpy.export.fuse import load_mfusepy
    try:
        load_mfusepy()
    except OptionError as e:
        _require(f"mfusepy with libfuse3 ({e})", False)


def _export(daemons, img: str, mnt: str, extra: str = ",writable=on", fmt: str = "qcow2"):
    open(mnt, "w").close()
    return daemons(["--blockdev", f"driver={fmt},node-name=n,file.driver=file,file.filename={img}",
                    "--export", f"type=fuse,id=f,node-name=n,mountpoint={mnt}{extra}"], [mnt])


def _wait_mounted(mnt: str, size: int) -> None:
    import time
    for _ in range(200):
        if os.path.getsize(mnt) == size:
            return
        time.sleep(0.05)
    pytest.fail("FUSE export did not appear")


def _map_shared(qemu, img: str) -> list[dict]:
    """qemu-img map of an image the daemon holds open (-U: no lock)."""
    import json
    return json.loads(qemu.img("map", "-U", "--output=json", img).stdout)


def _fallocate(fd: int, mode: int, offset: int, length: int) -> None:
    import ctypes
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.fallocate(fd, mode, ctypes.c_long(offset), ctypes.c_long(length)) != 0:
        e = ctypes.get_errno()
        raise OSError(e, os.strerror(e))


def test_byte_model(fuse_ok, qemu, daemons, tmp_path):
    size = 8 << 20
    base, img, mnt = str(tmp_path / "base.raw"), str(tmp_path / "a.qcow2"), str(tmp_path / "disk")
    qemu.create(base, size, fmt="raw")
    qemu.io(base, "write -P 0x77 0 8M", fmt="raw")
    qemu.create(img, None, backing=base, backing_fmt="raw", cluster_size=65536)
    model = bytearray(b"\x77" * size)
    d = _export(daemons, img, mnt)
    _wait_mounted(mnt, size)
    rng = random.Random(12)
    fd = os.open(mnt, os.O_RDWR)
    try:
        for _ in range(150):
            op = rng.choice(["w", "w", "r", "punch", "zero"])
            off = rng.randrange(0, size)
            n = rng.randrange(1, 200_000)
            if op == "w":
                data = bytes([rng.randrange(256)]) * n
                got = os.pwrite(fd, data, off)
                assert got == min(n, size - off)  # short write at the end of the image
                model[off:off + got] = data[:got]
            elif op == "r":
                assert os.pread(fd, n, off) == bytes(model[off:off + n])
            else:
                mode = (FALLOC_FL_PUNCH_HOLE if op == "punch" else FALLOC_FL_ZERO_RANGE) | FALLOC_FL_KEEP_SIZE
                _fallocate(fd, mode, off, n)
                end = min(off + n, size)
                model[off:end] = bytes(end - off)
        os.fsync(fd)
        with pytest.raises(OSError) as e:
            _fallocate(fd, 0, 0, 4096)  # plain allocation inside the image: as QSD
        assert e.value.errno == errno.EOPNOTSUPP
        assert os.pread(fd, size + 10, 0) == bytes(model)
        # SEEK_DATA / SEEK_HOLE against qemu-img map of the same (flushed) image
        extents = _map_shared(qemu, img)
        assert any(not e["data"] for e in extents)  # holes to find (the kernel alone would see none)
        for off in [0, 1, 65535, 65536, size // 3, size // 2, size - 1] + [rng.randrange(size) for _ in range(20)]:
            want_data = next((max(off, e["start"]) for e in extents
                              if e["data"] and e["start"] + e["length"] > off), None)
            want_hole = next((max(off, e["start"]) for e in extents
                              if not e["data"] and e["start"] + e["length"] > off), size)
            if want_data is None:
                with pytest.raises(OSError) as e:
                    os.lseek(fd, off, os.SEEK_DATA)
                assert e.value.errno == errno.ENXIO
            else:
                assert os.lseek(fd, off, os.SEEK_DATA) == want_data, off
            assert os.lseek(fd, off, os.SEEK_HOLE) == want_hole, off
    finally:
        os.close(fd)
    code, err = d.terminate()
    assert code == 0, err
    assert os.path.getsize(mnt) == 0  # unmounted: the empty mountpoint file is back
    qemu.assert_clean(img)
    assert qemu.to_raw(img, tmp_path / "out.raw") == bytes(model)
    with open(base, "rb") as f:
        assert f.read() == b"\x77" * size


def test_read_only_export(fuse_ok, qemu, daemons, tmp_path):
    img, mnt = str(tmp_path / "a.qcow2"), str(tmp_path / "disk")
    qemu.create(img, "1M")
    qemu.io(img, "write -P 0x42 0 1M")
    d = _export(daemons, img, mnt, extra="")
    _wait_mounted(mnt, 1 << 20)
    with open(mnt, "rb") as f:
        assert f.read() == b"\x42" * (1 << 20)
    with pytest.raises(OSError) as e:
        os.open(mnt, os.O_WRONLY)
    assert e.value.errno in (errno.EACCES, errno.EROFS)
    assert d.terminate()[0] == 0
    qemu.assert_clean(img)


def test_loop_mount_ext4(fuse_ok, qemu, daemons, tmp_path):
    _require("root (losetup and mount)", os.geteuid() == 0)
    size = 64 << 20
    base, img, mnt, mdir = (str(tmp_path / "base.raw"), str(tmp_path / "a.qcow2"), str(tmp_path / "disk"),
                            str(tmp_path / "m"))
    qemu.create(base, size, fmt="raw")
    qemu.io(base, "write -P 0x5a 0 4M", fmt="raw")
    qemu.create(img, None, backing=base, backing_fmt="raw")
    with open(base, "rb") as f:
        base_md5 = hashlib.md5(f.read()).hexdigest()
    d = _export(daemons, img, mnt)
    _wait_mounted(mnt, size)
    subprocess.run([need_tool("mkfs.ext4"), "-q", "-F", mnt], check=True)
    os.mkdir(mdir)
    subprocess.run(["mount", "-o", "loop", mnt, mdir], check=True)
    written = {}
    try:
        for i in range(6):
            data = random.Random(i).randbytes(100_000 * (i + 1))
            with open(f"{mdir}/f{i}", "wb") as f:
                f.write(data)
            written[f"f{i}"] = hashlib.md5(data).hexdigest()
        with open(f"{mdir}/gone", "wb") as f:
            f.write(os.urandom(4 << 20))
        os.sync()
        os.unlink(f"{mdir}/gone")
        trim = subprocess.run(["fstrim", "-v", mdir], capture_output=True, text=True)
        assert trim.returncode == 0, trim.stderr
    finally:
        subprocess.run(["umount", mdir], check=True)
    code, err = d.terminate()
    assert code == 0, err
    qemu.assert_clean(img)
    with open(base, "rb") as f:
        assert hashlib.md5(f.read()).hexdigest() == base_md5
    raw = str(tmp_path / "out.raw")
    qemu.img("convert", "-O", "raw", img, raw)
    fsck = subprocess.run([need_tool("e2fsck"), "-fn", raw], capture_output=True, text=True)
    assert fsck.returncode == 0, fsck.stdout
    for name, md5 in written.items():
        data = subprocess.run([need_tool("debugfs"), "-R", f"cat /{name}", raw], capture_output=True).stdout
        assert hashlib.md5(data).hexdigest() == md5
