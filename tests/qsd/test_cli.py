"""``qcowpy storage-daemon``'s command line against qemu-storage-daemon's: the same argv must fail
with the same message (after the program name), and a good one must start, write its pidfile,
and stop cleanly on SIGTERM."""
from __future__ import annotations

import os
import subprocess
import sys

import pytest

from .conftest import env

BAD = [
    ["--blockdev", "driver=qcow2,node-name=n,file.driver=file,file.filename={d}/nope.qcow2"],
    ["--blockdev", "driver=foo,node-name=n"],
    ["--blockdev", "node-name=x"],
    ["--blockdev", "driver=qcow2,file.driver=file,file.filename={img}"],
    ["--blockdev", "driver=qcow2,node-name=n,file.driver=file,file.filename={img},bogus=1"],
    ["--blockdev", "driver=file,node-name=n,filename={img},bogus=1"],
    ["--blockdev", "driver=qcow2,node-name=n,file=nope"],
    ["--blockdev", "driver=qcow2,node-name=n,file.driver=file,file.filename={img}",
     "--blockdev", "driver=qcow2,node-name=n,file.driver=file,file.filename={img}"],
    ["--export", "type=vhost-user-blk,id=e,node-name=x,addr.type=unix,addr.path={d}/s"],
    ["{node}", "--export", "type=bogus,id=e,node-name=n"],
    ["{node}", "--export", "type=nbd,id=e,node-name=n"],
    ["{node}", "--export", "type=vhost-user-blk,id=e,node-name=n"],
    ["{node}", "--export", "type=vhost-user-blk,node-name=n,addr.type=unix,addr.path={d}/s"],
    ["{node}", "--export", "type=vhost-user-blk,id=e,node-name=n,addr.type=unix,addr.path={d}/s,"
                           "logical-block-size=100"],
    ["{node}", "--export", "type=vhost-user-blk,id=e,node-name=n,addr.type=unix,addr.path={d}/s,num-queues=0"],
    ["{node}", "--export", "type=vhost-user-blk,id=e,node-name=n,addr.type=unix,addr.path={d}/s,bogus=1"],
    ["{node}", "--export", "type=vhost-user-blk,id=e,node-name=n,addr.type=inet,addr.host=x,addr.port=1"],
    ["--blockdev", "driver=qcow2,node-name=n,file.driver=file,file.filename={img},read-only=on",
     "--export", "type=vhost-user-blk,id=e,node-name=n,addr.type=unix,addr.path={d}/s,writable=on"],
    ["{node}", "--export", "type=fuse,id=e,node-name=n,mountpoint={d}/nonexist"],
    ["{node}", "--export", "type=fuse,id=e,node-name=n,mountpoint={d}"],
    ["--monitor", "chardev=nope"],
    ["--chardev", "foo,id=c"],
    ["--chardev", "socket,id=c,path={d}/q2,server=on,wait=off", "--chardev", "socket,id=c,path={d}/q3,server=on,wait=off"],
    ["--bogus"],
    ["--pidfile", "{d}/no/such/dir/pid"],
    # NBD server and exports
    ["--nbd-server", "addr.type=unix"],
    ["--nbd-server", "addr.type=unix,addr.path={d}/nbd,tls-creds=x"],
    ["--nbd-server", "addr.type=inet,addr.host=127.0.0.1"],
    ["--nbd-server", "addr.type=foo"],
    ["--nbd-server", "addr.type=unix,addr.path={d}/nbd,max-connections=x"],
    ["--nbd-server", "addr.type=unix,addr.path={d}/nbd,bogus=1"],
    ["--nbd-server", "addr.type=unix,addr.path={d}/nbd", "--nbd-server", "addr.type=unix,addr.path={d}/nbd2"],
    ["--nbd-server", "addr.type=unix,addr.path={d}/no/such/dir/nbd"],
    ["--object", "secret,id=t,data=x", "--nbd-server", "addr.type=unix,addr.path={d}/nbd,tls-creds=t"],
    ["--nbd-server", "addr.type=unix,addr.path={d}/nbd", "{node}", "--export", "type=nbd,id=e,node-name=n,bitmap=b"],
    ["--nbd-server", "addr.type=unix,addr.path={d}/nbd", "{node}", "--export", "type=nbd,id=e,node-name=n,name=x",
     "--export", "type=nbd,id=e2,node-name=n,name=x"],
    ["--nbd-server", "addr.type=unix,addr.path={d}/nbd", "{node}", "--export", "type=nbd,id=e,node-name=n",
     "--export", "type=nbd,id=e,node-name=n,name=y"],
    ["--nbd-server", "addr.type=unix,addr.path={d}/nbd", "{node}", "--export", "type=nbd,id=e,node-name=n,foo=1"],
    ["--nbd-server", "addr.type=unix,addr.path={d}/nbd", "{node}",
     "--export", "type=nbd,id=e,node-name=n,allocation-depth=x"],
    ["--nbd-server", "addr.type=unix,addr.path={d}/nbd", "{node}",
     "--export", "type=nbd,id=e,node-name=n,bitmaps.0=nope"],
    ["--nbd-server", "addr.type=unix,addr.path={d}/nbd",
     "--blockdev", "driver=qcow2,node-name=n,file.driver=file,file.filename={img},read-only=on",
     "--export", "type=nbd,id=e,node-name=n,writable=on"],
    # objects
    ["--object", "foo,id=x"],
    ["--object", "secret,id=s"],
    ["--object", "secret,data=x"],
    ["--object", "secret,id=s,data=abc", "--object", "secret,id=s,data=x"],
    ["--object", "iothread,id=io0", "--object", "iothread,id=io0"],
    ["--object", "iothread,id=i,bogus=1"],
    ["--object", "iothread,id=i,poll-max-ns=x"],
    ["--object", "tls-creds-x509,id=t,dir={d}/nonexist,endpoint=server"],
    ["--object", "tls-creds-x509,id=t,dir={d},endpoint=bogus"],
    ["--object", "tls-creds-x509,id=t,endpoint=server"],
    ["--object", "tls-creds-x509,id=t,dir={d},endpoint=client"],
    ["--object", "secret,id=s,data=abc,format=bogus"],
    ["--object", "secret,id=s,data=abc,bogus=1"],
    ["--object", "secret,id=s,data=a,file={img}"],
    ["--object", "authz-simple,id=a"],
    ["--object", "iothread,id=i", "{node}",
     "--export", "type=vhost-user-blk,id=e,node-name=n,addr.type=unix,addr.path={d}/s,iothread=zz"],
    # chardevs
    ["--chardev", "socket,id=m,host=127.0.0.1,server=on,wait=off"],
]


def _argv(template: list[str], d: str, img: str) -> list[str]:
    node = ["--blockdev", f"driver=qcow2,node-name=n,file.driver=file,file.filename={img}"]
    out: list[str] = []
    for a in template:
        out += node if a == "{node}" else [a.format(d=d, img=img)]
    return out


@pytest.mark.parametrize("template", BAD, ids=[" ".join(t)[:60] for t in BAD])
def test_errors_match_qemu_storage_daemon(template, qemu, qsd_binary, tmp_path):
    img = str(tmp_path / "a.qcow2")
    qemu.create(img, "64M")
    argv = _argv(template, str(tmp_path), img)
    theirs = subprocess.run(["qemu-storage-daemon", *argv], executable=qsd_binary, capture_output=True,
                            text=True, timeout=30)
    ours = subprocess.run([sys.executable, "-m", "qcowpy.cli.main", "storage-daemon", *argv],
                          capture_output=True, text=True, env=env(), timeout=30)
    assert theirs.returncode == 1 and ours.returncode == 1, (theirs.stderr, ours.stderr)
    assert theirs.stderr.startswith("qemu-storage-daemon: ")
    assert ours.stderr.startswith("qcowpy: ") and "Traceback" not in ours.stderr
    assert ours.stderr.split(": ", 1)[1] == theirs.stderr.split(": ", 1)[1]
    qemu.assert_clean(img)


def test_sigterm_closes_images_and_removes_files(qemu, daemons, tmp_path):
    img, sock, pid = str(tmp_path / "a.qcow2"), str(tmp_path / "s"), str(tmp_path / "pid")
    qemu.create(img, "64M")
    d = daemons(["--blockdev", f"driver=qcow2,node-name=n,file.driver=file,file.filename={img}",
                 "--export", f"type=vhost-user-blk,id=e,node-name=n,addr.type=unix,addr.path={sock},writable=on",
                 "--pidfile", pid], [sock, pid])
    # the image is open read-write: QEMU's locking sees it as in use
    busy = qemu.img("info", img, check=False)
    assert busy.returncode != 0 and "lock" in busy.stderr
    code, err = d.terminate()
    assert code == 0 and err == ""
    assert not os.path.exists(sock) and not os.path.exists(pid)
    qemu.assert_clean(img)


def test_daemonize_returns_when_ready(qemu, tmp_path):
    img, sock, pid = str(tmp_path / "a.qcow2"), str(tmp_path / "s"), str(tmp_path / "pid")
    qemu.create(img, "64M")
    p = subprocess.run([sys.executable, "-m", "qcowpy.cli.main", "storage-daemon", "--daemonize",
                        "--blockdev", f"driver=qcow2,node-name=n,file.driver=file,file.filename={img}",
                        "--export", f"type=vhost-user-blk,id=e,node-name=n,addr.type=unix,addr.path={sock}",
                        "--pidfile", pid], env=env(), capture_output=True, text=True, timeout=30)
    assert p.returncode == 0, p.stderr
    assert os.path.exists(sock)  # ready before the parent returned
    child = int(open(pid).read())
    os.kill(child, 15)
    for _ in range(200):
        if not os.path.exists(pid):
            break
        import time
        time.sleep(0.05)
    assert not os.path.exists(pid) and not os.path.exists(sock)
    qemu.assert_clean(img)
    # a daemonized start that fails reports the error and exits 1
    bad = subprocess.run([sys.executable, "-m", "qcowpy.cli.main", "storage-daemon", "--daemonize",
                          "--blockdev", "driver=foo,node-name=n"], env=env(), capture_output=True, text=True,
                         timeout=30)
    assert bad.returncode == 1 and "Parameter 'driver' does not accept value 'foo'" in bad.stderr


def test_help_lists_the_options():
    p = subprocess.run([sys.executable, "-m", "qcowpy.cli.main", "storage-daemon", "--help"],
                       capture_output=True, text=True, env=env(), timeout=30)
    assert p.returncode == 0
    for opt in ("--blockdev", "--export", "--chardev", "--monitor", "--pidfile", "--daemonize", "--nbd-server",
                "--object"):
        assert opt in p.stdout
