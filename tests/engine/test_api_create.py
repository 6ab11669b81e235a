"""qcowpy.create: sizes and options as qemu-img takes them, checked against qemu-img's own files."""
from __future__ import annotations

import pytest

import qcowpy
from qcowpy.errors import QcowError


def test_size_strings_make_the_same_file_as_qemu_img(qemu, tmp_path):
    ours, theirs = tmp_path / "a.qcow2", tmp_path / "b.qcow2"
    qcowpy.create(str(ours), "20G", cluster_size="64k")
    qemu.create(str(theirs), 20 << 30)
    assert ours.read_bytes() == theirs.read_bytes()


@pytest.mark.parametrize("size,expected", [("1.5M", 1572864), ("4k", 4096), (1000, 1024), ("1000", 1024)])
def test_size_parsing_and_512_rounding(tmp_path, size, expected):
    path = str(tmp_path / "x.qcow2")
    qcowpy.create(path, size)
    with qcowpy.open(path) as dev:
        assert dev.size == expected


@pytest.mark.parametrize("size", ["1.5", "-1", "12Q", -5])
def test_bad_sizes_raise_clear_errors(tmp_path, size):
    with pytest.raises(QcowError):
        qcowpy.create(str(tmp_path / "x.qcow2"), size)
    assert not (tmp_path / "x.qcow2").exists()
