"""``qcowpy nbd -l``: export an internal snapshot read-only, as ``qemu-nbd -l`` does."""
from __future__ import annotations

import re
import subprocess

import pytest

from .conftest import child_env, qcowpy_argv, run, tool

pytestmark = pytest.mark.interop


@pytest.fixture
def image(qemu, tmp_path):
    img = tmp_path / "sn.qcow2"
    qemu.create(img, "16M")
    qemu.io(img, "write -P 1 0 1M", "write -P 3 8M 64k")
    qemu.img("snapshot", "-c", "first", str(img))
    qemu.io(img, "write -P 2 0 1M", "write -z 8M 64k")
    qemu.img("resize", "-q", str(img), "32M")
    return img


@pytest.mark.parametrize("key", ["1", "first", "snapshot.id=1", "snapshot.name=first",
                                 "snapshot.id=1,snapshot.name=first"])
def test_snapshot_export_equals_qemu_nbds(qemu, start_server, image, tmp_path, key):
    ours = start_server("qcowpy", image, "-t", "-l", key)
    theirs = start_server("qemu-nbd", image, "-t", "-l", key)
    info = [run(tool("nbdinfo"), "--json", s.uri).stdout.replace(str(s.sock), "SOCK") for s in (ours, theirs)]
    assert info[0] == info[1] and '"is_read_only": true' in info[0] and '"export-size": 33554432' in info[0]  # qemu keeps the active size
    assert run(tool("nbdinfo"), "--map", ours.uri).stdout == run(tool("nbdinfo"), "--map", theirs.uri).stdout
    assert run(tool("qemu-img"), "compare", "-f", "raw", "-F", "raw", ours.uri, theirs.uri).returncode == 0
    run(tool("qemu-io"), "-r", "-f", "raw", "-c", "read -P 1 0 1M", "-c", "read -P 3 8M 64k", ours.uri)


@pytest.mark.parametrize("key", ["nope", "snapshot.name=zz", "snapshot.id=1,snapshot.name=zz", "snapshot.foo=1"])
def test_snapshot_errors_match_qemu_nbd(image, tmp_path, key):
    args = ["-k", str(tmp_path / "s"), "-l", key, str(image)]
    ours = subprocess.run(qcowpy_argv("nbd", *args), capture_output=True, text=True, env=child_env(), timeout=30)
    theirs = run(tool("qemu-nbd"), *args, check=False, timeout=30)
    assert ours.returncode == theirs.returncode == 1
    assert re.sub(r"(?m)^\S*qcowpy: ", "", ours.stderr) == re.sub(r"(?m)^\S*qemu-nbd: ", "", theirs.stderr)


def test_snapshot_of_a_raw_image_fails_as_in_qemu_nbd(tmp_path):
    img = tmp_path / "a.raw"
    img.write_bytes(bytes(1 << 20))
    args = ["-k", str(tmp_path / "s"), "-f", "raw", "-l", "x", str(img)]
    ours = subprocess.run(qcowpy_argv("nbd", *args), capture_output=True, text=True, env=child_env(), timeout=30)
    theirs = run(tool("qemu-nbd"), *args, check=False, timeout=30)
    assert ours.returncode == theirs.returncode == 1
    assert ours.stderr.replace("qcowpy:", "qemu-nbd:") == theirs.stderr
