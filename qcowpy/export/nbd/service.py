"""The storage daemon's NBD server: ``--nbd-server``/``nbd-server-start`` run one NbdServer in a
thread, and ``--export type=nbd``/``block-export-add``/``nbd-server-add`` offer block nodes on it.

One server, many exports (several may show one node: each is a name on the shared device). The
server is persistent and admits ``max-connections`` clients at once (QEMU's default 100; 0: no
limit). Exports are added and withdrawn while clients are connected; withdrawing one disconnects
its clients and waits for their requests, so the node can be closed right after.
"""
from __future__ import annotations

import os
import threading
from typing import Any, Optional

from ..daemon import BlockNode, Daemon, Export as DaemonExport, register_export_type
from ..keyval import OptionError, no_more, take, take_bool, take_int
from .authz import Authz
from .export import Export
from .listen import ListenError, tcp_listener, unix_listener
from .server import NbdServer
from ...block import nbdproto as P

DEFAULT_MAX_CONNECTIONS = 100  # QEMU's NBD_DEFAULT_MAX_CONNECTIONS
_INET_IGNORED = ("numeric", "to", "ipv4", "ipv6", "keep-alive", "mptcp")


class NbdService:
    """A running NBD server of the daemon (at most one, as in QEMU)."""

    def __init__(self, daemon: Daemon, addr: Any, tls_creds: Optional[str], tls_authz: Optional[str],
                 max_connections: int) -> None:
        if max_connections < 0 or max_connections > 0xFFFFFFFF:
            raise OptionError("Parameter 'max-connections' expects uint32")
        self.path, listener = _listen(addr)
        try:
            tls = _tls(daemon, tls_creds) if tls_creds else None
        except OptionError:
            listener.close()
            self._unlink()
            raise
        listener.setblocking(False)
        authz = None
        if tls_authz:
            obj = daemon.objects.get(tls_authz)
            identity = obj.get("identity") if obj is not None and obj.get("qom-type") == "authz-simple" else None
            authz = Authz(tls_authz, identity)
        self.max_connections = max_connections
        self.server = NbdServer([], [listener], shared=max_connections, persistent=True, tls=tls, authz=authz)
        self._thread = threading.Thread(target=self.server.serve_forever, name="nbd-server", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self.server.shutdown()
        self._thread.join()
        for ls in self.server.listeners:
            ls.close()
        self._unlink()

    def _unlink(self) -> None:
        if self.path:
            try:
                os.unlink(self.path)
            except OSError:
                pass


def _listen(addr: Any) -> tuple[Optional[str], Any]:
    """(unix path or None, listening socket) for a flat SocketAddress."""
    if not isinstance(addr, dict):
        raise OptionError("Invalid parameter type for 'addr', expected: object")
    addr = dict(addr)
    atype = take(addr, "type")
    if atype is None:
        raise OptionError("Parameter 'addr.type' is missing")
    if atype not in ("unix", "inet", "fd", "vsock"):
        raise OptionError(f"Parameter 'type' does not accept value '{atype}'")
    try:
        if atype == "unix":
            path = _member(addr, "path")
            addr.pop("abstract", None)
            addr.pop("tight", None)
            no_more(addr, "addr.")
            return path, unix_listener(path, 128)
        if atype == "inet":
            host, port = _member(addr, "host"), _member(addr, "port")
            for k in _INET_IGNORED:
                addr.pop(k, None)
            no_more(addr, "addr.")
            return None, tcp_listener(host, port, 128)
    except ListenError as e:
        raise OptionError(str(e)) from None
    raise OptionError(f"Socket address type '{atype}' is not supported by this build")


def _member(addr: dict[str, Any], key: str) -> str:
    if key not in addr:
        raise OptionError(f"Parameter 'addr.{key}' is missing")
    return str(addr.pop(key))


def _tls(daemon: Daemon, creds_id: str):
    obj = daemon.objects.get(creds_id)
    if obj is None:
        raise OptionError(f"No TLS credentials with id '{creds_id}'")
    if not obj.get("qom-type", "").startswith("tls-creds"):
        raise OptionError(f"Object with id '{creds_id}' is not TLS credentials")
    if obj.get("endpoint", "client") != "server":
        raise OptionError("Expected TLS credentials for a server endpoint")
    ctx = obj.get("context")
    if ctx is None:
        raise OptionError(f"TLS credentials '{creds_id}' of type '{obj['qom-type']}' are not supported")
    return ctx


def flatten_legacy(addr: Any) -> Any:
    """QMP nbd-server-start's SocketAddressLegacy (``{"type": "unix", "data": {"path": P}}``) made flat."""
    if isinstance(addr, dict) and isinstance(addr.get("data"), dict):
        return {"type": addr.get("type"), **addr["data"]}
    return addr


def server_start(daemon: Daemon, opts: dict[str, Any], legacy: bool = False) -> None:
    """``--nbd-server`` / QMP ``nbd-server-start``."""
    opts = dict(opts)
    addr = take(opts, "addr", required=True)
    creds = take(opts, "tls-creds")
    authz = take(opts, "tls-authz")
    maxc = take_int(opts, "max-connections", DEFAULT_MAX_CONNECTIONS)
    no_more(opts)
    with daemon.lock:
        if daemon.nbd is not None:
            raise OptionError("NBD server already running")
        daemon.nbd = NbdService(daemon, flatten_legacy(addr) if legacy else addr, creds, authz, maxc)


def server_stop(daemon: Daemon) -> None:
    """QMP ``nbd-server-stop`` (and daemon shutdown): every NBD export goes, then the server."""
    with daemon.lock:
        svc = daemon.nbd
        if svc is None:
            raise OptionError("NBD server not running")
        ids = [e.id for e in daemon.exports.values() if e.type == "nbd"]
    for eid in ids:
        daemon.export_del(eid, "hard")
    svc.stop()
    daemon.nbd = None


def server_add(daemon: Daemon, opts: dict[str, Any]) -> None:
    """QMP ``nbd-server-add`` (deprecated in QEMU, still served): the export id is its name; a
    read-only node is exported read-only even when writable is asked."""
    opts = dict(opts)
    device = take(opts, "device", required=True)
    node = daemon.node(str(device), reference=True)
    name = take(opts, "name", default=device)
    args: dict[str, Any] = {"type": "nbd", "id": name, "node-name": node.name, "name": name}
    for key in ("description", "writable"):
        if key in opts:
            args[key] = opts.pop(key)
    bitmap = take(opts, "bitmap")
    if bitmap is not None:
        args["bitmaps"] = [bitmap]
    no_more(opts)
    if node.dev.read_only:
        args["writable"] = False
    daemon.export_add(args)


def server_remove(daemon: Daemon, opts: dict[str, Any]) -> None:
    opts = dict(opts)
    name = take(opts, "name", required=True)
    mode = take(opts, "mode", default="safe")
    no_more(opts)
    exp = daemon.exports.get(name)
    if exp is not None and exp.type != "nbd":
        raise OptionError(f"Block export '{name}' is not an NBD export")
    daemon.export_del(name, mode)


class NbdBlockExport(DaemonExport):
    """``--export type=nbd,id=E,node-name=N[,name=X][,description=D][,writable=on][,bitmaps=..][,allocation-depth=on]``."""

    type = "nbd"

    def __init__(self, daemon: Daemon, eid: str, node: BlockNode, writable: bool, opts: dict[str, Any]) -> None:
        svc = daemon.nbd
        if svc is None:
            raise OptionError("NBD server not running")
        name = str(take(opts, "name", default=node.name))
        description = take(opts, "description")
        bitmaps = take(opts, "bitmaps", default=[])
        depth = take_bool(opts, "allocation-depth", False)
        no_more(opts)
        if len(name.encode()) > P.MAX_STRING:
            raise OptionError(f"export name '{name}' too long")
        if description is not None and len(str(description).encode()) > P.MAX_STRING:
            raise OptionError(f"description '{description}' too long")
        if name in svc.server.exports:
            raise OptionError(f"NBD server already has export named '{name}'")
        from .bitmap import bitmap_readers
        readers = bitmap_readers(node.dev, _bitmap_names(bitmaps), writable)
        self.id, self.node, self.name, self.svc = eid, node, name, svc
        exp = Export(node.dev, name, None if description is None else str(description), read_only=not writable,
                     allocation_depth=depth, discard=node.discard, detect_zeroes=node.detect_zeroes,
                     multi_conn=svc.max_connections != 1, bitmaps=readers)
        svc.server.add_export(exp)

    def in_use(self) -> bool:
        return self.svc.server.export_in_use(self.name)

    def close(self) -> None:
        self.svc.server.remove_export(self.name)


def _bitmap_names(bitmaps: Any) -> list[str]:
    """``bitmaps``: a list of names (``bitmaps.0=b`` on the command line) or of {node, name}."""
    if isinstance(bitmaps, dict):  # keyval's bitmaps.0=..., bitmaps.1=...
        try:
            bitmaps = [bitmaps[k] for k in sorted(bitmaps, key=int)]
        except ValueError:
            raise OptionError("Parameter 'bitmaps' expects array") from None
    if not isinstance(bitmaps, list):
        raise OptionError("Invalid parameter type for 'bitmaps', expected: array")
    return [str(b["name"]) if isinstance(b, dict) and "name" in b else str(b) for b in bitmaps]


register_export_type("nbd", NbdBlockExport)
