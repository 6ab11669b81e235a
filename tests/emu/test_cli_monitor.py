"""Machines, the CLI and the human monitor."""
from __future__ import annotations

import io
import re

import pytest

from qcowpy.emu.cli import main
from qcowpy.emu.errors import EmuError
from qcowpy.emu.machine import create_machine, machine_help
from qcowpy.emu.monitor import HumanMonitor, parse_device_spec


def run(argv, stdin_text=""):
    out, err = io.StringIO(), io.StringIO()
    rc = main(argv, stdin=io.StringIO(stdin_text), stdout=out, stderr=err)
    return rc, out.getvalue(), err.getvalue()


def test_machine_help_lists_like_qemu():
    rc, out, _ = run(["-machine", "help"])
    assert rc == 0 and out == machine_help()
    lines = out.splitlines()
    assert lines[0] == "Supported machines are:"
    assert re.fullmatch(r"mini-pc {14}\S.* \(default\)", lines[3])
    assert lines[1].startswith("a3-board             ") and lines[2].startswith("a3-pc                ")
    assert lines[4].startswith("none                 ")


def test_subclassed_machine_inherits_and_overrides():
    m = create_machine("a3-board")
    assert m.ram_size == 256 << 20 and m.is_a("mini-pc-machine")
    assert m.pci_bus.find(3 << 3).typename == "a3dev-pci"
    assert m.child("unattached").child("device[1]").typename == "a3dev-pci"
    with pytest.raises(EmuError, match="built in"):
        m.device_del("/machine/unattached/device[1]")


def test_none_machine_and_bad_options():
    m = create_machine("none", "1M")
    m.memory.store(0x10, 0xABCD, 2)
    assert m.memory.load(0x10, 2) == 0xABCD and m.pci_bus is None
    with pytest.raises(EmuError, match="No 'PCI' bus"):
        m.device_add("edu")
    with pytest.raises(EmuError, match="unsupported machine type"):
        create_machine("vax")
    with pytest.raises(EmuError, match="too large"):
        create_machine("mini-pc", "4G")
    with pytest.raises(EmuError, match="Invalid RAM size"):
        create_machine("mini-pc", "lots")


def test_device_help_and_device_property_help():
    rc, out, _ = run(["-device", "help"])
    assert rc == 0 and 'name "a3dev-pci", bus PCI' in out and 'name "edu", bus PCI' in out
    assert "mini-host-bridge" not in out  # not user-creatable
    rc, out, _ = run(["-device", "edu,help"])
    assert out.splitlines()[0] == "edu options:"
    assert re.search(r"^  addr=<int32> +- Slot and optional function number.*\(default: -1\)$", out, re.M)
    assert re.search(r"^  dma_mask=<uint64> .*\(default: 268435455\)$", out, re.M)


def test_parse_device_spec():
    assert parse_device_spec("a3dev-pci,addr=04.0,id=x,multifunction") == (
        "a3dev-pci", {"addr": "04.0", "multifunction": "on"}, "x")


def test_errors_exit_1_with_one_line():
    rc, _, err = run(["-device", "nosuch"])
    assert rc == 1 and err == "qcowpy emu: 'nosuch' is not a valid device model name\n"
    rc, _, err = run(["-device", "a3dev-pci,addr=zz"])
    assert rc == 1 and "Property 'addr' doesn't take value 'zz'" in err
    rc, _, err = run(["-M", "vax"])
    assert rc == 1 and "unsupported machine type" in err


def test_boot_without_monitor_prints_log_and_exits():
    rc, out, _ = run(["-device", "a3dev-pci"])
    assert rc == 0
    assert out.splitlines()[0] == "qcowpy firmware: PCI enumeration"
    assert "PCI: 00:01.0 [1234:1919] class 00ff" in out


def test_monitor_session_transcript():
    script = "info pci\nguest pmio-test\nguest mmio-test\ni /w 0xc000\nxp /2xw 0xc0000000\nquit\n"
    rc, out, _ = run(["-device", "a3dev-pci,id=a3", "-monitor", "stdio"], script)
    assert rc == 0
    assert "qcowpy emu monitor - type 'help' for more information\n(qemu) " in out
    assert "    Class 0255: PCI device 1234:1919\n" in out
    assert "      BAR1: I/O at 0xc000 [0xc0ff].\n      id \"a3\"\n" in out
    assert "PMIO test: read back 64 dwords, 64 match, 0 differ\nPMIO test: PASS\n" in out
    assert "MMIO test: PASS\n" in out
    assert "portl[0xc000] = 0xa3d000ff\n" in out
    assert "00000000c0000000: 0xa3d000ff 0xa3d001fe\n" in out


@pytest.fixture
def mon():
    m = create_machine("mini-pc", "16M")
    m.device_add("a3dev-pci", id="a3")
    h = HumanMonitor(m)
    h.execute("guest boot")
    return h


def test_monitor_port_and_memory_commands(mon):
    assert mon.execute("o /b 0xc005 0x7e") == ""
    assert mon.execute("i /b 0xc005") == "portb[0xc005] = 0x7e\n"
    assert mon.execute("i /h 0xc004") == "portw[0xc004] = 0x7e00\n"
    mon.execute("xpw /g 0xc0000010 0x1122334455667788")
    assert mon.execute("xp /2xg 0xc0000010") == "00000000c0000010: 0x1122334455667788 0x0000000000000000\n"
    assert mon.execute("xp /3xb 0xc0000010") == "00000000c0000010: 0x88 0x77 0x66\n"
    assert mon.execute("xp /1dw 0xc0000014") == "00000000c0000014: 287454020\n"
    assert mon.execute("bogus") == "unknown command: 'bogus'\n"


def test_monitor_info_commands(mon):
    mt = mon.execute("info mtree")
    assert "address-space: memory\n  0000000000000000-ffffffffffffffff (prio 0, i/o): system\n" in mt
    assert "      00000000c0000000-00000000c00000ff (prio 1, i/o): a3dev-mmio\n" in mt
    assert "    000000000000c000-000000000000c0ff (prio 1, i/o): a3dev-pmio\n" in mt
    flat = mon.execute("info mtree -f")
    assert "  00000000c0000000-00000000c00000ff (prio 1, i/o): a3dev-mmio\n" in flat
    qtree = mon.execute("info qtree")
    assert 'dev: a3dev-pci, id "a3"\n        addr = 01.0\n' in qtree
    assert "bar 1: i/o at 0xc000 [0xc0ff]" in qtree
    qom = mon.execute("info qom-tree")
    assert qom.splitlines()[0] == "/machine (mini-pc-machine)" and "    /a3 (a3dev-pci)" in qom
    assert mon.execute("qom-get /machine/peripheral/a3 realized") == "True\n"
    assert "addr (int32)\n" in mon.execute("qom-list /machine/peripheral/a3")
    assert "00:01.0 Unclassified device [00ff]: Device [1234:1919] (rev 81)" in mon.execute("guest lspci")


def test_monitor_device_add_del_and_reset(mon):
    assert mon.execute("device_add edu,id=e,addr=07.0") == ""
    assert "device   7, function 0:" in mon.execute("info pci")
    assert mon.execute("device_add edu,id=e") == "Error: Duplicate device ID 'e'\n"
    assert mon.execute("device_del e") == ""
    assert "device   7" not in mon.execute("info pci")
    assert mon.execute("device_del e") == "Error: Device 'e' not found\n"
    mon.execute("system_reset")
    assert "BAR0: 32 bit memory at 0xffffffffffffffff" in mon.execute("info pci")
    assert "PMIO test: BAR1 is not assigned" in mon.execute("guest pmio-test")
    mon.execute("guest boot")
    assert "PMIO test: PASS" in mon.execute("guest pmio-test")
