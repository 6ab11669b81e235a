"""``qcowpy amend``: the click command (registered in the CLI group by cli/main.py)."""
from __future__ import annotations

import sys

import click

from ..errors import QcowError
from .common import CONTEXT, CommandFailed, image_name, open_error, parse_objects

_CACHE = ("none", "writeback", "unsafe", "directsync", "writethrough")


@click.command("amend", context_settings=CONTEXT)
@click.option("-o", "options", multiple=True, metavar="OPTIONS", help="Options to change (-o help lists them).")
@click.option("-f", "fmt", metavar="FMT", help="Image format (probed when omitted).")
@click.option("-t", "cache", metavar="CACHE", help="Cache mode of the image (default writeback).")
@click.option("-p", "progress", is_flag=True, help="Show progress.")
@click.option("-q", "quiet", is_flag=True, help="Quiet (no progress).")
@click.option("--force", is_flag=True, help="Allow operations QEMU guards with --force (LUKS keyslots).")
@click.option("--image-opts", is_flag=True, hidden=True)
@click.option("--object", "objects", multiple=True, hidden=True)
@click.argument("filenames", nargs=-1)
def amend(options, fmt, cache, progress, quiet, force, image_opts, objects, filenames) -> None:
    """Change options of an existing image: compat, refcount_bits, lazy_refcounts, size,
    data_file, data_file_raw (-o help lists them).

    \b
    qcowpy amend [--object objectdef] [--image-opts] [-p] [-q] [-f fmt] [-t cache] [--force] -o options filename
    """
    from ..tools import options as optmod
    from ..tools.amend import AmendError, amend_device, amend_help
    from ..tools.convert import Progress

    parse_objects(objects)
    opts = optmod.accumulate(options)
    if opts is None:
        raise click.UsageError("Must specify options (-o)")
    if quiet:
        progress = False
    if fmt and optmod.has_help(opts):
        try:
            sys.stdout.write(amend_help(fmt))
        except AmendError as e:
            raise CommandFailed(str(e)) from None
        return
    if len(filenames) != 1:
        raise CommandFailed("Expecting one image file name")
    if cache is not None and cache not in _CACHE:
        raise CommandFailed(f"Invalid cache option: {cache}")
    filename, fmt = image_name(filenames[0], image_opts, fmt)
    from ..block.open import open_image
    try:
        dev = open_image(filename, "r+", fmt, cache="unsafe" if cache == "unsafe" else "writeback")
    except QcowError as e:
        raise CommandFailed(open_error(filename, e)) from None
    bar = Progress(progress, 1.0)
    try:
        with dev:
            if optmod.has_help(opts):  # the format was probed: its help, as qemu-img prints it here
                sys.stdout.write(amend_help(dev.format))
                return
            amend_device(dev, opts, force, report=bar.set)
    except AmendError as e:
        bar.end()
        raise CommandFailed(str(e), hint=e.hint) from None
    except QcowError as e:
        bar.end()
        raise CommandFailed(str(e)) from None
    bar.end()
