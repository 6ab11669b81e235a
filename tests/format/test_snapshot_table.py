"""The snapshot-table reader's limits, as QEMU's qcow2_read_snapshots applies them (iotest 261)."""
from __future__ import annotations

import pytest

from qcowpy.errors import CorruptImage
from qcowpy.format.snapshot import FIXED, MAX_TABLE_SIZE, read_entries

ID_LEN = NAME_LEN = 0xFFFF
EXTRA = 1024
ENTRY = FIXED.size + EXTRA + ID_LEN + NAME_LEN  # as the iotest lays them out, unpadded


def _table(count: int):
    """A pread over ``count`` entries with 65535-byte (all-NUL) ids and names, built lazily."""
    stride = (ENTRY + 7) & ~7
    fixed = FIXED.pack(0, 0, ID_LEN, NAME_LEN, 0, 0, 0, 0, EXTRA)

    def pread(n: int, off: int) -> bytes:
        rel = off % stride
        if rel == 0 and n == FIXED.size:
            return fixed
        return bytes(n)
    return pread


def test_table_over_64m_is_refused_with_the_overhang_count():
    fits = MAX_TABLE_SIZE // ((ENTRY + 7) & ~7)
    entries = list(read_entries(_table(fits), 0, fits))
    assert len(entries) == fits
    assert entries[0].sn.id_str == "" and entries[0].sn.name == ""  # C strings: they end at the NUL
    with pytest.raises(CorruptImage) as e:
        list(read_entries(_table(fits + 3), 0, fits + 3))
    assert str(e.value).startswith("Snapshot table is too big")
    assert "You can force-remove all 3 overhanging snapshots with qemu-img check -r all" in str(e.value)
    # check reads leniently and decides itself
    assert len(list(read_entries(_table(fits + 3), 0, fits + 3, lenient=True))) == fits + 3
