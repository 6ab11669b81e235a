"""docs/parity.toml (the parity tables of docs/cli.md) is complete and true on both sides.

qemu-img side, against the binary: every command and option its ``--help`` names, every option
letter it accepts (each of a-z, A-Z, 0-9 probed per command), every long option listed is one it
accepts (and ``--X`` for a single letter X is accepted exactly when one listed long option starts
with X, which is getopt_long's prefix rule, so a long option missing from the table shows), and its
``-o help`` creation options.

qcowpy side: the options its ``--help`` shows plus its hidden ones (the click commands' parameters,
which the ``--help`` text must agree with) are exactly the rows marked yes, partial or extra; a
"no" row is not accepted; a command marked "no" does not exist, and every qcowpy command is
either qemu-img's or listed as another program's stand-in.
"""
from __future__ import annotations

import re
import string
import subprocess
from concurrent.futures import ThreadPoolExecutor

import click
import pytest

from qcowpy.cli.main import cli

from . import parity
from .helpers import qcowpy

ROWS = parity.load()
COMMANDS = parity.commands(ROWS)
HELP = {"-h", "--help"}


def rows_of(section: str) -> list[parity.Row]:
    return [r for r in ROWS if r.section == section]


def forms_of(section: str, statuses=tuple(parity.STATUSES)) -> set[str]:
    return {f for r in rows_of(section) if r.status in statuses for f in r.forms}


def test_docs_table_is_generated_from_the_toml():
    page = parity.PAGE.read_text()
    assert parity.section_of(page) == parity.render(ROWS), \
        "docs/cli.md is out of date: run python -m tests.cli.parity --write"


def test_rows_are_well_formed():
    for section in ["global", *COMMANDS]:
        forms = [f for r in rows_of(section) for f in r.forms]
        assert len(forms) == len(set(forms)), f"{section}: an option is listed twice"
        assert all(re.fullmatch(r"-[A-Za-z0-9]|--[a-z][a-z0-9-]*", f) for f in forms), forms
        if any(r.key == parity.COMMAND for r in rows_of(section)):
            assert {r.status for r in rows_of(section)} == {"no"}, f"{section}: missing command, usable option?"


# ------------------------------------------------------------------------------------- qemu-img
def _qemu_help(qemu_img: str) -> str:
    return subprocess.run([qemu_img, "--help"], capture_output=True, text=True).stdout


def _syntax(qemu_img: str) -> dict[str, str]:
    text = _qemu_help(qemu_img)
    block = text.split("Command syntax:\n", 1)[1].split("\n\n", 1)[0]
    return {line.split()[0]: line.strip() for line in block.splitlines()}


_OPTION = re.compile(r"(?<![\w-])(--?[A-Za-z][\w-]*)")


def test_every_qemu_img_command_and_option_of_its_help_is_listed(qemu_img):
    syntax = _syntax(qemu_img)
    assert sorted(syntax) == sorted(COMMANDS)
    for cmd, line in syntax.items():
        named = set(_OPTION.findall(line.split(" ", 1)[1] if " " in line else ""))
        assert named <= forms_of(cmd), f"{cmd}: qemu-img --help names {sorted(named - forms_of(cmd))}"
    top = _qemu_help(qemu_img).split("Command syntax:", 1)[0]
    assert set(re.findall(r"'(--?[a-zA-Z-]+)'", top)) == forms_of("global")


def _rejects(qemu_img: str, tmp_path, cmd: str, option: str) -> bool:
    """Whether qemu-img's getopt refuses ``option`` (resize takes its last argument as the size
    before getopt runs, so it gets two dummy names; nothing here names an existing file)."""
    extra = ["a", "b"] if cmd == "resize" else []
    p = subprocess.run([qemu_img, cmd, option, *extra], capture_output=True, text=True, cwd=tmp_path, timeout=30,
                       stdin=subprocess.DEVNULL)
    # qemu-img's own words, or glibc's where a command lets getopt report (measure)
    return any(w in p.stderr for w in (f"unrecognized option '{option}'", f"invalid option -- '{option[1:]}'",
                                       f"option '{option}' is ambiguous"))


@pytest.mark.parametrize("cmd", COMMANDS)
def test_option_letters_and_long_options_as_qemu_img_accepts_them(qemu_img, tmp_path, cmd):
    listed = forms_of(cmd, ("yes", "partial", "no")) | HELP
    extra = sorted(forms_of(cmd, ("extra",)))
    letters = ["-" + c for c in string.ascii_letters + string.digits]
    longs = sorted(f for f in listed if f.startswith("--"))
    prefixes = ["--" + c for c in string.ascii_lowercase]
    probes = letters + longs + prefixes + [e for e in extra if e not in letters]
    with ThreadPoolExecutor(4) as pool:
        accepted = dict(zip(probes, pool.map(lambda o: not _rejects(qemu_img, tmp_path, cmd, o), probes)))
    assert {o for o in letters if accepted[o]} == {f for f in listed if not f.startswith("--")}
    assert [o for o in longs if not accepted[o]] == []
    assert [o for o in extra if accepted[o]] == [], "a qcowpy-only row that qemu-img accepts"
    for p in prefixes:  # getopt_long takes an unambiguous prefix: exactly one listed option starts so
        assert accepted[p] == (sum(1 for f in longs if f.startswith(p)) == 1), f"{cmd} {p}"


def _qemu_create_options(qemu_img: str, tmp_path, fmt: str) -> list[str]:
    p = subprocess.run([qemu_img, "create", "-f", fmt, "-o", "help", tmp_path / "x"], capture_output=True, text=True)
    return re.findall(r"^  ([\w.-]+)=", p.stdout, re.M)


def _qcowpy_create_options(fmt: str) -> list[str]:
    return re.findall(r"^  ([\w.-]+)=", qcowpy("create", "-f", fmt, "-o", "help", "x").out, re.M)


@pytest.mark.parametrize("fmt", ["qcow2", "raw", "file"])
def test_creation_options_as_both_list_them(qemu_img, tmp_path, fmt):
    section = f"create-options.{fmt}"
    assert _qemu_create_options(qemu_img, tmp_path, fmt) == [r.key for r in rows_of(section)]
    assert set(_qcowpy_create_options(fmt)) == forms_of(section, ("yes", "partial", "extra"))


# ------------------------------------------------------------------------------------- qcowpy
def _help_options(args: list[str]) -> set[str]:
    """The options qcowpy's --help shows (click's "  -U, --force-share  ..." lines)."""
    r = qcowpy(*args, "--help")
    assert r.code == 0, r.err
    options = set()
    for line in r.out.split("Options:", 1)[1].splitlines():
        m = re.match(r"\s{2}(-\S.*?)(?:\s{2,}|$)", line)
        if m:
            options |= set(re.findall(r"(?<![\w-])--?[A-Za-z0-9][\w-]*", m.group(1)))
    return options


def _params(command: click.Command) -> tuple[set[str], set[str]]:
    """(every option string the command accepts, those its --help shows). A command that parses
    its own options with getopt (their order matters: ``bitmap``) lists them in ``getopt_forms``."""
    forms = getattr(command, "getopt_forms", None)
    if forms is not None:
        return set(forms), set()
    every, shown = set(), set()
    for p in command.params:
        if isinstance(p, click.Option):
            names = set(p.opts) | set(p.secondary_opts)
            every |= names
            if not p.hidden:
                shown |= names
    return every, shown


@pytest.mark.parametrize("section", ["global", *COMMANDS])
def test_qcowpy_accepts_exactly_what_the_table_says(section):
    if section == "global":
        every, shown = _params(cli)
        help_args: list[str] = []
    elif section not in cli.commands:
        assert any(r.key == parity.COMMAND for r in rows_of(section)), f"qcowpy has no {section}: mark it"
        return
    else:
        assert not any(r.key == parity.COMMAND for r in rows_of(section)), f"{section} exists now: flip its rows"
        every, shown = _params(cli.commands[section])
        help_args = [section]
    if not hasattr(cli.commands.get(section), "getopt_forms"):
        assert _help_options(help_args) == shown | HELP  # the --help text and the parameters agree
    every |= HELP
    for r in rows_of(section):
        got = set(r.forms) & every
        if r.status in ("yes", "extra"):
            assert got == set(r.forms), f"{section} {r.key}: marked {r.status}, {set(r.forms) - got} not accepted"
        elif r.status == "partial":
            assert got, f"{section} {r.key}: marked partial, not accepted"
        else:
            assert not got, f"{section} {r.key}: marked no, but qcowpy accepts {got}"
    unlisted = every - forms_of(section) - HELP
    assert not unlisted, f"{section}: qcowpy accepts {sorted(unlisted)}, not in docs/parity.toml"


def test_every_qcowpy_command_is_listed():
    others = parity.other_commands()
    for name in cli.commands:
        assert name in COMMANDS or name in others, f"qcowpy {name} is in neither table of docs/parity.toml"
    assert not set(others) & set(COMMANDS)


@pytest.mark.parametrize("section", COMMANDS)
def test_qcowpy_takes_long_option_prefixes_as_getopt_long(section, tmp_path):
    """``--X`` abbreviates the one long option starting with X, as qemu-img's getopt_long takes it
    (the qemu-img side is probed above); an ambiguous or unknown prefix is refused."""
    if section not in cli.commands:
        return
    every, _ = _params(cli.commands[section])
    longs = [o for o in every | HELP if o.startswith("--")]
    extra = ["a", "b"] if section == "resize" else []  # resize takes its last word as the size
    for c in string.ascii_lowercase:
        r = qcowpy(section, f"--{c}", *extra, cwd=tmp_path)
        assert "Traceback" not in r.err
        accepted = f"unrecognized option '--{c}'" not in r.err
        assert accepted == (sum(o.startswith(f"--{c}") for o in longs) == 1), f"{section} --{c}: {r.err}"


def test_prefixes_keep_option_values():
    from qcowpy.cli.common import expand_long_prefixes
    bench = cli.commands["bench"]
    assert expand_long_prefixes(bench, ["--flush=8", "--pat", "0xab", "-o", "--no", "-wo", "--no", "--no", "x"]) == \
        ["--flush-interval=8", "--pattern", "0xab", "-o", "--no", "-wo", "--no", "--no-drain", "x"]
    assert expand_long_prefixes(bench, ["--", "--no"]) == ["--", "--no"]
    assert expand_long_prefixes(bench, ["--f", "--bogus"]) == ["--f", "--bogus"]  # ambiguous, unknown
