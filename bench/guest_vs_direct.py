#!/usr/bin/env python3
"""Guest reads through the emulated virtio-blk device versus direct ``qcowpy.open(...).pread``.

Builds a fully written qcow2 image with qemu-img (default 256 MiB), then measures, alternating and
taking medians of N repeats:

  direct   qcowpy.open(image).pread(bs, offset) in a loop
  guest    the same offsets read by the guest virtio-blk driver through the emulated device
           (split virtqueue, PCI transport, blk request engine, block layer) into guest RAM,
           with 1 request in flight and with the driver's default queue depth (like fio's
           iodepth; the data lands in guest buffers, as a guest's reads do)

for 64 KiB sequential and 4 KiB random reads, and prints throughput and the guest/direct ratio.
Issue target: the device path delivers at least half the direct throughput at 64 KiB.

Quick run:  python bench/guest_vs_direct.py --size 64M --repeats 3
"""
from __future__ import annotations

import argparse
import os
import random
import statistics
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

import qcowpy  # noqa: E402
from qcowpy.emu.guest import virtio_blk as vb  # noqa: E402
from qcowpy.emu.guest import workloads as wl  # noqa: E402
from qcowpy.emu.guest.system import boot  # noqa: E402
from qcowpy.emu.machine import create_machine  # noqa: E402
from qcowpy.units import parse_size  # noqa: E402


def build_image(path: str, size: int) -> None:
    raw = path + ".raw"
    rnd = random.Random(1)
    with open(raw, "wb") as f:
        for _ in range(size // (1 << 20)):
            f.write(rnd.randbytes(1 << 20))
    subprocess.run(["qemu-img", "convert", "-O", "qcow2", raw, path], check=True)
    os.unlink(raw)


def time_direct(path: str, offs: list[int], bs: int) -> float:
    with qcowpy.open(path) as dev:
        t0 = time.perf_counter()
        for off in offs:
            dev.pread(bs, off)
        return time.perf_counter() - t0


def time_guest(disk: vb.GuestDisk, offs: list[int], bs: int, depth: int) -> float:
    t0 = time.perf_counter()
    disk.read_blocks(offs, bs, depth)
    return time.perf_counter() - t0


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--size", default="256M", help="image size (default 256M)")
    ap.add_argument("--total", default="64M", help="bytes read per measurement (default 64M)")
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--depth", type=int, default=0, help="guest queue depth (default: the driver's)")
    args = ap.parse_args()
    size, total = parse_size(args.size), parse_size(args.total)
    with tempfile.TemporaryDirectory(prefix="qcowpy-guestbench-") as d:
        img = os.path.join(d, "disk.qcow2")
        build_image(img, size)
        machine = create_machine("mini-pc", "256M")
        machine.drive_add(img, format="qcow2", id="d0", readonly=True)
        _, disks, _ = boot(machine)
        disk = disks[0]
        print(f"# image {args.size} qcow2 (qemu-img convert of random data); {total >> 20} MiB per run; "
              f"repeats={args.repeats} (medians, alternating)")
        depths = sorted({1, args.depth or disk.depth})
        cols = "".join(f"{'guest QD' + str(q):>14}{'ratio':>8}" for q in depths)
        print(f"{'workload':<22}{'direct MiB/s':>14}{cols}")
        for mode, bs in (("seq", 64 << 10), ("rand", 4 << 10)):
            offs = wl.workload_offsets(mode, bs, size, (total if bs > 4096 else total // 8) // bs, seed=7)
            nbytes = len(offs) * bs
            direct: list[float] = []
            guest: dict[int, list[float]] = {q: [] for q in depths}
            for _ in range(args.repeats):
                direct.append(time_direct(img, offs, bs))
                for q in depths:
                    guest[q].append(time_guest(disk, offs, bs, q))
            d_rate = nbytes / statistics.median(direct) / (1 << 20)
            row = f"{mode + ' ' + str(bs >> 10) + ' KiB reads':<22}{d_rate:>14.1f}"
            for q in depths:
                g_rate = nbytes / statistics.median(guest[q]) / (1 << 20)
                row += f"{g_rate:>14.1f}{g_rate / d_rate:>7.2f}x"
            print(row)
        machine.shutdown()
    return 0


if __name__ == "__main__":
    sys.exit(main())
