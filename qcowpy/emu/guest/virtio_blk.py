"""Guest virtio-blk driver: a disk object on top of :mod:`qcowpy.emu.guest.virtio`.

:func:`find_disks` probes every virtio-blk PCI function (modern ID 1af4:1042) and returns a
:class:`GuestDisk` for each, initialised with the features this driver understands. Requests are
batched: up to ``depth`` chains (header, data, status) in guest RAM, one kick, then completions
reaped from the used ring — by polling it (``completion="poll"``) or after waiting for the queue's
interrupt (``completion="interrupt"``: ISR bit 0, or the MSI-X message word).
``GuestDisk(..., use_msix=True)`` also turns on MSI-X when the device has it: configuration
interrupts go to table entry 0 and the queue's to entry 1 (``disk.msix_config``, ``disk.msix_queue``,
polled with ``disk.vdev.msix_fired``).
"""
from __future__ import annotations

import struct
import time
from typing import Optional, Sequence

from ..pci import regs
from .pci import GuestPCIBus, GuestPCIDevice
from .qtest import QTest
from .ram import RamArea
from .virtio import (DESC_F_INDIRECT, F_EVENT_IDX, F_INDIRECT_DESC, NO_VECTOR, STATUS_NEEDS_RESET, GuestAlloc,
                     MSIXVector, VirtioGuestError, VirtioPCIGuest, pack_chain)

VIRTIO_BLK_DEVICE_ID = 0x1042
F_SEG_MAX, F_RO, F_BLK_SIZE, F_FLUSH, F_DISCARD, F_WRITE_ZEROES = 2, 5, 6, 9, 13, 14
T_IN, T_OUT, T_FLUSH, T_GET_ID, T_DISCARD, T_WRITE_ZEROES = 0, 1, 4, 8, 11, 13
S_OK, S_IOERR, S_UNSUPP = 0, 1, 2
SECTOR = 512
FEATURE_NAMES = {F_SEG_MAX: "seg_max", F_RO: "ro", F_BLK_SIZE: "blk_size", F_FLUSH: "flush",
                 F_DISCARD: "discard", F_WRITE_ZEROES: "write_zeroes", F_INDIRECT_DESC: "indirect_desc",
                 F_EVENT_IDX: "event_idx", 32: "version_1"}
DRIVER_FEATURES = sum(1 << b for b in FEATURE_NAMES)
MSIX_CONFIG_DATA, MSIX_QUEUE_DATA = 0x0C0F1600, 0x12345678  # message data the opt-in MSI-X set-up uses


class GuestIOError(Exception):
    """A request completed with a status other than OK."""

    def __init__(self, status: int, what: str) -> None:
        super().__init__(f"{what}: status {status} ({ {S_IOERR: 'IOERR', S_UNSUPP: 'UNSUPP'}.get(status, '?') })")
        self.status = status


Request = tuple  # (type, sector, out: bytes, in_len) as for GuestDisk.request
_SLOT_HEADER = struct.Struct("<IIQB15x")  # type, reserved, sector, status preset, padding


class _Slot:
    """One request slot: its header+status area, its data buffer and its reserved descriptors."""

    def __init__(self, index: int, area: int, ids: list[int], table: int) -> None:
        self.index = index
        self.hdr = area            # 16-byte request header, status byte at +16 (32 bytes a slot)
        self.ids = ids             # reserved descriptor ids (one head with an indirect table)
        self.table = table         # the slot's indirect table (0 without indirect descriptors)
        self.buf = 0
        self.buf_size = 0
        self.shape: tuple[int, int] = (-1, -1)  # (out, in) lengths the descriptors were written for


class GuestDisk:
    """One virtio-blk disk from the guest's point of view.

    Requests run through a fixed set of slots, each with its own header, status byte, data buffer
    and pre-reserved descriptors (rewritten only when a request's shape changes). Up to
    ``depth`` requests are in flight: they are published together, with one notification, and
    completions are reaped in batches, in whatever order the device finishes them."""

    MAX_CHUNK = 256 << 10
    MAX_DEPTH = 64

    def __init__(self, qts: QTest, pdev: GuestPCIDevice, alloc: GuestAlloc, features: int = DRIVER_FEATURES,
                 use_indirect: bool = False, queue_size: Optional[int] = None, use_msix: bool = False,
                 completion: str = "poll", via_pci_cfg: bool = False) -> None:
        if completion not in ("poll", "interrupt"):
            raise ValueError(f"completion must be 'poll' or 'interrupt', not {completion!r}")
        self.completion = completion
        self.interrupts = 0  # interrupts waited for (completion="interrupt")
        self.qts = qts
        self.pci = pdev
        self.alloc = alloc
        self.vdev = VirtioPCIGuest(qts, pdev, alloc, via_pci_cfg=via_pci_cfg)
        self.features = self.vdev.init(features)
        self.capacity_sectors = self.vdev.config_read(0, 8)
        self.seg_max = self.vdev.config_read(12, 4)
        self.blk_size = self.vdev.config_read(20, 4) if self.has(F_BLK_SIZE) else SECTOR
        self.read_only = self.has(F_RO)
        self.msix_config: Optional[MSIXVector] = None
        self.msix_queue: Optional[MSIXVector] = None
        if use_msix and pdev.find_capability(regs.CAP_ID_MSIX):
            self._setup_msix()
        self.vq = self.vdev.setup_queue(0, queue_size, self.msix_queue.entry if self.msix_queue else None)
        self.vdev.driver_ok()
        self.use_indirect = use_indirect and self.has(F_INDIRECT_DESC)
        self.hdr = alloc.alloc(16, 16)           # scratch buffers for hand-built chains (tests)
        self.status_addr = alloc.alloc(16, 16)
        self.buf = alloc.alloc(self.MAX_CHUNK, 4096)
        per_slot = 1 if self.use_indirect else 3
        self.depth = max(1, min(self.MAX_DEPTH, (self.vq.size // 2) // per_slot))
        areas = alloc.alloc(32 * self.depth, 32)
        self.areas = RamArea(qts, areas, 32 * self.depth)  # every slot's header and status byte
        self.slots = [_Slot(k, areas + 32 * k, self.vq.reserve(min(per_slot, self.vq.size)),
                            alloc.alloc(48, 16) if self.use_indirect else 0) for k in range(self.depth)]
        self.slots[0].buf, self.slots[0].buf_size = self.buf, self.MAX_CHUNK
        self.last_used_len = 0

    def _setup_msix(self) -> None:
        """libqos's order: MSI-X on, the configuration vector, then (in setup_queue) the queue's;
        a one-entry table serves both."""
        msix = self.vdev.enable_msix()
        self.msix_config = self.vdev.msix_vector(0, MSIX_CONFIG_DATA)
        if self.vdev.set_config_vector(0) == NO_VECTOR:
            raise VirtioGuestError("device refused MSI-X vector 0 for configuration changes")
        self.msix_queue = self.vdev.msix_vector(1, MSIX_QUEUE_DATA) if msix.table_size > 1 else self.msix_config

    def has(self, bit: int) -> bool:
        return bool(self.features >> bit & 1)

    def clamp_depth(self, depth: Optional[int]) -> int:
        """The queue depth a run really uses: ``depth`` (default: all slots) within 1..slots."""
        return max(1, min(depth or self.depth, self.depth))

    @property
    def capacity(self) -> int:
        return self.capacity_sectors * SECTOR

    @property
    def feature_names(self) -> list[str]:
        return [name for b, name in sorted(FEATURE_NAMES.items()) if self.has(b)]

    # -- requests ------------------------------------------------------------------------------------
    def _prepare(self, slot: _Slot, out: bytes, in_len: int) -> int:
        """Set up ``slot``'s data buffer and descriptors for one request; returns its head.

        The header is written by the caller (:meth:`_write_headers`, a batch at a time)."""
        size = max(len(out), in_len)
        if size > slot.buf_size:
            slot.buf, slot.buf_size = self.alloc.alloc(max(size, 4096), 4096), max(size, 4096)
        if out:
            self.qts.memwrite(slot.buf, out)
        if slot.shape != (len(out), in_len):  # the slot's chain only depends on the data lengths
            bufs = [(slot.hdr, 16, False)]
            if out:
                bufs.append((slot.buf, len(out), False))
            if in_len:
                bufs.append((slot.buf, in_len, True))
            bufs.append((slot.hdr + 16, 1, True))
            if self.use_indirect:
                self.qts.memwrite(slot.table, pack_chain(bufs, list(range(len(bufs)))))
                self.vq.write_descs(slot.ids, struct.pack("<QIHH", slot.table, 16 * len(bufs), DESC_F_INDIRECT, 0))
            else:
                if len(bufs) > len(slot.ids):
                    raise VirtioGuestError(f"a {len(bufs)}-buffer request does not fit a queue of {self.vq.size}")
                ids = slot.ids[:len(bufs)]
                self.vq.write_descs(ids, pack_chain(bufs, ids))
            slot.shape = (len(out), in_len)
        return slot.ids[0]

    def _write_headers(self, batch: list[tuple[int, bytes]]) -> None:
        """Write (slot index, header) pairs: header, status preset 0xff and padding to 32 bytes,
        one memory write per run of neighbouring slots."""
        batch.sort()
        i = 0
        while i < len(batch):
            j = i + 1
            while j < len(batch) and batch[j][0] == batch[j - 1][0] + 1:
                j += 1
            self.areas.write(32 * batch[i][0], b"".join(h for _, h in batch[i:j]))
            i = j

    def run(self, requests: Sequence[Request], depth: Optional[int] = None,
            want_data: bool = True) -> list[tuple[int, int, bytes]]:
        """Run requests with up to ``depth`` (default: all slots) in flight.

        Returns (status, used.len, data read) per request, in request order; with ``want_data``
        false the data stays in guest RAM (the slot buffers) and is not copied out."""
        depth = self.clamp_depth(depth)
        free = self.slots[:depth][::-1]
        inflight: dict[int, tuple[int, _Slot]] = {}
        results: list[tuple[int, int, bytes]] = [(S_IOERR, 0, b"")] * len(requests)
        nxt = done = polls = 0
        pack_header, pack_header_into = _SLOT_HEADER.pack, _SLOT_HEADER.pack_into
        while done < len(requests):
            heads, headers = [], []
            view = self.areas.sync()  # mapped: headers go straight in, status bytes are read there
            while free and nxt < len(requests):
                slot = free.pop()
                rtype, sector, out, in_len = requests[nxt]
                if out or slot.shape != (0, in_len):
                    head = self._prepare(slot, out, in_len)
                else:  # same shape as the slot's last request: its descriptors are still right
                    head = slot.ids[0]
                if view is not None:
                    pack_header_into(view, 32 * slot.index, rtype, 0, sector, 0xFF)
                else:
                    headers.append((slot.index, pack_header(rtype, 0, sector, 0xFF)))
                inflight[head] = (nxt, slot)
                heads.append(head)
                nxt += 1
            if heads:
                if headers:
                    self._write_headers(headers)
                self.vq.submit(heads)
            if self.completion == "interrupt":
                self._wait_interrupt()
            used = self.vq.get_used(settle=self.completion == "interrupt")
            if not used:
                polls += 1
                if self.vdev.status & STATUS_NEEDS_RESET:
                    raise VirtioGuestError("device needs reset")
                if polls > 1000:
                    raise VirtioGuestError("request timed out")
                continue
            polls = 0
            areas = view if view is not None else self.areas.read(0, 32 * depth)  # all status bytes at once
            for head, length in used:
                i, slot = inflight.pop(head)
                in_len = requests[i][3]
                status = areas[32 * slot.index + 16]
                data = self.qts.memread(slot.buf, in_len) if in_len and want_data and status == S_OK else b""
                results[i] = (status, length, data)
                self.last_used_len = length
                free.append(slot)
                done += 1
        return results

    def _wait_interrupt(self, timeout: float = 10.0) -> None:
        """Sleep until the queue interrupts, as libqos's qvirtio_wait_queue_isr does with qtest:
        watch the MSI-X message word, or ISR bit 0 (reading the ISR acknowledges it and lowers
        INTx). A configuration interrupt with NEEDS_RESET ends the wait with an error."""
        deadline = time.monotonic() + timeout
        while True:
            if self.msix_queue is not None:
                if self.vdev.msix_fired(self.msix_queue):
                    break
            elif self.vdev.read_isr() & 1:
                break
            if self.vdev.status & STATUS_NEEDS_RESET:
                raise VirtioGuestError("device needs reset")
            if time.monotonic() > deadline:
                raise VirtioGuestError("no interrupt: request timed out")
        self.interrupts += 1

    def request(self, rtype: int, sector: int, out: bytes = b"", in_len: int = 0,
                what: str = "request") -> bytes:
        """Submit one request and wait for it; returns the data read; raises GuestIOError."""
        status, _, data = self.run([(rtype, sector, out, in_len)], 1)[0]
        if status != S_OK:
            raise GuestIOError(status, what)
        return data

    def _run_checked(self, requests: list[Request], what: str, want_data: bool = True,
                     depth: Optional[int] = None) -> list[bytes]:
        results = self.run(requests, depth, want_data)
        for (rtype, sector, out, in_len), (status, _, _) in zip(requests, results):
            if status != S_OK:
                raise GuestIOError(status, f"{what} {sector * SECTOR:#x}+{max(len(out), in_len):#x}")
        return [data for _, _, data in results]

    def _check(self, offset: int, length: int) -> None:
        if offset % SECTOR or length % SECTOR:
            raise ValueError("offset and length must be multiples of 512")

    def _chunks(self, offset: int, length: int) -> list[tuple[int, int]]:
        self._check(offset, length)
        return [(pos, min(self.MAX_CHUNK, offset + length - pos)) for pos in range(offset, offset + length, self.MAX_CHUNK)]

    def read(self, offset: int, length: int) -> bytes:
        reqs = [(T_IN, pos // SECTOR, b"", n) for pos, n in self._chunks(offset, length)]
        return b"".join(self._run_checked(reqs, "read"))

    def write(self, offset: int, data: bytes) -> None:
        reqs = [(T_OUT, pos // SECTOR, data[pos - offset:pos - offset + n], 0)
                for pos, n in self._chunks(offset, len(data))]
        self._run_checked(reqs, "write")

    def read_blocks(self, offsets: Sequence[int], block_size: int, depth: Optional[int] = None) -> None:
        """Read ``block_size`` bytes at each offset into guest buffers, ``depth`` at a time (fio-style:
        the data lands in guest RAM and stays there)."""
        for off in offsets:
            self._check(off, block_size)
        self._run_checked([(T_IN, off // SECTOR, b"", block_size) for off in offsets], "read",
                          want_data=False, depth=depth)

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


def is_virtio_blk(dev: GuestPCIDevice) -> bool:
    """A modern virtio-blk PCI function (1af4:1042)."""
    return dev.vendor_id == 0x1AF4 and dev.device_id == VIRTIO_BLK_DEVICE_ID


def find_disks(qts: QTest, alloc: Optional[GuestAlloc] = None, **kw: object) -> list[GuestDisk]:
    """Initialise every virtio-blk function on bus 0 (BARs must already be assigned)."""
    alloc = alloc or GuestAlloc()
    return [GuestDisk(qts, d, alloc, **kw)  # type: ignore[arg-type]
            for d in GuestPCIBus(qts).scan() if is_virtio_blk(d)]


def describe(disk: GuestDisk) -> str:
    """The boot-log line for a disk."""
    cap = disk.capacity
    human = f"{cap / (1 << 30):.2f} GiB" if cap >= 1 << 30 else f"{cap / (1 << 20):.2f} MiB"
    ro = " (read-only)" if disk.read_only else ""
    return (f"virtio-blk: {disk.pci.bdf} {disk.capacity_sectors} 512-byte sectors ({human}){ro}"
            f" features {','.join(disk.feature_names)}")
