"""qemu-io and qemu-img as clients of ``qcowpy nbd``, with ``qemu-nbd`` serving the same image as the oracle."""
from __future__ import annotations

import json
import pytest

from .conftest import run, tool

pytestmark = pytest.mark.interop

IO_SCRIPT = ["write -P 0x11 4M 64k", "write -z 8M 64k", "aio_write -P 0x22 10M 4k", "aio_write -P 0x23 11M 4k",
             "aio_flush", "write -P 0x33 -f 12M 512", "discard 0 64k", "write -P 0 2M 128k", "flush"]


def make_image(qemu, path, fmt="qcow2"):
    qemu.create(path, "64M", fmt=fmt)
    qemu.io(path, "write -P 0x5a 0 1M", "write -z 2M 1M", "write -P 0x7f 30M 3k", fmt=fmt)
    return path


@pytest.mark.parametrize("fmt,extra", [("qcow2", []), ("raw", []), ("qcow2", ["--discard=unmap"]),
                                       ("qcow2", ["--detect-zeroes=on"]),
                                       ("qcow2", ["--discard=unmap", "--detect-zeroes=unmap"]),
                                       ("raw", ["--cache=writethrough"])])
def test_qemu_io_writes_land_like_qemu_nbd(qemu, start_server, tmp_path, fmt, extra):
    """The same qemu-io session against both servers leaves equal contents and (qcow2) equal qemu-img maps."""
    ours = make_image(qemu, tmp_path / f"ours.{fmt}", fmt)
    theirs = make_image(qemu, tmp_path / f"theirs.{fmt}", fmt)
    maps = []
    for kind, image in (("qcowpy", ours), ("qemu-nbd", theirs)):
        srv = start_server(kind, image, "-f", fmt, "-t", *extra)
        args = [tool("qemu-io"), "-f", "raw"]
        for c in IO_SCRIPT:
            args += ["-c", c]
        p = run(*args, srv.uri)
        assert "error" not in (p.stdout + p.stderr).lower(), p.stdout + p.stderr
        maps.append(run(tool("qemu-img"), "map", "--output=json", "-f", "raw", srv.uri).stdout)
        assert srv.stop() == 0
    if fmt == "qcow2":  # raw: qemu's file driver zeroes with fallocate, ours writes zeros (same contents)
        assert json.loads(maps[0]) == json.loads(maps[1])
    assert qemu.compare(ours, theirs, fmt, fmt).returncode == 0
    qemu.io(ours, "read -P 0x11 4M 64k", "read -P 0 8M 64k", "read -P 0x23 11M 4k", "read -P 0x33 12M 512", fmt=fmt)
    if fmt == "qcow2":
        qemu.assert_clean(ours)


def test_qemu_img_map_and_compare_over_nbd(qemu, start_server, tmp_path):
    """qemu-img map over our export equals qemu-img map over qemu-nbd's export of a backing chain."""
    base = make_image(qemu, tmp_path / "base.qcow2")
    top = tmp_path / "top.qcow2"
    qemu.create(top, None, backing=str(base), backing_fmt="qcow2")
    qemu.io(top, "write -P 0x44 1M 64k", "write -z 0 4k")
    ours = start_server("qcowpy", top, "-r", "-t", "-A")
    theirs = start_server("qemu-nbd", top, "-r", "-t", "-A")
    a = run(tool("qemu-img"), "map", "--output=json", "-f", "raw", ours.uri).stdout
    b = run(tool("qemu-img"), "map", "--output=json", "-f", "raw", theirs.uri).stdout
    assert json.loads(a) == json.loads(b)
    assert len(json.loads(a)) > 3
    assert run(tool("qemu-img"), "compare", "-f", "raw", "-F", "qcow2", ours.uri, str(top)).returncode == 0
    assert run(tool("qemu-img"), "compare", "-f", "raw", "-F", "raw", ours.uri, theirs.uri).returncode == 0


def test_read_only_export_refuses_a_writable_open(qemu, start_server, tmp_path):
    img = make_image(qemu, tmp_path / "ro.qcow2")
    srv = start_server("qcowpy", img, "-r", "-t")
    p = run(tool("qemu-io"), "-f", "raw", "-c", "write -P 1 0 4k", srv.uri, check=False)
    assert p.returncode != 0 and "Could not open image: Permission denied" in p.stderr  # as with qemu-nbd -r
    p = run(tool("qemu-io"), "-f", "raw", "-r", "-c", "read -P 0x5a 0 4k", srv.uri)
    assert "read 4096/4096" in p.stdout
    assert srv.stop() == 0
    qemu.io(img, "read -P 0x5a 0 1M")


def test_snapshot_mode_leaves_the_image_untouched(qemu, start_server, tmp_path):
    img = make_image(qemu, tmp_path / "s.qcow2")
    before = img.read_bytes()
    srv = start_server("qcowpy", img, "-s", "-t")
    run(tool("qemu-io"), "-f", "raw", "-c", "write -P 0x99 0 64k", "-c", "read -P 0x99 0 64k", srv.uri)
    assert srv.stop() == 0
    assert img.read_bytes() == before
