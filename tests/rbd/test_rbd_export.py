"""Ceph images served by qcowpy: ``qcowpy nbd rbd:...`` and the storage daemon's
``--blockdev driver=rbd``. Oracles: qemu-img/qemu-io as NBD clients, the kernel's view of the
FUSE file, and qemu-img reading the rbd image itself."""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time

import pytest

from tests.rbd.conftest import env, qcowpy, qemu_img, qemu_io


def _wait(path, proc, timeout=30.0, size=None):
    deadline = time.monotonic() + timeout
    while not os.path.exists(path) or (size is not None and os.path.getsize(path) != size):
        if proc.poll() is not None:
            pytest.fail(f"server exited {proc.returncode}: {proc.communicate()}")
        if time.monotonic() > deadline:
            pytest.fail(f"server not ready in {timeout}s")
        time.sleep(0.05)


def test_nbd_serves_rbd_image(ceph, image, tmp_path):
    name = ceph.name(image)
    qemu_img("create", "-f", "raw", name, "16M")
    qemu_io(name, "write -P 0x21 0 1M", "write -P 0x43 9M 64k")
    sock = tmp_path / "s"
    proc = subprocess.Popen([sys.executable, "-m", "qcowpy", "nbd", "-t", "-f", "raw", "-k", str(sock), name],
                            env=env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    try:
        _wait(sock, proc)
        uri = f"nbd+unix:///?socket={sock}"
        assert qemu_img("compare", "-f", "raw", "-F", "raw", uri, name).returncode == 0
        via_nbd = json.loads(qemu_img("map", "--output=json", "-f", "raw", uri).stdout)
        direct = json.loads(qemu_img("map", "--output=json", "-f", "raw", name).stdout)
        assert [(e["start"], e["length"], e["data"], e["zero"]) for e in via_nbd] == \
            [(e["start"], e["length"], e["data"], e["zero"]) for e in direct]
        qemu_io(uri, "write -P 0x65 4M 128k")
    finally:
        proc.terminate()
        proc.wait(timeout=30)
    qemu_io(name, "read -P 0x65 4M 128k", "read -P 0x21 0 1M")


def test_storage_daemon_blockdev_rbd_over_fuse(ceph, image, tmp_path):
    if not os.path.exists("/dev/fuse") or shutil.which("fusermount3") is None:
        pytest.skip("FUSE is not available here")
    name = ceph.name(image)
    size = 8 << 20
    qemu_img("create", "-f", "raw", name, str(size))
    qemu_io(name, "write -P 0x99 1M 1M")
    mnt = tmp_path / "disk"
    mnt.write_bytes(b"")
    proc = subprocess.Popen([sys.executable, "-m", "qcowpy", "storage-daemon", "--blockdev",
                             f"driver=rbd,node-name=n,pool=rbd,image={image},conf={ceph.conf}",
                             "--export", f"type=fuse,id=f,node-name=n,mountpoint={mnt},writable=on"],
                            env=env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    try:
        _wait(mnt, proc, size=size)
        with open(mnt, "r+b") as f:
            assert f.read(2 << 20)[1 << 20:] == b"\x99" * (1 << 20)
            f.seek(5 << 20)
            f.write(b"\x5a" * 65536)
            f.flush()
            os.fsync(f.fileno())
    finally:
        proc.terminate()
        proc.wait(timeout=30)
        subprocess.run(["fusermount3", "-u", str(mnt)], capture_output=True)
    qemu_io(name, "read -P 0x5a 5M 64k", "read -P 0x99 1M 1M")
    assert qcowpy("compare", name, name).returncode == 0
