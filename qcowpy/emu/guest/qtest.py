"""qtest clients: the guest's only way to touch the machine (ports, physical memory, clock, IRQs).

:class:`QTest` implements the accessors on top of one method, ``_command``; the subclasses send
lines to an in-process session or over a unix socket. :func:`launch_qemu` starts a real
``qemu-system-x86_64`` as the other end, :func:`launch_emu` this emulator in a subprocess.
"""
from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
import tempfile
import threading
from typing import Optional, Sequence

from ..errors import EmuError
from ..memory import topology_generation


class QTestError(EmuError):
    """The qtest server answered FAIL, or the connection broke."""


class QTest:
    """Accessors shared by all transports (QEMU's libqtest API, in Python)."""

    def __init__(self) -> None:
        self.irq_level: dict[int, bool] = {}

    def _command(self, line: str) -> str:
        raise NotImplementedError

    def _async(self, line: str) -> None:
        parts = line.split()
        if len(parts) == 3 and parts[0] == "IRQ":
            self.irq_level[int(parts[2])] = parts[1] == "raise"

    def command(self, line: str) -> str:
        """Send a request; return what follows ``OK`` (raise QTestError on FAIL)."""
        resp = self._command(line)
        if resp == "OK":
            return ""
        if resp.startswith("OK "):
            return resp[3:]
        raise QTestError(f"qtest '{line}': {resp}")

    # port I/O
    def outb(self, port: int, v: int) -> None: self.command(f"outb {port:#x} {v & 0xff:#x}")
    def outw(self, port: int, v: int) -> None: self.command(f"outw {port:#x} {v & 0xffff:#x}")
    def outl(self, port: int, v: int) -> None: self.command(f"outl {port:#x} {v & 0xffffffff:#x}")
    def inb(self, port: int) -> int: return int(self.command(f"inb {port:#x}"), 16)
    def inw(self, port: int) -> int: return int(self.command(f"inw {port:#x}"), 16)
    def inl(self, port: int) -> int: return int(self.command(f"inl {port:#x}"), 16)

    # physical memory, including MMIO
    def writeb(self, a: int, v: int) -> None: self.command(f"writeb {a:#x} {v & 0xff:#x}")
    def writew(self, a: int, v: int) -> None: self.command(f"writew {a:#x} {v & 0xffff:#x}")
    def writel(self, a: int, v: int) -> None: self.command(f"writel {a:#x} {v & 0xffffffff:#x}")
    def writeq(self, a: int, v: int) -> None: self.command(f"writeq {a:#x} {v & (2**64 - 1):#x}")
    def readb(self, a: int) -> int: return int(self.command(f"readb {a:#x}"), 16)
    def readw(self, a: int) -> int: return int(self.command(f"readw {a:#x}"), 16)
    def readl(self, a: int) -> int: return int(self.command(f"readl {a:#x}"), 16)
    def readq(self, a: int) -> int: return int(self.command(f"readq {a:#x}"), 16)

    def memread(self, addr: int, size: int) -> bytes:
        if size == 0:
            return b""
        return bytes.fromhex(self.command(f"read {addr:#x} {size:#x}")[2:])

    def memwrite(self, addr: int, data: bytes) -> None:
        if data:
            self.command(f"write {addr:#x} {len(data):#x} 0x{data.hex()}")

    def memset(self, addr: int, size: int, value: int) -> None:
        self.command(f"memset {addr:#x} {size:#x} {value & 0xff:#x}")

    def map_ram(self, addr: int, length: int) -> Optional[memoryview]:
        """Guest RAM ``[addr, addr + length)`` to read and write in place, as a guest CPU uses its
        own RAM (no exit per access), or None: a socket transport cannot share memory, so every
        access stays a protocol line. Valid while :meth:`ram_generation` is unchanged."""
        return None

    def ram_generation(self) -> int:
        """Changes when mappings from :meth:`map_ram` may have gone stale."""
        return 0

    # time and interrupts
    def clock_step(self, ns: Optional[int] = None) -> int:
        return int(self.command("clock_step" if ns is None else f"clock_step {ns}"))

    def irq_intercept_in(self, path: str = "ioapic") -> None:
        self.command(f"irq_intercept_in {path}")

    def get_irq(self, n: int) -> bool:
        return self.irq_level.get(n, False)

    def close(self) -> None:
        pass

    def __enter__(self) -> "QTest":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class InProcessQTest(QTest):
    """Talks to a machine in this process through the same protocol handler a socket uses."""

    def __init__(self, machine: object) -> None:
        super().__init__()
        from ..qtest import QTestSession
        self.machine = machine
        self.session = QTestSession(machine, self._async)  # type: ignore[arg-type]

    def _command(self, line: str) -> str:
        return self.session.handle(line)

    # Memory and port accesses skip the text encoding: in one process values and bytes can be
    # handed over as they are, with the protocol's semantics (the system memory and I/O address
    # spaces, MMIO included, under the machine lock; an emulator error becomes QTestError).
    def _call(self, fn, *args):  # type: ignore[no-untyped-def]
        try:
            with self.machine.lock:  # type: ignore[attr-defined]
                return fn(*args)
        except EmuError as e:
            raise QTestError(f"qtest: {e}") from None

    def memread(self, addr: int, size: int) -> bytes:
        return self._call(self.machine.memory.read, addr, size) if size else b""  # type: ignore[attr-defined]

    def memwrite(self, addr: int, data: bytes) -> None:
        if data:
            self._call(self.machine.memory.write, addr, bytes(data))  # type: ignore[attr-defined]

    def memset(self, addr: int, size: int, value: int) -> None:
        if size:
            self.memwrite(addr, bytes([value & 0xFF]) * size)

    def map_ram(self, addr: int, length: int) -> Optional[memoryview]:
        with self.machine.lock:  # type: ignore[attr-defined]
            return self.machine.memory.map_ram(addr, length, True)  # type: ignore[attr-defined]

    def ram_generation(self) -> int:
        return topology_generation()

    def _load(self, addr: int, size: int) -> int:
        try:  # _call's work, without its frame: register accesses are the driver's hot path
            with self.machine.lock:  # type: ignore[attr-defined]
                return self.machine.memory.load(addr, size)  # type: ignore[attr-defined]
        except EmuError as e:
            raise QTestError(f"qtest: {e}") from None

    def _store(self, addr: int, value: int, size: int) -> None:
        try:
            with self.machine.lock:  # type: ignore[attr-defined]
                self.machine.memory.store(addr, value, size)  # type: ignore[attr-defined]
        except EmuError as e:
            raise QTestError(f"qtest: {e}") from None

    def readb(self, a: int) -> int: return self._load(a, 1)
    def readw(self, a: int) -> int: return self._load(a, 2)
    def readl(self, a: int) -> int: return self._load(a, 4)
    def readq(self, a: int) -> int: return self._load(a, 8)
    def writeb(self, a: int, v: int) -> None: self._store(a, v, 1)
    def writew(self, a: int, v: int) -> None: self._store(a, v, 2)
    def writel(self, a: int, v: int) -> None: self._store(a, v, 4)
    def writeq(self, a: int, v: int) -> None: self._store(a, v, 8)
    def inb(self, port: int) -> int: return self._call(self.machine.io.load, port, 1)  # type: ignore[attr-defined]
    def inw(self, port: int) -> int: return self._call(self.machine.io.load, port, 2)  # type: ignore[attr-defined]
    def inl(self, port: int) -> int: return self._call(self.machine.io.load, port, 4)  # type: ignore[attr-defined]
    def outb(self, port: int, v: int) -> None: self._call(self.machine.io.store, port, v, 1)  # type: ignore[attr-defined]
    def outw(self, port: int, v: int) -> None: self._call(self.machine.io.store, port, v, 2)  # type: ignore[attr-defined]
    def outl(self, port: int, v: int) -> None: self._call(self.machine.io.store, port, v, 4)  # type: ignore[attr-defined]

    def close(self) -> None:
        self.session.close()


class SocketQTest(QTest):
    """The test side of a qtest socket: listen on ``path``, accept the emulator's connection."""

    def __init__(self, path: str) -> None:
        super().__init__()
        self.path = path
        self._listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self._listener.bind(path)
        self._listener.listen(1)
        self._sock: Optional[socket.socket] = None
        self._file = None

    def accept(self, timeout: float = 20.0) -> None:
        self._listener.settimeout(timeout)
        try:
            self._sock, _ = self._listener.accept()
        except socket.timeout:
            raise QTestError(f"no qtest connection on {self.path} within {timeout}s") from None
        self._sock.settimeout(timeout)
        self._file = self._sock.makefile("rw", encoding="ascii", newline="\n")

    def _command(self, line: str) -> str:
        if self._file is None:
            raise QTestError("qtest socket not connected")
        try:
            self._file.write(line + "\n")
            self._file.flush()
            while True:
                resp = self._file.readline()
                if not resp:
                    raise QTestError("qtest connection closed")
                resp = resp.strip()
                if resp.startswith("IRQ "):
                    self._async(resp)
                    continue
                return resp
        except OSError as e:
            raise QTestError(f"qtest connection failed: {e}") from None

    def close(self) -> None:
        for obj in (self._file, self._sock, self._listener):
            try:
                if obj is not None:
                    obj.close()
            except OSError:
                pass
        self._file = self._sock = None
        if os.path.exists(self.path):
            os.unlink(self.path)


class EmulatorProcess:
    """A running emulator (QEMU or ours) with its qtest client and QMP socket path."""

    def __init__(self, proc: subprocess.Popen, qtest: SocketQTest, qmp_path: str, tmpdir: str) -> None:
        self.proc = proc
        self.qtest = qtest
        self.qmp_path = qmp_path
        self._tmpdir = tmpdir

    def close(self) -> None:
        self.qtest.close()
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        shutil.rmtree(self._tmpdir, ignore_errors=True)

    def __enter__(self) -> "EmulatorProcess":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def qemu_binary() -> Optional[str]:
    return shutil.which("qemu-system-x86_64")


def _launch(argv_head: list[str], args: Sequence[str], qemu: bool) -> EmulatorProcess:
    tmpdir = tempfile.mkdtemp(prefix="qcowpy-qtest-")
    qtest_path = os.path.join(tmpdir, "qtest.sock")
    qmp_path = os.path.join(tmpdir, "qmp.sock")
    client = SocketQTest(qtest_path)
    argv = argv_head + ["-qtest", f"unix:{qtest_path}", "-qmp", f"unix:{qmp_path},server=on,wait=off"]
    if qemu:
        argv += ["-accel", "tcg", "-qtest-log", "/dev/null", "-display", "none", "-nodefaults",
                 "-monitor", "none", "-S"]
    argv += list(args)
    env = dict(os.environ)
    if not qemu:  # make this checkout importable in the child even when not installed
        pkg_root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))
        env["PYTHONPATH"] = pkg_root + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
    proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                            env=env)
    try:
        client.accept()
    except QTestError:
        proc.kill()
        _, err = proc.communicate()
        client.close()
        raise QTestError(f"{argv[0]} did not connect: {err.decode(errors='replace').strip()}") from None
    return EmulatorProcess(proc, client, qmp_path, tmpdir)


def launch_qemu(args: Sequence[str], machine: str = "pc") -> EmulatorProcess:
    """Start ``qemu-system-x86_64 -machine MACHINE -qtest ... -S`` (the CPU never runs)."""
    binary = qemu_binary()
    if binary is None:
        raise QTestError("qemu-system-x86_64 not found")
    return _launch([binary, "-machine", machine], args, qemu=True)


def launch_emu(args: Sequence[str]) -> EmulatorProcess:
    """Start this emulator (``python -m qcowpy.emu.cli``) in a subprocess with a qtest socket."""
    return _launch([sys.executable, "-m", "qcowpy.emu.cli"], args, qemu=False)


def serve_in_thread(machine: object, client: SocketQTest) -> threading.Thread:
    """Run the emulator's qtest server for ``machine`` in a thread, connected to ``client``."""
    from ..qtest import serve_unix_client
    t = threading.Thread(target=serve_unix_client, args=(machine, client.path), daemon=True)
    t.start()
    client.accept()
    return t
