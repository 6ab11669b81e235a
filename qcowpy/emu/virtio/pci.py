"""The virtio 1.x PCI transport ("modern" only) and the ``virtio-blk-pci`` device.

Layout, as in QEMU's virtio-pci with its defaults: one 16 KiB 64-bit prefetchable memory BAR
(BAR4) holding the common configuration at 0x0000, the ISR byte at 0x1000, the device
configuration at 0x2000 and the notification area at 0x3000 (``notify_off_multiplier`` 4, queue
*n* notifies at 0x3000 + 4*n; like QEMU, the address picks the queue and the value written is
ignored). Four vendor-specific capabilities (cfg_type COMMON, NOTIFY, ISR, DEVICE) point into it,
and a fifth, VIRTIO_PCI_CAP_PCI_CFG at 0x84, is the spec's window into those registers through
configuration space alone (see ``_cfg_window``). There is no legacy I/O BAR.

Interrupts: the ISR register collects bit 0 (used buffers) and bit 1 (configuration change; like
QEMU's virtio_notify_config, a configuration interrupt sets both bits and bumps
``config_generation``); reading it returns and clears them and lowers INTx. While MSI-X is off (or the ``vectors``
property is 0), every interrupt raises INTx pin A. With ``vectors`` N > 0 (default 2, like QEMU)
the function also has MSI-X: an N-entry table at 0 and the PBA at 0x800 of a 4 KiB 32-bit BAR1
(both moved apart, and the BAR grown, past 128 vectors), and the capability at 0x98, the first
free space after the PCI_CFG capability, as in QEMU 7.2.
``msix_config`` and ``queue_msix_vector`` accept a vector below N and read back NO_VECTOR
(0xffff) for anything else; a device reset sets them to NO_VECTOR and forgets pending vectors.
Once the guest enables MSI-X, used-buffer interrupts go to the queue's vector and configuration
interrupts (NEEDS_RESET) to ``msix_config``; INTx stays low and, as in QEMU, the ISR bits are
still set (and cleared by reading). An interrupt whose vector is NO_VECTOR is dropped.

Bus mastering, as in QEMU's ``virtio_write_config``: a config write that leaves COMMAND's bus-master
bit clear also clears DRIVER_OK, and the device neither processes queues nor interrupts until the
bit is set again (the driver then sets DRIVER_OK again).

Notifications are served synchronously, inside the MMIO write that carries them.
"""
from __future__ import annotations

import logging
import struct
from typing import Any, Optional

from qcowpy.virtio.blk import VIRTIO_F_VERSION_1, VIRTIO_ID_BLOCK, VirtioBlk
from qcowpy.virtio.split import SplitVirtQueue, VirtQueueError

from ..errors import DeviceError
from ..memory import AccessConstraints, Endianness, ImplConstraints, MemoryRegion, MemoryRegionOps
from ..pci import regs
from ..pci.msix import (msix_enabled, msix_init_exclusive_bar, msix_notify, msix_unuse_all_vectors,
                        msix_vector_unuse, msix_vector_use)
from ..pci.device import INTERFACE_CONVENTIONAL_PCI_DEVICE, TYPE_PCI_DEVICE, PCIDevice, PCIDeviceClass
from ..qdev import Property, device_class_set_props
from ..qom import ObjectClass, TypeInfo, type_register_once
from .memory import AddressSpaceMemory

log = logging.getLogger(__name__)

TYPE_VIRTIO_BLK_PCI = "virtio-blk-pci"
VIRTIO_PCI_VENDOR_ID = 0x1AF4
VIRTIO_PCI_DEVICE_ID_BASE = 0x1040

# device status
VIRTIO_CONFIG_S_ACKNOWLEDGE = 1
VIRTIO_CONFIG_S_DRIVER = 2
VIRTIO_CONFIG_S_DRIVER_OK = 4
VIRTIO_CONFIG_S_FEATURES_OK = 8
VIRTIO_CONFIG_S_NEEDS_RESET = 0x40
VIRTIO_CONFIG_S_FAILED = 0x80

# capability cfg_type
VIRTIO_PCI_CAP_COMMON_CFG = 1
VIRTIO_PCI_CAP_NOTIFY_CFG = 2
VIRTIO_PCI_CAP_ISR_CFG = 3
VIRTIO_PCI_CAP_DEVICE_CFG = 4
VIRTIO_PCI_CAP_PCI_CFG = 5

VIRTIO_MSI_NO_VECTOR = 0xFFFF
VIRTIO_QUEUE_MAX = 1024  # QEMU's limit on queue indices (its queue_msix_vector exists for each)
VIRTIO_PCI_ISR_QUEUE = 1
VIRTIO_PCI_ISR_CONFIG = 2

# common configuration offsets
COMMON_DFSELECT = 0
COMMON_DF = 4
COMMON_GFSELECT = 8
COMMON_GF = 12
COMMON_MSIX = 16
COMMON_NUMQ = 18
COMMON_STATUS = 20
COMMON_CFGGENERATION = 21
COMMON_Q_SELECT = 22
COMMON_Q_SIZE = 24
COMMON_Q_MSIX = 26
COMMON_Q_ENABLE = 28
COMMON_Q_NOFF = 30
COMMON_Q_DESCLO = 32
COMMON_Q_DESCHI = 36
COMMON_Q_AVAILLO = 40
COMMON_Q_AVAILHI = 44
COMMON_Q_USEDLO = 48
COMMON_Q_USEDHI = 52
COMMON_SIZE = 56

MODERN_BAR = 4
BAR_SIZE = 0x4000
COMMON_OFF, ISR_OFF, DEVICE_OFF, NOTIFY_OFF = 0x0000, 0x1000, 0x2000, 0x3000
REGION_SIZE = 0x1000
NOTIFY_MULT = 4
MSIX_BAR = 1
#: where QEMU 7.2 (and we, by the same first-fit placement) put the PCI_CFG and MSI-X capabilities
PCI_CFG_CAP_OFFSET = 0x84
MSIX_CAP_OFFSET = 0x98
# struct virtio_pci_cfg_cap: the 16-byte virtio_pci_cap, then the 4-byte data window
CFG_CAP_BAR, CFG_CAP_OFFSET, CFG_CAP_LENGTH, CFG_CAP_DATA, CFG_CAP_SIZE = 4, 8, 12, 16, 20
DEFAULT_VECTORS = 2  # QEMU: one per queue plus one for configuration changes


class VirtIOPCIState(PCIDevice):
    """Transport state: status, features, queue registers and the device model behind them."""

    vdev: VirtioBlk
    queues: list[SplitVirtQueue]
    status: int
    isr: int
    dfselect: int
    gfselect: int
    guest_features: int
    queue_sel: int
    config_generation: int
    bar_mr: MemoryRegion
    drive_id: Optional[str]
    serial: Optional[str]
    queue_size: int
    vectors: int
    config_vector: int
    queue_vectors: dict[int, int]  # queue index -> vector; absent queues keep one too, as in QEMU
    drive: Any
    broken_reason: str
    pci_cfg_cap: int
    disabled: bool  # bus mastering is off: no queue processing and no interrupts (QEMU's vdev->disabled)

    # -- device life cycle --------------------------------------------------------------------------
    def virtio_reset(self) -> None:
        self.status = 0
        self.isr = 0
        self.dfselect = self.gfselect = 0
        self.guest_features = 0
        self.queue_sel = 0
        self.broken_reason = ""
        self.disabled = False  # QEMU's virtio_reset forgets it too, whatever COMMAND says
        for q in self.queues:
            q.reset()
            q.indirect = q.event_idx = False
        self.config_vector = VIRTIO_MSI_NO_VECTOR
        self.queue_vectors = {}
        msix_unuse_all_vectors(self)
        self.set_irq(0)

    def virtio_error(self, reason: str) -> None:
        """QEMU's ``virtio_error``: the device is broken until the driver resets it."""
        self.broken_reason = reason
        self.status |= VIRTIO_CONFIG_S_NEEDS_RESET
        if self.status & VIRTIO_CONFIG_S_DRIVER_OK:  # QEMU's virtio_notify_config
            self.isr |= VIRTIO_PCI_ISR_CONFIG | VIRTIO_PCI_ISR_QUEUE  # QEMU sets both bits (0x3)
            self.config_generation = (self.config_generation + 1) & 0xFF
            self.interrupt(self.config_vector)

    def interrupt(self, vector: int) -> None:
        """Signal the driver (QEMU's ``virtio_pci_notify``): the MSI-X vector when MSI-X is on,
        else INTx. The caller has already set the ISR bit."""
        if self.disabled:
            return
        if msix_enabled(self):
            if vector != VIRTIO_MSI_NO_VECTOR:
                msix_notify(self, vector)
        else:
            self.set_irq(1)

    def _set_vector(self, old: int, new: int) -> int:
        """Move a vector register from ``old`` to ``new``; a vector the function does not have
        becomes NO_VECTOR, which is how a driver learns that the assignment failed."""
        if old != VIRTIO_MSI_NO_VECTOR:
            msix_vector_unuse(self, old)
        if new >= self.vectors:
            return VIRTIO_MSI_NO_VECTOR
        msix_vector_use(self, new)
        return new

    @property
    def host_features(self) -> int:
        return self.vdev.host_features()

    def notify(self, n: int) -> None:
        if n >= len(self.queues) or self.status & VIRTIO_CONFIG_S_NEEDS_RESET or self.disabled:
            return
        if not self.status & VIRTIO_CONFIG_S_DRIVER_OK:
            return
        q = self.queues[n]
        if not q.ready:
            return
        try:
            if q.desc % 16 or q.avail % 2 or q.used % 4:
                raise VirtQueueError("misaligned virtqueue")
            if self.vdev.process_queue(q):
                self.isr |= VIRTIO_PCI_ISR_QUEUE
                self.interrupt(self.queue_vectors.get(n, VIRTIO_MSI_NO_VECTOR))
        except VirtQueueError as e:
            self.virtio_error(str(e))

    # -- common configuration -------------------------------------------------------------------------
    def _common_image(self) -> bytes:
        q = self.queues[self.queue_sel] if self.queue_sel < len(self.queues) else None
        df = (self.host_features >> (32 * self.dfselect)) & 0xFFFFFFFF if self.dfselect < 2 else 0
        gf = (self.guest_features >> (32 * self.gfselect)) & 0xFFFFFFFF if self.gfselect < 2 else 0
        b = bytearray(COMMON_SIZE)
        struct.pack_into("<IIIIHHBBH", b, 0, self.dfselect, df, self.gfselect, gf, self.config_vector,
                         len(self.queues), self.status, self.config_generation, self.queue_sel)
        if q is not None:
            struct.pack_into("<H2xHHQQQ", b, COMMON_Q_SIZE, q.num, int(q.ready), self.queue_sel,
                             q.desc, q.avail, q.used)
        if self.queue_sel < VIRTIO_QUEUE_MAX:  # QEMU keeps a vector even for queues that do not exist
            struct.pack_into("<H", b, COMMON_Q_MSIX, self.queue_vectors.get(self.queue_sel, VIRTIO_MSI_NO_VECTOR))
        return bytes(b)

    def common_read(self, addr: int, size: int) -> int:
        if addr + size > COMMON_SIZE:
            return 0
        return int.from_bytes(self._common_image()[addr:addr + size], "little")

    def common_write(self, addr: int, val: int, size: int) -> None:
        q = self.queues[self.queue_sel] if self.queue_sel < len(self.queues) else None
        if addr == COMMON_DFSELECT and size == 4:
            self.dfselect = val
        elif addr == COMMON_GFSELECT and size == 4:
            self.gfselect = val
        elif addr == COMMON_GF and size == 4:
            if self.gfselect < 2 and not self.status & VIRTIO_CONFIG_S_FEATURES_OK:
                shift = 32 * self.gfselect
                self.guest_features = (self.guest_features & ~(0xFFFFFFFF << shift)) | (val << shift)
        elif addr == COMMON_STATUS and size == 1:
            self._set_status(val)
        elif addr == COMMON_Q_SELECT and size == 2:
            self.queue_sel = val
        # the vector registers take any access size (as in QEMU), and queue_msix_vector stays
        # writable after the queue is enabled
        elif addr == COMMON_MSIX:
            self.config_vector = self._set_vector(self.config_vector, val)
        elif addr == COMMON_Q_MSIX and self.queue_sel < VIRTIO_QUEUE_MAX:
            old = self.queue_vectors.get(self.queue_sel, VIRTIO_MSI_NO_VECTOR)
            self.queue_vectors[self.queue_sel] = self._set_vector(old, val)
        elif q is None or q.ready:
            return  # queue registers of an absent or enabled queue are read-only
        elif addr == COMMON_Q_SIZE and size == 2:
            if 0 < val <= q.max_size and not val & (val - 1):
                q.num = val
        elif addr == COMMON_Q_ENABLE and size == 2:
            if val == 1:
                q.ready = True
        elif addr in (COMMON_Q_DESCLO, COMMON_Q_DESCHI, COMMON_Q_AVAILLO, COMMON_Q_AVAILHI,
                      COMMON_Q_USEDLO, COMMON_Q_USEDHI) and size == 4:
            name = {COMMON_Q_DESCLO: "desc", COMMON_Q_DESCHI: "desc", COMMON_Q_AVAILLO: "avail",
                    COMMON_Q_AVAILHI: "avail", COMMON_Q_USEDLO: "used", COMMON_Q_USEDHI: "used"}[addr]
            shift = 32 if addr % 8 == 4 else 0
            old = getattr(q, name)
            setattr(q, name, (old & ~(0xFFFFFFFF << shift)) | (val << shift))

    def _set_status(self, val: int) -> None:
        if val == 0:
            self.virtio_reset()
            return
        if val & VIRTIO_CONFIG_S_FEATURES_OK and not self.status & VIRTIO_CONFIG_S_FEATURES_OK:
            ok = not (self.guest_features & ~self.host_features) and \
                self.guest_features & (1 << VIRTIO_F_VERSION_1)
            if not ok:
                val &= ~VIRTIO_CONFIG_S_FEATURES_OK
            else:
                from qcowpy.virtio.blk import VIRTIO_F_RING_EVENT_IDX, VIRTIO_F_RING_INDIRECT_DESC
                for q in self.queues:
                    q.indirect = bool(self.guest_features & (1 << VIRTIO_F_RING_INDIRECT_DESC))
                    q.event_idx = bool(self.guest_features & (1 << VIRTIO_F_RING_EVENT_IDX))
        keep = self.status & VIRTIO_CONFIG_S_NEEDS_RESET
        self.status = (val & 0xFF & ~VIRTIO_CONFIG_S_NEEDS_RESET) | keep

    # -- the BAR ----------------------------------------------------------------------------------------
    def bar_read(self, addr: int, size: int) -> int:
        if addr < COMMON_OFF + REGION_SIZE:
            return self.common_read(addr - COMMON_OFF, size)
        if addr < ISR_OFF + REGION_SIZE:  # any byte of the ISR region reads (and clears) it
            v = self.isr
            self.isr = 0
            self.set_irq(0)
            return v
        if addr < DEVICE_OFF + REGION_SIZE:
            cfg = self.vdev.config()
            off = addr - DEVICE_OFF
            if off + size > len(cfg):  # like QEMU: an access past the structure reads all-ones
                return (1 << (8 * size)) - 1
            return int.from_bytes(cfg[off:off + size], "little")
        return 0

    def bar_write(self, addr: int, val: int, size: int) -> None:
        if addr < COMMON_OFF + REGION_SIZE:
            self.common_write(addr - COMMON_OFF, val, size)
        elif NOTIFY_OFF <= addr < NOTIFY_OFF + REGION_SIZE:
            self.notify((addr - NOTIFY_OFF) // NOTIFY_MULT)  # the address names the queue, as in QEMU
        # ISR and device config writes are ignored (no writable config fields are offered)


_BAR_OPS = MemoryRegionOps(
    read=lambda s, a, n: s.bar_read(a, n), write=lambda s, a, v, n: s.bar_write(a, v, n),
    endianness=Endianness.LITTLE,
    valid=AccessConstraints(min_access_size=1, max_access_size=4, unaligned=False),
    impl=ImplConstraints(min_access_size=1, max_access_size=4, unaligned=False),
)


def _add_virtio_cap(s: PCIDevice, cfg_type: int, offset: int, length: int, extra: bytes = b"",
                    bar: int = MODERN_BAR) -> int:
    cap_len = 16 + len(extra)
    pos = s.add_capability(regs.CAP_ID_VNDR, 0, cap_len)
    body = struct.pack("<BBBBHII", cap_len, cfg_type, bar, 0, 0, offset, length) + extra
    s.config[pos + 2:pos + 2 + len(body)] = body[:cap_len - 2]
    return pos


def _cfg_window(s: VirtIOPCIState, addr: int, length: int, write: bool) -> None:
    """VIRTIO_PCI_CAP_PCI_CFG: the driver puts a BAR offset and an access size (1, 2 or 4) in the
    capability; touching its data dword then performs that access on the BAR registers, copying
    through the dword. Like QEMU, the ``bar`` field is not consulted, the offset is aligned down
    to the size, and an access that does not fit inside one of the four register regions (or any
    other size) does nothing."""
    cap = s.pci_cfg_cap
    data = cap + CFG_CAP_DATA
    if not (addr < data + 4 and data < addr + length):
        return
    size = s.get_long(cap + CFG_CAP_LENGTH)
    if size not in (1, 2, 4):
        return
    off = s.get_long(cap + CFG_CAP_OFFSET) & ~(size - 1)
    base = off - off % REGION_SIZE
    if base > NOTIFY_OFF or off + size > base + REGION_SIZE:
        return
    if write:
        s.bar_write(off, int.from_bytes(s.config[data:data + size], "little"), size)
    else:
        s.config[data:data + size] = s.bar_read(off, size).to_bytes(size, "little")


def _config_write(pdev: PCIDevice, addr: int, val: int, length: int) -> None:
    s: VirtIOPCIState = pdev  # type: ignore[assignment]
    s.default_write_config(addr, val, length)
    if addr <= regs.COMMAND < addr + length:
        s.disabled = not s.config[regs.COMMAND] & regs.COMMAND_MASTER
        if s.disabled:
            s.status &= ~VIRTIO_CONFIG_S_DRIVER_OK
    _cfg_window(s, addr, length, write=True)


def _config_read(pdev: PCIDevice, addr: int, length: int) -> int:
    s: VirtIOPCIState = pdev  # type: ignore[assignment]
    _cfg_window(s, addr, length, write=False)
    return s.default_read_config(addr, length)


def _instance_init(obj: Any) -> None:
    s: VirtIOPCIState = obj
    s.queues = []
    s.status = s.isr = 0
    s.config_generation = 0
    s.config_vector = VIRTIO_MSI_NO_VECTOR
    s.queue_vectors = {}
    s.drive = None
    s.broken_reason = ""
    s.pci_cfg_cap = 0
    s.disabled = False


def _resolve_drive(s: VirtIOPCIState) -> Any:
    if s.drive_id is None:
        return None
    drive = s.drive_id if not isinstance(s.drive_id, str) else None
    if drive is None:
        bus = s.parent_bus
        drives = getattr(getattr(bus, "machine", None), "drives", {})
        drive = drives.get(s.drive_id)
        if drive is None:
            raise DeviceError(f"Property 'virtio-blk-device.drive' can't find value '{s.drive_id}'")
    if getattr(drive, "attached_to", None) is not None:
        raise DeviceError(f"Property 'virtio-blk-device.drive' can't take value '{drive.id}', "
                          f"it's in use")
    return drive


def _realize(pdev: PCIDevice) -> None:
    s: VirtIOPCIState = pdev  # type: ignore[assignment]
    drive = _resolve_drive(s)
    if drive is None:
        raise DeviceError("drive property not set")
    if not 2 <= s.queue_size <= 1024 or s.queue_size & (s.queue_size - 1):
        raise DeviceError(f"invalid queue-size property ({s.queue_size}), must be a power of 2 in [2, 1024]")
    if s.vectors > regs.MSIX_MAX_ENTRIES:  # as QEMU: a warning, and the device without MSI-X
        log.warning("%s: unable to init msix vectors to %d", TYPE_VIRTIO_BLK_PCI, s.vectors)
        s.vectors = 0
    serial = s.serial if s.serial is not None else (drive.serial or "")
    s.vdev = VirtioBlk(drive.blk, read_only=drive.read_only, serial=serial, queue_size=s.queue_size)
    assert s.bus_master_as is not None
    mem = AddressSpaceMemory(s.bus_master_as)
    s.queues = [SplitVirtQueue(mem, s.queue_size)]
    s.config[regs.INTERRUPT_PIN] = 1
    s.bar_mr = MemoryRegion.io_region(s, _BAR_OPS, s, "virtio-pci", BAR_SIZE)
    s.register_bar(MODERN_BAR, regs.BASE_ADDRESS_MEM_TYPE_64 | regs.BASE_ADDRESS_MEM_PREFETCH, s.bar_mr)
    # QEMU's order and placement: common 0x40, ISR 0x50, device 0x60, notify 0x70 (each new
    # capability becomes the list head, so a driver meets notify first)
    _add_virtio_cap(s, VIRTIO_PCI_CAP_COMMON_CFG, COMMON_OFF, REGION_SIZE)
    _add_virtio_cap(s, VIRTIO_PCI_CAP_ISR_CFG, ISR_OFF, REGION_SIZE)
    _add_virtio_cap(s, VIRTIO_PCI_CAP_DEVICE_CFG, DEVICE_OFF, REGION_SIZE)
    _add_virtio_cap(s, VIRTIO_PCI_CAP_NOTIFY_CFG, NOTIFY_OFF, REGION_SIZE, struct.pack("<I", NOTIFY_MULT))
    # the PCI_CFG window at 0x84: bar, offset, length and data are the guest's to write
    s.pci_cfg_cap = cap = _add_virtio_cap(s, VIRTIO_PCI_CAP_PCI_CFG, 0, 0, bytes(4), bar=0)
    s.wmask[cap + CFG_CAP_BAR] = 0xFF
    s.wmask[cap + CFG_CAP_OFFSET:cap + CFG_CAP_SIZE] = b"\xff" * (CFG_CAP_SIZE - CFG_CAP_OFFSET)
    if s.vectors:
        msix_init_exclusive_bar(s, s.vectors, MSIX_BAR)  # first fit lands at MSIX_CAP_OFFSET
    s.drive = drive
    drive.attached_to = s
    s.virtio_reset()


def _exit(pdev: PCIDevice) -> None:
    s: VirtIOPCIState = pdev  # type: ignore[assignment]
    if s.drive is not None:
        s.drive.attached_to = None
        s.drive = None


def _reset(dev: Any) -> None:
    if dev.realized:
        dev.virtio_reset()
        dev.pci_reset()


def _class_init(klass: ObjectClass, _data: Any) -> None:
    k: PCIDeviceClass = klass  # type: ignore[assignment]
    k.realize = _realize
    k.exit = _exit
    k.vendor_id = VIRTIO_PCI_VENDOR_ID
    k.device_id = VIRTIO_PCI_DEVICE_ID_BASE + VIRTIO_ID_BLOCK
    k.revision = 1
    k.class_id = 0x0100  # PCI_CLASS_STORAGE_SCSI, as QEMU's virtio-blk-pci
    k.subsystem_vendor_id = VIRTIO_PCI_VENDOR_ID
    k.subsystem_id = 0x1100  # QEMU's modern-only value (PCI_SUBDEVICE_ID_QEMU)
    k.desc = "Virtio block device (virtio 1.x modern PCI, split rings, INTx and MSI-X)"
    k.category = "storage"
    k.reset = _reset
    k.config_read = _config_read
    k.config_write = _config_write
    device_class_set_props(k, [
        Property("drive", "str", "drive_id", None, "Node name or ID of a block device to use as a backend"),
        Property("serial", "str", "serial", None, "serial number reported by GET_ID (default: the drive's)"),
        Property("queue-size", "uint16", "queue_size", 256, "virtqueue size (power of 2, 2..1024)"),
        Property("vectors", "uint32", "vectors", DEFAULT_VECTORS, "MSI-X vectors (0: no MSI-X, INTx only)"),
    ])


type_register_once(TypeInfo(
    name=TYPE_VIRTIO_BLK_PCI, parent=TYPE_PCI_DEVICE, instance_type=VirtIOPCIState,
    instance_init=_instance_init, class_init=_class_init, interfaces=(INTERFACE_CONVENTIONAL_PCI_DEVICE,),
))
