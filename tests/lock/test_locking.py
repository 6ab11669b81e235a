"""QEMU-compatible image locking, tested in both directions against live qemu-io / qemu-img."""
from __future__ import annotations

import os
import shutil
import subprocess
import time

import pytest

import qcowpy
from qcowpy.errors import ImageLocked
from qcowpy.lock import PERM_BASE, SHARED_BASE, _held_by_other

pytestmark = pytest.mark.interop


@pytest.fixture
def tools():
    if not (shutil.which("qemu-img") and shutil.which("qemu-io")):
        if os.environ.get("QCOWPY_REQUIRE_QEMU"):
            pytest.fail("qemu-img/qemu-io required (QCOWPY_REQUIRE_QEMU is set) but not found")
        pytest.skip("qemu-img/qemu-io not installed")


@pytest.fixture
def image(tools, tmp_path):
    p = str(tmp_path / "img.qcow2")
    subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", p, "1M"], check=True)
    return p


LOCK_BYTES = [PERM_BASE + i for i in range(4)] + [SHARED_BASE + i for i in range(4)]  # QEMU 7.2: 4 permissions


def _lock_byte_held(path: str, byte: int) -> bool:
    fd = os.open(path, os.O_RDONLY)
    try:
        return _held_by_other(fd, byte)
    finally:
        os.close(fd)


class LiveQemuIo:
    """qemu-io kept running with the image open (commands on stdin), like a VM holding its disk."""

    def __init__(self, path: str, read_only: bool = False):
        argv = ["qemu-io", "-f", "qcow2"] + (["-r"] if read_only else []) + [path]
        self.proc = subprocess.Popen(argv, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                     stderr=subprocess.STDOUT)
        # QEMU takes its lock bytes one fcntl at a time, and may re-apply them as permissions
        # settle: wait until it holds the consistent-read byte and the set stops changing
        deadline, held, stable = time.monotonic() + 10, None, 0
        while stable < 5:
            assert self.proc.poll() is None, self.proc.stdout.read().decode()
            assert time.monotonic() < deadline, "qemu-io did not open the image"
            time.sleep(0.02)
            now = _held_bytes(path)
            stable = stable + 1 if now == held and PERM_BASE in now else 0
            held = now

    def close(self):
        self.proc.stdin.close()
        self.proc.wait(10)


def _held_bytes(path: str) -> list[int]:
    return [b for b in LOCK_BYTES if _lock_byte_held(path, b)]


def run(*argv):
    return subprocess.run(list(argv), capture_output=True, text=True)


def test_lock_bytes_match_qemu(image):
    """qcowpy takes exactly the bytes qemu-io takes for the same access (as /proc/locks shows)."""
    for read_only in (False, True):
        q = LiveQemuIo(image, read_only=read_only)
        theirs = _held_bytes(image)
        q.close()
        with qcowpy.open(image, "r" if read_only else "r+"):
            ours = _held_bytes(image)
        assert ours == theirs, (read_only, ours, theirs)


def test_qcowpy_refuses_image_qemu_writes(image):
    q = LiveQemuIo(image)
    try:
        with pytest.raises(ImageLocked, match='Failed to get "write" lock'):
            qcowpy.open(image, "r+")
        with pytest.raises(ImageLocked, match='Failed to get shared "write" lock'):
            qcowpy.open(image, "r")
        from qcowpy.block.open import open_image
        with open_image(image, "r", force_share=True) as dev:  # -U: inspection still works
            assert dev.size == 1 << 20
    finally:
        q.close()
    with qcowpy.open(image, "r+") as dev:  # released when qemu-io exits
        dev.pwrite(b"x", 0)


def test_qemu_refuses_image_qcowpy_writes(image):
    with qcowpy.open(image, "r+") as dev:
        dev.pwrite(b"y" * 512, 0)
        dev.flush()
        p = run("qemu-img", "info", image)
        assert p.returncode == 1 and 'Failed to get shared "write" lock' in p.stderr, p.stderr
        assert "Is another process using the image" in p.stderr
        p = run("qemu-img", "info", "-U", image)
        assert p.returncode == 0, p.stderr
        p = run("qemu-io", "-f", "qcow2", "-c", "write 0 512", image)
        assert 'Failed to get "write" lock' in p.stdout + p.stderr
    assert run("qemu-img", "info", image).returncode == 0  # released on close


def test_readers_share(image):
    q = LiveQemuIo(image, read_only=True)
    try:
        with qcowpy.open(image, "r") as dev:  # two readers coexist
            assert dev.pread(512, 0) == bytes(512)
        with pytest.raises(ImageLocked, match='Failed to get "write" lock'):
            qcowpy.open(image, "r+")
    finally:
        q.close()
    with qcowpy.open(image, "r"):
        assert run("qemu-img", "info", image).returncode == 0
        p = run("qemu-io", "-f", "qcow2", "-c", "write 0 512", image)
        assert "lock" in p.stdout + p.stderr


def test_check_respects_locks(image):
    from tests.check.conftest import qcowpy_cli
    q = LiveQemuIo(image)
    try:
        r = qcowpy_cli("check", "-r", "all", image)
        assert r.code == 1 and 'Failed to get "write" lock' in r.err
        r = qcowpy_cli("check", image)
        assert r.code == 1 and 'Failed to get shared "write" lock' in r.err
        r = qcowpy_cli("check", "-U", image)
        assert r.code == 0 and "No errors were found" in r.out
    finally:
        q.close()


def test_locking_can_be_disabled(image, monkeypatch):
    q = LiveQemuIo(image)
    try:
        monkeypatch.setenv("QCOWPY_LOCKING", "off")
        with qcowpy.open(image, "r"):
            pass
    finally:
        q.close()


@pytest.mark.parametrize("fmt", ["qcow2", "raw"])
def test_create_over_held_image_fails_without_destroying_it(image, fmt):
    """Creating over an image a live qemu-io holds fails on the lock, as qemu-img create does, and
    the image is left intact (the file is truncated only after the lock is taken)."""
    from tests.check.conftest import qcowpy_cli
    subprocess.run(["qemu-io", "-f", "qcow2", "-c", "write -P 0x5a 0 64k", image], check=True,
                   capture_output=True)
    with open(image, "rb") as f:
        before = f.read()
    q = LiveQemuIo(image)
    try:
        p = run("qemu-img", "create", "-q", "-f", fmt, image, "2M")  # the oracle refuses too
        assert p.returncode == 1 and 'Failed to get "write" lock' in p.stderr, p.stderr
        with pytest.raises(ImageLocked, match='Failed to get "write" lock'):
            qcowpy.create(image, "2M", format=fmt)
        r = qcowpy_cli("create", "-q", "-f", fmt, image, "2M")
        assert r.code == p.returncode and 'Failed to get "write" lock' in r.err, r.err
        with open(image, "rb") as f:
            assert f.read() == before
    finally:
        q.close()
    assert run("qemu-img", "check", image).returncode == 0
    p = run("qemu-io", "-f", "qcow2", "-c", "read -P 0x5a 0 64k", image)
    assert p.returncode == 0 and "Pattern verification failed" not in p.stdout, p.stdout
