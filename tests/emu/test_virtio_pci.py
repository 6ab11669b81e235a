"""virtio-blk-pci end to end: guest driver over qtest, modern PCI transport, qcow2 images checked by qemu-img."""
from __future__ import annotations

import io
import os
import random
import struct

import pytest

import qcowpy
from qcowpy.emu import cli
from qcowpy.emu.guest.firmware import pci_boot
from qcowpy.emu.guest.pci import GuestPCIBus
from qcowpy.emu.guest.qtest import InProcessQTest
from qcowpy.emu.guest.virtio import (STATUS_ACKNOWLEDGE, STATUS_DRIVER, STATUS_DRIVER_OK, STATUS_FEATURES_OK,
                                     STATUS_NEEDS_RESET, GuestAlloc, VirtioPCIGuest)
from qcowpy.emu.guest import workloads as wl
from qcowpy.emu.guest.virtio_blk import GuestDisk, GuestIOError, find_disks
from qcowpy.emu.machine import create_machine
from qcowpy.emu.monitor import HumanMonitor
from qcowpy.emu.pci import regs

MiB = 1 << 20


@pytest.fixture
def env(tmp_path):
    """A mini-pc with one fresh 8 MiB qcow2 drive, booted; yields (machine, qts, path)."""
    path = str(tmp_path / "disk.qcow2")
    qcowpy.create(path, 8 * MiB, cluster_size=65536)
    m = create_machine("mini-pc", "64M")
    m.drive_add(path, id="d0", serial="SER-1")
    qts = InProcessQTest(m)
    pci_boot(qts, m.ram_size)
    yield m, qts, path
    qts.close()
    m.shutdown()


def _virtio_fn(qts):
    return next(d for d in GuestPCIBus(qts).scan() if d.vendor_id == 0x1AF4)


def test_pci_identity_and_capabilities(env):
    _, qts, _ = env
    dev = _virtio_fn(qts)
    assert (dev.device_id, dev.revision, dev.class_code) == (0x1042, 1, 0x0100)
    caps = dev.capabilities()
    assert caps == [(0x98, regs.CAP_ID_MSIX), (0x84, regs.CAP_ID_VNDR), (0x70, regs.CAP_ID_VNDR),
                    (0x60, regs.CAP_ID_VNDR), (0x50, regs.CAP_ID_VNDR), (0x40, regs.CAP_ID_VNDR)]
    types = {dev.readb(off + 3): (dev.readb(off + 2), dev.readb(off + 4), dev.readl(off + 8), dev.readl(off + 12))
             for off, cid in caps if cid == regs.CAP_ID_VNDR}
    assert types == {1: (16, 4, 0x0000, 0x1000), 3: (16, 4, 0x1000, 0x1000),
                     4: (16, 4, 0x2000, 0x1000), 2: (20, 4, 0x3000, 0x1000), 5: (20, 0, 0, 0)}
    notify = next(off for off, _ in caps if dev.readb(off + 3) == 2)
    assert dev.readl(notify + 16) == 4
    bar = next(b for b in dev.size_bars() if b.index == 4)
    assert bar.is_64 and bar.prefetch and bar.size == 0x4000


def test_guest_disk_basics(env):
    m, qts, _ = env
    (disk,) = find_disks(qts)
    assert disk.capacity == 8 * MiB and disk.blk_size == 512 and not disk.read_only
    assert disk.serial() == "SER-1"
    assert disk.last_used_len == 21
    data = os.urandom(128 * 1024)
    disk.write(3 * MiB, data)
    assert disk.read(3 * MiB, len(data)) == data
    assert disk.last_used_len == len(data) + 1
    assert m.drives["d0"].blk.pread(512, 3 * MiB + 65536) == data[65536:65536 + 512]
    disk.flush()
    disk.write_zeroes(3 * MiB, 65536, unmap=True)
    assert disk.read(3 * MiB, 65536) == bytes(65536)
    disk.discard(3 * MiB + 65536, 65536)
    with pytest.raises(GuestIOError) as ei:
        disk.read(8 * MiB, 512)
    assert ei.value.status == 1
    assert disk.read(3 * MiB + 65536, 65536) == bytes(65536)


def test_indirect_descriptors_through_pci(env):
    _, qts, _ = env
    disk = GuestDisk(qts, _virtio_fn(qts), GuestAlloc(), use_indirect=True)
    assert disk.use_indirect
    disk.write(0, b"\xAB" * 4096)
    assert disk.read(0, 4096) == b"\xAB" * 4096


@pytest.mark.parametrize("indirect", [False, True])
def test_pipelined_requests_share_notifications(env, monkeypatch, indirect):
    """Up to ``depth`` requests go out together: one driver-ring update and one notification per
    batch; results come back in request order whatever the shapes (reads, writes, flush, errors)."""
    from qcowpy.virtio.blk import VirtioBlk
    m, qts, _ = env
    disk = GuestDisk(qts, _virtio_fn(qts), GuestAlloc(), use_indirect=indirect)
    assert disk.depth == (64 if indirect else 42)  # 256-entry queue: half of it for in-flight requests
    calls = []
    real = VirtioBlk.process_queue
    monkeypatch.setattr(VirtioBlk, "process_queue", lambda self, vq: calls.append(1) or real(self, vq))
    rng = random.Random(9)
    blocks = {k: rng.randbytes(4096) for k in range(100)}
    reqs = [(1, k * 8, data, 0) for k, data in blocks.items()]
    assert [st for st, _, _ in disk.run(reqs)] == [0] * 100
    assert len(calls) == -(-100 // disk.depth)
    calls.clear()
    reqs = ([(0, k * 8, b"", 4096) for k in range(100)] + [(4, 0, b"", 0), (0, 16 * 1024, b"", 512)]
            + [(0, k * 8, b"", 1024) for k in range(50, 60)])
    res = disk.run(reqs, depth=16)
    assert len(calls) == -(-len(reqs) // 16)
    assert [d for _, _, d in res[:100]] == list(blocks.values())
    assert res[100] == (0, 1, b"")                        # flush: only the status byte
    assert res[101][0] == 1 and res[101][1] == 513         # past the end: IOERR, used.len still counted
    assert [d for _, _, d in res[102:]] == [blocks[k][:1024] for k in range(50, 60)]
    assert m.drives["d0"].blk.pread(4096, 99 * 4096) == blocks[99]


@pytest.mark.parametrize("msix", [False, True])
def test_interrupt_driven_completion(env, msix):
    """completion="interrupt": one interrupt per batch is waited for and acknowledged, so the line
    is low and the ISR clear when the run returns."""
    m, qts, _ = env
    dev = _virtio_fn(qts)
    disk = GuestDisk(qts, dev, GuestAlloc(), use_msix=msix, completion="interrupt")
    data = [os.urandom(4096) for _ in range(50)]
    assert [st for st, _, _ in disk.run([(1, 8 * k, d, 0) for k, d in enumerate(data)], depth=8)] == [0] * 50
    assert disk.interrupts == 7                                   # ceil(50 / 8) batches
    res = disk.run([(0, 8 * k, b"", 4096) for k in range(50)], depth=25)
    assert [d for _, _, d in res] == data and disk.interrupts == 9
    assert not m.irq_levels[dev.readb(regs.INTERRUPT_LINE)]
    if not msix:
        assert disk.vdev.read_isr() == 0                          # acknowledged by the driver
    with pytest.raises(ValueError):
        GuestDisk(qts, dev, GuestAlloc(), completion="sometimes")


def test_read_blocks_and_throughput_workload(env):
    m, qts, _ = env
    (disk,) = find_disks(qts)
    data = os.urandom(MiB)
    disk.write(0, data)
    offs = [k * 65536 for k in (3, 0, 15, 7)]
    disk.read_blocks(offs, 65536, depth=4)
    # the data stays in the guest's slot buffers, one per request in flight
    for slot, off in zip(disk.slots, offs):
        assert qts.memread(slot.buf, 65536) == data[off:off + 65536]
    with pytest.raises(GuestIOError):
        disk.read_blocks([8 * MiB - 512], 1024)
    rate, lines = wl.throughput(disk, "rand", 4096, 64 * 4096, depth=8)
    assert rate > 0 and "queue depth 8" in lines[0]
    with pytest.raises(ValueError):
        wl.throughput(disk, "zigzag")


class UnmappedQTest(InProcessQTest):
    """In-process, but without shared RAM: every driver access is a qtest memory access, as over
    a socket."""

    def map_ram(self, addr, length):
        return None


@pytest.mark.parametrize("event_idx", [True, False])
def test_driver_ram_in_place_or_through_qtest_is_the_same_to_the_device(tmp_path, event_idx):
    """The driver's rings and request headers used in place (in-process) leave guest RAM and the
    device in exactly the state qtest accesses leave them in."""
    from qcowpy.emu.guest.virtio_blk import DRIVER_FEATURES, F_EVENT_IDX
    rng = random.Random(3)
    blocks = [rng.randbytes(4096) for _ in range(40)]
    feats = DRIVER_FEATURES if event_idx else DRIVER_FEATURES & ~(1 << F_EVENT_IDX)
    images = []
    for kind in (InProcessQTest, UnmappedQTest):
        path = str(tmp_path / f"{kind.__name__}.qcow2")
        qcowpy.create(path, MiB)
        m = create_machine("mini-pc", "64M")
        m.drive_add(path, id="d0")
        qts = kind(m)
        pci_boot(qts, m.ram_size)
        alloc = GuestAlloc()
        disk = GuestDisk(qts, _virtio_fn(qts), alloc, features=feats)
        assert (disk.areas.sync() is None) == (kind is UnmappedQTest)
        for n in range(0, 40, 7):  # wraps the 256-entry rings more than once over the runs
            disk.run([(1, 8 * k, blocks[k], 0) for k in range(n, min(n + 7, 40))] * 5)
        got = disk.run([(0, 8 * k, b"", 4096) for k in range(40)] * 8, depth=13)
        assert [d for _, _, d in got] == blocks * 8
        images.append((qts.memread(alloc.start, alloc.next - alloc.start), disk.vq.avail_idx, disk.vq.last_used))
        m.shutdown()
    assert images[0] == images[1] and images[0][1] == 5 * 40 + 8 * 40


def test_tiny_queue_still_works(tmp_path):
    """A 4-entry queue leaves room for one 3-descriptor request at a time; 2 entries only fit
    requests without data (and indirect tables)."""
    path = str(tmp_path / "q.qcow2")
    qcowpy.create(path, MiB)
    m = create_machine("mini-pc", "64M")
    m.drive_add(path, id="d0")
    qts = InProcessQTest(m)
    pci_boot(qts, m.ram_size)
    disk = GuestDisk(qts, _virtio_fn(qts), GuestAlloc(), queue_size=4)
    assert disk.depth == 1
    disk.write(0, b"\x5a" * 8192)
    assert disk.read(0, 8192) == b"\x5a" * 8192
    small = GuestDisk(qts, _virtio_fn(qts), GuestAlloc(0x200_0000, 0x300_0000), queue_size=2)
    small.flush()
    with pytest.raises(Exception, match="does not fit a queue of 2"):
        small.read(0, 512)
    m.shutdown()


def test_feature_negotiation(env):
    _, qts, _ = env
    v = VirtioPCIGuest(qts, _virtio_fn(qts), GuestAlloc())
    v.reset()
    v.add_status(STATUS_ACKNOWLEDGE | STATUS_DRIVER)
    offered = v.device_features()
    assert offered >> 32 & 1 and offered >> 28 & 1 and offered >> 29 & 1
    v.write_driver_features(offered & ~(1 << 32))        # no VERSION_1: refused
    v.add_status(STATUS_FEATURES_OK)
    assert not v.status & STATUS_FEATURES_OK
    v.reset()
    v.add_status(STATUS_ACKNOWLEDGE | STATUS_DRIVER)
    v.write_driver_features((1 << 32) | (1 << 40))        # a bit the device does not offer
    v.add_status(STATUS_FEATURES_OK)
    assert not v.status & STATUS_FEATURES_OK
    assert v.init(1 << 9) == (1 << 32) | (1 << 9)
    assert v.status & STATUS_FEATURES_OK
    v.write_driver_features(offered)                      # features are frozen after FEATURES_OK
    v.cwrite(8, 0, 4)
    assert v.cread(12, 4) == 1 << 9


def test_reset_clears_queues(env):
    _, qts, _ = env
    disk = find_disks(qts)[0]
    v = disk.vdev
    v.cwrite(22, 0, 2)
    assert v.cread(28, 2) == 1 and v.cread(32, 4) == disk.vq.desc
    v.reset()
    v.cwrite(22, 0, 2)
    assert v.cread(28, 2) == 0 and v.cread(32, 4) == 0 and v.cread(24, 2) == 256
    assert v.status == 0


def test_intx_and_isr(env):
    m, qts, _ = env
    disk = find_disks(qts)[0]
    dev = _virtio_fn(qts)
    irq = dev.readb(regs.INTERRUPT_LINE)
    disk.read(0, 512)
    assert m.irq_levels[irq]
    assert disk.vdev.read_isr() == 1
    assert not m.irq_levels[irq]
    assert disk.vdev.read_isr() == 0


def _hostile(disk, desc_bytes: bytes):
    """Put raw descriptor 0 into the ring and publish it."""
    vq = disk.vq
    disk.qts.memwrite(vq.desc, desc_bytes)
    disk.qts.writew(vq.avail + 4 + 2 * (vq.avail_idx % vq.size), 0)
    vq.avail_idx += 1
    disk.qts.writew(vq.avail + 2, vq.avail_idx)
    disk.qts.writew(vq.notify_addr, 0)


@pytest.mark.parametrize("case", ["loop", "outside-ram", "mmio-buffer", "head-too-big"])
def test_hostile_guest_needs_reset_and_recovers(env, case):
    m, qts, path = env
    disk = find_disks(qts)[0]
    disk.write(0, b"\x11" * 4096)
    hdr = disk.hdr
    qts.memwrite(hdr, struct.pack("<IIQ", 1, 0, 0))
    if case == "loop":
        raw = struct.pack("<QIHH", hdr, 16, 1, 1) + struct.pack("<QIHH", disk.buf, 512, 1, 0)
    elif case == "outside-ram":
        raw = struct.pack("<QIHH", hdr, 16, 1, 1) + struct.pack("<QIHH", 0x7000_0000, 512, 1, 2) \
            + struct.pack("<QIHH", disk.status_addr, 1, 2, 0)
    elif case == "mmio-buffer":
        raw = struct.pack("<QIHH", hdr, 16, 1, 1) + struct.pack("<QIHH", 0xC000_0000, 512, 1, 2) \
            + struct.pack("<QIHH", disk.status_addr, 1, 2, 0)
    else:
        raw = b""
    if case == "head-too-big":
        qts.writew(disk.vq.avail + 4 + 2 * (disk.vq.avail_idx % disk.vq.size), 999)
        disk.vq.avail_idx += 1
        qts.writew(disk.vq.avail + 2, disk.vq.avail_idx)
        qts.writew(disk.vq.notify_addr, 0)
    else:
        _hostile(disk, raw)
    assert disk.vdev.status & STATUS_NEEDS_RESET
    assert disk.vdev.read_isr() & 2                         # configuration-change interrupt
    assert m.drives["d0"].blk.pread(4096, 0) == b"\x11" * 4096
    disk2 = GuestDisk(qts, _virtio_fn(qts), GuestAlloc(0x200_0000, 0x300_0000))
    assert not disk2.vdev.status & STATUS_NEEDS_RESET
    assert disk2.read(0, 4096) == b"\x11" * 4096


def test_bus_master_off_stops_the_device_until_driver_ok_again(env):
    """QEMU's virtio_write_config: clearing bus mastering drops DRIVER_OK and parks the queue; no
    DMA, no interrupt, no error. Once mastering and DRIVER_OK are back, the request completes."""
    m, qts, _ = env
    disk = find_disks(qts)[0]
    dev = _virtio_fn(qts)
    cmd = dev.readw(regs.COMMAND)
    dev.writew(regs.COMMAND, cmd & ~regs.COMMAND_MASTER)
    assert disk.vdev.status == STATUS_ACKNOWLEDGE | STATUS_DRIVER | STATUS_FEATURES_OK
    qts.memwrite(disk.hdr, struct.pack("<IIQ", 0, 0, 0))
    qts.writeb(disk.status_addr, 0xFF)
    head = disk.vq.add([(disk.hdr, 16, False), (disk.buf, 512, True), (disk.status_addr, 1, True)])
    disk.vq.kick()
    assert disk.vq.get_used() == [] and qts.readb(disk.status_addr) == 0xFF
    assert disk.vdev.read_isr() == 0 and not any(m.irq_levels)
    dev.writew(regs.COMMAND, cmd)
    assert not disk.vdev.status & STATUS_DRIVER_OK     # the driver has to say DRIVER_OK again
    disk.vq.kick()
    assert disk.vq.get_used() == []
    disk.vdev.driver_ok()
    disk.vq.kicked_at -= 1                             # kick again, whatever avail_event says
    disk.vq.kick()
    assert disk.vq.get_used() == [(head, 513)] and qts.readb(disk.status_addr) == 0
    assert disk.vdev.read_isr() == 1


def test_read_only_drive(tmp_path):
    path = str(tmp_path / "ro.raw")
    with open(path, "wb") as f:
        f.write(b"\x42" * MiB)
    m = create_machine("mini-pc", "64M")
    m.drive_add(path, format="raw", readonly=True)
    qts = InProcessQTest(m)
    pci_boot(qts, m.ram_size)
    disk = find_disks(qts)[0]
    assert disk.read_only
    with pytest.raises(GuestIOError):
        disk.write(0, bytes(512))
    assert disk.read(0, 512) == b"\x42" * 512
    m.shutdown()
    assert open(path, "rb").read() == b"\x42" * MiB


def test_system_reset_resets_device(env):
    m, qts, _ = env
    disk = find_disks(qts)[0]
    assert disk.vdev.status & 4
    m.system_reset()
    pci_boot(qts, m.ram_size)
    disk = find_disks(qts)[0]
    assert disk.read(0, 512) == bytes(512)


# -- qemu-img as the oracle ------------------------------------------------------------------------

def test_e2e_overlay_check_and_compare(qemu, tmp_path):
    base = str(tmp_path / "base.qcow2")
    overlay = str(tmp_path / "overlay.qcow2")
    qemu.create(base, "4M", cluster_size=65536)
    qemu.io(base, "write -P 0x5a 0 4M")
    qemu.create(overlay, None, backing=base, backing_fmt="qcow2", cluster_size=65536)
    expected = bytearray(b"\x5a" * (4 * MiB))
    m = create_machine("mini-pc", "64M")
    m.drive_add(overlay, format="qcow2", id="ov")
    qts = InProcessQTest(m)
    pci_boot(qts, m.ram_size)
    disk = find_disks(qts)[0]
    rng = random.Random(5)
    for _ in range(12):
        off = rng.randrange(0, 4 * MiB // 512 - 64) * 512
        data = bytes([rng.randrange(256)]) * (rng.randrange(1, 64) * 512)
        disk.write(off, data)
        expected[off:off + len(data)] = data
    disk.write_zeroes(MiB, 65536 * 2, unmap=True)
    expected[MiB:MiB + 2 * 65536] = bytes(2 * 65536)
    disk.write_zeroes(2 * MiB + 512, 4096)
    expected[2 * MiB + 512:2 * MiB + 512 + 4096] = bytes(4096)
    disk.flush()
    assert disk.read(0, 4 * MiB) == bytes(expected)
    m.shutdown()
    qemu.assert_clean(overlay)
    raw = tmp_path / "expected.raw"
    raw.write_bytes(bytes(expected))
    p = qemu.compare(overlay, raw, fmt_a="qcow2", fmt_b="raw")
    assert p.returncode == 0, p.stdout + p.stderr
    assert "Images are identical" in p.stdout


@pytest.mark.parametrize("kind", ["compressed", "zero-clusters", "backing-chain"])
def test_reads_equal_qemu_img_convert(qemu, tmp_path, kind):
    img = str(tmp_path / "img.qcow2")
    if kind == "compressed":
        src = str(tmp_path / "src.qcow2")
        qemu.create(src, "2M")
        qemu.io(src, "write -P 0x33 0 512k", "write -P 0x44 1M 100k")
        qemu.img("convert", "-c", "-O", "qcow2", src, img)
    elif kind == "zero-clusters":
        qemu.create(img, "2M")
        qemu.io(img, "write -P 0x66 0 2M", "write -z 64k 128k", "write -z -u 1M 256k")
    else:
        base = str(tmp_path / "base.qcow2")
        mid = str(tmp_path / "mid.qcow2")
        qemu.create(base, "2M")
        qemu.io(base, "write -P 0x01 0 2M")
        qemu.create(mid, None, backing=base, backing_fmt="qcow2")
        qemu.io(mid, "write -P 0x02 512k 512k")
        qemu.create(img, None, backing=mid, backing_fmt="qcow2")
        qemu.io(img, "write -P 0x03 768k 4k", "write -z 1536k 64k")
    want = qemu.to_raw(img, tmp_path / "want.raw")
    m = create_machine("mini-pc", "64M")
    m.drive_add(img, format="qcow2", readonly=True)
    qts = InProcessQTest(m)
    pci_boot(qts, m.ram_size)
    disk = find_disks(qts)[0]
    assert disk.capacity == len(want)
    assert disk.read(0, len(want)) == want
    m.shutdown()


# -- command line and monitor ----------------------------------------------------------------------

def test_cli_drive_boot_log_and_info_block(tmp_path):
    a = str(tmp_path / "a.qcow2")
    b = str(tmp_path / "b.raw")
    qcowpy.create(a, 8 * MiB)
    qcowpy.create(b, 2 * MiB, format="raw")
    out = io.StringIO()
    rc = cli.main(["-drive", f"file={a},format=qcow2,id=disk0,serial=ABC",
                   "-drive", f"file={b},format=raw,if=none,id=d1,readonly=on",
                   "-device", "virtio-blk-pci,drive=d1,id=vblk1", "-monitor", "stdio"],
                  stdin=io.StringIO("info block\nquit\n"), stdout=out, stderr=io.StringIO())
    text = out.getvalue()
    assert rc == 0
    assert "virtio-blk: 00:01.0 16384 512-byte sectors (8.00 MiB) features" in text
    assert "virtio-blk: 00:02.0 4096 512-byte sectors (2.00 MiB) (read-only)" in text
    assert f"disk0 (#block-disk0): {a} (qcow2)" in text
    assert f"d1 (#block-d1): {b} (raw, read-only)" in text
    assert "Attached to:      vblk1" in text


def test_cli_drive_errors(tmp_path):
    err = io.StringIO()
    assert cli.main(["-drive", f"file={tmp_path}/missing.qcow2"], stdout=io.StringIO(), stderr=err) == 1
    assert "missing.qcow2" in err.getvalue()
    a = str(tmp_path / "a.qcow2")
    qcowpy.create(a, MiB)
    err = io.StringIO()
    assert cli.main(["-drive", f"file={a},if=ide"], stdout=io.StringIO(), stderr=err) == 1
    assert "not supported" in err.getvalue()
    err = io.StringIO()
    assert cli.main(["-drive", f"file={a},if=none,id=x", "-device", "virtio-blk-pci,drive=nope"],
                    stdout=io.StringIO(), stderr=err) == 1
    assert "nope" in err.getvalue()


def test_monitor_info_block_and_drive_in_use(env):
    m, _, path = env
    assert f"d0 (#block-d0): {path} (qcow2)" in HumanMonitor(m).execute("info block")
    assert "in use" in HumanMonitor(m).execute("device_add virtio-blk-pci,drive=d0")


def test_pci_cfg_window_runs_the_whole_driver(env):
    """VIRTIO_PCI_CAP_PCI_CFG: a driver that never maps BAR4 (SeaBIOS's fallback) still works;
    the window's own rules: sizes 1/2/4 only, offsets aligned down, nothing outside the regions."""
    m, qts, _ = env
    dev = _virtio_fn(qts)
    disk = GuestDisk(qts, dev, GuestAlloc(), via_pci_cfg=True)
    mmio = []

    def spy(name):                                               # BAR accesses would show up here
        real = getattr(qts, name)
        setattr(qts, name, lambda a, *v: mmio.append(a) or real(a, *v))
    for name in ("readb", "readw", "readl", "writeb", "writew", "writel"):
        spy(name)
    ok, lines = wl.pattern_test(disk, 8192, 64 * 1024, seed=5)
    assert ok, lines
    assert disk.serial() == "SER-1" and disk.capacity_sectors == 8 * MiB // 512
    assert [a for a in mmio if a >= 0xC000_0000] == []
    w = disk.vdev.cfg_window
    assert w == 0x84 and dev.readb(w + 2) == 20

    def window(offset, length, bar=4):
        dev.writeb(w + 4, bar)
        dev.writel(w + 8, offset)
        dev.writel(w + 12, length)
        return dev.readl(w + 16)
    assert window(0x2000, 4) == 8 * MiB // 512               # capacity, low dword
    assert window(0x2002, 4) == 8 * MiB // 512               # aligned down to 0x2000
    assert window(18, 2) & 0xFFFF == 1                         # num_queues
    dev.writel(w + 16, 0xDEADBEEF)
    assert window(0x2000, 3) == 0xDEADBEEF                     # no access: the dword is untouched
    assert window(0x4000, 4) == 0xDEADBEEF                     # past the regions: no access
    assert window(0x2000, 4, bar=2) == 8 * MiB // 512          # the bar field is not consulted
    assert dev.readb(w + 4) == 2
    disk.read(0, 512)
    assert window(0x1ABC, 1) & 0xFF == 1 and window(0x1000, 1) & 0xFF == 0   # any ISR byte reads and clears
