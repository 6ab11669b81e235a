"""A throw-away one-node Ceph cluster on 127.0.0.1 for tests, benchmarks and the docs' session.

One monitor and one OSD (``osd objectstore = memstore``: objects live in the OSD's memory),
cephx authentication (the ``client.admin`` keyring is named in ceph.conf, so clients that read it
authenticate; ``auth="none"`` turns it off), pools of size 1, everything under one directory. Starts in a few seconds with
Debian's ceph-mon/ceph-osd/ceph-common; every wait is bounded. As a script::

    python tests/rbd/cluster.py start DIR     # prints the ceph.conf path; daemons keep running
    python tests/rbd/cluster.py stop DIR
"""
from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import uuid
from pathlib import Path

TOOLS = ("ceph-mon", "ceph-osd", "ceph", "rbd", "monmaptool", "ceph-authtool")
POOL = "rbd"


def missing_tools() -> list[str]:
    return [t for t in TOOLS if shutil.which(t) is None]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Cluster:
    """The daemons' processes and the configuration file clients use (``conf``)."""

    def __init__(self, root: Path, auth: str = "cephx"):
        self.root = Path(root)
        self.auth = auth  # "cephx" (keys, as production clusters) or "none"
        self.conf = self.root / "ceph.conf"
        self.procs: dict[str, subprocess.Popen] = {}
        self.port = 0

    # ------------------------------------------------------------------ set-up
    def write_conf(self) -> None:
        r = self.root
        for d in ("run", "log", "mon.a", "osd.0"):
            (r / d).mkdir(parents=True, exist_ok=True)
        self.fsid = str(uuid.uuid4())
        self.port = _free_port()
        self.conf.write_text(f"""[global]
fsid = {self.fsid}
mon host = v2:127.0.0.1:{self.port}
mon initial members = a
public addr = 127.0.0.1
ms bind msgr1 = false
auth cluster required = {self.auth}
auth service required = {self.auth}
auth client required = {self.auth}
keyring = {r}/$name.keyring
osd pool default size = 1
osd pool default min size = 1
mon allow pool size one = true
mon allow pool delete = true
mon warn on pool no redundancy = false
mon data avail warn = 1
mon data avail crit = 0
osd crush chooseleaf type = 0
osd objectstore = memstore
memstore device bytes = 4294967296
osd op num shards = 1
osd client watch timeout = 5
osd op num threads per shard = 2
run dir = {r}/run
admin socket = {r}/run/$name.asok
log file = {r}/log/$name.log
pid file = {r}/run/$name.pid
mon data = {r}/$name
osd data = {r}/$name
client mount timeout = 20
rados mon op timeout = 20
rados osd op timeout = 20
""")

    def _make_keys(self) -> None:
        """mon. and client.admin keys (the monitor's keyring holds both); the OSD makes its own."""
        mon, admin = self.root / "mon.a.keyring", self.root / "client.admin.keyring"
        tool = ["ceph-authtool", "--create-keyring"]
        subprocess.run([*tool, str(mon), "--gen-key", "-n", "mon.", "--cap", "mon", "allow *"],
                       check=True, capture_output=True, timeout=30)
        subprocess.run([*tool, str(admin), "--gen-key", "-n", "client.admin", "--cap", "mon", "allow *",
                        "--cap", "osd", "allow *", "--cap", "mgr", "allow *"], check=True, capture_output=True,
                       timeout=30)
        subprocess.run(["ceph-authtool", str(mon), "--import-keyring", str(admin)], check=True,
                       capture_output=True, timeout=30)

    def admin_key(self) -> str:
        """client.admin's key (base64), as a secret object would carry it."""
        for line in (self.root / "client.admin.keyring").read_text().splitlines():
            if line.strip().startswith("key = "):
                return line.split("=", 1)[1].strip()
        raise RuntimeError("no key in client.admin.keyring")

    def ceph(self, *args: str, timeout: float = 30) -> str:
        p = subprocess.run(["ceph", "-c", str(self.conf), "--connect-timeout", "15", *args],
                           capture_output=True, text=True, timeout=timeout)
        if p.returncode != 0:
            raise RuntimeError(f"ceph {' '.join(args)}: {p.stderr.strip() or p.stdout.strip()}")
        return p.stdout

    def rbd(self, *args: str, timeout: float = 60, check: bool = True, input: bytes | None = None):
        p = subprocess.run(["rbd", "-c", str(self.conf), *args], capture_output=True, timeout=timeout, input=input)
        if check and p.returncode != 0:
            raise RuntimeError(f"rbd {' '.join(args)}: {p.stderr.decode(errors='replace').strip()}")
        return p

    def _daemon(self, name: str, argv: list[str]) -> None:
        log = open(self.root / "log" / f"{name}.out", "ab")
        self.procs[name] = subprocess.Popen(argv, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                            start_new_session=True)
        log.close()

    def start_mon(self) -> None:
        self._daemon("mon", ["ceph-mon", "-c", str(self.conf), "-i", "a", "-f"])

    def start_osd(self) -> None:
        self._daemon("osd", ["ceph-osd", "-c", str(self.conf), "-i", "0", "-f"])

    def start(self, timeout: float = 60) -> "Cluster":
        """Make and start the cluster and the ``rbd`` pool; RuntimeError if it is not up in ``timeout``."""
        deadline = time.monotonic() + timeout
        self.write_conf()
        self._make_keys()
        monmap = self.root / "monmap"
        subprocess.run(["monmaptool", "--create", "--addv", "a", f"[v2:127.0.0.1:{self.port}]", "--fsid",
                        self.fsid, str(monmap)], check=True, capture_output=True, timeout=30)
        subprocess.run(["ceph-mon", "-c", str(self.conf), "--mkfs", "-i", "a", "--monmap", str(monmap),
                        "--keyring", str(self.root / "mon.a.keyring")], check=True, capture_output=True, timeout=30)
        self.start_mon()
        osd_uuid = str(uuid.uuid4())
        self._retry(lambda: self.ceph("osd", "new", osd_uuid), deadline)
        osd_key = self.root / "osd.0.keyring"
        subprocess.run(["ceph-authtool", "--create-keyring", str(osd_key), "--gen-key", "-n", "osd.0"],
                       check=True, capture_output=True, timeout=30)
        self.ceph("auth", "add", "osd.0", "osd", "allow *", "mon", "allow profile osd", "-i", str(osd_key))
        subprocess.run(["ceph-osd", "-c", str(self.conf), "-i", "0", "--mkfs", "--osd-uuid", osd_uuid],
                       check=True, capture_output=True, timeout=30)
        self.start_osd()
        self.ceph("osd", "pool", "create", POOL, "8")
        self.ceph("osd", "pool", "set", POOL, "size", "1", "--yes-i-really-mean-it")
        self.wait_osd_up(deadline)
        self.rbd("pool", "init", POOL, timeout=max(1.0, deadline - time.monotonic()))
        return self

    def wait_osd_up(self, deadline: float) -> None:
        while True:
            out = self.ceph("osd", "stat")
            if "1 up" in out:
                return
            if time.monotonic() > deadline:
                raise RuntimeError(f"the OSD did not come up: {out.strip()}")
            time.sleep(0.2)

    @staticmethod
    def _retry(fn, deadline: float):
        while True:
            try:
                return fn()
            except (RuntimeError, subprocess.TimeoutExpired):
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.2)

    # ------------------------------------------------------------------ faults and tear-down
    def stop_osd(self) -> None:
        """SIGKILL the OSD (memstore: its objects are gone with it, as on a lost disk)."""
        p = self.procs.pop("osd", None)
        if p is not None:
            p.kill()
            p.wait(timeout=30)

    def pause_osd(self) -> None:
        """SIGSTOP the OSD: requests to it hang until it continues (an unresponsive disk)."""
        os.kill(self.procs["osd"].pid, signal.SIGSTOP)

    def resume_osd(self) -> None:
        os.kill(self.procs["osd"].pid, signal.SIGCONT)

    def stop(self) -> None:
        for name in ("osd", "mon"):
            p = self.procs.pop(name, None)
            if p is None:
                continue
            try:
                os.kill(p.pid, signal.SIGCONT)
            except ProcessLookupError:
                pass
            p.terminate()
            try:
                p.wait(timeout=10)
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait(timeout=10)

    def name(self, image: str, pool: str = POOL, **opts: str) -> str:
        """The ``rbd:`` name of an image in this cluster."""
        tail = "".join(f":{k}={v}" for k, v in opts.items())
        return f"rbd:{pool}/{image}:conf={self.conf}{tail}"


def _pids(root: Path) -> list[int]:
    out = []
    for f in (root / "run").glob("*.pid"):
        try:
            out.append(int(f.read_text().strip()))
        except (OSError, ValueError):
            pass
    return out


def main(argv: list[str]) -> int:
    if len(argv) != 3 or argv[1] not in ("start", "stop"):
        print(__doc__, file=sys.stderr)
        return 2
    root = Path(argv[2]).resolve()
    if argv[1] == "start":
        root.mkdir(parents=True, exist_ok=True)
        c = Cluster(root).start()
        print(c.conf)
        return 0
    pids = _pids(root)
    for sig in (signal.SIGTERM, signal.SIGKILL):
        for pid in pids:
            try:
                os.kill(pid, sig)
            except ProcessLookupError:
                pass
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline and any(os.path.exists(f"/proc/{p}") for p in pids):
            time.sleep(0.1)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
