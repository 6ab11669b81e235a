"""The QMP server: raw wire format, and the unmodified ``qemu.qmp`` client library."""
from __future__ import annotations

import asyncio
import json
import os
import socket

import pytest

from qcowpy.emu.machine import create_machine
from qcowpy.emu.qmp import QMPServer


@pytest.fixture
def server(tmp_path):
    m = create_machine("mini-pc", "16M")
    m.device_add("a3dev-pci", id="a3")
    srv = QMPServer(m, str(tmp_path / "qmp.sock")).start()
    yield srv
    srv.close()


class Raw:
    def __init__(self, path):
        self.s = socket.socket(socket.AF_UNIX)
        self.s.settimeout(10)
        self.s.connect(path)
        self.f = self.s.makefile("rwb")

    def recv(self):
        return json.loads(self.f.readline())

    def send(self, obj):
        self.f.write((obj if isinstance(obj, str) else json.dumps(obj)).encode() + b"\n")
        self.f.flush()
        return self.recv()


def test_raw_protocol_negotiation_and_error_shapes(server):
    c = Raw(server.path)
    greeting = c.recv()
    assert greeting == {"QMP": {"version": {"qemu": {"major": 0, "minor": 1, "micro": 0}, "package": "qcowpy-emu"},
                                "capabilities": []}}
    assert c.send({"execute": "query-pci"}) == {"error": {
        "class": "CommandNotFound", "desc": "Expecting capabilities negotiation with 'qmp_capabilities'"}}
    assert c.send({"execute": "qmp_capabilities", "id": 1}) == {"return": {}, "id": 1}
    assert c.send({"execute": "qmp_capabilities"})["error"]["class"] == "CommandNotFound"
    assert c.send({"execute": "nope", "id": "x"}) == {
        "error": {"class": "CommandNotFound", "desc": "The command nope has not been found"}, "id": "x"}
    assert c.send({"execute": "qom-get", "arguments": {"path": "/machine"}}) == {
        "error": {"class": "GenericError", "desc": "Parameter 'property' is missing"}}
    assert c.send({"execute": "query-pci", "arguments": {"bogus": 1}})["error"]["desc"] == "Parameter 'bogus' is unexpected"
    assert c.send({"arguments": {}})["error"]["desc"] == "QMP input lacks member 'execute'"
    assert c.send("{not json")["error"]["class"] == "GenericError"
    assert c.send({"execute": "qom-list", "arguments": {"path": "/nowhere"}})["error"] == {
        "class": "DeviceNotFound", "desc": "Device '/nowhere' not found"}
    # an object split across lines is read whole
    c.f.write(b'{"execute":\n "query-status"}\n')
    c.f.flush()
    assert c.recv() == {"return": {"running": True, "singlestep": False, "status": "running"}}


def test_with_qemu_qmp_client_library(server):
    qmp_mod = pytest.importorskip("qemu.qmp")

    async def session():
        client = qmp_mod.QMPClient("qcowpy-test")
        await client.connect(server.path)
        version = await client.execute("query-version")
        machines = await client.execute("query-machines")
        pci = await client.execute("query-pci")
        props = await client.execute("qom-list", {"path": "/machine/peripheral/a3"})
        realized = await client.execute("qom-get", {"path": "/machine/peripheral/a3", "property": "realized"})
        text = await client.execute("human-monitor-command", {"command-line": "info pci"})
        with pytest.raises(qmp_mod.ExecuteError) as err:
            await client.execute("device_add", {"driver": "nosuch"})
        await client.execute("device_add", {"driver": "edu", "id": "e", "addr": "06.0"})
        listener = qmp_mod.EventListener(("DEVICE_DELETED", "SHUTDOWN"))
        with client.listen(listener):
            await client.execute("device_del", {"id": "e"})
            deleted = await asyncio.wait_for(listener.get(), 5)
            await client.execute("quit")
            shutdown = await asyncio.wait_for(listener.get(), 5)
        try:
            await client.disconnect()
        except EOFError:
            pass  # the server hung up after quit, as QEMU does
        return version, machines, pci, props, realized, text, err.value, deleted, shutdown

    version, machines, pci, props, realized, text, err, deleted, shutdown = asyncio.run(session())
    assert version == {"qemu": {"major": 0, "minor": 1, "micro": 0}, "package": "qcowpy-emu"}
    assert {m["name"] for m in machines} == {"mini-pc", "a3-board", "a3-pc", "none"}
    assert [m["name"] for m in machines if m.get("is-default")] == ["mini-pc"]
    devices = pci[0]["devices"]
    assert [(d["slot"], d["id"]["vendor"], d["id"]["device"]) for d in devices] == [(0, 0x1B36, 0x0008), (1, 0x1234, 0x1919)]
    assert {"name": "addr", "type": "int32"} in props and {"name": "type", "type": "string"} in props
    assert realized is True
    assert "Class 0255: PCI device 1234:1919" in text
    assert err.error_class == "GenericError" and "not a valid device model name" in str(err)
    assert deleted["event"] == "DEVICE_DELETED" and deleted["data"] == {"device": "e", "path": "/machine/peripheral/e"}
    assert shutdown["event"] == "SHUTDOWN" and shutdown["data"]["reason"] == "host-qmp-quit"
    assert server.machine.quit_requested.is_set()



# ---- a failing command answers with an error and the server keeps serving (issue 14, part 4)

def _negotiated(path):
    c = Raw(path)
    c.recv()
    assert c.send({"execute": "qmp_capabilities"}) == {"return": {}}
    return c


def _until_reply(c):
    """Lines up to and including the next command reply (events come first)."""
    lines = [c.recv()]
    while "return" not in lines[-1] and "error" not in lines[-1]:
        lines.append(c.recv())
    return lines


def _hmp(line):
    return {"execute": "human-monitor-command", "arguments": {"command-line": line}}


def test_disk_read_after_device_del_answers_with_error_and_keeps_serving(tmp_path, qemu):
    img = qemu.create(tmp_path / "d.qcow2", "1M")
    m = create_machine("mini-pc", "64M")
    m.drive_add(img, format="qcow2", interface="none", id="d0")
    m.device_add("virtio-blk-pci", {"drive": "d0"}, "vd0")
    srv = QMPServer(m, str(tmp_path / "qmp.sock")).start()
    try:
        c = _negotiated(srv.path)
        assert "error" not in c.send(_hmp("guest boot"))
        c.f.write(json.dumps({"execute": "device_del", "arguments": {"id": "vd0"}}).encode() + b"\n")
        c.f.flush()
        assert [r.get("event", "reply") for r in _until_reply(c)] == ["DEVICE_DELETED", "reply"]
        # QEMU answers a failing HMP command with its message as the text (oracle test below)
        assert c.send(_hmp("guest disk-read 0 0 16")) == {"return": "Error: device needs reset\r\n"}
        assert c.send({"execute": "query-status"})["return"]["running"] is True
        c.f.close()
        c.s.close()
        c2 = _negotiated(srv.path)  # the listener still accepts connections
        assert c2.send({"execute": "query-status"})["return"]["status"] == "running"
    finally:
        srv.close()


def test_unexpected_exception_in_a_command_is_a_generic_error(server, monkeypatch):
    from qcowpy.emu.qmp import QMPSession

    def boom(self):
        raise RuntimeError("internal failure")
    monkeypatch.setattr(QMPSession, "system_reset", boom)  # sessions bind their handlers when created
    c = _negotiated(server.path)
    assert c.send({"execute": "system_reset"}) == {"error": {"class": "GenericError", "desc": "internal failure"}}
    assert c.send({"execute": "query-status"})["return"]["running"] is True
    assert c.send(_hmp("guest disk-read 0 0 16"))["return"].startswith("Error: ")


def test_shutdown_event_comes_before_the_quit_reply(server):
    c = _negotiated(server.path)
    c.f.write(b'{"execute": "quit", "id": 7}\n')
    c.f.flush()
    first, second = c.recv(), c.recv()
    assert first["event"] == "SHUTDOWN" and first["data"] == {"guest": False, "reason": "host-qmp-quit"}
    assert second == {"return": {}, "id": 7}
    assert server.machine.quit_requested.wait(10)  # set once the reply is out


def test_qemu_orders_shutdown_and_answers_hmp_errors_as_text(tmp_path):
    """The oracle for the two tests above: real QEMU's replies, same requests."""
    import subprocess
    import time
    from .conftest import require_qemu
    binary = require_qemu()
    sock = str(tmp_path / "q.sock")
    proc = subprocess.Popen([binary, "-machine", "none", "-nodefaults", "-display", "none",
                             "-qmp", f"unix:{sock},server=on,wait=off"])
    try:
        for _ in range(100):
            if os.path.exists(sock):
                break
            time.sleep(0.05)
        c = _negotiated(sock)
        assert c.send(_hmp("device_del nosuch")) == {"return": "Error: Device 'nosuch' not found\r\n"}
        c.f.write(b'{"execute": "quit", "id": 7}\n')
        c.f.flush()
        first, second = c.recv(), c.recv()
        assert first["event"] == "SHUTDOWN" and first["data"] == {"guest": False, "reason": "host-qmp-quit"}
        assert second == {"return": {}, "id": 7}
        assert proc.wait(10) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
