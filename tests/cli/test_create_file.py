"""``create -f file`` (QEMU's file protocol named as the format: a bare file, like raw) and the
file-posix preallocation messages raw shares, each against qemu-img."""
from __future__ import annotations

import os

import pytest

from .helpers import as_qemu, qcowpy, qemu

CASES = [
    ["-f", "file", "{}", "1M"],
    ["-f", "file", "{}", "7000"],
    ["-f", "file", "-o", "preallocation=full", "{}", "64k"],
    ["-f", "file", "-o", "preallocation=falloc", "{}", "64k"],
    ["-f", "file", "-o", "preallocation=metadata", "{}", "1M"],
    ["-f", "file", "-o", "preallocation=bogus", "{}", "1M"],
    ["-f", "raw", "-o", "preallocation=metadata", "{}", "1M"],
    ["-f", "raw", "-o", "preallocation=bogus", "{}", "1M"],
    ["-f", "file", "-b", "base.qcow2", "-F", "qcow2", "{}", "1M"],
    ["-f", "file", "-o", "backing_file=base.qcow2", "{}", "1M"],
    ["-f", "file", "-o", "cluster_size=4k", "{}", "1M"],
    ["-f", "file", "{}"],
    ["-q", "-f", "file", "{}", "2M"],
]


@pytest.mark.parametrize("args", CASES, ids=lambda a: " ".join(a))
def test_create_file_as_qemu_img(tmp_path, qemu_img, args):
    assert qemu(qemu_img, "create", "-q", "-f", "qcow2", "base.qcow2", "1M", cwd=tmp_path).code == 0
    want = qemu(qemu_img, "create", *[a.format("theirs") for a in args], cwd=tmp_path)
    got = qcowpy("create", *[a.format("ours") for a in args], cwd=tmp_path)
    assert (got.code, got.out.replace("ours", "theirs"), as_qemu(got.err).replace("ours", "theirs")) == \
        (want.code, want.out, want.err)
    ours, theirs = tmp_path / "ours", tmp_path / "theirs"
    assert ours.exists() == theirs.exists()
    if theirs.exists():
        assert os.path.getsize(ours) == os.path.getsize(theirs)
        assert ours.read_bytes() == theirs.read_bytes()


@pytest.mark.parametrize("args", [["-o", "help"], ["-o", "help", "x"]], ids=lambda a: " ".join(a))
def test_option_help_lists_what_qcowpy_takes(tmp_path, qemu_img, args):
    want = qemu(qemu_img, "create", "-f", "file", *args, cwd=tmp_path)
    got = qcowpy("create", "-f", "file", *args, cwd=tmp_path)
    assert got.code == want.code == 0
    ours = [line for line in got.out.splitlines() if line.startswith("  ")]
    assert ours and set(ours) <= set(want.out.splitlines())  # a subset (docs/parity.toml says which)
    assert [line for line in got.out.splitlines() if not line.startswith("  ")] == \
        [line for line in want.out.splitlines() if not line.startswith("  ")]


def test_measure_refuses_file(qemu_img):
    want = qemu(qemu_img, "measure", "-O", "file", "--size", "1M")
    got = qcowpy("measure", "-O", "file", "--size", "1M")
    assert (got.code, got.out, as_qemu(got.err)) == (want.code, want.out, want.err)


@pytest.mark.parametrize("args", [["1G"], ["3000"], ["-o", "preallocation=falloc", "64k"], ["0"]])
def test_new_raw_file_maps_as_qemu_img(tmp_path, qemu_img, args):
    """file-posix allocates a new file's first block (4 KiB, or one sector when smaller): the
    map of what we create is qemu-img's, so measure and convert see the same data."""
    assert qcowpy("create", "-q", "-f", "raw", *args[:-1], tmp_path / "ours", args[-1]).code == 0
    assert qemu(qemu_img, "create", "-q", "-f", "raw", *args[:-1], tmp_path / "theirs", args[-1]).code == 0
    maps = [qemu(qemu_img, "map", "--output=json", "-f", "raw", tmp_path / n).out for n in ("ours", "theirs")]
    assert maps[0] == maps[1]
    assert (tmp_path / "ours").read_bytes() == (tmp_path / "theirs").read_bytes()
