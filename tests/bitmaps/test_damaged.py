"""Damaged bitmap directories and tables, answered as qemu-img 7.2 answers them.

An image qemu-img made with two bitmaps and data is patched in one place (directory entry
fields, bitmap table entries, extension counts), and ``info``, ``check``, ``check -r all`` and
``bitmap --add`` run with qcowpy and qemu-img on identical copies: same exit code, stdout and
stderr; after a repair both copies check the same; a refused read-write open leaves the file
untouched.
"""
from __future__ import annotations

import struct

import pytest

from tests.cli.helpers import as_qemu, qcowpy as run

from . import oracle as Q

EXT_BITMAPS = 0x23852875


def _ext(buf: bytearray) -> int:
    off = (struct.unpack_from(">I", buf, 100)[0] + 7) & ~7
    while True:
        t, n = struct.unpack_from(">II", buf, off)
        assert t, "no bitmaps extension"
        if t == EXT_BITMAPS:
            return off + 8
        off += 8 + ((n + 7) & ~7)


def _dir(buf: bytearray) -> int:
    return struct.unpack_from(">Q", buf, _ext(buf) + 16)[0]


def _table(buf: bytearray) -> int:
    return struct.unpack_from(">Q", buf, _dir(buf))[0]


def _set(fmt: str, where, value):
    def patch(b: bytearray) -> None:
        off = where(b)
        struct.pack_into(fmt, b, off, value(b, struct.unpack_from(fmt, b, off)[0]) if callable(value) else value)
    return patch


CASES = {
    "table_entry_reserved_bit": _set(">Q", _table, lambda b, v: v | 2),
    "table_entry_unaligned": _set(">Q", _table, lambda b, v: v + 512),
    "table_entry_all_ones_with_offset": _set(">Q", _table, lambda b, v: v | 1),
    "table_entry_past_eof": _set(">Q", _table, 1 << 40),
    "table_entry_all_ones": _set(">Q", lambda b: _table(b) + 8, 1),
    "table_size_plus_one": _set(">I", lambda b: _dir(b) + 8, lambda b, v: v + 1),
    "table_size_zero": _set(">I", lambda b: _dir(b) + 8, 0),
    "table_offset_past_eof": _set(">Q", _dir, 1 << 40),
    "table_offset_unaligned": _set(">Q", _dir, lambda b, v: v + 8),
    "flags_reserved": _set(">I", lambda b: _dir(b) + 12, lambda b, v: v | 4),
    "type_two": _set(">B", lambda b: _dir(b) + 16, 2),
    "granularity_bits_8": _set(">B", lambda b: _dir(b) + 17, 8),
    "granularity_bits_32": _set(">B", lambda b: _dir(b) + 17, 32),
    "extra_data": _set(">I", lambda b: _dir(b) + 20, 8),
    "name_size_huge": _set(">H", lambda b: _dir(b) + 18, 2000),
    "nb_bitmaps_plus_one": _set(">I", _ext, lambda b, v: v + 1),
    "nb_bitmaps_minus_one": _set(">I", _ext, lambda b, v: v - 1),
    "directory_size_plus_8": _set(">Q", lambda b: _ext(b) + 8, lambda b, v: v + 8),
    "duplicate_names": lambda b: b.__setitem__(slice(_dir(b) + 24, _dir(b) + 26), b"b1"),
    "in_use_first": _set(">I", lambda b: _dir(b) + 12, lambda b, v: v | 1),
}


@pytest.fixture(scope="module")
def source(tmp_path_factory):
    p = tmp_path_factory.mktemp("dmg") / "src.qcow2"
    assert Q.img("create", "-q", "-f", "qcow2", "-o", "cluster_size=4k", p, "16M").returncode == 0
    assert Q.img("bitmap", "--add", "-g", "512", p, "b0").returncode == 0
    assert Q.img("bitmap", "--add", p, "b1").returncode == 0
    Q.io(p, "write 0 1M", "write 9M 64k")
    return p


def _pair(tmp_path, source, name):
    buf = bytearray(source.read_bytes())
    CASES[name](buf)
    theirs, ours = tmp_path / "theirs.qcow2", tmp_path / "ours.qcow2"
    theirs.write_bytes(bytes(buf))
    ours.write_bytes(bytes(buf))
    return theirs, ours


def _qemu_stderr(text: str) -> str:
    """qemu-img's stderr without QEMU's failure to free clusters past the end of the file when it
    drops a bitmap table that names one (qcowpy does not count, so does not free, such clusters)."""
    return "".join(ln for ln in text.splitlines(True) if not ln.startswith("qcow2_free_clusters failed"))


def _same(theirs, ours, *args):
    want = Q.img(*[theirs if a == "IMG" else a for a in args])
    want.stderr = _qemu_stderr(want.stderr)
    got = run(*[ours if a == "IMG" else a for a in args])
    norm = (lambda s, p: as_qemu(s).replace(str(p), "IMG"))
    assert (got.code, norm(got.out, ours), norm(got.err, ours)) == \
        (want.returncode, want.stdout.replace(str(theirs), "IMG"), want.stderr.replace(str(theirs), "IMG")), args
    return got.code


@pytest.mark.parametrize("name", sorted(CASES))
def test_damaged_bitmaps_like_qemu_img(tmp_path, source, name):
    theirs, ours = _pair(tmp_path, source, name)
    _same(theirs, ours, "info", "IMG")
    _same(theirs, ours, "check", "IMG")
    before = ours.read_bytes()
    if _same(theirs, ours, "bitmap", "--add", "IMG", "new") == 1 and "Operation add" not in \
            Q.img("bitmap", "--add", theirs, "other").stderr:
        assert ours.read_bytes() == before, "a refused read-write open changed the file"
    theirs, ours = _pair(tmp_path, source, name)
    _same(theirs, ours, "check", "-r", "all", "IMG")
    assert Q.img("check", ours).returncode == Q.img("check", theirs).returncode
    assert Q.bitmaps(ours) == Q.bitmaps(theirs) if Q.img("info", theirs).returncode == 0 else True
