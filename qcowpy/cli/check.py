"""``qcowpy check``: the click command (registered in the CLI group by cli/main.py)."""
from __future__ import annotations

import sys

import click

from ..errors import QcowError
from . import common
from .common import CONTEXT, CommandFailed, image_name, open_error, parse_objects


def _fail(message: str | None, code: int = 1) -> CommandFailed:
    return CommandFailed(message, code)


@click.command("check", context_settings=CONTEXT)
@click.option("-f", "--format", "fmt", metavar="FMT", help="Image format (probed when omitted).")
@click.option("--output", "output", default="human", metavar="human|json", help="Output format.")
@click.option("-r", "--repair", "repair", metavar="leaks|all", help="Repair leaks, or leaks and errors.")
@click.option("-q", "quiet", is_flag=True, help="Quiet: print nothing on stdout.")
@click.option("-U", "--force-share", is_flag=True, help="Open without taking (or respecting) image locks.")
@click.option("-T", "cache", metavar="CACHE", hidden=True)
@click.option("--image-opts", is_flag=True, hidden=True)
@click.option("--object", "objects", multiple=True, hidden=True)
@click.argument("filename", required=False)
def check(fmt, output, repair, quiet, force_share, cache, image_opts, objects, filename):
    """Check an image for consistency (and repair it with -r leaks|all).

    \b
    Exit status: 0 consistent, 1 check failed, 2 corruptions, 3 leaked clusters only,
    63 the format has no checks.
    """
    from ..tools.check import (EXIT_UNSUPPORTED, CheckNotSupported, Hint, render_human, render_json,
                               repaired_banner, run_check, stderr_log)

    if filename is None:
        raise click.UsageError("Expecting one image file name")
    if output not in ("human", "json"):
        raise _fail("--output must be used with human or json as argument.")
    parse_objects(objects)
    filename, fmt = image_name(filename, image_opts, fmt)
    if repair is not None and repair not in ("leaks", "all"):
        raise _fail(f"Unknown option value for -r (expecting 'leaks' or 'all'): {repair}")
    try:
        report = run_check(filename, fmt, repair, force_share, log=stderr_log)
    except CheckNotSupported as e:
        raise _fail(str(e), EXIT_UNSUPPORTED) from None
    except QcowError as e:
        raise _fail(open_error(filename, e)) from None
    if not quiet:
        if output == "human":
            sys.stdout.write(repaired_banner(report))
        if report.failed is None:
            sys.stdout.write(render_human(report) if output == "human" else render_json(report))
    code = report.exit_code
    if code == 1:
        lines = list(report.failed_lines or [])
        lines.append(f"Check failed: {report.failed}" if report.failed else "Check failed")
        for line in lines:  # error reports carry the program name, QEMU's hint lines do not
            sys.stderr.write(f"{line}\n" if isinstance(line, Hint) else f"{common.PROG}: {line}\n")
        raise _fail(None)
    sys.stdout.flush()
    if code:
        click.get_current_context().exit(code)
    return code
