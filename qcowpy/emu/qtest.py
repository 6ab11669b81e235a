"""The emulator side of QEMU's qtest line protocol.

Each request line gets one response line (``OK ...`` or ``FAIL ...``); interrupt changes of an
intercepted controller come as asynchronous ``IRQ raise N``/``IRQ lower N`` lines. The same
session object serves an in-process client and a unix socket (``-qtest unix:PATH``, where, as with
QEMU, the emulator connects to a socket the test opened).
"""
from __future__ import annotations

import base64
import socket
from typing import Callable, Optional

from .errors import EmuError
from .machine import MachineState

_SIZES = {"b": 1, "w": 2, "l": 4, "q": 8}


class QTestSession:
    """Parses qtest requests and runs them against a machine."""

    def __init__(self, machine: MachineState, send_async: Optional[Callable[[str], None]] = None) -> None:
        self.machine = machine
        self.send_async = send_async or (lambda line: None)
        self._intercepting = False

    def _irq(self, irq: int, level: bool) -> None:
        self.send_async(f"IRQ {'raise' if level else 'lower'} {irq}")

    def close(self) -> None:
        if self._intercepting and self._irq in self.machine.irq_listeners:
            self.machine.irq_listeners.remove(self._irq)

    def handle(self, line: str) -> str:
        """Run one request line and return the response line (without newline)."""
        words = line.split()
        if not words:
            return "FAIL empty command"
        try:
            with self.machine.lock:
                return self._dispatch(words)
        except (ValueError, IndexError):
            return f"FAIL bad arguments to '{words[0]}'"
        except EmuError as e:
            return f"FAIL {e}"

    def _dispatch(self, w: list[str]) -> str:
        m = self.machine
        cmd = w[0]
        num = lambda s: int(s, 0)  # noqa: E731  (strtoul base 0, like QEMU)
        if cmd in ("outb", "outw", "outl"):
            m.io.store(num(w[1]), num(w[2]), _SIZES[cmd[-1]])
            return "OK"
        if cmd in ("inb", "inw", "inl"):
            return f"OK 0x{m.io.load(num(w[1]), _SIZES[cmd[-1]]):04x}"
        if cmd in ("writeb", "writew", "writel", "writeq"):
            m.memory.store(num(w[1]), num(w[2]), _SIZES[cmd[-1]])
            return "OK"
        if cmd in ("readb", "readw", "readl", "readq"):
            return f"OK 0x{m.memory.load(num(w[1]), _SIZES[cmd[-1]]):016x}"
        if cmd == "read":
            return "OK 0x" + m.memory.read(num(w[1]), num(w[2])).hex()
        if cmd == "b64read":
            return "OK " + base64.b64encode(m.memory.read(num(w[1]), num(w[2]))).decode()
        if cmd == "write":
            size = num(w[2])
            data = bytes.fromhex(w[3][2:] if w[3].startswith("0x") else w[3])
            m.memory.write(num(w[1]), (data + bytes(size))[:size])
            return "OK"
        if cmd == "b64write":
            size = num(w[2])
            data = base64.b64decode(w[3])
            m.memory.write(num(w[1]), (data + bytes(size))[:size])
            return "OK"
        if cmd == "memset":
            size = num(w[2])
            if size:
                m.memory.write(num(w[1]), bytes([num(w[3]) & 0xFF]) * size)
            return "OK"
        if cmd == "clock_step":
            return f"OK {m.clock.step(num(w[1]) if len(w) > 1 else None)}"
        if cmd == "clock_set":
            return f"OK {m.clock.set(num(w[1]))}"
        if cmd == "endianness":
            return "OK little"
        if cmd == "irq_intercept_in" or cmd == "irq_intercept_out":
            if w[1] not in ("ioapic", "/machine", "/machine/ioapic"):
                return "FAIL Unknown device"
            if self._intercepting:
                return "FAIL IRQ intercept already enabled"
            self._intercepting = True
            m.irq_listeners.append(self._irq)
            return "OK"
        return f"FAIL Unknown command '{cmd}'"


def serve_unix_client(machine: MachineState, path: str) -> None:
    """Connect to ``path`` and serve qtest requests until the peer closes (``-qtest unix:PATH``)."""
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    sock.connect(path)
    f = sock.makefile("rw", encoding="ascii", newline="\n")

    def send(line: str) -> None:
        f.write(line + "\n")
        f.flush()

    session = QTestSession(machine, send)
    try:
        for line in f:
            send(session.handle(line.strip()))
            if machine.quit_requested.is_set():
                break
    except OSError:
        pass
    finally:
        session.close()
        f.close()
        sock.close()
