"""Guest programs: the tutorial's port-I/O and MMIO tests for a3dev-pci, and an edu exerciser.

Each returns ``(ok, lines)``: whether every check passed, and the program's output.
"""
from __future__ import annotations

from ..pci import regs
from .pci import Bar, GuestPCIBus, GuestPCIDevice
from .qtest import QTest, QTestError

A3DEV_ID = (0x1234, 0x1919)
EDU_ID = (0x1234, 0x11E8)
NUM_DWORDS = 64


def _pattern(i: int) -> int:
    return (0xA3D0_0000 | (i << 8) | (0xFF - i)) & 0xFFFFFFFF


def _find(qts: QTest, ident: tuple[int, int]) -> GuestPCIDevice:
    dev = GuestPCIBus(qts).find(*ident)
    if dev is None:
        raise LookupError(f"no PCI device {ident[0]:04x}:{ident[1]:04x} (did you add it with -device?)")
    return dev


def _buffer_test(bar: Bar, label: str) -> tuple[bool, list[str]]:
    kind = "I/O ports" if bar.info.is_io else "MMIO"
    lines = [f"{label} test: BAR{bar.info.index} ({kind}) at {bar.base:#x}, size {bar.info.size}"]
    if bar.base == 0:
        return False, lines + [f"{label} test: BAR{bar.info.index} is not assigned (run the firmware first)"]
    for i in range(NUM_DWORDS):
        bar.writel(4 * i, _pattern(i))
    lines.append(f"{label} test: wrote {NUM_DWORDS} dwords")
    bad = 0
    for i in range(NUM_DWORDS):
        got = bar.readl(4 * i)
        if got != _pattern(i):
            bad += 1
            lines.append(f"{label} test: dword {i} at +{4 * i:#04x}: wrote {_pattern(i):#010x}, read {got:#010x}")
    lines.append(f"{label} test: read back {NUM_DWORDS} dwords, {NUM_DWORDS - bad} match, {bad} differ")
    ok = bad == 0
    lines.append(f"{label} test: {'PASS' if ok else 'FAIL'}")
    return ok, lines


def a3dev_pmio_test(qts: QTest) -> tuple[bool, list[str]]:
    """Write 64 dwords through BAR1 (port I/O), read them back."""
    dev = _find(qts, A3DEV_ID)
    return _buffer_test(dev.bar(1), "PMIO")


def a3dev_mmio_test(qts: QTest) -> tuple[bool, list[str]]:
    """Write 64 dwords through BAR0 (MMIO), read them back."""
    dev = _find(qts, A3DEV_ID)
    return _buffer_test(dev.bar(0), "MMIO")


def edu_test(qts: QTest, with_dma: bool = True) -> tuple[bool, list[str]]:
    """Identification, liveness, factorial, interrupt raise/ack and (if the clock can be stepped) DMA."""
    dev = _find(qts, EDU_ID)
    bar = dev.bar(0)
    lines, ok = [], True

    def check(what: str, got: int, want: int) -> None:
        nonlocal ok
        good = got == want
        ok &= good
        lines.append(f"edu: {what}: {got:#x} {'ok' if good else f'FAIL (want {want:#x})'}")

    ident = bar.readl(0x00)
    check("identification", ident, 0x010000ED)
    bar.writel(0x04, 0x12345678)
    check("liveness (inverse of 0x12345678)", bar.readl(0x04), 0xEDCBA987)
    bar.writel(0x08, 10)
    while bar.readl(0x20) & 1:
        pass
    check("factorial of 10", bar.readl(0x08), 3628800)
    bar.writel(0x60, 0x1234)
    check("interrupt status after raise", bar.readl(0x24), 0x1234)
    check("PCI status INTx bit while raised", dev.readw(regs.STATUS) & regs.STATUS_INTERRUPT, regs.STATUS_INTERRUPT)
    bar.writel(0x64, 0x1234)
    check("interrupt status after ack", bar.readl(0x24), 0)
    check("PCI status INTx bit after ack", dev.readw(regs.STATUS) & regs.STATUS_INTERRUPT, 0)
    if with_dma:
        src, back = 0x10_0000, 0x20_0000
        data = bytes(range(256)) * 2
        qts.memwrite(src, data)
        for reg, val in ((0x80, src), (0x88, 0x40000), (0x90, len(data)), (0x98, 1)):
            bar.write(reg, val, 8)
        try:
            qts.clock_step(200_000_000)
        except QTestError:
            lines.append("edu: DMA skipped (this qtest endpoint cannot step the virtual clock)")
            return ok, lines + [f"edu test: {'PASS' if ok else 'FAIL'}"]
        check("DMA RAM->device done (cmd)", bar.read(0x98, 8) & 1, 0)
        for reg, val in ((0x80, 0x40000), (0x88, back), (0x90, len(data)), (0x98, 3 | 4)):
            bar.write(reg, val, 8)
        qts.clock_step(200_000_000)
        got = qts.memread(back, len(data))
        check("DMA device->RAM bytes equal", int(got == data), 1)
        check("DMA interrupt status", bar.readl(0x24), 0x100)
        bar.writel(0x64, 0x100)
    lines.append(f"edu test: {'PASS' if ok else 'FAIL'}")
    return ok, lines
