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
IOV_MAX = 1024  # buffers in one vectored read of merged requests (the host's limit)

_HDR = struct.Struct("<IIQ")
_DWZ = struct.Struct("<QII")


def bit(n: int) -> int:
    return 1 << n


#: a parsed chain: (element, type, sector, device-writable data views, status byte view, used.len)
_Request = tuple[VirtQueueElement, int, int, list[memoryview], memoryview, int]


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
                    self._serve_batch(vq, batch)
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

    def _serve_batch(self, vq: SplitVirtQueue, batch: list[VirtQueueElement]) -> None:
        """Serve popped chains in order and fill their used elements. Reads of consecutive
        sectors are merged into one vectored block-layer read (QEMU's virtio_blk_submit_multireq)
        and completed in place, so the guest sees what serving them one by one gives it. On a
        driver error the chains before it are served and the rest handed back unserved."""
        run: list[_Request] = []  # reads of consecutive sectors waiting to be merged, bounded as
        end = nbytes = niov = 0     # QEMU bounds a merged request: MAX_TRANSFER bytes, IOV_MAX buffers
        try:
            for elem in batch:
                req = self._parse(elem)
                if self._mergeable(req):
                    n = req[5] - 1
                    if run and (req[2] != end or nbytes + n > MAX_TRANSFER or niov + len(req[3]) > IOV_MAX):
                        done, run, nbytes, niov = run, [], 0, 0
                        self._finish_run(vq, done)
                    run.append(req)
                    end, nbytes, niov = req[2] + n // SECTOR, nbytes + n, niov + len(req[3])
                else:
                    if run:
                        done, run, nbytes, niov = run, [], 0, 0
                        self._finish_run(vq, done)
                    vq.fill(elem, self._serve(req))
        except BaseException:  # as if popped one at a time: the rest was never taken
            vq.rewind(len(batch) - 1 - batch.index(elem))
            raise
        finally:
            if run:
                self._finish_run(vq, run)

    def _mergeable(self, req: _Request) -> bool:
        """A read that goes straight into guest RAM and will succeed as far as its range goes."""
        _, rtype, sector, data_in, _, in_len = req
        return (rtype == VIRTIO_BLK_T_IN and self.blk is not None and 0 < len(data_in) <= BOUNCE_SEGMENTS
                and in_len - 1 <= MAX_TRANSFER and self._range_ok(sector, in_len - 1))

    def _finish_run(self, vq: SplitVirtQueue, reqs: list[_Request]) -> None:
        """Complete a run's reads in order with one (vectored) read; after a block-layer error,
        again one by one, so each request gets its own status."""
        if self._read_merged(reqs):
            stats = self.stats
            for elem, _, _, _, status_view, in_len in reqs:
                stats["rd_bytes"] += in_len - 1
                stats["rd_operations"] += 1
                status_view[0] = VIRTIO_BLK_S_OK
                vq.fill(elem, in_len)
            return
        for req in reqs:
            vq.fill(req[0], self._serve(req))

    def _read_merged(self, reqs: list[_Request]) -> bool:
        try:
            if len(reqs) == 1 and len(reqs[0][3]) == 1:
                self.blk.preadinto(reqs[0][3][0], reqs[0][2] * SECTOR)
            else:
                self.blk.preadv([v for req in reqs for v in req[3]], reqs[0][2] * SECTOR)
        except (QcowError, OSError):
            return False
        return True

    def handle(self, elem: VirtQueueElement) -> int:
        """Serve one chain; write its status byte; return used.len."""
        return self._serve(self._parse(elem))

    def _serve(self, req: _Request) -> int:
        elem, rtype, sector, data_in, status_view, in_len = req
        status = self._dispatch(elem, rtype, sector, data_in, in_len - 1)
        if status != VIRTIO_BLK_S_OK:
            self.stats["failed_operations"] += 1
        status_view[0] = status
        return in_len

    def _parse(self, elem: VirtQueueElement) -> _Request:
        """The request in a chain; a chain without a usable header or status byte is a driver error."""
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
        return elem, rtype & ~VIRTIO_BLK_T_BARRIER, sector, data_in, status_view, in_len

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
