from __future__ import annotations

import os
import shutil

import pytest


def qemu_img_or_skip() -> str:
    path = shutil.which("qemu-img")
    if path is None:
        if os.environ.get("QCOWPY_REQUIRE_QEMU"):
            pytest.fail("qemu-img required (QCOWPY_REQUIRE_QEMU is set) but not found")
        pytest.skip("qemu-img not installed")
    return path
