"""Run our CLI in-process and qemu-img as a subprocess, and normalise their outputs for comparison."""
from __future__ import annotations

import contextlib
import io
import os
import subprocess
from dataclasses import dataclass

from qcowpy.cli.main import main


@dataclass
class Result:
    code: int
    out: str
    err: str


def qcowpy(*args: str, cwd: str | os.PathLike | None = None) -> Result:
    """``qcowpy args...`` in this process (much faster than a subprocess per call)."""
    out, err = io.StringIO(), io.StringIO()
    old = os.getcwd()
    try:
        if cwd is not None:
            os.chdir(cwd)
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            code = main([str(a) for a in args])
    finally:
        os.chdir(old)
    return Result(code, out.getvalue(), err.getvalue())


def qemu(qemu_img: str, *args: str, cwd: str | os.PathLike | None = None) -> Result:
    p = subprocess.run([qemu_img, *map(str, args)], capture_output=True, text=True, cwd=cwd)
    return Result(p.returncode, p.stdout, p.stderr)


def as_qemu(text: str) -> str:
    """Our messages with qemu-img's program name, for byte comparison."""
    return text.replace("qcowpy: ", "qemu-img: ").replace("Try 'qcowpy --help'", "Try 'qemu-img --help'")


def qemu_io(qemu_img: str, path, *commands: str, fmt: str = "qcow2") -> None:
    exe = os.path.join(os.path.dirname(qemu_img), "qemu-io")
    argv = [exe, "-f", fmt]
    for c in commands:
        argv += ["-c", c]
    argv.append(str(path))
    p = subprocess.run(argv, capture_output=True, text=True)
    assert p.returncode == 0 and "error" not in (p.stdout + p.stderr).lower(), p.stdout + p.stderr


def image_pair(tmp_path, qemu_img: str, opts: list[str], size: str, writes: list[str]):
    """One qcow2 image made by qemu-img (and written by qemu-io), copied twice: (for qemu-img,
    for qcowpy), so both tools start from the same bytes."""
    import shutil
    src = tmp_path / "src.qcow2"
    assert qemu(qemu_img, "create", "-q", "-f", "qcow2", *opts, src, size).code == 0
    if writes:
        qemu_io(qemu_img, src, *writes)
    a, b = tmp_path / "qemu.qcow2", tmp_path / "ours.qcow2"
    shutil.copy(src, a)
    shutil.copy(src, b)
    return a, b
