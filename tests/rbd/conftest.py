"""A one-node Ceph cluster for the rbd tests (tests/rbd/cluster.py), started once per session.

The oracles are qemu-img/qemu-io (with Debian's block-rbd module from qemu-block-extra) and the
``rbd`` CLI. Without Ceph, librbd or QEMU's rbd module the tests skip, unless QCOWPY_REQUIRE_QEMU
is set: then they fail.
"""
from __future__ import annotations

import glob
import os
import subprocess
import sys
import tempfile
import uuid
from pathlib import Path

import pytest

from tests.conftest import skip_or_fail
from tests.rbd.cluster import Cluster, missing_tools

REPO = Path(__file__).resolve().parents[2]


def qemu_has_rbd() -> bool:
    return bool(glob.glob("/usr/lib/*/qemu/block-rbd.so") or glob.glob("/usr/lib/qemu/block-rbd.so"))


@pytest.fixture(scope="session")
def ceph():
    missing = missing_tools()
    if missing:
        skip_or_fail(f"Ceph ({', '.join(missing)}) is")
    from qcowpy.block import librbd
    if not librbd.available():
        skip_or_fail("librbd (librbd1) is")
    if not qemu_has_rbd():
        skip_or_fail("QEMU's rbd module (qemu-block-extra) is")
    root = Path(tempfile.mkdtemp(prefix="qcowpy-ceph-"))
    cluster = Cluster(root)
    try:
        cluster.start(timeout=60)
    except BaseException:
        cluster.stop()
        raise
    yield cluster
    cluster.stop()
    subprocess.run(["rm", "-rf", str(root)], check=False)


@pytest.fixture
def image(ceph):
    """A fresh image name in the cluster (not created)."""
    return f"t{uuid.uuid4().hex[:10]}"


def env() -> dict[str, str]:
    e = dict(os.environ)
    e["PYTHONPATH"] = str(REPO) + os.pathsep + e.get("PYTHONPATH", "")
    return e


def qcowpy(*args: str, check: bool = True, **_: object) -> subprocess.CompletedProcess:
    """``qcowpy args...`` in this process (a subprocess costs a second of start-up on a busy
    machine); failures that must be compared byte for byte with qemu-img's use qcowpy_proc,
    which also sees what librados itself writes to the stderr file descriptor."""
    import contextlib
    import io

    from qcowpy.cli.main import main
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        code = main([str(a) for a in args])
    p = subprocess.CompletedProcess(args, code, out.getvalue(), err.getvalue())
    if check and code != 0:
        pytest.fail(f"qcowpy {' '.join(map(str, args))} exited {code}:\n{p.stdout}{p.stderr}")
    return p


def qcowpy_proc(*args: str, check: bool = True, timeout: float = 120, **kw) -> subprocess.CompletedProcess:
    p = subprocess.run([sys.executable, "-m", "qcowpy", *map(str, args)], capture_output=True, text=True,
                       timeout=timeout, env=env(), **kw)
    if check and p.returncode != 0:
        pytest.fail(f"qcowpy {' '.join(map(str, args))} exited {p.returncode}:\n{p.stdout}{p.stderr}")
    return p


def qemu_img(*args: str, check: bool = True, timeout: float = 120) -> subprocess.CompletedProcess:
    p = subprocess.run(["qemu-img", *map(str, args)], capture_output=True, text=True, timeout=timeout)
    if check and p.returncode != 0:
        pytest.fail(f"qemu-img {' '.join(map(str, args))} exited {p.returncode}:\n{p.stdout}{p.stderr}")
    return p


def qemu_io(name: str, *cmds: str, fmt: str = "raw", check: bool = True) -> subprocess.CompletedProcess:
    argv = ["qemu-io", "-f", fmt]
    for c in cmds:
        argv += ["-c", c]
    p = subprocess.run([*argv, name], capture_output=True, text=True, timeout=120)
    out = p.stdout + p.stderr
    if check and (p.returncode or "error" in out.lower() or "fail" in out.lower() or "pattern" in out.lower()):
        pytest.fail(f"qemu-io {cmds} {name}: {out}")
    return p


def same_errors(ours: subprocess.CompletedProcess, theirs: subprocess.CompletedProcess) -> None:
    """The same exit code and the same stderr line, but for the program's name."""
    assert ours.returncode == theirs.returncode, (ours.stderr, theirs.stderr)
    assert ours.stderr.replace("qcowpy:", "qemu-img:") == theirs.stderr, (ours.stderr, theirs.stderr)
