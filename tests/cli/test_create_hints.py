"""The file driver's creation options ``nocow`` and ``extent_size_hint`` (qemu-img lists them for
a local file; they are hints to the host file system): same Formatting line, messages, warnings,
exit codes and bytes as qemu-img, on the test's file system and on tmpfs (where XFS's extent
size hint cannot be set, so an explicit one is warned about)."""
from __future__ import annotations

import filecmp
import os

import pytest

from .helpers import as_qemu, qcowpy as run, qemu

CASES = [
    ["-f", "qcow2", "-o", "extent_size_hint=0,nocow=on"],
    ["-f", "qcow2", "-o", "extent_size_hint=256k"],
    ["-f", "raw", "-o", "extent_size_hint=4k"],
    ["-f", "raw", "-o", "nocow=on,preallocation=falloc"],
    ["-f", "qcow2", "-o", "extent_size_hint=8G"],  # over UINT32_MAX: refused before the file exists
    ["-f", "qcow2", "-o", "nocow=maybe"],
]


def _dirs(tmp_path):
    out = [tmp_path]
    if os.path.isdir("/dev/shm") and os.access("/dev/shm", os.W_OK):
        out.append("/dev/shm")
    return out


@pytest.mark.parametrize("args", CASES, ids=lambda a: " ".join(a[1:]))
def test_create_hints_like_qemu_img(tmp_path, qemu_img, args):
    for d in _dirs(tmp_path):
        a, b = os.path.join(d, f"hint-q-{os.getpid()}"), os.path.join(d, f"hint-o-{os.getpid()}")
        try:
            want = qemu(qemu_img, "create", *args, a, "1M")
            got = run("create", *args, b, "1M")
            norm = [(r.code, r.out.replace(p, "X"), as_qemu(r.err).replace(p, "X")) for r, p in ((got, b), (want, a))]
            assert norm[0] == norm[1], d
            assert os.path.exists(a) == os.path.exists(b)
            if os.path.exists(a):
                assert filecmp.cmp(a, b, shallow=False)
        finally:
            for p in (a, b):
                if os.path.exists(p):
                    os.unlink(p)


def test_help_lists_the_file_options_only_with_a_filename(qemu_img, tmp_path):
    for args in (["-f", "qcow2", "-o", "help"], ["-f", "qcow2", "-o", "help", str(tmp_path / "x")],
                 ["-f", "raw", "-o", "help", str(tmp_path / "x")]):
        want, got = qemu(qemu_img, "create", *args), run("create", *args)
        assert ("extent_size_hint" in got.out, "nocow" in got.out) == \
               ("extent_size_hint" in want.out, "nocow" in want.out)
