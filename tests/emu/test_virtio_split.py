"""The split virtqueue engine on a bytearray: chains, indirect tables, wrap-around, event idx, hostile rings."""
from __future__ import annotations

import struct

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from qcowpy.virtio.split import (VRING_DESC_F_INDIRECT, VRING_DESC_F_NEXT, VRING_DESC_F_WRITE, BytesMemory,
                                     SplitVirtQueue, VirtQueueError, iov_from_bytes, iov_split_tail,
                                     iov_to_bytes, vring_need_event)

NUM = 8
DESC, AVAIL, USED = 0x1000, 0x2000, 0x3000


class Ring:
    """A driver for tests: writes descriptors and the avail ring directly into the bytearray."""

    def __init__(self, num: int = NUM, ram: int = 0x20000) -> None:
        self.buf = bytearray(ram)
        self.mem = BytesMemory(self.buf)
        self.vq = SplitVirtQueue(self.mem, max_size=num)
        self.vq.num, self.vq.desc, self.vq.avail, self.vq.used = num, DESC, AVAIL, USED
        self.vq.ready = True
        self.num = num
        self.avail_idx = 0

    def desc(self, i: int, addr: int, length: int, flags: int = 0, nxt: int = 0, table: int = DESC) -> None:
        struct.pack_into("<QIHH", self.buf, table + 16 * i, addr, length, flags, nxt)

    def publish(self, head: int) -> None:
        struct.pack_into("<H", self.buf, AVAIL + 4 + 2 * (self.avail_idx % self.num), head)
        self.avail_idx = (self.avail_idx + 1) & 0xFFFF
        struct.pack_into("<H", self.buf, AVAIL + 2, self.avail_idx)

    def used_idx(self) -> int:
        return struct.unpack_from("<H", self.buf, USED + 2)[0]

    def used_elem(self, slot: int) -> tuple[int, int]:
        return struct.unpack_from("<II", self.buf, USED + 4 + 8 * (slot % self.num))


def test_empty_ring_pops_nothing():
    r = Ring()
    assert r.vq.pop() is None


def test_chain_split_into_readable_and_writable():
    r = Ring()
    r.desc(3, 0x5000, 16, VRING_DESC_F_NEXT, 5)
    r.desc(5, 0x6000, 512, VRING_DESC_F_NEXT | VRING_DESC_F_WRITE, 1)
    r.desc(1, 0x7000, 1, VRING_DESC_F_WRITE)
    r.publish(3)
    e = r.vq.pop()
    assert e.index == 3
    assert e.out_sg == [(0x5000, 16)] and e.in_sg == [(0x6000, 512), (0x7000, 1)]
    assert e.out_len == 16 and e.in_len == 513
    assert r.vq.pop() is None
    r.vq.push(e, 513)
    assert r.used_idx() == 1 and r.used_elem(0) == (3, 513)


def test_indirect_table():
    r = Ring()
    r.vq.indirect = True
    table = 0x8000
    r.desc(0, 0x5000, 16, VRING_DESC_F_NEXT, 1, table=table)
    r.desc(1, 0x6000, 100, VRING_DESC_F_NEXT, 2, table=table)
    r.desc(2, 0x7000, 1, VRING_DESC_F_WRITE, 0, table=table)
    r.desc(0, table, 48, VRING_DESC_F_INDIRECT)
    r.publish(0)
    e = r.vq.pop()
    assert e.out_sg == [(0x5000, 16), (0x6000, 100)] and e.in_sg == [(0x7000, 1)]


@pytest.mark.parametrize("case", ["not-negotiated", "bad-len", "zero-len", "nested", "with-next"])
def test_bad_indirect(case):
    r = Ring()
    r.vq.indirect = case != "not-negotiated"
    table = 0x8000
    r.desc(0, 0x5000, 16, VRING_DESC_F_INDIRECT if case == "nested" else 0, 0, table=table)
    length = {"bad-len": 20, "zero-len": 0}.get(case, 16)
    r.desc(0, table, length, VRING_DESC_F_INDIRECT | (VRING_DESC_F_NEXT if case == "with-next" else 0), 1)
    r.publish(0)
    with pytest.raises(VirtQueueError):
        r.vq.pop()


def test_descriptor_loop_detected():
    r = Ring()
    r.desc(0, 0x5000, 16, VRING_DESC_F_NEXT, 1)
    r.desc(1, 0x5000, 16, VRING_DESC_F_NEXT, 0)
    r.publish(0)
    with pytest.raises(VirtQueueError, match="longer"):
        r.vq.pop()


def test_indirect_loop_detected():
    r = Ring()
    r.vq.indirect = True
    table = 0x8000
    r.desc(0, 0x5000, 16, VRING_DESC_F_NEXT, 1, table=table)
    r.desc(1, 0x5000, 16, VRING_DESC_F_NEXT, 0, table=table)
    r.desc(0, table, 32, VRING_DESC_F_INDIRECT)
    r.publish(0)
    with pytest.raises(VirtQueueError):
        r.vq.pop()


@pytest.mark.parametrize("what", ["head", "next"])
def test_index_out_of_range(what):
    r = Ring()
    if what == "head":
        r.publish(NUM)
    else:
        r.desc(0, 0x5000, 16, VRING_DESC_F_NEXT, NUM + 3)
        r.publish(0)
    with pytest.raises(VirtQueueError, match="range|size"):
        r.vq.pop()


def test_readable_after_writable_rejected():
    r = Ring()
    r.desc(0, 0x5000, 1, VRING_DESC_F_WRITE | VRING_DESC_F_NEXT, 1)
    r.desc(1, 0x6000, 16, 0)
    r.publish(0)
    with pytest.raises(VirtQueueError, match="readable"):
        r.vq.pop()


def test_buffer_outside_ram():
    r = Ring()
    r.desc(0, 0x1F000, 0x2000, 0)
    r.publish(0)
    with pytest.raises(VirtQueueError, match="outside"):
        r.vq.pop()


def test_ring_outside_ram():
    r = Ring()
    r.vq.avail = 0x10_0000
    with pytest.raises(VirtQueueError):
        r.vq.pop()


def test_avail_index_jump_rejected():
    r = Ring()
    struct.pack_into("<H", r.buf, AVAIL + 2, NUM + 1)
    with pytest.raises(VirtQueueError, match="available index"):
        r.vq.pop()


def test_index_wraparound():
    r = Ring()
    start = 0xFFFD
    r.vq.last_avail_idx = r.vq.used_idx = start
    r.avail_idx = start
    struct.pack_into("<H", r.buf, USED + 2, start)
    seen = []
    for k in range(6):
        r.desc(k, 0x5000 + 0x100 * k, 4, 0)
        r.publish(k)
        e = r.vq.pop()
        seen.append(e.index)
        r.vq.push(e, 0)
    assert seen == list(range(6))
    assert r.vq.last_avail_idx == (start + 6) & 0xFFFF == r.used_idx() == 3
    # used ring slots follow the free-running index modulo the size
    assert r.used_elem((start + 5) & 0xFFFF)[0] == 5


def test_no_interrupt_flag_without_event_idx():
    r = Ring()
    r.desc(0, 0x5000, 4, 0)
    r.publish(0)
    r.vq.push(r.vq.pop(), 0)
    assert r.vq.should_notify(0)
    struct.pack_into("<H", r.buf, AVAIL, 1)  # VRING_AVAIL_F_NO_INTERRUPT
    assert not r.vq.should_notify(0)


def test_event_idx():
    r = Ring()
    r.vq.event_idx = True
    struct.pack_into("<H", r.buf, AVAIL + 4 + 2 * NUM, 1)  # used_event: interrupt when used idx passes 1
    for k in range(3):
        r.desc(k, 0x5000, 4, 0)
        r.publish(k)
    old = r.vq.used_idx
    e = r.vq.pop()
    # avail_event follows our consumption
    assert struct.unpack_from("<H", r.buf, USED + 4 + 8 * NUM)[0] == 1
    r.vq.push(e, 0)
    assert not r.vq.should_notify(old)  # used idx 0 -> 1: event at 1 not yet crossed
    old = r.vq.used_idx
    r.vq.push(r.vq.pop(), 0)
    assert r.vq.should_notify(old)      # 1 -> 2 crosses used_event 1
    assert vring_need_event(0xFFFF, 0, 0xFFFE) and not vring_need_event(5, 0, 0xFFFE)


def test_iov_helpers():
    r = Ring()
    iov = r.mem.map(0x5000, 3, True) + r.mem.map(0x6000, 5, True)
    assert iov_from_bytes(iov, b"abcdefg", 1) == 7
    assert bytes(r.buf[0x5000:0x5003]) == b"\0ab" and bytes(r.buf[0x6000:0x6005]) == b"cdefg"
    assert iov_to_bytes(iov) == b"\0abcdefg"
    assert iov_to_bytes(iov, 2, 4) == b"bcde"
    head, tail = iov_split_tail(iov, 6)
    assert iov_to_bytes(head) == b"\0a" and iov_to_bytes(tail) == b"bcdefg"
    head, tail = iov_split_tail(iov, 5)
    assert iov_to_bytes(head) == b"\0ab" and iov_to_bytes(tail) == b"cdefg" and len(tail) == 1


def test_popped_element_maps_buffers_in_place():
    """The element's iovecs are guest RAM itself: what the device writes there the driver sees."""
    r = Ring()
    r.desc(0, 0x5000, 16, VRING_DESC_F_NEXT, 1)
    r.desc(1, 0x6000, 8, VRING_DESC_F_WRITE)
    r.publish(0)
    e = r.vq.pop()
    e.in_iov[0][:] = b"12345678"
    assert bytes(r.buf[0x6000:0x6008]) == b"12345678"
    r.buf[0x5000:0x5004] = b"head"
    assert bytes(e.out_iov[0][:4]) == b"head"


def test_ring_remapped_when_moved():
    """Ring views are cached (QEMU's vring caches) but follow a driver that moves the rings."""
    r = Ring()
    r.desc(0, 0x5000, 4, 0)
    r.publish(0)
    r.vq.push(r.vq.pop(), 4)
    assert r.used_idx() == 1
    new_used = 0x8000
    struct.pack_into("<H", r.buf, new_used + 2, 1)
    r.vq.used = new_used
    r.desc(1, 0x5000, 4, 0)
    r.publish(1)
    r.vq.push(r.vq.pop(), 4)
    assert struct.unpack_from("<HII", r.buf, new_used + 2 + 2 + 8 - 2)[1:] == (1, 4)
    assert struct.unpack_from("<H", r.buf, new_used + 2)[0] == 2


class _NoWindow(BytesMemory):
    """The same RAM without a direct window: every chain takes the step-by-step walker."""

    def window(self):
        return None


def _pop_outcome(buf: bytearray, mem_cls, indirect: bool):
    vq = SplitVirtQueue(mem_cls(buf), max_size=NUM)
    vq.num, vq.desc, vq.avail, vq.used = NUM, DESC, AVAIL, USED
    vq.ready, vq.indirect = True, indirect
    try:
        e = vq.pop()
    except VirtQueueError as err:
        return "error", str(err)
    return (e.index, e.out_sg, e.in_sg, e.out_len, e.in_len,
            [bytes(v) for v in e.out_iov], [bytes(v) for v in e.in_iov])


@settings(max_examples=300, deadline=None)
@given(st.lists(st.tuples(st.integers(0, 0x20000), st.integers(0, 0x3000), st.integers(0, 7), st.integers(0, NUM + 1)),
                min_size=NUM, max_size=NUM),
       st.integers(0, NUM - 1), st.booleans())
def test_fast_path_and_walker_agree(descs, head, indirect):
    """The one-call chain kernel is only a shortcut: element or error, exactly as the walker's."""
    buf = bytearray(0x20000)
    for i in range(0x20000 // 4096):
        buf[i * 4096] = i & 0xFF
    for i, d in enumerate(descs):
        struct.pack_into("<QIHH", buf, DESC + 16 * i, *d)
    struct.pack_into("<HH", buf, AVAIL, 0, 1)
    struct.pack_into("<H", buf, AVAIL + 4, head)
    assert _pop_outcome(bytearray(buf), BytesMemory, indirect) == _pop_outcome(bytearray(buf), _NoWindow, indirect)
