"""The qemu-img parity tables of docs/cli.md, generated from docs/parity.toml.

    python -m tests.cli.parity --write    # regenerate the tables in docs/cli.md after editing the .toml
    python -m tests.cli.parity            # print them

tests/cli/test_parity.py checks the .toml against qemu-img and qcowpy, and docs/cli.md against this.
"""
from __future__ import annotations

import re
import sys
import tomllib
from dataclasses import dataclass
from pathlib import Path

DOCS = Path(__file__).resolve().parents[2] / "docs"
SOURCE = DOCS / "parity.toml"
PAGE = DOCS / "cli.md"
BEGIN = "<!-- parity tables: generated from docs/parity.toml by `python -m tests.cli.parity --write` -->"
END = "<!-- end of parity tables -->"

STATUSES = {"yes": "✔", "partial": "partial", "no": "✘", "extra": "qcowpy only"}
COMMAND = "(command)"
OTHER = "qcowpy-commands"  # qcowpy's commands that are not qemu-img's


def other_commands(path: Path = SOURCE) -> dict[str, str]:
    return dict(tomllib.loads(path.read_text()).get(OTHER, {}))


@dataclass(frozen=True)
class Row:
    section: str  # a command, "global", or "create-options.FMT"
    key: str      # as written in the table: "-U, --force-share", "-c count", "cluster_size"
    status: str
    note: str

    @property
    def forms(self) -> list[str]:
        """The option strings a row names: "-U, --force-share" -> ["-U", "--force-share"]."""
        if self.key == COMMAND or self.section.startswith("create-options."):
            return [] if self.key == COMMAND else [self.key]
        return [re.split(r"[ =]", part, maxsplit=1)[0] for part in self.key.split(", ")]


def load(path: Path = SOURCE) -> list[Row]:
    data = tomllib.loads(path.read_text())
    rows = []
    for section, table in data.items():
        if section == OTHER:
            continue
        if section == "create-options":
            for fmt, opts in table.items():
                rows += [_row(f"create-options.{fmt}", k, v) for k, v in opts.items()]
        else:
            rows += [_row(section, k, v) for k, v in table.items()]
    return rows


def _row(section: str, key: str, value) -> Row:
    status, note = (value, "") if isinstance(value, str) else (value[0], value[1])
    if status not in STATUSES:
        raise ValueError(f"{section} {key}: unknown status {status!r}")
    if status in ("partial", "no", "extra") and not note:
        raise ValueError(f"{section} {key}: a {status} row needs a note")
    return Row(section, key, status, note)


def commands(rows: list[Row]) -> list[str]:
    seen: list[str] = []
    for r in rows:
        if r.section != "global" and not r.section.startswith("create-options.") and r.section not in seen:
            seen.append(r.section)
    return seen


def render(rows: list[Row] | None = None) -> str:
    rows = load() if rows is None else rows
    counts = {s: sum(1 for r in rows if r.status == s and r.key != COMMAND) for s in STATUSES}
    out = [BEGIN, "",
           f"Every qemu-img 7.2 command and option: {counts['yes']} ✔, {counts['partial']} partial, "
           f"{counts['no']} ✘; {counts['extra']} qcowpy-only.", "",
           "| command | option | qcowpy | note |", "|---|---|---|---|"]
    for r in rows:
        if r.section.startswith("create-options."):
            continue
        option = r.key if r.key == COMMAND else f"`{r.key}`"
        out.append(_cells(r.section, option, STATUSES[r.status], r.note))
    out += ["", "Creation options (`create -o`, `convert -o`, `measure -o`), as `qemu-img create -f FMT -o help` "
                "lists them:", "", "| format | option | qcowpy | note |", "|---|---|---|---|"]
    for r in rows:
        if r.section.startswith("create-options."):
            out.append(_cells(r.section.split(".", 1)[1], f"`{r.key}`", STATUSES[r.status], r.note))
    others = "; ".join(f"`{name}` ({note})" for name, note in other_commands().items())
    out += ["", f"qcowpy's other commands stand in for other QEMU programs: {others}.", "", END]
    return "\n".join(out)


def _cells(*cells: str) -> str:
    return "| " + " | ".join(c.replace("|", "\\|") for c in cells) + " |"


def section_of(page: str) -> str | None:
    """The generated part of docs/cli.md (markers included), or None."""
    start, end = page.find(BEGIN), page.find(END)
    if start < 0 or end < 0:
        return None
    return page[start:end + len(END)]


def write() -> None:
    page = PAGE.read_text()
    old = section_of(page)
    if old is None:
        raise SystemExit(f"{PAGE}: no parity markers")
    PAGE.write_text(page.replace(old, render()))


if __name__ == "__main__":
    if sys.argv[1:] == ["--write"]:
        write()
    else:
        print(render())
