#!/usr/bin/env python3
"""Server CPU time per request: ``qcowpy nbd`` and ``qemu-nbd`` serving the same image to the same
client (N 4 KiB random reads, one at a time, libnbd's Python binding), CPU seconds read from
/proc/PID/stat before and after. Wall-clock IOPS on a shared machine swing by 3x between runs;
CPU time per request moves far less, so it is the figure to compare changes of our server with.
It does not rank us against qemu-nbd: QEMU's event loop polls adaptively (busy-waits up to
tens of microseconds for the next event), which counts as CPU time it would otherwise sleep.

    python bench/nbd_cpu.py [--requests 20000] [--repeats 3] [--size 256M]
"""
from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CLIENT = r'''
import nbd, random, sys
h = nbd.NBD(); h.connect_uri(sys.argv[1]); blocks = h.get_size() // 4096; rng = random.Random(7)
for _ in range(int(sys.argv[2])): h.pread(4096, rng.randrange(blocks) * 4096)
'''


def _cpu(pid: int) -> float:
    fields = open(f"/proc/{pid}/stat").read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def measure(kind: str, img: str, fmt: str, n: int, d: str) -> tuple[float, float]:
    """(server CPU microseconds per request, wall IOPS)."""
    sock = os.path.join(d, f"{kind}.sock")
    if kind == "qemu-nbd":
        argv = ["qemu-nbd"]
    else:
        argv = [sys.executable, "-m", "qcowpy", "nbd"]
    p = subprocess.Popen(argv + ["-r", "-t", "-e", "0", "-f", fmt, "-k", sock, img],
                         env=dict(os.environ, PYTHONPATH=ROOT))
    try:
        while not os.path.exists(sock):
            time.sleep(0.05)
        uri = f"nbd+unix:///?socket={sock}"
        subprocess.run(["/usr/bin/python3", "-c", CLIENT, uri, "2000"], check=True, timeout=300)  # warm-up
        c0, t0 = _cpu(p.pid), time.monotonic()
        subprocess.run(["/usr/bin/python3", "-c", CLIENT, uri, str(n)], check=True, timeout=600)
        c1, t1 = _cpu(p.pid), time.monotonic()
    finally:
        p.terminate()
        p.wait(30)
    return 1e6 * (c1 - c0) / n, n / (t1 - t0)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--requests", type=int, default=20000)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--size", default="256M")
    a = ap.parse_args()
    with tempfile.TemporaryDirectory() as d:
        raw, qcow2 = os.path.join(d, "r.raw"), os.path.join(d, "q.qcow2")
        subprocess.run(["qemu-img", "create", "-q", "-f", "raw", raw, a.size], check=True)
        subprocess.run(["qemu-io", "-f", "raw", "-c", f"write -P 1 0 {a.size}", raw], check=True,
                       stdout=subprocess.DEVNULL)
        subprocess.run(["qemu-img", "convert", "-O", "qcow2", raw, qcow2], check=True)
        print(f"{a.requests} QD1 4 KiB random reads, {a.repeats} alternating rounds, medians; "
              f"load average {os.getloadavg()[0]:.1f}")
        print("format server      cpu/request   wall IOPS")
        for fmt, img in (("raw", raw), ("qcow2", qcow2)):
            got: dict[str, list[tuple[float, float]]] = {"qemu-nbd": [], "qcowpy": []}
            for _ in range(a.repeats):
                for kind in got:
                    got[kind].append(measure(kind, img, fmt, a.requests, d))
            for kind, runs in got.items():
                print(f"{fmt:6s} {kind:9s} {statistics.median(r[0] for r in runs):8.1f} us "
                      f"{statistics.median(r[1] for r in runs):10.0f}")
        print(f"load average at the end {os.getloadavg()[0]:.1f}")


if __name__ == "__main__":
    main()
