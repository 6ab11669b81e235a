"""Help spellings and accelerator errors, with qemu-system-x86_64 7.2 as the oracle.

Both programs run with the same kind of request; the machine, device and accelerator names differ
(theirs are QEMU's), so the tests compare the layout line by line and the messages with the
program prefix and the names swapped.
"""
from __future__ import annotations

import io
import re
import subprocess

import pytest

from qcowpy.emu.cli import main

from .conftest import require_qemu

QEMU_ARGS = ["-display", "none", "-nodefaults"]


def ours(*argv: str) -> tuple[int, str, str]:
    out, err = io.StringIO(), io.StringIO()
    rc = main(list(argv), stdin=io.StringIO(""), stdout=out, stderr=err)
    return rc, out.getvalue(), err.getvalue()


def qemu(*argv: str) -> tuple[int, str, str]:
    p = subprocess.run([require_qemu(), *argv, *QEMU_ARGS], stdin=subprocess.DEVNULL, capture_output=True,
                       text=True, timeout=30)
    return p.returncode, p.stdout, p.stderr


def errors(stderr: str, prog: str) -> list[str]:
    """The stderr lines without the program prefix (and without QEMU's module-loading chatter)."""
    return [line[len(prog) + 2:] if line.startswith(prog + ": ") else line
            for line in stderr.splitlines() if not line.startswith("qemu: module ")]


def machine_lines(out: str) -> list[tuple[str, str]]:
    """(name, rest) of each ``%-20s %s`` line after the heading, checking the layout."""
    lines = out.splitlines()
    assert lines[0] == "Supported machines are:"
    rows = []
    for line in lines[1:]:
        name = line.split(" ", 1)[0]
        assert len(line) > 21 and line[:20] == f"{name:<20}" and line[20] == " " and line[21] != " ", line
        rows.append((name, line[21:]))
    return rows


@pytest.mark.parametrize("spelling", ["?", "help", "help,accel=tcg", "?,accel=tcg", "accel=tcg,help"])
def test_machine_help_spellings_match_qemu(spelling):
    qrc, qout, _ = qemu("-machine", spelling)
    rc, out, err = ours("-machine", spelling.replace("tcg", "a3acl"))
    assert (rc, err) == (qrc, "") == (0, "")
    theirs, mine = machine_lines(qout), machine_lines(out)
    assert sum(rest.endswith(" (default)") for _, rest in theirs) == 1
    assert sum(rest.endswith(" (default)") for _, rest in mine) == 1
    assert [n for n, _ in mine] == ["a3-board", "a3-pc", "mini-pc", "none"]
    assert ours("-M", spelling)[1] == out


def test_machine_and_accel_help_come_before_anything_else():
    # QEMU answers -machine/-accel help while parsing, so later errors and other help wait
    for argv in (["-device", "?", "-machine", "?"], ["-accel", "foo", "-machine", "help"],
                 ["-machine", "help", "-accel", "foo"]):
        qrc, qout, _ = qemu(*argv)
        rc, out, err = ours(*argv)
        assert (rc, qrc, err) == (0, 0, "")
        assert out.splitlines()[0] == qout.splitlines()[0] == "Supported machines are:"
    qrc, qout, _ = qemu("-accel", "help", "-machine", "help")
    rc, out, _ = ours("-accel", "help", "-machine", "help")
    assert rc == qrc == 0 and out.splitlines()[0] == qout.splitlines()[0]


@pytest.mark.parametrize("spelling", ["help", "?", "help,foo=on", "accel=help"])
def test_accel_help_matches_qemu(spelling):
    qrc, qout, _ = qemu("-accel", spelling)
    rc, out, err = ours("-accel", spelling)
    assert rc == qrc == 0 and err == ""
    assert out.splitlines()[0] == qout.splitlines()[0] == "Accelerators supported in QEMU binary:"
    for names in (qout.splitlines()[1:], out.splitlines()[1:]):
        assert names and all(re.fullmatch(r"[a-z0-9_]+", n) for n in names)
        assert "qtest" not in names  # QEMU keeps its qtest accelerator out of the list
    assert out.splitlines()[1:] == ["a3acl"]


def test_unknown_accelerator_messages_match_qemu():
    for theirs, mine in ((["-accel", "foo"], ["-accel", "foo"]),
                         (["-machine", "none,accel=foo"], ["-machine", "none,accel=foo"]),
                         (["-accel", "tcg,help"], ["-accel", "a3acl,help"]),
                         (["-machine", "none,accel="], ["-machine", "none,accel="]),
                         (["-machine", "none,accel=tcg", "-accel", "tcg"], ["-machine", "none,accel=qtest",
                                                                            "-accel", "qtest"])):
        qrc, _, qerr = qemu(*theirs)
        rc, _, err = ours(*mine)
        assert rc == qrc == 1
        assert errors(err, "qcowpy emu") == [line.replace("tcg", "a3acl")
                                             for line in errors(qerr, "qemu-system-x86_64")], (theirs, qerr, err)


def test_falling_back_matches_qemu():
    # the first usable accelerator of a list wins; then the device error ends both runs
    qrc, _, qerr = qemu("-machine", "none,accel=foo:tcg", "-device", "nosuch")
    rc, _, err = ours("-machine", "a3-pc,accel=foo:a3acl", "-device", "nosuch")
    assert rc == qrc == 1
    want = [line.replace("tcg", "a3acl") for line in errors(qerr, "qemu-system-x86_64")]
    assert want == ["invalid accelerator foo", "falling back to a3acl",
                    "-device nosuch: 'nosuch' is not a valid device model name"]
    assert errors(err, "qcowpy emu") == [want[0], want[1], "'nosuch' is not a valid device model name"]


@pytest.mark.parametrize("spelling", ["vax", "type=help"])  # "type=help" names a machine "help"
def test_unsupported_machine_message_matches_qemu(spelling):
    qrc, _, qerr = qemu("-machine", spelling)
    rc, _, err = ours("-machine", spelling)
    assert rc == qrc == 1 and errors(err, "qcowpy emu") == errors(qerr, "qemu-system-x86_64") == \
        ["unsupported machine type", "Use -machine help to list supported machines"]


DEVINFO = re.compile(r'name "[^"]+"(, bus [\w.-]+)?(, alias "[^"]+")?(, desc "[^"]*")?(, no-user)?')


@pytest.mark.parametrize("spelling", ["?", "help"])
def test_device_list_layout_matches_qemu(spelling):
    qrc, qout, _ = qemu("-device", spelling)
    rc, out, err = ours("-device", spelling)
    assert rc == qrc == 0 and err == ""
    headings = {line for line in qout.splitlines() if line.endswith(" devices:")}
    assert {"Controller/Bridge/Hub devices:", "Storage devices:", "Misc devices:"} <= headings
    for text in (qout, out):
        assert text.endswith("\n") and not text.endswith("\n\n")
        blocks = text.lstrip("\n").split("\n\n")
        for block in blocks:
            head, *entries = block.splitlines()
            assert head in headings and entries and all(DEVINFO.fullmatch(e) for e in entries), block
            names = [e.split('"')[1] for e in entries]
            assert names == sorted(names, key=str.lower)
    assert [b.splitlines()[0] for b in out.lstrip("\n").split("\n\n")] == ["Storage devices:", "Misc devices:"]


@pytest.mark.parametrize("spelling", ["edu,help", "edu,?", "driver=edu,help"])
def test_device_property_help_matches_qemu(spelling):
    qrc, qout, _ = qemu("-device", spelling)
    rc, out, err = ours("-device", spelling)
    assert rc == qrc == 0 and err == ""
    theirs = qout.splitlines()
    mine = out.splitlines()
    assert mine[0] == theirs[0] == "edu options:"
    for prop in ("addr", "multifunction"):  # the properties both devices define the same way
        assert [line for line in mine if line.startswith(f"  {prop}=")] == \
               [line for line in theirs if line.startswith(f"  {prop}=")]


def test_device_help_for_an_unknown_driver_matches_qemu():
    qrc, qout, qerr = qemu("-device", "nosuch,help")
    rc, out, err = ours("-device", "nosuch,help")
    assert (rc, out) == (qrc, qout) == (0, "")  # QEMU 7.2 reports it and exits 0
    assert errors(err, "qcowpy emu") == errors(qerr, "qemu-system-x86_64") == \
        ["-device nosuch,help: Device 'nosuch' not found"]



def _qtree(program: list[str], env: dict[str, str] | None = None) -> list[str]:
    p = subprocess.run(program + ["-S", "-monitor", "stdio"], input="info qtree\nquit\n", capture_output=True,
                       text=True, timeout=60, env=env)
    return p.stdout.splitlines()


def _root_bus(lines: list[str], bus: str) -> list[str]:
    """The root bus's heading lines, then each edu's block cut to the lines both emulators have."""
    start = next(i for i, line in enumerate(lines) if line == f"    bus: {bus}")
    out = ["    bus: ROOT", lines[start + 1]]
    in_edu = False
    for line in lines[start + 2:]:
        if line.startswith("      dev: "):
            in_edu = line.startswith("      dev: edu,")
            if in_edu:
                out.append(line)
        elif in_edu and line.startswith(("        addr = ", "        multifunction = ", "        class ",
                                         "        bar ")):
            out.append(line)
    return out


def test_qtree_of_a_pcie_root_bus_matches_qemu_q35():
    import os
    import sys
    devices = ["-device", "edu,addr=04.0", "-device", "edu,addr=05.0"]
    theirs = _qtree([require_qemu(), "-M", "q35", "-accel", "tcg", *QEMU_ARGS, *devices])
    mine = _qtree([sys.executable, "-m", "qcowpy.emu.cli", "-M", "a3-pc", *devices],
                  dict(os.environ, PYTHONPATH=os.pathsep.join(sys.path)))
    want = _root_bus(theirs, "pcie.0")
    assert want[:3] == ["    bus: ROOT", "      type PCIE", '      dev: edu, id ""'] and len(want) == 12
    assert want[3] == "        addr = 05.0"  # QEMU lists a bus's devices newest first
    assert _root_bus(mine, "a3-pcie0") == want
