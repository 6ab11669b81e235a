"""The human monitor (HMP): ``info pci``, ``info mtree``, ``xp``, port I/O, device_add, guest programs.

:meth:`HumanMonitor.execute` runs one command line and returns its output text, so the same code
serves ``-monitor stdio`` and QMP's ``human-monitor-command``.
"""
from __future__ import annotations

import shlex
from typing import Callable, Optional, TextIO

from .errors import CommandNotFound, EmuError
from .machine import MachineState
from .mtree import mtree_flatview
from .pci import regs
from .pci.device import PCIDevice, format_pci_addr
from .pci.info import format_info_pci, query_pci
from .qdev import BusState, DeviceState
from .qom import object_resolve_path, properties_help, walk

VERSION = "0.1.0"
#: QEMU's device categories, in the order ``-device help`` prints them, with their titles
DEVICE_CATEGORIES = {"bridge": "Controller/Bridge/Hub", "usb": "USB", "storage": "Storage", "network": "Network",
                     "input": "Input", "display": "Display", "sound": "Sound", "misc": "Misc", "cpu": "CPU",
                     "watchdog": "Watchdog"}
_SIZES = {"b": 1, "h": 2, "w": 4, "g": 8}


def parse_device_spec(spec: str) -> tuple[str, dict[str, str], Optional[str]]:
    """Split ``driver,prop=val,...,id=name`` into (driver, props, id)."""
    parts = [p for p in spec.split(",") if p]
    if not parts:
        raise EmuError("Parameter 'driver' is missing")
    driver, props, dev_id = parts[0], {}, None
    if driver.startswith("driver="):
        driver = driver[len("driver="):]
    for p in parts[1:]:
        key, sep, value = p.partition("=")
        if not sep:
            if key in ("help", "?"):
                props["help"] = "on"
                continue
            value = "on"
        if key == "id":
            dev_id = value
        else:
            props[key] = value
    return driver, props, dev_id


class HumanMonitor:
    """Executes HMP command lines against a machine."""

    def __init__(self, machine: MachineState) -> None:
        self.machine = machine
        self._commands: dict[str, tuple[Callable[[list[str]], str], str]] = {
            "help": (self.cmd_help, "help [cmd] -- show help"),
            "?": (self.cmd_help, "? -- same as help"),
            "info": (self.cmd_info, "info pci|block|mtree [-f] [-D]|qtree|qom-tree|version|status|irq -- show machine state"),
            "xp": (self.cmd_xp, "xp /fmt addr -- physical memory dump (fmt: count, x/d/u, b/h/w/g)"),
            "xpw": (self.cmd_xpw, "xpw /size addr value -- physical memory write of size b/h/w/g (qcowpy)"),
            "i": (self.cmd_in, "i /fmt port -- I/O port read (b/w/l)"),
            "o": (self.cmd_out, "o /fmt port value -- I/O port write (b/w/l)"),
            "device_add": (self.cmd_device_add, "device_add driver[,prop=value][,...] -- add device"),
            "device_del": (self.cmd_device_del, "device_del device -- remove device (by id or QOM path)"),
            "system_reset": (self.cmd_system_reset, "system_reset -- reset the system"),
            "qom-list": (self.cmd_qom_list, "qom-list path -- list QOM properties"),
            "qom-get": (self.cmd_qom_get, "qom-get path property -- print a QOM property"),
            "guest": (self.cmd_guest, "guest boot|rescan|lspci|pmio-test|mmio-test|edu-test|clock-step [ns]|disks|disk-read|disk-write|disk-verify|disk-test|disk-copy|disk-bench -- run guest code"),
            "quit": (self.cmd_quit, "quit|q -- quit the emulator"),
            "q": (self.cmd_quit, "q -- quit the emulator"),
        }

    def execute(self, line: str) -> str:
        """Run one command line; errors come back as text, like QEMU's monitor prints them.

        Any exception a command raises becomes an ``Error:`` line: the monitor (and QMP's
        ``human-monitor-command`` on top of it) keeps serving whatever one command does."""
        try:
            words = shlex.split(line)
        except ValueError as e:
            return f"Error: {e}\n"
        if not words:
            return ""
        entry = self._commands.get(words[0])
        if entry is None:
            return f"unknown command: '{words[0]}'\n"
        try:
            with self.machine.lock:
                return entry[0](words[1:])
        except EmuError as e:
            return f"Error: {e}\n"
        except (ValueError, IndexError, LookupError) as e:
            return f"Error: {e}\n" if str(e) else f"{words[0]}: bad arguments\n"
        except Exception as e:  # noqa: BLE001  a failing command must never take the monitor down
            return f"Error: {e or type(e).__name__}\n"

    # -- commands -----------------------------------------------------------------------------
    def cmd_help(self, args: list[str]) -> str:
        names = sorted(self._commands) if not args else [args[0]]
        out = []
        for n in names:
            if n in self._commands:
                out.append(self._commands[n][1])
        return "\n".join(out) + "\n"

    def cmd_info(self, args: list[str]) -> str:
        if not args:
            return "info pci|block|mtree|qtree|qom-tree|version|status|irq\n"
        what, rest = args[0], args[1:]
        m = self.machine
        if what == "pci":
            return format_info_pci(query_pci(m.pci_bus)) if m.pci_bus else ""
        if what == "block":
            return m.info_block()
        if what == "mtree":
            if "-f" in rest:
                return "".join(mtree_flatview(a) + "\n" for a in m.address_spaces)
            return m.info_mtree(show_disabled="-D" in rest)
        if what == "qtree":
            return self.info_qtree()
        if what == "qom-tree":
            return self.info_qom_tree()
        if what == "version":
            return f"{VERSION} (qcowpy emu)\n"
        if what == "status":
            return "VM status: running\n"
        if what == "irq":
            return "".join(f"{i:2d}: {'high' if lvl else 'low'}\n" for i, lvl in enumerate(m.irq_levels))
        raise CommandNotFound(f"info: unknown item '{what}'")

    def info_qtree(self) -> str:
        out: list[str] = ["bus: main-system-bus", "  type System"]

        def dev_lines(dev: DeviceState, ind: int) -> None:
            pad = "  " * ind
            out.append(f'{pad}dev: {dev.typename}, id "{dev.id or ""}"')
            for p in dev.static_props():
                v = getattr(dev, p.attr)
                if p.show is not None:
                    text = p.show(v)
                elif isinstance(v, bool):
                    text = "true" if v else "false"
                elif isinstance(v, str):
                    text = f'"{v}"'
                else:
                    text = str(v)
                out.append(f"{pad}  {p.name} = {text}")
            if isinstance(dev, PCIDevice) and dev.realized:
                out.append(f"{pad}  class {regs.CLASS_NAMES.get(dev.get_word(regs.CLASS_DEVICE), 'Class %04x' % dev.get_word(regs.CLASS_DEVICE))}, "
                           f"addr 00:{format_pci_addr(dev.devfn)}, pci id {dev.get_word(0):04x}:{dev.get_word(2):04x} "
                           f"(sub {dev.get_word(regs.SUBSYSTEM_VENDOR_ID):04x}:{dev.get_word(regs.SUBSYSTEM_ID):04x})")
                for n, r in enumerate(dev.io_regions):
                    if r is not None:
                        kind = "i/o" if r.is_io else "mem"
                        last = (r.addr + r.size - 1) & regs.BAR_UNMAPPED
                        out.append(f"{pad}  bar {n}: {kind} at {r.addr:#x} [{last:#x}]")
            for bus in dev.child_buses:
                bus_lines(bus, ind + 1)

        def bus_lines(bus: BusState, ind: int) -> None:
            pad = "  " * ind
            out.append(f"{pad}bus: {bus.name}")
            out.append(f"{pad}  type {bus.typename}")
            for d in reversed(bus.children):  # newest first, as QEMU lists a bus
                dev_lines(d, ind + 1)

        if self.machine.pci_host is not None:
            dev_lines(self.machine.pci_host, 1)
        return "\n".join(out) + "\n"

    def info_qom_tree(self) -> str:
        out = []
        for depth, name, obj in walk(self.machine):
            label = "/machine" if depth == 0 else "/" + name
            out.append(f"{'  ' * depth}{label} ({obj.typename})")
        return "\n".join(out) + "\n"

    @staticmethod
    def _fmt(arg: str, default_size: str) -> tuple[int, str, int]:
        if not arg.startswith("/"):
            raise ValueError("expected /fmt")
        spec = arg[1:]
        digits = ""
        while spec and spec[0].isdigit():
            digits, spec = digits + spec[0], spec[1:]
        count = int(digits) if digits else 1
        fmt, size = "x", default_size
        for c in spec:
            if c in "xduc":
                fmt = c
            elif c in _SIZES or c in "l":
                size = c
            else:
                raise ValueError(f"invalid format character '{c}'")
        return count, fmt, {"l": 4, **_SIZES}[size]

    def cmd_xp(self, args: list[str]) -> str:
        if len(args) == 1:
            args = ["/1xw", args[0]]
        count, fmt, wsize = self._fmt(args[0], "w")
        addr = int(args[1], 0)
        line_size = 8 if wsize == 1 else 16
        digits = {"x": wsize * 2, "d": 0, "u": 0, "c": 0}[fmt]
        out, line, pos = [], "", 0
        for k in range(count):
            a = addr + k * wsize
            if pos == 0:
                line = f"{a:016x}:"
            v = self.machine.memory.load(a, wsize)
            if fmt == "x":
                line += f" 0x{v:0{digits}x}"
            elif fmt == "d":
                line += f" {v - (1 << (8 * wsize)) if v >> (8 * wsize - 1) else v}"
            elif fmt == "c":
                line += " " + (chr(v) if 32 <= v < 127 else f"\\x{v:02x}")
            else:
                line += f" {v}"
            pos += wsize
            if pos >= line_size:
                out.append(line)
                pos = 0
        if pos:
            out.append(line)
        return "\n".join(out) + "\n"

    def cmd_xpw(self, args: list[str]) -> str:
        _, _, wsize = self._fmt(args[0], "w")
        self.machine.memory.store(int(args[1], 0), int(args[2], 0), wsize)
        return ""

    def cmd_in(self, args: list[str]) -> str:
        if len(args) == 1:
            args = ["/b", args[0]]
        _, _, size = self._fmt(args[0], "b")
        port = int(args[1], 0) & 0xFFFF
        v = self.machine.io.load(port, size)
        suffix = {1: "b", 2: "w", 4: "l"}[size]
        return f"port{suffix}[0x{port:04x}] = 0x{v:0{size * 2}x}\n"

    def cmd_out(self, args: list[str]) -> str:
        if len(args) == 2:
            args = ["/b"] + args
        _, _, size = self._fmt(args[0], "b")
        self.machine.io.store(int(args[1], 0) & 0xFFFF, int(args[2], 0), size)
        return ""

    def cmd_device_add(self, args: list[str]) -> str:
        driver, props, dev_id = parse_device_spec(" ".join(args))
        if driver == "help" or "help" in props:
            return device_help(None if driver == "help" else driver)
        self.machine.device_add(driver, props, dev_id, hotplug=True)
        return ""

    def cmd_device_del(self, args: list[str]) -> str:
        self.machine.device_del(args[0])
        return ""

    def cmd_system_reset(self, args: list[str]) -> str:
        self.machine.system_reset()
        return ""

    def cmd_qom_list(self, args: list[str]) -> str:
        obj = object_resolve_path(self.machine.root(), args[0] if args else "/")
        return "".join(f"{p.name} ({p.type})\n" for p in obj.properties())

    def cmd_qom_get(self, args: list[str]) -> str:
        obj = object_resolve_path(self.machine.root(), args[0])
        return f"{obj.get_property(args[1])}\n"

    def cmd_guest(self, args: list[str]) -> str:
        from .guest import workloads
        from .guest.pci import GuestPCIBus, lspci
        from .guest.qtest import InProcessQTest
        if not args:
            raise ValueError("guest boot|rescan|lspci|pmio-test|mmio-test|edu-test|clock-step [ns]")
        qts = InProcessQTest(self.machine)
        what = args[0]
        if what == "boot":
            from .guest.system import GuestSystem
            guest = GuestSystem(self.machine)
            log = guest.boot()
            self.machine.guest = guest
            self.machine.boot_log = log
            return "\n".join(log) + "\n"
        if what == "rescan":
            guest = getattr(self.machine, "guest", None)
            if guest is None:
                raise ValueError("the guest has not booted: run 'guest boot' first")
            return "\n".join(guest.rescan()) + "\n"
        if what == "lspci":
            return "\n".join(lspci(GuestPCIBus(qts), verbose="-v" in args)) + "\n"
        if what == "clock-step":
            return f"clock: {qts.clock_step(int(args[1], 0) if len(args) > 1 else None)} ns\n"
        if what.startswith("disk"):
            return self._guest_disk(what, args[1:])
        runs = {"pmio-test": workloads.a3dev_pmio_test, "mmio-test": workloads.a3dev_mmio_test,
                "edu-test": workloads.edu_test}
        if what not in runs:
            raise ValueError(f"unknown guest program '{what}'")
        _, lines = runs[what](qts)
        return "\n".join(lines) + "\n"

    def _guest_disk(self, what: str, args: list[str]) -> str:
        from .guest import virtio_blk as vb
        from .guest import workloads as wl
        guest = getattr(self.machine, "guest", None)
        disks = guest.disks if guest is not None else []
        if what == "disks":
            return "".join(f"disk {i}: {vb.describe(d)}\n" for i, d in enumerate(disks)) or "no disks\n"
        usage = ("guest disk-read N OFF LEN | disk-write N OFF LEN [SEED] | disk-verify N OFF LEN [SEED] "
                 "| disk-test N OFF LEN [SEED] | disk-copy SRC DST | disk-bench N seq|rand [BS] [TOTAL] [DEPTH]")
        if len(args) < 2:
            raise ValueError(usage)
        if not disks:
            raise ValueError("no guest disks: run 'guest boot' first")
        n = int(args[0], 0)
        if not 0 <= n < len(disks):
            raise ValueError(f"no guest disk {n}")
        disk = disks[n]
        if what == "disk-bench":
            mode = args[1]
            bs = int(args[2], 0) if len(args) > 2 else 65536
            total = int(args[3], 0) if len(args) > 3 else 4 << 20
            depth = int(args[4], 0) if len(args) > 4 else None
            return "\n".join(wl.throughput(disk, mode, bs, total, depth=depth)[1]) + "\n"
        if what == "disk-copy":
            return f"copied {wl.copy_disk(disk, disks[int(args[1], 0)])} bytes\n"
        off, length = int(args[1], 0), int(args[2], 0)
        seed = int(args[3], 0) if len(args) > 3 else 1
        try:
            if what == "disk-read":
                start, end = off & ~511, (off + length + 511) & ~511
                data = disk.read(start, end - start)[off - start:off - start + length]
                return "\n".join(wl.hexdump(data, off)) + "\n"
            if what == "disk-write":
                disk.write(off, wl.pattern(off, length, seed))
                return f"wrote {length} bytes at {off:#x}\n"
            if what == "disk-verify":
                ok = disk.read(off, length) == wl.pattern(off, length, seed)
                return f"verify {off:#x}+{length:#x}: {'OK' if ok else 'MISMATCH'}\n"
            if what == "disk-test":
                _, lines = wl.pattern_test(disk, off, length, seed)
                return "\n".join(lines) + "\n"
        except vb.GuestIOError as e:
            return f"guest I/O error: {e}\n"
        raise ValueError(usage)

    def cmd_quit(self, args: list[str]) -> str:
        self.machine.quit_requested.set()
        return ""


def device_help(driver: Optional[str]) -> str:
    """``-device help`` (all pluggable devices) or ``-device NAME,help`` (its properties)."""
    from .qom import object_class_by_name, object_class_get_list, default_registry
    if driver is None:
        out = []
        classes = sorted(object_class_get_list("device"), key=lambda k: k.name.lower())
        for i, cat in enumerate(DEVICE_CATEGORIES):
            lines = []
            for k in classes:
                if getattr(k, "user_creatable", False) and getattr(k, "category", "misc") == cat:
                    desc = getattr(k, "desc", "")
                    lines.append(f'name "{k.name}", bus {getattr(k, "bus_type", None) or "System"}'
                                 + (f', desc "{desc}"' if desc else ""))
            if lines:  # QEMU puts a blank line before every category but the first one it knows
                out.append(f"{chr(10) if i else ''}{DEVICE_CATEGORIES[cat]} devices:")
                out.extend(lines)
        return "\n".join(out) + "\n"
    if not default_registry.exists(driver) or not object_class_by_name(driver).is_a("device"):
        raise EmuError(f"Device '{driver}' not found")
    return properties_help(driver, skip=("realized",))


def run_stdio(mon: HumanMonitor, stdin: TextIO, stdout: TextIO) -> None:
    """The ``-monitor stdio`` loop: prompt, read a line, print the output, until quit or EOF."""
    stdout.write("qcowpy emu monitor - type 'help' for more information\n")
    while not mon.machine.quit_requested.is_set():
        stdout.write("(qemu) ")
        stdout.flush()
        line = stdin.readline()
        if not line:
            mon.machine.quit_requested.set()
            break
        out = mon.execute(line.strip())
        stdout.write(out)
        stdout.flush()
