"""Broken snapshot tables (iotest 261 style): ``qcowpy check`` reports them as ``qemu-img check``
7.2 does — the same stdout, stderr (program name aside) and exit code, for human and JSON output —
and leaves the file unchanged without -r."""
from __future__ import annotations

import shutil
import struct

import pytest

from qcowpy.format import constants as C

from . import images as I
from .conftest import qcowpy_cli, qemu_img
from .test_check_vs_qemu import _same, clean_snapshot

_FIXED = ">QIHHIIQII"  # a snapshot table entry's fixed part (40 bytes)


def table_past_eof(p):
    I.create(p, "4M", "write -P 1 0 64k")
    I.poke(p, 60, struct.pack(">IQ", 3, 1 << 40))  # zeros are read: three incomplete entries
    return p


def more_snapshots_than_exist(p):
    clean_snapshot(p)
    I.poke(p, 60, struct.pack(">I", 4))  # entries 1..3 overhang the real table
    return p


def too_many_snapshots(p):
    I.create(p, "4M", "write -P 1 0 64k")
    I.poke(p, 60, struct.pack(">IQ", C.MAX_SNAPSHOTS + 100, 0x10000 * 5))
    return p


def unaligned_table_offset(p):
    clean_snapshot(p)
    I.poke(p, 64, struct.pack(">Q", I.u64(p, 64) + 8))
    return p


def too_much_extra_data(p):
    I.create(p, "4M", "write -P 1 0 64k")
    end = 0x10000 * 5
    I.poke(p, 60, struct.pack(">IQ", 1, end))
    I.poke(p, end, struct.pack(_FIXED, 0, 0, 1, 1, 0, 0, 0, 0, 2000) + bytes(2100))
    return p


def table_too_big(p):
    # 600 entries of 128 KiB each (longest id and name): past QEMU's 64 MiB table limit
    I.create(p, "4M", "write -P 1 0 64k")
    start = 0x10000 * 5
    n = 600
    I.poke(p, 60, struct.pack(">IQ", n, start))
    with open(p, "r+b") as f:
        off = start
        for _ in range(n):
            f.seek(off)
            f.write(struct.pack(_FIXED, 0, 0, 0xFFFF, 0xFFFF, 0, 0, 0, 0, 16))
            off = (off + 40 + 16 + 2 * 0xFFFF + 7) & ~7
        f.truncate(off)
    return p


def v3_entry_without_disk_size(p):
    clean_snapshot(p)
    off = I.u64(p, 64)
    I.poke(p, off + 36, struct.pack(">I", 8))  # extra data 16 -> 8: the entry becomes incomplete
    return p


CASES = [table_past_eof, more_snapshots_than_exist, too_many_snapshots, unaligned_table_offset,
         too_much_extra_data, table_too_big, v3_entry_without_disk_size]


@pytest.mark.parametrize("case", CASES, ids=lambda f: f.__name__)
def test_snapshot_table_check_matches_qemu(qemu_tools, tmp_path, case):
    p = case(str(tmp_path / "img.qcow2"))
    before = I.peek(p, 0, 1 << 30)
    theirs = qemu_img("check", p)
    assert theirs.code in (1, 2), theirs  # the damage is reported by the oracle
    _same(qcowpy_cli("check", p), theirs, "human")
    _same(qcowpy_cli("check", "--output=json", p), qemu_img("check", "--output=json", p), "json")
    assert I.peek(p, 0, 1 << 30) == before, "check without -r modified the image"


@pytest.mark.parametrize("case", CASES, ids=lambda f: f.__name__)
def test_snapshot_table_repair_matches_qemu(qemu_tools, tmp_path, case):
    """``check -r all`` repairs the table as qemu-img 7.2 does: the same output and exit code, the
    same verdict afterwards, the same snapshot list and the same guest data."""
    src = case(str(tmp_path / "src.qcow2"))
    a, b = str(tmp_path / "qemu.qcow2"), str(tmp_path / "ours.qcow2")
    shutil.copy(src, a)
    shutil.copy(src, b)
    _same(qcowpy_cli("check", "-r", "all", b), qemu_img("check", "-r", "all", a), "check -r all")
    after_a, after_b = qemu_img("check", a), qemu_img("check", b)
    assert (after_b.code, after_b.out) == (after_a.code, after_a.out.replace(a, b)), f"{after_b}\n{after_a}"
    if after_a.code in (0, 3):
        info_a, info_b = qemu_img("snapshot", "-l", a), qemu_img("snapshot", "-l", b)
        assert info_b.out.replace(b, a) == info_a.out and info_b.code == info_a.code
        cmp = qemu_img("compare", "-U", a, b)
        assert cmp.code == 0, cmp.out + cmp.err
