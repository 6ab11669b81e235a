"""``qcowpy nbd -B NAME`` side by side with ``qemu-nbd -B NAME``: the same metadata contexts
(nbdinfo --json), the same dirty ranges (nbdinfo --map=qemu:dirty-bitmap:NAME), live on a
writable export after writes over NBD, and the same refusals."""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time

import pytest

from . import oracle as Q


def _server(kind: str, sock, *args):
    if kind == "qcowpy":
        env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [os.getcwd(), os.environ.get("PYTHONPATH")])))
        argv = [sys.executable, "-m", "qcowpy", "nbd"]
    else:
        env, argv = None, [Q.tool("qemu-nbd")]
    return subprocess.Popen([*argv, "-k", str(sock), *map(str, args)], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, env=env)


def _wait(proc, sock) -> None:
    deadline = time.monotonic() + 30
    while not sock.exists():
        assert proc.poll() is None, proc.communicate()
        assert time.monotonic() < deadline
        time.sleep(0.05)
    time.sleep(0.1)


def _nbdinfo(sock, *args) -> str:
    p = subprocess.run([Q.tool("nbdinfo"), *args, f"nbd+unix:///?socket={sock}"], capture_output=True, text=True,
                       timeout=60)
    assert p.returncode == 0, p.stderr
    return p.stdout


@pytest.fixture
def image(tmp_path):
    p = tmp_path / "nb.qcow2"
    assert Q.img("create", "-q", "-f", "qcow2", p, "64M").returncode == 0
    assert Q.img("bitmap", "--add", p, "z").returncode == 0
    assert Q.img("bitmap", "--add", "-g", "4k", "--disable", p, "y").returncode == 0
    Q.io(p, "write 0 100k", "write 3M 1M")
    assert Q.img("bitmap", "--merge", "z", p, "y").returncode == 0
    Q.io(p, "write 30M 10k")
    return p


def _views(kind: str, tmp_path, image, writes: list[str], *args) -> list:
    img = tmp_path / f"{kind}.qcow2"
    shutil.copy(image, img)
    sock = tmp_path / f"{kind}.sock"
    proc = _server(kind, sock, "-t", "-f", "qcow2", *args, img)
    try:
        _wait(proc, sock)
        if writes:
            out = subprocess.run([Q.tool("qemu-io"), "-f", "raw", *sum((["-c", w] for w in writes), []),
                                  f"nbd+unix:///?socket={sock}"], capture_output=True, text=True)
            assert out.returncode == 0, out.stderr
        listing = json.loads(_nbdinfo(sock, "--json"))["exports"][0]["contexts"]
        maps = [_nbdinfo(sock, f"--map=qemu:dirty-bitmap:{n}") for n in ("z", "y")]
        return [listing, *maps, _nbdinfo(sock, "--map")]
    finally:
        proc.kill()
        proc.communicate()


@pytest.mark.parametrize("writes,args", [([], ["-r"]), (["write 40M 5000", "write -z 50M 64k"], [])],
                         ids=["read-only", "writable"])
def test_dirty_bitmap_contexts_like_qemu_nbd(tmp_path, image, writes, args):
    mine = _views("qcowpy", tmp_path, image, writes, *args, "-B", "z", "-B", "y")
    theirs = _views("qemu-nbd", tmp_path, image, writes, *args, "-B", "z", "-B", "y")
    assert mine == theirs


@pytest.mark.parametrize("name", ["nope", "z"])
def test_refusals_like_qemu_nbd(tmp_path, image, name):
    if name == "z":  # make z inconsistent: a writer that never closed the image
        subprocess.run([sys.executable, "-c", "import qcowpy, os\n"
                        f"d = qcowpy.open({str(image)!r}, 'r+'); d.pwrite(b'x', 0); d.flush(); os._exit(0)"],
                       check=True, env=dict(os.environ, PYTHONPATH=os.getcwd()))
    out = {}
    for kind in ("qcowpy", "qemu-nbd"):
        proc = _server(kind, tmp_path / f"{kind}.sock", "-r", "-f", "qcow2", "-B", name, image)
        _, err = proc.communicate(timeout=60)
        out[kind] = (proc.returncode, err.replace("qcowpy:", "qemu-nbd:"))
    assert out["qcowpy"] == out["qemu-nbd"]
