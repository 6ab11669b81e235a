"""The daemon's QMP monitor against qemu-storage-daemon's: the same command script, compared
reply by reply (errors by class and text; returns by the fields both report)."""
from __future__ import annotations

import json
import socket


class QMP:
    def __init__(self, path: str) -> None:
        self.sock = socket.socket(socket.AF_UNIX)
        self.sock.connect(path)
        self.f = self.sock.makefile("rwb")
        self.greeting = json.loads(self.f.readline())
        self.events: list[dict] = []

    def cmd(self, name: str, **args) -> dict:
        return self.call(name, args)

    def call(self, name: str, args: dict) -> dict:
        """One command and its reply (events that come first are kept in ``events``)."""
        msg = {"execute": name, **({"arguments": args} if args else {})}
        self.f.write(json.dumps(msg).encode() + b"\n")
        self.f.flush()
        while True:
            reply = json.loads(self.f.readline())
            if "event" in reply:
                self.events.append(reply)
                continue
            return reply

    def close(self) -> None:
        self.f.close()
        self.sock.close()


def norm(r: dict, detail: bool = True):
    """A reply as something two daemons' replies can be compared by: errors by class and text,
    lists by the fields both report (``detail``: also the node fields)."""
    if "error" in r:
        return ("error", r["error"]["class"], r["error"]["desc"])
    ret = r["return"]
    if isinstance(ret, list):
        return ("return", sorted((e.get("id"), e.get("node-name"), e.get("type")) +
                                 ((e.get("drv"), e.get("ro"), e.get("image", {}).get("virtual-size")) if detail else ())
                                 for e in ret))
    return ("return", ret)


def _script(q: QMP, d) -> list:
    """Commands exercising every monitor feature; returns comparable answers."""

    out = [norm(q.cmd("query-block-exports"))]            # before negotiation
    out.append(norm(q.cmd("qmp_capabilities")))
    out.append(norm(q.cmd("qmp_capabilities")))
    out.append(norm(q.cmd("query-block-exports")))
    out.append(norm(q.cmd("no-such-command")))
    out.append(norm(q.cmd("block-export-add", type="vhost-user-blk", id="e", **{"node-name": "n"},
                          addr={"type": "unix", "path": f"{d}/s2"})))
    out.append(norm(q.cmd("block-export-add", type="vhost-user-blk", id="e2", **{"node-name": "nope"},
                          addr={"type": "unix", "path": f"{d}/s2"})))
    out.append(norm(q.cmd("block-export-add", type="vhost-user-blk", id="e2", **{"node-name": "n"},
                          addr={"type": "unix", "path": f"{d}/s2"}, writable=True)))
    out.append(norm(q.cmd("query-block-exports")))
    out.append(norm(q.cmd("block-export-del", id="zz")))
    out.append(norm(q.cmd("block-export-del", id="e2")))
    out.append(norm(q.cmd("query-block-exports")))
    out.append([e for e in q.events if e["event"] == "BLOCK_EXPORT_DELETED"][0]["data"])
    out.append(norm(q.cmd("query-named-block-nodes", flat=True))[1][-1:])  # our node (QSD lists the file node too)
    out.append(norm(q.cmd("blockdev-del", **{"node-name": "n"})))  # still exported
    out.append(norm(q.cmd("blockdev-add", driver="qcow2", **{"node-name": "n2"},
                          file={"driver": "file", "filename": f"{d}/b.qcow2"})))
    out.append(norm(q.cmd("blockdev-add", driver="qcow2", **{"node-name": "n2"},
                          file={"driver": "file", "filename": f"{d}/b.qcow2"})))
    out.append(norm(q.cmd("blockdev-del", **{"node-name": "n2"})))
    out.append(norm(q.cmd("blockdev-del", **{"node-name": "n2"})))
    out.append(norm(q.cmd("quit")))
    return out


def test_qmp_matches_qemu_storage_daemon(qemu, qsd_binary, daemons, tmp_path):
    results = []
    for name, qsd in (("qsd", True), ("ours", False)):
        d = tmp_path / name
        d.mkdir()
        img = str(d / "a.qcow2")
        qemu.create(img, "64M")
        qemu.create(str(d / "b.qcow2"), "1M")
        qmp_path = str(d / "qmp")
        proc = daemons(["--blockdev", f"driver=qcow2,node-name=n,file.driver=file,file.filename={img}",
                        "--export", f"type=vhost-user-blk,id=e,node-name=n,addr.type=unix,addr.path={d}/s",
                        "--chardev", f"socket,id=c,path={qmp_path},server=on,wait=off",
                        "--monitor", "chardev=c"], [qmp_path, f"{d}/s"], qsd=qsd)
        q = QMP(qmp_path)
        results.append(_script(q, d))
        q.close()
        assert proc.proc.wait(timeout=30) == 0
        qemu.assert_clean(img)
    theirs, ours = results
    assert ours == theirs


def test_qmp_garbage_does_not_hurt_the_daemon(qemu, daemons, tmp_path):
    img, qmp_path = str(tmp_path / "a.qcow2"), str(tmp_path / "qmp")
    qemu.create(img, "64M")
    d = daemons(["--blockdev", f"driver=qcow2,node-name=n,file.driver=file,file.filename={img}",
                 "--chardev", f"socket,id=c,path={qmp_path},server=on,wait=off", "--monitor", "chardev=c"],
                [qmp_path])
    q = QMP(qmp_path)
    q.f.write(b"{nonsense\n[1,2]\n")
    q.f.flush()
    assert "error" in json.loads(q.f.readline())
    assert json.loads(q.f.readline())["error"]["desc"] == "QMP input must be a JSON object"
    q.close()
    q = QMP(qmp_path)
    assert q.cmd("qmp_capabilities") == {"return": {}}
    assert q.cmd("query-named-block-nodes")["return"][0]["node-name"] == "n"
    q.close()
    code, err = d.terminate()
    assert code == 0, err
    qemu.assert_clean(img)
