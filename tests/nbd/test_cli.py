"""``qcowpy nbd`` as a command: qemu-nbd's error messages and exit codes, socket activation,
--fork/--pid-file, TCP, -t/-e lifetimes, and clean shutdown on signals."""
from __future__ import annotations

import os
import re
import signal
import socket
import subprocess
import time

import pytest

from .conftest import child_env, free_port, qcowpy_argv, run, tool, wait_for_port

BAD = [
    ["--detect-zeroes=xx", "IMG"], ["--discard=xx", "IMG"], ["--cache=xx", "IMG"], ["-e", "x", "IMG"],
    ["-k", "rel", "IMG"], ["--foo", "IMG"], [], ["IMG", "b"], ["--tls-creds=x", "IMG"],
    ["--detect-zeroes=unmap", "IMG"], ["-L", "IMG"], ["--selinux-label=x", "IMG"], ["-k", "/tmp/s", "--tls-authz=x", "IMG"],
    ["-x", "a" * 4097, "IMG"], ["-k", "SOCK", "NONEXIST"], ["-k", "SOCK", "-f", "foo", "IMG"],
    ["-k", "/nonexist/dir/s", "-f", "raw", "IMG"], ["-c", "/dev/nbd0", "IMG"], ["-d", "/dev/nbd0"],
    ["-o", "x", "IMG"], ["-o", "2M", "IMG"], ["-k", "SOCK", "-f", "raw", "-o", "2097152", "IMG"],
    ["-L", "-x", "foo"], ["-L", "-o", "512"], ["-L", "--fork"], ["-L", "-k", "NONEXIST"],
    ["-L", "-b", "127.0.0.1", "-p", "1"], ["--image-opts", "-f", "raw", "IMG"],
    ["-k", "SOCK", "--tls-hostname=x", "IMG"], ["-k", "SOCK", "-f", "raw", "-B", "nope", "IMG"],
]


def _norm(text: str, prog: str) -> str:
    return re.sub(rf"(?m)^\S*{prog}: ", "", text)


@pytest.mark.parametrize("args", BAD, ids=lambda a: " ".join(a)[:40] or "none")
def test_errors_are_qemu_nbds(tmp_path, args):
    """Each bad command line fails with exit 1 and qemu-nbd's first error line, never a traceback."""
    img = tmp_path / "a.raw"
    img.write_bytes(bytes(1 << 20))
    argv = [str(img) if a == "IMG" else str(tmp_path / "s") if a == "SOCK" else
            str(tmp_path / "none") if a == "NONEXIST" else a for a in args]
    ours = subprocess.run(qcowpy_argv("nbd", *argv), capture_output=True, text=True, env=child_env(), timeout=30)
    theirs = run(tool("qemu-nbd"), *argv, check=False, timeout=30)
    assert ours.returncode == theirs.returncode == 1, (ours.stderr, theirs.stderr)
    assert "Traceback" not in ours.stderr
    first = [ln for ln in _norm(theirs.stderr, "qemu-nbd").splitlines() if not ln.startswith(("WARNING", " "))][0]
    mine = [ln for ln in _norm(ours.stderr, "qcowpy").splitlines() if not ln.startswith(("WARNING", " "))][0]
    if args and args[0] in ("-c", "-d") and os.path.exists(args[1]):
        assert mine == "Kernel /dev/nbdN support not available"  # qemu-nbd has the kernel client; we do not
    else:
        assert mine == first


def test_socket_activation_with_nbdinfo_and_nbdcopy(qemu, tmp_path):
    """libnbd starts the server itself with LISTEN_PID/LISTEN_FDS (``[ cmd ]``), as with qemu-nbd."""
    img = tmp_path / "a.qcow2"
    qemu.create(img, "8M")
    qemu.io(img, "write -P 0x61 0 1M")
    env = child_env()
    cmd = ["[", *qcowpy_argv("nbd", "-f", "qcow2", str(img)), "]"]
    p = subprocess.run([tool("nbdinfo"), "--size", "--", *cmd], capture_output=True, text=True, env=env, timeout=60)
    assert p.returncode == 0, p.stderr
    assert p.stdout.strip() == str(8 << 20)
    out = tmp_path / "out.raw"
    p = subprocess.run([tool("nbdcopy"), "--", *cmd, str(out)], capture_output=True, text=True, env=env, timeout=60)
    assert p.returncode == 0, p.stderr
    assert qemu.compare(img, out, "qcow2", "raw").returncode == 0


def test_socket_activation_refuses_a_socket_option(tmp_path):
    env = child_env()
    env["LISTEN_FDS"] = "1"
    p = subprocess.run(["sh", "-c", 'LISTEN_PID=$$ exec "$@"', "sh", *qcowpy_argv("nbd", "-k", "/tmp/x", "img")],
                       capture_output=True, text=True, env=env, timeout=30)
    assert p.returncode == 1 and p.stderr == "qcowpy: Unix socket can't be set when using socket activation\n"


def test_fork_and_pid_file_then_sigterm(qemu, tmp_path):
    img = tmp_path / "a.qcow2"
    qemu.create(img, "8M")
    sock, pidf = tmp_path / "s", tmp_path / "pid"
    p = subprocess.run(qcowpy_argv("nbd", "--fork", "--pid-file", pidf, "-t", "-k", sock, img), capture_output=True,
                       text=True, env=child_env(), timeout=60)
    assert p.returncode == 0 and p.stderr == ""
    pid = int(pidf.read_text())
    try:
        assert sock.exists()
        run(tool("qemu-io"), "-f", "raw", "-c", "write -P 0x42 0 64k", f"nbd+unix:///?socket={sock}")
    finally:
        os.kill(pid, signal.SIGTERM)
    deadline = time.monotonic() + 20
    while os.path.exists(f"/proc/{pid}") and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not os.path.exists(f"/proc/{pid}")
    assert not sock.exists()
    qemu.io(img, "read -P 0x42 0 64k")
    qemu.assert_clean(img)


def test_fork_reports_open_errors_and_exits_1(tmp_path):
    p = subprocess.run(qcowpy_argv("nbd", "--fork", "-k", tmp_path / "s", tmp_path / "none"), capture_output=True,
                       text=True, env=child_env(), timeout=60)
    assert p.returncode == 1
    assert p.stderr == (f"qcowpy: Failed to blk_new_open '{tmp_path / 'none'}': Could not open "
                        f"'{tmp_path / 'none'}': No such file or directory\n")


def test_tcp_and_lifetimes(qemu, tmp_path):
    """Without -t the server exits when its client leaves; -e 2 lets two clients in at once."""
    img = tmp_path / "a.qcow2"
    qemu.create(img, "8M")
    port = free_port()
    proc = subprocess.Popen(qcowpy_argv("nbd", "-b", "127.0.0.1", "-p", port, "-e", "2", img),
                            stderr=subprocess.PIPE, text=True, env=child_env())
    try:
        uri = f"nbd://127.0.0.1:{port}/"
        wait_for_port(port, proc)
        held = socket.create_connection(("127.0.0.1", port))  # a client that never negotiates...
        p = run(tool("nbdinfo"), "--json", uri)  # ...does not keep a second one out with -e 2
        assert '"can_multi_conn": true' in p.stdout
        held.close()  # a client leaving without negotiating never ends the server (as in qemu-nbd)
        time.sleep(0.3)
        assert proc.poll() is None
        run(tool("nbdinfo"), "--size", uri)
        assert proc.wait(20) == 0  # a negotiated client left and nobody is connected: exit
    finally:
        if proc.poll() is None:
            proc.kill()
        proc.communicate()


def test_sigint_flushes_and_closes(qemu, start_server, tmp_path):
    img = tmp_path / "a.qcow2"
    qemu.create(img, "8M")
    srv = start_server("qcowpy", img, "-t")
    run(tool("qemu-io"), "-f", "raw", "-c", "write -P 0x17 1M 1M", srv.uri)
    assert srv.stop(signal.SIGINT) == 0
    assert not srv.sock.exists()
    qemu.io(img, "read -P 0x17 1M 1M")
    qemu.assert_clean(img)


@pytest.mark.parametrize("holder", ["qcowpy", "qemu-nbd"])
def test_image_lock_is_held_as_qemu_nbd_holds_it(qemu, start_server, tmp_path, holder):
    """While one server exports an image read-write, QEMU cannot open it for writing and a second
    server (either kind) fails to start with qemu-nbd's lock message."""
    img = tmp_path / "a.qcow2"
    qemu.create(img, "8M")
    start_server(holder, img, "-t")
    p = run(tool("qemu-io"), "-f", "qcow2", "-c", "read 0 512", str(img), check=False)
    assert p.returncode != 0 and 'Failed to get "write" lock' in p.stderr
    for kind in ("qcowpy", "qemu-nbd"):
        argv = qcowpy_argv("nbd", "-k", tmp_path / f"second-{kind}", img) if kind == "qcowpy" else \
            [tool("qemu-nbd"), "-k", str(tmp_path / f"second-{kind}"), str(img)]
        p = subprocess.run(argv, capture_output=True, text=True, env=child_env(), timeout=30)
        assert p.returncode == 1
        first = re.sub(r"^\S*(qemu-nbd|qcowpy): ", "", p.stderr.splitlines()[0])
        assert first == f"Failed to blk_new_open '{img}': Failed to get \"write\" lock", p.stderr
