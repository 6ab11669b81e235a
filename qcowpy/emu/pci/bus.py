"""The PCI bus: 256 device/function slots, the bus address spaces, and INTx routing."""
from __future__ import annotations

from typing import Callable, Optional

from ..errors import DeviceError
from ..memory import AddressSpace, MemoryRegion
from ..qdev import TYPE_BUS, BusState
from ..qom import Object, TypeInfo, type_register_once
from . import regs
from .device import PCIDevice

TYPE_PCI_BUS = "PCI"


class PCIBus(BusState):
    """A PCI bus. BARs are mapped into ``address_space_mem``/``address_space_io``; device DMA goes
    to ``dma_root``; INTx pins are swizzled by ``map_irq`` onto ``set_irq`` lines."""

    number: int
    devices: list[Optional[PCIDevice]]
    address_space_mem: MemoryRegion
    address_space_io: MemoryRegion
    dma_root: MemoryRegion
    devfn_min: int
    is_express: bool
    irq_count: list[int]
    map_irq: Callable[[PCIDevice, int], int]
    set_irq_line: Callable[[int, bool], None]
    as_registry: Optional[list[AddressSpace]]
    clock: Optional[object]  # the machine's VirtualClock, for device timers

    def setup(self, name: str, mem: MemoryRegion, io: MemoryRegion, dma_root: MemoryRegion,
              nirq: int, map_irq: Callable[[PCIDevice, int], int],
              set_irq_line: Callable[[int, bool], None],
              as_registry: Optional[list[AddressSpace]] = None, is_express: bool = False) -> None:
        """Wire the bus to the machine (QEMU's ``pci_root_bus_new`` + ``pci_bus_irqs``)."""
        self.name = name
        self.address_space_mem = mem
        self.address_space_io = io
        self.dma_root = dma_root
        self.irq_count = [0] * nirq
        self.map_irq = map_irq
        self.set_irq_line = set_irq_line
        self.as_registry = as_registry
        self.is_express = is_express

    def allocate_devfn(self, dev: PCIDevice, devfn: int) -> int:
        if devfn < 0:
            for slot in range(self.devfn_min >> 3, 32):
                if self.devices[regs.devfn(slot, 0)] is None:
                    return regs.devfn(slot, 0)
            raise DeviceError(f"PCI: no slot/function available for {dev.name}, all in use")
        other = self.devices[devfn]
        if other is not None:
            raise DeviceError(f"PCI: slot {devfn >> 3} function {devfn & 7} not available for {dev.name}, "
                              f"in use by {other.name}")
        return devfn

    def place(self, dev: PCIDevice) -> None:
        self.devices[dev.devfn] = dev

    def remove(self, dev: PCIDevice) -> None:
        if 0 <= dev.devfn < 256 and self.devices[dev.devfn] is dev:
            self.devices[dev.devfn] = None

    def find(self, devfn: int) -> Optional[PCIDevice]:
        return self.devices[devfn] if 0 <= devfn < 256 else None

    def functions(self) -> list[PCIDevice]:
        return [d for d in self.devices if d is not None]

    def register_address_space(self, as_: AddressSpace) -> None:
        if self.as_registry is not None:
            self.as_registry.append(as_)

    def unregister_address_space(self, as_: AddressSpace) -> None:
        if self.as_registry is not None and as_ in self.as_registry:
            self.as_registry.remove(as_)

    def change_irq_level(self, dev: PCIDevice, pin: int, change: int) -> None:
        """Count asserting functions per routed line; the line is high while any asserts it."""
        irq = self.map_irq(dev, pin)
        self.irq_count[irq] += change
        self.set_irq_line(irq, self.irq_count[irq] != 0)

    # -- configuration access (used by host bridges) ------------------------------------------
    def config_read(self, bus_num: int, devfn: int, addr: int, length: int, limit: int) -> int:
        """Read config space; missing functions and bytes past ``limit`` read all-ones."""
        all_ones = (1 << (8 * length)) - 1
        dev = self.find(devfn) if bus_num == self.number else None
        if dev is None:
            return all_ones
        limit = min(limit, dev.config_size)
        if addr >= limit:
            return all_ones
        n = min(length, limit - addr)
        return dev.config_read(addr, n) | (all_ones & ~((1 << (8 * n)) - 1))

    def config_write(self, bus_num: int, devfn: int, addr: int, value: int, length: int, limit: int) -> None:
        dev = self.find(devfn) if bus_num == self.number else None
        if dev is None:
            return
        limit = min(limit, dev.config_size)
        if addr >= limit:
            return
        n = min(length, limit - addr)
        dev.config_write(addr, value & ((1 << (8 * n)) - 1), n)


def _bus_init(obj: Object) -> None:
    bus: PCIBus = obj  # type: ignore[assignment]
    bus.number = 0
    bus.devices = [None] * 256
    bus.devfn_min = 0
    bus.is_express = False
    bus.as_registry = None
    bus.clock = None


type_register_once(TypeInfo(TYPE_PCI_BUS, parent=TYPE_BUS, instance_type=PCIBus, instance_init=_bus_init))
