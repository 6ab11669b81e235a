"""PCI: bus, host bridge (mechanism #1 and ECAM), functions with config space, BARs, MSI."""
from __future__ import annotations

from . import regs
from .bus import TYPE_PCI_BUS, PCIBus
from .device import (INTERFACE_CONVENTIONAL_PCI_DEVICE, INTERFACE_PCIE_DEVICE, TYPE_PCI_DEVICE, PCIDevice,
                     PCIDeviceClass, PCIIORegion)
from .host import TYPE_PCI_HOST, TYPE_PCI_HOST_BRIDGE_FN, PCIHostState
from .msi import msi_enabled, msi_init, msi_notify

__all__ = ["regs", "TYPE_PCI_BUS", "PCIBus", "INTERFACE_CONVENTIONAL_PCI_DEVICE", "INTERFACE_PCIE_DEVICE",
           "TYPE_PCI_DEVICE", "PCIDevice", "PCIDeviceClass", "PCIIORegion", "TYPE_PCI_HOST",
           "TYPE_PCI_HOST_BRIDGE_FN", "PCIHostState", "msi_enabled", "msi_init", "msi_notify"]
