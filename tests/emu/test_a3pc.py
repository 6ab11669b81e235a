"""Accelerators as QOM types and the tutorial's a3-pc machine with its PCIe host bridge."""
from __future__ import annotations

import io

import pytest

import qcowpy

from qcowpy.emu.accel import (TYPE_ACCEL, AccelOpt, accel_class_name, accel_find, configure_accelerators,
                              parse_accel_opt)
from qcowpy.emu.cli import main
from qcowpy.emu.errors import EmuError
from qcowpy.emu.guest.firmware import pci_boot
from qcowpy.emu.guest.pci import GuestPCIBus
from qcowpy.emu.guest.qtest import InProcessQTest, launch_emu
from qcowpy.emu.guest.system import boot
from qcowpy.emu.guest.workloads import a3dev_mmio_test, a3dev_pmio_test, edu_test
from qcowpy.emu.hw.a3pc import INTX_WARNING
from qcowpy.emu.machine import ECAM_BASE, create_machine
from qcowpy.emu.monitor import HumanMonitor
from qcowpy.emu.qom import object_class_by_name, object_class_get_list

INTX = "warning: " + INTX_WARNING


def run(*argv: str, stdin_text: str = "") -> tuple[int, str, str]:
    out, err = io.StringIO(), io.StringIO()
    rc = main(list(argv), stdin=io.StringIO(stdin_text), stdout=out, stderr=err)
    return rc, out.getvalue(), err.getvalue()


# -- accelerators -----------------------------------------------------------------------------

def test_accelerators_are_qom_types():
    names = [c.name for c in object_class_get_list(TYPE_ACCEL)]
    assert names == ["a3acl-accel", "qtest-accel"] and accel_class_name("a3acl") == "a3acl-accel"
    assert accel_find("qtest").name_ == "QTest" and accel_find("a3acl").opt_name == "a3acl"
    assert accel_find("tcg") is None and accel_find("") is None
    assert object_class_by_name("a3acl-accel").is_a("accel")


def test_default_accelerator_comes_from_the_machine_class():
    m = create_machine("mini-pc", "16M")
    assert m.accelerator.typename == "qtest-accel" and m.compat_props == []
    a3 = create_machine("a3-pc", "16M")  # default_machine_opts = "accel=a3acl"
    assert a3.accelerator.typename == "a3acl-accel" and accel_find("a3acl").allowed
    assert create_machine("a3-pc", "16M", machine_accel="qtest").accelerator.typename == "qtest-accel"
    assert create_machine("mini-pc", "16M", accel=["a3acl"]).accelerator.typename == "a3acl-accel"


def _disk(m, path: str, props: dict[str, str]):
    qcowpy.create(path, 1 << 20)
    drive = m.drive_add(spec=f"file={path},format=qcow2,if=none")
    return m.device_add("virtio-blk-pci", {"drive": drive.id, **props})


def test_compat_props_reach_devices_created_afterwards(tmp_path):
    a3 = create_machine("a3-pc", "16M")
    assert _disk(a3, str(tmp_path / "a.qcow2"), {}).queue_size == 128  # a3acl's compat property
    assert _disk(a3, str(tmp_path / "b.qcow2"), {"queue-size": "64"}).queue_size == 64  # the user's value wins
    mini = create_machine("mini-pc", "16M")
    assert _disk(mini, str(tmp_path / "c.qcow2"), {}).queue_size == 256
    a3.shutdown()
    mini.shutdown()


def test_accelerator_selection_follows_qemu():
    warned: list[str] = []
    m = create_machine("mini-pc", "16M", machine_accel="foo:a3acl", warn_sink=warned.append)
    assert m.accelerator.typename == "a3acl-accel"
    assert warned == ["invalid accelerator foo", "falling back to a3acl"]
    quiet: list[str] = []  # with a qtest chardev QEMU does not say it fell back
    create_machine("mini-pc", "16M", machine_accel="foo:qtest", warn_sink=quiet.append, qtest_chardev=True)
    assert quiet == ["invalid accelerator foo"]
    with pytest.raises(EmuError, match="^$"):  # reasons already reported: QEMU just exits 1
        create_machine("none", accel=["a3acl"])
    with pytest.raises(EmuError, match="incompatible"):
        create_machine("a3-pc", accel=["qtest"])  # a3-pc's default accel= counts, as in QEMU
    with pytest.raises(EmuError, match=r"^-accel qtest,x=1: Property 'qtest-accel.x' not found$"):
        create_machine("mini-pc", accel=["qtest,x=1"])
    # accelerator properties are set before init_machine runs (QEMU's accelerator_set_property)
    m = create_machine("none", "1M", accel=["a3acl,pci-only=off"])
    assert m.accelerator.get_property("pci-only") is False and m.accelerator.typename == "a3acl-accel"
    with pytest.raises(EmuError, match="^-accel a3acl,pci-only=maybe: Parameter 'pci-only' expects 'on' or 'off'$"):
        create_machine("none", accel=["a3acl,pci-only=maybe"])
    assert parse_accel_opt("accel=a3acl,x=1") == AccelOpt("a3acl", {"x": "1"}, "accel=a3acl,x=1")
    with pytest.raises(EmuError, match="^no accelerator found$"):  # an empty -machine accel= list
        configure_accelerators(create_machine("mini-pc"), [], "", warned.append)


def test_cli_accel_errors_are_one_line_and_exit_1():
    assert run("-M", "none", "-accel", "a3acl") == (1, "", "qcowpy emu: failed to initialize a3acl: No such device\n")
    assert run("-accel", "foo") == (1, "", "qcowpy emu: -accel foo: invalid accelerator foo\n")
    rc, out, err = run("-accel", "foo", "-accel", "qtest", "-S")
    assert (rc, out) == (0, "") and err.splitlines() == ["qcowpy emu: -accel foo: invalid accelerator foo",
                                                         "qcowpy emu: falling back to QTest"]


# -- the a3-pc machine --------------------------------------------------------------------------

@pytest.fixture
def a3pc():
    m = create_machine("a3-pc", "64M")
    m.device_add("a3dev-pci", id="a3")
    m.creation_done()
    return m


def test_root_bus_is_pcie_and_named_a3_pcie0(a3pc):
    bus = a3pc.pci_bus
    assert (bus.name, bus.typename, bus.is_express) == ("a3-pcie0", "PCIE", True) and bus.is_a("PCI")
    assert a3pc.pci_host.typename == "a3-pc-pcie-host"
    assert a3pc.child("pcihost").child("a3-pcie0") is bus
    # ECAM: bus 0, device 1 is the a3dev (1234:1919); an empty slot reads all-ones
    assert a3pc.memory.load(ECAM_BASE + (1 << 15), 4) == 0x1919_1234
    assert a3pc.memory.load(ECAM_BASE + (5 << 15), 4) == 0xFFFF_FFFF
    a3pc.io.store(0xCF8, 0x8000_0800, 4)  # and CF8/CFC, as on q35
    assert a3pc.io.load(0xCFC, 4) == 0x1919_1234


def test_init_done_notifiers_run_once_after_all_devices():
    seen: list[int] = []
    rc, out, err = run("-M", "a3-pc", "-device", "a3dev-pci", "-device", "edu", "-S")
    assert rc == 0 and err == "qcowpy emu: A3-PC: machine init done, 3 function(s) on a3-pcie0\n"
    m = create_machine("a3-pc", "16M")
    m.add_init_done_notifier(lambda mm: seen.append(len(mm.devices())))
    m.device_add("a3dev-pci")
    assert seen == [] and not m.ready
    m.creation_done()
    m.creation_done()
    assert seen == [2] and m.warnings == ["A3-PC: machine init done, 2 function(s) on a3-pcie0"]
    m.add_init_done_notifier(lambda mm: seen.append(-1))  # too late: runs at once
    assert seen == [2, -1]


def test_intx_warns_instead_of_routing_and_msi_x_still_works(tmp_path):
    m = create_machine("a3-pc", "64M")
    m.device_add("edu", {"addr": "04.0"})
    qts = InProcessQTest(m)
    pci_boot(qts, m.ram_size)
    ok, lines = edu_test(qts, with_dma=False)  # its raise/ack drives INTx
    assert ok, lines
    assert m.warnings.count(INTX) >= 2 and not any(m.irq_levels)
    # MSI is delivered: program edu's capability, raise, and the message reaches the MSI window
    edu = m.find_device("/machine/peripheral-anon/device[0]")
    bus, cap, warned = GuestPCIBus(qts), edu.msi_cap, len(m.warnings)
    bus.config_writel(edu.devfn, cap + 4, 0xFEE00000)
    bus.config_writew(edu.devfn, cap + 12, 0x4041)
    bus.config_writew(edu.devfn, cap + 2, bus.config_readw(edu.devfn, cap + 2) | 1)
    qts.writel(0xC0000000 + 0x60, 1)
    assert m.msi_log == [(0xFEE00000, 0x4041)] and len(m.warnings) == warned
    img = str(tmp_path / "d.qcow2")
    qcowpy.create(img, 1 << 20)
    m2 = create_machine("a3-pc", "64M")
    m2.drive_add(img, format="qcow2")
    _, disks, log = boot(m2)
    disk = disks[0]
    assert disk.msix_queue is not None  # the board says INTx is not routed: the guest takes MSI-X
    disk.write(0, b"\xa3" * 4096)
    assert disk.vdev.msix_fired(disk.msix_queue)  # the completion arrived as an MSI-X message
    assert disk.read(0, 4096) == b"\xa3" * 4096
    assert INTX not in m2.warnings
    m2.shutdown()


def test_monitor_shows_the_device_on_a3_pcie0(a3pc):
    mon = HumanMonitor(a3pc)
    qtree = mon.execute("info qtree")
    assert ('  dev: a3-pc-pcie-host, id ""\n    bus: a3-pcie0\n      type PCIE\n'
            '      dev: a3dev-pci, id "a3"\n        addr = 01.0\n') in qtree
    assert '      dev: mini-host-bridge, id ""\n        addr = 00.0\n' in qtree
    mon.execute("guest boot")
    assert "    Class 0255: PCI device 1234:1919\n" in mon.execute("info pci")
    mtree = mon.execute("info mtree")
    assert ("    0000000000000000-ffffffffffffffff (prio -1, i/o): a3-pc-pcie-mmio\n"
            "      00000000c0000000-00000000c00000ff (prio 1, i/o): a3dev-mmio\n") in mtree
    assert ("    0000000000000000-000000000000ffff (prio -1, i/o): a3-pc-pcie-ioport\n"
            "      000000000000c000-000000000000c0ff (prio 1, i/o): a3dev-pmio\n") in mtree
    assert "    00000000b0000000-00000000bfffffff (prio 0, i/o): pcie-mmcfg-mmio\n" in mtree
    assert mon.execute("guest pmio-test").endswith("PMIO test: PASS\n")
    assert mon.execute("guest mmio-test").endswith("MMIO test: PASS\n")


def test_qtest_client_drives_a3dev_on_a3_pc():
    with launch_emu(["-M", "a3-pc", "-device", "a3dev-pci,id=a3"]) as emu:
        found = pci_boot(emu.qtest)
        assert [(d.dev.vendor_id, d.dev.device_id) for d in found.devices] == [(0x1B36, 0x0008), (0x1234, 0x1919)]
        for prog in (a3dev_pmio_test, a3dev_mmio_test):
            ok, lines = prog(emu.qtest)
            assert ok, lines


def test_existing_boards_are_kept():
    assert create_machine("a3-board").pci_bus.name == "pci.0"
    assert create_machine().klass.machine_name == "mini-pc"
