"""``qcowpy emu``: build a machine from QEMU-style options and run its monitor, QMP and qtest servers.

The click CLI passes its arguments through to :func:`main`. Option spellings follow QEMU:
``-M/-machine``, ``-m``, ``-device`` (repeatable), ``-monitor stdio``, ``-qmp unix:PATH,server,wait=off``,
``-qtest unix:PATH``, ``-S``, ``-accel NAME[,prop=value]`` (repeatable; ``-machine TYPE,accel=A:B``
is the other spelling); ``-nodefaults`` and ``-display none`` are accepted and ignored. Help
requests print what QEMU 7.2 prints and exit 0: ``-machine ?``/``help`` and ``-accel ?``/``help``
as soon as they are met, ``-device ?``/``help``/``DRIVER,?`` after all options are read. Without
``-S`` or ``-qtest`` the firmware runs first and prints its boot log. With no monitor, QMP or
qtest the program exits after the boot.
"""
from __future__ import annotations

import argparse
import signal
import sys
import threading
from typing import Optional, TextIO

from .errors import EmuError
from qcowpy.errors import QcowError


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="qcowpy emu", add_help=False, allow_abbrev=False,
                                description="A small PCI machine emulator with QEMU's options.")
    p.add_argument("-h", "-help", "--help", action="store_true", dest="help")
    p.add_argument("-version", "--version", action="store_true")
    p.add_argument("-M", "-machine", dest="machine")
    p.add_argument("-m", dest="memory")
    p.add_argument("-device", action="append", default=[])
    p.add_argument("-drive", action="append", default=[])
    p.add_argument("-monitor", action="append", default=[])
    p.add_argument("-qmp", action="append", default=[])
    p.add_argument("-qtest")
    p.add_argument("-S", action="store_true", dest="stopped")
    p.add_argument("-nodefaults", action="store_true")
    p.add_argument("-display")
    p.add_argument("-accel", action="append", default=[])
    p.add_argument("-name")
    p.add_argument("-qtest-log")
    return p


USAGE = """usage: qcowpy emu [options]
  -M|-machine NAME[,accel=A[:B]][,help]   machine type (-machine help lists them)
  -accel NAME[,prop=value]  accelerator (-accel help lists them; qtest is always there)
  -m SIZE                   RAM size (default unit MiB; suffixes k, M, G)
  -device DRIVER[,prop=value][,id=ID]   add a device (-device help, -device DRIVER,help)
  -drive file=PATH[,format=qcow2|raw][,if=virtio|none][,id=ID][,readonly=on][,serial=S]
                            open an image; if=virtio (default) adds a virtio-blk-pci for it,
                            if=none waits for -device virtio-blk-pci,drive=ID
  -monitor stdio|none       human monitor on stdin/stdout
  -qmp unix:PATH,server[=on][,wait=off]  QMP server on a unix socket
  -qtest unix:PATH          connect to a qtest client listening on PATH
  -S                        do not run the firmware at start
  -nodefaults, -display none, -name N   accepted for QEMU compatibility
"""


def is_help_option(value: str) -> bool:
    """QEMU's ``is_help_option``: ``?`` and ``help`` both ask for help."""
    return value in ("?", "help")


def _early_help(argv: list[str]) -> Optional[str]:
    """The first ``-machine`` or ``-accel`` help request in ``argv``, answered in QEMU's words
    (QEMU answers those while it parses options, before anything else is checked)."""
    from .accel import accel_help, parse_accel_opt
    from .machine import find_machine_class, machine_class_help, machine_help
    for opt, value in zip(argv, argv[1:]):
        if opt in ("-M", "-machine", "--machine"):
            parts = value.split(",")
            if any(is_help_option(p) for p in parts):
                mtype = parts[0][5:] if parts[0].startswith("type=") else parts[0]
                if mtype and not is_help_option(mtype) and "=" not in mtype:
                    try:
                        return machine_class_help(find_machine_class(mtype))
                    except EmuError:
                        pass
                return machine_help()
        elif opt in ("-accel", "--accel"):
            name = parse_accel_opt(value).name
            if not name or is_help_option(name):
                return accel_help()
    return None


def _machine_opts(spec: Optional[str]) -> tuple[Optional[str], Optional[str]]:
    """(type, accel) of ``-machine [type=]TYPE[,accel=A[:B]][,...]``."""
    if not spec:
        return None, None
    name: Optional[str] = None
    accel = None
    for i, part in enumerate(spec.split(",")):
        key, sep, value = part.partition("=")
        if i == 0 and not sep:
            name = key
        elif key == "type":
            name = value
        elif key == "accel":
            accel = value
    return name, accel


def _qmp_path(spec: str) -> str:
    if not spec.startswith("unix:"):
        raise EmuError(f"-qmp {spec}: only unix:PATH sockets are supported")
    path, *opts = spec[len("unix:"):].split(",")
    for o in opts:
        key = o.partition("=")[0]
        if key not in ("server", "wait", "nowait"):
            raise EmuError(f"-qmp: unsupported option '{o}'")
    return path


def main(argv: list[str], stdin: Optional[TextIO] = None, stdout: Optional[TextIO] = None,
         stderr: Optional[TextIO] = None, owns_process: bool = False) -> int:
    """Run ``qcowpy emu`` with ``argv`` (without the program name); returns the exit status.
    ``owns_process``: the caller exits right after, so SIGTERM is left ignored, not restored."""
    stdin = stdin or sys.stdin
    stdout = stdout or sys.stdout
    stderr = stderr or sys.stderr
    try:
        args = _parser().parse_args(argv)
    except SystemExit as e:
        return int(e.code or 1)
    if args.help:
        stdout.write(USAGE)
        return 0
    from .monitor import VERSION, HumanMonitor, device_help, parse_device_spec, run_stdio
    if args.version:
        stdout.write(f"qcowpy emu version {VERSION}\n")
        return 0
    try:
        from .machine import create_machine
        early = _early_help(argv)
        if early is not None:
            stdout.write(early)
            return 0
        machine_name, machine_accel = _machine_opts(args.machine)
        for spec in args.device:
            driver, props, _ = parse_device_spec(spec)
            if is_help_option(driver) or "help" in props:
                try:
                    stdout.write(device_help(None if is_help_option(driver) else driver))
                except EmuError as e:  # QEMU 7.2 reports this and still exits 0
                    stderr.write(f"qcowpy emu: -device {spec}: {e}\n")
                return 0

        def warn(msg: str) -> None:
            stderr.write(f"qcowpy emu: {msg}\n")
            stderr.flush()
        machine = create_machine(machine_name, args.memory, args.accel, machine_accel, warn,
                                 qtest_chardev=bool(args.qtest))
        try:
            for spec in args.drive:
                machine.drive_add(spec=spec)
            for spec in args.device:
                driver, props, dev_id = parse_device_spec(spec)
                machine.device_add(driver, props, dev_id)
            machine.creation_done()
        except BaseException:
            machine.shutdown()
            raise
        monitor_stdio = "stdio" in args.monitor
        for mon in args.monitor:
            if mon not in ("stdio", "none"):
                raise EmuError(f"-monitor {mon}: only 'stdio' and 'none' are supported")
        if not args.stopped and not args.qtest:
            out = HumanMonitor(machine).execute("guest boot")
            stdout.write(out)
            stdout.flush()
        prev_term = None  # installed before any client can connect and send us work
        if threading.current_thread() is threading.main_thread():
            # SIGTERM quits cleanly: the drives are flushed and closed below
            prev_term = signal.signal(signal.SIGTERM, lambda *_: machine.quit_requested.set())
        servers = []
        try:
            from .qmp import QMPServer
            for spec in args.qmp:
                servers.append(QMPServer(machine, _qmp_path(spec)).start())
            qtest_thread = None
            if args.qtest:
                if not args.qtest.startswith("unix:"):
                    raise EmuError(f"-qtest {args.qtest}: only unix:PATH is supported")
                from .qtest import serve_unix_client

                def qtest_main() -> None:
                    try:
                        serve_unix_client(machine, args.qtest[len("unix:"):].split(",")[0])
                    except OSError as e:
                        stderr.write(f"qcowpy emu: -qtest: {e}\n")
                    machine.quit_requested.set()
                qtest_thread = threading.Thread(target=qtest_main, name="qtest", daemon=True)
                qtest_thread.start()
            if monitor_stdio:
                mon_thread = threading.Thread(target=run_stdio, args=(HumanMonitor(machine), stdin, stdout),
                                              name="monitor", daemon=True)
                mon_thread.start()
            if monitor_stdio or servers or qtest_thread is not None:
                while not machine.quit_requested.wait(0.5):
                    pass
        except KeyboardInterrupt:
            pass
        finally:
            for s in servers:
                s.close()
            try:
                machine.shutdown()
            finally:
                # only now: a SIGTERM that lands while the drives are flushed must not kill us;
                # a process that exits next keeps ignoring it (QEMU exits 0 on SIGTERM)
                if prev_term is not None:
                    signal.signal(signal.SIGTERM, signal.SIG_IGN if owns_process else prev_term)
        return 0
    except QcowError as e:
        if str(e):  # an empty one: the reasons were printed as they happened
            stderr.write(f"qcowpy emu: {e}\n")
        return 1


def entry(argv: list[str]) -> int:
    """``main`` as a process's whole job (``python -m qcowpy.emu.cli``, ``qcowpy emu``)."""
    return main(argv, owns_process=True)


if __name__ == "__main__":
    sys.exit(entry(sys.argv[1:]))
