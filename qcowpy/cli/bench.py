"""``qcowpy bench``: qemu-img's bench command (registered in the CLI group by cli/main.py).

Options are checked as qemu-img checks them, each occurrence as it is met on the command line
(ArgvOrderCommand), with qemu-img's messages and exit status 1.
"""
from __future__ import annotations

import sys

import click

from ..errors import QcowError
from ..units import SizeError, cvtnum, strtoul
from .common import CONTEXT, CommandFailed, image_name, open_error, out, size_arg, warn_if_probed_raw

INT_MAX = (1 << 31) - 1

#: qemu-img's -t values (bdrv_parse_cache_mode), and those that ask for O_DIRECT (cache.direct=on)
CACHE_MODES = ("none", "off", "directsync", "writeback", "unsafe", "writethrough")
DIRECT_MODES = ("none", "off", "directsync")
#: qemu-img's -i values (bdrv_parse_aio, with io_uring built in as Debian's qemu-img has it)
AIO_MODES = ("threads", "native", "io_uring")


def _ulong(message: str, maximum: int):
    def check(text: str) -> int:
        value = strtoul(text)
        if value is None or value > maximum:
            raise CommandFailed(message)
        return value
    return check


def _size(name: str, maximum: int | None = None):
    def check(text: str) -> int:
        if maximum is None:
            return size_arg(name, text)
        try:
            return cvtnum(name, text, 0, maximum)
        except SizeError as e:
            raise CommandFailed(str(e)) from None
    return check


def _choice(allowed: tuple[str, ...], message: str):
    def check(text: str) -> str:
        if text not in allowed:
            raise CommandFailed(message.format(text))
        return text
    return check


#: how qemu-img checks each option's value, by parameter name
CHECKS = {
    "count": _ulong("Invalid request count specified", INT_MAX),
    "depth": _ulong("Invalid queue depth specified", INT_MAX),
    "flush_interval": _ulong("Invalid flush interval specified", INT_MAX),
    "pattern": _ulong("Invalid pattern byte specified", 0xFF),
    "offset": _size("offset"),
    "bufsize": _size("buffer size", INT_MAX),
    "step": _size("step_size", INT_MAX),
    "aio": _choice(AIO_MODES, "Invalid aio option: {}"),
    "cache": _choice(CACHE_MODES, "Invalid cache mode"),
}


def _checked(ctx: click.Context, param: click.Parameter, values: tuple[str, ...]) -> object:
    """The checked value of the option's last occurrence (getopt keeps the last); every -i value,
    since -i native sets a flag a later -i threads does not clear (bdrv_parse_aio)."""
    seen = ctx.meta.get(_CHECKED, {}).get(param.name, [])
    return tuple(seen) if param.name == "aio" else (seen[-1] if seen else None)


_CHECKED = "qcowpy.bench.checked"


class ArgvOrderCommand(click.Command):
    """Checks option values in command-line order, every occurrence, as qemu-img's getopt loop
    meets them: the first bad value is the one reported (click alone would check each option
    once, at its first occurrence, and only its last value)."""

    def parse_args(self, ctx: click.Context, args: list[str]) -> list[str]:
        opts, _, order = self.make_parser(ctx).parse_args(args=list(args))
        seen: dict[str, int] = {}
        checked = ctx.meta.setdefault(_CHECKED, {})
        for param in order:
            if param.name == "help":
                break
            if param.name in CHECKS:
                i = seen.get(param.name, 0)
                seen[param.name] = i + 1
                checked.setdefault(param.name, []).append(CHECKS[param.name](opts[param.name][i]))
        return super().parse_args(ctx, args)


@click.command("bench", cls=ArgvOrderCommand, context_settings=CONTEXT)
@click.option("-c", "count", multiple=True, metavar="COUNT",
              callback=_checked,
              help="Number of requests (default 75000).")
@click.option("-d", "depth", multiple=True, metavar="DEPTH", callback=_checked,
              help="Requests in flight at once (default 64).")
@click.option("-f", "fmt", metavar="FMT", help="Image format (probed when omitted).")
@click.option("--flush-interval", "flush_interval", multiple=True, metavar="N",
              callback=_checked,
              help="With -w: flush every N requests.")
@click.option("-i", "aio", multiple=True, metavar="AIO", callback=_checked,
              help="threads, native or io_uring (all run on qcowpy's worker threads).")
@click.option("--image-opts", is_flag=True, help="The filename is an option string (driver=...,file.filename=...).")
@click.option("-n", "native", is_flag=True, help="Same as -i native (needs -t none or directsync).")
@click.option("--no-drain", is_flag=True, help="Flush beside the writes in flight instead of draining them first.")
@click.option("-o", "offset", multiple=True, metavar="OFFSET", callback=_checked,
              help="Offset of the first request (default 0).")
@click.option("--pattern", "pattern", multiple=True, metavar="PATTERN",
              callback=_checked, help="Byte that -w writes (default 0).")
@click.option("-q", "quiet", is_flag=True, help="Accepted (qemu-img prints the same lines with -q).")
@click.option("-s", "bufsize", multiple=True, metavar="BUFFER_SIZE", callback=_checked,
              help="Bytes per request (default 4096).")
@click.option("-S", "step", multiple=True, metavar="STEP_SIZE", callback=_checked,
              help="Bytes between the starts of two requests (default: the buffer size).")
@click.option("-t", "cache", multiple=True, metavar="CACHE", callback=_checked,
              help="Cache mode: none, directsync, writeback (default), unsafe or writethrough.")
@click.option("-w", "write", is_flag=True, help="Write instead of reading.")
@click.option("-U", "--force-share", is_flag=True, help="Open without taking (or respecting) the write lock.")
@click.argument("filenames", nargs=-1)
def bench(count, depth, fmt, flush_interval, aio, image_opts, native, no_drain, offset, pattern, quiet, bufsize,
          step, cache, write, force_share, filenames) -> None:
    """Run a simple sequential I/O benchmark on FILENAME (qemu-img bench).

    \b
    qcowpy bench [-c count] [-d depth] [-f fmt] [--flush-interval=flush_interval] [-i aio] [-n]
                 [--no-drain] [-o offset] [--pattern=pattern] [-q] [-s buffer_size] [-S step_size]
                 [-t cache] [-w] [-U] filename
    """
    from ..block.open import open_image
    from ..block.nbd import is_nbd_uri
    from ..tools.bench import BenchFailed, BenchSpec, header_lines, run_bench

    if len(filenames) != 1:
        raise click.UsageError("Expecting one image file name")
    spec = BenchSpec(write=write, drain=not no_drain)
    for name, value in (("count", count), ("depth", depth), ("offset", offset), ("bufsize", bufsize),
                        ("step", step), ("pattern", pattern), ("flush_interval", flush_interval)):
        if value is not None:
            setattr(spec, name, value)
    if not write and spec.flush_interval:
        raise CommandFailed("--flush-interval is only available in write tests")
    if spec.flush_interval and spec.flush_interval < spec.depth:
        raise CommandFailed("Flush interval can't be smaller than depth")
    if spec.depth == 0 and spec.count:  # qemu-img 7.2 would wait forever (docs/cli.md)
        raise CommandFailed("Invalid queue depth specified")
    given = filenames[0]
    if force_share and write:
        raise CommandFailed(f"Could not open '{given}': force-share=on can only be used with read-only images")
    filename, fmt = image_name(given, image_opts, fmt)
    if write:
        warn_if_probed_raw(filename, fmt)
    spec.writethrough = cache in ("writethrough", "directsync")
    try:
        dev = open_image(filename, "r+" if write else "r", fmt, cache="unsafe" if cache == "unsafe" else "writeback",
                         force_share=force_share)
    except QcowError as e:
        raise CommandFailed(open_error(given, e)) from None
    with dev:
        if (native or "native" in aio) and cache not in DIRECT_MODES and not is_nbd_uri(filename):
            raise CommandFailed(f"Could not open '{given}': aio=native was specified, but it requires "
                                "cache.direct=on, which was not specified.")
        for line in header_lines(spec):
            out(line + "\n")
        sys.stdout.flush()
        try:
            elapsed = run_bench(dev, spec)
        except BenchFailed as e:
            raise CommandFailed(str(e)) from None
        out(f"Run completed in {elapsed:.3f} seconds.\n")
