"""``qcowpy nbd``: serve an image over NBD with qemu-nbd's options, messages and exit codes."""
from __future__ import annotations

import os

import click

from .common import CONTEXT, CommandFailed, parse_objects, warn_if_probed_raw

CACHE_MODES = {"none": "writeback", "off": "writeback", "writeback": "writeback", "on": "writeback",
               "writethrough": "writeback", "directsync": "writeback", "unsafe": "unsafe"}
DISCARD_MODES = {"ignore": False, "off": False, "unmap": True, "on": True}
DETECT_ZEROES = ("off", "on", "unmap")


def _fail(message: str) -> CommandFailed:
    return CommandFailed(message)


@click.command("nbd", context_settings=CONTEXT)
@click.option("-p", "--port", metavar="PORT", help="TCP port to listen on (default 10809).")
@click.option("-b", "--bind", "bind", metavar="IFACE", help="Interface to bind to (default 0.0.0.0).")
@click.option("-k", "--socket", "sockpath", metavar="PATH", help="Listen on a unix socket at PATH instead of TCP.")
@click.option("-x", "--export-name", "export_name", metavar="NAME", help="Export name (default '').")
@click.option("-D", "--description", metavar="TEXT", help="Export description.")
@click.option("-r", "--read-only", "read_only", is_flag=True, help="Export read-only (writes fail with EPERM).")
@click.option("-f", "--format", "fmt", metavar="FORMAT", help="Image format (raw or qcow2; probed when omitted).")
@click.option("-t", "--persistent", is_flag=True, help="Keep serving after the last client leaves.")
@click.option("-e", "--shared", metavar="NUM", default="1", help="At most NUM clients at once (0: no limit; default 1).")
@click.option("-s", "--snapshot", is_flag=True, help="Write into a throw-away overlay, leaving FILE untouched.")
@click.option("-l", "--load-snapshot", "load_snapshot", metavar="SNAPSHOT",
              help="Export an internal snapshot (id or name, or snapshot.id=ID[,snapshot.name=NAME]), read-only.")
@click.option("-n", "--nocache", is_flag=True, help="Same as --cache=none.")
@click.option("--cache", metavar="MODE", help="none, writeback, writethrough, directsync or unsafe.")
@click.option("--discard", metavar="MODE", help="ignore (default) or unmap: whether TRIM frees space.")
@click.option("--detect-zeroes", "detect_zeroes", metavar="MODE", help="off (default), on or unmap.")
@click.option("-A", "--allocation-depth", "allocation_depth", is_flag=True, help="Offer the qemu:allocation-depth context.")
@click.option("-U", "--force-share", "force_share", is_flag=True, help="With -r: open without the shared write lock (qcowpy extension).")
@click.option("--fork", "fork_process", is_flag=True, help="Fork into the background once listening.")
@click.option("--pid-file", "pid_file", metavar="PATH", help="Write the server's pid to PATH.")
@click.option("-v", "--verbose", is_flag=True, help="Log connections and errors to stderr.")
@click.option("--object", "objects", multiple=True, metavar="TYPE,id=ID,...",
              help="tls-creds-x509,id=ID,dir=DIR,endpoint=server or authz-simple,id=ID,identity=DN.")
@click.option("--tls-creds", "tls_creds", metavar="ID", help="Require TLS with the credentials object ID.")
@click.option("--tls-authz", "tls_authz", metavar="ID",
              help="Admit only clients whose certificate's DN is the authz-simple object ID's identity.")
@click.option("--tls-hostname", "tls_hostname", metavar="NAME", help="With -L: the name the server's certificate must bear.")
@click.option("-o", "--offset", metavar="OFFSET", help="Export the image from byte OFFSET on.")
@click.option("-c", "--connect", "device", metavar="DEV", help="Not supported (kernel NBD client).")
@click.option("-d", "--disconnect", is_flag=True, help="Not supported (kernel NBD client).")
@click.option("-B", "--bitmap", "bitmaps", multiple=True, metavar="NAME",
              help="Offer the persistent dirty bitmap NAME as qemu:dirty-bitmap:NAME (read-only exports).")
@click.option("-L", "--list", "list_mode", is_flag=True, help="List the exports of the server at -k or -b/-p.")
@click.option("--image-opts", "image_opts", is_flag=True, help="FILE is an options string (driver=qcow2,file.filename=F).")
@click.option("--aio", metavar="MODE", help="threads (the only mode).")
@click.option("-T", "--trace", "trace", metavar="PATTERN", multiple=True,
              help="Accepted and ignored (qcowpy has no trace events; use -v).")
@click.option("--selinux-label", "selinux_label", metavar="LABEL", help="Not supported (no SELinux in qcowpy).")
@click.option("-V", "--version", "version", is_flag=True, help="Print the version and exit.")
@click.argument("args", nargs=-1)
def nbd(port, bind, sockpath, export_name, description, read_only, fmt, persistent, shared, snapshot, load_snapshot,
        nocache, cache, discard, detect_zeroes, allocation_depth, force_share, fork_process, pid_file, verbose, objects,
        tls_creds, tls_authz, tls_hostname, offset, device, disconnect, bitmaps, list_mode, image_opts, aio, trace,
        selinux_label, version, args) -> None:
    """Export FILE over NBD, as qemu-nbd does (a drop-in for its server mode).

    \b
    qcowpy nbd [-p PORT] [-b IFACE] [-k PATH] [-x NAME] [-D TEXT] [-r] [-f FMT] [-t] [-e N] [-s] [-A]
               [--cache MODE] [--discard MODE] [--detect-zeroes MODE] [--fork] [--pid-file PATH]
               [--object tls-creds-x509,...] [--tls-creds ID] [--object authz-simple,...] [--tls-authz ID] FILE
    """
    from .nbd_run import ServeOptions, serve

    if version:
        from .. import __version__
        click.echo(f"qcowpy nbd {__version__} (qemu-nbd 7.2 compatible)")
        return
    if nocache:
        if cache is not None:
            raise _fail("-n and --cache can only be specified once")
        cache = "none"
    if cache is not None and cache not in CACHE_MODES:
        raise _fail(f"Invalid cache mode `{cache}'")
    if aio is not None and aio not in ("threads", "native", "io_uring"):
        raise _fail(f"Invalid aio mode '{aio}'")
    if discard is not None and discard not in DISCARD_MODES:
        raise _fail(f"Invalid discard mode `{discard}'")
    if detect_zeroes is not None and detect_zeroes not in DETECT_ZEROES:
        raise _fail(f"Failed to parse detect_zeroes mode: invalid parameter value: {detect_zeroes}")
    if detect_zeroes == "unmap" and not DISCARD_MODES.get(discard or "ignore"):
        raise _fail("setting detect-zeroes to unmap is not allowed without setting discard operation to unmap")
    dev_offset = 0
    if offset is not None:
        try:
            dev_offset = int(offset, 0)
        except ValueError:
            dev_offset = -1
        if dev_offset < 0 or dev_offset >= 1 << 64:
            raise _fail(f"Invalid offset '{offset}'")
    if sockpath is not None and not sockpath.startswith("/"):
        raise _fail("socket path must be absolute")
    try:
        nshared = int(shared, 0)
    except ValueError:
        nshared = -1
    if nshared < 0:
        raise _fail(f"Invalid shared device number '{shared}'")
    if export_name is not None and len(export_name.encode()) > 4096:
        raise _fail(f"export name '{export_name}' too long")
    if description is not None and len(description.encode()) > 4096:
        raise _fail(f"export description '{description}' too long")
    if list_mode:
        if args:
            raise _fail("List mode is incompatible with a file name")
        if (export_name is not None or description is not None or dev_offset or device or disconnect or fmt
                or load_snapshot is not None or bitmaps or allocation_depth or aio is not None
                or discard is not None or cache is not None):
            raise _fail("List mode is incompatible with per-device settings")
        if fork_process:
            raise _fail("List mode is incompatible with forking")
    elif len(args) != 1:
        raise CommandFailed("Invalid number of arguments", hint="Try `qcowpy nbd --help' for more information.\n")
    activation = listen_fds()
    if activation:
        for value, msg in ((device, "NBD device can't be set when using socket activation"),
                           (sockpath, "Unix socket can't be set when using socket activation"),
                           (bind, "The interface can't be set when using socket activation"),
                           (port, "TCP port number can't be set when using socket activation"),
                           (selinux_label, "SELinux label can't be set when using socket activation")):
            if value is not None:
                raise _fail(msg)
        if activation > 1:
            raise _fail("qemu-nbd does not support socket activation with LISTEN_FDS > 1")
    parse_objects(objects)  # secrets for an encrypted image named by json:{..., "encrypt.key-secret": ID}
    tls = tls_check = None
    tls_client_dir = None
    if tls_creds:
        if device:
            raise _fail("TLS is not supported with a host device")
        if tls_authz and list_mode:
            raise _fail("TLS authorization is incompatible with export list")
        if tls_hostname and not list_mode:
            raise _fail("TLS hostname is only supported with export list")
        from .nbd_tls import authz, client_dir, server_context
        if list_mode:
            tls_client_dir = client_dir(objects, tls_creds)
        else:
            tls = server_context(objects, tls_creds)
        if tls_authz:
            tls_check = authz(objects, tls_authz)
    else:
        if tls_authz:
            raise _fail("--tls-authz is not permitted without --tls-creds")
        if tls_hostname:
            raise _fail("--tls-hostname is not permitted without --tls-creds")
    if selinux_label:
        if sockpath is None and device is None:
            raise _fail("--selinux-label is not permitted without --socket")
        raise _fail("SELinux support not enabled in this binary")
    if list_mode:
        from .nbd_run import list_exports
        list_exports(sockpath, bind, port, tls_client_dir, tls_hostname)
        return
    if disconnect or device:
        _kernel_nbd(args[0] if disconnect else device, disconnect)
    if image_opts and fmt:
        raise _fail("--image-opts and -f are mutually exclusive")
    snapshot_key = None
    if load_snapshot is not None:
        snapshot_key = parse_snapshot_param(load_snapshot)
        read_only = True  # -l implies -r, as in qemu-nbd
    if force_share and not read_only:
        raise _fail("--force-share/-U requires --read-only")
    filename = args[0]
    opts = ServeOptions(
        filename=filename, fmt=fmt, read_only=read_only, snapshot=snapshot, force_share=force_share,
        cache=CACHE_MODES[cache or "writeback"], writethrough=cache in ("writethrough", "directsync"),
        discard=DISCARD_MODES[discard or "ignore"], detect_zeroes=detect_zeroes or "off",
        export_name=export_name or "", description=description, allocation_depth=allocation_depth,
        shared=nshared, persistent=persistent, sockpath=sockpath,
        bind=bind, port=port, activation=bool(activation), tls=tls, authz=tls_check, fork=fork_process, pid_file=pid_file,
        verbose=verbose, snapshot_key=snapshot_key, offset=dev_offset, image_opts=image_opts, bitmaps=bitmaps)
    if not snapshot and not read_only and not image_opts:
        warn_if_probed_raw(filename, fmt)
    serve(opts)


def _kernel_nbd(device: str, disconnect: bool) -> None:
    """-c/-d drive the kernel's NBD client (/dev/nbdN), which qcowpy does not do. Fail as qemu-nbd
    does here when the device cannot be opened (no nbd module), and plainly otherwise."""
    try:
        os.close(os.open(device, os.O_RDWR))
    except OSError as e:
        raise _fail(f"{'Cannot open' if disconnect else 'Failed to open'} {device}: {e.strerror}") from None
    raise _fail("Kernel /dev/nbdN support not available")


def parse_snapshot_param(text: str) -> tuple[str | None, str | None, bool]:
    """-l's value as (id, name, either): ``snapshot.id=I,snapshot.name=N`` names one or both;
    anything else is an id or, failing that, a name."""
    if not text.startswith("snapshot."):
        return text, text, True
    found: dict[str, str] = {}
    for part in text.split(","):
        key, _, value = part.partition("=")
        if key not in ("snapshot.id", "snapshot.name"):
            raise CommandFailed(f"Invalid parameter '{key}'", hint=f"qcowpy: Failed in parsing snapshot param `{text}'\n")
        found[key] = value
    return found.get("snapshot.id"), found.get("snapshot.name"), False


def listen_fds() -> int:
    """How many sockets systemd-style activation passed us (LISTEN_PID must name this process)."""
    try:
        if int(os.environ.get("LISTEN_PID", "")) != os.getpid():
            return 0
        n = int(os.environ.get("LISTEN_FDS", ""))
    except ValueError:
        return 0
    return max(n, 0)
