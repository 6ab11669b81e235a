"""A booted guest in this process: what ``guest boot`` sets up and ``guest rescan`` updates.

The guest keeps its qtest handle, the firmware's view of bus 0 (so a rescan after hot-plug places
new BARs after the ones in use), one allocator over its RAM window (new disks get memory no running
disk uses) and its virtio-blk disks. A rescan is the guest's half of hot-plug — there is no
hot-plug controller to announce a device, so the guest looks, as an OS does on
``echo 1 > /sys/bus/pci/rescan``.
"""
from __future__ import annotations

from typing import Any, Optional

from .firmware import BootResult, pci_boot, pci_rescan
from .qtest import InProcessQTest, QTest
from .virtio import GuestAlloc, VirtioGuestError
from .virtio_blk import GuestDisk, describe, is_virtio_blk

#: Guest RAM for virtqueues, request slots and buffers: from 1 MiB up to 128 MiB (or the RAM size).
ALLOC_START, ALLOC_END = 0x10_0000, 0x800_0000
MIN_RAM_FOR_DISKS = 16 << 20


class GuestSystem:
    """Firmware + virtio-blk driver state of an in-process guest."""

    def __init__(self, machine: Any) -> None:
        self.machine = machine
        self.qts = InProcessQTest(machine)
        self.ram_size: int = getattr(machine, "ram_size", 64 << 20)
        self.alloc = GuestAlloc(ALLOC_START, min(self.ram_size, ALLOC_END))
        self.bus: Optional[BootResult] = None
        self.disks: list[GuestDisk] = []
        # the board's firmware tables say whether INTx is routed (ACPI's _PRT); where it is not,
        # the guest must use MSI-X, as Linux does on a bridge without legacy interrupts
        self.use_msix = not getattr(getattr(machine, "klass", None), "intx_routed", True)

    def boot(self) -> list[str]:
        """Firmware PCI boot, then every virtio-blk function brought up; returns the boot log."""
        self.bus = pci_boot(self.qts, self.ram_size)
        self.alloc = GuestAlloc(ALLOC_START, min(self.ram_size, ALLOC_END))
        self.disks = []
        log = list(self.bus.log)
        log += self._add_disks([fd.dev for fd in self.bus.devices])
        if self.disks:
            log.append(f"virtio-blk: {len(self.disks)} disk(s)")
        return log

    def rescan(self) -> list[str]:
        """Pick up functions plugged or unplugged since boot; returns what the guest logged."""
        if self.bus is None:
            raise ValueError("the guest has not booted: run 'guest boot' first")
        start = len(self.bus.log)
        added, removed = pci_rescan(self.qts, self.bus)
        log = self.bus.log[start:]
        gone = {fd.dev.devfn for fd in removed}
        for d in [d for d in self.disks if d.pci.devfn in gone]:
            self.disks.remove(d)
            log.append(f"virtio-blk: {d.pci.bdf} removed")
        log += self._add_disks([fd.dev for fd in added])
        return log

    def _add_disks(self, devices: list) -> list[str]:  # type: ignore[type-arg]
        if self.ram_size < MIN_RAM_FOR_DISKS:
            return []
        log = []
        for dev in devices:
            if not is_virtio_blk(dev):
                continue
            try:
                disk = GuestDisk(self.qts, dev, self.alloc, use_msix=self.use_msix)
            except VirtioGuestError as e:
                log.append(f"virtio-blk: {dev.bdf}: driver error: {e}")
                continue
            self.disks.append(disk)
            log.append(describe(disk))
        return log


def boot(machine: object) -> tuple[QTest, list[GuestDisk], list[str]]:
    """Python API: run the firmware on an in-process ``machine`` and bring up its virtio disks.

    Returns the qtest handle, the guest disks and the boot log (as ``guest boot`` prints it);
    :class:`GuestSystem` keeps the state for a later hot-plug rescan."""
    guest = GuestSystem(machine)
    log = guest.boot()
    return guest.qts, guest.disks, log
