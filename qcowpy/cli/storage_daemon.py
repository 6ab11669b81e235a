"""``qcowpy storage-daemon``: qemu-storage-daemon's command line for the subset qcowpy serves.

Options are handled in command-line order, as QSD does, so a ``--export`` must follow the
``--blockdev`` it names and a ``--monitor`` its ``--chardev``. A failing option prints
``qcowpy: --OPTION TEXT: message`` (QSD's words) and exits 1. SIGTERM, SIGINT, SIGHUP and QMP
``quit`` stop every export, flush and close every image, and exit 0.
"""
from __future__ import annotations

import os
import signal
import threading

from typing import TYPE_CHECKING

import click

from ..errors import QcowError
from .common import CommandFailed
from .pidfile import PidfileError, write_pidfile

if TYPE_CHECKING:
    from ..export.daemon import Daemon

_WITH_ARG = ("--blockdev", "--export", "--chardev", "--monitor", "--nbd-server", "--object", "--pidfile")

USAGE = """Usage: qcowpy storage-daemon [options]
QEMU storage daemon (qcowpy)

  -h, --help             display this help and exit
  --blockdev [driver=]<driver>[,node-name=<N>][,read-only=on|off][,file=<node>|file.driver=file,file.filename=<F>]
                         configure a block backend (drivers: qcow2, raw, file)
  --chardev socket,id=<id>,path=<path>,server=on[,wait=off]
  --chardev socket,id=<id>,host=<host>,port=<port>,server=on[,wait=off]
  --chardev stdio,id=<id>
                         configure a character device (for a monitor)
  --export [type=]vhost-user-blk,id=<id>,node-name=<node>,addr.type=unix,addr.path=<socket>
           [,writable=on|off][,num-queues=<n>][,logical-block-size=<n>]
                         export a node as a vhost-user-blk device
  --export [type=]fuse,id=<id>,node-name=<node>,mountpoint=<file>[,writable=on|off][,growable=off]
                         export a node as a regular file (FUSE)
  --export [type=]nbd,id=<id>,node-name=<node>[,name=<export-name>][,description=<text>]
           [,writable=on|off][,bitmaps.0=<name>][,allocation-depth=on|off]
                         export a node over NBD (requires --nbd-server)
  --monitor [chardev=]<id>[,mode=control]
                         configure a QMP monitor
  --nbd-server addr.type=inet,addr.host=<host>,addr.port=<port>
               [,tls-creds=<id>][,tls-authz=<id>][,max-connections=<n>]
  --nbd-server addr.type=unix,addr.path=<path>
               [,tls-creds=<id>][,tls-authz=<id>][,max-connections=<n>]
                         start an NBD server for exporting block nodes
  --object secret,id=<id>,data=<text>|file=<path>[,format=raw|base64]
  --object tls-creds-x509,id=<id>,dir=<dir>,endpoint=server[,verify-peer=on|off]
  --object authz-simple,id=<id>,identity=<DN>
  --object iothread,id=<id>
                         create an object (secrets, TLS credentials, iothreads)
  --pidfile <path>       write process ID to a file after startup (locked, as QEMU does)
  --daemonize            daemonize the process, and have the parent exit once startup is complete
"""


def _parse_argv(argv: list[str]) -> tuple[list[tuple[str, str]], bool, bool]:
    """(ordered (option, value) pairs, daemonize, help)."""
    opts: list[tuple[str, str]] = []
    daemonize = show_help = False
    i = 0
    while i < len(argv):
        a = argv[i]
        if a in ("-h", "--help"):
            show_help = True
        elif a == "--daemonize":
            daemonize = True
        elif a.split("=", 1)[0] in _WITH_ARG and "=" in a:
            opt, value = a.split("=", 1)
            opts.append((opt, value))
        elif a in _WITH_ARG:
            if i + 1 >= len(argv):
                raise CommandFailed(f"option '{a}' requires an argument")
            opts.append((a, argv[i + 1]))
            i += 1
        elif a.startswith("-"):
            raise CommandFailed(f"unrecognized option '{a}'")
        else:
            raise CommandFailed(f"Unexpected argument: {a}")
        i += 1
    return opts, daemonize, show_help


@click.command("storage-daemon", add_help_option=False,
               context_settings={"ignore_unknown_options": True, "allow_extra_args": True})
@click.argument("argv", nargs=-1, type=click.UNPROCESSED)
def storage_daemon(argv: tuple[str, ...]) -> None:
    """Serve block nodes over vhost-user-blk, FUSE and NBD exports (qemu-storage-daemon syntax)."""
    opts, daemonize, show_help = _parse_argv(list(argv))
    if show_help:
        click.echo(USAGE, nl=False)
        return
    ready_w = None
    if daemonize:
        ready_r, ready_w = os.pipe()
        if os.fork():  # the parent exits when the child is ready (0) or has failed (1)
            os.close(ready_w)
            ok = os.read(ready_r, 1) == b"1"
            os._exit(0 if ok else 1)
        os.close(ready_r)
        os.setsid()
    from ..export import fuse  # noqa: F401  (registers type=fuse)
    from ..export.nbd import service  # noqa: F401  (registers type=nbd)
    from ..export.daemon import Daemon
    daemon = Daemon()
    stop = threading.Event()
    # before any export starts: libfuse installs its own handlers only where none are set
    for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
        signal.signal(sig, lambda *_: stop.set())
    pidfile = None
    pid_fd = -1
    try:
        _setup(daemon, opts, stop)
        pidfile = next((v for o, v in opts if o == "--pidfile"), None)
        if pidfile is not None:
            try:
                pid_fd = write_pidfile(pidfile)
            except PidfileError as e:
                pidfile = None  # not ours: never remove another daemon's file
                raise CommandFailed(f"cannot create PID file: {e}") from None
    except BaseException:
        daemon.shutdown()
        raise
    if ready_w is not None:
        devnull = os.open(os.devnull, os.O_RDWR)
        for fd in (0, 1, 2):
            os.dup2(devnull, fd)
        os.write(ready_w, b"1")
        os.close(ready_w)
    try:
        while not stop.wait(1.0):
            pass
    finally:
        daemon.shutdown()
        if pidfile is not None:
            try:
                os.unlink(pidfile)
            except OSError:
                pass
            os.close(pid_fd)


def _setup(daemon: "Daemon", opts: list[tuple[str, str]], stop: threading.Event) -> None:
    """Apply the options in order; the first failure raises CommandFailed with QSD's words."""
    from ..export import keyval
    from ..export.monitor import Chardev, QMPMonitor, monitor_opts
    from ..export.nbd import service as nbd_service
    from ..export.objects import object_add

    chardevs: dict[str, Chardev] = {}
    daemon.cleanups.append(lambda: [c.close() for c in chardevs.values()])
    for opt, text in opts:
        try:
            if opt == "--blockdev":
                daemon.blockdev_add(keyval.parse(text, implied="driver"))
            elif opt == "--export":
                daemon.export_add(keyval.parse(text, implied="type"))
            elif opt == "--chardev":
                parsed = keyval.parse(text, implied="backend")
                if parsed.get("id") in chardevs:
                    raise keyval.OptionError("duplicate yank instance")
                c = Chardev(parsed)
                chardevs[c.id] = c
            elif opt == "--monitor":
                cid = monitor_opts(keyval.parse(text, implied="chardev"))
                if cid not in chardevs:
                    raise keyval.OptionError(f'chardev "{cid}" not found')
                QMPMonitor(daemon, chardevs[cid], stop.set)
            elif opt == "--nbd-server":
                nbd_service.server_start(daemon, keyval.parse(text))
            elif opt == "--object":
                object_add(daemon, keyval.parse(text, implied="qom-type"))
        except QcowError as e:
            raise CommandFailed(f"{opt} {text}: {e}") from None
        except OSError as e:
            raise CommandFailed(f"{opt} {text}: {e.strerror or e}") from None
