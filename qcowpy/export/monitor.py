"""QMP for the storage daemon: ``--chardev socket,...,server=on`` (or ``stdio``) + ``--monitor chardev=ID``.

The wire format is QEMU's: a greeting, ``qmp_capabilities``, then one JSON object per command,
answered with ``return`` or ``error`` and the request's ``id``; events such as
BLOCK_EXPORT_DELETED go to every connected client. Input is bounded per command (a client that
sends an endless object is disconnected), and a client cannot stop the daemon except by ``quit``.
"""
from __future__ import annotations

import json
import os
import socket
import threading
import time
from typing import Any, Callable

from qcowpy.errors import QcowError

from .daemon import Daemon
from .keyval import OptionError, no_more, take, take_bool
from .nbd import service as nbd
from .objects import object_add, object_del

MAX_COMMAND = 1 << 20
VERSION = {"qemu": {"major": 7, "minor": 2, "micro": 0}, "package": "qcowpy storage-daemon"}


class Chardev:
    """A character device a monitor talks through: a listening socket (unix ``path=`` or TCP
    ``host=``/``port=``, ``server=on``) whose clients each get a QMP session, or ``stdio`` (one
    session on the daemon's standard input and output)."""

    def __init__(self, opts: dict[str, Any]) -> None:
        opts = dict(opts)
        backend = take(opts, "backend", required=True)
        cid = take(opts, "id", required=True)
        self.id, self.path = cid, None
        self.sock: socket.socket | None = None
        self._stdio_taken = False
        self._closed = threading.Event()
        if backend == "stdio":
            for key in ("signal", "logfile", "logappend", "mux"):
                opts.pop(key, None)
            no_more(opts)
            return
        if backend != "socket":
            raise OptionError(f"'{backend}' is not a valid char driver name")
        path, host, port = take(opts, "path"), take(opts, "host"), take(opts, "port")
        if (path is not None) + (host is not None) + ("fd" in opts) > 1:
            raise OptionError("None or one of 'path', 'fd' or 'host' option required.")
        if host is not None and port is None:
            raise OptionError("chardev: socket: no port given")
        if path is None and port is None:
            raise OptionError("Unable to parse FD number ")  # QSD's words when no address is given
        if not take_bool(opts, "server", False):
            raise OptionError("chardev: only server=on sockets are supported")
        take_bool(opts, "wait", True)
        for key in ("nodelay", "ipv4", "ipv6", "to", "numeric", "abstract", "tight"):
            opts.pop(key, None)
        no_more(opts)
        if path is not None:
            self.path = str(path)
            if os.path.exists(self.path):
                os.unlink(self.path)
            self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            where: Any = self.path
            shown = self.path
        else:
            family = socket.AF_INET6 if ":" in str(host or "") else socket.AF_INET
            self.sock = socket.socket(family, socket.SOCK_STREAM)
            self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            where = (str(host or ""), int(str(port), 0))
            shown = f"{host or ''}:{port}"
        try:
            self.sock.bind(where)
        except (OSError, ValueError) as e:
            self.sock.close()
            raise OptionError(f"Failed to bind socket to {shown}: {getattr(e, 'strerror', None) or e}") from None
        self.sock.listen(4)

    def accept(self) -> Any:
        """The next client (blocks); OSError once the chardev is closed."""
        if self.sock is not None:
            return self.sock.accept()[0]
        if not self._stdio_taken:
            self._stdio_taken = True
            return _Stdio()
        self._closed.wait()
        raise OSError("chardev closed")

    def close(self) -> None:
        self._closed.set()
        if self.sock is not None:
            self.sock.close()
        if self.path is not None:
            try:
                os.unlink(self.path)
            except FileNotFoundError:
                pass


class _Stdio:
    """Standard input and output with the socket methods a QMP session uses (EOF ends the session,
    not the daemon, as in QSD)."""

    def recv(self, n: int) -> bytes:
        return os.read(0, n)

    def sendall(self, data: bytes) -> None:
        view = memoryview(data)
        while view:
            view = view[os.write(1, view):]

    def close(self) -> None:
        pass


class QMPMonitor:
    """Serves QMP on a chardev, one thread per client."""

    def __init__(self, daemon: Daemon, chardev: Chardev, quit: Callable[[], None]) -> None:
        self.daemon = daemon
        self.chardev = chardev
        self.quit = quit
        self.clients: list[Callable[[dict[str, Any]], None]] = []
        daemon.events.append(self._broadcast)
        threading.Thread(target=self._accept, name=f"qmp {chardev.id}", daemon=True).start()

    def _accept(self) -> None:
        while True:
            try:
                conn = self.chardev.accept()
            except OSError:
                return
            threading.Thread(target=self._client, args=(conn,), daemon=True).start()

    def _broadcast(self, name: str, data: dict[str, Any]) -> None:
        now = time.time()
        ev = {"timestamp": {"seconds": int(now), "microseconds": int(now % 1 * 1e6)}, "event": name, "data": data}
        for send in list(self.clients):
            send(ev)

    def _client(self, conn: Any) -> None:
        lock = threading.Lock()

        def send(obj: dict[str, Any]) -> None:
            with lock:
                try:
                    conn.sendall(json.dumps(obj).encode() + b"\r\n")
                except OSError:
                    pass

        negotiated = False
        decoder = json.JSONDecoder()
        buf = ""
        send({"QMP": {"version": VERSION, "capabilities": []}})
        try:
            while True:
                chunk = conn.recv(65536)
                if not chunk:
                    return
                buf += chunk.decode(errors="replace")
                while buf.strip():
                    text = buf.lstrip()
                    try:
                        req, end = decoder.raw_decode(text)
                    except json.JSONDecodeError as e:
                        if e.pos >= len(text.rstrip()) and len(text) < MAX_COMMAND:
                            buf = text
                            break  # incomplete
                        nl = text.find("\n")
                        buf = "" if nl < 0 else text[nl + 1:]
                        send(_err("GenericError", f"JSON parse error, {e.msg}"))
                        continue
                    buf = text[end:]
                    if not isinstance(req, dict):
                        send(_err("GenericError", "QMP input must be a JSON object"))
                        continue
                    name = req.get("execute")
                    if not negotiated and name != "qmp_capabilities":
                        resp = _err("CommandNotFound", "Expecting capabilities negotiation with 'qmp_capabilities'")
                    elif negotiated and name == "qmp_capabilities":
                        resp = _err("CommandNotFound", "Capabilities negotiation is already complete, command ignored")
                    else:
                        resp = self._execute(name, req.get("arguments", {}))
                        if name == "qmp_capabilities" and "return" in resp:
                            negotiated = True
                            self.clients.append(send)
                    if "id" in req:
                        resp["id"] = req["id"]
                    send(resp)
                    if name == "quit" and "return" in resp:
                        self.quit()
                        return
        except OSError:
            return
        finally:
            if send in self.clients:
                self.clients.remove(send)
            conn.close()

    def _execute(self, name: Any, args: Any) -> dict[str, Any]:
        if not isinstance(name, str):
            return _err("GenericError", "QMP input lacks member 'execute'" if name is None
                        else "QMP input member 'execute' must be a string")
        if not isinstance(args, dict):
            return _err("GenericError", "QMP input member 'arguments' must be an object")
        d = self.daemon
        table: dict[str, Callable[[dict[str, Any]], Any]] = {
            "qmp_capabilities": lambda a: None,
            "query-version": lambda a: VERSION,
            "query-commands": lambda a: [{"name": n} for n in sorted(table)],
            "query-block-exports": lambda a: d.query_exports(),
            "query-named-block-nodes": lambda a: (a.pop("flat", None), d.query_nodes())[1],
            "blockdev-add": lambda a: (d.blockdev_add(a), None)[1],
            "blockdev-del": lambda a: d.blockdev_del(take(a, "node-name", required=True)),
            "block-export-add": lambda a: (d.export_add(a), None)[1],
            "block-export-del": lambda a: d.export_del(take(a, "id", required=True), take(a, "mode", default="safe")),
            "quit": lambda a: None,
            "nbd-server-start": lambda a: nbd.server_start(d, a, legacy=True),
            "nbd-server-stop": lambda a: nbd.server_stop(d),
            "nbd-server-add": lambda a: nbd.server_add(d, a),
            "nbd-server-remove": lambda a: nbd.server_remove(d, a),
            "object-add": lambda a: object_add(d, a),
            "object-del": lambda a: object_del(d, take(a, "id", required=True)),
        }
        fn = table.get(name)
        if fn is None:
            return _err("CommandNotFound", f"The command {name} has not been found")
        args = dict(args)
        try:
            ret = fn(args)
            if name in ("query-named-block-nodes", "blockdev-del", "block-export-del", "qmp_capabilities",
                        "query-version", "query-commands", "query-block-exports", "quit", "nbd-server-stop",
                        "object-del"):
                no_more(args)
        except (QcowError, OSError) as e:
            return _err("GenericError", str(e))
        return {"return": {} if ret is None else ret}


def _err(cls: str, desc: str) -> dict[str, Any]:
    return {"error": {"class": cls, "desc": desc}}


def monitor_opts(opts: dict[str, Any]) -> str:
    """The chardev id of ``--monitor [chardev=]ID[,mode=control]``."""
    opts = dict(opts)
    cid = take(opts, "chardev", required=True)
    mode = take(opts, "mode", default="control")
    opts.pop("pretty", None)
    if mode != "control":
        raise OptionError("Only QMP is supported")
    no_more(opts)
    return str(cid)
