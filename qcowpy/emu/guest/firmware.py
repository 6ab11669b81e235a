"""A BIOS-like PCI boot: enumerate bus 0, size and assign BARs, route INTx, enable decoding.

The allocation follows what SeaBIOS does on a PC: I/O BARs from 0xC000, memory BARs (64-bit ones
too, while they fit) from the start of the 32-bit PCI hole at 0xC0000000, largest first so every
BAR is naturally aligned. The log reads like a firmware boot log.
"""
from __future__ import annotations

from dataclasses import dataclass, field

from ..pci import regs
from .pci import BarInfo, GuestPCIBus, GuestPCIDevice
from .qtest import QTest

IO_BASE, IO_LIMIT = 0xC000, 0x10000
MEM_BASE, MEM_LIMIT = 0xC000_0000, 0xFEC0_0000
PIRQ_TO_IRQ = (10, 10, 11, 11)


@dataclass
class FoundDevice:
    dev: GuestPCIDevice
    bars: list[BarInfo]
    irq: int = 0


@dataclass
class BootResult:
    devices: list[FoundDevice] = field(default_factory=list)
    log: list[str] = field(default_factory=list)
    io_next: int = IO_BASE     # where the next I/O / memory BAR would go (kept for hot-plug rescans)
    mem_next: int = MEM_BASE

    def find(self, vendor: int, device: int) -> FoundDevice:
        for d in self.devices:
            if d.dev.vendor_id == vendor and d.dev.device_id == device:
                return d
        raise LookupError(f"no PCI device {vendor:04x}:{device:04x}")


def _align(v: int, a: int) -> int:
    return (v + a - 1) & ~(a - 1)


def pci_boot(qts: QTest, ram_size: int = 0) -> BootResult:
    """Run the PCI part of a firmware boot and return what it found and logged."""
    res = BootResult()
    res.log.append("qcowpy firmware: PCI enumeration")
    if ram_size:
        res.log.append(f"RAM: {ram_size >> 20} MiB")
    _configure(res, GuestPCIBus(qts).scan())
    res.log.append(f"PCI: {len(res.devices)} function(s) on bus 0")
    return res


def pci_rescan(qts: QTest, res: BootResult) -> tuple[list[FoundDevice], list[FoundDevice]]:
    """After hot-plug: configure functions that appeared since ``res`` (placing their BARs after
    everything assigned so far, so running devices keep theirs) and forget the ones that left,
    as an OS's PCI rescan does. Returns (added, removed); ``res`` is updated and its log extended."""
    present = {d.devfn: d for d in GuestPCIBus(qts).scan()}
    removed = [fd for fd in res.devices if present.get(fd.dev.devfn) is None
               or present[fd.dev.devfn].vendor_id != fd.dev.vendor_id
               or present[fd.dev.devfn].device_id != fd.dev.device_id]
    for fd in removed:
        res.devices.remove(fd)
        res.log.append(f"PCI: {fd.dev.bdf} [{fd.dev.vendor_id:04x}:{fd.dev.device_id:04x}] removed")
    known = {fd.dev.devfn for fd in res.devices}
    n = len(res.devices)
    _configure(res, [d for devfn, d in sorted(present.items()) if devfn not in known])
    added = res.devices[n:]
    if not added and not removed:
        res.log.append("PCI: no changes on bus 0")
    return added, removed


def _configure(res: BootResult, devices: list[GuestPCIDevice]) -> None:
    """Size, assign (largest first, from ``res.io_next``/``res.mem_next``), route and enable."""
    out = res.log.append
    found = []
    for dev in devices:
        out(f"PCI: {dev.bdf} [{dev.vendor_id:04x}:{dev.device_id:04x}] class {dev.class_code:04x}")
        found.append(FoundDevice(dev, dev.size_bars()))
    res.devices += found
    requests = [(fd, b) for fd in found for b in fd.bars]
    for fd, b in sorted(requests, key=lambda r: -r[1].size):
        off = regs.BASE_ADDRESS_0 + 4 * b.index
        if b.is_io:
            base = _align(res.io_next, max(b.size, 4))
            if base + b.size > IO_LIMIT:
                out(f"PCI: {fd.dev.bdf} BAR{b.index}: no I/O space left for {b.size:#x} bytes")
                continue
            res.io_next = base + b.size
            fd.dev.writel(off, base)
        else:
            base = _align(res.mem_next, max(b.size, 16))
            if base + b.size > MEM_LIMIT:
                out(f"PCI: {fd.dev.bdf} BAR{b.index}: no memory space left for {b.size:#x} bytes")
                continue
            res.mem_next = base + b.size
            fd.dev.writel(off, base & 0xFFFFFFFF)
            if b.is_64:
                fd.dev.writel(off + 4, base >> 32)
        b.address = base
    for fd in found:
        dev = fd.dev
        for b in sorted(fd.bars, key=lambda b: b.index):
            kind = "io" if b.is_io else ("mem64" if b.is_64 else "mem32") + ("-pref" if b.prefetch else "")
            out(f"PCI: {dev.bdf} BAR{b.index} {kind:<10} at {b.address:#010x} size {b.size:#x}")
        pin = dev.readb(regs.INTERRUPT_PIN)
        if pin:
            fd.irq = PIRQ_TO_IRQ[(dev.slot - 1 + pin - 1) & 3]
            dev.writeb(regs.INTERRUPT_LINE, fd.irq)
            out(f"PCI: {dev.bdf} INT{chr(ord('A') + pin - 1)} -> IRQ {fd.irq}")
        cmd = dev.readw(regs.COMMAND)
        if any(b.is_io for b in fd.bars):
            cmd |= regs.COMMAND_IO
        if any(not b.is_io for b in fd.bars):
            cmd |= regs.COMMAND_MEMORY
        if fd.bars:
            cmd |= regs.COMMAND_MASTER
        dev.writew(regs.COMMAND, cmd)
