"""``qcowpy convert``: the click command (registered in the CLI group by cli/main.py)."""
from __future__ import annotations

import click

from ..errors import QcowError
from .common import CONTEXT, CommandFailed, image_name, out, parse_objects, size_arg, warn_line


# ---------------------------------------------------------------------------------------- convert
@click.command(context_settings=CONTEXT)
@click.option("-f", "fmt", metavar="FMT", help="Source format (probed when omitted).")
@click.option("-O", "out_fmt", metavar="OUTPUT_FMT", help="Output format (default raw).")
@click.option("-o", "options", multiple=True, metavar="OPTIONS", help="Create options for the output.")
@click.option("-c", "compress", is_flag=True, help="Compress the output (qcow2).")
@click.option("-B", "backing", metavar="BACKING", help="Backing file of the output.")
@click.option("-F", "backing_fmt", metavar="BACKING_FMT", help="Format of the -B backing file.")
@click.option("-p", "progress", is_flag=True, help="Show progress.")
@click.option("-n", "no_create", is_flag=True, help="The output exists: do not create it.")
@click.option("-S", "sparse", metavar="SPARSE_SIZE", help="Zero runs this long are not written (default 4k).")
@click.option("-q", "quiet", is_flag=True, help="Quiet.")
@click.option("-W", "unordered", is_flag=True, help="Accepted for compatibility (writes are in order).")
@click.option("-m", "coroutines", metavar="N", help="At most N threads (de)compress clusters (1..16; default: the CPUs).")
@click.option("-t", "cache", metavar="CACHE", help="Output cache mode (default unsafe).")
@click.option("-T", "src_cache", metavar="SRC_CACHE", help="Accepted for compatibility.")
@click.option("-U", "--force-share", is_flag=True, help="Open read-only without taking the shared write lock (like qemu-img -U).")
@click.option("-r", "rate", metavar="RATE_LIMIT", help="Accepted for compatibility (checked, no rate limit).")
@click.option("-C", "copy_range", is_flag=True, hidden=True)
@click.option("--target-is-zero", is_flag=True, help="With -n: the target already reads as zeros.")
@click.option("-l", "snapshot_param", metavar="SNAPSHOT_PARAM",
              help="Convert an internal snapshot: snapshot.id=ID[,snapshot.name=NAME], or an id or name.")
@click.option("--salvage", is_flag=True, help="Unreadable sectors become zeros (each reported) instead of failing.")
@click.option("--bitmaps", is_flag=True, help="Copy the source's persistent dirty bitmaps.")
@click.option("--skip-broken-bitmaps", is_flag=True, help="With --bitmaps: skip inconsistent bitmaps (with a warning).")
@click.option("--image-opts", is_flag=True, help="The sources are option strings (driver=...,file.filename=...).")
@click.option("--target-image-opts", is_flag=True, help="With -n: the target is an option string.")
@click.option("--object", "objects", multiple=True, hidden=True)
@click.argument("filenames", nargs=-1)
def convert(fmt, out_fmt, options, compress, backing, backing_fmt, progress, no_create, sparse, quiet, unordered,
            coroutines, cache, src_cache, force_share, rate, copy_range, target_is_zero, snapshot_param, salvage, bitmaps, skip_broken_bitmaps, image_opts, target_image_opts, objects, filenames) -> None:
    """Convert FILENAME [FILENAME2 ...] to OUTPUT_FILENAME (several sources are concatenated).

    \b
    qcowpy convert [-f fmt] [-O output_fmt] [-o options] [-c] [-B backing] [-p] [-n]
                   [-S sparse_size] [-q] filename [filename2 ...] output_filename
    """
    from ..tools import options as optmod
    from ..tools.convert import ConvertError, ConvertRequest, run_convert

    optstr = optmod.accumulate(options)
    if optstr and optmod.has_help(optstr):
        out(optmod.help_text(out_fmt or "raw", filenames[-1] if filenames else None))
        return
    if rate is not None:
        size_arg("rate limit", rate)
    parse_objects(objects)
    if len(filenames) < 2:
        raise CommandFailed("Must specify image file name")
    if skip_broken_bitmaps and not bitmaps:
        raise CommandFailed("Use of --skip-broken-bitmaps requires --bitmaps")
    if copy_range and compress:
        raise CommandFailed("Cannot enable copy offloading when -c is used")
    if copy_range and sparse is not None:
        raise CommandFailed("Cannot enable copy offloading when -S is used")
    if copy_range and salvage:
        raise CommandFailed("Cannot use copy offloading in salvaging mode")
    if target_image_opts and not no_create:
        raise CommandFailed("--target-image-opts requires use of -n flag")
    load_snapshot = _snapshot_loader(snapshot_param, len(filenames) - 1)
    min_sparse = 8 * 512
    if sparse is not None:
        sval = size_arg("buffer size for sparse output", sparse)
        if sval & 511 or sval > (16 << 20):
            raise CommandFailed("Invalid buffer size for sparse output specified. Valid sizes are multiples of "
                                "512 up to 16777216. Select 0 to disable sparse detection (fully allocates "
                                "output).")
        min_sparse = sval
    if coroutines is not None:
        try:
            n = int(coroutines)
        except ValueError:
            n = 0
        if not 1 <= n <= 16:
            raise CommandFailed("Invalid number of coroutines. Allowed number of coroutines is between 1 and 16")
    if cache is not None and cache not in ("none", "writeback", "unsafe", "directsync", "writethrough"):
        raise CommandFailed(f"Invalid cache option: {cache}")
    if src_cache is not None and src_cache not in ("none", "writeback", "unsafe", "directsync", "writethrough"):
        raise CommandFailed(f"Invalid source cache option: {src_cache}")
    if quiet:
        progress = False
    opened = [image_name(name, image_opts, fmt) for name in filenames[:-1]]
    src_fmts = {f for _, f in opened}
    target, target_fmt = image_name(filenames[-1], target_image_opts)
    if target_image_opts:
        out_fmt = target_fmt
    req = ConvertRequest(sources=[n for n, _ in opened], target=target,
                         src_fmt=src_fmts.pop() if len(src_fmts) == 1 else None, out_fmt=out_fmt,
                         options=optstr, compress=compress, backing=backing, backing_fmt=backing_fmt,
                         no_create=no_create, min_sparse=min_sparse, cache=cache or "unsafe",
                         target_is_zero=target_is_zero, force_share=force_share, load_snapshot=load_snapshot,
                         salvage=(lambda msg: None if quiet else warn_line(msg)) if salvage else None,
                         bitmaps=bitmaps, skip_broken_bitmaps=skip_broken_bitmaps, warn=warn_line)
    from .. import workers
    try:
        with workers.limit(int(coroutines) if coroutines is not None else None):  # qemu-img's parallel requests
            run_convert(req, progress=progress)
    except ConvertError as e:
        raise CommandFailed(str(e), hint=e.hint) from None
    except QcowError as e:
        raise CommandFailed(str(e)) from None


def _snapshot_loader(param: str | None, nsources: int):
    """``convert -l``: a hook making the first source read the snapshot, checked as qemu-img does."""
    from ..block.snapview import (SnapshotLoadError, load_snapshot_by_id_or_name, load_snapshot_tmp,
                                  parse_snapshot_param)
    if param is None:
        return None
    try:
        sid, name = parse_snapshot_param(param)
    except SnapshotLoadError as e:
        raise CommandFailed(str(e)) from None
    if sid is not None or name is not None:
        return lambda dev: load_snapshot_tmp(dev, sid, name)
    if nsources > 1:
        raise CommandFailed("No support for concatenating multiple snapshot")
    return lambda dev: load_snapshot_by_id_or_name(dev, param)
