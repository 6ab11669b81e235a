"""virtio-blk requests (VIRTIO 1.x section 5.2), independent of the transport.

:class:`VirtioBlk` owns a qcowpy ``BlockDevice`` (or ``None`` for an empty drive), the
configuration space and the feature bits it offers, and serves the chains of its request queue:

* header (device-readable, 16 bytes): ``type u32, reserved u32, sector u64``;
* data: device-readable for OUT / DISCARD / WRITE_ZEROES, device-writable for IN / GET_ID;
* status (the last device-writable byte): OK 0, IOERR 1, UNSUPP 2.

``used.len`` is the total size of the device-writable buffers, as QEMU reports it. A missing
header or status byte is a driver error (:class:`~qcowpy.virtio.split.VirtQueueError`, so the
transport sets DEVICE_NEEDS_RESET); anything else wrong with a request — out of range, not a
multiple of 512, a write to a read-only drive, too large, a block-layer error — completes just
that request with IOERR or UNSUPP.
"""
from __future__ import annotations

import struct
from typing import Any

from qcowpy.errors import QcowError

from .split import (SplitVirtQueue, VirtQueueElement, VirtQueueError, iov_from_bytes, iov_split_tail,
                    iov_to_bytes)

VIRTIO_ID_BLOCK = 2

# feature bits
VIRTIO_BLK_F_SIZE_MAX = 1
VIRTIO_BLK_F_SEG_MAX = 2
VIRTIO_BLK_F_GEOMETRY = 4
VIRTIO_BLK_F_RO = 5
VIRTIO_BLK_F_BLK_SIZE = 6
VIRTIO_BLK_F_FLUSH = 9
VIRTIO_BLK_F_TOPOLOGY = 10
VIRTIO_BLK_F_CONFIG_WCE = 11
VIRTIO_BLK_F_MQ = 12
VIRTIO_BLK_F_DISCARD = 13
VIRTIO_BLK_F_WRITE_ZEROES = 14
VIRTIO_F_RING_INDIRECT_DESC = 28
VIRTIO_F_RING_EVENT_IDX = 29
VIRTIO_F_VERSION_1 = 32

# request types
VIRTIO_BLK_T_IN = 0
VIRTIO_BLK_T_OUT = 1
VIRTIO_BLK_T_FLUSH = 4
VIRTIO_BLK_T_GET_ID = 8
VIRTIO_BLK_T_DISCARD = 11
VIRTIO_BLK_T_WRITE_ZEROES = 13
VIRTIO_BLK_T_BARRIER = 0x80000000  # legacy flag, ignored like QEMU

VIRTIO_BLK_S_OK = 0
VIRTIO_BLK_S_IOERR = 1
VIRTIO_BLK_S_UNSUPP = 2

VIRTIO_BLK_WRITE_ZEROES_FLAG_UNMAP = 1
VIRTIO_BLK_ID_BYTES = 20

SECTOR = 512
CONFIG_SIZE = 57  # up to and including write_zeroes_may_unmap (QEMU 7.2's config_len)
MAX_DISCARD_SECTORS = 0x3FFFFF  # QEMU's defaults (BDRV_REQUEST_MAX_SECTORS clamp)
MAX_WRITE_ZEROES_SECTORS = 0x3FFFFF
BOUNCE_SEGMENTS = 4  # above this many buffers a read goes through one bounce buffer: a block-layer
# read costs Python time per call, a memcpy per page does not (docs/performance.md)
MAX_TRANSFER = 32 << 20  # larger IN/OUT requests complete with IOERR (bounded host memory)

_HDR = struct.Struct("<IIQ")
_DWZ = struct.Struct("<QII")


def bit(n: int) -> int:
    return 1 << n


class VirtioBlk:
    """The virtio-blk device model proper: config space, features and request handling."""

    def __init__(self, blk: Any, read_only: bool = False, serial: str = "", queue_size: int = 256,
                 logical_block_size: int = SECTOR, num_queues: int = 1) -> None:
        self.blk = blk
        self.num_queues = num_queues
        self.read_only = read_only or bool(getattr(blk, "read_only", False))
        self.serial = serial or ""
        self.queue_size = queue_size
        self.logical_block_size = logical_block_size
        self.seg_max = queue_size - 2
        self._capacity = self.capacity
        self.stats = {"rd_bytes": 0, "wr_bytes": 0, "rd_operations": 0, "wr_operations": 0,
                      "flush_operations": 0, "failed_operations": 0}

    # -- identity ---------------------------------------------------------------------------------
    @property
    def capacity(self) -> int:
        """Size in 512-byte sectors."""
        return (self.blk.size // SECTOR) if self.blk is not None else 0

    def host_features(self) -> int:
        f = (bit(VIRTIO_F_VERSION_1) | bit(VIRTIO_F_RING_INDIRECT_DESC) | bit(VIRTIO_F_RING_EVENT_IDX)
             | bit(VIRTIO_BLK_F_SEG_MAX) | bit(VIRTIO_BLK_F_BLK_SIZE) | bit(VIRTIO_BLK_F_FLUSH)
             | bit(VIRTIO_BLK_F_DISCARD) | bit(VIRTIO_BLK_F_WRITE_ZEROES))
        if self.read_only:
            f |= bit(VIRTIO_BLK_F_RO)
        if self.num_queues > 1:
            f |= bit(VIRTIO_BLK_F_MQ)
        return f

    def config(self) -> bytes:
        """The device configuration structure (``struct virtio_blk_config``), little-endian."""
        c = bytearray(CONFIG_SIZE)
        struct.pack_into("<QII", c, 0, self.capacity, 0, self.seg_max)
        # geometry as QEMU guesses it for an unpartitioned disk (the GEOMETRY feature is not offered)
        struct.pack_into("<HBB", c, 16, max(2, min(16383, self.capacity // (16 * 63))), 16, 63)
        struct.pack_into("<I", c, 20, self.logical_block_size)
        c[32] = 1  # writeback: the cache mode is writeback (CONFIG_WCE not offered)
        struct.pack_into("<H", c, 34, self.num_queues)
        struct.pack_into("<III", c, 36, MAX_DISCARD_SECTORS, 1, self.logical_block_size // SECTOR)
        struct.pack_into("<IIB", c, 48, MAX_WRITE_ZEROES_SECTORS, 1, 1)
        return bytes(c)

    # -- requests ------------------------------------------------------------------------------------
    def process_queue(self, vq: SplitVirtQueue) -> bool:
        """Serve every available chain; True when the driver should be interrupted.

        Raises VirtQueueError on a driver error (the transport then sets NEEDS_RESET)."""
        old = vq.used_idx
        self._capacity = self.capacity  # fixed for the batch (a resize lands between batches)
        try:
            while True:
                batch = vq.pop_many()  # the usual chains, walked in one call
                if batch:
                    try:
                        for elem in batch:
                            vq.fill(elem, self.handle(elem))
                    except BaseException:  # as if popped one at a time: the rest was never taken
                        vq.rewind(len(batch) - 1 - batch.index(elem))
                        raise
                    continue
                if not vq.known_avail:  # the ring is empty
                    break
                elem = vq.pop()  # one the general walker must take (or report)
                if elem is None:
                    break
                vq.fill(elem, self.handle(elem))
        finally:  # what was served before a driver error is still returned
            vq.flush()
        return vq.used_idx != old and vq.should_notify(old)

    def handle(self, elem: VirtQueueElement) -> int:
        """Serve one chain; write its status byte; return used.len."""
        if not elem.out_sg or not elem.in_sg:
            raise VirtQueueError("virtio-blk missing headers")
        if elem.out_len < _HDR.size:
            raise VirtQueueError("virtio-blk request outhdr too short")
        in_len = elem.in_len
        if in_len < 1 or elem.in_sg[-1][1] < 1:
            raise VirtQueueError("virtio-blk request inhdr too short")
        in_iov = elem.in_iov
        if len(in_iov[-1]) == 1:  # the usual layout: the status byte has a descriptor of its own
            data_in, status_view = in_iov[:-1], in_iov[-1]
        else:
            data_in, tail = iov_split_tail(in_iov, 1)
            status_view = tail[0]
        head = elem.out_iov[0]
        if len(head) >= _HDR.size:
            rtype, _, sector = _HDR.unpack_from(head)
        else:
            rtype, _, sector = _HDR.unpack(iov_to_bytes(elem.out_iov, 0, _HDR.size))
        status = self._dispatch(elem, rtype & ~VIRTIO_BLK_T_BARRIER, sector, data_in, in_len - 1)
        if status != VIRTIO_BLK_S_OK:
            self.stats["failed_operations"] += 1
        status_view[0] = status
        return in_len

    def _range_ok(self, sector: int, nbytes: int) -> bool:
        if nbytes % self.logical_block_size or (sector * SECTOR) % self.logical_block_size:
            return False
        cap = self._capacity
        return sector <= cap and nbytes // SECTOR <= cap - sector

    def _dispatch(self, elem: VirtQueueElement, rtype: int, sector: int,
                  data_in: list[memoryview], data_in_len: int) -> int:
        out_data_len = elem.out_len - _HDR.size
        try:
            if rtype == VIRTIO_BLK_T_IN:
                if self.blk is None or not self._range_ok(sector, data_in_len) or data_in_len > MAX_TRANSFER:
                    return VIRTIO_BLK_S_IOERR
                pos = sector * SECTOR
                if len(data_in) <= BOUNCE_SEGMENTS:
                    for view in data_in:  # straight into guest RAM, one block-layer read per mapped piece
                        self.blk.preadinto(view, pos)
                        pos += len(view)
                else:  # many small pieces (a real guest's pages): one read, then a scatter copy
                    bounce = bytearray(data_in_len)
                    self.blk.preadinto(bounce, pos)
                    iov_from_bytes(data_in, bounce)
                self.stats["rd_bytes"] += data_in_len
                self.stats["rd_operations"] += 1
                return VIRTIO_BLK_S_OK
            if rtype == VIRTIO_BLK_T_OUT:
                if (self.blk is None or self.read_only or not self._range_ok(sector, out_data_len)
                        or out_data_len > MAX_TRANSFER):
                    return VIRTIO_BLK_S_IOERR
                if out_data_len:
                    _, data = iov_split_tail(elem.out_iov, out_data_len)
                    self.blk.pwrite(data[0] if len(data) == 1 else b"".join(data), sector * SECTOR)
                self.stats["wr_bytes"] += out_data_len
                self.stats["wr_operations"] += 1
                return VIRTIO_BLK_S_OK
            if rtype == VIRTIO_BLK_T_FLUSH:
                if self.blk is None:
                    return VIRTIO_BLK_S_IOERR
                if not self.read_only:
                    self.blk.flush()
                self.stats["flush_operations"] += 1
                return VIRTIO_BLK_S_OK
            if rtype == VIRTIO_BLK_T_GET_ID:
                ident = self.serial.encode()[:VIRTIO_BLK_ID_BYTES]
                if len(ident) < VIRTIO_BLK_ID_BYTES:
                    ident += b"\0"
                iov_from_bytes(data_in, ident[:data_in_len])
                return VIRTIO_BLK_S_OK
            if rtype in (VIRTIO_BLK_T_DISCARD, VIRTIO_BLK_T_WRITE_ZEROES):
                return self._discard_write_zeroes(elem, rtype == VIRTIO_BLK_T_WRITE_ZEROES, out_data_len)
            return VIRTIO_BLK_S_UNSUPP
        except VirtQueueError:
            raise
        except (QcowError, OSError):
            return VIRTIO_BLK_S_IOERR

    def _discard_write_zeroes(self, elem: VirtQueueElement, wz: bool, out_len: int) -> int:
        if out_len > _DWZ.size:  # more than one segment (max_*_seg is 1)
            return VIRTIO_BLK_S_UNSUPP
        if out_len < _DWZ.size:
            raise VirtQueueError("virtio-blk discard/write_zeroes header too short")
        sector, num, flags = _DWZ.unpack(iov_to_bytes(elem.out_iov, _HDR.size, _DWZ.size))
        if num > (MAX_WRITE_ZEROES_SECTORS if wz else MAX_DISCARD_SECTORS):
            return VIRTIO_BLK_S_IOERR
        if self.blk is None or not self._range_ok(sector, num * SECTOR):
            return VIRTIO_BLK_S_IOERR
        if flags & ~VIRTIO_BLK_WRITE_ZEROES_FLAG_UNMAP:
            return VIRTIO_BLK_S_UNSUPP
        if not wz and flags & VIRTIO_BLK_WRITE_ZEROES_FLAG_UNMAP:
            return VIRTIO_BLK_S_UNSUPP
        if self.read_only:
            return VIRTIO_BLK_S_IOERR
        if num:
            if wz:
                self.blk.write_zeroes(num * SECTOR, sector * SECTOR,
                                      unmap=bool(flags & VIRTIO_BLK_WRITE_ZEROES_FLAG_UNMAP))
            else:
                self.blk.discard(num * SECTOR, sector * SECTOR)
        self.stats["wr_operations"] += 1
        return VIRTIO_BLK_S_OK
