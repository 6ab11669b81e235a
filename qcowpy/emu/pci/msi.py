"""The MSI capability (message signalled interrupts), as ``edu`` uses it.

A message is a 32-bit write of ``data`` to ``address`` through the device's bus-master address
space; on the PC machines the APIC window at 0xfee00000 receives it.
"""
from __future__ import annotations

from ..errors import DeviceError
from . import regs
from .device import PCIDevice


def msi_init(dev: PCIDevice, offset: int = 0, nr_vectors: int = 1, msi64bit: bool = True,
             per_vector_mask: bool = False) -> int:
    """Add an MSI capability (QEMU's ``msi_init``); returns its offset."""
    if nr_vectors < 1 or nr_vectors > 32 or nr_vectors & (nr_vectors - 1):
        raise DeviceError(f"{dev.name}: MSI vector count {nr_vectors} must be a power of 2 up to 32")
    size = (0x0E if msi64bit else 0x0A) + (0x0A if per_vector_mask else 0)
    off = dev.add_capability(regs.CAP_ID_MSI, offset, size)
    log_max = nr_vectors.bit_length() - 1
    flags = (log_max << 1) | (regs.MSI_FLAGS_64BIT if msi64bit else 0) | (regs.MSI_FLAGS_MASKBIT if per_vector_mask else 0)
    dev.set_word(off + regs.MSI_FLAGS, flags)
    dev.set_word(off + regs.MSI_FLAGS, regs.MSI_FLAGS_QSIZE | regs.MSI_FLAGS_ENABLE, dev.wmask)
    dev.set_long(off + regs.MSI_ADDRESS_LO, 0xFFFFFFFC, dev.wmask)
    data = off + (0x0C if msi64bit else 0x08)
    if msi64bit:
        dev.set_long(off + 8, 0xFFFFFFFF, dev.wmask)
    dev.set_word(data, 0xFFFF, dev.wmask)
    if per_vector_mask:
        dev.set_long(data + 4, (1 << nr_vectors) - 1 if nr_vectors < 32 else 0xFFFFFFFF, dev.wmask)
    dev.msi_cap = off
    dev.config_write_hooks.append(lambda a, v, n: _msi_write_config(dev, a, n))
    dev.reset_hooks.append(lambda: _msi_reset(dev))
    return off


def _flags(dev: PCIDevice) -> int:
    return dev.get_word(dev.msi_cap + regs.MSI_FLAGS)


def _msi_write_config(dev: PCIDevice, addr: int, length: int) -> None:
    off = dev.msi_cap
    if not off or addr >= off + 0x18 or addr + length <= off:
        return
    flags = _flags(dev)
    log_max = (flags & regs.MSI_FLAGS_QMASK) >> 1
    log_num = (flags & regs.MSI_FLAGS_QSIZE) >> 4
    if log_num > log_max:
        dev.set_word(off + regs.MSI_FLAGS, (flags & ~regs.MSI_FLAGS_QSIZE) | (log_max << 4))


def _msi_reset(dev: PCIDevice) -> None:
    off = dev.msi_cap
    flags = _flags(dev) & ~(regs.MSI_FLAGS_QSIZE | regs.MSI_FLAGS_ENABLE)
    dev.set_word(off + regs.MSI_FLAGS, flags)
    dev.set_long(off + regs.MSI_ADDRESS_LO, 0)
    if flags & regs.MSI_FLAGS_64BIT:
        dev.set_long(off + 8, 0)
        dev.set_word(off + 0x0C, 0)
    else:
        dev.set_word(off + 0x08, 0)


def msi_enabled(dev: PCIDevice) -> bool:
    return bool(dev.msi_cap) and bool(_flags(dev) & regs.MSI_FLAGS_ENABLE)


def msi_notify(dev: PCIDevice, vector: int) -> None:
    """Send vector ``vector`` (QEMU's ``msi_notify``): a DMA write of the message data."""
    off = dev.msi_cap
    flags = _flags(dev)
    is64 = bool(flags & regs.MSI_FLAGS_64BIT)
    addr = dev.get_long(off + regs.MSI_ADDRESS_LO)
    if is64:
        addr |= dev.get_long(off + 8) << 32
    data = dev.get_word(off + (0x0C if is64 else 0x08))
    nr = 1 << ((flags & regs.MSI_FLAGS_QSIZE) >> 4)
    if nr > 1:
        data = (data & ~(nr - 1)) | vector
    assert dev.bus_master_as is not None
    dev.bus_master_as.store(addr, data, 4)
