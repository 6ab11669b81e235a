"""Shared fixtures for the emulator tests."""
from __future__ import annotations

import os

import pytest

from qcowpy.emu.guest.qtest import InProcessQTest, qemu_binary
from qcowpy.emu.machine import create_machine


@pytest.fixture
def machine():
    return create_machine("mini-pc", "64M")


@pytest.fixture
def qts(machine):
    q = InProcessQTest(machine)
    yield q
    q.close()


def require_qemu() -> str:
    """The qemu-system-x86_64 path; skip without it unless QCOWPY_REQUIRE_QEMU is set (then fail)."""
    binary = qemu_binary()
    if binary is None:
        if os.environ.get("QCOWPY_REQUIRE_QEMU"):
            pytest.fail("qemu-system-x86_64 is required (QCOWPY_REQUIRE_QEMU is set) but not installed")
        pytest.skip("qemu-system-x86_64 not installed")
    return binary


def image_pair(qemu, tmp_path, pattern: int) -> tuple[str, str]:
    """Two identical qcow2 images (8 MiB, the first 64 KiB set to ``pattern`` by qemu-io): one for
    QEMU, one for this emulator, so the oracle tests start both machines on the same bytes."""
    import shutil
    src = str(tmp_path / "src.qcow2")
    qemu.create(src, "8M")
    qemu.io(src, f"write -P {pattern:#x} 0 64k")
    a, b = str(tmp_path / "qemu.qcow2"), str(tmp_path / "ours.qcow2")
    shutil.copy(src, a)
    shutil.copy(src, b)
    return a, b
