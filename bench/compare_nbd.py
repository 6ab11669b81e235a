#!/usr/bin/env python3
"""``qcowpy nbd`` against ``qemu-nbd``, side by side in one run, same clients, same image.

For each image format (raw, qcow2) of a SIZE image (default 1 GiB, fully written), both servers
export it read-only on unix sockets (-r -t -e 0) and, alternately (qemu-nbd first, REPEATS
rounds, one untimed warm-up each so both read from the page cache), we time:

  copy     ``nbdcopy URI null:`` (sequential throughput, nbdcopy's default 4 connections x 64 requests)
  rand-qd1 4 KiB random reads with libnbd's Python binding, one request at a time (IOPS)
  rand-qd16 the same with 16 requests in flight (aio_pread)

and print medians and the qcowpy/qemu-nbd ratio (>1 means qcowpy is faster for IOPS/throughput).
The libnbd binding is Debian's python3-libnbd, so the random-read client runs under /usr/bin/python3.

Quick run:  python bench/compare_nbd.py --size 256M --repeats 3 --seconds 2
Full run:   python bench/compare_nbd.py
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

from bytecode import ensure_bytecode  # (bench/ is the script's directory)

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)

RANDREAD = r'''
import nbd, random, sys, time
uri, qd, seconds = sys.argv[1], int(sys.argv[2]), float(sys.argv[3])
h = nbd.NBD()
h.connect_uri(uri)
blocks = h.get_size() // 4096
rng = random.Random(7)
done = 0
end = time.monotonic() + seconds
start = time.monotonic()
if qd == 1:
    while time.monotonic() < end:
        h.pread(4096, rng.randrange(blocks) * 4096)
        done += 1
else:
    bufs = [nbd.Buffer(4096) for _ in range(qd)]
    def submit(i):
        h.aio_pread(bufs[i], rng.randrange(blocks) * 4096,
                    completion=lambda err, i=i: (resubmit.append(i), 1)[1])
    resubmit = []
    for i in range(qd):
        submit(i)
    while time.monotonic() < end:
        h.poll(-1)
        while resubmit:
            done += 1
            submit(resubmit.pop())
    while h.aio_in_flight():
        h.poll(-1)
print(done / (time.monotonic() - start))
h.shutdown()
'''


def parse_size(text: str) -> int:
    units = {"K": 10, "M": 20, "G": 30}
    return int(text[:-1]) << units[text[-1].upper()] if text[-1].upper() in units else int(text)


def make_images(d: str, size: int) -> dict[str, str]:
    raw = os.path.join(d, "img.raw")
    with open(raw, "wb") as f:
        block = bytes(range(256)) * 4096  # 1 MiB, non-zero so nothing reads as a hole
        for i in range(size >> 20):
            f.write(block[i % 256:] + block[:i % 256])
    qcow2 = os.path.join(d, "img.qcow2")
    subprocess.run(["qemu-img", "convert", "-O", "qcow2", raw, qcow2], check=True)
    return {"raw": raw, "qcow2": qcow2}


def start(kind: str, image: str, fmt: str, sock: str) -> subprocess.Popen:
    opts = ["-r", "-t", "-e", "0", "-f", fmt, "-k", sock, image]
    if kind == "qcowpy":
        env = dict(os.environ, PYTHONPATH=ROOT)
        argv = [sys.executable, "-m", "qcowpy", "nbd", *opts]
    else:
        env, argv = None, ["qemu-nbd", *opts]
    p = subprocess.Popen(argv, env=env)
    deadline = time.monotonic() + 30
    while not os.path.exists(sock):
        if time.monotonic() > deadline or p.poll() is not None:
            raise SystemExit(f"{kind} did not start")
        time.sleep(0.02)
    return p


def copy_seconds(uri: str) -> float:
    t = time.perf_counter()
    subprocess.run(["nbdcopy", uri, "null:"], check=True)
    return time.perf_counter() - t


def randread_iops(uri: str, qd: int, seconds: float) -> float:
    p = subprocess.run(["/usr/bin/python3", "-c", RANDREAD, uri, str(qd), str(seconds)], check=True,
                       capture_output=True, text=True)
    return float(p.stdout)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--size", default="1G")
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--seconds", type=float, default=3.0, help="duration of each random-read run")
    ap.add_argument("--formats", default="raw,qcow2")
    args = ap.parse_args()
    for tool in ("qemu-nbd", "qemu-img", "nbdcopy"):
        if shutil.which(tool) is None:
            raise SystemExit(f"{tool} is required")
    ensure_bytecode()
    size = parse_size(args.size)
    with tempfile.TemporaryDirectory(prefix="qcowpy-nbd-bench.") as d:
        images = make_images(d, size)
        print(f"image {size >> 20} MiB, {args.repeats} rounds, random reads {args.seconds}s each")
        print(f"{'format':6} {'test':10} {'qemu-nbd':>12} {'qcowpy':>12} {'ratio':>7}")
        for fmt in args.formats.split(","):
            procs = {k: start(k, images[fmt], fmt, os.path.join(d, f"{k}-{fmt}.sock")) for k in ("qemu-nbd", "qcowpy")}
            uris = {k: f"nbd+unix:///?socket={d}/{k}-{fmt}.sock" for k in procs}
            try:
                results: dict[tuple[str, str], list[float]] = {}
                for k in ("qemu-nbd", "qcowpy"):
                    copy_seconds(uris[k])  # warm-up: page cache and server caches
                for _ in range(args.repeats):
                    for k in ("qemu-nbd", "qcowpy"):
                        results.setdefault((k, "copy"), []).append(size / copy_seconds(uris[k]) / (1 << 20))
                        for qd in (1, 16):
                            results.setdefault((k, f"rand-qd{qd}"), []).append(
                                randread_iops(uris[k], qd, args.seconds))
                for test, unit in (("copy", "MiB/s"), ("rand-qd1", "IOPS"), ("rand-qd16", "IOPS")):
                    a = statistics.median(results[("qemu-nbd", test)])
                    b = statistics.median(results[("qcowpy", test)])
                    print(f"{fmt:6} {test:10} {a:9.0f} {unit:5}{b:9.0f} {unit:5} {b / a:6.2f}x")
                    sys.stdout.flush()
            finally:
                for p in procs.values():
                    p.terminate()
                    p.wait()


if __name__ == "__main__":
    main()
