"""A PCI function: configuration space with QEMU's write masks, BARs, capabilities, INTx and DMA.

Device models subclass :class:`PCIDevice` (their state) and register a type whose parent is
``pci-device``; ``class_init`` fills the IDs into :class:`PCIDeviceClass` and sets ``k.realize``,
which creates MemoryRegions and registers them as BARs with :meth:`PCIDevice.register_bar`.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Callable, Optional

from ..errors import DeviceError, PropertyError
from ..memory import SIZE_2_64, AddressSpace, MemoryRegion
from ..qdev import TYPE_DEVICE, DeviceClass, DeviceState, Property, device_class_set_props
from ..qom import TYPE_INTERFACE, ObjectClass, TypeInfo, type_register_once
from . import regs

if TYPE_CHECKING:
    from .bus import PCIBus

TYPE_PCI_DEVICE = "pci-device"
INTERFACE_CONVENTIONAL_PCI_DEVICE = "conventional-pci-device"
INTERFACE_PCIE_DEVICE = "pci-express-device"

PCI_NUM_REGIONS = 6


@dataclass
class PCIIORegion:
    """A registered BAR: its MemoryRegion, size, type bits and where it is mapped now."""

    memory: MemoryRegion
    size: int
    type: int
    address_space: MemoryRegion
    addr: int = regs.BAR_UNMAPPED

    @property
    def is_io(self) -> bool:
        return bool(self.type & regs.BASE_ADDRESS_SPACE_IO)

    @property
    def is_64(self) -> bool:
        return not self.is_io and bool(self.type & regs.BASE_ADDRESS_MEM_TYPE_64)

    @property
    def prefetch(self) -> bool:
        return not self.is_io and bool(self.type & regs.BASE_ADDRESS_MEM_PREFETCH)


class PCIDeviceClass(DeviceClass):
    """IDs and hooks of a PCI device type (QEMU's ``PCIDeviceClass``)."""

    realize: Optional[Callable[["PCIDevice"], None]]  # type: ignore[assignment]
    exit: Optional[Callable[["PCIDevice"], None]]
    config_read: Optional[Callable[["PCIDevice", int, int], int]]
    config_write: Optional[Callable[["PCIDevice", int, int, int], None]]
    vendor_id: int
    device_id: int
    revision: int
    class_id: int
    subsystem_vendor_id: int
    subsystem_id: int
    is_bridge: bool


def parse_pci_addr(value: Any) -> int:
    """Parse the ``addr`` property: ``SLOT[.FN]`` in hex (e.g. ``04.0``), or an int devfn."""
    if isinstance(value, int):
        return value
    text = str(value).strip()
    try:
        if "." in text:
            slot_s, fn_s = text.split(".", 1)
            slot, fn = int(slot_s, 16), int(fn_s, 16)
        else:
            slot, fn = int(text, 16), 0
    except ValueError:
        raise PropertyError(f"Property 'addr' doesn't take value '{value}'") from None
    if not (0 <= slot < 32 and 0 <= fn < 8):
        raise PropertyError(f"Property 'addr' doesn't take value '{value}'")
    return regs.devfn(slot, fn)


def format_pci_addr(devfn: int) -> str:
    return "<unset>" if devfn < 0 else f"{devfn >> 3:02x}.{devfn & 7:x}"


class PCIDevice(DeviceState):
    """State common to every PCI function."""

    klass: PCIDeviceClass
    devfn: int
    multifunction: bool
    config: bytearray
    wmask: bytearray
    w1cmask: bytearray
    cmask: bytearray
    used: bytearray
    io_regions: list[Optional[PCIIORegion]]
    irq_state: int
    bus: Optional["PCIBus"]
    bus_master_as: Optional[AddressSpace]
    config_write_hooks: list[Callable[[int, int, int], None]]
    msi_cap: int

    # -- identity --------------------------------------------------------------------------
    @property
    def name(self) -> str:
        return self.typename

    @property
    def slot(self) -> int:
        return self.devfn >> 3

    @property
    def function(self) -> int:
        return self.devfn & 7

    @property
    def is_express(self) -> bool:
        return self.is_a(INTERFACE_PCIE_DEVICE) and self.bus is not None and self.bus.is_express

    @property
    def config_size(self) -> int:
        return len(self.config)

    def get_byte(self, off: int) -> int:
        return self.config[off]

    def get_word(self, off: int) -> int:
        return int.from_bytes(self.config[off:off + 2], "little")

    def get_long(self, off: int) -> int:
        return int.from_bytes(self.config[off:off + 4], "little")

    def get_quad(self, off: int) -> int:
        return int.from_bytes(self.config[off:off + 8], "little")

    def set_byte(self, off: int, v: int, mask: Optional[bytearray] = None) -> None:
        self._set(self.config if mask is None else mask, off, v, 1)

    def set_word(self, off: int, v: int, mask: Optional[bytearray] = None) -> None:
        self._set(self.config if mask is None else mask, off, v, 2)

    def set_long(self, off: int, v: int, mask: Optional[bytearray] = None) -> None:
        self._set(self.config if mask is None else mask, off, v, 4)

    def set_quad(self, off: int, v: int, mask: Optional[bytearray] = None) -> None:
        self._set(self.config if mask is None else mask, off, v, 8)

    @staticmethod
    def _set(buf: bytearray, off: int, v: int, n: int) -> None:
        buf[off:off + n] = (v & ((1 << (8 * n)) - 1)).to_bytes(n, "little")

    # -- BARs ------------------------------------------------------------------------------
    def register_bar(self, n: int, bar_type: int, memory: MemoryRegion) -> None:
        """Expose ``memory`` as BAR ``n`` (QEMU's ``pci_register_bar``); size must be a power of 2."""
        size = memory.size
        if not 0 <= n < PCI_NUM_REGIONS:
            raise DeviceError(f"{self.name}: BAR index {n} out of range")
        if size == 0 or size & (size - 1):
            raise DeviceError(f"{self.name}: BAR{n} size {size:#x} is not a power of 2")
        is_io = bool(bar_type & regs.BASE_ADDRESS_SPACE_IO)
        is_64 = not is_io and bool(bar_type & regs.BASE_ADDRESS_MEM_TYPE_64)
        if is_64 and n == PCI_NUM_REGIONS - 1:
            raise DeviceError(f"{self.name}: a 64-bit BAR cannot be BAR5")
        assert self.bus is not None
        space = self.bus.address_space_io if is_io else self.bus.address_space_mem
        self.io_regions[n] = PCIIORegion(memory, size, bar_type, space)
        off = regs.BASE_ADDRESS_0 + 4 * n
        wmask = ~(size - 1)
        self.set_long(off, bar_type)
        if is_64:
            self.set_quad(off, wmask, self.wmask)
            self.set_quad(off, ~0, self.cmask)
        else:
            self.set_long(off, wmask & 0xFFFFFFFF, self.wmask)
            self.set_long(off, 0xFFFFFFFF, self.cmask)

    def bar_address(self, n: int) -> int:
        """Where BAR ``n`` decodes now, or BAR_UNMAPPED (QEMU's ``pci_bar_address``)."""
        r = self.io_regions[n]
        assert r is not None
        cmd = self.get_word(regs.COMMAND)
        off = regs.BASE_ADDRESS_0 + 4 * n
        if r.is_io:
            if not cmd & regs.COMMAND_IO:
                return regs.BAR_UNMAPPED
            new = self.get_long(off) & ~(r.size - 1) & 0xFFFFFFFC
            last = new + r.size - 1
            if last <= new or last >= 0xFFFFFFFF or new == 0:
                return regs.BAR_UNMAPPED
            return new
        if not cmd & regs.COMMAND_MEMORY:
            return regs.BAR_UNMAPPED
        raw = self.get_quad(off) if r.is_64 else self.get_long(off)
        new = raw & ~(r.size - 1) & ~0xF & (SIZE_2_64 - 1)
        last = new + r.size - 1
        if last <= new or new == 0 or last >= regs.BAR_UNMAPPED:
            return regs.BAR_UNMAPPED
        if not r.is_64 and last >= 0xFFFFFFFF:
            return regs.BAR_UNMAPPED
        return new

    def update_mappings(self) -> None:
        """Map or unmap BARs to follow the BAR registers and the decode enables."""
        for n, r in enumerate(self.io_regions):
            if r is None:
                continue
            new = self.bar_address(n)
            if new == r.addr:
                continue
            if r.addr != regs.BAR_UNMAPPED:
                r.address_space.del_subregion(r.memory)
            r.addr = new
            if new != regs.BAR_UNMAPPED:
                r.address_space.add_subregion(new, r.memory, priority=1)

    def unmap_all(self) -> None:
        for r in self.io_regions:
            if r is not None and r.addr != regs.BAR_UNMAPPED:
                r.address_space.del_subregion(r.memory)
                r.addr = regs.BAR_UNMAPPED

    # -- config space ------------------------------------------------------------------------
    def config_read(self, addr: int, length: int) -> int:
        """Config read, through the class hook if the device overrides it."""
        hook = self.klass.config_read
        return hook(self, addr, length) if hook else self.default_read_config(addr, length)

    def config_write(self, addr: int, value: int, length: int) -> None:
        hook = self.klass.config_write
        if hook:
            hook(self, addr, value, length)
        else:
            self.default_write_config(addr, value, length)

    def default_read_config(self, addr: int, length: int) -> int:
        return int.from_bytes(self.config[addr:addr + length], "little")

    def default_write_config(self, addr: int, value: int, length: int) -> None:
        """Apply the write masks byte by byte (wmask: writable; w1cmask: write 1 to clear)."""
        old_cmd = self.get_word(regs.COMMAND)
        for i in range(length):
            a = addr + i
            b = (value >> (8 * i)) & 0xFF
            wm, w1c = self.wmask[a], self.w1cmask[a]
            self.config[a] = (self.config[a] & ~wm & 0xFF) | (b & wm)
            self.config[a] &= ~(b & w1c) & 0xFF
        end = addr + length
        if _overlap(addr, end, regs.BASE_ADDRESS_0, 24) or _overlap(addr, end, regs.ROM_ADDRESS, 4) \
                or _overlap(addr, end, regs.COMMAND, 2):
            self.update_mappings()
        if _overlap(addr, end, regs.COMMAND, 2):
            new_cmd = self.get_word(regs.COMMAND)
            if (old_cmd ^ new_cmd) & regs.COMMAND_INTX_DISABLE:
                self._intx_disable_changed(bool(new_cmd & regs.COMMAND_INTX_DISABLE))
            self._update_bus_master()
        for hook in self.config_write_hooks:
            hook(addr, value, length)

    def _init_masks(self) -> None:
        size = self.config_size
        self.set_word(regs.COMMAND, regs.COMMAND_IO | regs.COMMAND_MEMORY | regs.COMMAND_MASTER
                      | regs.COMMAND_SERR | regs.COMMAND_INTX_DISABLE, self.wmask)
        self.wmask[regs.CACHE_LINE_SIZE] = 0xFF
        self.wmask[regs.INTERRUPT_LINE] = 0xFF
        self.wmask[regs.CONFIG_HEADER_SIZE:size] = b"\xff" * (size - regs.CONFIG_HEADER_SIZE)
        self.set_word(regs.STATUS, regs.STATUS_PARITY | regs.STATUS_SIG_TARGET_ABORT
                      | regs.STATUS_REC_TARGET_ABORT | regs.STATUS_REC_MASTER_ABORT
                      | regs.STATUS_SIG_SYSTEM_ERROR | regs.STATUS_DETECTED_PARITY, self.w1cmask)
        self.cmask[0:4] = b"\xff" * 4  # fields a migration would check: IDs, revision, class, header
        self.cmask[regs.STATUS] = regs.STATUS_CAP_LIST
        self.cmask[regs.REVISION_ID:regs.CACHE_LINE_SIZE] = b"\xff" * 4
        self.cmask[regs.HEADER_TYPE] = 0xFF
        self.used[0:regs.CONFIG_HEADER_SIZE] = b"\x01" * regs.CONFIG_HEADER_SIZE

    # -- capabilities ---------------------------------------------------------------------------
    def add_capability(self, cap_id: int, offset: int, size: int) -> int:
        """Insert a capability at the head of the list; ``offset`` 0 finds free dword-aligned space."""
        limit = regs.CONFIG_SPACE_SIZE
        if offset == 0:
            offset = self._find_space(size)
            if not offset:
                raise DeviceError(f"{self.name}: no space for capability {cap_id:#x} of {size} bytes")
        else:
            if offset < regs.CONFIG_HEADER_SIZE or offset + size > limit or any(self.used[offset:offset + size]):
                raise DeviceError(f"{self.name}: capability {cap_id:#x} at {offset:#x} overlaps or is out of range")
        self.config[offset] = cap_id
        self.config[offset + 1] = self.config[regs.CAPABILITY_LIST]
        self.config[regs.CAPABILITY_LIST] = offset
        self.set_word(regs.STATUS, self.get_word(regs.STATUS) | regs.STATUS_CAP_LIST)
        self.used[offset:offset + size] = b"\x01" * size
        self.wmask[offset:offset + size] = bytes(size)
        self.cmask[offset:offset + size] = b"\xff" * size
        return offset

    def _find_space(self, size: int) -> int:
        off = regs.CONFIG_HEADER_SIZE
        while off + size <= regs.CONFIG_SPACE_SIZE:
            if not any(self.used[off:off + size]):
                return off
            off += 4
        return 0

    def find_capability(self, cap_id: int) -> int:
        """Offset of the first capability with ``cap_id``, or 0."""
        if not self.get_word(regs.STATUS) & regs.STATUS_CAP_LIST:
            return 0
        off, seen = self.config[regs.CAPABILITY_LIST] & ~3, set()
        while off and off not in seen:
            seen.add(off)
            if self.config[off] == cap_id:
                return off
            off = self.config[off + 1] & ~3
        return 0

    # -- interrupts -----------------------------------------------------------------------------
    @property
    def intx_pin(self) -> int:
        """0-based INTx pin (0 = INTA), or -1 when the device has none."""
        return self.config[regs.INTERRUPT_PIN] - 1

    def set_irq(self, level: int) -> None:
        """Drive the device's INTx line (QEMU's ``pci_set_irq``); status bit 3 follows it."""
        pin = self.intx_pin
        if pin < 0:
            return
        level = 1 if level else 0
        if ((self.irq_state >> pin) & 1) == level:
            return
        self.irq_state ^= 1 << pin
        status = self.get_word(regs.STATUS)
        self.set_word(regs.STATUS, (status | regs.STATUS_INTERRUPT) if self.irq_state
                      else (status & ~regs.STATUS_INTERRUPT))
        if self.get_word(regs.COMMAND) & regs.COMMAND_INTX_DISABLE:
            return
        if self.bus is not None:
            self.bus.change_irq_level(self, pin, 1 if level else -1)

    def _intx_disable_changed(self, disabled: bool) -> None:
        if self.bus is None:
            return
        for pin in range(4):
            if (self.irq_state >> pin) & 1:
                self.bus.change_irq_level(self, pin, -1 if disabled else 1)

    def _deassert_intx(self) -> None:
        for pin in range(4):
            if (self.irq_state >> pin) & 1:
                self.set_irq(0)

    # -- DMA -----------------------------------------------------------------------------------
    def _update_bus_master(self) -> None:
        if self.bus_master_enable_region is not None:
            self.bus_master_enable_region.set_enabled(bool(self.get_word(regs.COMMAND) & regs.COMMAND_MASTER))

    def dma_read(self, addr: int, length: int) -> bytes:
        """Read guest memory as this device (fails open: all-ones when bus mastering is off)."""
        assert self.bus_master_as is not None
        return self.bus_master_as.read(addr, length)

    def dma_write(self, addr: int, data: bytes) -> None:
        assert self.bus_master_as is not None
        self.bus_master_as.write(addr, data)

    # -- reset -------------------------------------------------------------------------------
    def pci_reset(self) -> None:
        """Reset the PCI-visible state like QEMU's ``pci_do_device_reset``."""
        self._deassert_intx()
        for off, w in ((regs.COMMAND, 2), (regs.STATUS, 2)):
            mask = int.from_bytes(self.wmask[off:off + w], "little") | int.from_bytes(self.w1cmask[off:off + w], "little")
            self._set(self.config, off, int.from_bytes(self.config[off:off + w], "little") & ~mask, w)
        self.config[regs.INTERRUPT_LINE] &= ~(self.wmask[regs.INTERRUPT_LINE] | self.w1cmask[regs.INTERRUPT_LINE]) & 0xFF
        self.config[regs.CACHE_LINE_SIZE] = 0
        for n, r in enumerate(self.io_regions):
            if r is None:
                continue
            off = regs.BASE_ADDRESS_0 + 4 * n
            if r.is_64:
                self.set_quad(off, r.type)
            else:
                self.set_long(off, r.type)
        self.update_mappings()
        self._update_bus_master()
        for hook in self.reset_hooks:
            hook()

    bus_master_enable_region: Optional[MemoryRegion]
    reset_hooks: list[Callable[[], None]]


def _overlap(a_start: int, a_end: int, b_start: int, b_len: int) -> bool:
    return a_start < b_start + b_len and b_start < a_end


def _pci_instance_init(obj: Any) -> None:
    dev: PCIDevice = obj
    dev.config = bytearray(regs.CONFIG_SPACE_SIZE)
    dev.wmask = bytearray(regs.CONFIG_SPACE_SIZE)
    dev.w1cmask = bytearray(regs.CONFIG_SPACE_SIZE)
    dev.cmask = bytearray(regs.CONFIG_SPACE_SIZE)
    dev.used = bytearray(regs.CONFIG_SPACE_SIZE)
    dev.io_regions = [None] * PCI_NUM_REGIONS
    dev.irq_state = 0
    dev.bus = None
    dev.bus_master_as = None
    dev.bus_master_enable_region = None
    dev.config_write_hooks = []
    dev.reset_hooks = []
    dev.msi_cap = 0


def _pci_qdev_realize(dev_: DeviceState) -> None:
    """Register the function on its bus, set up config space and DMA, then call ``k.realize``."""
    from .bus import PCIBus  # local: bus imports device
    dev: PCIDevice = dev_  # type: ignore[assignment]
    k = dev.klass
    bus = dev.parent_bus
    if not isinstance(bus, PCIBus):
        raise DeviceError(f"{dev.name}: a PCI device needs a PCI bus")
    devfn = bus.allocate_devfn(dev, dev.devfn)
    dev.devfn = devfn
    dev.bus = bus
    size = regs.EXTENDED_CONFIG_SPACE_SIZE if dev.is_express else regs.CONFIG_SPACE_SIZE
    for name in ("config", "wmask", "w1cmask", "cmask", "used"):
        setattr(dev, name, bytearray(size))
    dev.set_word(regs.VENDOR_ID, k.vendor_id)
    dev.set_word(regs.DEVICE_ID, k.device_id)
    dev.set_byte(regs.REVISION_ID, k.revision)
    dev.set_word(regs.CLASS_DEVICE, k.class_id)
    if not k.is_bridge:
        dev.set_word(regs.SUBSYSTEM_VENDOR_ID, k.subsystem_vendor_id or regs.SUBVENDOR_ID_REDHAT_QUMRANET)
        dev.set_word(regs.SUBSYSTEM_ID, k.subsystem_id or regs.SUBDEVICE_ID_QEMU)
    if dev.multifunction:
        dev.config[regs.HEADER_TYPE] |= regs.HEADER_TYPE_MULTI_FUNCTION
    dev._init_masks()
    # bus master address space: an alias of the DMA root, enabled by COMMAND.MASTER
    container = MemoryRegion.container_region(dev, "bus master container", SIZE_2_64)
    enable = MemoryRegion.alias_region(dev, "bus master", bus.dma_root, 0, bus.dma_root.size)
    enable.set_enabled(False)
    container.add_subregion(0, enable)
    dev.bus_master_enable_region = enable
    dev.bus_master_as = AddressSpace(container, dev.name)
    bus.place(dev)
    try:
        if k.realize is not None:
            k.realize(dev)
    except BaseException:
        bus.remove(dev)
        dev.unmap_all()
        raise
    bus.register_address_space(dev.bus_master_as)


def _pci_qdev_unrealize(dev_: DeviceState) -> None:
    dev: PCIDevice = dev_  # type: ignore[assignment]
    k = dev.klass
    if k.exit is not None:
        k.exit(dev)
    dev._deassert_intx()
    dev.unmap_all()
    if dev.bus is not None:
        if dev.bus_master_as is not None:
            dev.bus.unregister_address_space(dev.bus_master_as)
        dev.bus.remove(dev)


def _pci_reset(dev_: DeviceState) -> None:
    dev: PCIDevice = dev_  # type: ignore[assignment]
    if dev.realized:
        dev.pci_reset()


def _pci_class_init(klass: ObjectClass, _data: Any) -> None:
    k: PCIDeviceClass = klass  # type: ignore[assignment]
    k.bus_realize = _pci_qdev_realize
    k.bus_unrealize = _pci_qdev_unrealize
    k.reset = _pci_reset
    k.realize = None
    k.exit = None
    k.config_read = None
    k.config_write = None
    k.vendor_id = k.device_id = k.revision = k.class_id = 0
    k.subsystem_vendor_id = k.subsystem_id = 0
    k.is_bridge = False
    k.bus_type = "PCI"
    device_class_set_props(k, [
        Property("addr", "int32", "devfn", -1, "Slot and optional function number, example: 06.0 or 06",
                 parse=parse_pci_addr, show=format_pci_addr),
        Property("multifunction", "bool", "multifunction", False, "on/off"),
    ])


type_register_once(TypeInfo(INTERFACE_CONVENTIONAL_PCI_DEVICE, parent=TYPE_INTERFACE, abstract=True))
type_register_once(TypeInfo(INTERFACE_PCIE_DEVICE, parent=TYPE_INTERFACE, abstract=True))
type_register_once(TypeInfo(TYPE_PCI_DEVICE, parent=TYPE_DEVICE, instance_type=PCIDevice,
                            class_type=PCIDeviceClass, instance_init=_pci_instance_init,
                            class_init=_pci_class_init, abstract=True))
