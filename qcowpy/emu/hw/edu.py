"""``edu``: QEMU's educational PCI device (hw/misc/edu.c), with the same register semantics.

BAR0 is 1 MiB of MMIO. Offsets below 0x80 take only 4-byte accesses, 0x80 and up 4 or 8 bytes;
anything else reads all-ones and is ignored on write.

====== ==== ============================================================================
offset  rw  meaning
====== ==== ============================================================================
0x00    ro  identification 0x010000ed (major 1, minor 0, 0xed)
0x04    rw  liveness check: reads back the bitwise inverse of what was written
0x08    rw  factorial: write n, read n! (32-bit, wrapping) once status bit 0 is clear
0x20    rw  status: bit 0 computing (ro), bit 7 raise interrupt 0x1 when a factorial is done
0x24    ro  interrupt status
0x60    wo  raise interrupt: ORs the value into interrupt status
0x64    wo  acknowledge interrupt: clears those bits; the line drops when status is 0
0x80    rw  DMA source address
0x88    rw  DMA destination address
0x90    rw  DMA transfer count
0x98    rw  DMA command: bit 0 start, bit 1 direction (0 RAM->device, 1 device->RAM),
            bit 2 raise interrupt 0x100 when done
====== ==== ============================================================================

The DMA buffer is 4 KiB at device address 0x40000. Like QEMU, a transfer starts 100 ms of
virtual time after the command is written (the guest side advances the clock), addresses are
clamped to ``dma_mask`` and interrupts go through MSI when the guest enabled it, else INTA.

Deliberate differences: the factorial is computed at once (QEMU uses a thread, so status bit 0
may be seen set briefly); a DMA range outside the buffer is ignored with a guest-error log line
where QEMU's ``hw_error`` aborts the whole emulator.
"""
from __future__ import annotations

import logging
from typing import Any, Optional

from ..clock import Timer, VirtualClock
from ..memory import AccessConstraints, Endianness, ImplConstraints, MemoryRegion, MemoryRegionOps
from ..pci import regs
from ..pci.device import INTERFACE_CONVENTIONAL_PCI_DEVICE, TYPE_PCI_DEVICE, PCIDevice, PCIDeviceClass
from ..pci.msi import msi_enabled, msi_init, msi_notify
from ..qom import Object, ObjectClass, ObjectProperty, TypeInfo, type_register_once

log = logging.getLogger(__name__)

TYPE_EDU = "edu"
FACT_IRQ = 0x00000001
DMA_IRQ = 0x00000100
DMA_START = 0x40000
DMA_SIZE = 4096
STATUS_COMPUTING = 0x01
STATUS_IRQFACT = 0x80
DMA_RUN = 0x1
DMA_DIR_TO_PCI = 0x2  # set: device buffer -> RAM
DMA_IRQ_EN = 0x4
MASK32 = 0xFFFFFFFF
MASK64 = (1 << 64) - 1


class EduState(PCIDevice):
    """edu's registers, DMA engine state and buffer."""

    mmio: MemoryRegion
    addr4: int
    fact: int
    status: int
    irq_status: int
    dma_src: int
    dma_dst: int
    dma_cnt: int
    dma_cmd: int
    dma_buf: bytearray
    dma_mask: int
    dma_timer: Optional[Timer]
    guest_errors: list[str]


def _clock(s: EduState) -> Optional[VirtualClock]:
    return getattr(s.bus, "clock", None) if s.bus is not None else None


def edu_raise_irq(s: EduState, val: int) -> None:
    s.irq_status = (s.irq_status | val) & MASK32
    if s.irq_status:
        if msi_enabled(s):
            msi_notify(s, 0)
        else:
            s.set_irq(1)


def edu_lower_irq(s: EduState, val: int) -> None:
    s.irq_status &= ~val & MASK32
    if not s.irq_status and not msi_enabled(s):
        s.set_irq(0)


def _in_buffer(addr: int, cnt: int) -> bool:
    end = addr + cnt
    return DMA_START <= addr < DMA_START + DMA_SIZE and end > addr and DMA_START <= end <= DMA_START + DMA_SIZE


def edu_dma_run(s: EduState) -> None:
    """The DMA timer callback: copy, clear RUN, maybe raise DMA_IRQ."""
    if not s.dma_cmd & DMA_RUN:
        return
    if s.dma_cmd & DMA_DIR_TO_PCI:
        src, dst = s.dma_src, s.dma_dst
        if _in_buffer(src, s.dma_cnt):
            off = src - DMA_START
            s.dma_write(dst & s.dma_mask, bytes(s.dma_buf[off:off + s.dma_cnt]))
        else:
            _guest_error(s, f"edu: DMA range {src:#018x}+{s.dma_cnt:#x} outside the buffer")
    else:
        src, dst = s.dma_src, s.dma_dst
        if _in_buffer(dst, s.dma_cnt):
            off = dst - DMA_START
            s.dma_buf[off:off + s.dma_cnt] = s.dma_read(src & s.dma_mask, s.dma_cnt)
        else:
            _guest_error(s, f"edu: DMA range {dst:#018x}+{s.dma_cnt:#x} outside the buffer")
    s.dma_cmd &= ~DMA_RUN
    if s.dma_cmd & DMA_IRQ_EN:
        edu_raise_irq(s, DMA_IRQ)


def _guest_error(s: EduState, msg: str) -> None:
    s.guest_errors.append(msg)
    log.warning(msg)


def edu_mmio_read(s: EduState, addr: int, size: int) -> int:
    val = MASK64
    if addr < 0x80 and size != 4:
        return val
    if addr >= 0x80 and size not in (4, 8):
        return val
    if addr == 0x00:
        val = 0x010000ED
    elif addr == 0x04:
        val = s.addr4
    elif addr == 0x08:
        val = s.fact
    elif addr == 0x20:
        val = s.status
    elif addr == 0x24:
        val = s.irq_status
    elif addr == 0x80:
        val = s.dma_src
    elif addr == 0x88:
        val = s.dma_dst
    elif addr == 0x90:
        val = s.dma_cnt
    elif addr == 0x98:
        val = s.dma_cmd
    return val


def _dma_reg_write(s: EduState, name: str, val: int) -> bool:
    if s.dma_cmd & DMA_RUN:
        return False
    setattr(s, name, val & MASK64)
    return True


def edu_mmio_write(s: EduState, addr: int, val: int, size: int) -> None:
    if addr < 0x80 and size != 4:
        return
    if addr >= 0x80 and size not in (4, 8):
        return
    if addr == 0x04:
        s.addr4 = ~val & MASK32
    elif addr == 0x08:
        if s.status & STATUS_COMPUTING:
            return
        n, ret = val & MASK32, 1
        while n > 0:
            ret = (ret * n) & MASK32
            n -= 1
        s.fact = ret
        if s.status & STATUS_IRQFACT:
            edu_raise_irq(s, FACT_IRQ)
    elif addr == 0x20:
        if val & STATUS_IRQFACT:
            s.status |= STATUS_IRQFACT
        else:
            s.status &= ~STATUS_IRQFACT
    elif addr == 0x60:
        edu_raise_irq(s, val & MASK32)
    elif addr == 0x64:
        edu_lower_irq(s, val & MASK32)
    elif addr == 0x80:
        _dma_reg_write(s, "dma_src", val)
    elif addr == 0x88:
        _dma_reg_write(s, "dma_dst", val)
    elif addr == 0x90:
        _dma_reg_write(s, "dma_cnt", val)
    elif addr == 0x98:
        if not val & DMA_RUN:
            return
        if _dma_reg_write(s, "dma_cmd", val):
            clock = _clock(s)
            if clock is None:
                edu_dma_run(s)
            else:
                if s.dma_timer is None:
                    s.dma_timer = clock.new_timer(lambda: edu_dma_run(s))
                s.dma_timer.mod_ms(clock.now_ms() + 100)


EDU_MMIO_OPS = MemoryRegionOps(
    read=edu_mmio_read, write=edu_mmio_write, endianness=Endianness.NATIVE,
    valid=AccessConstraints(min_access_size=4, max_access_size=8),
    impl=ImplConstraints(min_access_size=4, max_access_size=8),
)


def _reset_regs(s: EduState) -> None:
    s.addr4 = s.fact = s.status = s.irq_status = 0
    s.dma_src = s.dma_dst = s.dma_cnt = s.dma_cmd = 0


def edu_instance_init(obj: Object) -> None:
    s: EduState = obj  # type: ignore[assignment]
    _reset_regs(s)
    s.dma_buf = bytearray(DMA_SIZE)
    s.dma_mask = (1 << 28) - 1
    s.dma_timer = None
    s.guest_errors = []
    s.add_property(ObjectProperty("dma_mask", "uint64", lambda o: o.dma_mask,
                                  lambda o, v: setattr(o, "dma_mask", v), "DMA address mask"))


def edu_realize(pdev: PCIDevice) -> None:
    s: EduState = pdev  # type: ignore[assignment]
    s.config[regs.INTERRUPT_PIN] = 1
    msi_init(s, 0, 1, True, False)
    s.mmio = MemoryRegion.io_region(s, EDU_MMIO_OPS, s, "edu-mmio", 1 << 20)
    s.register_bar(0, regs.BASE_ADDRESS_SPACE_MEMORY, s.mmio)


def edu_exit(pdev: PCIDevice) -> None:
    s: EduState = pdev  # type: ignore[assignment]
    if s.dma_timer is not None:
        s.dma_timer.delete()


def edu_reset(dev: Any) -> None:
    # QEMU's edu has no reset handler: its registers survive system_reset. Only PCI state resets.
    dev.pci_reset()


def edu_class_init(klass: ObjectClass, _data: Any) -> None:
    k: PCIDeviceClass = klass  # type: ignore[assignment]
    k.realize = edu_realize
    k.exit = edu_exit
    k.vendor_id = regs.VENDOR_ID_QEMU
    k.device_id = 0x11E8
    k.revision = 0x10
    k.class_id = regs.CLASS_OTHERS
    k.desc = "QEMU's educational device (identification, liveness, factorial, interrupts, DMA)"
    k.reset = edu_reset


type_register_once(TypeInfo(
    name=TYPE_EDU, parent=TYPE_PCI_DEVICE, instance_type=EduState, instance_init=edu_instance_init,
    class_init=edu_class_init, interfaces=(INTERFACE_CONVENTIONAL_PCI_DEVICE,),
))
