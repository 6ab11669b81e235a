"""A luks node in the storage daemon (``--blockdev driver=luks,key-secret=ID,file...``): its
plaintext served over NBD to qemu-img, and its open failures worded as qemu-storage-daemon's."""
from __future__ import annotations

import subprocess
import sys

import pytest

from qcowpy.block.create import create_image

from .conftest import env

MiB = 1 << 20


def _node(path, extra: str = "") -> list[str]:
    return ["--blockdev", f"driver=luks,node-name=l0{extra},file.driver=file,file.filename={path}"]


def test_luks_node_exported_over_nbd(qemu, daemons, tmp_path):
    img = tmp_path / "d.luks"
    create_image(str(img), MiB, "luks", secret="pw", iter_time=10)
    plain = tmp_path / "plain.raw"
    plain.write_bytes(bytes(range(256)) * (MiB // 256))
    sock = tmp_path / "nbd.sock"
    d = daemons(["--object", "secret,id=s0,data=pw", *_node(img, ",key-secret=s0"),
                 "--nbd-server", f"addr.type=unix,addr.path={sock}",
                 "--export", "type=nbd,id=e0,node-name=l0,name=disk,writable=on"], [str(sock)])
    uri = f"nbd+unix:///disk?socket={sock}"
    p = subprocess.run([qemu.qemu_img_path, "convert", "-n", "-f", "raw", "-O", "raw", plain, uri], capture_output=True, text=True)
    assert p.returncode == 0, p.stderr
    assert d.terminate()[0] == 0
    p = subprocess.run([qemu.qemu_img_path, "compare", "--object", "secret,id=s0,data=pw", "json:{\"driver\": \"luks\", "
                        f"\"key-secret\": \"s0\", \"file\": {{\"filename\": \"{img}\"}}}}", plain],
                       capture_output=True, text=True)
    assert (p.returncode, p.stdout) == (0, "Images are identical.\n"), p.stderr


@pytest.mark.parametrize("extra", [[], ["--object", "secret,id=s0,data=wrong"], ["--object", "secret,id=s1,data=x"]])
def test_luks_node_refusals_as_qemu_storage_daemon(qsd_binary, tmp_path, extra):
    img = tmp_path / "d.luks"
    create_image(str(img), MiB, "luks", secret="pw", iter_time=10)
    args = [*extra, *_node(img, ",key-secret=s0" if extra else "")]
    ours = subprocess.run([sys.executable, "-m", "qcowpy.cli.main", "storage-daemon", *args], env=env(),
                          capture_output=True, text=True, timeout=60)
    theirs = subprocess.run([qsd_binary, *args], capture_output=True, text=True, timeout=60)
    assert ours.returncode == theirs.returncode == 1
    assert ours.stderr.replace("qcowpy:", "qemu-storage-daemon:", 1) == theirs.stderr
