"""Fixtures for the storage daemon tests: our daemon as a subprocess, QSD as the oracle, and a
tiny Linux guest (Debian kernel + busybox initramfs) booted by QEMU with TCG."""
from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from typing import Optional

import pytest

from . import mkinitramfs

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def _require(what: str, ok: bool) -> None:
    if not ok:
        if os.environ.get("QCOWPY_REQUIRE_QEMU"):
            pytest.fail(f"{what} required (QCOWPY_REQUIRE_QEMU is set; .ci/run installs it) but missing")
        pytest.skip(f"{what} missing")


def env() -> dict[str, str]:
    """The environment for a daemon subprocess: this checkout first on PYTHONPATH."""
    extra = os.environ.get("PYTHONPATH")
    return dict(os.environ, PYTHONPATH=ROOT + (os.pathsep + extra if extra else ""))


class Daemon:
    """``qcowpy storage-daemon`` (or ``qemu-storage-daemon``) running in the background."""

    def __init__(self, args: list[str], wait_for: list[str], qsd: bool = False) -> None:
        argv = ["qemu-storage-daemon"] if qsd else [sys.executable, "-m", "qcowpy.cli.main", "storage-daemon"]
        self.proc = subprocess.Popen(argv + args, env=env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                     text=True)
        deadline = time.monotonic() + 20
        while not all(os.path.exists(p) for p in wait_for):
            if self.proc.poll() is not None:
                out, err = self.proc.communicate()
                pytest.fail(f"daemon exited {self.proc.returncode}: {err}")
            if time.monotonic() > deadline:
                self.kill()
                pytest.fail(f"daemon did not create {wait_for}")
            time.sleep(0.05)

    def terminate(self, timeout: float = 30) -> tuple[int, str]:
        self.proc.send_signal(signal.SIGTERM)
        _, err = self.proc.communicate(timeout=timeout)
        return self.proc.returncode, err

    def kill(self) -> None:
        """Stop a daemon a test left running: SIGTERM first (it unmounts its FUSE exports; a
        SIGKILLed one would leave a dead mount behind), SIGKILL if it does not go."""
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.communicate(timeout=15)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.communicate()


@pytest.fixture
def daemons():
    """Start daemons with ``daemons(args, wait_for)``; whatever is still running is killed."""
    started: list[Daemon] = []

    def start(args: list[str], wait_for: list[str], qsd: bool = False) -> Daemon:
        d = Daemon(args, wait_for, qsd)
        started.append(d)
        return d

    yield start
    for d in started:
        d.kill()


@pytest.fixture(scope="session")
def qsd_binary() -> str:
    path = shutil.which("qemu-storage-daemon")
    _require("qemu-storage-daemon (qemu-system-x86 / qemu-utils)", path is not None)
    return path  # type: ignore[return-value]


class Guest:
    """Boots the test system with a vhost-user-blk disk and returns its ``QCOWPY`` lines."""

    def __init__(self, qemu: str, kernel: str, initrd: str) -> None:
        self.qemu, self.kernel, self.initrd = qemu, kernel, initrd

    def argv(self, sock: str, mode: str, queues: int = 1, params: str = "") -> list[str]:
        return mkinitramfs.qemu_argv(self.qemu, self.kernel, self.initrd, mkinitramfs.vhost_user_disk(sock, queues),
                                     f"qcowpy.mode={mode} {params}", cpus=queues)

    def boot(self, sock: str, mode: str, timeout: float = 90, queues: int = 1,
             params: str = "") -> tuple[list[str], str]:
        p = subprocess.run(self.argv(sock, mode, queues, params), capture_output=True, text=True, timeout=timeout)
        console = p.stdout.replace("\r", "")
        lines = [ln.split("QCOWPY ", 1)[1] for ln in console.splitlines() if "QCOWPY " in ln]
        assert p.returncode == 0, f"QEMU exited {p.returncode}: {p.stderr}\n{console}"
        return lines, console


@pytest.fixture(scope="session")
def guest() -> Guest:
    qemu = shutil.which("qemu-system-x86_64")
    _require("qemu-system-x86_64", qemu is not None)
    need = mkinitramfs.missing()
    _require("the test guest's packages (" + ", ".join(need) + ")", not need)
    cache = os.path.join(tempfile.gettempdir(), f"qcowpy-test-guest-{os.getuid()}")
    os.makedirs(cache, exist_ok=True)
    kernel, initrd = mkinitramfs.build(cache)
    return Guest(qemu, kernel, initrd)  # type: ignore[arg-type]


def files(lines: list[str]) -> dict[str, str]:
    """``file NAME MD5`` lines as {name: md5}."""
    return {ln.split()[1]: ln.split()[2] for ln in lines if ln.startswith("file ")}


def need_tool(name: str) -> Optional[str]:
    path = shutil.which(name) or (f"/sbin/{name}" if os.path.exists(f"/sbin/{name}") else None)
    _require(name, path is not None)
    return path


def boot_until(guest: Guest, sock: str, mode: str, line_prefix: str, count: int, timeout: float = 120):
    """Boot in the background; return (QEMU process, QCOWPY lines so far) once ``count`` lines
    start with ``line_prefix``."""
    import select
    proc = subprocess.Popen(guest.argv(sock, mode), stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    lines: list[str] = []
    buf = b""
    deadline = time.monotonic() + timeout
    while sum(ln.startswith(line_prefix) for ln in lines) < count:
        if time.monotonic() > deadline or proc.poll() is not None:
            proc.kill()
            pytest.fail(f"guest never reached {count} x {line_prefix!r}: {lines}")
        if select.select([proc.stdout], [], [], 1)[0]:
            buf += os.read(proc.stdout.fileno(), 65536)
            *done, buf = buf.split(b"\n")
            lines += [ln.decode(errors="replace").split("QCOWPY ", 1)[1].strip()
                      for ln in done if b"QCOWPY " in ln]
    return proc, lines
