"""A real Linux guest (Debian's kernel, its virtio_blk driver and ext4) on a qcow2 overlay served
by ``qcowpy storage-daemon`` over vhost-user-blk. Oracles: the guest's own checksums, a second
boot after a reconnect, ``qemu-img check``, ``e2fsck`` and ``debugfs`` on QEMU's raw conversion.
"""
from __future__ import annotations

import hashlib
import os
import subprocess

import pytest

from .conftest import boot_until, files, need_tool

SIZE = 128 << 20


def _md5(path: str, length: int | None = None) -> str:
    with open(path, "rb") as f:
        return hashlib.md5(f.read() if length is None else f.read(length)).hexdigest()


def _overlay(qemu, tmp_path) -> tuple[str, str]:
    base, ov = str(tmp_path / "base.raw"), str(tmp_path / "disk.qcow2")
    qemu.create(base, SIZE, fmt="raw")
    qemu.io(base, "write -P 0x5a 0 1M", "write -P 0xa5 1M 1M", fmt="raw")
    qemu.create(ov, None, backing=base, backing_fmt="raw")
    return base, ov


def test_guest_mkfs_ext4_files_fstrim_then_reconnect_and_verify(qemu, guest, daemons, tmp_path):
    base, ov = _overlay(qemu, tmp_path)
    base_md5 = _md5(base)
    sock, pid = str(tmp_path / "vu.sock"), str(tmp_path / "qsd.pid")
    d = daemons(["--blockdev", f"driver=qcow2,node-name=disk,file.driver=file,file.filename={ov}",
                 "--export", f"type=vhost-user-blk,id=vu0,node-name=disk,addr.type=unix,addr.path={sock},"
                             "writable=on,num-queues=1",
                 "--pidfile", pid], [sock, pid])
    assert int(open(pid).read()) == d.proc.pid

    lines, console = guest.boot(sock, "write")
    assert "done" in lines, console
    assert not [ln for ln in lines if ln.startswith("FAIL")], console
    assert f"dev {SIZE // 512} sectors" in lines
    # the guest read the backing file's pattern through the overlay
    assert f"pattern {_md5(base, 1 << 20)}" in lines
    written = files(lines)
    assert sorted(written) == ["big"] + [f"small{n}" for n in range(1, 9)]
    trimmed = next(ln for ln in lines if ln.startswith("fstrim"))
    assert int(trimmed.split(": ")[1].split()[0]) > 0, trimmed

    # the front-end went away; the back-end accepts the next one (a second boot reads the files)
    lines2, console2 = guest.boot(sock, "verify")
    assert "done" in lines2 and not [ln for ln in lines2 if ln.startswith("FAIL")], console2
    assert files(lines2) == written

    code, err = d.terminate()
    assert code == 0, err
    assert not os.path.exists(pid) and not os.path.exists(sock)

    qemu.assert_clean(ov)
    assert _md5(base) == base_md5  # the backing file is untouched
    raw = str(tmp_path / "disk.raw")
    qemu.img("convert", "-O", "raw", ov, raw)
    fsck = subprocess.run([need_tool("e2fsck"), "-fn", raw], capture_output=True, text=True)
    assert fsck.returncode == 0, fsck.stdout + fsck.stderr
    debugfs = need_tool("debugfs")
    for name, md5 in written.items():
        data = subprocess.run([debugfs, "-R", f"cat /{name}", raw], capture_output=True).stdout
        assert hashlib.md5(data).hexdigest() == md5, name
    # discard reached the image: mke2fs's device discard and fstrim left zero clusters in the
    # overlay where the backing file has the pattern (otherwise it would show through, depth 1)
    zeroed = [e for e in qemu.map_json(ov) if e["depth"] == 0 and e["zero"] and not e["data"]]
    assert any(e["start"] < 2 << 20 for e in zeroed), zeroed


@pytest.mark.torture
def test_guest_killed_mid_write_then_daemon_killed(qemu, guest, daemons, tmp_path):
    """SIGKILL QEMU while the guest writes and fsyncs files, then SIGKILL the daemon: the image
    has no corruption, the journal replays on the next boot, e2fsck is clean after it, and every
    file the guest saw fsynced reads back."""
    _, ov = _overlay(qemu, tmp_path)
    sock = str(tmp_path / "vu.sock")
    args = ["--blockdev", f"driver=qcow2,node-name=disk,file.driver=file,file.filename={ov}",
            "--export", f"type=vhost-user-blk,id=vu0,node-name=disk,addr.type=unix,addr.path={sock},writable=on"]
    d = daemons(args, [sock])
    lines, console = guest.boot(sock, "write")
    assert "done" in lines, console
    proc, lines = boot_until(guest, sock, "crash", "synced ", 4)
    proc.kill()
    proc.wait()
    d.proc.kill()
    d.proc.wait()
    synced = {ln.split()[1]: ln.split()[2] for ln in lines if ln.startswith("synced ")}
    chk = qemu.check(ov)
    assert chk.returncode in (0, 3), chk.stdout + chk.stderr  # leaked clusters allowed, nothing else
    crashed = str(tmp_path / "crashed.raw")
    qemu.img("convert", "-O", "raw", ov, crashed)
    hdr = subprocess.run([need_tool("dumpe2fs"), "-h", crashed], capture_output=True, text=True).stdout
    assert "needs_recovery" in hdr  # the kill really interrupted the journal
    os.unlink(sock)
    d = daemons(args, [sock])
    lines, console = guest.boot(sock, "verify")
    assert "done" in lines and not [ln for ln in lines if ln.startswith("FAIL")], console
    seen = files(lines)
    for name, md5 in synced.items():
        assert seen.get(name) == md5, (name, console)
    code, err = d.terminate()
    assert code == 0, err
    chk = qemu.check(ov)
    assert chk.returncode in (0, 3), chk.stdout
    raw = str(tmp_path / "disk.raw")
    qemu.img("convert", "-O", "raw", ov, raw)
    fsck = subprocess.run([need_tool("e2fsck"), "-fn", raw], capture_output=True, text=True)
    assert fsck.returncode == 0, fsck.stdout + fsck.stderr


@pytest.mark.torture
def test_guest_on_two_queues(qemu, guest, daemons, tmp_path):
    """Two vCPUs and num-queues=2 on both sides: Linux's virtio_blk sets up two queues and the
    scenario still passes."""
    _, ov = _overlay(qemu, tmp_path)
    sock = str(tmp_path / "vu.sock")
    d = daemons(["--blockdev", f"driver=qcow2,node-name=disk,file.driver=file,file.filename={ov}",
                 "--export", f"type=vhost-user-blk,id=vu0,node-name=disk,addr.type=unix,addr.path={sock},"
                             "writable=on,num-queues=2"], [sock])
    lines, console = guest.boot(sock, "write", queues=2, params="loglevel=7", timeout=300)
    assert "2/0/0 default/read/poll queues" in console, console
    assert "done" in lines and not [ln for ln in lines if ln.startswith("FAIL")], console
    lines2, console2 = guest.boot(sock, "verify", queues=2, timeout=300)
    assert files(lines2) == files(lines), console2
    assert d.terminate()[0] == 0
    qemu.assert_clean(ov)
