"""docs/tutorial.md stays true: every ``$`` command runs with its printed output checked, and every
Python block runs, in page order, in one directory and one namespace.

In ``console`` blocks a line starting with ``$ `` is a command (a ``<<'EOF'`` here-document runs
on to its ``EOF`` line); the lines after it, up to the next command, are its expected stdout and
stderr together, where a ``...`` line stands for any number of lines. ``qcowpy`` is this checkout.
"""
from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
PAGE = ROOT / "docs" / "tutorial.md"
_BLOCK = re.compile(r"^```(console|python)\n(.*?)^```", re.S | re.M)


def steps(text: str) -> list[tuple[str, str, list[str]]]:
    """(kind, code, expected lines) in page order; python blocks have no expected lines."""
    out: list[tuple[str, str, list[str]]] = []
    for m in _BLOCK.finditer(text):
        kind, body = m.group(1), m.group(2)
        if kind == "python":
            out.append(("python", body, []))
            continue
        lines = body.splitlines()
        i = 0
        while i < len(lines):
            assert lines[i].startswith("$ "), f"a console block must start with a command: {lines[i]!r}"
            cmd = [lines[i][2:]]
            i += 1
            if cmd[0].endswith("<<'EOF'"):
                while lines[i] != "EOF":
                    cmd.append(lines[i])
                    i += 1
                cmd.append(lines[i])
                i += 1
            expected = []
            while i < len(lines) and not lines[i].startswith("$ "):
                expected.append(lines[i])
                i += 1
            out.append(("console", "\n".join(cmd) + "\n", expected))
    return out


def matches(expected: list[str], actual: list[str]) -> bool:
    """Line-by-line equality (trailing blanks ignored) where ``...`` matches any run of lines."""
    exp = [e.rstrip() for e in expected]
    act = [a.rstrip() for a in actual]
    memo: dict[tuple[int, int], bool] = {}

    def rec(i: int, j: int) -> bool:
        if (i, j) not in memo:
            if i == len(exp):
                memo[i, j] = j == len(act)
            elif exp[i] == "...":
                memo[i, j] = any(rec(i + 1, k) for k in range(j, len(act) + 1))
            else:
                memo[i, j] = j < len(act) and exp[i] == act[j] and rec(i + 1, j + 1)
        return memo[i, j]
    return rec(0, 0)


def test_matcher_needs_every_line():
    assert matches(["a", "...", "d"], ["a", "b", "c", "d"]) and matches(["a", "..."], ["a"])
    assert not matches(["a", "d"], ["a", "b", "d"]) and not matches(["a"], ["a", "b"])


def test_every_step_of_the_tutorial(tmp_path, monkeypatch):
    page = steps(PAGE.read_text())
    assert sum(kind == "console" for kind, _, _ in page) >= 8 and sum(kind == "python" for kind, _, _ in page) >= 3
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    shim = bin_dir / "qcowpy"
    shim.write_text(f'#!/bin/sh\nexec "{sys.executable}" -m qcowpy.cli.main "$@"\n')
    shim.chmod(0o755)
    work = tmp_path / "work"
    work.mkdir()
    env = dict(os.environ, PATH=f"{bin_dir}{os.pathsep}{os.environ['PATH']}",
               PYTHONPATH=str(ROOT) + (os.pathsep + os.environ["PYTHONPATH"] if os.environ.get("PYTHONPATH") else ""))
    monkeypatch.chdir(work)
    namespace: dict[str, object] = {"__name__": "__tutorial__"}
    for kind, code, expected in page:
        if kind == "python":
            exec(compile(code, str(PAGE), "exec"), namespace)
            continue
        if "mkinitramfs" in code or "qemu-system-x86_64" in code:
            _require_guest()  # the Linux step: every step before it has already been checked
        p = subprocess.run(["bash", "-c", code], cwd=work, env=env, stdout=subprocess.PIPE,
                           stderr=subprocess.STDOUT, text=True, timeout=120)
        actual = p.stdout.splitlines()
        assert matches(expected, actual), f"$ {code}\n--- page ---\n" + "\n".join(expected) + \
            "\n--- got ---\n" + p.stdout


def _require_guest() -> None:
    """QEMU and the test guest's Debian packages; skip the rest without them, unless
    QCOWPY_REQUIRE_QEMU is set (CI installs them): then fail."""
    import shutil

    from tests.conftest import skip_or_fail
    from tests.qsd import mkinitramfs
    need = mkinitramfs.missing() + ([] if shutil.which("qemu-system-x86_64") else ["qemu-system-x86"])
    if need:
        skip_or_fail(f"the tutorial's Linux step needs {', '.join(need)}: they are")
