"""Fixtures for the NBD tests: ``qcowpy nbd`` and ``qemu-nbd`` servers on unix sockets, and the real
NBD clients (qemu-io, qemu-img, nbdinfo, nbdcopy, nbdsh) as oracles.

A missing client or server skips, unless QCOWPY_REQUIRE_QEMU is set: then the test fails.
"""
from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.conftest import skip_or_fail

REPO = Path(__file__).resolve().parents[2]


def tool(name: str) -> str:
    """Path of an NBD client/server binary; skip (or fail under QCOWPY_REQUIRE_QEMU) when absent."""
    path = shutil.which(name)
    if path is None:
        skip_or_fail(f"{name} is")
    return path


def run(*argv: str, check: bool = True, timeout: float = 60, **kw) -> subprocess.CompletedProcess:
    p = subprocess.run([str(a) for a in argv], capture_output=True, text=True, timeout=timeout, **kw)
    if check and p.returncode != 0:
        pytest.fail(f"{' '.join(map(str, argv))} exited {p.returncode}:\n{p.stdout}{p.stderr}")
    return p


def qcowpy_argv(*args: str) -> list[str]:
    return [sys.executable, "-m", "qcowpy", *map(str, args)]


def child_env() -> dict[str, str]:
    env = dict(os.environ)
    env["PYTHONPATH"] = str(REPO) + os.pathsep + env.get("PYTHONPATH", "")
    return env


def wait_for_socket(path: Path, proc: subprocess.Popen, timeout: float = 20.0) -> None:
    """Wait for ``path`` (a socket or pid file) to appear; fail if the server exits first."""
    deadline = time.monotonic() + timeout
    while not path.exists():
        if proc.poll() is not None:
            out, err = proc.communicate()
            pytest.fail(f"server exited {proc.returncode} before listening:\n{out}{err}")
        if time.monotonic() > deadline:
            pytest.fail(f"server did not create {path} in {timeout}s")
        time.sleep(0.02)


class Server:
    """A running NBD server on a unix socket; ``uri`` is what clients connect to."""

    def __init__(self, proc: subprocess.Popen, sock: Path, name: str = ""):
        self.proc = proc
        self.sock = sock
        self.uri = f"nbd+unix:///{name}?socket={sock}"

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 20) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
        try:
            self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
            pytest.fail("server did not stop on SIGTERM")
        return self.proc.returncode

    def wait_exit(self, timeout: float = 20) -> int:
        return self.proc.wait(timeout)


@pytest.fixture
def start_server(tmp_path):
    """``start_server(kind, image, *options)``: kind is "qcowpy" or "qemu-nbd"; stops them all after the test."""
    servers: list[Server] = []
    counter = [0]

    def start(kind: str, image, *options: str, name: str = "") -> Server:
        counter[0] += 1
        sock = tmp_path / f"{kind}-{counter[0]}.sock"
        # Both servers listen, then open the image (taking its lock), then write the pid file
        # (qemu-nbd's order): the pid file, not the socket, says the export is ready and the
        # image locked.
        ready = tmp_path / f"{kind}-{counter[0]}.pid"
        if kind == "qcowpy":
            argv = qcowpy_argv("nbd", "-k", sock, "--pid-file", ready, *options, image)
        else:
            argv = [tool("qemu-nbd"), "-k", str(sock), "--pid-file", str(ready), *map(str, options), str(image)]
        proc = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=child_env())
        srv = Server(proc, sock, name)
        servers.append(srv)
        wait_for_socket(ready, proc)
        return srv

    yield start
    for s in servers:
        if s.proc.poll() is None:
            s.proc.kill()
        s.proc.communicate()


def nbdsh(uri: str, script: str, *opts: str) -> str:
    """Run a Python ``script`` in nbdsh connected to ``uri`` (``h`` is the handle); its stdout.

    nbdsh runs ``python3 -m nbd``; the libnbd binding is Debian's, so Debian's python3 goes first on PATH.
    """
    path = tool("nbdsh")
    env = dict(os.environ)
    env["PATH"] = "/usr/bin:" + env.get("PATH", "")
    p = subprocess.run([path, *opts, "-u", uri, "-c", script], capture_output=True, text=True, env=env, timeout=60)
    if p.returncode != 0:
        pytest.fail(f"nbdsh exited {p.returncode}:\n{p.stdout}{p.stderr}")
    return p.stdout


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_for_port(port: int, proc: subprocess.Popen, timeout: float = 20.0) -> None:
    """Wait until something accepts on 127.0.0.1:port (fail if the server exits first)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            pytest.fail(f"server exited {proc.returncode} before listening")
        with socket.socket() as s:
            if s.connect_ex(("127.0.0.1", port)) == 0:
                return
        time.sleep(0.05)
    pytest.fail(f"nothing listens on 127.0.0.1:{port} after {timeout}s")
