"""The teaching devices through their BARs, after the firmware assigned them."""
from __future__ import annotations

import pytest

from qcowpy.emu.guest.firmware import pci_boot, pci_rescan
from qcowpy.emu.guest.pci import GuestPCIBus
from qcowpy.emu.guest.workloads import a3dev_mmio_test, a3dev_pmio_test, edu_test
from qcowpy.emu.pci import regs
from qcowpy.emu.pci.msi import msi_enabled


@pytest.fixture
def booted(machine, qts):
    machine.device_add("a3dev-pci", id="a3")
    machine.device_add("edu", id="edu")
    res = pci_boot(qts, machine.ram_size)
    return machine, qts, res


def test_rescan_after_hotplug_keeps_running_devices(booted):
    """A function plugged after boot gets resources after everything assigned; unplugged ones are
    forgotten; devices already running keep their BARs."""
    m, qts, res = booted
    before = {fd.dev.bdf: [(b.index, b.address) for b in fd.bars] for fd in res.devices}
    a3 = res.find(0x1234, 0x1919)
    m.device_add("a3dev-pci", id="hot")
    added, removed = pci_rescan(qts, res)
    assert removed == [] and [(fd.dev.vendor_id, fd.dev.device_id) for fd in added] == [(0x1234, 0x1919)]
    new = added[0]
    assigned = [b.address for fd in res.devices if fd is not new for b in fd.bars if not b.is_io]
    assert all(b.address > max(assigned) for b in new.bars if not b.is_io)
    assert {fd.dev.bdf: [(b.index, b.address) for b in fd.bars] for fd in res.devices if fd is not new} == before
    hot = m.find_device("hot")
    assert [r.addr for r in hot.io_regions[:2]] == [b.address for b in new.bars]
    assert new.dev.readw(regs.COMMAND) & (regs.COMMAND_IO | regs.COMMAND_MEMORY) == regs.COMMAND_IO | regs.COMMAND_MEMORY
    assert a3dev_pmio_test(qts)[0]  # the first a3dev still works
    m.device_del("hot")
    added, removed = pci_rescan(qts, res)
    assert added == [] and removed == [new] and new not in res.devices
    assert pci_rescan(qts, res) == ([], []) and res.log[-1] == "PCI: no changes on bus 0"
    assert a3 in res.devices


def test_firmware_assigns_enables_and_logs(booted):
    m, qts, res = booted
    a3 = res.find(0x1234, 0x1919)
    assert [(b.index, b.is_io, b.size) for b in a3.bars] == [(0, False, 256), (1, True, 256)]
    edu = res.find(0x1234, 0x11E8)
    assert edu.bars[0].size == 1 << 20 and edu.bars[0].address % (1 << 20) == 0
    assert edu.irq == 10  # slot 2, INTA -> PIRQ (2 - 1 + 0) & 3 = 1 -> IRQ 10 (links A-D: 10, 10, 11, 11)
    dev = m.find_device("a3")
    assert dev.io_regions[0].addr == a3.bars[0].address and dev.io_regions[1].addr == a3.bars[1].address
    assert dev.get_word(regs.COMMAND) & 7 == 7
    assert "PCI: 00:01.0 BAR1 io         at 0x0000c000 size 0x100" in res.log
    assert res.log[-1] == "PCI: 3 function(s) on bus 0"


@pytest.mark.parametrize("size", [1, 2, 4, 8])
def test_a3dev_accesses_of_every_size_copy_the_buffer(booted, size):
    m, qts, res = booted
    base = res.find(0x1234, 0x1919).bars[0].address
    a3 = m.find_device("a3")
    value = int.from_bytes(bytes(range(0xA0, 0xA0 + size)), "little")
    for off in (0, 7, 256 - size):  # aligned, unaligned, last fitting offset
        getattr(qts, "write" + "bwlq"[size.bit_length() - 1])(base + off, value)
        assert a3.buf[off:off + size] == bytes(range(0xA0, 0xA0 + size))
        assert getattr(qts, "read" + "bwlq"[size.bit_length() - 1])(base + off) == value


def test_a3dev_out_of_range_reads_all_ones_and_writes_nothing(booted):
    m, qts, res = booted
    a3 = m.find_device("a3")
    from qcowpy.emu.hw.a3dev import a3dev_read, a3dev_write
    a3.buf[:] = bytes(range(256))
    assert a3dev_read(a3, 0xFD, 4) == 0xFFFFFFFF
    assert a3dev_read(a3, 0x100, 1) == 0xFF
    a3dev_write(a3, 0xFE, 0x12345678, 4)
    assert a3.buf == bytearray(range(256))
    # through the bus: the piece past the BAR end is unassigned space
    base = res.find(0x1234, 0x1919).bars[0].address
    assert qts.readl(base + 0xFE) == 0xFFFF_FFFE


def test_a3dev_port_io_buffer_is_shared_with_mmio(booted):
    m, qts, res = booted
    dev = res.find(0x1234, 0x1919)
    qts.outl(dev.bars[1].address + 0x10, 0xCAFEF00D)
    assert qts.readl(dev.bars[0].address + 0x10) == 0xCAFEF00D
    assert qts.inb(dev.bars[1].address + 0x13) == 0xCA


def test_tutorial_workloads_pass(booted):
    _, qts, _ = booted
    for prog in (a3dev_pmio_test, a3dev_mmio_test):
        ok, lines = prog(qts)
        assert ok, lines
        assert lines[-1].endswith("PASS") and "64 match, 0 differ" in lines[-2]


def test_edu_register_semantics(booted):
    m, qts, res = booted
    b = res.find(0x1234, 0x11E8).bars[0].address
    assert qts.readl(b) == 0x010000ED
    assert qts.readb(b) == 0 and qts.readw(b) == 0        # rejected by valid.min 4 (read as 0, like QEMU)
    assert qts.readq(b) == 2**64 - 1                     # 8-byte access below 0x80: edu returns ~0
    assert qts.readl(b + 0x100) == 0xFFFFFFFF             # unknown register
    qts.writel(b + 4, 0)
    assert qts.readl(b + 4) == 0xFFFFFFFF
    qts.writel(b + 8, 13)
    assert qts.readl(b + 8) == (6227020800 & 0xFFFFFFFF)  # 13! wraps in 32 bits
    assert qts.readl(b + 0x20) & 1 == 0
    qts.writeq(b + 0x80, 0x1_2345_6789)
    assert qts.readq(b + 0x80) == 0x1_2345_6789 and qts.readl(b + 0x80) == 0x2345_6789


def test_edu_interrupts_intx_and_factorial_irq(booted):
    m, qts, res = booted
    b = res.find(0x1234, 0x11E8).bars[0].address
    qts.irq_intercept_in("ioapic")
    qts.writel(b + 0x20, 0x80)      # raise FACT_IRQ when done
    qts.writel(b + 8, 3)
    assert qts.readl(b + 0x24) == 1 and m.irq_levels[10] and qts.get_irq(10)
    qts.writel(b + 0x60, 0x10)
    qts.writel(b + 0x64, 0x1)
    assert qts.readl(b + 0x24) == 0x10 and m.irq_levels[10]
    qts.writel(b + 0x64, 0x10)
    assert not m.irq_levels[10] and not qts.get_irq(10)


def test_edu_msi(booted):
    m, qts, res = booted
    edu = m.find_device("edu")
    bus = GuestPCIBus(qts)
    devfn = edu.devfn
    cap = edu.msi_cap
    assert cap == 0x40
    bus.config_writel(devfn, cap + 4, 0xFEE00000)
    bus.config_writel(devfn, cap + 8, 0)
    bus.config_writew(devfn, cap + 12, 0x4041)
    bus.config_writew(devfn, cap + 2, bus.config_readw(devfn, cap + 2) | 1)
    assert msi_enabled(edu)
    b = res.find(0x1234, 0x11E8).bars[0].address
    qts.writel(b + 0x60, 1)
    assert m.msi_log == [(0xFEE00000, 0x4041)] and not m.irq_levels[10]
    # QSIZE beyond the single supported vector is clamped
    bus.config_writew(devfn, cap + 2, 0x71)
    assert bus.config_readw(devfn, cap + 2) == 0x81


def test_edu_dma_waits_for_the_virtual_clock(booted):
    m, qts, res = booted
    b = res.find(0x1234, 0x11E8).bars[0].address
    qts.memwrite(0x3000, b"hello edu")
    qts.writeq(b + 0x80, 0x3000)
    qts.writeq(b + 0x88, 0x40010)
    qts.writeq(b + 0x90, 9)
    qts.writeq(b + 0x98, 1)
    assert qts.readq(b + 0x98) == 1
    qts.writeq(b + 0x90, 100)  # ignored while RUN is set
    assert qts.readq(b + 0x90) == 9
    qts.clock_step(99_000_000)
    assert qts.readq(b + 0x98) == 1
    qts.clock_step(1_000_000)
    assert qts.readq(b + 0x98) == 0
    assert m.find_device("edu").dma_buf[0x10:0x19] == b"hello edu"


def test_edu_dma_mask_and_bad_range(booted):
    m, qts, res = booted
    edu = m.find_device("edu")
    b = res.find(0x1234, 0x11E8).bars[0].address
    edu.dma_buf[0:4] = b"MASK"
    for reg, v in ((0x80, 0x40000), (0x88, 0x1000_5000), (0x90, 4), (0x98, 3)):
        qts.writeq(b + reg, v)
    qts.clock_step()
    assert qts.memread(0x5000, 4) == b"MASK"  # 0x10005000 clamped by the 28-bit mask
    for reg, v in ((0x80, 0x40FFE), (0x88, 0x6000), (0x90, 4), (0x98, 3)):
        qts.writeq(b + reg, v)
    qts.clock_step()
    assert qts.memread(0x6000, 4) == b"\0\0\0\0" and edu.guest_errors


def test_edu_workload(booted):
    ok, lines = edu_test(booted[1])
    assert ok, lines
