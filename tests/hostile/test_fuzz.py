"""Bounded property-based fuzzing (hypothesis over raw bytes) of header/extension parsing, table
parsing, reads and the consistency check of mutated small images.

Property: whatever the bytes, qcowpy either works or raises a QcowError subclass — no other
exception escapes, nothing hangs (each example is bounded by hypothesis' deadline), and a
read-only open never writes. The default run is small; a longer one:

    QCOWPY_FUZZ_EXAMPLES=20000 python -m pytest tests/hostile/test_fuzz.py -p no:cacheprovider
"""
from __future__ import annotations

import os
import struct

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import qcowpy
from qcowpy.errors import QcowError
from qcowpy.format.entries import unpack_table
from qcowpy.format.header import parse_header
from qcowpy.format.snapshot import parse_snapshot_table
from qcowpy.qcow2.check import check_file
from tests.crash.harness import RecordingFile, open_on

EXAMPLES = int(os.environ.get("QCOWPY_FUZZ_EXAMPLES", "150"))
SETTINGS = settings(max_examples=EXAMPLES, deadline=None, suppress_health_check=list(HealthCheck),
                    database=None)


def _seed_image() -> bytes:
    import tempfile
    with tempfile.TemporaryDirectory() as d:
        p = os.path.join(d, "s.qcow2")
        qcowpy.create(p, 256 << 10, cluster_size=512, backing_file=None)
        with qcowpy.open(p, "r+") as dev:
            dev.pwrite(b"\x11" * 3000, 0)
            dev.pwrite(b"\x22" * 512, 100 << 10)
            dev.write_compressed(bytes(range(256)) * 2, 200 << 10)
            dev.write_zeroes(1024, 150 << 10)
        with open(p, "rb") as f:
            return f.read()


SEED = _seed_image()


class _NoWrite(RecordingFile):
    def pwrite(self, data, offset):  # a read-only open must never write
        raise AssertionError(f"write at {offset} during read-only use")

    def truncate(self, size):
        raise AssertionError("truncate during read-only use")


def _exercise(buf: bytes) -> None:
    f = _NoWrite(buf, writable=False)
    try:
        img = open_on(f, False)
    except QcowError:
        return
    try:
        n = min(img.size, 512 << 10)
        try:
            img.pread(n, 0)
        except QcowError:
            pass
        try:
            img.layer_extents(0, n)
        except QcowError:
            pass
        try:
            check_file(f, img.header, 0)
        except QcowError:
            pass
    finally:
        img.close()


mutations = st.lists(st.tuples(st.integers(0, len(SEED) - 1), st.binary(min_size=1, max_size=8)),
                     min_size=1, max_size=6)


@SETTINGS
@given(mutations)
def test_fuzz_mutated_image(muts):
    buf = bytearray(SEED)
    for off, data in muts:
        buf[off:off + len(data)] = data
    _exercise(bytes(buf))


@SETTINGS
@given(st.lists(st.tuples(st.integers(0, 1023), st.binary(min_size=1, max_size=8)), min_size=1, max_size=8),
       st.integers(0, len(SEED)))
def test_fuzz_header_area_and_truncation(muts, cut):
    buf = bytearray(SEED)
    for off, data in muts:  # concentrate on the header, extensions and the first tables
        buf[off:off + len(data)] = data
    _exercise(bytes(buf[:max(cut, 0)]))


@SETTINGS
@given(st.binary(max_size=4096), st.integers(0, 1 << 40))
def test_fuzz_parse_header(raw, file_size):
    try:
        h = parse_header(raw, file_size)
    except QcowError:
        return
    assert 9 <= h.cluster_bits <= 21 and h.version in (2, 3)


@SETTINGS
@given(st.binary(max_size=2048), st.integers(0, 70000))
def test_fuzz_snapshot_table(raw, count):
    try:
        snaps = parse_snapshot_table(raw, count)
    except QcowError:
        return
    assert len(snaps) == count


@SETTINGS
@given(st.binary(max_size=512).map(lambda b: b[:len(b) // 8 * 8]))
def test_fuzz_table_roundtrip(raw):
    assert struct.pack(f">{len(raw) // 8}Q", *unpack_table(raw)) == raw
