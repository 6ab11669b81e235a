"""The storage daemon's NBD server (``--nbd-server``, ``--export type=nbd``, QMP ``nbd-server-*`` and
``block-export-add type=nbd``) against qemu-storage-daemon's: the same exports seen by nbdinfo, the
same QMP replies, and real clients (qemu-io, qemu-img, nbdinfo) reading and writing through them."""
from __future__ import annotations

import json
import shutil
import subprocess

import pytest

from .conftest import _require
from .test_qmp import QMP, norm as norm_reply


def _nbdinfo() -> str:
    path = shutil.which("nbdinfo")
    _require("nbdinfo (libnbd-bin)", path is not None)
    return path  # type: ignore[return-value]


def _uri(sock: str, name: str) -> str:
    return f"nbd+unix:///{name}?socket={sock}"


def _listing(sock: str) -> list[dict]:
    """nbdinfo's view of every export, less what names the server program."""
    p = subprocess.run([_nbdinfo(), "--json", "--list", _uri(sock, "")], capture_output=True, text=True,
                       timeout=60, check=True)
    out = json.loads(p.stdout)["exports"]
    for e in out:
        e.pop("uri", None)
    return sorted(out, key=lambda e: e["export-name"])


def _args(d, img: str) -> list[str]:
    sock = f"{d}/nbd"
    return ["--blockdev", f"driver=qcow2,node-name=n,file.driver=file,file.filename={img}",
            "--nbd-server", f"addr.type=unix,addr.path={sock}",
            "--export", "type=nbd,id=e1,node-name=n,writable=on",
            "--export", "type=nbd,id=e2,node-name=n,name=ro,description=read-only view,allocation-depth=on",
            "--export", "type=nbd,id=e3,node-name=n,name=one", "--pidfile", f"{d}/pid"]  # the pid file: all set up


def _each_daemon(qemu, tmp_path):
    """(directory, fresh 64M image, whether QSD) for QSD and then for us."""
    for name, qsd in (("qsd", True), ("ours", False)):
        d = tmp_path / name
        d.mkdir()
        img = str(d / "a.qcow2")
        qemu.create(img, "64M")
        yield d, img, qsd


def test_several_exports_of_one_node_match_qemu_storage_daemon(qemu, qsd_binary, daemons, tmp_path):
    seen = []
    for d, img, qsd in _each_daemon(qemu, tmp_path):
        qemu.io(img, "write -P 0x5a 0 1M", "write -z 4M 1M")
        proc = daemons(_args(d, img), [f"{d}/pid"], qsd=qsd)
        seen.append(_listing(f"{d}/nbd"))
        code, err = proc.terminate()
        assert code == 0, err
        qemu.assert_clean(img)
    theirs, ours = seen
    assert [e["export-name"] for e in ours] == ["n", "one", "ro"]
    assert ours == theirs


def test_clients_write_through_one_export_and_read_through_another(qemu, daemons, tmp_path):
    img, sock = str(tmp_path / "a.qcow2"), str(tmp_path / "nbd")
    qemu.create(img, "64M")
    proc = daemons(_args(tmp_path, img), [f"{tmp_path}/pid"])
    w = subprocess.run(["qemu-io", "-f", "raw", "-c", "write -P 0x11 1M 256k", "-c", "write -z 8M 64k",
                        "-c", "discard 16M 64k", _uri(sock, "n")], capture_output=True, text=True, timeout=60)
    assert w.returncode == 0 and "error" not in w.stdout.lower(), w.stdout + w.stderr
    r = subprocess.run(["qemu-io", "-r", "-f", "raw", "-c", "read -P 0x11 1M 256k", "-c", "read -P 0 8M 64k",
                        _uri(sock, "ro")], capture_output=True, text=True, timeout=60)
    assert r.returncode == 0 and "Pattern verification failed" not in r.stdout, r.stdout + r.stderr
    # the read-only export refuses writes (qemu-io cannot even open it read-write)
    ro = subprocess.run(["qemu-io", "-f", "raw", "-c", "write 0 512", _uri(sock, "ro")], capture_output=True,
                        text=True, timeout=60)
    assert ro.returncode != 0 and "Permission denied" in ro.stderr
    # qemu-img map over NBD (allocation as the server reports it) matches the file's own map
    over_nbd = json.loads(subprocess.run(["qemu-img", "map", "--output=json", "-f", "raw", _uri(sock, "ro")],
                                         capture_output=True, text=True, timeout=60, check=True).stdout)
    code, err = proc.terminate()
    assert code == 0, err
    qemu.assert_clean(img)
    qemu.io(img, "read -P 0x11 1M 256k")
    direct = qemu.map_json(img)
    assert _runs(over_nbd) == _runs(direct)


def _runs(entries: list[dict]) -> list[tuple[int, int, bool, bool]]:
    """(start, length, data, zero) with neighbours of equal data/zero merged (NBD has no depth)."""
    out: list[tuple[int, int, bool, bool]] = []
    for m in entries:
        if out and out[-1][2:] == (m["data"], m["zero"]):
            out[-1] = (out[-1][0], out[-1][1] + m["length"], m["data"], m["zero"])
        else:
            out.append((m["start"], m["length"], m["data"], m["zero"]))
    return out


def _qmp_script(q: QMP, d) -> list:
    from functools import partial
    from tests.nbd.rawclient import RawClient

    norm = partial(norm_reply, detail=False)

    sock = f"{d}/nbd"
    addr = {"type": "unix", "data": {"path": sock}}
    out = [norm(q.cmd("qmp_capabilities"))]
    out.append(norm(q.cmd("block-export-add", type="nbd", id="e", **{"node-name": "n"})))
    out.append(norm(q.cmd("nbd-server-add", device="n")))
    out.append(norm(q.cmd("nbd-server-stop")))
    out.append(norm(q.cmd("nbd-server-start", addr=addr)))
    out.append(norm(q.cmd("nbd-server-start", addr=addr)))
    out.append(norm(q.cmd("block-export-add", type="nbd", id="e", **{"node-name": "n"}, writable=True)))
    out.append(norm(q.cmd("block-export-add", type="nbd", id="e2", **{"node-name": "n"})))   # name n taken
    out.append(norm(q.cmd("block-export-add", type="nbd", id="e3", **{"node-name": "nope"})))
    out.append(norm(q.call("nbd-server-add", {"device": "n", **{"name": "x", "description": "by nbd-server-add"}})))
    out.append(norm(q.call("nbd-server-add", {"device": "n", **{"name": "x"}})))
    out.append(norm(q.call("block-export-add", {"type": "nbd", "id": "e4", "node-name": "n", "name": "y",
                                                "bitmaps": ["nope"]})))
    out.append(norm(q.cmd("query-block-exports")))
    out.append(_listing(sock))
    client = RawClient(sock, timeout=30)
    client.go("x")
    out.append(norm(q.cmd("block-export-del", id="x")))                      # a client is connected
    out.append(norm(q.call("nbd-server-remove", {"name": "zz"})))
    out.append(norm(q.call("nbd-server-remove", {"name": "x", "mode": "hard"})))     # disconnects it
    out.append(client.closed())
    client.close()
    out.append(norm(q.cmd("query-block-exports")))
    out.append(norm(q.cmd("nbd-server-stop")))
    out.append(norm(q.cmd("query-block-exports")))
    out.append(norm(q.cmd("nbd-server-stop")))
    out.append(norm(q.cmd("nbd-server-start", addr={"type": "unix", "data": {"path": sock}}, **{"max-connections": 1})))
    out.append(norm(q.call("block-export-add", {"type": "nbd", "id": "again", "node-name": "n", "name": ""})))
    info = _listing(sock)[0]
    out.append((info["export-name"], info["can_multi_conn"], info["is_read_only"]))
    for execute, args in (("object-add", {"qom-type": "iothread", "id": "io1"}),
                          ("object-add", {"qom-type": "iothread", "id": "io1"}),
                          ("object-add", {"qom-type": "secret", "id": "s1"}),
                          ("object-add", {"qom-type": "secret", "id": "s1", "data": "pw"}),
                          ("object-add", {"qom-type": "bogus", "id": "b"}),
                          ("object-del", {"id": "io1"}),
                          ("object-del", {"id": "nope"})):
        out.append(norm(q.call(execute, args)))
    out.append(norm(q.cmd("quit")))
    # BLOCK_EXPORT_DELETED comes when the export is gone (QSD may send it after the reply): by now
    out.append({"id": "x"} in [e["data"] for e in q.events if e["event"] == "BLOCK_EXPORT_DELETED"])
    return out


def test_qmp_nbd_commands_match_qemu_storage_daemon(qemu, qsd_binary, daemons, tmp_path):
    _nbdinfo()
    results = []
    for d, img, qsd in _each_daemon(qemu, tmp_path):
        qmp_path = str(d / "qmp")
        proc = daemons(["--blockdev", f"driver=qcow2,node-name=n,file.driver=file,file.filename={img}",
                        "--chardev", f"socket,id=c,path={qmp_path},server=on,wait=off",
                        "--monitor", "chardev=c"], [qmp_path], qsd=qsd)
        q = QMP(qmp_path)
        results.append(_qmp_script(q, d))
        q.close()
        assert proc.proc.wait(timeout=30) == 0
        qemu.assert_clean(img)
    theirs, ours = results
    for i, (a, b) in enumerate(zip(ours, theirs)):
        assert a == b, f"step {i}: ours {a!r} QSD {b!r}"
    assert len(ours) == len(theirs)


@pytest.mark.parametrize("qsd", [True, False], ids=["qsd", "ours"])
def test_inet_server_and_tcp_monitor(qsd, qemu, qsd_binary, daemons, tmp_path):
    """--nbd-server addr.type=inet and a QMP monitor on a TCP chardev (port 0: the kernel picks)."""
    import socket

    img = str(tmp_path / "a.qcow2")
    qemu.create(img, "16M")
    qemu.io(img, "write -P 0x33 0 64k")
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        qport = s.getsockname()[1]
    proc = daemons(["--blockdev", f"driver=qcow2,node-name=n,file.driver=file,file.filename={img}",
                    "--nbd-server", f"addr.type=inet,addr.host=127.0.0.1,addr.port={port}",
                    "--export", "type=nbd,id=e,node-name=n",
                    "--chardev", f"socket,id=m,host=127.0.0.1,port={qport},server=on,wait=off",
                    "--monitor", "chardev=m", "--pidfile", f"{tmp_path}/pid"], [f"{tmp_path}/pid"], qsd=qsd)
    r = subprocess.run(["qemu-io", "-r", "-f", "raw", "-c", "read -P 0x33 0 64k", f"nbd://127.0.0.1:{port}/n"],
                       capture_output=True, text=True, timeout=60)
    assert r.returncode == 0 and "Pattern verification failed" not in r.stdout, r.stdout + r.stderr
    with socket.create_connection(("127.0.0.1", qport), timeout=30) as c:
        f = c.makefile("rwb")
        assert "QMP" in json.loads(f.readline())
        for cmd in ("qmp_capabilities", "query-block-exports"):
            f.write(json.dumps({"execute": cmd}).encode() + b"\n")
            f.flush()
            reply = json.loads(f.readline())
        assert [e["id"] for e in reply["return"]] == ["e"]
    code, err = proc.terminate()
    assert code == 0, err


def test_stdio_monitor(qemu, daemons, tmp_path):
    import sys
    from .conftest import env
    img = str(tmp_path / "a.qcow2")
    qemu.create(img, "16M")
    script = "".join(json.dumps({"execute": c}) + "\n" for c in ("qmp_capabilities", "query-named-block-nodes",
                                                                 "quit"))
    p = subprocess.run([sys.executable, "-m", "qcowpy.cli.main", "storage-daemon",
                        "--blockdev", f"driver=qcow2,node-name=n,file.driver=file,file.filename={img}",
                        "--chardev", "stdio,id=m", "--monitor", "chardev=m"], input=script, capture_output=True,
                       text=True, env=env(), timeout=60)
    assert p.returncode == 0, p.stderr
    lines = [json.loads(ln) for ln in p.stdout.splitlines()]
    assert "QMP" in lines[0] and lines[1] == {"return": {}}
    assert lines[2]["return"][0]["node-name"] == "n" and lines[3] == {"return": {}}
    qemu.assert_clean(img)


def test_second_daemon_with_the_same_pidfile_fails_like_qemu(qemu, qsd_binary, daemons, tmp_path):
    import sys
    from .conftest import env
    pid = str(tmp_path / "pid")
    first = daemons(["--pidfile", pid], [pid])
    msgs = []
    for argv in (["qemu-storage-daemon"], [sys.executable, "-m", "qcowpy.cli.main", "storage-daemon"]):
        p = subprocess.run(argv + ["--pidfile", pid], capture_output=True, text=True, env=env(), timeout=60)
        assert p.returncode == 1
        msgs.append(p.stderr.split(": ", 1)[1])
    assert msgs[0] == msgs[1] == "cannot create PID file: Cannot lock pid file: Resource temporarily unavailable\n"
    assert int(open(pid).read()) == first.proc.pid  # untouched by the losers
    code, err = first.terminate()
    assert code == 0, err
