"""Usage errors, exit codes, the emu pass-through and the entry points."""
from __future__ import annotations

import subprocess
import sys

import pytest

from .helpers import as_qemu, qcowpy, qemu


@pytest.mark.parametrize("args", [["bogus"], ["create", "-z"], ["create", "-f"], ["info"], ["info", "a", "b"],
                                  ["map"], ["compare", "a"], ["compare", "--bogus", "a", "b"], ["convert", "-O"],
                                  ["info", "-f", "qcow2", "r.img"], ["info", "nonexist"], ["compare", "nonexist", "r.img"],
                                  ["map", "-f", "qcow2", "r.img"], ["convert", "-f", "qcow2", "r.img", "x"]],
                         ids=lambda a: " ".join(a))
def test_error_messages_and_codes(tmp_path, qemu_img, args):
    qemu(qemu_img, "create", "-q", "-f", "raw", "r.img", "1M", cwd=tmp_path)
    want = qemu(qemu_img, *args, cwd=tmp_path)
    got = qcowpy(*args, cwd=tmp_path)
    assert want.code != 0
    assert got.code == want.code
    # one line (plus qemu's "Try ..." line on usage errors), no traceback
    assert got.out == want.out and "Traceback" not in got.err
    first_line = want.err.splitlines()[0]
    if "Command not found" in first_line or "Could not open" in first_line or "Expecting" in first_line \
            or "unrecognized option" in first_line or "missing argument" in first_line:
        assert as_qemu(got.err) == want.err


def test_usage_error_exit_codes(tmp_path):
    assert qcowpy("compare", "x").code == 1  # usage errors are 1, like qemu-img's error_exit
    assert qcowpy("compare", str(tmp_path / "a"), str(tmp_path / "b")).code == 2  # open errors are 2
    assert qcowpy("info", str(tmp_path / "a")).code == 1


def test_emu_passthrough(monkeypatch):
    import qcowpy.emu.cli as emu_cli

    seen = []
    monkeypatch.setattr(emu_cli, "entry", lambda argv: seen.append(argv) or 3)
    r = qcowpy("emu", "-M", "mini-pc", "-device", "edu", "--whatever", "-S")
    assert seen == [["-M", "mini-pc", "-device", "edu", "--whatever", "-S"]]
    assert r.code == 3 and r.err == ""


def test_python_dash_m_and_broken_pipe(tmp_path):
    img = tmp_path / "a.qcow2"
    p = subprocess.run([sys.executable, "-m", "qcowpy", "create", "-f", "qcow2", str(img), "1G"],
                       capture_output=True, text=True)
    assert p.returncode == 0 and p.stdout.startswith(f"Formatting '{img}', fmt=qcow2 ")
    # a reader that goes away early: no traceback
    p = subprocess.run(f"{sys.executable} -m qcowpy map --output=json {img} | head -c 1",
                       shell=True, capture_output=True, text=True)
    assert "Traceback" not in p.stderr and p.stdout == "["
    p = subprocess.run([sys.executable, "-m", "qcowpy", "info", str(tmp_path / "none")], capture_output=True, text=True)
    assert p.returncode == 1 and p.stderr.count("\n") == 1 and p.stderr.startswith("qcowpy: Could not open")


def test_keyboard_interrupt(monkeypatch, tmp_path):
    import qcowpy.tools.info as info

    def boom(*a, **k):
        raise KeyboardInterrupt

    monkeypatch.setattr(info, "collect", boom)
    r = qcowpy("info", str(tmp_path / "x"))
    assert r.code == 130 and "Traceback" not in r.err
