"""Fixtures for the check/repair tests: the qcowpy CLI with ``check`` registered, the QEMU oracle."""
from __future__ import annotations

import io
import os
import shutil
import subprocess
import sys
from contextlib import redirect_stderr, redirect_stdout
from dataclasses import dataclass

import pytest


@dataclass
class Run:
    code: int
    out: str
    err: str


def qcowpy_cli(*args: str) -> Run:
    """Run ``qcowpy ARGS`` in-process (registering ``check`` in the group if main.py has not yet)."""
    from qcowpy.cli.check import check
    from qcowpy.cli.main import cli, main

    if "check" not in cli.commands:
        cli.add_command(check)
    out, err = io.StringIO(), io.StringIO()
    with redirect_stdout(out), redirect_stderr(err):
        code = main([str(a) for a in args])
    return Run(code, out.getvalue(), err.getvalue())


def qemu_img(*args: str) -> Run:
    p = subprocess.run(["qemu-img", *map(str, args)], capture_output=True, text=True)
    return Run(p.returncode, p.stdout, p.stderr)


def need_qemu() -> None:
    if not (shutil.which("qemu-img") and shutil.which("qemu-io")):
        if os.environ.get("QCOWPY_REQUIRE_QEMU"):
            pytest.fail("qemu-img/qemu-io required (QCOWPY_REQUIRE_QEMU is set) but not found")
        pytest.skip("qemu-img/qemu-io not installed")


@pytest.fixture
def qemu_tools() -> None:
    need_qemu()
