"""Running ``qcowpy nbd``: listen (or take a socket-activated one), fork, open the image, serve, clean up."""
from __future__ import annotations

import logging
import os
import signal
import socket
import ssl
import sys
import tempfile
from dataclasses import dataclass

from ..block.device import BlockDevice
from ..errors import QcowError
from ..export.nbd.listen import ListenError, tcp_listener, unix_listener
from .common import CommandFailed

SOCKET_ACTIVATION_FD = 3


@dataclass
class ServeOptions:
    filename: str
    fmt: str | None
    read_only: bool
    snapshot: bool
    force_share: bool
    cache: str
    writethrough: bool
    discard: bool
    detect_zeroes: str
    export_name: str
    description: str | None
    allocation_depth: bool
    shared: int
    persistent: bool
    sockpath: str | None
    bind: str | None
    port: str | None
    activation: bool
    tls: ssl.SSLContext | None
    authz: object | None  # qcowpy.export.nbd.authz.Authz for --tls-authz
    fork: bool
    pid_file: str | None
    verbose: bool
    snapshot_key: tuple[str | None, str | None, bool] | None = None  # -l: (id, name, id-or-name)
    offset: int = 0  # -o: the export starts this far into the image
    image_opts: bool = False  # FILE is an options string
    bitmaps: tuple[str, ...] = ()  # -B


def serve(o: ServeOptions) -> None:
    """Everything after option checking, in qemu-nbd's order: fork, listen, open, write the pid file, serve."""
    from ..export.nbd import Export, NbdServer

    logging.basicConfig(level=logging.INFO if o.verbose else logging.WARNING, format="qcowpy: %(message)s",
                        stream=sys.stderr)
    if o.fork:
        daemonize()
    listener = listen(o)
    try:
        dev = open_device(o)
    except BaseException:
        _cleanup_socket(o, listener)
        raise
    try:
        read_only = o.read_only or dev.read_only
        readers = _bitmaps(dev, o.bitmaps, read_only)
        if o.offset:
            dev = _offset_view(dev, o.offset)
        exp = Export(dev, o.export_name, o.description, read_only=read_only,
                     allocation_depth=o.allocation_depth, discard=o.discard, detect_zeroes=o.detect_zeroes,
                     multi_conn=o.shared != 1, writethrough=o.writethrough,
                     guard_block0=o.fmt is None and not o.snapshot and not o.image_opts and dev.format == "raw",
                     bitmaps=readers)
        server = NbdServer([exp], [listener], shared=o.shared, persistent=o.persistent, tls=o.tls,
                           authz=o.authz)  # type: ignore[arg-type]
        for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
            signal.signal(sig, lambda *_: server.shutdown())
        if o.pid_file:
            _write_pid_file(o.pid_file)
        if o.fork:
            os.dup2(1, 2)  # the parent sees its error pipe close: setup succeeded
        server.serve_forever()
    finally:
        try:
            dev.flush()
        except (QcowError, OSError):
            pass
        dev.close()
        _cleanup_socket(o, listener)


def _bitmaps(dev: BlockDevice, names: tuple[str, ...], read_only: bool) -> dict:
    from ..export.keyval import OptionError
    from ..export.nbd.bitmap import bitmap_readers
    try:
        return bitmap_readers(dev, list(names), not read_only)
    except OptionError as e:
        raise CommandFailed(str(e)) from None


def _offset_view(dev: BlockDevice, offset: int) -> BlockDevice:
    """-o: the image seen from ``offset`` on (QEMU puts a raw node with that offset on top)."""
    from ..block.spec import ChainWindow
    if offset > dev.size:
        raise CommandFailed(f"Offset ({offset}) cannot be greater than size of the containing file ({dev.size})")
    return ChainWindow(dev, offset, dev.size - offset)


def list_exports(sockpath: str | None, bind: str | None, port: str | None, tls_dir: str | None,
                 hostname: str | None) -> None:
    """-L: print the exports of the server at ``sockpath`` or ``bind``:``port`` as qemu-nbd does."""
    import click
    from ..block.nbd import Address
    from ..block.nbdlist import list_exports as ask

    host = bind or "0.0.0.0"
    try:
        addr = Address("", socket_path=sockpath, tls=tls_dir is not None, tls_dir=tls_dir) if sockpath else \
            Address("", host=host, port=int(port or "10809"), tls=tls_dir is not None, tls_dir=tls_dir)
    except ValueError:
        raise CommandFailed(f"Invalid port '{port}'") from None
    try:
        found = ask(addr, hostname or (None if sockpath else host))
    except QcowError as e:
        raise CommandFailed(str(e)) from None
    click.echo(f"exports available: {len(found)}")
    for info in found:
        click.echo(info.describe(), nl=False)


def listen(o: ServeOptions) -> socket.socket:
    if o.activation:
        ls = socket.socket(fileno=SOCKET_ACTIVATION_FD)
        os.set_inheritable(ls.fileno(), False)
    elif o.sockpath:
        ls = _unix_listener(o.sockpath, _backlog(o))
        ls.setblocking(False)
        return ls
    else:
        host, port = o.bind or "0.0.0.0", o.port or "10809"
        ls = _tcp_listener(host, port)
    ls.listen(_backlog(o))
    ls.setblocking(False)
    return ls


def _backlog(o: ServeOptions) -> int:
    return socket.SOMAXCONN if o.persistent or o.shared == 0 else min(o.shared, socket.SOMAXCONN)


def _unix_listener(path: str, backlog: int) -> socket.socket:
    try:
        return unix_listener(path, backlog)
    except ListenError as e:
        raise CommandFailed(str(e)) from None


def _tcp_listener(host: str, port: str) -> socket.socket:
    try:
        return tcp_listener(host, port)
    except ListenError as e:
        raise CommandFailed(str(e)) from None


def open_device(o: ServeOptions) -> BlockDevice:
    from ..block.open import open_image, probe_format

    try:
        if o.snapshot:
            dev = _snapshot_overlay(o, o.fmt or probe_format(o.filename))
        else:
            filename, fmt = o.filename, o.fmt
            if o.image_opts:
                from .common import image_name
                filename, fmt = image_name(o.filename, True)
            dev = open_image(filename, "r" if o.read_only else "r+", fmt, cache=o.cache,
                             force_share=o.force_share)
    except QcowError as e:
        raise CommandFailed(f"Failed to blk_new_open '{o.filename}': {e}") from None
    if o.snapshot_key is not None:
        try:
            _load_snapshot(dev, *o.snapshot_key)
        except BaseException:
            dev.close()
            raise
    return dev


def _load_snapshot(dev: BlockDevice, sid: str | None, name: str | None, either: bool) -> None:
    """-l: the image shows an internal snapshot, read-only and in memory (qemu's load_tmp)."""
    from ..block.snapview import load_snapshot_by_id_or_name, load_snapshot_tmp

    try:
        if either:
            load_snapshot_by_id_or_name(dev, sid or "")
        else:
            load_snapshot_tmp(dev, sid, name)
    except QcowError as e:
        raise CommandFailed(f"Failed to load snapshot: {e}") from None


def _snapshot_overlay(o: ServeOptions, fmt: str) -> BlockDevice:
    """-s: a temporary qcow2 overlay on top of the image; the file is unlinked once open."""
    from ..block.create import create_image
    from ..block.open import open_image

    fd, path = tempfile.mkstemp(prefix="qcowpy-nbd-snapshot.", dir=os.environ.get("TMPDIR", "/var/tmp"))
    os.close(fd)
    try:
        create_image(path, None, "qcow2", backing_file=os.path.abspath(o.filename), backing_fmt=fmt)
        return open_image(path, "r" if o.read_only else "r+", "qcow2", cache="unsafe", force_share=o.force_share)
    finally:
        os.unlink(path)


def daemonize() -> None:
    """qemu-nbd's --fork: the parent waits until the daemon has set up (or failed), relaying its errors
    and exiting 1 if there were any, 0 otherwise."""
    r, w = os.pipe()
    pid = os.fork()
    if pid:
        os.close(w)
        errors = False
        while chunk := os.read(r, 1024):
            errors = True
            os.write(2, chunk)
        os._exit(1 if errors else 0)
    os.close(r)
    if os.fork():
        os._exit(0)
    os.setsid()
    null = os.open(os.devnull, os.O_RDWR)
    for fd in (0, 1):
        os.dup2(null, fd)
    os.dup2(w, 2)
    os.close(null)
    os.close(w)


def _write_pid_file(path: str) -> None:
    try:
        with open(path, "w") as f:
            f.write(f"{os.getpid()}\n")
    except OSError as e:
        raise CommandFailed(f"Failed to write pid file '{path}': {e.strerror}") from None


def _cleanup_socket(o: ServeOptions, listener: socket.socket) -> None:
    listener.close()
    if o.sockpath and not o.activation:
        try:
            os.unlink(o.sockpath)
        except OSError:
            pass
