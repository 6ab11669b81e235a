"""The MSI-X capability: a vector table and a pending-bit array (PBA) behind a BAR.

Each vector is a 16-byte table entry (64-bit message address, 32-bit data, vector control whose
bit 0 masks the vector) that the guest programs through MMIO. Sending a vector is a 32-bit write
of its data to its address through the device's bus-master address space, as with MSI, so it
lands in RAM or in the machine's MSI window and goes nowhere while bus mastering is off.

A vector that is masked, or any vector while the whole function is masked (message control bit
14) or MSI-X is disabled (bit 15), is recorded in the PBA instead of being sent, and goes out as
soon as it is unmasked. As in QEMU, a device declares which vectors it really uses
(:func:`msix_vector_use`); notifying an unused vector does nothing, and dropping the last use of
a vector forgets its pending bit. Enabling MSI-X lowers the function's INTx line.

The state lives in an :class:`MSIXState` kept on the device as ``dev.msix`` (QEMU keeps the same
fields in ``PCIDevice``).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

from ..errors import DeviceError
from ..memory import AccessConstraints, Endianness, ImplConstraints, MemoryRegion, MemoryRegionOps
from . import regs
from .device import PCIDevice

#: Where the enable and function-mask bits live: the high byte of message control.
_CONTROL_BYTE = regs.MSIX_FLAGS + 1
_WRITABLE_CONTROL = (regs.MSIX_FLAGS_ENABLE | regs.MSIX_FLAGS_MASKALL) >> 8


@dataclass
class MSIXState:
    """One function's MSI-X table, PBA and bookkeeping."""

    cap: int                        # capability offset in config space
    nentries: int
    table: bytearray
    pba: bytearray
    used: list[int]                 # per-vector use counts (msix_vector_use/unuse)
    function_masked: bool = True    # MSI-X disabled or function mask set, as of the last control write


def _pba_size(nentries: int) -> int:
    """The PBA is whole 64-bit words, one bit a vector."""
    return (nentries + 63) // 64 * 8


def _state(dev: PCIDevice) -> MSIXState:
    st: Optional[MSIXState] = getattr(dev, "msix", None)
    assert st is not None, f"{dev.name} has no MSI-X capability"
    return st


# -- table and PBA MMIO ---------------------------------------------------------------------------

def _table_read(dev: PCIDevice, addr: int, size: int) -> int:
    return int.from_bytes(_state(dev).table[addr:addr + size], "little")


def _table_write(dev: PCIDevice, addr: int, val: int, size: int) -> None:
    st = _state(dev)
    vector = addr // regs.MSIX_ENTRY_SIZE
    was_masked = msix_is_masked(dev, vector)
    st.table[addr:addr + size] = val.to_bytes(size, "little")  # every bit sticks, as in QEMU
    _mask_changed(dev, vector, was_masked)


def _pba_read(dev: PCIDevice, addr: int, size: int) -> int:
    return int.from_bytes(_state(dev).pba[addr:addr + size], "little")


def _pba_write(dev: PCIDevice, addr: int, val: int, size: int) -> None:
    """The PBA is read-only: only the device sets and clears pending bits."""


# QEMU's constraints: the guest may use 4- or 8-byte aligned accesses (smaller ones are rejected
# and read 0); the callbacks see 4 bytes at a time.
_VALID = AccessConstraints(min_access_size=4, max_access_size=8, unaligned=False)
_IMPL = ImplConstraints(min_access_size=4, max_access_size=4, unaligned=False)
_TABLE_OPS = MemoryRegionOps(read=_table_read, write=_table_write, endianness=Endianness.LITTLE,
                             valid=_VALID, impl=_IMPL)
_PBA_OPS = MemoryRegionOps(read=_pba_read, write=_pba_write, endianness=Endianness.LITTLE,
                           valid=_VALID, impl=_IMPL)


# -- set-up ---------------------------------------------------------------------------------------

def msix_init(dev: PCIDevice, nentries: int, table_bar: MemoryRegion, table_bar_nr: int, table_offset: int,
              pba_bar: MemoryRegion, pba_bar_nr: int, pba_offset: int, cap_pos: int = 0) -> int:
    """Add an MSI-X capability (QEMU's ``msix_init``) and map the table and PBA into the given
    BAR regions; ``cap_pos`` 0 places the capability first-fit. Returns the capability offset."""
    if not 1 <= nentries <= regs.MSIX_MAX_ENTRIES:
        raise DeviceError(f"{dev.name}: the number of MSI-X vectors ({nentries}) is invalid")
    table_size, pba_size = nentries * regs.MSIX_ENTRY_SIZE, _pba_size(nentries)
    overlap = table_bar_nr == pba_bar_nr and table_offset < pba_offset + pba_size \
        and pba_offset < table_offset + table_size
    if overlap or table_offset + table_size > table_bar.size or pba_offset + pba_size > pba_bar.size \
            or (table_offset | pba_offset) & regs.MSIX_BIR_MASK:
        raise DeviceError(f"{dev.name}: MSI-X table and PBA overlap, do not fit in their BARs or are misaligned")
    cap = dev.add_capability(regs.CAP_ID_MSIX, cap_pos, regs.MSIX_CAP_LENGTH)
    dev.set_word(cap + regs.MSIX_FLAGS, nentries - 1)
    dev.set_long(cap + regs.MSIX_TABLE, table_offset | table_bar_nr)
    dev.set_long(cap + regs.MSIX_PBA, pba_offset | pba_bar_nr)
    dev.wmask[cap + _CONTROL_BYTE] |= _WRITABLE_CONTROL
    st = MSIXState(cap, nentries, bytearray(table_size), bytearray(pba_size), [0] * nentries)
    dev.msix = st  # type: ignore[attr-defined]
    _mask_all(st)
    table_mr = MemoryRegion.io_region(dev, _TABLE_OPS, dev, "msix-table", table_size)
    pba_mr = MemoryRegion.io_region(dev, _PBA_OPS, dev, "msix-pba", pba_size)
    table_bar.add_subregion(table_offset, table_mr)
    pba_bar.add_subregion(pba_offset, pba_mr)
    dev.config_write_hooks.append(lambda a, v, n: _msix_write_config(dev, a, n))
    dev.reset_hooks.append(lambda: msix_reset(dev))
    return cap


def msix_init_exclusive_bar(dev: PCIDevice, nentries: int, bar_nr: int, cap_pos: int = 0) -> int:
    """MSI-X in a BAR of its own (QEMU's ``msix_init_exclusive_bar``): a 4 KiB 32-bit memory BAR
    with the table at 0 and the PBA at 0x800; only a table bigger than half of it (over 128
    vectors) pushes the PBA up and grows the BAR to the next power of two. Returns the
    capability offset."""
    pba_offset = max(0x800, nentries * regs.MSIX_ENTRY_SIZE)
    bar_size = max(0x1000, pba_offset + _pba_size(nentries))
    bar_size = 1 << (bar_size - 1).bit_length()
    bar = MemoryRegion.container_region(dev, f"{dev.name}-msix", bar_size)
    cap = msix_init(dev, nentries, bar, bar_nr, 0, bar, bar_nr, pba_offset, cap_pos)
    dev.register_bar(bar_nr, regs.BASE_ADDRESS_SPACE_MEMORY, bar)
    return cap


# -- state queries -------------------------------------------------------------------------------

def msix_present(dev: PCIDevice) -> bool:
    return getattr(dev, "msix", None) is not None


def msix_enabled(dev: PCIDevice) -> bool:
    st: Optional[MSIXState] = getattr(dev, "msix", None)
    return st is not None and bool(dev.config[st.cap + _CONTROL_BYTE] & (regs.MSIX_FLAGS_ENABLE >> 8))


def _function_mask_bit(dev: PCIDevice, st: MSIXState) -> bool:
    return bool(dev.config[st.cap + _CONTROL_BYTE] & (regs.MSIX_FLAGS_MASKALL >> 8))


def _vector_masked(st: MSIXState, vector: int, function_masked: bool) -> bool:
    ctrl = st.table[vector * regs.MSIX_ENTRY_SIZE + regs.MSIX_ENTRY_VECTOR_CTRL]
    return function_masked or bool(ctrl & regs.MSIX_ENTRY_CTRL_MASKBIT)


def msix_is_masked(dev: PCIDevice, vector: int) -> bool:
    """Would ``vector`` be held back as pending right now?"""
    st = _state(dev)
    return _vector_masked(st, vector, st.function_masked)


def msix_is_pending(dev: PCIDevice, vector: int) -> bool:
    return bool(_state(dev).pba[vector // 8] & (1 << (vector % 8)))


def _set_pending(st: MSIXState, vector: int, pending: bool) -> None:
    if pending:
        st.pba[vector // 8] |= 1 << (vector % 8)
    else:
        st.pba[vector // 8] &= ~(1 << (vector % 8)) & 0xFF


def msix_message(dev: PCIDevice, vector: int) -> tuple[int, int]:
    """(address, data) of a table entry."""
    entry = _state(dev).table[vector * regs.MSIX_ENTRY_SIZE:(vector + 1) * regs.MSIX_ENTRY_SIZE]
    return int.from_bytes(entry[0:8], "little"), int.from_bytes(entry[8:12], "little")


# -- masking ---------------------------------------------------------------------------------------

def _mask_changed(dev: PCIDevice, vector: int, was_masked: bool) -> None:
    """After a mask change: a vector that just became unmasked sends what it had pending."""
    if msix_is_masked(dev, vector) or not was_masked:
        return
    if msix_is_pending(dev, vector):
        _set_pending(_state(dev), vector, False)
        msix_notify(dev, vector)


def _mask_all(st: MSIXState) -> None:
    for v in range(st.nentries):
        st.table[v * regs.MSIX_ENTRY_SIZE + regs.MSIX_ENTRY_VECTOR_CTRL] |= regs.MSIX_ENTRY_CTRL_MASKBIT


def _msix_write_config(dev: PCIDevice, addr: int, length: int) -> None:
    """Follow guest writes of the enable and function-mask bits."""
    st = _state(dev)
    if not addr <= st.cap + _CONTROL_BYTE < addr + length:
        return
    was_masked = st.function_masked
    st.function_masked = not msix_enabled(dev) or _function_mask_bit(dev, st)
    if not msix_enabled(dev):
        return
    dev._deassert_intx()  # the function now signals with messages only
    if st.function_masked == was_masked:
        return
    for v in range(st.nentries):
        _mask_changed(dev, v, _vector_masked(st, v, was_masked))


# -- use counts, notification, reset ---------------------------------------------------------------

def msix_vector_use(dev: PCIDevice, vector: int) -> None:
    st = _state(dev)
    assert 0 <= vector < st.nentries
    st.used[vector] += 1


def msix_vector_unuse(dev: PCIDevice, vector: int) -> None:
    st = _state(dev)
    assert 0 <= vector < st.nentries
    if not st.used[vector]:
        return
    st.used[vector] -= 1
    if not st.used[vector]:
        _set_pending(st, vector, False)


def msix_unuse_all_vectors(dev: PCIDevice) -> None:
    """Forget every use and pending bit (a device reset of the function's own logic)."""
    st: Optional[MSIXState] = getattr(dev, "msix", None)
    if st is None:
        return
    st.used = [0] * st.nentries
    st.pba[:] = bytes(len(st.pba))


def msix_notify(dev: PCIDevice, vector: int) -> None:
    """Send ``vector`` (QEMU's ``msix_notify``): a 32-bit DMA write of the entry's data to its
    address, or a pending bit while the vector or the function is masked."""
    st = _state(dev)
    assert 0 <= vector < st.nentries
    if not st.used[vector]:
        return
    if msix_is_masked(dev, vector):
        _set_pending(st, vector, True)
        return
    addr, data = msix_message(dev, vector)
    assert dev.bus_master_as is not None
    dev.bus_master_as.store(addr, data, 4)


def msix_reset(dev: PCIDevice) -> None:
    """Bus reset: MSI-X disabled and unmasked at function level, every entry zeroed and masked,
    nothing pending (use counts are the device's business)."""
    st: Optional[MSIXState] = getattr(dev, "msix", None)
    if st is None:
        return
    st.pba[:] = bytes(len(st.pba))
    dev.config[st.cap + _CONTROL_BYTE] &= ~dev.wmask[st.cap + _CONTROL_BYTE] & 0xFF
    st.table[:] = bytes(len(st.table))
    _mask_all(st)
    st.function_masked = True
