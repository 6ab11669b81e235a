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


def _snapshot_rows(qemu_img: str, path) -> list[dict]:
    """qemu-img's snapshot list without the creation dates (the tools run at different moments)."""
    import json
    info = json.loads(qemu(qemu_img, "info", "--output=json", "-U", path).out)
    return [{k: v for k, v in s.items() if k not in ("date-sec", "date-nsec")} for s in info.get("snapshots", [])]


def assert_same_disks(qemu_img: str, a, b, step: str = "") -> None:
    """``a`` and ``b`` are the same disk to every reader, judged by qemu-img: the same virtual
    size and guest contents, the same snapshots (ids, names, sizes, clocks) each with the same
    contents, and ``b`` passes ``qemu-img check`` without even a leak. Layout may differ (our
    snapshot operations are atomic, QEMU's are not: docs/cli.md)."""
    import json
    sizes = [json.loads(qemu(qemu_img, "info", "--output=json", "-U", p).out)["virtual-size"] for p in (a, b)]
    assert sizes[0] == sizes[1], f"{step}: virtual sizes differ: {sizes}"
    cmp = qemu(qemu_img, "compare", "-U", a, b)
    assert cmp.code == 0, f"{step}: {cmp.out}{cmp.err}"
    rows = _snapshot_rows(qemu_img, a)
    assert _snapshot_rows(qemu_img, b) == rows, f"{step}: snapshot lists differ"
    for row in rows:
        raws = []
        for p in (a, b):
            out = p.parent / f"{p.stem}-sn.raw"
            r = qemu(qemu_img, "convert", "-U", "-l", f"snapshot.id={row['id']}", "-O", "raw", p, out)
            assert r.code == 0, r.err
            raws.append(out)
        assert qemu(qemu_img, "compare", "-f", "raw", "-F", "raw", *raws).code == 0, \
            f"{step}: snapshot {row['id']} differs"
    check = qemu(qemu_img, "check", b)
    assert check.code == 0, f"{step}: {check.out}{check.err}"
