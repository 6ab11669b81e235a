"""Guest-side PCI (libqos's qpci, in Python): config access via 0xCF8/0xCFC, BAR handles, lspci.

Everything goes through a :class:`~qcowpy.emu.guest.qtest.QTest`, so it works the same on this
emulator and on QEMU.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

from ..pci import regs
from .qtest import QTest

CONFIG_ADDRESS = 0xCF8
CONFIG_DATA = 0xCFC


class GuestPCIBus:
    """Configuration mechanism #1 from the guest's side."""

    def __init__(self, qts: QTest, bus: int = 0) -> None:
        self.qts = qts
        self.bus = bus

    def _select(self, devfn: int, off: int) -> None:
        self.qts.outl(CONFIG_ADDRESS, 0x80000000 | (self.bus << 16) | (devfn << 8) | (off & 0xFC))

    def config_readb(self, devfn: int, off: int) -> int:
        self._select(devfn, off)
        return self.qts.inb(CONFIG_DATA + (off & 3))

    def config_readw(self, devfn: int, off: int) -> int:
        self._select(devfn, off)
        return self.qts.inw(CONFIG_DATA + (off & 2))

    def config_readl(self, devfn: int, off: int) -> int:
        self._select(devfn, off)
        return self.qts.inl(CONFIG_DATA)

    def config_writeb(self, devfn: int, off: int, v: int) -> None:
        self._select(devfn, off)
        self.qts.outb(CONFIG_DATA + (off & 3), v)

    def config_writew(self, devfn: int, off: int, v: int) -> None:
        self._select(devfn, off)
        self.qts.outw(CONFIG_DATA + (off & 2), v)

    def config_writel(self, devfn: int, off: int, v: int) -> None:
        self._select(devfn, off)
        self.qts.outl(CONFIG_DATA, v)

    def config_space(self, devfn: int, size: int = 256) -> bytes:
        return b"".join(self.config_readl(devfn, o).to_bytes(4, "little") for o in range(0, size, 4))

    def present(self, devfn: int) -> bool:
        return self.config_readw(devfn, regs.VENDOR_ID) != 0xFFFF

    def scan(self) -> list["GuestPCIDevice"]:
        """Every present function, honouring the multi-function bit of function 0."""
        found = []
        for slot in range(32):
            if not self.present(regs.devfn(slot, 0)):
                continue
            multi = self.config_readb(regs.devfn(slot, 0), regs.HEADER_TYPE) & 0x80
            for fn in range(8 if multi else 1):
                d = regs.devfn(slot, fn)
                if fn == 0 or self.present(d):
                    found.append(GuestPCIDevice(self, d))
        return found

    def find(self, vendor: int, device: int) -> Optional["GuestPCIDevice"]:
        for dev in self.scan():
            if dev.vendor_id == vendor and dev.device_id == device:
                return dev
        return None


@dataclass
class BarInfo:
    """What BAR sizing found: type, size and (after assignment) address."""

    index: int
    is_io: bool
    is_64: bool
    prefetch: bool
    size: int
    address: int = 0


class GuestPCIDevice:
    """One function as the guest sees it."""

    def __init__(self, bus: GuestPCIBus, devfn: int) -> None:
        self.bus = bus
        self.devfn = devfn
        self.vendor_id = bus.config_readw(devfn, regs.VENDOR_ID)
        self.device_id = bus.config_readw(devfn, regs.DEVICE_ID)

    @property
    def slot(self) -> int:
        return self.devfn >> 3

    @property
    def function(self) -> int:
        return self.devfn & 7

    @property
    def bdf(self) -> str:
        return f"{self.bus.bus:02x}:{self.slot:02x}.{self.function}"

    def readb(self, off: int) -> int: return self.bus.config_readb(self.devfn, off)
    def readw(self, off: int) -> int: return self.bus.config_readw(self.devfn, off)
    def readl(self, off: int) -> int: return self.bus.config_readl(self.devfn, off)
    def writeb(self, off: int, v: int) -> None: self.bus.config_writeb(self.devfn, off, v)
    def writew(self, off: int, v: int) -> None: self.bus.config_writew(self.devfn, off, v)
    def writel(self, off: int, v: int) -> None: self.bus.config_writel(self.devfn, off, v)

    @property
    def class_code(self) -> int:
        return self.readw(regs.CLASS_DEVICE)

    @property
    def revision(self) -> int:
        return self.readb(regs.REVISION_ID)

    def size_bars(self) -> list[BarInfo]:
        """The BAR sizing protocol: write all-ones, read the mask back, restore."""
        bars, i = [], 0
        cmd = self.readw(regs.COMMAND)
        self.writew(regs.COMMAND, cmd & ~(regs.COMMAND_IO | regs.COMMAND_MEMORY))
        while i < 6:
            off = regs.BASE_ADDRESS_0 + 4 * i
            orig = self.readl(off)
            self.writel(off, 0xFFFFFFFF)
            mask = self.readl(off)
            self.writel(off, orig)
            if mask == 0:
                i += 1
                continue
            if mask & regs.BASE_ADDRESS_SPACE_IO:
                size = (~(mask & 0xFFFFFFFC) + 1) & 0xFFFFFFFF
                if not mask & 0xFFFF0000:  # a 16-bit I/O decoder
                    size &= 0xFFFF
                bars.append(BarInfo(i, True, False, False, size, orig & 0xFFFFFFFC))
                i += 1
                continue
            is_64 = bool(mask & regs.BASE_ADDRESS_MEM_TYPE_64)
            full = mask & 0xFFFFFFF0
            addr = orig & 0xFFFFFFF0
            if is_64:
                hi_orig = self.readl(off + 4)
                self.writel(off + 4, 0xFFFFFFFF)
                hi = self.readl(off + 4)
                self.writel(off + 4, hi_orig)
                full |= hi << 32
                addr |= hi_orig << 32
                size = (~full + 1) & (2**64 - 1)
            else:
                size = (~full + 1) & 0xFFFFFFFF
            bars.append(BarInfo(i, False, is_64, bool(mask & regs.BASE_ADDRESS_MEM_PREFETCH), size, addr))
            i += 2 if is_64 else 1
        self.writew(regs.COMMAND, cmd)
        return bars

    def capabilities(self) -> list[tuple[int, int]]:
        """(offset, id) of each capability in list order; stops on loops."""
        if not self.readw(regs.STATUS) & regs.STATUS_CAP_LIST:
            return []
        out, seen = [], set()
        off = self.readb(regs.CAPABILITY_LIST) & ~3
        while off and off not in seen and len(out) < 48:
            seen.add(off)
            out.append((off, self.readb(off)))
            off = self.readb(off + 1) & ~3
        return out

    def find_capability(self, cap_id: int) -> int:
        """Offset of the first capability with ``cap_id``, or 0."""
        return next((off for off, cid in self.capabilities() if cid == cap_id), 0)

    def enable(self) -> None:
        """Turn on I/O and memory decoding and bus mastering (libqos ``qpci_device_enable``)."""
        self.writew(regs.COMMAND, self.readw(regs.COMMAND) | regs.COMMAND_IO | regs.COMMAND_MEMORY
                    | regs.COMMAND_MASTER)

    def bar(self, index: int) -> "Bar":
        for b in self.size_bars():
            if b.index == index:
                return Bar(self.bus.qts, b)
        raise KeyError(f"{self.bdf} has no BAR{index}")


class Bar:
    """Accessors for one assigned BAR: ports for I/O BARs, MMIO for memory BARs."""

    def __init__(self, qts: QTest, info: BarInfo) -> None:
        self.qts = qts
        self.info = info

    @property
    def base(self) -> int:
        return self.info.address

    def read(self, off: int, size: int) -> int:
        a = self.base + off
        if self.info.is_io:
            return {1: self.qts.inb, 2: self.qts.inw, 4: self.qts.inl}[size](a)
        return {1: self.qts.readb, 2: self.qts.readw, 4: self.qts.readl, 8: self.qts.readq}[size](a)

    def write(self, off: int, v: int, size: int) -> None:
        a = self.base + off
        if self.info.is_io:
            {1: self.qts.outb, 2: self.qts.outw, 4: self.qts.outl}[size](a, v)
        else:
            {1: self.qts.writeb, 2: self.qts.writew, 4: self.qts.writel, 8: self.qts.writeq}[size](a, v)

    def readl(self, off: int) -> int: return self.read(off, 4)
    def writel(self, off: int, v: int) -> None: self.write(off, v, 4)


class GuestMSIX:
    """A function's MSI-X capability as a driver programs it (libqos ``qpci_msix_*``).

    The table and PBA are reached through the BARs the capability names, so the BARs must be
    assigned (and memory decoding on) before use."""

    def __init__(self, dev: GuestPCIDevice) -> None:
        self.dev = dev
        self.cap = dev.find_capability(regs.CAP_ID_MSIX)
        if not self.cap:
            raise LookupError(f"{dev.bdf} has no MSI-X capability")
        self.table_size = (dev.readw(self.cap + regs.MSIX_FLAGS) & regs.MSIX_FLAGS_QSIZE) + 1
        table = dev.readl(self.cap + regs.MSIX_TABLE)
        pba = dev.readl(self.cap + regs.MSIX_PBA)
        bars = {b.index: b for b in dev.size_bars()}
        self.table = Bar(dev.bus.qts, bars[table & regs.MSIX_BIR_MASK])
        self.table_off = table & ~regs.MSIX_BIR_MASK
        self.pba = Bar(dev.bus.qts, bars[pba & regs.MSIX_BIR_MASK])
        self.pba_off = pba & ~regs.MSIX_BIR_MASK

    @property
    def control(self) -> int:
        return self.dev.readw(self.cap + regs.MSIX_FLAGS)

    def _set_control(self, bit: int, on: bool) -> None:
        ctl = self.control
        self.dev.writew(self.cap + regs.MSIX_FLAGS, (ctl | bit) if on else (ctl & ~bit))

    def enable(self, on: bool = True) -> None:
        self._set_control(regs.MSIX_FLAGS_ENABLE, on)

    def mask_function(self, on: bool = True) -> None:
        self._set_control(regs.MSIX_FLAGS_MASKALL, on)

    @property
    def enabled(self) -> bool:
        return bool(self.control & regs.MSIX_FLAGS_ENABLE)

    def entry(self, vector: int) -> int:
        """Offset of a table entry inside the table's BAR."""
        if not 0 <= vector < self.table_size:
            raise IndexError(f"MSI-X vector {vector} out of range (table size {self.table_size})")
        return self.table_off + regs.MSIX_ENTRY_SIZE * vector

    def program(self, vector: int, address: int, data: int, masked: bool = False) -> None:
        """Write an entry's message address and data, then set or clear its mask bit."""
        off = self.entry(vector)
        self.table.writel(off + regs.MSIX_ENTRY_LOWER_ADDR, address & 0xFFFFFFFF)
        self.table.writel(off + regs.MSIX_ENTRY_UPPER_ADDR, address >> 32)
        self.table.writel(off + regs.MSIX_ENTRY_DATA, data)
        self.mask(vector, masked)

    def mask(self, vector: int, on: bool = True) -> None:
        off = self.entry(vector) + regs.MSIX_ENTRY_VECTOR_CTRL
        ctrl = self.table.readl(off)
        self.table.writel(off, (ctrl | regs.MSIX_ENTRY_CTRL_MASKBIT) if on else (ctrl & ~regs.MSIX_ENTRY_CTRL_MASKBIT))

    def masked(self, vector: int) -> bool:
        """Masked by its own bit or by the function mask (libqos ``qpci_msix_masked``)."""
        ctrl = self.table.readl(self.entry(vector) + regs.MSIX_ENTRY_VECTOR_CTRL)
        return bool(ctrl & regs.MSIX_ENTRY_CTRL_MASKBIT) or bool(self.control & regs.MSIX_FLAGS_MASKALL)

    def pending(self, vector: int) -> bool:
        self.entry(vector)
        word = self.pba.readl(self.pba_off + 4 * (vector // 32))
        return bool(word >> (vector % 32) & 1)


def lspci(bus: GuestPCIBus, verbose: bool = False) -> list[str]:
    """An ``lspci -nn``-like listing (with BARs and capabilities when ``verbose``)."""
    lines = []
    for dev in bus.scan():
        cls = dev.class_code
        name = regs.CLASS_NAMES.get(cls, "Unclassified device")
        rev = dev.revision
        line = f"{dev.bdf} {name} [{cls:04x}]: Device [{dev.vendor_id:04x}:{dev.device_id:04x}]"
        if rev:
            line += f" (rev {rev:02x})"
        lines.append(line)
        if verbose:
            sub = (dev.readw(regs.SUBSYSTEM_VENDOR_ID), dev.readw(regs.SUBSYSTEM_ID))
            lines.append(f"\tSubsystem: Device [{sub[0]:04x}:{sub[1]:04x}]")
            pin = dev.readb(regs.INTERRUPT_PIN)
            if pin:
                lines.append(f"\tInterrupt: pin {chr(ord('A') + pin - 1)} routed to IRQ {dev.readb(regs.INTERRUPT_LINE)}")
            for b in dev.size_bars():
                if b.is_io:
                    lines.append(f"\tRegion {b.index}: I/O ports at {b.address:04x} [size={_human(b.size)}]")
                else:
                    kind = "64-bit" if b.is_64 else "32-bit"
                    pf = "prefetchable" if b.prefetch else "non-prefetchable"
                    lines.append(f"\tRegion {b.index}: Memory at {b.address:08x} ({kind}, {pf}) [size={_human(b.size)}]")
            for off, cid in dev.capabilities():
                lines.append(f"\tCapabilities: [{off:02x}] {_CAP_NAMES.get(cid, f'#{cid:02x}')}")
    return lines


_CAP_NAMES = {regs.CAP_ID_PM: "Power Management", regs.CAP_ID_MSI: "MSI", regs.CAP_ID_VNDR: "Vendor Specific",
              regs.CAP_ID_EXP: "Express", regs.CAP_ID_MSIX: "MSI-X"}


def _human(n: int) -> str:
    for unit, shift in (("G", 30), ("M", 20), ("K", 10)):
        if n >= 1 << shift and n % (1 << shift) == 0:
            return f"{n >> shift}{unit}"
    return str(n)
