"""``check``: qemu-img's consistency check and repair, with its output and exit codes.

Exit codes (qemu-img's): 0 consistent, 1 check could not complete, 2 corruptions,
3 leaks only, 63 the format has no checks (raw).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

from ..block.check import (FIX_ERRORS, FIX_LEAKS, CheckNotSupported, CheckResult, Hint, stderr_log,  # noqa: F401
                           check_image, probe_for_check)
from ..errors import InvalidArgument
from .qjson import QDict, dumps_pretty

EXIT_OK, EXIT_FAILED, EXIT_CORRUPT, EXIT_LEAKS, EXIT_UNSUPPORTED = 0, 1, 2, 3, 63

REPAIR_MODES = {None: 0, "leaks": FIX_LEAKS, "all": FIX_LEAKS | FIX_ERRORS}


@dataclass
class CheckReport:
    filename: str
    format: str
    result: CheckResult
    repaired: CheckResult | None = None  # the first pass, when it fixed something
    failed: str | None = None  # "Check failed" reason (exit 1)
    failed_lines: list[str] | None = None  # error reports printed before "Check failed"

    @property
    def exit_code(self) -> int:
        r = self.result
        if self.failed is not None or r.check_errors:
            return EXIT_FAILED
        if r.corruptions:
            return EXIT_CORRUPT
        if r.leaks:
            return EXIT_LEAKS
        return EXIT_OK


def run_check(filename: str, fmt: str | None = None, repair: str | None = None, force_share: bool = False,
              log: Callable[[str], None] | None = None) -> CheckReport:
    """Open ``filename`` as qemu-img check does (read-only unless repairing) and check it.

    Open failures raise QcowError; per-problem messages go to ``log`` (stderr in the CLI).
    """
    if repair not in REPAIR_MODES:
        raise InvalidArgument(f"Unknown option value for -r (expecting 'leaks' or 'all'): {repair}")
    fmt = fmt or probe_for_check(filename)
    if fmt not in ("qcow2", "raw", "luks"):
        raise InvalidArgument(f"Unknown driver '{fmt}'")
    o = check_image(filename, fmt, REPAIR_MODES[repair], force_share, log)
    return CheckReport(filename, fmt, o.result, o.repaired, o.failed, o.failed_lines)


def repaired_banner(report: CheckReport) -> str:
    r = report.repaired
    if r is None:
        return ""
    return ("The following inconsistencies were found and repaired:\n\n"
            f"    {r.leaks_fixed} leaked clusters\n"
            f"    {r.corruptions_fixed} corruptions\n\n"
            "Double checking the fixed image now...\n")


def render_human(report: CheckReport) -> str:
    c = report.result
    out = []
    if not (c.corruptions or c.leaks or c.check_errors):
        out.append("No errors were found on the image.\n")
    else:
        if c.corruptions:
            out.append(f"\n{c.corruptions} errors were found on the image.\n"
                       "Data may be corrupted, or further writes to the image may corrupt it.\n")
        if c.leaks:
            out.append(f"\n{c.leaks} leaked clusters were found on the image.\n"
                       "This means waste of disk space, but no harm to data.\n")
        if c.check_errors:
            out.append(f"\n{c.check_errors} internal errors have occurred during the check.\n")
    if c.total_clusters and c.allocated_clusters:
        out.append(f"{c.allocated_clusters}/{c.total_clusters} = "
                   f"{c.allocated_clusters * 100.0 / c.total_clusters:0.2f}% allocated, "
                   f"{c.fragmented_clusters * 100.0 / c.allocated_clusters:0.2f}% fragmented, "
                   f"{c.compressed_clusters * 100.0 / c.allocated_clusters:0.2f}% compressed clusters\n")
    if c.image_end_offset:
        out.append(f"Image end offset: {c.image_end_offset}\n")
    return "".join(out)


def to_qdict(report: CheckReport) -> QDict:
    """ImageCheck in QAPI order; optional counters are omitted when zero, as QEMU does."""
    c = report.result
    d = QDict()
    d["filename"] = report.filename
    d["format"] = report.format
    d["check-errors"] = c.check_errors
    for key, value in (("image-end-offset", c.image_end_offset), ("corruptions", c.corruptions),
                       ("leaks", c.leaks), ("corruptions-fixed", c.corruptions_fixed),
                       ("leaks-fixed", c.leaks_fixed), ("total-clusters", c.total_clusters),
                       ("allocated-clusters", c.allocated_clusters),
                       ("fragmented-clusters", c.fragmented_clusters),
                       ("compressed-clusters", c.compressed_clusters)):
        if value:
            d[key] = value
    return d


def render_json(report: CheckReport) -> str:
    return dumps_pretty(to_qdict(report)) + "\n"
