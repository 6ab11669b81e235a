"""``qcowpy``: qemu-img's commands and options, with qemu-img's output and exit codes.

Every failure is one ``qcowpy: <message>`` line on stderr (a few QEMU messages carry an
unprefixed hint line after it, as qemu-img prints them) and exit status 1 — except ``compare``,
which exits 2 on errors because 1 means "images differ".
"""
from __future__ import annotations

import errno
import os
import sys

import click

from .. import __version__  # the package's own (click would read installed metadata: +21 ms)
from ..errors import QcowError

from . import common
from .common import (CONTEXT, NODE_NAMES, CommandFailed, error_line, image_name, open_error, out, parse_objects,  # noqa: F401
                     size_arg, warn_if_probed_raw, warn_line)


class QemuGroup(click.Group):
    """Lists commands in definition order."""

    def list_commands(self, ctx: click.Context) -> list[str]:
        return list(self.commands)


@click.group(cls=QemuGroup, context_settings=CONTEXT)
@click.version_option(__version__, "-V", "--version", prog_name="qcowpy", message="%(prog)s version %(version)s")
def cli() -> None:
    """qcowpy: a qemu-img compatible qcow2/raw image tool."""


# ---------------------------------------------------------------------------------------- create
@cli.command(context_settings=CONTEXT)
@click.option("-f", "fmt", default="raw", metavar="FMT", help="Image format (qcow2 or raw; default raw).")
@click.option("-o", "options", multiple=True, metavar="OPTIONS", help="Comma-separated -o options ('-o help').")
@click.option("-b", "backing", metavar="BACKING", help="Backing file (same as -o backing_file=).")
@click.option("-F", "backing_fmt", metavar="BACKING_FMT", help="Backing file format.")
@click.option("-u", "unsafe", is_flag=True, help="Do not open the backing file (size must be given).")
@click.option("-q", "quiet", is_flag=True, help="Quiet: no Formatting line.")
@click.option("--object", "objects", multiple=True, hidden=True)
@click.argument("args", nargs=-1)
def create(fmt, options, backing, backing_fmt, unsafe, quiet, objects, args) -> None:
    """Create FILENAME of SIZE bytes (k, M, G, T, P, E suffixes).

    \b
    qcowpy create [-f fmt] [-o options] [-b backing] [-F backing_fmt] [-u] [-q] filename [size]
    """
    from ..tools import options as optmod
    from ..tools.create import CreateError, CreateRequest, run_create

    parse_objects(objects)
    optstr = optmod.accumulate(options)
    filename = args[0] if args else None
    if optstr and optmod.has_help(optstr):
        out(optmod.help_text(fmt, filename))
        return
    if filename is None:
        raise click.UsageError("Expecting image file name")
    size = None
    if len(args) > 1:
        size = size_arg("image size", args[1])
    if len(args) > 2:
        raise click.UsageError(f"Unexpected argument: {args[2]}")
    from ..block.spec import file_protocol_path
    req = CreateRequest(file_protocol_path(filename), fmt, size, optstr, backing, backing_fmt, unsafe,
                        shown_as=filename)
    try:
        run_create(req, quiet, echo=lambda line: (out(line + "\n"), sys.stdout.flush()), warn=warn_line)
    except CreateError as e:
        raise CommandFailed(f"{filename}: {e}", hint=e.hint) from None
    except QcowError as e:
        raise CommandFailed(f"{filename}: {e}", hint=getattr(e, "hint", None)) from None


# ---------------------------------------------------------------------------------------- info
def _output_option(f):
    return click.option("--output", "output", default="human", metavar="human|json",
                        help="Output format: human (default) or json.")(f)


def check_output(output: str) -> None:
    if output not in ("human", "json"):
        raise CommandFailed("--output must be used with human or json as argument.")


@cli.command(context_settings=CONTEXT)
@click.option("-f", "--format", "fmt", metavar="FMT", help="Image format (probed when omitted).")
@_output_option
@click.option("--backing-chain", is_flag=True, help="Show every image of the backing chain (top first).")
@click.option("-U", "--force-share", is_flag=True, help="Open read-only without taking the shared write lock (like qemu-img -U).")
@click.option("--image-opts", is_flag=True, hidden=True)
@click.option("--object", "objects", multiple=True, hidden=True)
@click.argument("filenames", nargs=-1)
def info(fmt, output, backing_chain, force_share, image_opts, objects, filenames) -> None:
    """Show an image's format, sizes, backing file and format-specific details."""
    from ..tools.info import collect, render

    if len(filenames) != 1:
        raise click.UsageError("Expecting one image file name")
    parse_objects(objects)
    filename, fmt = image_name(filenames[0], image_opts, fmt)
    check_output(output)
    try:
        infos = collect(filename, fmt, backing_chain, force_share)
    except QcowError as e:
        raise CommandFailed(str(e)) from None
    if filename in NODE_NAMES:
        infos[0]["filename"] = NODE_NAMES[filename]
    out(render(infos, output, backing_chain))


# ---------------------------------------------------------------------------------------- map
@cli.command("map", context_settings=CONTEXT)
@click.option("-f", "--format", "fmt", metavar="FMT", help="Image format (probed when omitted).")
@_output_option
@click.option("-s", "--start-offset", "start_offset", metavar="OFFSET", help="Start at this guest offset.")
@click.option("-l", "--max-length", "max_length", metavar="LENGTH", help="Map at most this many bytes.")
@click.option("-U", "--force-share", is_flag=True, help="Open read-only without taking the shared write lock (like qemu-img -U).")
@click.option("--image-opts", is_flag=True, hidden=True)
@click.option("--object", "objects", multiple=True, hidden=True)
@click.argument("filenames", nargs=-1)
def map_cmd(fmt, output, start_offset, max_length, force_share, image_opts, objects, filenames) -> None:
    """Show where each guest range of an image (and its backing chain) comes from."""
    from ..block.open import open_image
    from ..tools.mapping import MapError, map_lines

    start = size_arg("start offset", start_offset) if start_offset is not None else 0
    length = size_arg("max length", max_length) if max_length is not None else None
    if len(filenames) != 1:
        raise click.UsageError("Expecting one image file name")
    parse_objects(objects)
    filename, fmt = image_name(filenames[0], image_opts, fmt)
    check_output(output)
    try:
        dev = open_image(filename, "r", fmt, force_share=force_share)
    except QcowError as e:
        raise CommandFailed(open_error(filename, e)) from None
    with dev:
        try:
            for line in map_lines(dev, output, start, length):
                out(line)
        except MapError as e:
            sys.stdout.flush()
            raise CommandFailed(str(e)) from None
        except QcowError as e:
            sys.stdout.flush()
            raise CommandFailed(f"Could not read file metadata: {e}") from None


# ---------------------------------------------------------------------------------------- compare
@cli.command(context_settings=CONTEXT)
@click.option("-f", "fmt1", metavar="FMT", help="Format of the first image.")
@click.option("-F", "fmt2", metavar="FMT", help="Format of the second image.")
@click.option("-s", "strict", is_flag=True, help="Strict: sizes and allocation must match too.")
@click.option("-p", "progress", is_flag=True, help="Show progress.")
@click.option("-q", "quiet", is_flag=True, help="Quiet: only the exit status tells.")
@click.option("-T", "src_cache", metavar="SRC_CACHE", help="Accepted for compatibility.")
@click.option("-U", "--force-share", is_flag=True, help="Open read-only without taking the shared write lock (like qemu-img -U).")
@click.option("--image-opts", is_flag=True, hidden=True)
@click.option("--object", "objects", multiple=True, hidden=True)
@click.argument("filenames", nargs=-1)
def compare(fmt1, fmt2, strict, progress, quiet, src_cache, force_share, image_opts, objects, filenames) -> None:
    """Compare two images' guest contents: exit 0 identical, 1 different, 2 error.

    \b
    qcowpy compare [-f fmt] [-F fmt] [-s] [-p] [-q] [-U] filename1 filename2
    """
    from ..tools.compare import run_compare

    if len(filenames) != 2:
        raise click.UsageError("Expecting two image file names")
    parse_objects(objects)
    (name1, fmt1), (name2, fmt2) = image_name(filenames[0], image_opts, fmt1), image_name(filenames[1], image_opts, fmt2)
    if quiet:
        progress = False
    if src_cache is not None and src_cache not in ("none", "writeback", "unsafe", "directsync", "writethrough"):
        raise CommandFailed(f"Invalid source cache option: {src_cache}", code=2)
    code = run_compare(name1, name2, fmt1, fmt2, strict=strict, quiet=quiet, progress=progress,
                       force_share=force_share,
                       echo=out, error=error_line)
    if code:
        raise CommandFailed(None, code)


# ---------------------------------------------------------------------------------------- resize
@cli.command(context_settings={**CONTEXT, "ignore_unknown_options": True})
@click.option("-f", "--format", "fmt", metavar="FMT", help="Image format (probed when omitted).")
@click.option("--preallocation", metavar="MODE", help="Map the new area: off, metadata, falloc or full.")
@click.option("--shrink", is_flag=True, help="Allow shrinking (data past the new end is lost).")
@click.option("-q", "quiet", is_flag=True, help="Quiet: no 'Image resized.' line.")
@click.option("--image-opts", is_flag=True, hidden=True)
@click.option("--object", "objects", multiple=True, hidden=True)
@click.argument("args", nargs=-1)
def resize(fmt, preallocation, shrink, quiet, image_opts, objects, args) -> None:
    """Change an image's virtual size: SIZE, +SIZE or -SIZE.

    \b
    qcowpy resize [-f fmt] [--preallocation=mode] [--shrink] [-q] filename [+|-]size
    """
    from ..tools.resize import ResizeError, run_resize

    for word in args[:-1]:  # qemu-img takes the last word as the size first; the rest are getopt's
        if word.startswith("-") and word != "-":
            raise click.NoSuchOption(word)
    if len(args) != 2:  # the size may look like an option ("-1G"): it is always the last word
        raise click.UsageError("Expecting image file name and size")
    parse_objects(objects)
    filename, fmt = image_name(args[0], image_opts, fmt)
    size = args[1]
    warn_if_probed_raw(filename, fmt)
    try:
        run_resize(filename, size, fmt, preallocation, shrink,
                   echo=(lambda line: None) if quiet else (lambda line: out(line + "\n")))
    except ResizeError as e:
        if e.warning:
            error_line(str(e))
            warn_line(e.warning)
            raise CommandFailed(None) from None
        raise CommandFailed(str(e), hint=e.hint) from None
    except QcowError as e:
        raise CommandFailed(str(e) if str(e).startswith("Could not open") else f"{e}") from None


# ---------------------------------------------------------------------------------------- commit
@cli.command(context_settings=CONTEXT)
@click.option("-f", "fmt", metavar="FMT", help="Image format (probed when omitted).")
@click.option("-b", "base", metavar="BASE", help="Commit down to this image of the chain (implies -d).")
@click.option("-d", "drop", is_flag=True, help="Leave the committed image as it is (do not empty it).")
@click.option("-p", "progress", is_flag=True, help="Accepted for compatibility.")
@click.option("-q", "quiet", is_flag=True, help="Quiet: no 'Image committed.' line.")
@click.option("-t", "cache", metavar="CACHE", help="Accepted for compatibility.")
@click.option("-r", "rate", metavar="RATE", help="Accepted for compatibility (no rate limit).")
@click.option("--image-opts", is_flag=True, hidden=True)
@click.option("--object", "objects", multiple=True, hidden=True)
@click.argument("filenames", nargs=-1)
def commit(fmt, base, drop, progress, quiet, cache, rate, image_opts, objects, filenames) -> None:
    """Write an image's data into its backing file (or -b BASE) and empty it (unless -d).

    \b
    qcowpy commit [-f fmt] [-b base] [-d] [-p] [-q] filename
    """
    from ..tools.commit import run_commit

    if len(filenames) != 1:
        raise click.UsageError("Expecting one image file name")
    if cache is not None and cache not in ("none", "writeback", "unsafe", "directsync", "writethrough"):
        raise CommandFailed(f"Invalid cache option: {cache}")
    parse_objects(objects)
    filename, fmt = image_name(filenames[0], image_opts, fmt)
    warn_if_probed_raw(filename, fmt)
    run_commit(filename, fmt, base, drop)
    if not quiet:
        out("Image committed.\n")


# ---------------------------------------------------------------------------------------- dd
@cli.command(context_settings=CONTEXT)
@click.option("-f", "fmt", metavar="FMT", help="Input format (probed when omitted).")
@click.option("-O", "out_fmt", default="raw", metavar="OUTPUT_FMT", help="Output format (raw or qcow2; default raw).")
@click.option("-U", "--force-share", is_flag=True, help="Open the input without the shared write lock.")
@click.option("--image-opts", is_flag=True, hidden=True)
@click.option("--object", "objects", multiple=True, hidden=True)
@click.argument("operands", nargs=-1)
def dd(fmt, out_fmt, force_share, image_opts, objects, operands) -> None:
    """Copy blocks of an image into a new image, dd(1)-style operands.

    \b
    qcowpy dd [-f fmt] [-O output_fmt] [bs=block_size] [count=blocks] [skip=blocks] if=input of=output
    """
    from ..tools.dd import parse_operands, run_dd

    parse_objects(objects)
    req = parse_operands(list(operands))
    if image_opts and req.input:
        req.input, fmt = image_name(req.input, image_opts, fmt)
    run_dd(req, fmt, out_fmt, force_share, warn=error_line)


# ---------------------------------------------------------------------------------------- measure
@cli.command(context_settings=CONTEXT)
@click.option("-f", "fmt", metavar="FMT", help="Input image format (probed when omitted).")
@click.option("-O", "out_fmt", default="raw", metavar="OUTPUT_FMT", help="Format to measure for (default raw).")
@click.option("-o", "options", multiple=True, metavar="OPTIONS", help="Creation options of the output format.")
@_output_option
@click.option("--size", "size", metavar="SIZE", help="Measure a new image of this size instead of an input.")
@click.option("-l", "snapshot_param", metavar="SNAPSHOT_PARAM",
              help="Measure an internal snapshot of the input (ID or name, or snapshot.id=/snapshot.name=).")
@click.option("-U", "--force-share", is_flag=True, help="Open the input without the shared write lock.")
@click.option("--image-opts", is_flag=True, hidden=True)
@click.option("--object", "objects", multiple=True, hidden=True)
@click.argument("filenames", nargs=-1)
def measure(fmt, out_fmt, options, output, size, snapshot_param, force_share, image_opts, objects,
            filenames) -> None:
    """Print the file size an image (or a new image of --size) needs in OUTPUT_FMT.

    \b
    qcowpy measure [--output=human|json] [-O fmt] [-o options] [--size N | [-f fmt] filename]
    """
    from ..tools import options as optmod
    from ..tools.measure import measure as run_measure, render
    from .convert import _snapshot_loader

    try:
        optstr = optmod.accumulate(options)  # refused while qemu-img parses its arguments
    except QcowError as e:
        raise CommandFailed(str(e)) from None
    check_output(output)
    loader = _snapshot_loader(snapshot_param, 1)
    if len(filenames) > 1:
        raise CommandFailed("At most one filename argument is allowed.")
    parse_objects(objects)
    filename = filenames[0] if filenames else None
    if filename and image_opts:
        filename, fmt = image_name(filename, image_opts, fmt)
    if not filename and (fmt or image_opts or snapshot_param is not None):
        raise CommandFailed("--image-opts, -f, and -l require a filename argument.")
    nbytes = size_arg("image size", size) if size is not None else None
    if filename and nbytes is not None:
        raise CommandFailed("--size N cannot be used together with a filename.")
    if not filename and nbytes is None:
        raise CommandFailed("Either --size N or one filename must be specified.")
    out(render(run_measure(out_fmt, optstr, filename, fmt, nbytes, force_share, loader), output))


# ---------------------------------------------------------------------------------------- rebase
@cli.command(context_settings=CONTEXT)
@click.option("-f", "fmt", metavar="FMT", help="Image format (probed when omitted).")
@click.option("-b", "backing", metavar="BACKING", help="The new backing file ('' for none).")
@click.option("-F", "backing_fmt", metavar="BACKING_FMT", help="The new backing file's format.")
@click.option("-u", "unsafe", is_flag=True, help="Unsafe: only rewrite the header, copy nothing.")
@click.option("-p", "progress", is_flag=True, help="Accepted for compatibility.")
@click.option("-q", "quiet", is_flag=True, help="Quiet.")
@click.option("-t", "cache", metavar="CACHE", help="Accepted for compatibility.")
@click.option("-T", "src_cache", metavar="SRC_CACHE", help="Accepted for compatibility.")
@click.option("-U", "--force-share", is_flag=True, hidden=True)
@click.option("--image-opts", is_flag=True, hidden=True)
@click.option("--object", "objects", multiple=True, hidden=True)
@click.argument("filenames", nargs=-1)
def rebase(fmt, backing, backing_fmt, unsafe, progress, quiet, cache, src_cache, force_share, image_opts, objects,
           filenames) -> None:
    """Change the backing file of an image, keeping what it reads (unless -u).

    \b
    qcowpy rebase [-f fmt] [-u] -b backing_file [-F backing_fmt] [-p] [-q] filename
    """
    from ..tools.rebase import run_rebase

    if len(filenames) != 1:
        raise click.UsageError("Expecting one image file name")
    if not unsafe and backing is None:
        raise click.UsageError("Must specify backing file (-b) or use unsafe mode (-u)")
    for what, value in (("cache", cache), ("source cache", src_cache)):
        if value is not None and value not in ("none", "writeback", "unsafe", "directsync", "writethrough"):
            raise CommandFailed(f"Invalid {what} option: {value}")
    parse_objects(objects)
    filename, fmt = image_name(filenames[0], image_opts, fmt)
    warn_if_probed_raw(filename, fmt)
    run_rebase(filename, backing, backing_fmt, fmt, unsafe)


# ---------------------------------------------------------------------------------------- snapshot
@cli.command(context_settings=CONTEXT)
@click.option("-l", "list_", is_flag=True, help="List the snapshots.")
@click.option("-c", "create_name", metavar="SNAPSHOT", help="Create a snapshot of the current disk state.")
@click.option("-a", "apply_name", metavar="SNAPSHOT", help="Revert the disk to a snapshot (id or name).")
@click.option("-d", "delete_name", metavar="SNAPSHOT", help="Delete a snapshot (by name).")
@click.option("-q", "quiet", is_flag=True, help="Quiet.")
@click.option("-U", "--force-share", is_flag=True, help="With -l: open without taking the shared write lock.")
@click.option("--image-opts", is_flag=True, hidden=True)
@click.option("--object", "objects", multiple=True, hidden=True)
@click.argument("filenames", nargs=-1)
def snapshot(list_, create_name, apply_name, delete_name, quiet, force_share, image_opts, objects, filenames) -> None:
    """List, create, apply or delete internal snapshots of a qcow2 image.

    \b
    qcowpy snapshot [-l | -a snapshot | -c snapshot | -d snapshot] [-q] [-U] filename
    """
    from ..tools.snapshot import run_snapshot

    actions = [a for a in (("l", list_ or None), ("c", create_name), ("a", apply_name), ("d", delete_name))
               if a[1] is not None]
    if len(actions) > 1:
        raise click.UsageError("Cannot mix '-l', '-a', '-c', '-d'")
    if len(filenames) != 1:
        raise click.UsageError("Expecting one image file name")
    action, name = actions[0] if actions else (None, None)
    parse_objects(objects)
    filename, _ = image_name(filenames[0], image_opts)
    if action in ("c", "a", "d"):
        warn_if_probed_raw(filename, None)
    if action == "a":  # qemu-img's apply opens a probed raw image a second time (its fallback path)
        warn_if_probed_raw(filename, None)
    run_snapshot(filename, action, name if isinstance(name, str) else None, force_share, echo=out)


# ---------------------------------------------------------------------------------------- emu
@cli.command(context_settings={"ignore_unknown_options": True, "allow_extra_args": True,
                               "help_option_names": []})
@click.argument("args", nargs=-1, type=click.UNPROCESSED)
def emu(args) -> None:
    """Run the machine emulator (QEMU-style options; 'qcowpy emu -help')."""
    from ..emu.cli import entry

    code = entry(list(args))
    if code:
        raise CommandFailed(None, int(code))


class _Commands(dict):
    """The group's commands, where the ones living in their own modules are imported when
    first looked up (``qcowpy info`` does not load the NBD server or the storage daemon)."""

    def __getitem__(self, name: str) -> click.Command:
        value = super().__getitem__(name)
        if isinstance(value, str):
            import importlib
            module, attr = value.split(":")
            value = getattr(importlib.import_module(module, __package__), attr)
            super().__setitem__(name, value)
        return value

    def get(self, name: str, default=None):  # type: ignore[override]
        return self[name] if name in self else default

    def items(self):  # type: ignore[override]
        return [(k, self[k]) for k in self]

    def values(self):  # type: ignore[override]
        return [self[k] for k in self]


_OWN_MODULES = {"convert": ".convert:convert", "bench": ".bench:bench", "check": ".check:check", "nbd": ".nbd:nbd",
                "storage-daemon": ".storage_daemon:storage_daemon", "amend": ".amend:amend",
                "bitmap": ".bitmap:bitmap"}
_ORDER = ["create", "info", "map", "convert", "compare", "resize", "commit", "dd", "measure", "rebase", "snapshot",
          "emu", "bench", "check", "nbd", "storage-daemon", "amend", "bitmap"]  # as qemu-img's help lists them
cli.commands = _Commands((name, cli.commands.get(name) or _OWN_MODULES[name]) for name in _ORDER)


# ---------------------------------------------------------------------------------------- entry point
_USAGE_COMPARE = {"compare"}  # commands whose non-usage failures exit 2


def _usage_message(e: click.UsageError, args: list[str] = ()) -> str:
    if isinstance(e, click.NoSuchOption):  # named as typed, value included, as getopt's argv word
        word = next((a for a in args if a.startswith(e.option_name + "=")), e.option_name)
        return f"unrecognized option '{word}'"
    if isinstance(e, click.BadOptionUsage) and "requires an argument" in e.message:
        return f"missing argument for option '{e.option_name}'"
    if isinstance(e, click.BadArgumentUsage) and e.message.startswith("Got unexpected extra argument"):
        return "Unexpected argument: " + e.message.split("(", 1)[1].rstrip(")").split()[0]
    return e.format_message()


def main(argv: list[str] | None = None) -> int:
    """Console-script entry point; returns (and exits with) qemu-img's status."""
    if argv is None:
        common.set_prog_from_argv0(sys.argv[0])
    common.reset_names()
    args = sys.argv[1:] if argv is None else list(argv)
    command = next((a for a in args if not a.startswith("-")), None)
    failure_code = 2 if command in _USAGE_COMPARE else 1  # usage errors exit 1 everywhere, as error_exit
    code = 0
    try:
        if command in cli.commands and command != "emu":  # emu parses QEMU's own syntax
            at = args.index(command) + 1
            args = args[:at] + common.expand_long_prefixes(cli.commands[command], args[at:])
        try:
            rv = cli.main(args=args, prog_name=common.PROG, standalone_mode=False)
            code = rv if isinstance(rv, int) else 0
        except click.exceptions.Exit as e:
            code = e.exit_code
        except click.UsageError as e:
            if "No such command" in e.format_message():
                error_line(f"Command not found: {command}")
            else:
                error_line(_usage_message(e, args))
            sys.stderr.write(f"Try '{common.PROG} --help' for more information\n")
            code = 1
        except click.Abort:  # click turns KeyboardInterrupt (and EOF on a prompt) into Abort
            code = 130
        except CommandFailed as e:
            if e.message:
                error_line(e.message)
            if e.hint:
                sys.stderr.write(e.hint)
            code = e.code
        except QcowError as e:  # SizeError included
            error_line(str(e))
            if getattr(e, "hint", None):
                sys.stderr.write(e.hint)  # type: ignore[attr-defined]
            code = failure_code
        sys.stdout.flush()
    except KeyboardInterrupt:
        sys.stderr.write("\n")
        code = 130
    except BrokenPipeError:
        # stdout went away (e.g. "| head"): silence the final flush and exit quietly
        try:
            devnull = os.open(os.devnull, os.O_WRONLY)
            os.dup2(devnull, sys.stdout.fileno())
        except OSError:
            pass
        code = 1
    except OSError as e:
        error_line(e.strerror or str(e))
        code = failure_code if e.errno != errno.EPIPE else 1
    common.reset_names()
    if argv is None:
        sys.exit(code)
    return code


if __name__ == "__main__":
    main()
