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
    bitmaps: tuple[str, ...] = ()  # -B: persistent bitmaps exported as qemu:dirty-bitmap:NAME


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
        # qemu-nbd collects -B names by prepending: the last one given is context 2
        bitmaps = tuple((name, _bitmap_holder(dev, name, o.read_only)) for name in reversed(o.bitmaps))
        exp = Export(dev, o.export_name, o.description, read_only=o.read_only or dev.read_only,
                     allocation_depth=o.allocation_depth, discard=o.discard, detect_zeroes=o.detect_zeroes,
                     multi_conn=o.shared != 1, writethrough=o.writethrough,
                     guard_block0=o.fmt is None and not o.snapshot and dev.format == "raw", bitmaps=bitmaps)
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


def _bitmap_holder(dev: BlockDevice, name: str, read_only: bool) -> BlockDevice:
    """The image of the chain that has persistent bitmap ``name``, checked as qemu-nbd checks it."""
    raw = name.encode("utf-8", "surrogateescape")
    for layer in dev.chain:
        found = [b for b in layer.bitmaps() if b.name == raw]
        if not found:
            continue
        if read_only and not layer.read_only and found[0].enabled:
            raise CommandFailed(f"Enabled bitmap '{name}' incompatible with readonly export")
        if found[0].in_use:  # (qemu-nbd prints no hint here)
            raise CommandFailed(f"Bitmap '{name}' is inconsistent and cannot be used")
        return layer
    raise CommandFailed(f"Bitmap '{name}' is not found")


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
    """Bound and listening under a temporary name, then renamed into place: a client that waits for
    the socket file to appear never finds it refusing connections. Like qemu-nbd, a stale socket
    file at ``path`` is replaced."""
    ls = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    tmp = f"{path}.{os.getpid()}.tmp"
    try:
        ls.bind(tmp)
        ls.listen(backlog)
        os.rename(tmp, path)
    except OSError as e:
        ls.close()
        if os.path.lexists(tmp):
            os.unlink(tmp)
        raise CommandFailed(f"Failed to bind socket to {path}: {e.strerror}") from None
    return ls


def _tcp_listener(host: str, port: str) -> socket.socket:
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
    except socket.gaierror as e:
        raise CommandFailed(f"address resolution failed for {host}:{port}: {e.strerror}") from None
    err: OSError | None = None
    for family, kind, proto, _, addr in infos:
        ls = socket.socket(family, kind, proto)
        ls.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            ls.bind(addr)
            return ls
        except OSError as e:
            ls.close()
            err = e
    raise CommandFailed(f"Failed to bind socket: {err.strerror if err else 'no address'}")


def open_device(o: ServeOptions) -> BlockDevice:
    from ..block.open import open_image, probe_format

    try:
        if o.snapshot:
            dev = _snapshot_overlay(o, o.fmt or probe_format(o.filename))
        else:
            dev = open_image(o.filename, "r" if o.read_only else "r+", o.fmt, cache=o.cache,
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
