"""Shared fixtures for the whole test suite.

Each block below is owned by one area; keep additions in clearly named functions/fixtures.
"""
from __future__ import annotations

import json
import os
import shutil
import subprocess

import pytest
from hypothesis import settings

# No per-example time limit anywhere: CI machines are shared and slow down unpredictably, and a
# deadline failure there says nothing about correctness (time targets live in bench/).
settings.register_profile("qcowpy", deadline=None)
settings.load_profile("qcowpy")


# ---------------------------------------------------------------------------------------------
# QEMU oracle for the format / engine / interop tests (qemu-img and qemu-io as subprocesses)
# ---------------------------------------------------------------------------------------------

class QemuOracle:
    """Thin wrapper over the qemu-img / qemu-io binaries used as the reference implementation."""

    def __init__(self, qemu_img: str, qemu_io: str):
        self.qemu_img_path = qemu_img
        self.qemu_io_path = qemu_io

    def img(self, *args: str, check: bool = True) -> subprocess.CompletedProcess:
        """Run ``qemu-img args...``; with ``check`` a nonzero exit fails the test with its output."""
        p = subprocess.run([self.qemu_img_path, *map(str, args)], capture_output=True, text=True)
        if check and p.returncode != 0:
            pytest.fail(f"qemu-img {' '.join(map(str, args))} exited {p.returncode}:\n{p.stdout}{p.stderr}")
        return p

    def io(self, path: str, *commands: str, fmt: str = "qcow2", check: bool = True) -> subprocess.CompletedProcess:
        """Run ``qemu-io -f fmt -c cmd ... path``; qemu-io reports command errors on stdout."""
        argv = [self.qemu_io_path, "-f", fmt]
        for c in commands:
            argv += ["-c", c]
        argv.append(str(path))
        p = subprocess.run(argv, capture_output=True, text=True)
        out = p.stdout + p.stderr
        if check and (p.returncode != 0 or "error" in out.lower() or "failed" in out.lower()):
            pytest.fail(f"qemu-io {commands} on {path} failed ({p.returncode}):\n{out}")
        return p

    def create(self, path, size, fmt: str = "qcow2", backing: str | None = None,
               backing_fmt: str | None = None, **opts) -> str:
        args = ["create", "-q", "-f", fmt]
        if backing:
            args += ["-b", backing]
            if backing_fmt:
                args += ["-F", backing_fmt]
        o = ",".join(f"{k}={v}" for k, v in opts.items() if v is not None)
        if o:
            args += ["-o", o]
        args += [str(path)]
        if size is not None:
            args.append(str(size))
        self.img(*args)
        return str(path)

    def to_raw(self, path, out) -> bytes:
        self.img("convert", "-O", "raw", str(path), str(out))
        with open(out, "rb") as f:
            return f.read()

    def check(self, path, fmt: str = "qcow2") -> subprocess.CompletedProcess:
        """``qemu-img check``; exit 0 means no errors and no leaks (2 = corruption, 3 = leaks)."""
        return self.img("check", "-f", fmt, str(path), check=False)

    def assert_clean(self, path) -> None:
        p = self.check(path)
        assert p.returncode == 0, f"qemu-img check {path} exit {p.returncode}:\n{p.stdout}{p.stderr}"
        assert "No errors were found" in p.stdout, p.stdout

    def compare(self, a, b, fmt_a: str | None = None, fmt_b: str | None = None,
                strict: bool = False) -> subprocess.CompletedProcess:
        args = ["compare"]
        if strict:
            args.append("-s")
        if fmt_a:
            args += ["-f", fmt_a]
        if fmt_b:
            args += ["-F", fmt_b]
        return self.img(*args, str(a), str(b), check=False)

    def map_json(self, path) -> list[dict]:
        return json.loads(self.img("map", "--output=json", str(path)).stdout)

    def info_json(self, path) -> dict:
        return json.loads(self.img("info", "--output=json", str(path)).stdout)


def find_qemu_oracle() -> QemuOracle | None:
    img, io = shutil.which("qemu-img"), shutil.which("qemu-io")
    if img and io:
        return QemuOracle(img, io)
    return None


def skip_or_fail(what: str) -> None:
    """A missing oracle skips the test, unless QCOWPY_REQUIRE_QEMU is set: then it fails."""
    if os.environ.get("QCOWPY_REQUIRE_QEMU"):
        pytest.fail(f"{what} required (QCOWPY_REQUIRE_QEMU is set) but not found on PATH")
    pytest.skip(f"{what.rsplit(' ', 1)[0]} not installed")


def require_qemu_tools() -> QemuOracle:
    """The qemu-img/qemu-io oracle; skip if missing, unless QCOWPY_REQUIRE_QEMU is set (then fail)."""
    oracle = find_qemu_oracle()
    if oracle is None:
        skip_or_fail("qemu-img and qemu-io are")
    return oracle


@pytest.fixture(scope="session")
def qemu() -> QemuOracle:
    """qemu-img/qemu-io oracle (session scoped)."""
    return require_qemu_tools()


# ---------------------------------------------------------------------------------------------
# CLI tests (tests/cli): the qemu-img binary as the oracle for our command line
# ---------------------------------------------------------------------------------------------

def require_qemu_img() -> str:
    """Path of qemu-img; skip without it unless QCOWPY_REQUIRE_QEMU is set (then fail)."""
    path = shutil.which("qemu-img")
    if path is None:
        skip_or_fail("qemu-img is")
    return path


@pytest.fixture(scope="session")
def qemu_img() -> str:
    """Path of the qemu-img binary (session scoped); see require_qemu_img."""
    return require_qemu_img()


# ---------------------------------------------------------------------------------------------
# Codecs: byte-for-byte comparisons with qemu-img's compressed clusters
# ---------------------------------------------------------------------------------------------

@pytest.fixture
def deflate_as_qemu():
    """Compress deflate clusters with Python's zlib, whose bytes are qemu-img's (the default,
    zlib-ng, writes other valid streams): for tests that compare whole files with qemu-img's."""
    from qcowpy.qcow2 import codec
    previous = codec.set_deflate_library("zlib")
    yield
    codec.set_deflate_library(previous)
