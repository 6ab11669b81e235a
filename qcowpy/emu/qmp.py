"""A QMP server on a unix socket, speaking QEMU's wire format.

Greeting, then capabilities negotiation (``qmp_capabilities``), then one JSON object per command
with ``return`` or ``error`` (``{"class": ..., "desc": ...}``) and the request's ``id`` echoed.
Commands run under the machine lock; a command that fails for any reason answers with an error
and the server keeps serving. ``quit`` emits ``SHUTDOWN`` before its reply, as QEMU does.
"""
from __future__ import annotations

import json
import os
import socket
import threading
import time
from typing import Any, Callable, Optional

from .errors import EmuError
from .machine import MachineState, machine_classes
from .monitor import VERSION, HumanMonitor
from .pci.info import query_pci
from .qom import object_resolve_path


class QMPError(EmuError):
    """A command failed; ``qmp_class`` is the QMP error class."""

    def __init__(self, desc: str, qmp_class: str = "GenericError") -> None:
        super().__init__(desc)
        self.qmp_class = qmp_class


def _version() -> dict[str, Any]:
    major, minor, micro = (int(x) for x in VERSION.split("."))
    return {"qemu": {"major": major, "minor": minor, "micro": micro}, "package": "qcowpy-emu"}


class QMPSession:
    """Command dispatch for one connection (also usable without a socket, for tests)."""

    def __init__(self, machine: MachineState, emit: Callable[[dict[str, Any]], None]) -> None:
        self.machine = machine
        self.emit = emit
        self.negotiated = False
        self.quit_pending = False
        self.hmp = HumanMonitor(machine)
        self.commands: dict[str, tuple[Callable[..., Any], set[str], set[str]]] = {
            # name: (handler, required args, optional args)
            "qmp_capabilities": (self.qmp_capabilities, set(), {"enable"}),
            "query-version": (lambda: _version(), set(), set()),
            "query-machines": (self.query_machines, set(), set()),
            "query-pci": (lambda: query_pci(self.machine.pci_bus) if self.machine.pci_bus else [], set(), set()),
            "query-block": (self.query_block, set(), set()),
            "blockdev-add": (self.blockdev_add, {"driver", "node-name", "file"}, {"read-only"}),
            "blockdev-del": (self.blockdev_del, {"node-name"}, set()),
            "query-status": (lambda: {"running": True, "singlestep": False, "status": "running"}, set(), set()),
            "query-commands": (lambda: [{"name": n} for n in sorted(self.commands)], set(), set()),
            "qom-list": (self.qom_list, {"path"}, set()),
            "qom-get": (self.qom_get, {"path", "property"}, set()),
            "human-monitor-command": (self.human_monitor_command, {"command-line"}, {"cpu-index"}),
            "device_add": (self.device_add, {"driver"}, {"*"}),
            "device_del": (self.device_del, {"id"}, set()),
            "system_reset": (self.system_reset, set(), set()),
            "quit": (self.quit, set(), set()),
        }

    # -- protocol ------------------------------------------------------------------------------
    def handle(self, text: str) -> Optional[dict[str, Any]]:
        """Handle one request text; returns the response object."""
        try:
            req = json.loads(text)
        except json.JSONDecodeError as e:
            return {"error": {"class": "GenericError", "desc": f"JSON parse error, {e.msg}"}}
        if not isinstance(req, dict):
            return {"error": {"class": "GenericError", "desc": "QMP input must be a JSON object"}}
        resp = self._execute(req)
        if "id" in req:
            resp["id"] = req["id"]
        return resp

    def _execute(self, req: dict[str, Any]) -> dict[str, Any]:
        name = req.get("execute")
        if name is None:
            return _err("GenericError", "QMP input lacks member 'execute'")
        if not isinstance(name, str):
            return _err("GenericError", "QMP input member 'execute' must be a string")
        args = req.get("arguments", {})
        if not isinstance(args, dict):
            return _err("GenericError", "QMP input member 'arguments' must be an object")
        if not self.negotiated and name != "qmp_capabilities":
            return _err("CommandNotFound", "Expecting capabilities negotiation with 'qmp_capabilities'")
        if self.negotiated and name == "qmp_capabilities":
            return _err("CommandNotFound", "Capabilities negotiation is already complete, command ignored")
        entry = self.commands.get(name)
        if entry is None:
            return _err("CommandNotFound", f"The command {name} has not been found")
        handler, required, optional = entry
        for r in sorted(required):
            if r not in args:
                return _err("GenericError", f"Parameter '{r}' is missing")
        if "*" not in optional:
            for a in args:
                if a not in required and a not in optional:
                    return _err("GenericError", f"Parameter '{a}' is unexpected")
        try:
            with self.machine.lock:
                ret = handler(**{k.replace("-", "_"): v for k, v in args.items()}) if "*" not in optional \
                    else handler(args)
        except EmuError as e:
            return _err(getattr(e, "qmp_class", "GenericError"), str(e))
        except Exception as e:  # noqa: BLE001  an unexpected failure is this command's error, not the server's
            return _err("GenericError", str(e) or type(e).__name__)
        return {"return": {} if ret is None else ret}

    def event(self, name: str, data: Optional[dict[str, Any]] = None) -> None:
        now = time.time()
        ev: dict[str, Any] = {"event": name, "timestamp": {"seconds": int(now), "microseconds": int(now % 1 * 1e6)}}
        if data is not None:
            ev["data"] = data
        self.emit(ev)

    # -- commands ------------------------------------------------------------------------------
    def qmp_capabilities(self, enable: Optional[list[str]] = None) -> None:
        if enable:
            raise QMPError(f"Capability '{enable[0]}' not available")
        self.negotiated = True

    def query_machines(self) -> list[dict[str, Any]]:
        out = []
        for mc in machine_classes():
            info: dict[str, Any] = {"name": mc.machine_name, "cpu-max": 1, "hotpluggable-cpus": False,
                                    "numa-mem-supported": False, "deprecated": False,
                                    "default-ram-id": mc.default_ram_id, "acpi": False}
            if mc.is_default:
                info["is-default"] = True
            if mc.alias:
                info["alias"] = mc.alias
            out.append(info)
        return out

    def blockdev_add(self, driver: str, node_name: str, file: Any, read_only: bool = False) -> None:
        """``blockdev-add`` for a qcow2 or raw format node over a file (QEMU's argument shape:
        ``file`` is ``{"driver": "file", "filename": PATH}`` or a plain path)."""
        if driver not in ("qcow2", "raw"):
            raise EmuError(f"Driver '{driver}' is not supported here (qcow2 or raw)")
        if isinstance(file, dict):
            if file.get("driver", "file") != "file" or "filename" not in file:
                raise EmuError("Parameter 'file' must name a 'file' node with a 'filename'")
            path = file["filename"]
        else:
            path = str(file)
        self.machine.drive_add(path, format=driver, interface="none", id=node_name, readonly=bool(read_only))

    def blockdev_del(self, node_name: str) -> None:
        self.machine.drive_del(node_name)

    def query_block(self) -> list[dict[str, Any]]:
        """QEMU's ``query-block``, with the fields this emulator knows."""
        out = []
        for d in self.machine.drives.values():
            entry: dict[str, Any] = {"device": d.id, "qdev": "", "locked": False, "removable": False,
                                     "type": "unknown", "tray_open": False}
            if d.attached_to is not None:
                entry["qdev"] = d.attached_to.id or d.attached_to.canonical_path()
            if d.blk is not None:
                inserted: dict[str, Any] = {"file": d.file, "drv": d.format, "ro": d.read_only,
                                            "encrypted": False, "backing_file_depth": len(d.blk.chain) - 1,
                                            "image": {"filename": d.file, "format": d.format,
                                                      "virtual-size": d.blk.size}}
                if len(d.blk.chain) > 1:
                    inserted["backing_file"] = d.blk.chain[1].filename
                entry["inserted"] = inserted
            out.append(entry)
        return out

    def qom_list(self, path: str) -> list[dict[str, str]]:
        obj = object_resolve_path(self.machine.root(), path)
        return [{"name": p.name, "type": p.type} for p in obj.properties()]

    def qom_get(self, path: str, property: str) -> Any:
        obj = object_resolve_path(self.machine.root(), path)
        return obj.get_property(property)

    def human_monitor_command(self, command_line: str, cpu_index: Optional[int] = None) -> str:
        # QEMU's monitor ends lines with CRLF, and human-monitor-command passes that through
        return self.hmp.execute(command_line).replace("\n", "\r\n")

    def device_add(self, args: dict[str, Any]) -> None:
        props = {k: v for k, v in args.items() if k not in ("driver", "id")}
        self.machine.device_add(args["driver"], props, args.get("id"), hotplug=True)

    def device_del(self, id: str) -> None:
        dev = self.machine.find_device(id)
        path = dev.canonical_path()
        self.machine.device_del(id)
        data = {"path": path}
        if dev.id:
            data = {"device": dev.id, "path": path}
        self.event("DEVICE_DELETED", data)

    def system_reset(self) -> None:
        self.machine.system_reset()
        self.event("RESET", {"guest": False, "reason": "host-qmp-system-reset"})

    def quit(self) -> None:
        self.quit_pending = True  # the server stops the machine once the reply is out


def _err(cls: str, desc: str) -> dict[str, Any]:
    return {"error": {"class": cls, "desc": desc}}


class QMPServer:
    """Listens on a unix socket and serves one client at a time in a background thread."""

    def __init__(self, machine: MachineState, path: str) -> None:
        self.machine = machine
        self.path = path
        if os.path.exists(path):
            os.unlink(path)
        self._sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self._sock.bind(path)
        self._sock.listen(1)
        self._thread = threading.Thread(target=self._serve, name="qmp", daemon=True)
        self._closed = False

    def start(self) -> "QMPServer":
        self._thread.start()
        return self

    def _serve(self) -> None:
        while not self._closed:
            try:
                conn, _ = self._sock.accept()
            except OSError:
                return
            with conn:
                try:
                    self._serve_conn(conn)
                except Exception:  # noqa: BLE001  one broken connection must not stop the listener
                    continue

    def _serve_conn(self, conn: socket.socket) -> None:
        lock = threading.Lock()
        f = conn.makefile("rwb")

        def send(obj: dict[str, Any]) -> None:
            with lock:
                f.write(json.dumps(obj).encode() + b"\r\n")
                f.flush()

        session = QMPSession(self.machine, send)
        try:
            send({"QMP": {"version": _version(), "capabilities": []}})
            decoder = json.JSONDecoder()
            buf = ""
            while True:
                chunk = conn.recv(65536)  # QMP input is a JSON stream; newlines are optional
                if not chunk:
                    return
                buf += chunk.decode(errors="replace")
                while True:
                    text = buf.lstrip()
                    if not text:
                        buf = ""
                        break
                    try:
                        _, end = decoder.raw_decode(text)
                    except json.JSONDecodeError as e:
                        if e.pos >= len(text.rstrip()):
                            buf = text
                            break  # incomplete: wait for more input
                        cut = text.find("\n")
                        bad, buf = (text, "") if cut < 0 else (text[:cut], text[cut + 1:])
                        resp = session.handle(bad)
                    else:
                        buf = text[end:]
                        resp = session.handle(text[:end])
                    if session.quit_pending:  # QEMU sends the event before the reply to quit
                        session.event("SHUTDOWN", {"guest": False, "reason": "host-qmp-quit"})
                    if resp is not None:
                        send(resp)
                    if session.quit_pending:
                        self.machine.quit_requested.set()
                        return
        except OSError:
            return
        finally:
            try:
                f.close()
            except OSError:
                pass

    def close(self) -> None:
        self._closed = True
        try:
            self._sock.close()
        except OSError:
            pass
        if os.path.exists(self.path):
            os.unlink(self.path)
