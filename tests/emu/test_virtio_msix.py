"""MSI-X on virtio-blk-pci: the capability, table and PBA, the vector registers, delivery to guest
RAM, masking and pending bits, INTx staying quiet, resets; in-process, then with QEMU as the oracle.

The guest side is libqos's: enable MSI-X in the capability, point table entries at words of guest
RAM, select them with ``msix_config`` / ``queue_msix_vector``, then poll the words.
"""
from __future__ import annotations

import struct

import pytest

import qcowpy
from qcowpy.emu.guest.firmware import pci_boot
from qcowpy.emu.guest.pci import GuestMSIX, GuestPCIBus
from qcowpy.emu.guest.qtest import InProcessQTest, launch_emu, launch_qemu
from qcowpy.emu.guest.virtio import (MSIX, NO_VECTOR, Q_MSIX, Q_SELECT, Q_SIZE, STATUS_NEEDS_RESET, GuestAlloc,
                                     VirtioPCIGuest)
from qcowpy.emu.guest.virtio_blk import MSIX_QUEUE_DATA, GuestDisk
from qcowpy.emu.errors import PropertyError
from qcowpy.emu.machine import create_machine
from qcowpy.emu.pci import regs
from qcowpy.emu.pci.msix import msix_notify, msix_vector_use
from qcowpy.emu.virtio.pci import MSIX_CAP_OFFSET

from .conftest import image_pair, require_qemu

MiB = 1 << 20


def _boot(tmp_path, vectors=None):
    """A booted mini-pc with one virtio-blk-pci (``vectors`` as given, else the default)."""
    path = str(tmp_path / "disk.qcow2")
    qcowpy.create(path, 8 * MiB)
    m = create_machine("mini-pc", "64M")
    m.drive_add(path, id="d0", interface="none")
    props = {"drive": "d0"} if vectors is None else {"drive": "d0", "vectors": str(vectors)}
    m.device_add("virtio-blk-pci", props)
    qts = InProcessQTest(m)
    pci_boot(qts, m.ram_size)
    dev = next(d for d in GuestPCIBus(qts).scan() if d.vendor_id == 0x1AF4)
    return m, qts, dev


@pytest.fixture
def env(tmp_path):
    m, qts, dev = _boot(tmp_path)
    yield m, qts, dev
    qts.close()
    m.shutdown()


def _model(m):
    """The device model behind the guest's view (for calls a guest cannot make)."""
    (model,) = m.child("peripheral-anon").children().values()
    return model


def _irq(m, dev) -> bool:
    return m.irq_levels[dev.readb(regs.INTERRUPT_LINE)]


def _intx_status(dev) -> int:
    return dev.readw(regs.STATUS) & regs.STATUS_INTERRUPT


def _loop(disk):
    """A two-descriptor loop: the device must stop with NEEDS_RESET and a configuration interrupt."""
    vq, qts = disk.vq, disk.qts
    qts.memwrite(vq.desc, struct.pack("<QIHH", disk.hdr, 16, 1, 1) + struct.pack("<QIHH", disk.buf, 16, 1, 0))
    qts.writew(vq.avail + 4 + 2 * (vq.avail_idx % vq.size), 0)
    qts.writew(vq.avail + 2, (vq.avail_idx + 1) & 0xFFFF)
    qts.writew(vq.notify_addr, 0)


# -- in-process ------------------------------------------------------------------------------------

@pytest.mark.parametrize("vectors", [None, 1, 5, 200])
def test_capability_and_bar_layout(tmp_path, vectors):
    m, qts, dev = _boot(tmp_path, vectors)
    n = 2 if vectors is None else vectors
    caps = dev.capabilities()
    cap = dev.find_capability(regs.CAP_ID_MSIX)
    assert caps[0] == (cap, regs.CAP_ID_MSIX) and cap == MSIX_CAP_OFFSET  # list head, after the vendor caps
    assert [cid for _, cid in caps[1:]] == [regs.CAP_ID_VNDR] * 5
    assert dev.readb(cap + 1) == caps[1][0]
    assert dev.readw(cap + regs.MSIX_FLAGS) == n - 1
    pba_off = max(0x800, 16 * n)                                         # table in the low half, PBA above
    assert dev.readl(cap + regs.MSIX_TABLE) == 0 | 1
    assert dev.readl(cap + regs.MSIX_PBA) == pba_off | 1
    bar1 = next(b for b in dev.size_bars() if b.index == 1)
    assert (bar1.is_io, bar1.is_64, bar1.prefetch) == (False, False, False)
    pba_end = pba_off + 8 * -(-n // 64)                                  # whole 64-bit PBA words
    assert bar1.size == max(0x1000, 1 << (pba_end - 1).bit_length())      # a power of two, 4 KiB at least
    msix = GuestMSIX(dev)
    assert msix.table_size == n
    for v in range(n):                                                   # reset state: zero, masked
        off = msix.entry(v)
        assert [msix.table.readl(off + 4 * i) for i in range(4)] == [0, 0, 0, 1]
        assert not msix.pending(v)
    m.shutdown()


def test_message_control_and_table_registers(env):
    m, qts, dev = env
    cap = dev.find_capability(regs.CAP_ID_MSIX)
    msix = GuestMSIX(dev)
    table_reg, pba_reg = dev.readl(cap + regs.MSIX_TABLE), dev.readl(cap + regs.MSIX_PBA)
    dev.writew(cap + regs.MSIX_FLAGS, 0xFFFF)                            # only enable and function mask stick
    assert dev.readw(cap + regs.MSIX_FLAGS) == 0xC001
    dev.writel(cap + regs.MSIX_TABLE, 0xFFFFFFFF)
    dev.writel(cap + regs.MSIX_PBA, 0xFFFFFFFF)
    assert (dev.readl(cap + regs.MSIX_TABLE), dev.readl(cap + regs.MSIX_PBA)) == (table_reg, pba_reg)
    dev.writew(cap + regs.MSIX_FLAGS, 0)
    assert dev.readw(cap + regs.MSIX_FLAGS) == 0x0001
    off = msix.entry(1)
    for i, v in enumerate((0xFEE01004, 0x1, 0xABCD, 0xFFFFFFFE)):
        msix.table.writel(off + 4 * i, v)
    assert [msix.table.readl(off + 4 * i) for i in range(4)] == [0xFEE01004, 0x1, 0xABCD, 0xFFFFFFFE]
    assert msix.table.read(off, 8) == 0x1_FEE01004                         # 8-byte accesses are split
    msix.table.write(off + 8, 0x1_0000_5555, 8)
    assert (msix.table.readl(off + 8), msix.table.readl(off + 12)) == (0x5555, 1)
    assert msix.table.read(off + 8, 1) == 0 and msix.table.read(off + 8, 2) == 0   # too small: rejected
    msix.pba.writel(msix.pba_off, 0xFFFFFFFF)                             # the PBA is read-only
    assert msix.pba.readl(msix.pba_off) == 0


def test_vector_registers(env):
    _, qts, dev = env
    v = VirtioPCIGuest(qts, dev, GuestAlloc())
    v.reset()
    assert v.cread(MSIX, 2) == NO_VECTOR
    assert [v.set_config_vector(x) for x in (0, 1, 2, 0x7FFF, NO_VECTOR, 1)] == [0, 1, NO_VECTOR, NO_VECTOR,
                                                                               NO_VECTOR, 1]
    assert [v.set_queue_vector(0, x) for x in (1, 0, 2, NO_VECTOR, 0)] == [1, 0, NO_VECTOR, NO_VECTOR, 0]
    v.cwrite(Q_SELECT, 7, 2)                                              # no such queue: QEMU still
    assert v.cread(Q_MSIX, 2) == NO_VECTOR and v.cread(Q_SIZE, 2) == 0     # keeps a vector for it
    v.cwrite(Q_MSIX, 1, 2)
    assert v.cread(Q_MSIX, 2) == 1
    v.cwrite(MSIX, 0, 1)                                                  # any access size
    assert v.cread(MSIX, 2) == 0
    v.cwrite(MSIX, 0x10000, 4)                                            # ... and the whole value counts
    assert v.cread(MSIX, 2) == NO_VECTOR
    disk = GuestDisk(qts, dev, GuestAlloc(0x200_0000, 0x300_0000))         # queue vector writable once enabled
    assert disk.vdev.set_queue_vector(0, 1) == 1
    disk.vdev.reset()                                                     # device reset: NO_VECTOR again
    assert disk.vdev.cread(MSIX, 2) == NO_VECTOR
    disk.vdev.cwrite(Q_SELECT, 0, 2)
    assert disk.vdev.cread(Q_MSIX, 2) == NO_VECTOR


def test_completion_writes_message_not_intx(env):
    m, qts, dev = env
    disk = GuestDisk(qts, dev, GuestAlloc(), use_msix=True)
    assert disk.msix_queue is not None and disk.msix_config is not None
    assert (disk.msix_config.entry, disk.msix_queue.entry) == (0, 1)
    assert disk.vdev.cread(MSIX, 2) == 0 and disk.vq.msix_vector == 1
    disk.write(0, b"\x7e" * 4096)
    assert qts.readl(disk.msix_queue.addr) == MSIX_QUEUE_DATA
    assert qts.readl(disk.msix_config.addr) == 0
    assert not _irq(m, dev) and not _intx_status(dev)                     # INTx stays low ...
    assert disk.vdev.read_isr() == 1 and disk.vdev.read_isr() == 0         # ... but the ISR still counts
    assert disk.vdev.msix_fired(disk.msix_queue)
    assert not disk.vdev.msix_fired(disk.msix_queue)                      # consumed
    assert disk.read(0, 4096) == b"\x7e" * 4096
    assert disk.vdev.msix_fired(disk.msix_queue)
    assert not disk.vdev.msix_fired(disk.msix_config)


def _read_with_queue_vector_masked(qts, dev):
    """A disk on MSI-X whose queue vector is masked, after one read: (disk, GuestMSIX, vector)."""
    disk = GuestDisk(qts, dev, GuestAlloc(), use_msix=True)
    msix, vec = disk.vdev.msix, disk.msix_queue
    assert msix is not None and vec is not None
    msix.mask(vec.entry)
    disk.read(0, 512)
    return disk, msix, vec


def test_masked_vector_goes_pending_then_delivers(env):
    m, qts, dev = env
    disk, msix, vec = _read_with_queue_vector_masked(qts, dev)
    assert qts.readl(vec.addr) == 0 and msix.pending(vec.entry) and not msix.pending(0)
    assert not _irq(m, dev)
    msix.mask(vec.entry, False)                                           # unmask: the message goes out
    assert qts.readl(vec.addr) == vec.data and not msix.pending(vec.entry)
    qts.writel(vec.addr, 0)
    msix.mask_function()                                                  # the function mask holds all vectors
    disk.read(0, 512)
    assert qts.readl(vec.addr) == 0 and msix.pending(vec.entry)
    assert disk.vdev.msix_fired(vec)                                      # masked: the driver sees the pending bit
    msix.mask_function(False)
    assert qts.readl(vec.addr) == vec.data and not msix.pending(vec.entry)


def test_pending_needs_a_used_vector_and_bus_master(env):
    m, qts, dev = env
    disk = GuestDisk(qts, dev, GuestAlloc(), use_msix=True)
    model = _model(m)
    msix, vec = disk.vdev.msix, disk.msix_queue
    assert msix is not None and vec is not None
    disk.vdev.set_queue_vector(0, NO_VECTOR)       # the last use of vector 1 is gone
    msix.mask(vec.entry)
    disk.read(0, 512)                              # NO_VECTOR: nothing is signalled at all
    assert not msix.pending(vec.entry) and qts.readl(vec.addr) == 0 and not _irq(m, dev)
    msix_notify(model, vec.entry)                  # unused vectors are ignored, as in QEMU
    assert not msix.pending(vec.entry)
    msix_vector_use(model, vec.entry)
    msix.mask(vec.entry, False)
    dev.writew(regs.COMMAND, dev.readw(regs.COMMAND) & ~regs.COMMAND_MASTER)
    msix_notify(model, vec.entry)                  # bus mastering off: the write goes nowhere
    dev.writew(regs.COMMAND, dev.readw(regs.COMMAND) | regs.COMMAND_MASTER)
    assert qts.readl(vec.addr) == 0
    msix_notify(model, vec.entry)
    assert qts.readl(vec.addr) == vec.data


def test_message_to_the_apic_window(env):
    """A real x86 driver points its entries at 0xfee00000: the machine's MSI window records them."""
    m, qts, dev = env
    disk = GuestDisk(qts, dev, GuestAlloc(), use_msix=True)
    msix = disk.vdev.msix
    assert msix is not None
    msix.program(1, 0xFEE0_1000, 0x4031)
    disk.read(0, 512)
    assert m.msi_log == [(0xFEE0_1000, 0x4031)] and not _irq(m, dev)


def test_config_interrupt_goes_to_config_vector(env):
    m, qts, dev = env
    disk = GuestDisk(qts, dev, GuestAlloc(), use_msix=True)
    assert disk.msix_config is not None and disk.msix_queue is not None
    _loop(disk)
    assert disk.vdev.status & STATUS_NEEDS_RESET
    assert qts.readl(disk.msix_config.addr) == disk.msix_config.data
    assert qts.readl(disk.msix_queue.addr) == 0
    assert not _irq(m, dev)
    assert disk.vdev.read_isr() & 2


def test_disable_msix_falls_back_to_intx(env):
    m, qts, dev = env
    disk = GuestDisk(qts, dev, GuestAlloc(), use_msix=True)
    msix, vec = disk.vdev.msix, disk.msix_queue
    assert msix is not None and vec is not None
    msix.enable(False)
    disk.read(0, 512)
    assert qts.readl(vec.addr) == 0 and _irq(m, dev) and _intx_status(dev)
    msix.enable()                                   # enabling MSI-X lowers INTx; the ISR keeps its bit
    assert not _irq(m, dev) and not _intx_status(dev)
    assert disk.vdev.read_isr() == 1


def test_device_reset_forgets_vectors_and_pending(env):
    m, qts, dev = env
    disk, msix, vec = _read_with_queue_vector_masked(qts, dev)
    assert msix.pending(vec.entry)
    disk.vdev.reset()                               # virtio reset: vectors unused, pending dropped
    assert not msix.pending(vec.entry)
    assert disk.vdev.cread(MSIX, 2) == NO_VECTOR
    assert msix.enabled                             # the capability itself is the PCI function's
    msix.mask(vec.entry, False)
    assert qts.readl(vec.addr) == 0
    m.system_reset()                                # bus reset: MSI-X off, entries zero and masked
    pci_boot(qts, m.ram_size)
    msix = GuestMSIX(dev)
    assert not msix.enabled and msix.control & regs.MSIX_FLAGS_MASKALL == 0
    assert [msix.table.readl(msix.entry(1) + 4 * i) for i in range(4)] == [0, 0, 0, 1]
    disk = GuestDisk(qts, dev, GuestAlloc(0x200_0000, 0x300_0000))       # INTx again by default
    disk.read(0, 512)
    assert _irq(m, dev) and disk.vdev.read_isr() == 1


def test_vectors_zero_is_intx_only(tmp_path):
    m, qts, dev = _boot(tmp_path, 0)
    assert [cid for _, cid in dev.capabilities()] == [regs.CAP_ID_VNDR] * 5
    assert [b.index for b in dev.size_bars()] == [4]
    disk = GuestDisk(qts, dev, GuestAlloc(), use_msix=True)             # no MSI-X on offer: INTx
    assert disk.msix_queue is None and disk.vdev.msix is None
    assert disk.vdev.set_config_vector(0) == NO_VECTOR
    assert disk.vdev.set_queue_vector(0, 0) == NO_VECTOR
    disk.read(0, 512)
    assert _irq(m, dev) and disk.vdev.read_isr() == 1 and not _irq(m, dev)
    _loop(disk)
    assert _irq(m, dev) and disk.vdev.read_isr() & 2
    m.shutdown()


def test_too_many_vectors_warn_and_leave_msix_out(tmp_path, caplog):
    """QEMU's msix_init refuses more than 2048 vectors; virtio-pci warns and goes on without MSI-X.
    Values that are not a uint32 at all are property errors, with QEMU's wording."""
    m, qts, dev = _boot(tmp_path, 3000)
    assert "unable to init msix vectors to 3000" in caplog.text
    assert [cid for _, cid in dev.capabilities()] == [regs.CAP_ID_VNDR] * 5
    assert [b.index for b in dev.size_bars()] == [4]
    assert GuestDisk(qts, dev, GuestAlloc(), use_msix=True).read(0, 512) == bytes(512)
    m.shutdown()
    m = create_machine("mini-pc", "64M")
    m.drive_add(str(tmp_path / "disk.qcow2"), id="d0", interface="none")
    for value, message in (("-1", "expects uint32_t"), ("0x100000000", "expects uint32_t"), ("many", "expects integer")):
        with pytest.raises(PropertyError, match=f"Parameter 'vectors' {message}"):
            m.device_add("virtio-blk-pci", {"drive": "d0", "vectors": value})
    m.shutdown()


def test_default_guest_disk_stays_on_intx(env):
    m, qts, dev = env
    disk = GuestDisk(qts, dev, GuestAlloc())
    assert disk.msix_queue is None and not GuestMSIX(dev).enabled
    disk.read(0, 512)
    assert _irq(m, dev) and disk.vdev.read_isr() == 1


# -- QEMU as the oracle ----------------------------------------------------------------------------

def _observe(qts, ram_size: int) -> dict:
    """Everything the guest can see of MSI-X, in one fixed sequence."""
    pci_boot(qts, ram_size)
    dev = next(d for d in GuestPCIBus(qts).scan() if d.vendor_id == 0x1AF4 and d.device_id == 0x1042)
    seen: dict = {}
    chain = [(off, cid, dev.readb(off + 3) if cid == regs.CAP_ID_VNDR else None) for off, cid in dev.capabilities()]
    seen["chain"] = chain
    seen["bars"] = [(b.index, b.is_io, b.is_64, b.prefetch, b.size) for b in dev.size_bars()]
    cap = dev.find_capability(regs.CAP_ID_MSIX)
    seen["cap"] = cap
    if not cap:
        v = VirtioPCIGuest(qts, dev, GuestAlloc(0x10_0000, 0x200_0000))
        v.reset()
        seen["vectors"] = [v.set_config_vector(0), v.set_queue_vector(0, 0), v.set_queue_vector(5, 0)]
        disk = GuestDisk(qts, dev, GuestAlloc(0x200_0000, 0x300_0000), use_msix=True)
        disk.read(0, 512)
        seen["intx"] = (_intx_status(dev), disk.vdev.read_isr(), _intx_status(dev))
        return seen
    seen["cap_regs"] = (dev.readw(cap + regs.MSIX_FLAGS), dev.readl(cap + regs.MSIX_TABLE),
                        dev.readl(cap + regs.MSIX_PBA))
    msix = GuestMSIX(dev)
    n = msix.table_size

    def table() -> list[int]:
        return [msix.table.readl(msix.table_off + 4 * i) for i in range(4 * n)]

    def pba() -> list[int]:  # whole 64-bit words of pending bits
        return [msix.pba.readl(msix.pba_off + 4 * i) for i in range(2 * -(-n // 64))]
    seen["table_boot"], seen["pba_boot"] = table(), pba()
    dev.writew(cap + regs.MSIX_FLAGS, 0xFFFF)
    seen["control_ones"] = dev.readw(cap + regs.MSIX_FLAGS)
    dev.writel(cap + regs.MSIX_TABLE, 0xFFFFFFFF)
    dev.writel(cap + regs.MSIX_PBA, 0xFFFFFFFF)
    dev.writew(cap + regs.MSIX_FLAGS, 0)
    seen["cap_regs_after_writes"] = (dev.readw(cap + regs.MSIX_FLAGS), dev.readl(cap + regs.MSIX_TABLE),
                                     dev.readl(cap + regs.MSIX_PBA))
    last = msix.entry(n - 1)
    for i in range(4):
        msix.table.writel(last + 4 * i, 0xFFFFFFFF - i)
    seen["entry_ones"] = [msix.table.readl(last + 4 * i) for i in range(4)]
    msix.table.write(last, 0x1234_5678_9ABC_DEF0, 8)
    seen["entry_quad"] = (msix.table.read(last, 8), msix.table.read(last + 8, 1), msix.table.read(last + 8, 2))
    msix.pba.writel(msix.pba_off, 0xFFFFFFFF)
    seen["pba_written"] = pba()
    msix.program(n - 1, 0, 0, masked=True)
    seen["table_restored"] = table()
    v = VirtioPCIGuest(qts, dev, GuestAlloc(0x10_0000, 0x200_0000))
    v.reset()
    seen["config_vectors"] = [v.set_config_vector(x) for x in (0, 1, n, 0x7FFF, NO_VECTOR, 1)]
    seen["queue_vectors"] = [v.set_queue_vector(0, x) for x in (1, 0, n, NO_VECTOR, 0)]
    seen["absent_queue_vectors"] = [v.set_queue_vector(5, x) for x in (NO_VECTOR, n - 1, n)]
    v.cwrite(MSIX, n - 1, 1)
    seen["config_vector_byte_write"] = v.cread(MSIX, 2)
    v.cwrite(MSIX, 0x10000, 4)
    seen["config_vector_long_write"] = v.cread(MSIX, 2)
    v.reset()
    v.cwrite(Q_SELECT, 0, 2)
    seen["vectors_after_reset"] = (v.cread(MSIX, 2), v.cread(Q_MSIX, 2))
    # a disk with MSI-X: the completion lands in RAM, INTx stays low, the ISR still counts
    disk = GuestDisk(qts, dev, GuestAlloc(0x200_0000, 0x300_0000), use_msix=True)
    qv, cv = disk.msix_queue, disk.msix_config
    assert qv is not None and cv is not None
    seen["disk_vectors"] = (disk.vdev.cread(MSIX, 2), disk.vq.msix_vector)
    seen["data"] = disk.read(0, 4096)
    seen["delivery"] = (qts.readl(qv.addr) == qv.data, qts.readl(cv.addr), _intx_status(dev),
                        disk.vdev.read_isr(), disk.vdev.read_isr())
    qts.writel(qv.addr, 0)
    # masked: pending bit, no write; unmasked: delivered, pending cleared
    msix.mask(qv.entry)
    disk.read(0, 512)
    seen["masked"] = (qts.readl(qv.addr), pba(), _intx_status(dev))
    msix.mask(qv.entry, False)
    seen["unmasked"] = (qts.readl(qv.addr) == qv.data, pba())
    qts.writel(qv.addr, 0)
    msix.mask_function()
    disk.read(0, 512)
    seen["function_masked"] = (qts.readl(qv.addr), pba(), msix.control)
    msix.mask_function(False)
    seen["function_unmasked"] = (qts.readl(qv.addr) == qv.data, pba())
    qts.writel(qv.addr, 0)
    disk.vdev.read_isr()
    # MSI-X off: INTx again; back on: INTx is lowered, the ISR keeps its bit
    msix.enable(False)
    disk.read(0, 512)
    seen["intx_mode"] = (qts.readl(qv.addr), _intx_status(dev))
    msix.enable()
    seen["reenabled"] = (_intx_status(dev), disk.vdev.read_isr())
    # masked, then a device reset: the pending bit is forgotten
    msix.mask(qv.entry)
    disk.read(0, 512)
    seen["pending_before_reset"] = pba()
    disk.vdev.reset()
    seen["pending_after_reset"] = pba()
    msix.mask(qv.entry, False)
    seen["after_reset_unmask"] = qts.readl(qv.addr)
    # NEEDS_RESET: the configuration interrupt goes to msix_config's vector
    disk = GuestDisk(qts, dev, GuestAlloc(0x300_0000, 0x400_0000), use_msix=True)
    qv, cv = disk.msix_queue, disk.msix_config
    assert qv is not None and cv is not None
    _loop(disk)
    seen["needs_reset"] = (bool(disk.vdev.status & STATUS_NEEDS_RESET), qts.readl(cv.addr) == cv.data,
                           qts.readl(qv.addr), _intx_status(dev))
    # QEMU's virtio_notify_config sets both ISR bits (0x3), in either interrupt mode
    seen["isr_after_error"] = disk.vdev.read_isr()
    return seen


@pytest.mark.parametrize("vectors", [None, 0, 1, 200, 3000])  # 3000: too many, so no MSI-X at all
def test_qemu_and_qcowpy_agree_on_msix(tmp_path, qemu, vectors):
    require_qemu()
    a, b = image_pair(qemu, tmp_path, 0x5c)
    extra = "" if vectors is None else f",vectors={vectors}"
    with launch_qemu(["-m", "128M", "-drive", f"file={a},format=qcow2,if=none,id=d0",
                      "-device", f"virtio-blk-pci,drive=d0,disable-legacy=on,addr=04.0{extra}"]) as p:
        theirs = _observe(p.qtest, 128 << 20)
    with launch_emu(["-m", "128M", "-drive", f"file={b},format=qcow2,if=none,id=d0",
                     "-device", f"virtio-blk-pci,drive=d0,addr=04.0{extra}"]) as p:
        ours = _observe(p.qtest, 128 << 20)
    assert ours == theirs
    if vectors not in (0, 3000):
        assert theirs["cap"] and theirs["data"] == b"\x5c" * 4096
        assert theirs["delivery"][0] and theirs["masked"][0] == 0 and theirs["unmasked"][0]
    else:
        assert not theirs["cap"]
    qemu.assert_clean(a)
    qemu.assert_clean(b)
