"""The listening side: accepts clients on any number of sockets, negotiates, and serves them in threads.

Why threads: every request ends in a blocking device call (file I/O that releases the GIL, or qcow2
metadata work); a thread per connection for decoding plus one shared worker pool for device calls
keeps many requests in flight per connection and across connections without an event loop that
would hand each call to an executor anyway.
"""
from __future__ import annotations

import logging
import os
import selectors
import socket
import ssl
import threading
from concurrent.futures import ThreadPoolExecutor

from .authz import Authz
from .export import Export
from .handshake import Negotiation, Refused
from .transmission import Connection
from ...block.nbdwire import Disconnected

log = logging.getLogger("qcowpy.nbd")

HANDSHAKE_TIMEOUT = 10.0  # seconds a client may take to pick an export, as qemu-nbd allows


class NbdServer:
    """Serves ``exports`` on ``listeners`` until ``shutdown`` (or, unless ``persistent``, until the
    last negotiated client leaves). At most ``shared`` clients at once (0: no limit), as qemu-nbd -e."""

    def __init__(self, exports: list[Export], listeners: list[socket.socket], shared: int = 1,
                 persistent: bool = False, tls: ssl.SSLContext | None = None, authz: Authz | None = None,
                 workers: int = 8):
        self.exports = {e.name: e for e in exports}
        self.listeners = listeners
        self.shared = shared
        self.persistent = persistent
        self.tls = tls
        self.authz = authz
        self.pool = ThreadPoolExecutor(max_workers=workers, thread_name_prefix="nbd-io")
        self.lock = threading.Lock()
        self.clients: set[socket.socket] = set()
        self.threads: set[threading.Thread] = set()
        self.stopping = False
        self._wake_r, self._wake_w = os.pipe()
        os.set_blocking(self._wake_w, False)

    def shutdown(self) -> None:
        """Stop accepting and disconnect every client; safe from signal handlers and other threads."""
        self.stopping = True
        self._wake()

    def _wake(self) -> None:
        try:
            os.write(self._wake_w, b"x")
        except OSError:
            pass

    def serve_forever(self) -> None:
        sel = selectors.DefaultSelector()
        sel.register(self._wake_r, selectors.EVENT_READ)
        listening = False
        try:
            while not self.stopping:
                want = self.shared == 0 or len(self.clients) < self.shared
                if want != listening:
                    for ls in self.listeners:
                        if want:
                            sel.register(ls, selectors.EVENT_READ)
                        else:
                            sel.unregister(ls)
                    listening = want
                for key, _ in sel.select():
                    if key.fileobj == self._wake_r:
                        os.read(self._wake_r, 4096)
                    elif not self.stopping:
                        self._accept(key.fileobj)  # type: ignore[arg-type]
        finally:
            sel.close()
            self._stop_clients()

    def _accept(self, ls: socket.socket) -> None:
        try:
            conn, _ = ls.accept()
        except (BlockingIOError, InterruptedError, ConnectionAbortedError):
            return
        conn.setblocking(True)
        if conn.family != socket.AF_UNIX:
            conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        with self.lock:
            self.clients.add(conn)
        t = threading.Thread(target=self._client, args=(conn,), name="nbd-conn", daemon=True)
        with self.lock:
            self.threads.add(t)
        t.start()

    def _client(self, conn: socket.socket) -> None:
        negotiated = False
        try:
            conn.settimeout(HANDSHAKE_TIMEOUT)
            try:
                session = Negotiation(conn, self.exports, self.tls, self.authz).run()
            except (Refused, Disconnected, OSError, ValueError) as e:
                log.info("negotiation failed: %s", e)
                return
            negotiated = True
            session.sock.settimeout(None)
            if not self.stopping:
                Connection(session, self.pool).serve()
        except Exception:  # a bug must cost one connection, never the server
            log.exception("connection failed")
        finally:
            try:
                conn.close()
            except OSError:
                pass
            with self.lock:
                self.clients.discard(conn)
                self.threads.discard(threading.current_thread())
                last = not self.clients
            if negotiated and last and not self.persistent:
                self.stopping = True
            self._wake()

    def _stop_clients(self) -> None:
        with self.lock:
            conns, threads = list(self.clients), list(self.threads)
        for c in conns:
            try:
                c.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
        for t in threads:
            t.join()
        self.pool.shutdown(wait=True)
        for fd in (self._wake_r, self._wake_w):
            os.close(fd)
