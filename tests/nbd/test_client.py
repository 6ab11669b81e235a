"""The nbd:// client driver: qcowpy's commands on exports served by qemu-nbd (and by qcowpy nbd),
with qemu-img on the same URIs as the oracle."""
from __future__ import annotations

import json
import re
import subprocess

import pytest

import qcowpy
from qcowpy.block.nbd import parse_uri
from qcowpy.errors import QcowError

from .conftest import child_env, free_port, qcowpy_argv, run, tool, wait_for_port

pytestmark = pytest.mark.interop


def qcowpy_cli(*args: str, check: bool = True):
    return run(*qcowpy_argv(*args), check=check, env=child_env())


def make_image(qemu, path):
    qemu.create(path, "64M")
    qemu.io(path, "write -P 0x5a 0 1M", "write -z 2M 1M", "write -P 0x31 63M 64k", "write -P 0x77 20M 4k")
    return path


@pytest.mark.parametrize("serve_fmt", ["qcow2", "raw"])
def test_info_and_map_equal_qemu_img(qemu, start_server, tmp_path, serve_fmt):
    """qemu-nbd -f qcow2 exports the guest view (raw); -f raw exports the qcow2 file, probed as qcow2."""
    img = make_image(qemu, tmp_path / "t.qcow2")
    srv = start_server("qemu-nbd", img, "-f", serve_fmt, "-t", "-r")
    for cmd in (["info"], ["info", "--output=json"], ["map", "--output=json"], ["map"]):
        ours = qcowpy_cli(*cmd, srv.uri).stdout
        theirs = run(tool("qemu-img"), *cmd, srv.uri).stdout
        assert ours == theirs, cmd
    if serve_fmt == "raw":
        assert '"format": "qcow2"' in qcowpy_cli("info", "--output=json", srv.uri).stdout


def test_compare_convert_dd_measure(qemu, start_server, tmp_path):
    img = make_image(qemu, tmp_path / "t.qcow2")
    srv = start_server("qemu-nbd", img, "-f", "qcow2", "-t", "-r")
    assert qcowpy_cli("compare", "-F", "qcow2", srv.uri, str(img)).stdout == "Images are identical.\n"
    out = tmp_path / "c.qcow2"
    qcowpy_cli("convert", "-O", "qcow2", srv.uri, str(out))
    assert qemu.compare(out, img).returncode == 0
    # sparse: what the export reports as zero is not written, exactly as qemu-img convert leaves it
    ref = tmp_path / "ref.qcow2"
    run(tool("qemu-img"), "convert", "-O", "qcow2", srv.uri, str(ref))
    assert [(e["start"], e["length"], e["data"]) for e in qemu.map_json(out)] == \
        [(e["start"], e["length"], e["data"]) for e in qemu.map_json(ref)]
    assert sum(e["length"] for e in qemu.map_json(out) if e["data"]) == (1 << 20) + (128 << 10)
    assert qcowpy_cli("measure", "-O", "qcow2", srv.uri).stdout == \
        run(tool("qemu-img"), "measure", "-O", "qcow2", srv.uri).stdout
    dd_out = tmp_path / "dd.raw"
    qcowpy_cli("dd", "-O", "raw", "bs=1M", "count=2", f"if={srv.uri}", f"of={dd_out}")
    assert dd_out.read_bytes()[:1 << 20] == b"\x5a" * (1 << 20) and dd_out.stat().st_size == 2 << 20


@pytest.mark.parametrize("server", ["qemu-nbd", "qcowpy"])
def test_convert_into_an_existing_export(qemu, start_server, tmp_path, server):
    src = make_image(qemu, tmp_path / "src.qcow2")
    dst = tmp_path / "dst.qcow2"
    qemu.create(dst, "64M")
    qemu.io(dst, "write -P 0xee 0 64M")
    srv = start_server(server, dst, "-f", "qcow2", "-t", "--discard=unmap")
    qcowpy_cli("convert", "-n", "-f", "qcow2", "-O", "raw", str(src), srv.uri)
    assert srv.stop() == 0
    assert qemu.compare(src, dst).returncode == 0
    qemu.assert_clean(dst)


def test_python_api_reads_writes_and_status(qemu, start_server, tmp_path):
    img = make_image(qemu, tmp_path / "t.qcow2")
    srv = start_server("qemu-nbd", img, "-f", "qcow2", "-t")
    with qcowpy.open(srv.uri, "r+") as dev:
        assert dev.size == 64 << 20 and dev.format == "raw"
        assert dev.pread(4, (1 << 20) - 2) == b"\x5a\x5a\x00\x00"
        dev.pwrite(b"hello", 5 << 20)
        dev.write_zeroes(1 << 20, 0)
        dev.flush()
        kinds = [(e.start, e.length, e.data, e.zero) for e in dev.block_status(0, 4 << 20)]
        assert kinds[0][2:] == (False, True)
        with pytest.raises(QcowError):
            dev.truncate(1 << 30)
    assert srv.stop() == 0
    qemu.io(img, "read -P 0 0 1M", "read -P 0x68 5M 1")
    qemu.assert_clean(img)


def test_read_only_export_and_errors(qemu, start_server, tmp_path):
    img = make_image(qemu, tmp_path / "t.qcow2")
    srv = start_server("qemu-nbd", img, "-f", "qcow2", "-t", "-r")
    with pytest.raises(QcowError, match="Permission denied"):
        qcowpy.open(srv.uri, "r+")
    p = qcowpy_cli("info", f"nbd+unix:///?socket={tmp_path}/nothing", check=False)
    q = run(tool("qemu-img"), "info", f"nbd+unix:///?socket={tmp_path}/nothing", check=False)
    assert p.returncode == q.returncode == 1
    assert p.stderr.replace("qcowpy", "qemu-img") == q.stderr
    p = qcowpy_cli("info", srv.uri.replace("///", "///nope"), check=False)
    assert p.returncode == 1 and "Requested export not available" in p.stderr


@pytest.mark.parametrize("uri,want", [
    ("nbd://example.org/disk", ("disk", None, "example.org", 10809)),
    ("nbd://127.0.0.1:1234", ("", None, "127.0.0.1", 1234)),
    ("nbd+unix:///e%20x?socket=/run/s", ("e x", "/run/s", None, 10809)),
    ("nbd:unix:/run/s:exportname=e", ("e", "/run/s", None, 10809)),
    ("nbd:localhost:99", ("", None, "localhost", 99)),
])
def test_uri_forms(uri, want):
    a = parse_uri(uri)
    assert (a.export, a.socket_path, a.host, a.port) == want


def test_tcp_uri_against_qcowpy_server(qemu, tmp_path):
    img = make_image(qemu, tmp_path / "t.qcow2")
    port = free_port()
    proc = subprocess.Popen(qcowpy_argv("nbd", "-b", "127.0.0.1", "-p", port, "-t", "-r", img), env=child_env(),
                            stderr=subprocess.PIPE)
    try:
        uri = f"nbd://127.0.0.1:{port}"
        wait_for_port(port, proc)
        assert json.loads(qcowpy_cli("map", "--output=json", uri).stdout) == \
            json.loads(run(tool("qemu-img"), "map", "--output=json", uri).stdout)
    finally:
        proc.terminate()
        proc.wait(20)


def test_qcow2_in_an_export_with_its_backing_file(qemu, start_server, tmp_path):
    """qemu-nbd -f raw serves a qcow2 overlay: probed as qcow2, its absolutely named backing file opens
    too, so info/map equal qemu-img's; a relative backing name fails as in QEMU."""
    base = make_image(qemu, tmp_path / "base.qcow2")
    top = tmp_path / "top.qcow2"
    qemu.create(top, None, backing=str(base), backing_fmt="qcow2")
    qemu.io(top, "write -P 0x44 1M 64k")
    rel = tmp_path / "rel.qcow2"
    qemu.img("create", "-q", "-f", "qcow2", "-b", "base.qcow2", "-F", "qcow2", str(rel))
    srv = start_server("qemu-nbd", top, "-f", "raw", "-t", "-r")
    for cmd in (["info", "--backing-chain"], ["map", "--output=json"], ["map"]):
        assert qcowpy_cli(*cmd, srv.uri).stdout == run(tool("qemu-img"), *cmd, srv.uri).stdout, cmd
    srv2 = start_server("qemu-nbd", rel, "-f", "raw", "-t", "-r")
    ours = qcowpy_cli("map", srv2.uri, check=False)
    theirs = run(tool("qemu-img"), "map", srv2.uri, check=False)
    assert ours.returncode == theirs.returncode == 1
    assert ours.stderr.replace("qcowpy:", "qemu-img:") == theirs.stderr


def test_qcow2_written_straight_into_an_export_as_qemu_img(qemu, start_server, tmp_path):
    """iotest 302: convert -O qcow2 -c into a raw export (a window of a tar file) with no -n: the
    export is the qcow2 image's host file, so the file holds the bytes qemu-img writes there,
    and info/check/compare over the URI say what qemu-img says."""
    src = make_image(qemu, tmp_path / "src.qcow2")
    files, uris = {}, {}
    for who in ("ours", "theirs"):
        files[who] = tmp_path / f"{who}.ova"
        files[who].write_bytes(b"\xa5" * 1536 + bytes(4 << 20))
        uris[who] = start_server("qemu-nbd", files[who], "-f", "raw", "--offset", "1536", "-t").uri
    convert = ["convert", "-f", "qcow2", "-O", "qcow2", "-c", str(src)]
    qcowpy_cli(*convert, uris["ours"])
    run(tool("qemu-img"), *convert, uris["theirs"])
    for cmd in (["info"], ["check"], ["check", "--output=json"], ["compare", str(src)]):
        ours = re.sub(r"qemu-nbd-\d+\.sock", "S", qcowpy_cli(*cmd, uris["ours"]).stdout)
        theirs = re.sub(r"qemu-nbd-\d+\.sock", "S", run(tool("qemu-img"), *cmd, uris["theirs"]).stdout)
        assert ours == theirs, cmd
    assert files["ours"].read_bytes() == files["theirs"].read_bytes()
