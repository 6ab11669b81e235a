"""``qcowpy bitmap``: qemu-img 7.2's bitmap subcommand (registered by cli/main.py).

Options are parsed with getopt, as qemu-img parses them, because their order matters: each
``--add``, ``--remove``, ``--clear``, ``--enable``, ``--disable`` and ``--merge SOURCE`` is one
operation, run in command-line order.
"""
from __future__ import annotations

import getopt

import click

from .common import CONTEXT, CommandFailed, image_name, parse_objects, size_arg, warn_if_probed_raw

_LONG = ["help", "object=", "image-opts", "add", "remove", "clear", "enable", "disable", "merge=",
         "granularity=", "source-file=", "source-format="]


def _forms() -> set[str]:
    """Every option string the getopt parser takes (for the parity table's test)."""
    shorts = {"-b", "-f", "-F", "-g", "-h"}
    return shorts | {"--" + name.rstrip("=") for name in _LONG}


@click.command("bitmap", context_settings=dict(CONTEXT, ignore_unknown_options=True, allow_interspersed_args=False))
@click.argument("args", nargs=-1, type=click.UNPROCESSED)
def bitmap(args) -> None:
    """Change the persistent dirty bitmaps of an image.

    \b
    qcowpy bitmap (--merge SOURCE | --add | --remove | --clear | --enable | --disable)...
        [-b source_file [-F source_fmt]] [-g granularity] [--object objectdef]
        [--image-opts | -f fmt] filename bitmap
    """
    from ..tools.bitmap import run_bitmap

    try:
        opts, rest = getopt.gnu_getopt(list(args), "b:f:F:g:h", _LONG)
    except getopt.GetoptError as e:
        flag = ("--" if len(e.opt) > 1 or f"--{e.opt}" in e.msg else "-") + e.opt
        if "requires argument" in e.msg:
            raise click.BadOptionUsage(flag, f"Option '{flag}' requires an argument.") from None
        raise click.NoSuchOption(flag) from None
    actions: list[tuple[str, str | None]] = []
    fmt = src_fmt = src = None
    granularity = 0
    image_opts = False
    objects: list[str] = []
    for opt, val in opts:
        if opt in ("-h", "--help"):
            click.echo(click.get_current_context().get_help())
            return
        if opt == "-b" or opt == "--source-file":
            src = val
        elif opt == "-f":
            fmt = val
        elif opt == "-F" or opt == "--source-format":
            src_fmt = val
        elif opt == "-g" or opt == "--granularity":
            granularity = size_arg("granularity", val)
        elif opt == "--merge":
            actions.append(("merge", val))
        elif opt == "--object":
            objects.append(val)
        elif opt == "--image-opts":
            image_opts = True
        else:
            actions.append((opt[2:], None))
    if not actions:
        raise CommandFailed("Need at least one of --add, --remove, --clear, --enable, --disable, or --merge")
    ops = {op for op, _ in actions}
    if granularity and "add" not in ops:
        raise CommandFailed("granularity only supported with --add")
    if src_fmt and not src:
        raise CommandFailed("-F only supported with -b")
    if src and "merge" not in ops:
        raise CommandFailed("Merge bitmap source file only supported with --merge")
    if len(rest) != 2:
        raise CommandFailed("Expecting filename and bitmap name")
    parse_objects(objects)
    filename, fmt = image_name(rest[0], image_opts, fmt)
    warn_if_probed_raw(filename, fmt)
    # QEMU passes the size as a uint32: 4G becomes 0, which the add then refuses
    run_bitmap(filename, fmt, rest[1], actions, granularity & 0xFFFFFFFF if granularity else None,
               source=src, source_fmt=src_fmt)


bitmap.getopt_forms = _forms()  # type: ignore[attr-defined]  # options click does not see
