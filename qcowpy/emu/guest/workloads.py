"""Guest programs: the tutorial's port-I/O and MMIO tests for a3dev-pci, an edu exerciser, and
disk workloads on top of the virtio-blk driver (patterns, CRC checks, copies, throughput runs).

They live here, not in the driver, so the driver module is only the driver. The device programs
return ``(ok, lines)``: whether every check passed, and the program's output.
"""
from __future__ import annotations

import random
import struct
import time
from typing import Optional

from ..pci import regs
from .pci import Bar, GuestPCIBus, GuestPCIDevice
from .qtest import QTest, QTestError
from .virtio_blk import SECTOR, GuestDisk

A3DEV_ID = (0x1234, 0x1919)
EDU_ID = (0x1234, 0x11E8)
NUM_DWORDS = 64


def _pattern(i: int) -> int:
    return (0xA3D0_0000 | (i << 8) | (0xFF - i)) & 0xFFFFFFFF


def _find(qts: QTest, ident: tuple[int, int]) -> GuestPCIDevice:
    dev = GuestPCIBus(qts).find(*ident)
    if dev is None:
        raise LookupError(f"no PCI device {ident[0]:04x}:{ident[1]:04x} (did you add it with -device?)")
    return dev


def _buffer_test(bar: Bar, label: str) -> tuple[bool, list[str]]:
    kind = "I/O ports" if bar.info.is_io else "MMIO"
    lines = [f"{label} test: BAR{bar.info.index} ({kind}) at {bar.base:#x}, size {bar.info.size}"]
    if bar.base == 0:
        return False, lines + [f"{label} test: BAR{bar.info.index} is not assigned (run the firmware first)"]
    for i in range(NUM_DWORDS):
        bar.writel(4 * i, _pattern(i))
    lines.append(f"{label} test: wrote {NUM_DWORDS} dwords")
    bad = 0
    for i in range(NUM_DWORDS):
        got = bar.readl(4 * i)
        if got != _pattern(i):
            bad += 1
            lines.append(f"{label} test: dword {i} at +{4 * i:#04x}: wrote {_pattern(i):#010x}, read {got:#010x}")
    lines.append(f"{label} test: read back {NUM_DWORDS} dwords, {NUM_DWORDS - bad} match, {bad} differ")
    ok = bad == 0
    lines.append(f"{label} test: {'PASS' if ok else 'FAIL'}")
    return ok, lines


def a3dev_pmio_test(qts: QTest) -> tuple[bool, list[str]]:
    """Write 64 dwords through BAR1 (port I/O), read them back."""
    dev = _find(qts, A3DEV_ID)
    return _buffer_test(dev.bar(1), "PMIO")


def a3dev_mmio_test(qts: QTest) -> tuple[bool, list[str]]:
    """Write 64 dwords through BAR0 (MMIO), read them back."""
    dev = _find(qts, A3DEV_ID)
    return _buffer_test(dev.bar(0), "MMIO")


def edu_test(qts: QTest, with_dma: bool = True) -> tuple[bool, list[str]]:
    """Identification, liveness, factorial, interrupt raise/ack and (if the clock can be stepped) DMA."""
    dev = _find(qts, EDU_ID)
    bar = dev.bar(0)
    lines, ok = [], True

    def check(what: str, got: int, want: int) -> None:
        nonlocal ok
        good = got == want
        ok &= good
        lines.append(f"edu: {what}: {got:#x} {'ok' if good else f'FAIL (want {want:#x})'}")

    ident = bar.readl(0x00)
    check("identification", ident, 0x010000ED)
    bar.writel(0x04, 0x12345678)
    check("liveness (inverse of 0x12345678)", bar.readl(0x04), 0xEDCBA987)
    bar.writel(0x08, 10)
    while bar.readl(0x20) & 1:
        pass
    check("factorial of 10", bar.readl(0x08), 3628800)
    bar.writel(0x60, 0x1234)
    check("interrupt status after raise", bar.readl(0x24), 0x1234)
    check("PCI status INTx bit while raised", dev.readw(regs.STATUS) & regs.STATUS_INTERRUPT, regs.STATUS_INTERRUPT)
    bar.writel(0x64, 0x1234)
    check("interrupt status after ack", bar.readl(0x24), 0)
    check("PCI status INTx bit after ack", dev.readw(regs.STATUS) & regs.STATUS_INTERRUPT, 0)
    if with_dma:
        src, back = 0x10_0000, 0x20_0000
        data = bytes(range(256)) * 2
        qts.memwrite(src, data)
        for reg, val in ((0x80, src), (0x88, 0x40000), (0x90, len(data)), (0x98, 1)):
            bar.write(reg, val, 8)
        try:
            qts.clock_step(200_000_000)
        except QTestError:
            lines.append("edu: DMA skipped (this qtest endpoint cannot step the virtual clock)")
            return ok, lines + [f"edu test: {'PASS' if ok else 'FAIL'}"]
        check("DMA RAM->device done (cmd)", bar.read(0x98, 8) & 1, 0)
        for reg, val in ((0x80, 0x40000), (0x88, back), (0x90, len(data)), (0x98, 3 | 4)):
            bar.write(reg, val, 8)
        qts.clock_step(200_000_000)
        got = qts.memread(back, len(data))
        check("DMA device->RAM bytes equal", int(got == data), 1)
        check("DMA interrupt status", bar.readl(0x24), 0x100)
        bar.writel(0x64, 0x100)
    lines.append(f"edu test: {'PASS' if ok else 'FAIL'}")
    return ok, lines


# -- disk workloads over the virtio-blk driver ---------------------------------------------------

def crc32c(data: bytes) -> int:
    import crcmod.predefined
    fn = crcmod.predefined.mkCrcFun("crc-32c")
    return fn(data)


def pattern(offset: int, length: int, seed: int = 0) -> bytes:
    """A position-dependent pattern: each 512-byte sector starts with its LBA and the seed."""
    out = bytearray()
    for lba in range(offset // SECTOR, (offset + length) // SECTOR):
        head = struct.pack("<QI", lba, seed)
        out += (head * (SECTOR // len(head) + 1))[:SECTOR]
    return bytes(out)


def pattern_test(disk: GuestDisk, offset: int, length: int, seed: int = 1) -> tuple[bool, list[str]]:
    """Write a pattern, flush, read it back and compare CRC-32C checksums."""
    data = pattern(offset, length, seed)
    want = crc32c(data)
    disk.write(offset, data)
    disk.flush()
    got = crc32c(disk.read(offset, length))
    ok = got == want
    return ok, [f"pattern {offset:#x}+{length:#x} seed {seed}: wrote crc32c {want:08x}, read {got:08x}"
                f" -> {'OK' if ok else 'MISMATCH'}"]


def copy_disk(src: GuestDisk, dst: GuestDisk, chunk: int = 256 << 10) -> int:
    """``dd`` from one guest disk to another (the smaller capacity); returns bytes copied."""
    total = min(src.capacity, dst.capacity)
    pos = 0
    while pos < total:
        n = min(chunk, total - pos)
        dst.write(pos, src.read(pos, n))
        pos += n
    dst.flush()
    return total


def hexdump(data: bytes, base: int) -> list[str]:
    lines = []
    for i in range(0, len(data), 16):
        row = data[i:i + 16]
        text = "".join(chr(b) if 32 <= b < 127 else "." for b in row)
        lines.append(f"{base + i:08x}: {row.hex(' '):<47}  {text}")
    return lines


def workload_offsets(mode: str, block_size: int, size: int, count: int, seed: int = 0) -> list[int]:
    """``count`` block offsets in a disk of ``size`` bytes: sequential (wrapping at the end) or
    uniformly random from a seeded generator, so runs and tools can repeat the same workload."""
    if mode not in ("seq", "rand"):
        raise ValueError(f"workload must be seq or rand, not {mode!r}")
    if block_size <= 0 or block_size % SECTOR or block_size > size:
        raise ValueError(f"block size must be a positive multiple of 512 up to the disk size, not {block_size}")
    nblocks = size // block_size
    if mode == "seq":
        return [(i % nblocks) * block_size for i in range(count)]
    rng = random.Random(seed)
    return [rng.randrange(nblocks) * block_size for _ in range(count)]


def throughput(disk: GuestDisk, mode: str = "seq", block_size: int = 65536, total: int = 4 << 20,
               seed: int = 0, depth: Optional[int] = None) -> tuple[float, list[str]]:
    """Sequential or random reads of ``block_size`` until ``total`` bytes, ``depth`` requests in
    flight (default: the driver's queue depth), like fio with ``iodepth``; returns (MiB/s, lines)."""
    count = max(1, total // block_size) if block_size > 0 else 1
    offs = workload_offsets(mode, block_size, disk.capacity, count, seed)
    depth = disk.clamp_depth(depth)
    t0 = time.perf_counter()
    disk.read_blocks(offs, block_size, depth)
    dt = max(time.perf_counter() - t0, 1e-9)
    done = count * block_size
    rate = done / dt / (1 << 20)
    return rate, [f"{mode} read {done} bytes in {block_size}-byte requests, queue depth {depth}: "
                  f"{dt:.3f} s, {rate:.1f} MiB/s"]
