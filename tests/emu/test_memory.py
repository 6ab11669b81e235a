"""Memory API: rendering (priority, alias, containers), dispatch (split, widen, reject, endianness), mtree."""
from __future__ import annotations

from hypothesis import given, settings, strategies as st

from qcowpy.emu.memory import (SIZE_2_64, AccessConstraints, AddressSpace, Endianness, ImplConstraints,
                               MemoryRegion, MemoryRegionOps)
from qcowpy.emu.mtree import mtree_info


class Recorder:
    """An I/O region's backing device that logs every callback."""

    def __init__(self, fill: int = 0) -> None:
        self.calls: list[tuple] = []
        self.fill = fill

    def read(self, addr: int, size: int) -> int:
        self.calls.append(("r", addr, size))
        # byte k of the register file holds (addr + k) ^ fill
        return int.from_bytes(bytes(((addr + k) ^ self.fill) & 0xFF for k in range(size)), "little")

    def write(self, addr: int, value: int, size: int) -> None:
        self.calls.append(("w", addr, value, size))


def io(name, size, rec, **kw):
    ops = MemoryRegionOps(read=lambda o, a, s: o.read(a, s), write=lambda o, a, v, s: o.write(a, v, s), **kw)
    return MemoryRegion.io_region(None, ops, rec, name, size)


def space(size=0x10000):
    root = MemoryRegion.container_region(None, "root", size)
    return root, AddressSpace(root, "test")


def ram(name, size, byte):
    mr = MemoryRegion.ram_region(None, name, size)
    mr.ram[:] = bytes([byte]) * size
    return mr


def test_higher_priority_wins_and_lower_shows_through_gaps():
    root, as_ = space()
    root.add_subregion(0x000, ram("low", 0x300, 0x11), priority=0)
    root.add_subregion(0x100, ram("high", 0x100, 0x22), priority=1)
    assert as_.read(0x0FF, 3) == bytes([0x11, 0x22, 0x22])
    assert as_.read(0x1FF, 2) == bytes([0x22, 0x11])
    assert as_.read(0x300, 1) == b"\xff"  # a hole reads all-ones


def test_equal_priority_last_added_wins_like_qemu():
    root, as_ = space()
    root.add_subregion(0, ram("first", 0x10, 0x01))
    root.add_subregion(8, ram("second", 0x10, 0x02))
    assert as_.read(6, 4) == bytes([1, 1, 2, 2])


def test_negative_priority_container_is_background():
    root, as_ = space()
    pci = MemoryRegion.container_region(None, "pci", SIZE_2_64)
    root.add_subregion(0, pci, priority=-1)
    root.add_subregion(0, ram("ram", 0x1000, 0xAA))
    pci.add_subregion(0x800, ram("bar", 0x1000, 0xBB), priority=1)
    # the BAR is inside a priority -1 container: RAM still wins where they overlap
    assert as_.read(0xFFF, 2) == bytes([0xAA, 0xBB])


def test_alias_windows_onto_an_offset():
    root, as_ = space()
    backing = MemoryRegion.ram_region(None, "backing", 0x100)
    backing.ram[:] = bytes(range(256))
    alias = MemoryRegion.alias_region(None, "win", backing, 0x40, 0x20)
    root.add_subregion(0x1000, alias)
    assert as_.read(0x1000, 4) == bytes([0x40, 0x41, 0x42, 0x43])
    assert as_.read(0x101F, 2) == bytes([0x5F, 0xFF])
    as_.write(0x1001, b"\x99")
    assert backing.ram[0x41] == 0x99
    alias.set_alias_offset(0x80)
    assert as_.read(0x1000, 1) == b"\x80"


def test_disable_and_move_invalidate_the_cached_view():
    root, as_ = space()
    r = ram("r", 0x10, 0x33)
    root.add_subregion(0x100, r)
    assert as_.read(0x100, 1) == b"\x33"
    view = as_.flatview
    r.set_enabled(False)
    assert as_.flatview is not view
    assert as_.read(0x100, 1) == b"\xff"
    r.set_enabled(True)
    r.set_address(0x200)
    assert as_.read(0x100, 1) == b"\xff" and as_.read(0x200, 1) == b"\x33"
    root.del_subregion(r)
    assert as_.read(0x200, 1) == b"\xff"


def test_io_region_subregions_cover_its_own_ops():
    root, as_ = space()
    outer_rec, inner = Recorder(), ram("inner", 4, 0x55)
    outer = io("outer", 0x10, outer_rec, valid=AccessConstraints(unaligned=True))
    outer.add_subregion(4, inner)
    root.add_subregion(0, outer)
    assert as_.read(4, 4) == b"\x55" * 4
    as_.read(0, 1)
    assert outer_rec.calls == [("r", 0, 1)]


def test_wide_access_split_to_impl_max_little_endian():
    root, as_ = space()
    rec = Recorder()
    root.add_subregion(0x100, io("dev", 0x10, rec, valid=AccessConstraints(1, 8), impl=ImplConstraints(1, 1),
                                 endianness=Endianness.LITTLE))
    assert as_.load(0x100, 4) == 0x03020100
    assert rec.calls == [("r", 0, 1), ("r", 1, 1), ("r", 2, 1), ("r", 3, 1)]
    rec.calls.clear()
    as_.store(0x104, 0xAABBCCDD, 4)
    assert rec.calls == [("w", 4, 0xDD, 1), ("w", 5, 0xCC, 1), ("w", 6, 0xBB, 1), ("w", 7, 0xAA, 1)]


def test_big_endian_device_sees_swapped_value_and_split_order():
    root, as_ = space()
    rec = Recorder()
    root.add_subregion(0, io("be", 0x10, rec, valid=AccessConstraints(1, 8), impl=ImplConstraints(4, 4),
                             endianness=Endianness.BIG))
    as_.store(0, 0x11223344, 4)
    assert rec.calls == [("w", 0, 0x44332211, 4)]
    rec.calls.clear()
    root2, as2 = space()
    rec2 = Recorder()
    root2.add_subregion(0, io("be2", 0x10, rec2, valid=AccessConstraints(1, 8), impl=ImplConstraints(2, 2),
                              endianness=Endianness.BIG))
    as2.store(0, 0x1122334455667788, 8)
    # device value is 0x8877665544332211 in big-endian order: high half first at the lower address
    assert rec2.calls == [("w", 0, 0x8877, 2), ("w", 2, 0x6655, 2), ("w", 4, 0x4433, 2), ("w", 6, 0x2211, 2)]


def test_narrow_access_widened_to_impl_min():
    root, as_ = space()
    rec = Recorder()
    root.add_subregion(0, io("dev", 0x10, rec, valid=AccessConstraints(1, 4), impl=ImplConstraints(4, 4)))
    assert as_.load(1, 1) == 0x01  # widened read at the same address, truncated to one byte
    assert rec.calls == [("r", 1, 4)]
    rec.calls.clear()
    as_.store(2, 0x7F, 1)
    assert rec.calls == [("w", 2, 0x7F, 4)]


def test_invalid_accesses_are_rejected_reads_zero_writes_dropped():
    root, as_ = space()
    rec = Recorder(fill=0xFF)
    root.add_subregion(0, io("dev", 0x10, rec, valid=AccessConstraints(4, 4), impl=ImplConstraints(4, 4)))
    assert as_.load(0, 1) == 0 and as_.load(0, 2) == 0
    as_.store(0, 1, 1)
    assert rec.calls == []
    # a misaligned 4-byte access is cut at the alignment boundary: two 2-byte pieces, both rejected
    assert as_.load(2, 4) == 0
    assert rec.calls == []
    assert as_.load(4, 4) == 0xF8F9FAFB
    # an 8-byte access is split into two valid 4-byte pieces (valid.max is 4)
    rec.calls.clear()
    as_.load(8, 8)
    assert rec.calls == [("r", 8, 4), ("r", 12, 4)]


def test_accepts_callback_can_reject():
    root, as_ = space()
    rec = Recorder()
    ops_valid = AccessConstraints(1, 4, accepts=lambda opaque, addr, size, is_write: not is_write)
    root.add_subregion(0, io("ro", 0x10, rec, valid=ops_valid))
    as_.store(0, 5, 1)
    as_.load(0, 1)
    assert rec.calls == [("r", 0, 1)]


def test_unaligned_allowed_when_valid_unaligned():
    root, as_ = space()
    rec = Recorder()
    root.add_subregion(0, io("u", 0x10, rec, valid=AccessConstraints(1, 8, unaligned=True),
                            impl=ImplConstraints(1, 8, unaligned=True)))
    assert as_.load(3, 4) == 0x06050403
    assert rec.calls == [("r", 3, 4)]


def test_access_crossing_region_end_is_split():
    root, as_ = space()
    root.add_subregion(0, ram("a", 2, 0x01))
    root.add_subregion(2, ram("b", 2, 0x02))
    assert as_.load(1, 2) == 0x0201
    assert as_.load(3, 2) == 0xFF02  # second byte is a hole


def test_readonly_region_ignores_writes():
    root, as_ = space()
    rom = ram("rom", 4, 0x5A)
    rom.set_readonly(True)
    root.add_subregion(0, rom)
    as_.write(0, b"\x00\x00")
    assert as_.read(0, 2) == b"\x5a\x5a"


def test_map_ram_only_for_one_piece_of_ram():
    """address_space_map without a bounce buffer: a view of one RAM range, writes landing in the
    region's bytes; None for MMIO, holes, ranges that leave the RAM and writable maps of ROM."""
    root, as_ = space()
    a = ram("a", 0x100, 0x11)
    rom = ram("rom", 0x10, 0x22)
    rom.set_readonly(True)
    root.add_subregion(0, a)
    root.add_subregion(0x100, rom)
    root.add_subregion(0x200, io("r", 0x10, Recorder()))
    view = as_.map_ram(0x10, 4, True)
    assert view is not None and bytes(view) == b"\x11" * 4
    view[1] = 0x99
    assert as_.read(0x10, 3) == b"\x11\x99\x11" and a.ram[0x11] == 0x99
    assert as_.map_ram(0xFE, 4, False) is None          # runs into the ROM
    assert as_.map_ram(0x200, 2, False) is None         # MMIO
    assert as_.map_ram(0x300, 2, False) is None         # hole
    assert as_.map_ram(0x100, 4, True) is None          # ROM is not writable
    assert bytes(as_.map_ram(0x100, 4, False)) == b"\x22" * 4


def test_ram_is_zeroed_page_aligned_memory():
    import ctypes
    import mmap
    mr = MemoryRegion.ram_region(None, "r", 3 * 4096 + 5)
    assert len(mr.ram) == 3 * 4096 + 5 and mr.ram[:] == bytes(3 * 4096 + 5)
    assert ctypes.addressof(ctypes.c_char.from_buffer(mr.ram)) % mmap.PAGESIZE == 0
    assert len(MemoryRegion.ram_region(None, "empty", 0).ram) == 0


def test_mtree_format_matches_qemu_layout():
    root = MemoryRegion.container_region(None, "system", SIZE_2_64)
    r = MemoryRegion.ram_region(None, "pc.ram", 0x8000000)
    root.add_subregion(0, r)
    root.add_subregion(0x100000000, MemoryRegion.alias_region(None, "ram-above", r, 0x1000, 0x1000), priority=2)
    dis = MemoryRegion.container_region(None, "off", 0x10)
    dis.set_enabled(False)
    root.add_subregion(0x10, dis)
    text = mtree_info([AddressSpace(root, "memory"), AddressSpace(root, "cpu-memory-0")])
    assert text == (
        "address-space: cpu-memory-0\n"
        "address-space: memory\n"
        "  0000000000000000-ffffffffffffffff (prio 0, i/o): system\n"
        "    0000000000000000-0000000007ffffff (prio 0, ram): pc.ram\n"
        "    0000000100000000-0000000100000fff (prio 2, ram): alias ram-above @pc.ram 0000000000001000-0000000000001fff\n"
        "\n"
        "memory-region: pc.ram\n"
        "  0000000000000000-0000000007ffffff (prio 0, ram): pc.ram\n"
        "\n")
    assert "00000010-000000000000001f (prio 0, i/o): off [disabled]" in mtree_info(
        [AddressSpace(root, "memory")], show_disabled=True)


# -- model-based check of overlap resolution -----------------------------------------------------

regions = st.lists(st.tuples(st.integers(0, 60), st.integers(1, 30), st.integers(-2, 2), st.booleans()),
                   min_size=1, max_size=8)


@settings(max_examples=150, deadline=None)
@given(regions)
def test_flat_view_matches_a_per_byte_model(specs):
    """Each byte shows the enabled region with the highest priority; ties go to the latest added."""
    root, as_ = space(64)
    model = [0xFF] * 64
    winners: list[tuple[int, int]] = [(-(10 ** 9), -1)] * 64
    for idx, (start, size, prio, enabled) in enumerate(specs):
        mr = ram(f"r{idx}", size, idx + 1)
        root.add_subregion(start, mr, priority=prio)
        mr.set_enabled(enabled)
        if not enabled:
            continue
        for a in range(start, min(start + size, 64)):
            if (prio, idx) >= winners[a]:
                winners[a] = (prio, idx)
                model[a] = idx + 1
    assert list(as_.read(0, 64)) == model


# -- the direct load/store path against the full dispatch -------------------------------------------

access_sizes = st.sampled_from([0, 1, 2, 4, 8])


@settings(max_examples=300, deadline=None)
@given(vmin=access_sizes, vmax=access_sizes, imin=access_sizes, imax=access_sizes,
       endian=st.sampled_from(list(Endianness)), unaligned=st.booleans(), picky=st.booleans(),
       addr=st.integers(0x0C, 0x14), size=st.sampled_from([1, 2, 4, 8]), value=st.integers(0, 2 ** 64 - 1))
def test_load_store_match_the_full_dispatch(vmin, vmax, imin, imax, endian, unaligned, picky, addr, size, value):
    """AddressSpace.load/store call an I/O region directly for the accesses direct_sizes() allows;
    whatever the constraints, the callbacks see exactly what the byte-buffer dispatch
    (read/write) makes of the same access, and the results agree."""
    accepts = (lambda o, a, s, w: a != 0x10) if picky else None
    kw = dict(valid=AccessConstraints(vmin, vmax, unaligned, accepts), impl=ImplConstraints(imin, imax),
              endianness=endian)
    root_a, direct = space()
    root_b, bytewise = space()
    rec_a, rec_b = Recorder(0x5A), Recorder(0x5A)
    root_a.add_subregion(0x8, io("dev", 0x10, rec_a, **kw))
    root_b.add_subregion(0x8, io("dev", 0x10, rec_b, **kw))
    assert direct.load(addr, size) == int.from_bytes(bytewise.read(addr, size), "little")
    direct.store(addr, value, size)
    bytewise.write(addr, (value & ((1 << (8 * size)) - 1)).to_bytes(size, "little"))
    assert rec_a.calls == rec_b.calls


def test_remembered_resolutions_follow_topology_changes():
    """load/store remember where an (address, size) went; moving, disabling or hiding the region
    sends the next access where the new view says."""
    root, as_ = space()
    rec, top = Recorder(), Recorder()
    dev = io("dev", 0x10, rec, valid=AccessConstraints(1, 4), impl=ImplConstraints(1, 4))
    root.add_subregion(0x100, dev)
    as_.store(0x104, 0xAB, 2)
    dev.set_address(0x200)
    as_.store(0x104, 0xCD, 2)   # now a hole: dropped
    as_.store(0x204, 0xEF, 2)
    assert rec.calls == [("w", 4, 0xAB, 2), ("w", 4, 0xEF, 2)]
    root.add_subregion(0x200, io("top", 0x10, top, valid=AccessConstraints(1, 4)), priority=1)
    as_.store(0x204, 0x12, 2)
    dev.set_enabled(False)
    assert as_.load(0x104, 2) == 0xFFFF and top.calls == [("w", 4, 0x12, 2)] and len(rec.calls) == 2
