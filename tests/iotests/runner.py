"""Run QEMU 7.2's own qemu-iotests (qcow2) with ``QEMU_IMG_PROG`` pointing at this tree's qcowpy.

qemu-io, qemu-nbd, qemu-storage-daemon and qemu-system stay QEMU's (Debian's binaries on PATH);
only qemu-img is swapped, through a ``qemu-img``-named launcher so our messages carry the
``qemu-img:`` prefix QEMU's reference outputs expect.

The iotests come from Debian's ``qemu`` source package (``apt-get source qemu``), looked for in
``$QCOWPY_QEMU_SRC`` (a QEMU source tree) or else the cache that ``fetch-qemu-src`` fills
(``${XDG_CACHE_HOME:-~/.cache}/qcowpy/qemu-src``). ``.ci/run`` fetches it; this module never
touches the system's apt configuration.

Command line (from the repository root)::

    python -m tests.iotests.runner [--qemu-img] [-j N] [--list FILE] [TEST ...]

prints one line per test (pass/fail/skip) and, with ``--write FILE``, the passing tests.
"""
from __future__ import annotations

import argparse
import glob
import os
import re
import shutil
import subprocess
import sys
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

HERE = Path(__file__).resolve().parent
REPO = HERE.parent.parent
QEMU_PASS = HERE / "qemu_img_pass.txt"  # pass here with Debian's qemu-img 7.2
QCOWPY_PASS = HERE / "qcowpy_pass.txt"  # pass with qcowpy as qemu-img: must keep passing
NOT_PASSING = HERE / "not_passing.txt"  # pass with qemu-img, not (yet) with qcowpy: test and reason
SUBSET = HERE / "default_subset.txt"  # the representative subset the default suite runs

#: QEMU's binaries by the variable the iotests read them from
QEMU_BINARIES = {"QEMU_PROG": "qemu-system-x86_64", "QEMU_IO_PROG": "qemu-io",
                 "QEMU_NBD_PROG": "qemu-nbd", "QSD_PROG": "qemu-storage-daemon"}

_TAP = re.compile(r"^(ok|not ok) (\S+) (\S+)( # SKIP)?\s*$")


def cache_dir() -> Path:
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "qcowpy" / "qemu-src"


def find_iotests() -> Path | None:
    """The ``tests/qemu-iotests`` directory of a QEMU 7.2 source tree, or None."""
    roots = []
    if os.environ.get("QCOWPY_QEMU_SRC"):
        roots.append(Path(os.environ["QCOWPY_QEMU_SRC"]))
    roots += [Path(p) for p in sorted(glob.glob(str(cache_dir() / "qemu-7.2*"))) if os.path.isdir(p)]
    for root in roots:
        d = root / "tests" / "qemu-iotests"
        if (d / "check").is_file():
            return d
    return None


def find_binaries() -> dict[str, str] | None:
    """QEMU's programs for everything but qemu-img, or None when one is missing."""
    found = {var: shutil.which(name) for var, name in QEMU_BINARIES.items()}
    if not all(found.values()):
        return None
    return {k: v for k, v in found.items() if v}


def read_list(path: Path) -> list[str]:
    """Test names of a list file: the first word of each line; ``#`` starts a comment."""
    if not path.exists():
        return []
    names = []
    for line in path.read_text().splitlines():
        word = line.split("#", 1)[0].split()
        if word:
            names.append(word[0])
    return names


def read_reasons(path: Path) -> dict[str, str]:
    """``test  reason...`` lines of not_passing.txt."""
    out = {}
    for line in path.read_text().splitlines() if path.exists() else []:
        if line.strip() and not line.lstrip().startswith("#"):
            name, _, reason = line.strip().partition(" ")
            out[name] = reason.strip()
    return out


def write_launcher(bindir: Path) -> str:
    """A ``qemu-img`` launcher running this repository's qcowpy (whatever is installed elsewhere)."""
    bindir.mkdir(parents=True, exist_ok=True)
    path = bindir / "qemu-img"
    path.write_text(f"#!{sys.executable}\n"
                    "import sys\n"
                    f"sys.path.insert(0, {str(REPO)!r})\n"
                    "from qcowpy.cli.main import main\n"
                    "main()\n")
    path.chmod(0o755)
    return str(path)


def write_qemu_wrapper(bindir: Path, qemu: str) -> str:
    """``qemu-system-x86_64`` as the iotests start it, minus the qtest accelerator.

    The iotests pass ``-accel qtest`` (and 172 ``accel=qtest``); Debian builds QEMU without that
    accelerator (``-accel help`` lists tcg and kvm) but with the ``-qtest`` protocol, so TCG
    stands in. The wrapper keeps the binary's name so QEMU's own messages and the tests'
    ``QEMU_PROG:`` filter still match."""
    bindir.mkdir(parents=True, exist_ok=True)
    path = bindir / os.path.basename(qemu)
    path.write_text("#!/bin/sh\n"
                    "prev=\n"
                    "for a in \"$@\"; do\n"
                    "    shift\n"
                    "    case \"$prev $a\" in\n"
                    "        '-accel qtest') a=tcg ;;\n"
                    "        '-machine accel=qtest') a=accel=tcg ;;\n"
                    "    esac\n"
                    "    set -- \"$@\" \"$a\"\n"
                    "    prev=$a\n"
                    "done\n"
                    f"exec {qemu} \"$@\"\n")
    path.chmod(0o755)
    return str(path)


@dataclass
class Outcome:
    """What ``check`` said about each test, and the diff of each failure."""

    status: dict[str, str] = field(default_factory=dict)  # test -> pass | fail | skip
    diffs: dict[str, str] = field(default_factory=dict)
    output: str = ""

    def named(self, status: str) -> list[str]:
        return sorted(t for t, s in self.status.items() if s == status)


def run(tests: list[str], qemu_img: str | None = None, jobs: int = 1, timeout: float | None = None,
        workdir: str | None = None) -> Outcome:
    """Run ``check -qcow2 TESTS`` (all qcow2 tests when empty) and collect each test's status.

    ``qemu_img`` None means this tree's qcowpy; pass a path to measure another qemu-img."""
    iotests = find_iotests()
    binaries = find_binaries()
    if iotests is None or binaries is None:
        raise FileNotFoundError("QEMU 7.2 iotests sources or QEMU binaries not found")
    with tempfile.TemporaryDirectory(prefix="qcowpy-iot-", dir=workdir) as tmp:
        build = Path(tmp)
        (build / "check").symlink_to(iotests / "check")  # "called from the build tree" layout
        env = dict(os.environ, **binaries)
        env["QEMU_PROG"] = write_qemu_wrapper(build / "qemu-bin", binaries["QEMU_PROG"])
        env["QEMU_IMG_PROG"] = qemu_img or write_launcher(build / "bin")
        env["TEST_DIR"] = str(build / "scratch")
        env.pop("QCOWPY_REQUIRE_QEMU", None)
        argv = [sys.executable, str(build / "check"), "-tap", "-qcow2"]
        if jobs > 1:
            argv += ["-j", str(jobs)]
        p = subprocess.run(argv + list(tests), cwd=build, env=env, stdout=subprocess.PIPE,
                           stderr=subprocess.STDOUT, text=True, timeout=timeout)
        outcome = Outcome(output=p.stdout)
        for line in p.stdout.splitlines():
            m = _TAP.match(line)
            if m:
                outcome.status[m.group(3)] = "skip" if m.group(4) else ("pass" if m.group(1) == "ok" else "fail")
        for name in outcome.named("fail"):
            outcome.diffs[name] = _diff(iotests, build / "scratch", name)
        return outcome


def _diff(iotests: Path, scratch: Path, name: str) -> str:
    """``diff -u`` of the reference output against what the test printed."""
    bad = next(iter(sorted(scratch.glob(f"**/{name}.out.bad"))), None)
    ref = iotests / f"{name}.out"
    if not ref.exists():
        ref = iotests / "tests" / f"{name}.out"
    if bad is None or not ref.exists():
        return "(no output kept)"
    p = subprocess.run(["diff", "-u", str(ref), str(bad)], capture_output=True, text=True)
    return p.stdout if len(p.stdout) <= 20000 else p.stdout[:10000] + "\n[...]\n" + p.stdout[-10000:]


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m tests.iotests.runner", description=__doc__.split("\n\n")[0])
    ap.add_argument("tests", nargs="*", help="test names (default: the tests of --list)")
    ap.add_argument("--qemu-img", action="store_true", help="measure Debian's qemu-img instead of qcowpy")
    ap.add_argument("--list", type=Path, help="run the tests named in this list file")
    ap.add_argument("--write", type=Path, help="write the passing tests to this file")
    ap.add_argument("--diffs", action="store_true", help="print the diff of each failure")
    ap.add_argument("-j", type=int, default=2, help="parallel jobs (default 2)")
    args = ap.parse_args(argv)
    tests = list(args.tests) + (read_list(args.list) if args.list else [])
    outcome = run(tests, qemu_img=shutil.which("qemu-img") if args.qemu_img else None, jobs=args.j)
    for name in sorted(outcome.status):
        print(f"{name} {outcome.status[name]}")
        if args.diffs and name in outcome.diffs:
            print(outcome.diffs[name])
    counts = {s: len(outcome.named(s)) for s in ("pass", "fail", "skip")}
    print(f"# {counts['pass']} pass, {counts['fail']} fail, {counts['skip']} not run")
    if args.write:
        args.write.write_text("".join(f"{t}\n" for t in outcome.named("pass")))
    return 1 if counts["fail"] else 0


if __name__ == "__main__":
    sys.exit(main())
