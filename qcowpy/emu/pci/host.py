"""PCI host bridge: configuration mechanism #1 (ports 0xCF8/0xCFC), ECAM, and the 00.0 function.

Mechanism #1: a 32-bit write to CONFIG_ADDRESS (0xCF8) selects ``enable | bus | devfn | reg``;
accesses to CONFIG_DATA (0xCFC-0xCFF) then reach that dword of the selected function. ECAM maps
every function's 4 KiB config space into memory at ``base + (bus << 20 | devfn << 12 | reg)``.
"""
from __future__ import annotations

from typing import Any

from ..memory import Endianness, MemoryRegion, MemoryRegionOps
from ..qdev import TYPE_DEVICE, DeviceState
from ..qom import Object, ObjectClass, TypeInfo, object_new, type_register_once
from . import regs
from .bus import TYPE_PCI_BUS, PCIBus
from .device import TYPE_PCI_DEVICE, PCIDeviceClass

TYPE_PCI_HOST = "mini-pcihost"
TYPE_PCI_HOST_BRIDGE_FN = "mini-host-bridge"

CONFIG_ADDRESS_PORT = 0xCF8
CONFIG_DATA_PORT = 0xCFC
ECAM_BUS_SIZE = 1 << 20


class PCIHostState(DeviceState):
    """The host bridge: owns the root bus and the config-access regions the machine maps."""

    config_reg: int
    bus: PCIBus
    conf_mem: MemoryRegion
    data_mem: MemoryRegion
    mmcfg: MemoryRegion
    ecam_buses: int

    def setup(self, ecam_buses: int = 256, bus_type: str = TYPE_PCI_BUS, bus_name: str = "pci.0") -> None:
        """Create the root bus and the config-access regions (done before plugging devices)."""
        bus: PCIBus = object_new(bus_type)  # type: ignore[assignment]
        bus.parent_dev = self
        self.child_buses.append(bus)
        self.add_child(bus_name, bus)
        self.bus = bus
        self.ecam_buses = ecam_buses
        self.conf_mem = MemoryRegion.io_region(self, _CONF_OPS, self, "pci-conf-idx", 4)
        self.data_mem = MemoryRegion.io_region(self, _DATA_OPS, self, "pci-conf-data", 4)
        self.mmcfg = MemoryRegion.io_region(self, _MMCFG_OPS, self, "pcie-mmcfg-mmio", ecam_buses * ECAM_BUS_SIZE)

    # -- mechanism #1 ----------------------------------------------------------------------------
    def conf_read(self, addr: int, size: int) -> int:
        return self.config_reg

    def conf_write(self, addr: int, value: int, size: int) -> None:
        if addr == 0 and size == 4:  # only a full dword write at 0xCF8 latches the address
            self.config_reg = value & 0xFFFFFFFF

    def data_read(self, addr: int, size: int) -> int:
        if not self.config_reg & 0x80000000:
            return (1 << (8 * size)) - 1
        a = self.config_reg | (addr & 3)
        return self.bus.config_read((a >> 16) & 0xFF, (a >> 8) & 0xFF, a & 0xFF, size, regs.CONFIG_SPACE_SIZE)

    def data_write(self, addr: int, value: int, size: int) -> None:
        if not self.config_reg & 0x80000000:
            return
        a = self.config_reg | (addr & 3)
        self.bus.config_write((a >> 16) & 0xFF, (a >> 8) & 0xFF, a & 0xFF, value, size, regs.CONFIG_SPACE_SIZE)

    # -- ECAM ------------------------------------------------------------------------------------
    def mmcfg_read(self, addr: int, size: int) -> int:
        return self.bus.config_read(addr >> 20, (addr >> 12) & 0xFF, addr & 0xFFF, size,
                                    regs.EXTENDED_CONFIG_SPACE_SIZE)

    def mmcfg_write(self, addr: int, value: int, size: int) -> None:
        self.bus.config_write(addr >> 20, (addr >> 12) & 0xFF, addr & 0xFFF, value, size,
                              regs.EXTENDED_CONFIG_SPACE_SIZE)


_CONF_OPS = MemoryRegionOps(read=lambda s, a, n: s.conf_read(a, n), write=lambda s, a, v, n: s.conf_write(a, v, n),
                            endianness=Endianness.LITTLE)
_DATA_OPS = MemoryRegionOps(read=lambda s, a, n: s.data_read(a, n), write=lambda s, a, v, n: s.data_write(a, v, n),
                            endianness=Endianness.LITTLE)
_MMCFG_OPS = MemoryRegionOps(read=lambda s, a, n: s.mmcfg_read(a, n), write=lambda s, a, v, n: s.mmcfg_write(a, v, n),
                             endianness=Endianness.LITTLE)


def _host_init(obj: Object) -> None:
    host: PCIHostState = obj  # type: ignore[assignment]
    host.config_reg = 0


def _host_class_init(klass: ObjectClass, _data: Any) -> None:
    klass.desc = "PCI host bridge (config mechanism #1 and ECAM)"  # type: ignore[attr-defined]
    klass.user_creatable = False  # type: ignore[attr-defined]
    klass.category = "bridge"  # type: ignore[attr-defined]
    klass.reset = lambda dev: setattr(dev, "config_reg", 0)  # type: ignore[attr-defined]


def _bridge_fn_class_init(klass: ObjectClass, _data: Any) -> None:
    k: PCIDeviceClass = klass  # type: ignore[assignment]
    k.vendor_id = regs.VENDOR_ID_REDHAT
    k.device_id = 0x0008  # QEMU's generic PCIe host bridge ID
    k.revision = 0
    k.class_id = regs.CLASS_BRIDGE_HOST
    k.desc = "Host bridge function 00.0"
    k.user_creatable = False
    k.hotpluggable = False
    k.category = "bridge"


type_register_once(TypeInfo(TYPE_PCI_HOST, parent=TYPE_DEVICE, instance_type=PCIHostState,
                            instance_init=_host_init, class_init=_host_class_init))
type_register_once(TypeInfo(TYPE_PCI_HOST_BRIDGE_FN, parent=TYPE_PCI_DEVICE, class_init=_bridge_fn_class_init))
