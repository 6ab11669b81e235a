#!/usr/bin/env python3
"""Inside a real Linux guest (tests/qsd's test system, TCG), time sequential 1 MiB writes and
reads and a 4 KiB random read loop on a qcow2 image served two ways, side by side in one run:

  qcowpy     qcowpy storage-daemon, vhost-user-blk export
  qemu       QEMU's built-in qcow2 driver, -drive file=IMG,if=virtio

Each repeat uses a fresh empty qcow2 of SIZE+64 MiB for each side (so writes allocate the same
clusters), alternating which side goes first. Prints medians of MiB/s (IO/s for random reads)
and the qcowpy/qemu ratio. Timing is the guest's /proc/uptime (10 ms resolution).

    python bench/guest_vhost_user.py [--mib 64] [--repeats 3]
"""
from __future__ import annotations

import argparse
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "tests", "qsd"))
import mkinitramfs  # noqa: E402


def _parse(console: str) -> dict[str, float]:
    out = {}
    for ln in console.replace("\r", "").splitlines():
        if "QCOWPY bench " in ln:
            name, n, a, b = ln.split("QCOWPY bench ", 1)[1].split()[:4]
            out[name] = float(n) / max(float(b) - float(a), 0.01)
    return out


def run(side: str, qemu: str, kernel: str, initrd: str, mib: int, tmp: str) -> dict[str, float]:
    img = os.path.join(tmp, f"{side}.qcow2")
    subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", img, f"{mib + 64}M"], check=True)
    params = f"qcowpy.mode=bench qcowpy.mib={mib}"
    daemon = None
    if side == "qcowpy":
        sock = os.path.join(tmp, "vu.sock")
        env = dict(os.environ, PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""))
        daemon = subprocess.Popen([sys.executable, "-m", "qcowpy.cli.main", "storage-daemon",
                                   "--blockdev", f"driver=qcow2,node-name=d,file.driver=file,file.filename={img}",
                                   "--export", f"type=vhost-user-blk,id=vu,node-name=d,addr.type=unix,"
                                               f"addr.path={sock},writable=on"], env=env)
        while not os.path.exists(sock):
            time.sleep(0.05)
        disk = mkinitramfs.vhost_user_disk(sock)
    else:
        disk = ["-drive", f"file={img},format=qcow2,if=virtio"]
    try:
        p = subprocess.run(mkinitramfs.qemu_argv(qemu, kernel, initrd, disk, params), capture_output=True,
                           text=True, timeout=600)
    finally:
        if daemon is not None:
            daemon.terminate()
            daemon.wait()
    res = _parse(p.stdout)
    if len(res) != 3:
        sys.exit(f"{side}: guest did not report its timings:\n{p.stdout[-2000:]}")
    os.unlink(img)
    return res


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--mib", type=int, default=64)
    ap.add_argument("--repeats", type=int, default=3)
    args = ap.parse_args()
    qemu = shutil.which("qemu-system-x86_64")
    if qemu is None or mkinitramfs.missing():
        sys.exit(f"needs qemu-system-x86_64 and {mkinitramfs.missing()}")
    with tempfile.TemporaryDirectory() as tmp:
        kernel, initrd = mkinitramfs.build(tmp)
        results: dict[str, list[dict[str, float]]] = {"qcowpy": [], "qemu": []}
        for r in range(args.repeats):
            for side in (("qemu", "qcowpy") if r % 2 == 0 else ("qcowpy", "qemu")):
                results[side].append(run(side, qemu, kernel, initrd, args.mib, tmp))
    print(f"{'test':<12} {'qemu':>10} {'qcowpy':>10} {'ratio':>7}   ({args.mib} MiB, {args.repeats} repeats, medians)")
    for name, unit in (("seqwrite", "MiB/s"), ("seqread", "MiB/s"), ("randread4k", "IO/s")):
        q = statistics.median(x[name] for x in results["qemu"])
        o = statistics.median(x[name] for x in results["qcowpy"])
        print(f"{name:<12} {q:>10.1f} {o:>10.1f} {o / q:>7.2f}   {unit}")


if __name__ == "__main__":
    main()
