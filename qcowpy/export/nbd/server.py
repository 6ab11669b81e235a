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
        self.sessions: dict[socket.socket, tuple[str, threading.Thread]] = {}  # negotiated: export name
        self.stopping = False
        self._wake_r, self._wake_w = os.pipe()
        os.set_blocking(self._wake_w, False)

    def shutdown(self) -> None:
        """Stop accepting and disconnect every client; safe from signal handlers and other threads."""
        self.stopping = True
        self._wake()

    def add_export(self, exp: Export) -> None:
        """Offer ``exp`` to clients that negotiate from now on (the storage daemon's exports)."""
        with self.lock:  # copy on write: a negotiation in progress keeps the dict it started with
            self.exports = {**self.exports, exp.name: exp}

    def export_in_use(self, name: str) -> bool:
        with self.lock:
            return any(n == name for n, _ in self.sessions.values())

    def remove_export(self, name: str) -> None:
        """Withdraw an export: new clients no longer see it, its connected clients are disconnected,
        and this returns once their requests have finished (the device may then be closed)."""
        with self.lock:
            self.exports = {n: e for n, e in self.exports.items() if n != name}
            doomed = [(c, t) for c, (n, t) in self.sessions.items() if n == name]
        for c, _ in doomed:
            try:
                c.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
        for _, t in doomed:
            if t is not threading.current_thread():
                t.join()

    def _claim(self, conn: socket.socket, exp: Export) -> bool:
        """Record that ``conn`` uses ``exp`` before the client hears it may (so export_in_use sees
        it as soon as the client does); False when the export was withdrawn meanwhile."""
        with self.lock:
            if self.exports.get(exp.name) is not exp:
                return False
            self.sessions[conn] = (exp.name, threading.current_thread())
            return True

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
                session = Negotiation(conn, self.exports, self.tls, self.authz,
                                      claim=lambda exp: self._claim(conn, exp)).run()
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
                self.sessions.pop(conn, None)
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
