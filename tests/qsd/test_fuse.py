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


def _fuse_growable_session(mnt: str) -> list:
    """Writes past the end of a growable export, a truncate up, and what the file shows after."""
    seen = []
    fd = os.open(mnt, os.O_RDWR)
    try:
        seen.append(os.pwrite(fd, b"\x61" * 65536, (1 << 20) + 4096))    # past the 1 MiB end
        seen.append(os.fstat(fd).st_size)
        os.ftruncate(fd, 3 << 20)
        seen.append(os.fstat(fd).st_size)
        seen.append(hashlib.md5(os.pread(fd, 3 << 20, 0)).hexdigest())
        os.fsync(fd)
    finally:
        os.close(fd)
    return seen


def test_growable_grows_the_image_like_qemu_storage_daemon(fuse_ok, qemu, qsd_binary, daemons, tmp_path):
    """growable=on: a write past the end grows the image (QSD: the same sizes and bytes)."""
    results = []
    for name, qsd in (("qsd", True), ("ours", False)):
        img, mnt = str(tmp_path / f"{name}.qcow2"), str(tmp_path / f"{name}.disk")
        qemu.create(img, "1M")
        qemu.io(img, "write -P 0x42 0 1M")
        open(mnt, "w").close()
        d = daemons(["--blockdev", f"driver=qcow2,node-name=n,file.driver=file,file.filename={img}",
                     "--export", f"type=fuse,id=f,node-name=n,mountpoint={mnt},writable=on,growable=on"],
                    [mnt], qsd=qsd)
        _wait_mounted(mnt, 1 << 20)
        seen = _fuse_growable_session(mnt)
        code, err = d.terminate()
        assert code == 0, err
        qemu.assert_clean(img)
        seen.append(qemu.info_json(img)["virtual-size"])
        qemu.io(img, "read -P 0x42 0 1M", "read -P 0 1M 4k", "read -P 0x61 1028k 64k", "read -P 0 1092k 1956k")
        results.append(seen)
    theirs, ours = results
    assert ours == theirs
    assert ours[0] == 65536 and ours[1] == (1 << 20) + 4096 + 65536 and ours[2] == ours[4] == 3 << 20


def test_qmp_added_fuse_export(fuse_ok, qemu, qsd_binary, daemons, tmp_path):
    """block-export-add type=fuse over QMP, I/O through the file, block-export-del unmounts it;
    the replies and the image match qemu-storage-daemon's."""
    from .test_qmp import QMP, norm

    results = []
    for name, qsd in (("qsd", True), ("ours", False)):
        os.mkdir(tmp_path / name)
        img, mnt, qmp_path = (str(tmp_path / name / "a.qcow2"), str(tmp_path / name / "disk"),
                              str(tmp_path / name / "qmp"))
        qemu.create(img, "4M")
        open(mnt, "w").close()
        d = daemons(["--blockdev", f"driver=qcow2,node-name=n,file.driver=file,file.filename={img}",
                     "--chardev", f"socket,id=c,path={qmp_path},server=on,wait=off", "--monitor", "chardev=c"],
                    [qmp_path], qsd=qsd)
        q = QMP(qmp_path)
        out = [norm(q.cmd("qmp_capabilities"))]
        out.append(norm(q.call("block-export-add", {"type": "fuse", "id": "f", "node-name": "n",
                                                    "mountpoint": mnt, "writable": True})))
        again = norm(q.call("block-export-add", {"type": "fuse", "id": "g", "node-name": "n", "mountpoint": mnt}))
        out.append(tuple(str(x).replace(f"/{name}/", "/X/") for x in again))  # a mount point already
        out.append(norm(q.cmd("query-block-exports"), detail=False))
        _wait_mounted(mnt, 4 << 20)
        with open(mnt, "r+b") as f:
            f.seek(8192)
            f.write(b"\x77" * 16384)
            f.flush()
            os.fsync(f.fileno())
            f.seek(0)
            out.append(hashlib.md5(f.read()).hexdigest())
        out.append(norm(q.cmd("block-export-del", id="f")))
        for _ in range(200):  # the unmount completes after the reply
            if os.path.getsize(mnt) == 0:
                break
            import time
            time.sleep(0.05)
        out.append(os.path.getsize(mnt))
        out.append(norm(q.cmd("query-block-exports"), detail=False))
        out.append(norm(q.cmd("quit")))
        q.close()
        assert d.proc.wait(timeout=30) == 0
        qemu.assert_clean(img)
        qemu.io(img, "read -P 0 0 8k", "read -P 0x77 8k 16k", "read -P 0 24k 4072k")
        results.append(out)
    theirs, ours = results
    for i, (a, b) in enumerate(zip(ours, theirs)):
        assert a == b, f"step {i}: ours {a!r} QSD {b!r}"
