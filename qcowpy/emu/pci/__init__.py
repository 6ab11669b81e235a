"""PCI: bus, host bridge (mechanism #1 and ECAM), functions with config space, BARs, MSI, MSI-X."""
from __future__ import annotations

from . import regs
from .bus import TYPE_PCI_BUS, PCIBus
from .device import (INTERFACE_CONVENTIONAL_PCI_DEVICE, INTERFACE_PCIE_DEVICE, TYPE_PCI_DEVICE, PCIDevice,
                     PCIDeviceClass, PCIIORegion)
from .host import TYPE_PCI_HOST, TYPE_PCI_HOST_BRIDGE_FN, PCIHostState
from .msi import msi_enabled, msi_init, msi_notify
from .msix import (msix_enabled, msix_init, msix_init_exclusive_bar, msix_notify, msix_present,
                   msix_vector_unuse, msix_vector_use)

__all__ = ["regs", "TYPE_PCI_BUS", "PCIBus", "INTERFACE_CONVENTIONAL_PCI_DEVICE", "INTERFACE_PCIE_DEVICE",
           "TYPE_PCI_DEVICE", "PCIDevice", "PCIDeviceClass", "PCIIORegion", "TYPE_PCI_HOST",
           "TYPE_PCI_HOST_BRIDGE_FN", "PCIHostState", "msi_enabled", "msi_init", "msi_notify",
           "msix_enabled", "msix_init", "msix_init_exclusive_bar", "msix_notify", "msix_present",
           "msix_vector_unuse", "msix_vector_use"]
