"""Guest virtio-blk driver: a disk object on top of :mod:`qcowpy.emu.guest.virtio`.

:func:`find_disks` probes every virtio-blk PCI function (modern ID 1af4:1042) and returns a
:class:`GuestDisk` for each, initialised with the features this driver understands. Requests are
synchronous: build a chain (header, data, status) in guest RAM, kick, poll the used ring.
"""
from __future__ import annotations

import struct
from typing import Optional

from .pci import GuestPCIBus, GuestPCIDevice
from .qtest import QTest
from .virtio import (F_EVENT_IDX, F_INDIRECT_DESC, STATUS_NEEDS_RESET, GuestAlloc, VirtioGuestError,
                     VirtioPCIGuest)

VIRTIO_BLK_DEVICE_ID = 0x1042
F_SEG_MAX, F_RO, F_BLK_SIZE, F_FLUSH, F_DISCARD, F_WRITE_ZEROES = 2, 5, 6, 9, 13, 14
T_IN, T_OUT, T_FLUSH, T_GET_ID, T_DISCARD, T_WRITE_ZEROES = 0, 1, 4, 8, 11, 13
S_OK, S_IOERR, S_UNSUPP = 0, 1, 2
SECTOR = 512
FEATURE_NAMES = {F_SEG_MAX: "seg_max", F_RO: "ro", F_BLK_SIZE: "blk_size", F_FLUSH: "flush",
                 F_DISCARD: "discard", F_WRITE_ZEROES: "write_zeroes", F_INDIRECT_DESC: "indirect_desc",
                 F_EVENT_IDX: "event_idx", 32: "version_1"}
DRIVER_FEATURES = sum(1 << b for b in FEATURE_NAMES)


class GuestIOError(Exception):
    """A request completed with a status other than OK."""

    def __init__(self, status: int, what: str) -> None:
        super().__init__(f"{what}: status {status} ({ {S_IOERR: 'IOERR', S_UNSUPP: 'UNSUPP'}.get(status, '?') })")
        self.status = status


class GuestDisk:
    """One virtio-blk disk from the guest's point of view."""

    MAX_CHUNK = 256 << 10

    def __init__(self, qts: QTest, pdev: GuestPCIDevice, alloc: GuestAlloc, features: int = DRIVER_FEATURES,
                 use_indirect: bool = False, queue_size: Optional[int] = None) -> None:
        self.qts = qts
        self.pci = pdev
        self.vdev = VirtioPCIGuest(qts, pdev, alloc)
        self.features = self.vdev.init(features)
        self.capacity_sectors = self.vdev.config_read(0, 8)
        self.seg_max = self.vdev.config_read(12, 4)
        self.blk_size = self.vdev.config_read(20, 4) if self.has(F_BLK_SIZE) else SECTOR
        self.read_only = self.has(F_RO)
        self.vq = self.vdev.setup_queue(0, queue_size)
        self.vdev.driver_ok()
        self.use_indirect = use_indirect and self.has(F_INDIRECT_DESC)
        self.hdr = alloc.alloc(16, 16)
        self.status_addr = alloc.alloc(16, 16)
        self.buf = alloc.alloc(self.MAX_CHUNK, 4096)
        self.last_used_len = 0

    def has(self, bit: int) -> bool:
        return bool(self.features >> bit & 1)

    @property
    def capacity(self) -> int:
        return self.capacity_sectors * SECTOR

    @property
    def feature_names(self) -> list[str]:
        return [name for b, name in sorted(FEATURE_NAMES.items()) if self.has(b)]

    # -- one request ---------------------------------------------------------------------------------
    def request(self, rtype: int, sector: int, out: bytes = b"", in_len: int = 0,
                what: str = "request") -> bytes:
        """Submit one request and wait for it; returns the data read; raises GuestIOError."""
        self.qts.memwrite(self.hdr, struct.pack("<IIQ", rtype, 0, sector))
        self.qts.writeb(self.status_addr, 0xFF)
        bufs = [(self.hdr, 16, False)]
        if out:
            self.qts.memwrite(self.buf, out)
            bufs.append((self.buf, len(out), False))
        if in_len:
            bufs.append((self.buf, in_len, True))
        bufs.append((self.status_addr, 1, True))
        head = self.vq.add(bufs, indirect=self.use_indirect)
        self.vq.kick()
        for _ in range(1000):
            done = dict(self.vq.get_used())
            if head in done:
                self.last_used_len = done[head]
                break
            if self.vdev.status & STATUS_NEEDS_RESET:
                raise VirtioGuestError("device needs reset")
        else:
            raise VirtioGuestError("request timed out")
        status = self.qts.readb(self.status_addr)
        if status != S_OK:
            raise GuestIOError(status, what)
        return self.qts.memread(self.buf, in_len) if in_len else b""

    def _check(self, offset: int, length: int) -> None:
        if offset % SECTOR or length % SECTOR:
            raise ValueError("offset and length must be multiples of 512")

    def read(self, offset: int, length: int) -> bytes:
        self._check(offset, length)
        out = []
        while length:
            n = min(length, self.MAX_CHUNK)
            out.append(self.request(T_IN, offset // SECTOR, in_len=n, what=f"read {offset:#x}+{n:#x}"))
            offset += n
            length -= n
        return b"".join(out)

    def write(self, offset: int, data: bytes) -> None:
        self._check(offset, len(data))
        pos = 0
        while pos < len(data):
            n = min(len(data) - pos, self.MAX_CHUNK)
            self.request(T_OUT, (offset + pos) // SECTOR, out=data[pos:pos + n],
                         what=f"write {offset + pos:#x}+{n:#x}")
            pos += n

    def flush(self) -> None:
        self.request(T_FLUSH, 0, what="flush")

    def _dwz(self, rtype: int, offset: int, length: int, unmap: bool) -> None:
        self._check(offset, length)
        seg = struct.pack("<QII", offset // SECTOR, length // SECTOR, 1 if unmap else 0)
        self.request(rtype, 0, out=seg, what="discard" if rtype == T_DISCARD else "write_zeroes")

    def discard(self, offset: int, length: int) -> None:
        self._dwz(T_DISCARD, offset, length, False)

    def write_zeroes(self, offset: int, length: int, unmap: bool = False) -> None:
        self._dwz(T_WRITE_ZEROES, offset, length, unmap)

    def serial(self) -> str:
        raw = self.request(T_GET_ID, 0, in_len=20, what="get_id")
        return raw.split(b"\0", 1)[0].decode(errors="replace")


def find_disks(qts: QTest, alloc: Optional[GuestAlloc] = None, **kw: object) -> list[GuestDisk]:
    """Initialise every virtio-blk function on bus 0 (BARs must already be assigned)."""
    alloc = alloc or GuestAlloc()
    return [GuestDisk(qts, d, alloc, **kw)  # type: ignore[arg-type]
            for d in GuestPCIBus(qts).scan() if d.vendor_id == 0x1AF4 and d.device_id == VIRTIO_BLK_DEVICE_ID]


def describe(disk: GuestDisk) -> str:
    """The boot-log line for a disk."""
    cap = disk.capacity
    human = f"{cap / (1 << 30):.2f} GiB" if cap >= 1 << 30 else f"{cap / (1 << 20):.2f} MiB"
    ro = " (read-only)" if disk.read_only else ""
    return (f"virtio-blk: {disk.pci.bdf} {disk.capacity_sectors} 512-byte sectors ({human}){ro}"
            f" features {','.join(disk.feature_names)}")


# -- guest workloads ------------------------------------------------------------------------------

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


def boot(machine: object) -> tuple[QTest, list[GuestDisk], list[str]]:
    """Python API: run the firmware on an in-process ``machine`` and bring up its virtio disks.

    Returns the qtest handle, the guest disks and the boot log (as ``guest boot`` prints it)."""
    from .firmware import pci_boot
    from .qtest import InProcessQTest
    qts = InProcessQTest(machine)
    ram = getattr(machine, "ram_size", 64 << 20)
    res = pci_boot(qts, ram)
    disks = find_disks(qts, GuestAlloc(0x10_0000, min(ram, 0x800_0000)))
    res.log += [describe(d) for d in disks]
    return qts, disks, res.log


def throughput(disk: GuestDisk, mode: str = "seq", block_size: int = 65536, total: int = 4 << 20,
               seed: int = 0) -> tuple[float, list[str]]:
    """Sequential or random reads of ``block_size`` until ``total`` bytes; returns (MiB/s, lines)."""
    import random
    import time
    rng = random.Random(seed)
    nblocks = max(1, disk.capacity // block_size)
    t0 = time.perf_counter()
    done, pos = 0, 0
    while done < total:
        off = (pos % nblocks) * block_size if mode == "seq" else rng.randrange(nblocks) * block_size
        disk.read(off, block_size)
        pos += 1
        done += block_size
    dt = max(time.perf_counter() - t0, 1e-9)
    rate = done / dt / (1 << 20)
    return rate, [f"{mode} read {done} bytes in {block_size}-byte requests: {dt:.3f} s, {rate:.1f} MiB/s"]
