"""Guest-side virtio over PCI (libqos's virtio-pci-modern and virtqueue code, in Python).

Everything goes through a :class:`~qcowpy.emu.guest.qtest.QTest`: the driver finds the device
with PCI config cycles, walks its vendor capabilities, resets it, negotiates features, builds split
virtqueues in guest RAM (from a :class:`GuestAlloc`), submits chains and polls the used ring.

With ``via_pci_cfg=True`` the driver never touches the BAR: every register access (common and
device configuration, ISR, notifications) goes through the VIRTIO_PCI_CAP_PCI_CFG window in
configuration space, as SeaBIOS does when a BAR lies beyond its reach.

MSI-X is optional, as in libqos: :meth:`VirtioPCIGuest.enable_msix` turns it on, :meth:`msix_vector`
points a table entry at a word of guest RAM, ``msix_config`` / ``queue_msix_vector`` select the
entries, and :meth:`msix_fired` polls the word (or, while the vector is masked, its pending bit).
"""
from __future__ import annotations

import struct
from dataclasses import dataclass
from typing import Optional

from ..pci import regs
from .pci import BarInfo, GuestMSIX, GuestPCIDevice
from .qtest import QTest
from .ram import RamArea

VIRTIO_VENDOR = 0x1AF4
STATUS_ACKNOWLEDGE, STATUS_DRIVER, STATUS_DRIVER_OK, STATUS_FEATURES_OK = 1, 2, 4, 8
STATUS_NEEDS_RESET, STATUS_FAILED = 0x40, 0x80
CAP_COMMON, CAP_NOTIFY, CAP_ISR, CAP_DEVICE, CAP_PCI_CFG = 1, 2, 3, 4, 5
F_INDIRECT_DESC, F_EVENT_IDX, F_VERSION_1 = 28, 29, 32
DESC_F_NEXT, DESC_F_WRITE, DESC_F_INDIRECT = 1, 2, 4

# common config offsets (VIRTIO 1.x 4.1.4.3)
DFSELECT, DF, GFSELECT, GF, MSIX, NUMQ, STATUS, CFGGEN = 0, 4, 8, 12, 16, 18, 20, 21
Q_SELECT, Q_SIZE, Q_MSIX, Q_ENABLE, Q_NOFF, Q_DESC, Q_AVAIL, Q_USED = 22, 24, 26, 28, 30, 32, 40, 48
NO_VECTOR = 0xFFFF
_USED_ELEM = struct.Struct("<II")
_U16 = struct.Struct("<H")


class VirtioGuestError(Exception):
    """The device misbehaved or refused what the driver asked (features, queue, timeout)."""


class GuestAlloc:
    """A bump allocator over a window of guest RAM (libqos's guest_alloc, without free)."""

    def __init__(self, start: int = 0x10_0000, end: int = 0x400_0000) -> None:
        self.start, self.next, self.end = start, start, end

    def alloc(self, size: int, align: int = 16) -> int:
        addr = (self.next + align - 1) & ~(align - 1)
        if addr + size > self.end:
            raise VirtioGuestError(f"guest allocator exhausted ({size:#x} bytes wanted)")
        self.next = addr + size
        return addr


@dataclass
class VirtioCap:
    offset: int      # in config space
    cfg_type: int
    bar: int
    bar_offset: int
    length: int
    notify_mult: int = 0


@dataclass
class MSIXVector:
    """A table entry the driver programmed: the device announces an interrupt on it by writing
    ``data`` to the guest RAM word at ``addr``."""

    entry: int
    addr: int
    data: int


class VirtioPCIGuest:
    """A virtio 1.x PCI function as a driver sees it."""

    def __init__(self, qts: QTest, dev: GuestPCIDevice, alloc: GuestAlloc, via_pci_cfg: bool = False) -> None:
        self.qts = qts
        self.dev = dev
        self.alloc = alloc
        self.via_pci_cfg = via_pci_cfg
        dev.enable()
        self.bars: dict[int, BarInfo] = {b.index: b for b in dev.size_bars()}
        self.caps: list[VirtioCap] = []
        for off, cid in dev.capabilities():
            if cid != regs.CAP_ID_VNDR:
                continue
            cap = VirtioCap(off, dev.readb(off + 3), dev.readb(off + 4), dev.readl(off + 8), dev.readl(off + 12))
            if cap.cfg_type == CAP_NOTIFY:
                cap.notify_mult = dev.readl(off + 16)
            self.caps.append(cap)
        self.common = self._region(CAP_COMMON)
        self.isr_addr = self._region(CAP_ISR)
        self.device_cfg = self._region(CAP_DEVICE)
        self.notify_base = self._region(CAP_NOTIFY)
        self.notify_mult = next(c.notify_mult for c in self.caps if c.cfg_type == CAP_NOTIFY)
        self.cfg_window = next((c.offset for c in self.caps if c.cfg_type == CAP_PCI_CFG), 0)
        if via_pci_cfg and not self.cfg_window:
            raise VirtioGuestError(f"{dev.bdf}: no VIRTIO_PCI_CAP_PCI_CFG capability")
        self.features = 0
        self.queues: list["GuestVirtQueue"] = []
        self.msix: Optional[GuestMSIX] = None

    def _cap(self, cfg_type: int) -> VirtioCap:
        for c in self.caps:
            if c.cfg_type == cfg_type:
                return c
        raise VirtioGuestError(f"{self.dev.bdf}: no virtio capability of type {cfg_type}")

    def _region(self, cfg_type: int) -> int:
        c = self._cap(cfg_type)
        bar = self.bars.get(c.bar)
        if bar is None or bar.is_io or not bar.address:
            if self.via_pci_cfg:
                return 0  # the window reaches the registers without the BAR mapped
            raise VirtioGuestError(f"capability {cfg_type} points at unusable BAR{c.bar}")
        return bar.address + c.bar_offset

    # -- registers ------------------------------------------------------------------------------
    def _window(self, cfg_type: int, off: int, size: int, value: Optional[int] = None) -> int:
        """One register access through the PCI_CFG capability: aim it (bar, offset, length),
        then read or write its data dword."""
        c, w, dev = self._cap(cfg_type), self.cfg_window, self.dev
        dev.writeb(w + 4, c.bar)
        dev.writel(w + 8, c.bar_offset + off)
        dev.writel(w + 12, size)
        if value is None:
            return {1: dev.readb, 2: dev.readw, 4: dev.readl}[size](w + 16)
        {1: dev.writeb, 2: dev.writew, 4: dev.writel}[size](w + 16, value)
        return value

    def _read(self, cfg_type: int, base: int, off: int, size: int) -> int:
        if self.via_pci_cfg:
            return self._window(cfg_type, off, size)
        return {1: self.qts.readb, 2: self.qts.readw, 4: self.qts.readl}[size](base + off)

    def cread(self, off: int, size: int) -> int:
        return self._read(CAP_COMMON, self.common, off, size)

    def cwrite(self, off: int, v: int, size: int) -> None:
        if self.via_pci_cfg:
            self._window(CAP_COMMON, off, size, v)
        else:
            {1: self.qts.writeb, 2: self.qts.writew, 4: self.qts.writel}[size](self.common + off, v)

    def notify(self, vq: "GuestVirtQueue") -> None:
        """Tell the device that ``vq`` has new buffers (the queue's notification address)."""
        if self.via_pci_cfg:
            self._window(CAP_NOTIFY, vq.notify_off * self.notify_mult, 2, vq.index)
        else:
            self.qts.writew(vq.notify_addr, vq.index)

    @property
    def status(self) -> int:
        return self.cread(STATUS, 1)

    def set_status(self, v: int) -> None:
        self.cwrite(STATUS, v, 1)

    def add_status(self, bits: int) -> None:
        self.set_status(self.status | bits)

    def device_features(self) -> int:
        f = 0
        for sel in (0, 1):
            self.cwrite(DFSELECT, sel, 4)
            f |= self.cread(DF, 4) << (32 * sel)
        return f

    def write_driver_features(self, f: int) -> None:
        for sel in (0, 1):
            self.cwrite(GFSELECT, sel, 4)
            self.cwrite(GF, (f >> (32 * sel)) & 0xFFFFFFFF, 4)

    def read_isr(self) -> int:
        return self._read(CAP_ISR, self.isr_addr, 0, 1)

    def config_read(self, off: int, size: int) -> int:
        if size > 4:
            return self.config_read(off, 4) | (self.config_read(off + 4, 4) << 32)
        return self._read(CAP_DEVICE, self.device_cfg, off, size)

    # -- MSI-X (libqos qpci_msix_enable, qvirtqueue_pci_msix_setup) ------------------------------------
    def enable_msix(self) -> GuestMSIX:
        """Turn on MSI-X in the function's capability (raises LookupError if it has none)."""
        msix = GuestMSIX(self.dev)
        msix.enable()
        self.msix = msix
        return msix

    def msix_vector(self, entry: int, data: int) -> MSIXVector:
        """Point table entry ``entry`` at a fresh, zeroed word of guest RAM and unmask it."""
        if self.msix is None:
            raise VirtioGuestError("MSI-X is not enabled")
        addr = self.alloc.alloc(4, 4)
        self.qts.writel(addr, 0)
        self.msix.program(entry, addr, data)
        return MSIXVector(entry, addr, data)

    def set_config_vector(self, entry: int) -> int:
        """Write ``msix_config``; returns what the device kept (NO_VECTOR if it refused)."""
        self.cwrite(MSIX, entry, 2)
        return self.cread(MSIX, 2)

    def set_queue_vector(self, index: int, entry: int) -> int:
        """Write queue ``index``'s ``queue_msix_vector``; returns what the device kept."""
        self.cwrite(Q_SELECT, index, 2)
        self.cwrite(Q_MSIX, entry, 2)
        return self.cread(Q_MSIX, 2)

    def msix_fired(self, vec: MSIXVector) -> bool:
        """Has the device signalled ``vec``? True once per message (the word is cleared again);
        while the vector is masked, whether it is pending."""
        assert self.msix is not None
        if self.msix.masked(vec.entry):
            return self.msix.pending(vec.entry)
        if self.qts.readl(vec.addr) == vec.data:
            self.qts.writel(vec.addr, 0)
            return True
        return False

    def reset(self) -> None:
        self.set_status(0)
        if self.status != 0:
            raise VirtioGuestError("device did not reset")
        self.queues = []

    # -- initialisation (VIRTIO 1.x 3.1.1) ----------------------------------------------------------
    def init(self, wanted: int) -> int:
        """Reset, acknowledge, negotiate ``wanted & offered`` (plus VERSION_1), set FEATURES_OK."""
        self.reset()
        self.add_status(STATUS_ACKNOWLEDGE)
        self.add_status(STATUS_DRIVER)
        offered = self.device_features()
        if not offered >> F_VERSION_1 & 1:
            raise VirtioGuestError("device does not offer VIRTIO_F_VERSION_1")
        self.features = (wanted | 1 << F_VERSION_1) & offered
        self.write_driver_features(self.features)
        self.add_status(STATUS_FEATURES_OK)
        if not self.status & STATUS_FEATURES_OK:
            self.add_status(STATUS_FAILED)
            raise VirtioGuestError("device refused the features")
        return self.features

    def setup_queue(self, index: int, size: Optional[int] = None,
                    msix_vector: Optional[int] = None) -> "GuestVirtQueue":
        """Lay out and enable queue ``index``; with ``msix_vector``, route its interrupts to that
        MSI-X table entry (set before the queue is enabled, as the spec asks)."""
        self.cwrite(Q_SELECT, index, 2)
        max_size = self.cread(Q_SIZE, 2)
        if max_size == 0:
            raise VirtioGuestError(f"queue {index} does not exist")
        size = size or max_size
        self.cwrite(Q_SIZE, size, 2)
        vq = GuestVirtQueue(self, index, self.cread(Q_SIZE, 2))
        for off, addr in ((Q_DESC, vq.desc), (Q_AVAIL, vq.avail), (Q_USED, vq.used)):
            self.cwrite(off, addr & 0xFFFFFFFF, 4)
            self.cwrite(off + 4, addr >> 32, 4)
        vq.notify_off = self.cread(Q_NOFF, 2)
        vq.notify_addr = self.notify_base + vq.notify_off * self.notify_mult
        if msix_vector is not None:
            self.cwrite(Q_MSIX, msix_vector, 2)
            vq.msix_vector = self.cread(Q_MSIX, 2)
            if vq.msix_vector != msix_vector:
                raise VirtioGuestError(f"device refused MSI-X vector {msix_vector} for queue {index}")
        self.cwrite(Q_ENABLE, 1, 2)
        self.queues.append(vq)
        return vq

    def driver_ok(self) -> None:
        self.add_status(STATUS_DRIVER_OK)


class GuestVirtQueue:
    """A split virtqueue laid out in guest RAM by the driver.

    Chains come from a free list (:meth:`add`) or from descriptors a driver has reserved for good
    (:meth:`reserve`) and fills itself, as drivers with pre-built chains do; either way a chain
    becomes available through the driver ring, and several can be published with one index
    update and one notification (:meth:`publish`, :meth:`kick`)."""

    def __init__(self, dev: VirtioPCIGuest, index: int, size: int) -> None:
        self.dev = dev
        self.qts = dev.qts
        self.index = index
        self.size = size
        self.event_idx = bool(dev.features >> F_EVENT_IDX & 1)
        self.indirect = bool(dev.features >> F_INDIRECT_DESC & 1)
        self.desc = dev.alloc.alloc(16 * size, 4096)
        self.avail = dev.alloc.alloc(6 + 2 * size, 2)
        self.used = dev.alloc.alloc(6 + 8 * size, 4096)
        self.qts.memset(self.desc, 16 * size, 0)
        self.qts.memset(self.avail, 6 + 2 * size, 0)
        self.qts.memset(self.used, 6 + 8 * size, 0)
        # the rings are the driver's own RAM: used in place when the transport can map them
        self.desc_ram = RamArea(self.qts, self.desc, 16 * size)
        self.avail_ram = RamArea(self.qts, self.avail, 6 + 2 * size)
        self.used_ram = RamArea(self.qts, self.used, 6 + 8 * size)
        self._ram_gen: Optional[int] = None
        self.free = list(range(size))
        self.chains: dict[int, list[int]] = {}
        self.reserved: set[int] = set()
        self.avail_idx = 0
        self.last_used = 0
        self.notify_addr = 0
        self.notify_off = 0
        self.kicked_at = 0
        self.msix_vector = NO_VECTOR

    def add(self, bufs: list[tuple[int, int, bool]], indirect: bool = False, publish: bool = True) -> int:
        """Queue a chain of (addr, len, device_writable) buffers; returns its head index."""
        if indirect:
            table = self.dev.alloc.alloc(16 * len(bufs), 16)
            self.qts.memwrite(table, pack_chain(bufs, list(range(len(bufs)))))
            head = self._take(1)[0]
            self.write_descs([head], struct.pack("<QIHH", table, 16 * len(bufs), DESC_F_INDIRECT, 0))
            self.chains[head] = [head]
        else:
            ids = self._take(len(bufs))
            self.write_descs(ids, pack_chain(bufs, ids))
            head = ids[0]
            self.chains[head] = ids
        self.make_available([head], publish)
        return head

    def _sync(self) -> None:
        """Map the rings again if the memory topology changed (one check for all three)."""
        gen = self.qts.ram_generation()
        if gen != self._ram_gen:
            for area in (self.desc_ram, self.avail_ram, self.used_ram):
                area.sync()
            self._ram_gen = gen

    def _take(self, n: int) -> list[int]:
        if n > len(self.free):
            raise VirtioGuestError("virtqueue full")
        ids, self.free = self.free[:n], self.free[n:]
        return ids

    def reserve(self, n: int) -> list[int]:
        """Take ``n`` descriptors (from the top of the table) for the caller's own fixed chains."""
        if not 0 < n <= len(self.free):
            raise VirtioGuestError("virtqueue too small")
        ids, self.free = self.free[-n:], self.free[:-n]
        self.reserved.update(ids)
        return ids

    def write_descs(self, ids: list[int], packed: bytes) -> None:
        """Write packed descriptors to table entries ``ids``, one memory write per consecutive run."""
        self._sync()
        i = 0
        while i < len(ids):
            j = i + 1
            while j < len(ids) and ids[j] == ids[j - 1] + 1:
                j += 1
            self.desc_ram.write(16 * ids[i], packed[16 * i:16 * j])
            i = j

    def make_available(self, heads: list[int], publish: bool = True) -> None:
        """Put chain heads into the driver ring (contiguous slots in one write per wrap)."""
        self._sync()
        self._add_heads(heads, publish)

    def submit(self, heads: list[int]) -> None:
        """make_available + kick for one batch of chains, with one topology check."""
        self._sync()
        self._add_heads(heads, True)
        self._kick()

    def _add_heads(self, heads: list[int], publish: bool) -> None:
        chains, ram = self.chains, self.avail_ram
        for h in heads:
            if h not in chains:
                chains[h] = [h]
        slot, pos, n = self.avail_idx % self.size, 0, len(heads)
        view = ram.view
        if view is not None and n == 1:  # mapped: in place
            _U16.pack_into(view, 4 + 2 * slot, heads[0])
            pos = n
        elif view is not None and slot + n <= self.size:  # mapped, no wrap: one pack
            struct.pack_into(f"<{n}H", view, 4 + 2 * slot, *heads)
            pos = n
        while pos < n:
            k = min(n - pos, self.size - slot)
            ram.write(4 + 2 * slot, struct.pack(f"<{k}H", *heads[pos:pos + k]))
            pos += k
            slot = 0
        self.avail_idx = (self.avail_idx + n) & 0xFFFF
        if publish:
            ram.w16(2, self.avail_idx)

    def publish(self) -> None:
        """Make everything added so far visible to the device (one driver-ring index update)."""
        self._sync()
        self.avail_ram.w16(2, self.avail_idx)

    def kick(self) -> None:
        """Notify the device (honouring VIRTQ_USED_F_NO_NOTIFY or avail_event)."""
        self._sync()
        self._kick()

    def _kick(self) -> None:
        old, new = self.kicked_at, self.avail_idx
        self.kicked_at = new
        if self.event_idx:
            ev = self.used_ram.r16(4 + 8 * self.size)
            if ((new - ev - 1) & 0xFFFF) >= ((new - old) & 0xFFFF):
                return
        elif self.used_ram.r16(0) & 1:
            return
        self.dev.notify(self)

    def get_used(self, settle: bool = False) -> list[tuple[int, int]]:
        """Reap completions: (head id, used.len) pairs; frees their descriptors.

        With ``settle`` (a driver that sleeps until the next interrupt), the used index is read
        again after ``used_event`` is moved, and anything that arrived meanwhile is reaped too:
        the device skips the interrupt for such completions (Linux's virtqueue_enable_cb check)."""
        out: list[tuple[int, int]] = []
        used_ram, avail_ram = self.used_ram, self.avail_ram
        self._sync()
        while True:
            used_idx = used_ram.r16(2)
            count = (used_idx - self.last_used) & 0xFFFF
            if count > self.size:
                raise VirtioGuestError(f"device moved the used index by {count} (queue size {self.size})")
            if not count:
                return out
            slot = self.last_used % self.size
            chains, reserved, view = self.chains, self.reserved, used_ram.view
            while count:
                n = min(count, self.size - slot)
                elems = ((_USED_ELEM.unpack_from(view, 4 + 8 * slot),) if n == 1 and view is not None
                         else _USED_ELEM.iter_unpack(used_ram.read(4 + 8 * slot, 8 * n)))
                for elem in elems:
                    ids = chains.pop(elem[0], None)
                    if ids is None:
                        raise VirtioGuestError(f"device returned unknown descriptor {elem[0]}")
                    if elem[0] not in reserved:
                        self.free += ids
                    out.append(elem)
                count -= n
                slot = 0
            self.last_used = used_idx
            if self.event_idx:
                avail_ram.w16(4 + 2 * self.size, self.last_used)
            if not settle:
                return out


def pack_chain(bufs: list[tuple[int, int, bool]], ids: list[int]) -> bytes:
    out = bytearray()
    for i, (addr, length, writable) in enumerate(bufs):
        flags = (DESC_F_WRITE if writable else 0) | (DESC_F_NEXT if i + 1 < len(bufs) else 0)
        nxt = ids[i + 1] if i + 1 < len(bufs) else 0
        out += struct.pack("<QIHH", addr, length, flags, nxt)
    return bytes(out)
