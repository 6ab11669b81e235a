"""Hostile images: malformed headers and tables give one clean error line (qemu-img's exit code),
in bounded time and memory (run under RLIMIT_AS = 1 GiB and RLIMIT_CPU in a subprocess), and a
read-only open never modifies the file (bytes and mtime unchanged)."""
from __future__ import annotations

import json
import os
import shutil
import struct
import subprocess
import sys
import time

import pytest

import qcowpy
from qcowpy.format import constants as C

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def _base(tmp_path) -> str:
    p = str(tmp_path / "base.qcow2")
    qcowpy.create(p, 4 << 20, cluster_size=65536)
    with qcowpy.open(p, "r+") as d:
        d.pwrite(b"A" * 70000, 0)
        d.write_compressed(bytes(range(256)) * 256, 2 << 20)
    return p


def _u64(buf, off):
    return struct.unpack_from(">Q", buf, off)[0]


def _l2_entry_off(buf, idx):
    l1 = _u64(buf, 40)
    return (_u64(buf, l1) & C.L1E_OFFSET_MASK) + 8 * idx


def _set(buf, off, fmt, value):
    struct.pack_into(fmt, buf, off, value)


MUTATIONS = {
    "bad_magic": lambda b: b.__setitem__(slice(0, 4), b"QFI\x00"),
    "version_1": lambda b: _set(b, 4, ">I", 1),
    "version_4": lambda b: _set(b, 4, ">I", 4),
    "cluster_bits_8": lambda b: _set(b, 20, ">I", 8),
    "cluster_bits_63": lambda b: _set(b, 20, ">I", 63),
    "huge_size": lambda b: _set(b, 24, ">Q", 1 << 62),
    "l1_size_huge": lambda b: _set(b, 36, ">I", 0x7FFFFFFF),
    "l1_offset_unaligned": lambda b: _set(b, 40, ">Q", _u64(b, 40) + 8),
    "l1_offset_past_eof": lambda b: _set(b, 40, ">Q", 1 << 40),
    "reftable_past_eof": lambda b: _set(b, 48, ">Q", 1 << 40),
    "reftable_huge": lambda b: _set(b, 56, ">I", 0xFFFFFFFF),
    "reftable_unaligned": lambda b: _set(b, 48, ">Q", _u64(b, 48) + 512),
    "too_many_snapshots": lambda b: _set(b, 60, ">I", 70000),
    "snapshot_table_past_eof": lambda b: (_set(b, 60, ">I", 3), _set(b, 64, ">Q", 1 << 40)),
    "unknown_incompat_bit": lambda b: _set(b, 72, ">Q", 1 << 40),
    "refcount_order_7": lambda b: _set(b, 96, ">I", 7),
    "header_length_huge": lambda b: _set(b, 100, ">I", 1 << 20),
    "extension_overflow": lambda b: b.__setitem__(slice(112, 120), struct.pack(">II", 0x1234, 0xFFFFFFF0)),
    "backing_name_too_long": lambda b: (_set(b, 8, ">Q", 512), _set(b, 16, ">I", 4096)),
    "backing_name_past_cluster": lambda b: (_set(b, 8, ">Q", 65530), _set(b, 16, ">I", 100)),
    "crypt_method": lambda b: _set(b, 32, ">I", 1),
    "l2_entry_past_eof": lambda b: _set(b, _l2_entry_off(b, 0), ">Q", (1 << 40) | C.OFLAG_COPIED),
    "l2_entry_unaligned": lambda b: _set(b, _l2_entry_off(b, 0), ">Q", _u64(b, _l2_entry_off(b, 0)) | 0x200),
    "l2_reserved_bits": lambda b: _set(b, _l2_entry_off(b, 0), ">Q", _u64(b, _l2_entry_off(b, 0)) | 0x2),
    "l1_entry_past_eof": lambda b: _set(b, _u64(b, 40), ">Q", (1 << 40) | C.OFLAG_COPIED),
    "compressed_garbage": lambda b: b.__setitem__(
        slice(_u64(b, _l2_entry_off(b, 32)) & ((1 << 54) - 1), (_u64(b, _l2_entry_off(b, 32)) & ((1 << 54) - 1)) + 64),
        b"\xff" * 64),
    "compressed_oversize": lambda b: _set(b, _l2_entry_off(b, 32), ">Q",
                                          _u64(b, _l2_entry_off(b, 32)) | (((1 << 8) - 1) << 54)),
    "truncated_header": lambda b: b.__delitem__(slice(50, None)),
    "truncated_tables": lambda b: b.__delitem__(slice(3 * 65536, None)),
    "empty": lambda b: b.clear(),
}


# Where qcowpy's open is deliberately stricter than QEMU 7.2's (which only checks table offsets for
# alignment and int64 overflow): we refuse at open time.
# ``check`` is not stricter: it reports tables past the end of the file as qemu-img check does.
STRICTER_THAN_QEMU = {"l1_offset_past_eof", "reftable_past_eof", "truncated_tables"}


def _qemu_info_code(path):
    if not shutil.which("qemu-img"):
        return None
    return subprocess.run(["qemu-img", "info", "-f", "qcow2", path], capture_output=True).returncode


def _qemu_check_code(path):
    if not shutil.which("qemu-img"):
        return None
    return subprocess.run(["qemu-img", "check", "-f", "qcow2", path], capture_output=True).returncode


@pytest.mark.parametrize("name", sorted(MUTATIONS))
def test_hostile_image(tmp_path, name):
    base = _base(tmp_path)
    buf = bytearray(open(base, "rb").read())
    MUTATIONS[name](buf)
    path = str(tmp_path / f"{name}.qcow2")
    with open(path, "wb") as f:
        f.write(buf)
    os.utime(path, ns=(1_000_000_000, 1_000_000_000))
    before = os.stat(path)
    t0 = time.monotonic()
    p = subprocess.run([sys.executable, "-m", "tests.hostile.driver", path, str(tmp_path / "out.raw")],
                       capture_output=True, text=True, cwd=ROOT, timeout=60)
    elapsed = time.monotonic() - t0
    assert p.returncode == 0, f"driver crashed (limits exceeded or uncaught error):\n{p.stdout}\n{p.stderr[-3000:]}"
    res = json.loads(p.stdout.strip().splitlines()[-1])
    assert elapsed < 30, f"{name}: took {elapsed:.1f}s"
    # every failure is one clean line (a QEMU-style hint line may follow, unprefixed)
    for cmd in ("info", "map", "convert", "compare"):
        r = res[cmd]
        if r["code"] != 0:
            lines = [ln for ln in r["err"].splitlines() if ln.startswith("qcowpy:")]
            assert len(lines) == 1 and "Traceback" not in r["err"], f"{cmd}: {r['err']}"
            # qemu-img: 1 for errors; compare: 2 open/usage errors, 3 a failed allocation query
            # ("Sector allocation test failed"), 4 read errors
            assert r["code"] in ((2, 3, 4) if cmd == "compare" else (1,)), (cmd, r)
    if not res["api"]["ok"]:
        assert "\n" not in res["api"]["error"] and res["api"]["error"]
    # qcowpy check (no -r): a one-line error (exit 1) or a corruption/leak report, with the exit
    # code qemu-img check gives on the same image; the file is left unchanged (checked below)
    chk = res["check"]
    assert chk["code"] in (0, 1, 2, 3) and "Traceback" not in chk["err"], chk
    if chk["code"] == 1:  # an open error, or QEMU's error reports ending in "Check failed: ..."
        prefixed = [ln for ln in chk["err"].splitlines() if ln.startswith("qcowpy:")]
        assert len(prefixed) == 1 or prefixed[-1].startswith("qcowpy: Check failed: "), chk
    qc = _qemu_check_code(path)
    if qc is not None:  # check opens as qemu-img check does (BDRV_O_CHECK), even where info is stricter
        assert chk["code"] == qc, f"{name}: qcowpy check exit {chk['code']}, qemu-img check {qc}\n{chk}"
    # qemu-img's verdict on opening the image is ours (info exit code)
    q = _qemu_info_code(path)
    if q is not None and name in STRICTER_THAN_QEMU:
        assert q == 0 and res["info"]["code"] == 1, (name, q, res["info"])
    elif q is not None:
        assert res["info"]["code"] == q, f"{name}: qcowpy info exit {res['info']['code']}, qemu-img {q}\n{res}"
    after = os.stat(path)
    assert open(path, "rb").read() == bytes(buf), "read-only use modified the file"
    assert after.st_mtime_ns == before.st_mtime_ns


def test_backing_loop(tmp_path):
    a = str(tmp_path / "a.qcow2")
    qcowpy.create(a, 1 << 20)
    b = str(tmp_path / "b.qcow2")
    qcowpy.create(b, 1 << 20, backing_file="a.qcow2", backing_fmt="qcow2")
    # rewrite a's header to point back at b: a -> b -> a
    with qcowpy.open(a, "r+") as dev:
        dev.change_backing_file("b.qcow2", None)
    with pytest.raises(qcowpy.QcowError, match="loop"):
        qcowpy.open(b)


@pytest.mark.parametrize("target", ["l1", "reftable"])
@pytest.mark.parametrize("length", [8, 16, 512])
def test_data_cluster_pointing_into_metadata_table(tmp_path, target, length):
    """A hostile L2 entry maps guest cluster 0 onto the L1 table (or the refcount table). A guest
    write there — however small, even one the size of a table entry — is a data write and must be
    refused: the corrupt bit is set and the table is not written, as qemu-io does on the same image."""
    if not shutil.which("qemu-io"):
        pytest.skip("qemu-io not installed")
    from qcowpy.errors import CorruptImage
    p = str(tmp_path / "base.qcow2")
    subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", p, "4M"], check=True)
    subprocess.run(["qemu-io", "-f", "qcow2", "-c", "write -P 1 0 64k", p], check=True, capture_output=True)
    buf = bytearray(open(p, "rb").read())
    table = _u64(buf, 40) if target == "l1" else _u64(buf, 48)
    _set(buf, _l2_entry_off(buf, 0), ">Q", table | C.OFLAG_COPIED)  # refcount 1: written in place
    with open(p, "wb") as f:
        f.write(buf)
    theirs = str(tmp_path / "qemu.qcow2")
    shutil.copy(p, theirs)
    q = subprocess.run(["qemu-io", "-f", "qcow2", "-c", f"write -P 0x77 0 {length}", theirs],
                       capture_output=True, text=True)
    name = "active L1 table" if target == "l1" else "refcount table"
    assert f"Preventing invalid write on metadata (overlaps with {name})" in q.stdout + q.stderr
    with qcowpy.open(p, "r+") as dev:
        with pytest.raises(CorruptImage, match=rf"overlaps with {name}"):
            dev.pwrite(b"\x77" * length, 0)
        with pytest.raises(qcowpy.QcowError):
            dev.pwrite(b"x", 1 << 20)  # no further writes
    out = open(p, "rb").read()
    assert out[table:table + 65536] == bytes(buf[table:table + 65536]), "metadata table overwritten"
    assert out == open(theirs, "rb").read()  # byte-identical to what qemu-io leaves: only the corrupt bit
    assert _u64(out, 72) & C.INCOMPAT_CORRUPT
