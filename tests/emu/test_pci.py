"""PCI config space semantics through the guest's view (CF8/CFC and ECAM)."""
from __future__ import annotations

from typing import Any

import pytest

from qcowpy.emu.errors import DeviceError, EmuError
from qcowpy.emu.guest.pci import GuestPCIBus
from qcowpy.emu.machine import ECAM_BASE, create_machine
from qcowpy.emu.memory import MemoryRegion
from qcowpy.emu.pci import regs
from qcowpy.emu.pci.device import TYPE_PCI_DEVICE, PCIDevice
from qcowpy.emu.pci.info import format_info_pci, query_pci
from qcowpy.emu.qom import TypeInfo, type_register_once

TEST_DEV = "qcowpy-test-bars"


def _realize(d: PCIDevice) -> None:
    d.config[regs.INTERRUPT_PIN] = 2  # INTB
    d.r64 = MemoryRegion.ram_region(d, "test-64", 0x4000)
    d.r_io = MemoryRegion.ram_region(d, "test-io", 0x20)
    d.register_bar(0, regs.BASE_ADDRESS_MEM_TYPE_64 | regs.BASE_ADDRESS_MEM_PREFETCH, d.r64)
    d.register_bar(2, regs.BASE_ADDRESS_SPACE_IO, d.r_io)
    d.add_capability(regs.CAP_ID_VNDR, 0, 8)
    d.add_capability(regs.CAP_ID_PM, 0x60, 8)


def _class_init(k: Any, _data: Any) -> None:
    k.realize, k.vendor_id, k.device_id, k.class_id, k.revision = _realize, 0x1B36, 0x7777, 0x0580, 3


type_register_once(TypeInfo(TEST_DEV, parent=TYPE_PCI_DEVICE, class_init=_class_init))


@pytest.fixture
def m():
    mach = create_machine("mini-pc", "16M")
    mach.device_add(TEST_DEV, {"addr": "04.0"}, id="t")
    mach.device_add("a3dev-pci", {"addr": "05.0"}, id="a3")
    return mach


@pytest.fixture
def bus(m):
    from qcowpy.emu.guest.qtest import InProcessQTest
    return GuestPCIBus(InProcessQTest(m))


T, A3 = regs.devfn(4, 0), regs.devfn(5, 0)


def test_identity_and_default_header(bus):
    cfg = bus.config_space(A3)
    assert cfg[0:4] == bytes.fromhex("34121919")
    assert cfg[regs.REVISION_ID] == 0x81
    assert cfg[0x09:0x0C] == bytes([0x00, 0xFF, 0x00])  # prog-if 0, class word 0x00ff
    assert cfg[regs.HEADER_TYPE] == 0
    assert cfg[0x2C:0x30] == bytes.fromhex("f41a0011")  # subsystem 1af4:1100, QEMU's default
    assert cfg[regs.COMMAND:regs.COMMAND + 4] == bytes(4)
    assert cfg[0x10:0x18] == bytes.fromhex("0000000001000000")  # BAR0 memory, BAR1 I/O type bit


def test_read_only_fields_ignore_writes(bus):
    for off in (regs.VENDOR_ID, regs.COMMAND, regs.REVISION_ID, regs.CACHE_LINE_SIZE, regs.SUBSYSTEM_VENDOR_ID,
                regs.CAPABILITY_LIST, regs.INTERRUPT_LINE):
        bus.config_writel(A3, off & ~3, 0xFFFFFFFF)
    cfg = bus.config_space(A3)
    assert cfg[0:4] == bytes.fromhex("34121919") and cfg[8] == 0x81 and cfg[0x2C:0x30] == bytes.fromhex("f41a0011")
    assert bus.config_readw(A3, regs.COMMAND) == 0x0507  # only IO|MEM|MASTER|SERR|INTX_DISABLE stick
    assert bus.config_readb(A3, regs.INTERRUPT_LINE) == 0xFF
    assert bus.config_readb(A3, regs.CACHE_LINE_SIZE) == 0xFF  # writable, as in QEMU
    assert bus.config_readb(A3, regs.LATENCY_TIMER) == 0


def test_status_bits_are_write_one_to_clear(m, bus):
    dev = m.find_device("a3")
    dev.set_word(regs.STATUS, 0xF900 | regs.STATUS_CAP_LIST)
    bus.config_writew(A3, regs.STATUS, regs.STATUS_REC_MASTER_ABORT | regs.STATUS_CAP_LIST)
    assert bus.config_readw(A3, regs.STATUS) == (0xF900 & ~regs.STATUS_REC_MASTER_ABORT) | regs.STATUS_CAP_LIST
    bus.config_writew(A3, regs.STATUS, 0)
    assert bus.config_readw(A3, regs.STATUS) == (0xF900 & ~regs.STATUS_REC_MASTER_ABORT) | regs.STATUS_CAP_LIST


def test_bar_sizing_protocol(bus):
    def probe(devfn, off):
        bus.config_writel(devfn, off, 0xFFFFFFFF)
        return bus.config_readl(devfn, off)
    assert probe(A3, 0x10) == 0xFFFFFF00          # 256-byte memory BAR
    assert probe(A3, 0x14) == 0xFFFFFF01          # 256-port I/O BAR
    assert probe(T, 0x10) == 0xFFFFC00C           # 16 KiB, 64-bit, prefetchable
    assert probe(T, 0x14) == 0xFFFFFFFF           # upper half of the 64-bit BAR
    assert probe(T, 0x18) == 0xFFFFFFE1           # 32-port I/O BAR
    assert probe(T, 0x1C) == 0 and probe(T, 0x20) == 0  # unimplemented BARs read 0
    dev = [d for d in bus.scan() if d.devfn == T][0]
    sized = {b.index: (b.is_io, b.is_64, b.prefetch, b.size) for b in dev.size_bars()}
    assert sized == {0: (False, True, True, 0x4000), 2: (True, False, False, 0x20)}


def test_bars_map_only_with_decode_enabled_and_follow_reprogramming(m, bus):
    mem, io = m.memory, m.io
    a3 = m.find_device("a3")
    a3.buf[0:4] = b"\x11\x22\x33\x44"
    bus.config_writel(A3, 0x10, 0xD0000000)
    bus.config_writel(A3, 0x14, 0xD000)
    assert mem.load(0xD0000000, 4) == 0xFFFFFFFF and io.load(0xD000, 1) == 0xFF  # decoding off
    bus.config_writew(A3, regs.COMMAND, regs.COMMAND_MEMORY)
    assert mem.load(0xD0000000, 4) == 0x44332211 and io.load(0xD000, 1) == 0xFF
    bus.config_writew(A3, regs.COMMAND, regs.COMMAND_MEMORY | regs.COMMAND_IO)
    assert io.load(0xD000, 2) == 0x2211
    bus.config_writel(A3, 0x10, 0xD0001000)  # move the BAR
    assert mem.load(0xD0000000, 4) == 0xFFFFFFFF and mem.load(0xD0001000, 4) == 0x44332211
    assert a3.io_regions[0].addr == 0xD0001000
    bus.config_writew(A3, regs.COMMAND, 0)
    assert mem.load(0xD0001000, 4) == 0xFFFFFFFF and a3.io_regions[0].addr == regs.BAR_UNMAPPED


def test_64bit_bar_above_4g(m, bus):
    bus.config_writel(T, 0x10, 0x0)
    bus.config_writel(T, 0x14, 0x80)
    bus.config_writew(T, regs.COMMAND, regs.COMMAND_MEMORY)
    t = m.find_device("t")
    assert t.io_regions[0].addr == 0x80_0000_0000
    t.r64.ram[0] = 0x5C
    assert m.memory.load(0x80_0000_0000, 1) == 0x5C


def test_zero_address_bar_is_not_mapped(m, bus):
    bus.config_writew(A3, regs.COMMAND, regs.COMMAND_MEMORY | regs.COMMAND_IO)
    assert m.find_device("a3").io_regions[0].addr == regs.BAR_UNMAPPED


def test_capability_list(bus):
    dev = [d for d in bus.scan() if d.devfn == T][0]
    assert bus.config_readw(T, regs.STATUS) & regs.STATUS_CAP_LIST
    # newest first, first-fit placement from 0x40 for the one without an explicit offset
    assert dev.capabilities() == [(0x60, regs.CAP_ID_PM), (0x40, regs.CAP_ID_VNDR)]
    bus.config_writel(T, 0x40, 0xFFFFFFFF)  # capability bytes are read-only by default
    assert bus.config_readb(T, 0x40) == regs.CAP_ID_VNDR
    bus.config_writel(T, 0x80, 0x12345678)  # the rest of the device-specific area is writable (QEMU)
    assert bus.config_readl(T, 0x80) == 0x12345678


def test_missing_functions_and_disabled_config_address_read_all_ones(m, bus):
    assert bus.config_readl(regs.devfn(9, 0), 0) == 0xFFFFFFFF
    m.io.store(0xCF8, 0x00000000 | (A3 << 8), 4)  # enable bit clear
    assert m.io.load(0xCFC, 4) == 0xFFFFFFFF
    m.io.store(0xCF8, 0x80000000 | (1 << 16) | (A3 << 8), 4)  # bus 1 does not exist
    assert m.io.load(0xCFC, 4) == 0xFFFFFFFF
    # byte and word reads of CONFIG_DATA pick lanes by port offset
    m.io.store(0xCF8, 0x80000000 | (A3 << 8), 4)
    assert m.io.load(0xCFE, 2) == 0x1919 and m.io.load(0xCFD, 1) == 0x12
    # only a 32-bit write latches CONFIG_ADDRESS
    m.io.store(0xCF8, 0x12, 1)
    assert m.io.load(0xCF8, 4) == 0x80000000 | (A3 << 8)


def test_ecam_matches_mechanism_1(m, bus):
    for devfn in (0, T, A3):
        for off in range(0, 0x40, 4):
            assert m.memory.load(ECAM_BASE + (devfn << 12) + off, 4) == bus.config_readl(devfn, off)
    m.memory.store(ECAM_BASE + (A3 << 12) + regs.INTERRUPT_LINE, 0x0B, 1)
    assert bus.config_readb(A3, regs.INTERRUPT_LINE) == 0x0B
    # conventional devices have no extended space; absent devices read all-ones
    assert m.memory.load(ECAM_BASE + (A3 << 12) + 0x100, 4) == 0xFFFFFFFF
    assert m.memory.load(ECAM_BASE + (regs.devfn(9, 0) << 12), 4) == 0xFFFFFFFF


def test_intx_routing_status_bit_and_disable(m, bus):
    t = m.find_device("t")  # slot 4, INTB -> PIRQ (4 - 1 + 1) & 3 = 0 -> IRQ 10
    t.set_irq(1)
    assert m.irq_levels[10] and bus.config_readw(T, regs.STATUS) & regs.STATUS_INTERRUPT
    bus.config_writew(T, regs.COMMAND, regs.COMMAND_INTX_DISABLE)
    assert not m.irq_levels[10]
    assert bus.config_readw(T, regs.STATUS) & regs.STATUS_INTERRUPT  # status still reports it
    bus.config_writew(T, regs.COMMAND, 0)
    assert m.irq_levels[10]
    t.set_irq(0)
    assert not m.irq_levels[10] and not bus.config_readw(T, regs.STATUS) & regs.STATUS_INTERRUPT


def test_shared_irq_line_stays_high_until_all_release(m):
    t = m.find_device("t")
    other = m.device_add(TEST_DEV, {"addr": "08.0"})  # (8 - 1 + 1) & 3 = 0 -> IRQ 10 as well
    t.set_irq(1)
    other.set_irq(1)
    t.set_irq(0)
    assert m.irq_levels[10]
    other.set_irq(0)
    assert not m.irq_levels[10]


def test_bus_master_gates_dma(m, bus):
    t = m.find_device("t")
    m.memory.write(0x1000, b"data")
    assert t.dma_read(0x1000, 4) == b"\xff" * 4
    t.dma_write(0x1000, b"XXXX")
    assert m.memory.read(0x1000, 4) == b"data"
    bus.config_writew(T, regs.COMMAND, regs.COMMAND_MASTER)
    assert t.dma_read(0x1000, 4) == b"data"
    t.dma_write(0x1000, b"DATA")
    assert m.memory.read(0x1000, 4) == b"DATA"


def test_reset_clears_command_bars_and_line(m, bus):
    bus.config_writel(A3, 0x10, 0xD0000000)
    bus.config_writeb(A3, regs.INTERRUPT_LINE, 5)
    bus.config_writew(A3, regs.COMMAND, regs.COMMAND_MEMORY)
    m.system_reset()
    assert bus.config_readl(A3, 0x10) == 0 and bus.config_readw(A3, regs.COMMAND) == 0
    assert bus.config_readb(A3, regs.INTERRUPT_LINE) == 0
    assert m.find_device("a3").io_regions[0].addr == regs.BAR_UNMAPPED


def test_slot_allocation_and_conflicts(m):
    d = m.device_add("a3dev-pci")
    assert d.devfn == regs.devfn(1, 0)
    with pytest.raises(DeviceError, match="slot 5 function 0 not available for a3dev-pci, in use by a3dev-pci"):
        m.device_add("a3dev-pci", {"addr": "05.0"})
    with pytest.raises(EmuError, match="Duplicate device ID"):
        m.device_add("a3dev-pci", id="a3")
    with pytest.raises(EmuError, match="not a valid device model"):
        m.device_add("nonexistent")
    with pytest.raises(EmuError, match="pluggable"):
        m.device_add("mini-host-bridge")


def test_multifunction_header_bit(m, bus):
    m.device_add("a3dev-pci", {"addr": "06.0", "multifunction": "on"})
    m.device_add("a3dev-pci", {"addr": "06.3"})
    assert bus.config_readb(regs.devfn(6, 0), regs.HEADER_TYPE) == 0x80
    assert [d.devfn for d in bus.scan() if d.slot == 6] == [regs.devfn(6, 0), regs.devfn(6, 3)]


def test_hot_unplug_unmaps(m, bus):
    bus.config_writel(A3, 0x10, 0xD0000000)
    bus.config_writew(A3, regs.COMMAND, regs.COMMAND_MEMORY)
    m.device_del("a3")
    assert m.memory.load(0xD0000000, 4) == 0xFFFFFFFF
    assert bus.config_readw(A3, 0) == 0xFFFF
    assert "a3dev-pci" not in [a.name for a in m.address_spaces]


def test_info_pci_and_query_pci(m, bus):
    bus.config_writel(A3, 0x10, 0xD0000000)
    bus.config_writel(A3, 0x14, 0xD000)
    bus.config_writew(A3, regs.COMMAND, regs.COMMAND_MEMORY | regs.COMMAND_IO)
    info = query_pci(m.pci_bus)
    a3 = [d for d in info[0]["devices"] if d["slot"] == 5][0]
    assert a3 == {"bus": 0, "slot": 5, "function": 0, "class_info": {"class": 0xFF},
                  "id": {"vendor": 0x1234, "device": 0x1919, "subsystem-vendor": 0x1AF4, "subsystem": 0x1100},
                  "irq_pin": 0, "qdev_id": "a3",
                  "regions": [{"bar": 0, "address": 0xD0000000, "size": 256, "type": "memory",
                               "prefetch": False, "mem_type_64": False},
                              {"bar": 1, "address": 0xD000, "size": 256, "type": "io"}]}
    text = format_info_pci(info)
    assert ("  Bus  0, device   5, function 0:\n"
            "    Class 0255: PCI device 1234:1919\n"
            "      PCI subsystem 1af4:1100\n"
            "      BAR0: 32 bit memory at 0xd0000000 [0xd00000ff].\n"
            "      BAR1: I/O at 0xd000 [0xd0ff].\n"
            "      id \"a3\"\n") in text
    assert ("    Memory controller: PCI device 1b36:7777\n"
            "      PCI subsystem 1af4:1100\n"
            "      IRQ 0, pin B\n"
            "      BAR0: 64 bit prefetchable memory at 0xffffffffffffffff [0x00003ffe].\n"
            "      BAR2: I/O at 0xffffffffffffffff [0x001e].\n") in text
