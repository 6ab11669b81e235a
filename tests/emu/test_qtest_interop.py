"""The guest code over real qtest sockets: our emulator as a subprocess, and QEMU as the oracle.

The QEMU tests need ``qemu-system-x86_64`` (Debian's qemu-system-x86); they skip without it
unless QCOWPY_REQUIRE_QEMU is set, in which case they fail.
"""
from __future__ import annotations

import json
import socket
import time

import pytest

from qcowpy.emu.guest.firmware import pci_boot
from qcowpy.emu.guest.pci import GuestPCIBus
from qcowpy.emu.guest.qtest import QTestError, SocketQTest, launch_emu, launch_qemu, serve_in_thread
from qcowpy.emu.guest.workloads import a3dev_mmio_test, a3dev_pmio_test, edu_test
from qcowpy.emu.machine import create_machine
from qcowpy.emu.pci import regs

from .conftest import require_qemu

EDU = regs.devfn(4, 0)


def test_socket_server_in_thread(tmp_path):
    m = create_machine("mini-pc", "16M")
    m.device_add("a3dev-pci")
    client = SocketQTest(str(tmp_path / "q.sock"))
    serve_in_thread(m, client)
    try:
        pci_boot(client, m.ram_size)
        ok, lines = a3dev_pmio_test(client)
        assert ok, lines
        assert client.command("endianness") == "little"
        with pytest.raises(QTestError, match="Unknown command 'frobnicate'"):
            client.command("frobnicate")
        client.memwrite(0x1000, b"\x01\x02\x03")
        assert client.memread(0x1000, 4) == b"\x01\x02\x03\x00"
        assert client.clock_step(5) == 5
    finally:
        client.close()


def _qmp(path: str, *commands: dict) -> list:
    deadline = time.time() + 10
    while True:
        try:
            s = socket.socket(socket.AF_UNIX)
            s.connect(path)
            break
        except OSError:
            if time.time() > deadline:
                raise
            time.sleep(0.05)
    f = s.makefile("rwb")
    f.readline()
    out = []
    for cmd in ({"execute": "qmp_capabilities"},) + commands:
        f.write(json.dumps(cmd).encode() + b"\n")
        f.flush()
        while True:
            resp = json.loads(f.readline())
            if "event" not in resp:
                break
        out.append(resp)
    s.close()
    return out[1:]


def test_emulator_subprocess_with_qtest_and_qmp():
    with launch_emu(["-M", "mini-pc", "-device", "a3dev-pci,id=a3", "-device", "edu,addr=04.0"]) as emu:
        boot = pci_boot(emu.qtest)
        assert len(boot.devices) == 3
        for prog in (a3dev_pmio_test, a3dev_mmio_test, edu_test):
            ok, lines = prog(emu.qtest)
            assert ok, lines
        (pci,) = _qmp(emu.qmp_path, {"execute": "query-pci"})
        assert [d["qdev_id"] for d in pci["return"][0]["devices"]] == ["", "a3", ""]
    assert emu.proc.wait(timeout=10) is not None


# -- QEMU as the oracle ---------------------------------------------------------------------------

def _edu_probe(qts) -> dict:
    """What a guest observes of the edu function at 00:04.0 (before and after firmware)."""
    bus = GuestPCIBus(qts)
    seen: dict = {"config": bus.config_space(EDU)}
    dev = [d for d in bus.scan() if d.devfn == EDU][0]
    seen["bars"] = [(b.index, b.is_io, b.is_64, b.prefetch, b.size) for b in dev.size_bars()]
    seen["caps"] = dev.capabilities()
    pci_boot(qts)
    base = dev.size_bars()[0].address
    seen["config_after_boot"] = bus.config_space(EDU)
    ops = []
    for name, off in (("readl", 0), ("readb", 0), ("readw", 0), ("readq", 0), ("readl", 1), ("readl", 2),
                      ("readl", 0x100), ("readq", 0x80), ("readl", 0x24), ("readq", 4)):
        ops.append((name, off, getattr(qts, name)(base + off)))
    qts.writel(base + 4, 0x12345678)
    qts.writeb(base + 4, 0)          # rejected: leaves the liveness register alone
    qts.writel(base + 8, 12)
    for _ in range(10_000):  # QEMU computes in a thread: wait for status bit 0 like a real driver
        if not qts.readl(base + 0x20) & 1:
            break
    ops += [("live", qts.readl(base + 4)), ("fact", qts.readl(base + 8)), ("status", qts.readl(base + 0x20))]
    qts.writel(base + 0x60, 0x101)
    ops += [("irq", qts.readl(base + 0x24)), ("intx", bus.config_readw(EDU, regs.STATUS))]
    qts.writel(base + 0x64, 0x100)
    ops += [("irq", qts.readl(base + 0x24)), ("intx", bus.config_readw(EDU, regs.STATUS))]
    qts.writel(base + 0x64, 0x1)
    ops += [("irq", qts.readl(base + 0x24)), ("intx", bus.config_readw(EDU, regs.STATUS))]
    qts.writeq(base + 0x80, 0x1_0000_0042)
    qts.writel(base + 0x88, 0xAABBCCDD)
    ops += [("dma", qts.readq(base + 0x80), qts.readl(base + 0x84), qts.readq(base + 0x88))]
    bus.config_writel(EDU, 0, 0xFFFFFFFF)
    for off in range(0x04, 0x100, 4):
        if off in (0x10,):
            continue
        bus.config_writel(EDU, off, 0xFFFFFFFF)
    seen["config_all_ones"] = bus.config_space(EDU)
    seen["ops"] = ops
    return seen


def test_edu_matches_qemu():
    require_qemu()
    with launch_qemu(["-m", "128M", "-device", "edu,addr=04.0"]) as q:
        theirs = _edu_probe(q.qtest)
        (info,) = _qmp(q.qmp_path, {"execute": "human-monitor-command", "arguments": {"command-line": "info pci"}})
    with launch_emu(["-m", "128M", "-device", "edu,addr=04.0"]) as e:
        ours = _edu_probe(e.qtest)
        (our_info,) = _qmp(e.qmp_path, {"execute": "human-monitor-command", "arguments": {"command-line": "info pci"}})
    for key in ("config", "bars", "caps", "config_after_boot", "ops", "config_all_ones"):
        assert ours[key] == theirs[key], key
    assert theirs["caps"] == [(0x40, regs.CAP_ID_MSI)]

    def block(text: str) -> str:
        start = text.index("  Bus  0, device   4, function 0:")
        end = text.find("  Bus", start + 5)
        return text[start:end if end > 0 else None]
    assert block(our_info["return"]) == block(info["return"])
    assert "BAR0: 32 bit memory at 0xc0000000 [0xc00fffff]." in block(info["return"])


def test_edu_guest_program_runs_on_qemu():
    require_qemu()
    with launch_qemu(["-device", "edu,addr=04.0"]) as q:
        pci_boot(q.qtest)
        ok, lines = edu_test(q.qtest)
    assert ok, lines
    assert "edu: DMA skipped (this qtest endpoint cannot step the virtual clock)" in lines


def test_qemu_machine_help_layout_matches_ours():
    """Our -machine help uses QEMU's layout: header, name padded to 20 columns, description, markers."""
    import re
    import subprocess
    from qcowpy.emu.machine import machine_help
    binary = require_qemu()
    theirs = subprocess.run([binary, "-machine", "help"], capture_output=True, text=True, check=True).stdout
    ours = machine_help()
    line = re.compile(r"^(?P<name>\S{1,20}) {1,20}(?P<desc>\S.*?)(?P<alias> \(alias of \S+\))?(?P<dflt> \(default\))?$")
    for text in (theirs, ours):
        lines = text.splitlines()
        assert lines[0] == "Supported machines are:"
        for entry in lines[1:]:
            m = line.match(entry)
            assert m, entry
            if len(m["name"]) < 20:
                assert entry[21 - 1] == " " and entry[21] != " ", entry
        assert sum(1 for entry in lines if entry.endswith(" (default)")) == 1
