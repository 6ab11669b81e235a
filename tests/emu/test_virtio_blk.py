"""The virtio-blk request engine on a bytearray guest and a real qcowpy BlockDevice (no PCI)."""
from __future__ import annotations

import random
import struct

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import qcowpy
from qcowpy.virtio import blk as vb
from qcowpy.virtio.split import (VRING_DESC_F_INDIRECT, VRING_DESC_F_NEXT, VRING_DESC_F_WRITE, BytesMemory,
                                     SplitVirtQueue, VirtQueueError)
from qcowpy.errors import QcowError

NUM = 16
DESC, AVAIL, USED = 0x1000, 0x2000, 0x3000
HDR, DATA, STATUS = 0x4000, 0x10000, 0x5000
SIZE = 1 << 20


class Guest:
    def __init__(self, blkdev, read_only=False, serial="") -> None:
        self.buf = bytearray(0x80000)
        self.mem = BytesMemory(self.buf)
        self.vq = SplitVirtQueue(self.mem, NUM)
        self.vq.desc, self.vq.avail, self.vq.used, self.vq.ready = DESC, AVAIL, USED, True
        self.dev = vb.VirtioBlk(blkdev, read_only=read_only, serial=serial, queue_size=NUM)
        self.avail = 0

    def submit(self, bufs):
        """bufs: (addr, len, writable); returns (status byte, used.len) after processing."""
        for i, (a, n, w) in enumerate(bufs):
            flags = (VRING_DESC_F_WRITE if w else 0) | (VRING_DESC_F_NEXT if i + 1 < len(bufs) else 0)
            struct.pack_into("<QIHH", self.buf, DESC + 16 * i, a, n, flags, i + 1)
        struct.pack_into("<H", self.buf, AVAIL + 4 + 2 * (self.avail % NUM), 0)
        self.avail += 1
        struct.pack_into("<H", self.buf, AVAIL + 2, self.avail)
        self.buf[STATUS] = 0xEE
        self.dev.process_queue(self.vq)
        _, used_len = struct.unpack_from("<II", self.buf, USED + 4 + 8 * ((self.avail - 1) % NUM))
        return self.buf[STATUS], used_len

    def req(self, rtype, sector, out=b"", in_len=0):
        struct.pack_into("<IIQ", self.buf, HDR, rtype, 0, sector)
        bufs = [(HDR, 16, False)]
        if out:
            self.buf[DATA:DATA + len(out)] = out
            bufs.append((DATA, len(out), False))
        if in_len:
            bufs.append((DATA, in_len, True))
        bufs.append((STATUS, 1, True))
        return self.submit(bufs)


@pytest.fixture
def disk(tmp_path):
    p = tmp_path / "d.qcow2"
    qcowpy.create(str(p), SIZE, cluster_size=4096)
    d = qcowpy.open(str(p), "r+")
    yield d
    d.close()


def test_config_space(disk):
    g = Guest(disk, serial="x")
    c = g.dev.config()
    assert len(c) == 57
    assert struct.unpack_from("<Q", c, 0)[0] == SIZE // 512
    assert struct.unpack_from("<I", c, 12)[0] == NUM - 2          # seg_max
    assert struct.unpack_from("<I", c, 20)[0] == 512              # blk_size
    assert struct.unpack_from("<III", c, 36) == (vb.MAX_DISCARD_SECTORS, 1, 1)
    assert struct.unpack_from("<IIB", c, 48) == (vb.MAX_WRITE_ZEROES_SECTORS, 1, 1)
    f = g.dev.host_features()
    for b in (32, 28, 29, 2, 6, 9, 13, 14):
        assert f >> b & 1
    assert not f >> vb.VIRTIO_BLK_F_RO & 1
    assert vb.VirtioBlk(disk, read_only=True).host_features() >> vb.VIRTIO_BLK_F_RO & 1


def test_write_read_flush(disk):
    g = Guest(disk)
    data = bytes(range(256)) * 8
    assert g.req(vb.VIRTIO_BLK_T_OUT, 8, out=data) == (vb.VIRTIO_BLK_S_OK, 1)
    assert disk.pread(len(data), 8 * 512) == data
    st, used = g.req(vb.VIRTIO_BLK_T_IN, 8, in_len=2048)
    assert (st, used) == (vb.VIRTIO_BLK_S_OK, 2049)
    assert bytes(g.buf[DATA:DATA + 2048]) == data
    assert g.req(vb.VIRTIO_BLK_T_FLUSH, 0) == (vb.VIRTIO_BLK_S_OK, 1)


def test_scattered_buffers(disk):
    g = Guest(disk)
    disk.pwrite(b"A" * 512 + b"B" * 512, 0)
    struct.pack_into("<IIQ", g.buf, HDR, vb.VIRTIO_BLK_T_IN, 0, 0)
    # 1024 data bytes in three pieces, the status byte sharing the last one
    st, used = g.submit([(HDR, 16, False), (0x20000, 100, True), (0x30000, 700, True), (0x40000, 225, True)])
    assert used == 1025
    assert g.buf[0x40000 + 224] == 0
    got = bytes(g.buf[0x20000:0x20000 + 100] + g.buf[0x30000:0x30000 + 700] + g.buf[0x40000:0x40000 + 224])
    assert got == b"A" * 512 + b"B" * 512


def test_get_id(disk):
    g = Guest(disk, serial="QCOWPY-SERIAL")
    assert g.req(vb.VIRTIO_BLK_T_GET_ID, 0, in_len=20) == (0, 21)
    assert bytes(g.buf[DATA:DATA + 14]) == b"QCOWPY-SERIAL\0"
    g = Guest(disk, serial="S" * 25)
    g.req(vb.VIRTIO_BLK_T_GET_ID, 0, in_len=20)
    assert bytes(g.buf[DATA:DATA + 20]) == b"S" * 20  # not terminated when 20 bytes long


def test_discard_and_write_zeroes(disk):
    g = Guest(disk)
    disk.pwrite(b"\x55" * 65536, 0)
    seg = struct.pack("<QII", 0, 16, 0)
    assert g.req(vb.VIRTIO_BLK_T_WRITE_ZEROES, 0, out=seg)[0] == 0
    assert disk.pread(8192, 0) == bytes(8192)
    assert g.req(vb.VIRTIO_BLK_T_WRITE_ZEROES, 0, out=struct.pack("<QII", 16, 16, 1))[0] == 0
    assert disk.pread(8192, 8192) == bytes(8192)
    assert g.req(vb.VIRTIO_BLK_T_DISCARD, 0, out=struct.pack("<QII", 32, 32, 0))[0] == 0
    # UNMAP on discard, unknown flags, two segments
    assert g.req(vb.VIRTIO_BLK_T_DISCARD, 0, out=struct.pack("<QII", 0, 8, 1))[0] == vb.VIRTIO_BLK_S_UNSUPP
    assert g.req(vb.VIRTIO_BLK_T_WRITE_ZEROES, 0, out=struct.pack("<QII", 0, 8, 2))[0] == vb.VIRTIO_BLK_S_UNSUPP
    assert g.req(vb.VIRTIO_BLK_T_DISCARD, 0, out=struct.pack("<QII", 0, 8, 0) * 2)[0] == vb.VIRTIO_BLK_S_UNSUPP
    # past capacity
    assert g.req(vb.VIRTIO_BLK_T_WRITE_ZEROES, 0,
                 out=struct.pack("<QII", SIZE // 512 - 1, 2, 0))[0] == vb.VIRTIO_BLK_S_IOERR
    assert disk.pread(4096, 65536 - 4096) == b"\x55" * 4096


def test_errors_complete_only_that_request(disk):
    g = Guest(disk)
    cap = SIZE // 512
    assert g.req(vb.VIRTIO_BLK_T_IN, cap, in_len=512)[0] == vb.VIRTIO_BLK_S_IOERR
    assert g.req(vb.VIRTIO_BLK_T_IN, cap - 1, in_len=1024)[0] == vb.VIRTIO_BLK_S_IOERR
    assert g.req(vb.VIRTIO_BLK_T_IN, 2**64 - 1, in_len=512)[0] == vb.VIRTIO_BLK_S_IOERR
    assert g.req(vb.VIRTIO_BLK_T_OUT, 0, out=b"x" * 100)[0] == vb.VIRTIO_BLK_S_IOERR  # not a sector multiple
    assert g.req(vb.VIRTIO_BLK_T_IN, cap - 1, in_len=512)[0] == vb.VIRTIO_BLK_S_OK
    assert g.req(99, 0)[0] == vb.VIRTIO_BLK_S_UNSUPP
    assert g.dev.stats["failed_operations"] == 5


def test_read_only(disk):
    g = Guest(disk, read_only=True)
    assert g.req(vb.VIRTIO_BLK_T_OUT, 0, out=b"x" * 512)[0] == vb.VIRTIO_BLK_S_IOERR
    assert g.req(vb.VIRTIO_BLK_T_WRITE_ZEROES, 0, out=struct.pack("<QII", 0, 8, 0))[0] == vb.VIRTIO_BLK_S_IOERR
    assert g.req(vb.VIRTIO_BLK_T_IN, 0, in_len=512)[0] == vb.VIRTIO_BLK_S_OK
    assert disk.pread(512, 0) == bytes(512)


def test_block_layer_error_gives_ioerr(disk):
    class Failing:
        size = SIZE
        read_only = False

        def pread(self, *a):
            raise QcowError("injected")

        preadinto = pwrite = flush = pread
    g = Guest(Failing())
    assert g.req(vb.VIRTIO_BLK_T_IN, 0, in_len=512)[0] == vb.VIRTIO_BLK_S_IOERR
    assert g.req(vb.VIRTIO_BLK_T_FLUSH, 0)[0] == vb.VIRTIO_BLK_S_IOERR
    assert g.req(vb.VIRTIO_BLK_T_GET_ID, 0, in_len=20)[0] == vb.VIRTIO_BLK_S_OK


@pytest.mark.parametrize("bufs", [
    [(HDR, 16, False)],                                  # no status
    [(STATUS, 1, True)],                                 # no header
    [(HDR, 8, False), (STATUS, 1, True)],                # short header
    [(HDR, 16, False), (STATUS, 0, True)],               # empty status buffer
])
def test_malformed_chains_are_driver_errors(disk, bufs):
    g = Guest(disk)
    with pytest.raises(VirtQueueError):
        g.submit(bufs)


def _four_reads(g: Guest, bad: str) -> None:
    """Four 512-byte reads in one notification (chains at descriptors 3k..3k+2), the third broken."""
    heads = []
    for k in range(4):
        hdr, status, data = HDR + 32 * k, HDR + 32 * k + 16, DATA + 512 * k
        struct.pack_into("<IIQ", g.buf, hdr, vb.VIRTIO_BLK_T_IN, 0, k)
        for i, (a, n, f) in enumerate([(hdr, 16, VRING_DESC_F_NEXT), (data, 512, VRING_DESC_F_NEXT | VRING_DESC_F_WRITE),
                                       (status, 1, VRING_DESC_F_WRITE)]):
            struct.pack_into("<QIHH", g.buf, DESC + 16 * (3 * k + i), a, n, f, 3 * k + i + 1)
        heads.append(3 * k)
    if bad == "indirect-not-negotiated":
        struct.pack_into("<QIHH", g.buf, DESC + 16 * 6, DESC, 48, 4, 0)
    elif bad == "no-status":
        struct.pack_into("<QIHH", g.buf, DESC + 16 * 6, HDR + 64, 16, 0, 0)
    elif bad == "loop":
        struct.pack_into("<QIHH", g.buf, DESC + 16 * 8, HDR + 80, 1, VRING_DESC_F_WRITE | VRING_DESC_F_NEXT, 6)
    struct.pack_into(f"<HH{len(heads)}H", g.buf, AVAIL, 0, len(heads), *heads)


@pytest.mark.parametrize("event_idx", [False, True])
@pytest.mark.parametrize("bad", ["none", "indirect-not-negotiated", "no-status", "loop"])
def test_batch_is_served_as_one_pop_at_a_time_would(disk, bad, event_idx):
    """The usual chains are walked together and returned with one used-index update; a chain that
    needs the general walker is taken in its place. Guest memory and queue state end up exactly as
    when every chain is popped, served and pushed on its own: everything before a driver error is
    served and returned, nothing after it, and the error still surfaces."""
    disk.pwrite(bytes(range(256)) * 8, 0)
    outcomes = []
    for batched in (True, False):
        g = Guest(disk)
        g.vq.event_idx = event_idx
        _four_reads(g, bad)
        try:
            if batched:
                g.dev.process_queue(g.vq)
            else:
                while (e := g.vq.pop()) is not None:
                    g.vq.push(e, g.dev.handle(e))
            err = None
        except VirtQueueError as e:
            err = str(e)
        outcomes.append((err, bytes(g.buf), g.vq.used_idx, g.vq.last_avail_idx, g.vq.inflight, g.vq.filled,
                         g.dev.stats))
    assert outcomes[0] == outcomes[1]
    err, buf, used_idx = outcomes[0][:3]
    assert (err is None) == (bad == "none") and used_idx == (4 if bad == "none" else 2)
    assert buf[DATA:DATA + 1024] == disk.pread(1024, 0) and buf[HDR + 16] == buf[HDR + 48] == 0


#: two notifications of (type, sector, bytes): merged runs, a gap, a read past the end, a write
#: between reads of the same sectors
MIXED = [[(0, 0, 1024), (0, 2, 512), (0, 9, 512), (0, SIZE // 512, 512), (0, 10, 512)],
         [(0, 0, 1024), (1, 2, 512), (0, 2, 1024), (0, 4, 512), (0, 5, 1024)]]


def _mixed_batch(g: Guest, reqs: list[tuple[int, int, int]]) -> None:
    """Publish ``reqs`` (descriptors 3k..3k+2 each) in one go, data buffers preset to 0xa0 + k."""
    for k, (rtype, sector, n) in enumerate(reqs):
        hdr, status, data = HDR + 32 * k, HDR + 32 * k + 16, DATA + 1024 * k
        struct.pack_into("<IIQ", g.buf, hdr, rtype, 0, sector)
        g.buf[data:data + n] = bytes([0xA0 + k]) * n
        flags = 0 if rtype else VRING_DESC_F_WRITE
        for i, (a, ln, f) in enumerate([(hdr, 16, VRING_DESC_F_NEXT), (data, n, VRING_DESC_F_NEXT | flags),
                                        (status, 1, VRING_DESC_F_WRITE)]):
            struct.pack_into("<QIHH", g.buf, DESC + 16 * (3 * k + i), a, ln, f, 3 * k + i + 1)
        struct.pack_into("<H", g.buf, AVAIL + 4 + 2 * (g.avail % NUM), 3 * k)
        g.avail += 1
    struct.pack_into("<H", g.buf, AVAIL + 2, g.avail)


@pytest.mark.parametrize("failing", ["none", "vectored", "sector-4"])
def test_merged_reads_complete_as_separate_ones(tmp_path, failing):
    """Reads of consecutive sectors are merged into one vectored block-layer read; the guest
    sees exactly what serving each request on its own gives: data, statuses, used ring, counters
    — also when the merged read fails and the requests are retried one by one."""
    class Blk:
        def __init__(self, dev):
            self.dev, self.size, self.read_only, self.vectored = dev, dev.size, False, 0

        def preadinto(self, buf, off):
            if failing == "sector-4" and off <= 4 * 512 < off + len(buf):
                raise QcowError("bad sector")
            self.dev.preadinto(buf, off)

        def preadv(self, bufs, off):
            self.vectored += 1
            if failing != "none":
                raise OSError(5, "EIO")
            self.dev.preadv(bufs, off)

        def pwrite(self, data, off):
            self.dev.pwrite(data, off)

    p = str(tmp_path / "m.qcow2")
    qcowpy.create(p, SIZE, cluster_size=4096)
    orig = random.Random(4).randbytes(8192)
    outcomes = []
    with qcowpy.open(p, "r+") as d:
        for batched in (True, False):
            d.pwrite(orig, 0)  # each round starts from the same disk (the batch writes sector 2)
            blk = Blk(d)
            g = Guest(blk)
            seen = []
            for reqs in MIXED:
                _mixed_batch(g, reqs)
                if batched:
                    g.dev.process_queue(g.vq)
                else:
                    while (e := g.vq.pop()) is not None:
                        g.vq.push(e, g.dev.handle(e))
                seen.append(bytes(g.buf))
            outcomes.append((seen, g.vq.used_idx, g.dev.stats, d.pread(8192, 0)))
            assert (blk.vectored > 0) == batched
    assert outcomes[0] == outcomes[1]
    first, second = outcomes[0][0]
    bad = [{3}, {3} if failing == "sector-4" else set()]  # past the end; the read of sector 4
    for buf, b in zip((first, second), bad):
        assert [buf[HDR + 32 * k + 16] for k in range(5)] == [1 if k in b else 0 for k in range(5)]
    assert first[DATA:DATA + 1536] == orig[:1024] + orig[1024:1536] and first[DATA + 2048:DATA + 2560] == orig[4608:5120]
    assert second[DATA + 2048:DATA + 3072] == b"\xa1" * 512 + orig[1536:2048]  # the write is seen


def test_short_discard_segment_is_driver_error(disk):
    g = Guest(disk)
    with pytest.raises(VirtQueueError):
        g.req(vb.VIRTIO_BLK_T_DISCARD, 0, out=b"\0" * 8)


# -- randomized: any legal layout of a request, checked against a byte model -----------------------

def _split(rng, n: int, parts: int) -> list[int]:
    """``n`` bytes as ``parts`` positive pieces (fewer when n is small)."""
    cuts = sorted(rng.sample(range(1, n), min(parts, n) - 1)) if n > 1 else []
    return [b - a for a, b in zip([0] + cuts, cuts + [n])] if n else []


@settings(max_examples=60, deadline=None)
@given(st.randoms(use_true_random=False), st.booleans())
def test_random_layouts_against_a_byte_model(tmp_path_factory, rng, indirect):
    """Requests with headers split across descriptors, data in several pieces, the status byte in
    its own descriptor or at the end of the last data buffer, direct or through an indirect table:
    statuses, used.len, data read and the image afterwards follow the spec's byte semantics."""
    path = str(tmp_path_factory.mktemp("fuzz") / "f.qcow2")
    qcowpy.create(path, 64 * 1024, cluster_size=4096)
    model = bytearray(64 * 1024)
    cap = len(model) // 512
    with qcowpy.open(path, "r+") as dev:
        g = Guest(dev, serial="FUZZ")
        g.vq.indirect = indirect
        for _ in range(12):
            rtype = rng.choice([vb.VIRTIO_BLK_T_IN, vb.VIRTIO_BLK_T_OUT, vb.VIRTIO_BLK_T_FLUSH,
                                vb.VIRTIO_BLK_T_GET_ID, 0x77, vb.VIRTIO_BLK_T_OUT | vb.VIRTIO_BLK_T_BARRIER])
            sector = rng.choice([0, rng.randrange(cap), cap - 1, cap, 2**64 - 1])
            nbytes = rng.choice([0, 512, 1024, 4096, 513, 100]) if rtype not in (4, 8) else rng.choice([0, 20, 8])
            payload = rng.randbytes(nbytes) if rtype & 0xFF == vb.VIRTIO_BLK_T_OUT else b""
            in_data = 0 if payload else nbytes
            out_bytes = struct.pack("<IIQ", rtype, 0, sector) + payload
            out_pieces = _split(rng, 16, rng.randint(1, 2)) + _split(rng, len(payload), rng.randint(1, 3))
            own_status = in_data == 0 or rng.random() < 0.5
            in_pieces = _split(rng, in_data, rng.randint(1, 3))
            if own_status:
                in_pieces.append(1)
            else:
                in_pieces[-1] += 1
            bufs, pos, addr = [], 0, 0x20000
            for n in out_pieces:
                g.buf[addr:addr + n] = out_bytes[pos:pos + n]
                bufs.append((addr, n, False))
                pos, addr = pos + n, addr + 0x2000
            in_bufs = [(0x50000 + 0x2000 * i, n, True) for i, n in enumerate(in_pieces)]
            for a, n, _ in in_bufs:
                g.buf[a:a + n] = b"\xee" * n
            bufs += in_bufs
            if indirect:
                for i, (a, n, w) in enumerate(bufs):
                    flags = (VRING_DESC_F_WRITE if w else 0) | (VRING_DESC_F_NEXT if i + 1 < len(bufs) else 0)
                    struct.pack_into("<QIHH", g.buf, 0x70000 + 16 * i, a, n, flags, i + 1)
                struct.pack_into("<QIHH", g.buf, DESC, 0x70000, 16 * len(bufs), VRING_DESC_F_INDIRECT, 0)
                struct.pack_into("<H", g.buf, AVAIL + 4 + 2 * (g.avail % NUM), 0)
                g.avail += 1
                struct.pack_into("<H", g.buf, AVAIL + 2, g.avail)
                g.dev.process_queue(g.vq)
            else:
                g.submit(bufs)
            used_len = struct.unpack_from("<II", g.buf, USED + 4 + 8 * ((g.avail - 1) % NUM))[1]
            got_in = b"".join(bytes(g.buf[a:a + n]) for a, n, _ in in_bufs)
            status, data = got_in[-1], got_in[:-1]
            assert used_len == sum(in_pieces)
            kind = rtype & ~vb.VIRTIO_BLK_T_BARRIER
            in_range = sector <= cap and nbytes // 512 <= cap - sector
            if kind == vb.VIRTIO_BLK_T_IN:
                ok = nbytes % 512 == 0 and in_range
                assert status == (0 if ok else 1)
                if ok:
                    assert data == bytes(model[sector * 512:sector * 512 + nbytes])
            elif kind == vb.VIRTIO_BLK_T_OUT:
                ok = nbytes % 512 == 0 and in_range
                assert status == (0 if ok else 1)
                if ok:
                    model[sector * 512:sector * 512 + nbytes] = payload
            elif kind == vb.VIRTIO_BLK_T_FLUSH:
                assert status == 0
            elif kind == vb.VIRTIO_BLK_T_GET_ID:
                assert status == 0 and data == (b"FUZZ\0" + b"\xee" * 20)[:in_data]
            else:
                assert status == vb.VIRTIO_BLK_S_UNSUPP
        assert dev.pread(len(model), 0) == bytes(model)
