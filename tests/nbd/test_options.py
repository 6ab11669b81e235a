"""qemu-nbd options beyond plain serving: -L (list a server's exports), -o (offset), --image-opts and
-B (dirty bitmaps as qemu:dirty-bitmap:NAME), each against qemu-nbd or a byte model."""
from __future__ import annotations

import os
import subprocess
import sys
import threading

import pytest

from .conftest import child_env, qcowpy_argv, tool


def _list(argv: list[str]) -> str:
    p = subprocess.run(argv, capture_output=True, text=True, env=child_env(), timeout=60)
    assert p.returncode == 0, p.stderr
    return p.stdout


@pytest.mark.parametrize("server", ["qemu-nbd", "qcowpy"])
def test_list_prints_what_qemu_nbd_prints(server, start_server, qemu, tmp_path):
    img = tmp_path / "a.qcow2"
    qemu.create(img, "64M")
    srv = start_server(server, img, "-f", "qcow2", "-t", "-e", "3", "-A", "-x", "ex", "-D", "a description")
    ours = _list(qcowpy_argv("nbd", "-L", "-k", str(srv.sock)))
    theirs = _list([tool("qemu-nbd"), "-L", "-k", str(srv.sock)])
    assert ours == theirs
    assert ours.startswith("exports available: 1\n export: 'ex'\n  description: a description\n")
    assert "   qemu:allocation-depth\n" in ours


def test_list_of_a_storage_daemon_with_several_exports(qemu, tmp_path):
    img, sock, pid = tmp_path / "a.qcow2", tmp_path / "nbd", tmp_path / "pid"
    qemu.create(img, "64M")
    d = subprocess.Popen([sys.executable, "-m", "qcowpy.cli.main", "storage-daemon",
                          "--blockdev", f"driver=qcow2,node-name=n,file.driver=file,file.filename={img}",
                          "--nbd-server", f"addr.type=unix,addr.path={sock}",
                          "--export", "type=nbd,id=a,node-name=n,writable=on",
                          "--export", "type=nbd,id=b,node-name=n,name=second,description=two",
                          "--pidfile", str(pid)], env=child_env(), stderr=subprocess.PIPE, text=True)
    try:
        for _ in range(400):
            if pid.exists() or d.poll() is not None:
                break
            threading.Event().wait(0.05)
        assert pid.exists(), d.stderr.read() if d.poll() is not None else "daemon not ready"
        ours = _list(qcowpy_argv("nbd", "-L", "-k", str(sock)))
        theirs = _list([tool("qemu-nbd"), "-L", "-k", str(sock)])
        assert ours == theirs and ours.startswith("exports available: 2\n")
    finally:
        d.terminate()
        assert d.wait(30) == 0
    qemu.assert_clean(img)


def test_offset_exports_the_tail_like_qemu_nbd(start_server, qemu, tmp_path):
    """-o over a qcow2 overlay whose data partly comes from its backing file: nbdcopy (which skips
    what block status calls zero) must copy the same bytes out of both servers."""
    base, img = tmp_path / "base.raw", tmp_path / "a.qcow2"
    qemu.create(base, "4M", fmt="raw")
    qemu.io(str(base), "write -P 0x11 0 2M", fmt="raw")
    qemu.create(img, "4M", backing=str(base), backing_fmt="raw")
    qemu.io(str(img), "write -P 0x22 1M 64k", "write -z 1536k 64k")
    outs = []
    for kind in ("qemu-nbd", "qcowpy"):
        srv = start_server(kind, img, "-r", "-f", "qcow2", "-o", "66048", "-t")
        out = tmp_path / f"{kind}.raw"
        p = subprocess.run([tool("nbdcopy"), srv.uri, str(out)], capture_output=True, text=True, timeout=120)
        assert p.returncode == 0, p.stderr
        outs.append(out.read_bytes())
        srv.stop()
    theirs, ours = outs
    assert len(ours) == (4 << 20) - 66048
    assert ours == theirs
    full = tmp_path / "full.raw"
    qemu.img("convert", "-O", "raw", str(img), str(full))
    assert ours == full.read_bytes()[66048:66048 + len(ours)]


def test_image_opts(start_server, qemu, tmp_path):
    img = tmp_path / "a.qcow2"
    qemu.create(img, "8M")
    srv = start_server("qcowpy", f"driver=qcow2,file.driver=file,file.filename={img}", "--image-opts", "-t")
    p = subprocess.run([tool("qemu-io"), "-f", "raw", "-c", "write -P 0x5c 4096 64k", srv.uri], capture_output=True,
                       text=True, timeout=60)
    assert p.returncode == 0, p.stderr
    assert srv.stop() == 0
    qemu.assert_clean(img)
    qemu.io(str(img), "read -P 0x5c 4096 64k", "read -P 0 69632 64k")


class _BitmapDevice:
    """A raw image with a made-up dirty bitmap: what the server needs from the block layer."""

    def __init__(self, dev, dirty: list[tuple[int, int]]):
        self._dev, self._dirty = dev, dirty

    def __getattr__(self, name):
        return getattr(self._dev, name)

    def bitmaps(self):
        from qcowpy.block.device import BitmapInfo
        return [BitmapInfo(b"b", 1, 16)]

    def bitmap_dirty(self, name: bytes) -> list[tuple[int, int]]:
        """The engine's form: dirty (offset, length) ranges of the whole disk."""
        assert name == b"b"
        return self._dirty


def test_dirty_bitmap_context_maps_the_bitmap(qemu, tmp_path):
    """The NBD side of -B: qemu:dirty-bitmap:b is listed and nbdinfo --map reads the dirty runs."""
    import socket
    from qcowpy.block.open import open_image
    from qcowpy.export.nbd import Export, NbdServer
    from qcowpy.export.nbd.bitmap import bitmap_readers

    img = tmp_path / "a.raw"
    qemu.create(img, "4M", fmt="raw")
    dirty = [(65536, 131072), (1 << 20, 4096), (3 << 20, 1 << 20)]
    dev = _BitmapDevice(open_image(str(img), "r", "raw"), dirty)
    exp = Export(dev, "", read_only=True, bitmaps=bitmap_readers(dev, ["b"], writable=False))
    sock_path = str(tmp_path / "s")
    ls = socket.socket(socket.AF_UNIX)
    ls.bind(sock_path)
    ls.listen(4)
    ls.setblocking(False)
    server = NbdServer([exp], [ls], shared=0, persistent=True)
    t = threading.Thread(target=server.serve_forever, daemon=True)
    t.start()
    try:
        uri = f"nbd+unix:///?socket={sock_path}"
        info = subprocess.run([tool("nbdinfo"), "--list", uri], capture_output=True, text=True, timeout=60)
        assert "qemu:dirty-bitmap:b" in info.stdout, info.stdout + info.stderr
        p = subprocess.run([tool("nbdinfo"), "--map=qemu:dirty-bitmap:b", uri], capture_output=True, text=True,
                           timeout=60)
        assert p.returncode == 0, p.stderr
        runs = [tuple(int(x) for x in ln.split()[:3]) for ln in p.stdout.splitlines()]
        expected, pos = [], 0
        for start, n in dirty:
            if start > pos:
                expected.append((pos, start - pos, 0))
            expected.append((start, n, 1))
            pos = start + n
        assert runs == expected
    finally:
        server.shutdown()
        t.join(30)
        ls.close()
        dev.close()


def test_bitmap_option_on_a_real_bitmap(start_server, qemu, tmp_path):
    """-B NAME on a qcow2 persistent bitmap: the map equals qemu-nbd's when the engine reads bitmap
    data; until it does, qcowpy refuses with a plain message instead of exporting a wrong map."""
    img = tmp_path / "a.qcow2"
    qemu.create(img, "4M")
    qemu.img("bitmap", "--add", str(img), "b")
    qemu.io(str(img), "write -P 1 64k 128k", "write -P 2 3M 4k")
    theirs = start_server("qemu-nbd", img, "-r", "-f", "qcow2", "-B", "b", "-t")
    want = subprocess.run([tool("nbdinfo"), "--map=qemu:dirty-bitmap:b", theirs.uri], capture_output=True, text=True,
                          timeout=60).stdout
    theirs.stop()
    from qcowpy.block.open import open_image
    with open_image(str(img), "r", "qcow2") as dev:
        readable = hasattr(dev, "bitmap_dirty")
    if readable:
        ours = start_server("qcowpy", img, "-r", "-f", "qcow2", "-B", "b", "-t")
        got = subprocess.run([tool("nbdinfo"), "--map=qemu:dirty-bitmap:b", ours.uri], capture_output=True,
                             text=True, timeout=60).stdout
        assert got == want
    else:
        p = subprocess.run(qcowpy_argv("nbd", "-r", "-f", "qcow2", "-B", "b", "-k", str(tmp_path / "s"), str(img)),
                           capture_output=True, text=True, env=child_env(), timeout=60)
        assert p.returncode == 1
        assert p.stderr == "qcowpy: Bitmap 'b' cannot be read: this build does not read bitmap data yet\n"
    assert "dirty" in want  # the oracle saw the writes
    assert not os.path.exists(tmp_path / "s")


def test_trace_is_accepted_and_ignored(start_server, qemu, tmp_path):
    """-T PATTERN (qemu-nbd's trace events) is accepted; qcowpy has no trace events, it just serves."""
    img = tmp_path / "a.raw"
    qemu.create(img, "1M", fmt="raw")
    srv = start_server("qcowpy", img, "-f", "raw", "-T", "nbd_*", "-T", "enable=nbd_negotiate*")
    p = subprocess.run([tool("nbdinfo"), "--size", srv.uri], capture_output=True, text=True, timeout=60)
    assert p.returncode == 0 and p.stdout.strip() == str(1 << 20), p.stderr
    assert srv.wait_exit() == 0
    assert srv.proc.stderr.read() == ""
