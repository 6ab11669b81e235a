"""Blocking socket helpers shared by the NBD server and client: exact reads and gathered writes."""
from __future__ import annotations

import socket
import ssl
import threading


class Disconnected(Exception):
    """The peer closed the connection (or it broke) while a record was expected."""


def recv_exact(sock: socket.socket, n: int) -> bytearray:
    """Exactly ``n`` bytes; callers bound ``n`` before asking so a peer cannot make us allocate at will."""
    buf = bytearray(n)
    recv_into_exact(sock, memoryview(buf))
    return buf


def recv_into_exact(sock: socket.socket, view: memoryview) -> None:
    got, n = 0, len(view)
    while got < n:
        try:
            k = sock.recv_into(view[got:], n - got)
        except (ConnectionError, ssl.SSLError, OSError) as e:
            raise Disconnected(str(e)) from None
        if k == 0:
            raise Disconnected("end of stream")
        got += k


def drain(sock: socket.socket, n: int) -> None:
    """Read and drop ``n`` bytes with a fixed-size buffer (bounded memory whatever ``n`` is)."""
    buf = memoryview(bytearray(min(n, 1 << 16)))
    while n > 0:
        k = min(n, len(buf))
        recv_into_exact(sock, buf[:k])
        n -= k


class Sender:
    """Writes whole records to a socket from several threads: one record at a time, never interleaved."""

    def __init__(self, sock: socket.socket):
        self.sock = sock
        self.lock = threading.Lock()
        self.gather = not isinstance(sock, ssl.SSLSocket)  # SSL sockets have no sendmsg

    def send(self, *parts: bytes | bytearray | memoryview) -> None:
        with self.lock:
            try:
                if self.gather:
                    self._sendmsg([memoryview(p).cast("B") for p in parts if len(p)])
                else:
                    for p in parts:
                        self.sock.sendall(p)
            except (ConnectionError, ssl.SSLError, OSError) as e:
                raise Disconnected(str(e)) from None

    def _sendmsg(self, views: list[memoryview]) -> None:
        while views:
            sent = self.sock.sendmsg(views[:64])
            while sent and views:
                if sent >= len(views[0]):
                    sent -= len(views[0])
                    views.pop(0)
                else:
                    views[0] = views[0][sent:]
                    sent = 0
