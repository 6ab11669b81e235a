"""Mounting images: the Python API, monitor guest-disk commands, QMP query-block, a disk-to-disk copy."""
from __future__ import annotations

import json

import qcowpy
from qcowpy.emu.guest import virtio_blk as vb
from qcowpy.emu.guest import workloads as wl
from qcowpy.emu.guest.system import boot
from qcowpy.emu.machine import create_machine
from qcowpy.emu.monitor import HumanMonitor
from qcowpy.emu.qmp import QMPSession

MiB = 1 << 20


def test_python_api_copy_between_disks(qemu, tmp_path):
    src, dst = str(tmp_path / "src.qcow2"), str(tmp_path / "dst.qcow2")
    qemu.create(src, "4M")
    qemu.io(src, "write -P 0x21 0 1M", "write -P 0x22 3M 512k")
    qemu.create(dst, "4M")
    m = create_machine("mini-pc", "64M")
    m.drive_add(src, format="qcow2", readonly=True, id="src")
    m.drive_add(dst, format="qcow2", id="dst")
    _, disks, log = boot(m)
    assert len(disks) == 2 and sum(" 512-byte sectors " in line for line in log) == 2
    assert log[-1] == "virtio-blk: 2 disk(s)"  # the same log as the monitor's guest boot
    ok, lines = wl.pattern_test(disks[1], 0, 64 * 1024, seed=3)
    assert ok, lines
    assert wl.copy_disk(disks[0], disks[1]) == 4 * MiB
    m.shutdown()
    qemu.assert_clean(dst)
    p = qemu.compare(src, dst)
    assert p.returncode == 0 and "Images are identical" in p.stdout


def test_monitor_guest_disk_commands(tmp_path):
    path = str(tmp_path / "d.qcow2")
    qcowpy.create(path, 4 * MiB)
    m = create_machine("mini-pc", "64M")
    m.drive_add(path)
    mon = HumanMonitor(m)
    assert "virtio-blk: 00:01.0 8192 512-byte sectors" in mon.execute("guest boot")
    assert mon.execute("guest disks").startswith("disk 0: virtio-blk: 00:01.0")
    assert "-> OK" in mon.execute("guest disk-test 0 0x8000 0x10000 5")
    assert mon.execute("guest disk-verify 0 0x8000 0x10000 5") == "verify 0x8000+0x10000: OK\n"
    assert "MISMATCH" in mon.execute("guest disk-verify 0 0x8000 0x10000 6")
    assert mon.execute("guest disk-write 0 0 512 9") == "wrote 512 bytes at 0x0\n"
    dump = mon.execute("guest disk-read 0 8 16")
    assert dump.startswith("00000008: ") and len(dump.splitlines()) == 1
    assert "IOERR" in mon.execute("guest disk-read 0 0x400000 512")
    assert "no guest disk 3" in mon.execute("guest disk-read 3 0 512")
    m.shutdown()
    with qcowpy.open(path) as d:
        assert d.pread(0x10000, 0x8000) == wl.pattern(0x8000, 0x10000, 5)


def test_qmp_query_block(tmp_path):
    base, top = str(tmp_path / "base.qcow2"), str(tmp_path / "top.qcow2")
    qcowpy.create(base, 2 * MiB)
    qcowpy.create(top, backing_file=base, backing_fmt="qcow2")
    m = create_machine("mini-pc", "64M")
    m.drive_add(top, id="d0", readonly=True)
    out = []
    s = QMPSession(m, out.append)
    s.handle(json.dumps({"execute": "qmp_capabilities"}))
    r = s.handle(json.dumps({"execute": "query-block"}))
    (entry,) = r["return"]
    assert entry["device"] == "d0" and entry["qdev"].startswith("/machine/peripheral-anon/")
    ins = entry["inserted"]
    assert ins["file"] == top and ins["drv"] == "qcow2" and ins["ro"] is True
    assert ins["backing_file_depth"] == 1 and ins["backing_file"] == base
    assert ins["image"]["virtual-size"] == 2 * MiB
    m.shutdown()


def _qmp(machine):
    """A QMP session on ``machine`` past capabilities negotiation: run(command, **arguments)."""
    s = QMPSession(machine, lambda ev: None)
    s.handle(json.dumps({"execute": "qmp_capabilities"}))
    return lambda cmd, **args: s.handle(json.dumps({"execute": cmd, "arguments": args}))


def test_qmp_blockdev_add_device_add_del(tmp_path):
    path = str(tmp_path / "hot.qcow2")
    qcowpy.create(path, MiB)
    m = create_machine("mini-pc", "64M")
    run = _qmp(m)
    assert run("blockdev-add", driver="qcow2", **{"node-name": "hot0"},
               file={"driver": "file", "filename": path}) == {"return": {}}
    assert "error" in run("blockdev-add", driver="vmdk", **{"node-name": "x"}, file=path)
    assert run("device_add", driver="virtio-blk-pci", drive="hot0", id="vb0") == {"return": {}}
    assert run("query-block")["return"][0]["qdev"] == "vb0"
    assert "in use" in run("blockdev-del", **{"node-name": "hot0"})["error"]["desc"]
    _, disks, _ = boot(m)
    disks[0].write(0, b"\x77" * 512)
    assert run("device_del", id="vb0") == {"return": {}}
    assert run("blockdev-del", **{"node-name": "hot0"}) == {"return": {}}
    assert run("query-block")["return"] == []
    with qcowpy.open(path) as d:
        assert d.pread(512, 0) == b"\x77" * 512


def test_hotplug_then_guest_rescan(tmp_path):
    """QMP plugs a disk into a running guest; 'guest rescan' brings it up next to the first one
    (which keeps working), and after device_del a rescan drops it."""
    first, hot = str(tmp_path / "first.qcow2"), str(tmp_path / "hot.qcow2")
    qcowpy.create(first, MiB)
    qcowpy.create(hot, 2 * MiB)
    m = create_machine("mini-pc", "64M")
    m.drive_add(first, id="d0")
    mon = HumanMonitor(m)
    run = _qmp(m)
    mon.execute("guest boot")
    assert "-> OK" in mon.execute("guest disk-test 0 0 65536 4")
    assert run("blockdev-add", driver="qcow2", **{"node-name": "hot0"}, file=hot) == {"return": {}}
    assert run("device_add", driver="virtio-blk-pci", drive="hot0", id="vb1") == {"return": {}}
    assert "disk 1" not in mon.execute("guest disks")          # not announced: the guest must look
    out = mon.execute("guest rescan")
    assert "[1af4:1042]" in out and "4096 512-byte sectors (2.00 MiB)" in out
    disks = mon.execute("guest disks")
    assert "disk 0:" in disks and "disk 1:" in disks
    assert "-> OK" in mon.execute("guest disk-test 1 0 131072 5")
    assert mon.execute("guest disk-verify 0 0 65536 4") == "verify 0x0+0x10000: OK\n"  # first disk kept its BARs
    assert mon.execute("guest rescan") == "PCI: no changes on bus 0\n"
    assert run("device_del", id="vb1") == {"return": {}}
    out = mon.execute("guest rescan")
    assert "removed" in out and "disk 1" not in mon.execute("guest disks")
    assert run("blockdev-del", **{"node-name": "hot0"}) == {"return": {}}
    m.shutdown()
    with qcowpy.open(hot) as d:
        assert wl.crc32c(d.pread(131072, 0)) == wl.crc32c(wl.pattern(0, 131072, 5))


def test_throughput_workload(tmp_path):
    path = str(tmp_path / "t.qcow2")
    qcowpy.create(path, 2 * MiB)
    m = create_machine("mini-pc", "64M")
    m.drive_add(path)
    mon = HumanMonitor(m)
    mon.execute("guest boot")
    assert "MiB/s" in mon.execute("guest disk-bench 0 seq 65536 1048576")
    assert "rand read 262144 bytes in 4096-byte requests" in mon.execute("guest disk-bench 0 rand 4096 262144")
    m.shutdown()


def test_sigterm_while_shutting_down_keeps_the_image(qemu, tmp_path):
    """A test harness closes the qtest socket and sends SIGTERM at once (as EmulatorProcess.close
    does); signals that land while the drives are being flushed must not kill the process before
    the image is consistent."""
    import os
    import signal
    import time

    from qcowpy.emu.guest.firmware import pci_boot
    from qcowpy.emu.guest.pci import GuestPCIBus
    from qcowpy.emu.guest.qtest import launch_emu
    from qcowpy.emu.guest.virtio import GuestAlloc

    path, expect = str(tmp_path / "d.qcow2"), bytearray(4 * MiB)
    qemu.create(path, "4M")
    with launch_emu(["-m", "64M", "-drive", f"file={path},format=qcow2,if=none,id=d0",
                     "-device", "virtio-blk-pci,drive=d0,addr=04.0"]) as p:
        pci_boot(p.qtest, 64 * MiB)
        dev = next(d for d in GuestPCIBus(p.qtest).scan() if vb.is_virtio_blk(d))
        disk = vb.GuestDisk(p.qtest, dev, GuestAlloc(0x10_0000, 0x200_0000))
        blocks = [(1, 8 * 9 * k, bytes([k + 1]) * 4096, 0) for k in range(100)]
        assert [st for st, _, _ in disk.run(blocks)] == [0] * 100
        for _, sector, data, _ in blocks:
            expect[sector * 512:sector * 512 + 4096] = data
        p.qtest.close()
        deadline = time.monotonic() + 20
        while p.proc.poll() is None and time.monotonic() < deadline:
            os.kill(p.proc.pid, signal.SIGTERM)
            time.sleep(0.0005)
        assert p.proc.wait(timeout=10) == 0
    qemu.assert_clean(path)
    assert qemu.to_raw(path, str(tmp_path / "d.raw")) == bytes(expect)
