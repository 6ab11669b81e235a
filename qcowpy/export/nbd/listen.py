"""Listening sockets for the NBD server (``qcowpy nbd`` and the storage daemon's ``--nbd-server``)."""
from __future__ import annotations

import os
import socket

from ...errors import QcowError


class ListenError(QcowError):
    """The address cannot be listened on (the message is QEMU's)."""


def unix_listener(path: str, backlog: int) -> socket.socket:
    """Bound and listening under a temporary name, then renamed into place: a client that waits for
    the socket file to appear never finds it refusing connections. Like QEMU, a stale socket file at
    ``path`` is replaced."""
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
        raise ListenError(f"Failed to bind socket to {path}: {e.strerror}") from None
    return ls


def tcp_listener(host: str, port: str, backlog: int | None = None) -> socket.socket:
    """Bound (and listening when ``backlog`` is given) on the first address ``host`` resolves to."""
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
    except socket.gaierror as e:
        raise ListenError(f"address resolution failed for {host}:{port}: {e.strerror}") from None
    err: OSError | None = None
    for family, kind, proto, _, addr in infos:
        ls = socket.socket(family, kind, proto)
        ls.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            ls.bind(addr)
            if backlog is not None:
                ls.listen(backlog)
            return ls
        except OSError as e:
            ls.close()
            err = e
    raise ListenError(f"Failed to bind socket: {err.strerror if err else 'no address'}")
