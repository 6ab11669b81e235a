"""``a3dev-pci``: the tutorial's teaching device, a 256-byte buffer behind two BARs.

IDs: vendor 0x1234, device 0x1919, revision 0x81, class 0x00ff ("other", QEMU's
PCI_CLASS_OTHERS). BAR0 is 256 bytes of MMIO, BAR1 256 I/O ports; both window the same buffer.
An access of 1-8 bytes copies to or from the buffer (little-endian); an access that does not fit
inside the 256 bytes reads all-ones and writes nothing.
"""
from __future__ import annotations

from typing import Any

from ..memory import AccessConstraints, Endianness, ImplConstraints, MemoryRegion, MemoryRegionOps
from ..pci import regs
from ..pci.device import INTERFACE_CONVENTIONAL_PCI_DEVICE, TYPE_PCI_DEVICE, PCIDevice, PCIDeviceClass
from ..qom import Object, ObjectClass, TypeInfo, type_register_once

TYPE_A3DEV = "a3dev-pci"
A3DEV_VENDOR_ID = 0x1234
A3DEV_DEVICE_ID = 0x1919
A3DEV_REVISION = 0x81
A3DEV_BUF_SIZE = 256


class A3DevState(PCIDevice):
    """Instance state: the two BAR regions and the buffer they share."""

    mmio: MemoryRegion
    pmio: MemoryRegion
    buf: bytearray


def a3dev_read(s: A3DevState, addr: int, size: int) -> int:
    if addr + size > A3DEV_BUF_SIZE:
        return (1 << (8 * size)) - 1
    return int.from_bytes(s.buf[addr:addr + size], "little")


def a3dev_write(s: A3DevState, addr: int, value: int, size: int) -> None:
    if addr + size > A3DEV_BUF_SIZE:
        return
    s.buf[addr:addr + size] = value.to_bytes(size, "little")


A3DEV_OPS = MemoryRegionOps(
    read=a3dev_read, write=a3dev_write, endianness=Endianness.LITTLE,
    valid=AccessConstraints(min_access_size=1, max_access_size=8, unaligned=True),
    impl=ImplConstraints(min_access_size=1, max_access_size=8, unaligned=True),
)


def a3dev_instance_init(obj: Object) -> None:
    s: A3DevState = obj  # type: ignore[assignment]
    s.buf = bytearray(A3DEV_BUF_SIZE)


def a3dev_realize(pdev: PCIDevice) -> None:
    s: A3DevState = pdev  # type: ignore[assignment]
    s.mmio = MemoryRegion.io_region(s, A3DEV_OPS, s, "a3dev-mmio", A3DEV_BUF_SIZE)
    s.pmio = MemoryRegion.io_region(s, A3DEV_OPS, s, "a3dev-pmio", A3DEV_BUF_SIZE)
    s.register_bar(0, regs.BASE_ADDRESS_SPACE_MEMORY, s.mmio)
    s.register_bar(1, regs.BASE_ADDRESS_SPACE_IO, s.pmio)


def a3dev_reset(dev: Any) -> None:
    dev.buf[:] = bytes(A3DEV_BUF_SIZE)
    dev.pci_reset()


def a3dev_class_init(klass: ObjectClass, _data: Any) -> None:
    k: PCIDeviceClass = klass  # type: ignore[assignment]
    k.realize = a3dev_realize
    k.vendor_id = A3DEV_VENDOR_ID
    k.device_id = A3DEV_DEVICE_ID
    k.revision = A3DEV_REVISION
    k.class_id = regs.CLASS_OTHERS
    k.desc = "a3dev teaching device: 256-byte buffer via MMIO BAR0 and port-I/O BAR1"
    k.reset = a3dev_reset


A3DEV_INFO = TypeInfo(
    name=TYPE_A3DEV, parent=TYPE_PCI_DEVICE, instance_type=A3DevState,
    instance_init=a3dev_instance_init, class_init=a3dev_class_init,
    interfaces=(INTERFACE_CONVENTIONAL_PCI_DEVICE,),
)
type_register_once(A3DEV_INFO)
