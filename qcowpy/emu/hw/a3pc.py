"""``a3-pc-pcie-host``: the tutorial's PCI Express host bridge, with a root bus ``a3-pcie0``.

It is a PCIe host (QEMU's ``PCIExpressHost``: ECAM on top of the conventional CF8/CFC pair, as
q35's bridge has) that owns its own PCI memory and I/O regions, which the machine maps. INTx is
not wired: the bus's ``map_irq`` and ``set_irq`` only warn ``A3-PC: not support INTx``, exactly as
the tutorial's bridge does, so devices must use MSI or MSI-X to interrupt.
"""
from __future__ import annotations

from typing import Any, Callable

from ..memory import SIZE_2_64, MemoryRegion
from ..pci.bus import TYPE_PCI_BUS
from ..pci.device import PCIDevice
from ..pci.host import TYPE_PCI_HOST, PCIHostState
from ..qom import ObjectClass, TypeInfo, type_register_once

TYPE_A3PC_PCIE_HOST = "a3-pc-pcie-host"
TYPE_PCIE_BUS = "PCIE"
type_register_once(TypeInfo(TYPE_PCIE_BUS, parent=TYPE_PCI_BUS))
A3PC_ROOT_BUS = "a3-pcie0"
INTX_WARNING = "A3-PC: not support INTx"


class A3PCPCIEHost(PCIHostState):
    """The bridge: config access (CF8/CFC and ECAM), its memory/I/O windows and the root bus."""

    pci_mem: MemoryRegion
    pci_io: MemoryRegion
    warn: Callable[[str], None]

    def setup_pcie(self, warn: Callable[[str], None], dma_root: MemoryRegion,
                   as_registry: list[Any]) -> None:
        """Create the root bus ``a3-pcie0`` (PCIe) and the windows its BARs are mapped into."""
        self.warn = warn
        self.setup(bus_type=TYPE_PCIE_BUS, bus_name=A3PC_ROOT_BUS)
        self.pci_mem = MemoryRegion.container_region(self, "a3-pc-pcie-mmio", SIZE_2_64)
        self.pci_io = MemoryRegion.container_region(self, "a3-pc-pcie-ioport", 0x10000)
        self.bus.setup(A3PC_ROOT_BUS, self.pci_mem, self.pci_io, dma_root, 4,
                       self.map_irq, self.set_irq, as_registry, is_express=True)

    def map_irq(self, dev: PCIDevice, pin: int) -> int:
        """No INTx routing on this bridge: warn, as the tutorial's ``map_irq`` does."""
        self.warn(INTX_WARNING)
        return 0

    def set_irq(self, irq: int, level: bool) -> None:
        """No interrupt line to raise: warn, as the tutorial's ``set_irq`` does."""
        self.warn(INTX_WARNING)


def _class_init(klass: ObjectClass, _data: Any) -> None:
    klass.desc = "A3-PC PCI Express host bridge (ECAM, no INTx)"  # type: ignore[attr-defined]


type_register_once(TypeInfo(TYPE_A3PC_PCIE_HOST, parent=TYPE_PCI_HOST, instance_type=A3PCPCIEHost,
                            class_init=_class_init))
