#!/usr/bin/env python3
"""Time ``qcowpy convert`` into and out of Ceph RBD against ``qemu-img convert``, side by side.

Starts a throw-away one-node cluster (tests/rbd/cluster.py: one monitor, one memstore OSD) unless
``--conf`` names a running one, builds a source qcow2 image with qemu-img/qemu-io (SIZE, every
other 4 MiB written with data, a zlib-compressed variant too), then times, alternately (qemu-img
first, N repeats after one untimed warm-up each):

  into  convert -O raw SRC.qcow2 rbd:rbd/IMG     (the image is removed before each run)
  out   convert -O raw rbd:rbd/IMG DST.raw       (read back from the cluster into a new file in
                                                  /dev/shm, removed before each run as the image is)
  zlib  convert -O raw SRC-zlib.qcow2 rbd:...    (decompression while writing)

qcowpy is what a user runs: ``pip install`` of this checkout into a throw-away venv, or with
``--from-tree`` the checkout itself, byte-compiled (bench/bytecode.py). The script prints
medians, min-max, the qcowpy/qemu-img ratio and the load average (the machine may be shared:
quote figures with it).

    python bench/compare_rbd.py --size 2048M --repeats 7
"""
from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bytecode import ensure_bytecode, installed  # noqa: E402  (bench/ is the script's directory)
from tests.rbd.cluster import Cluster  # noqa: E402


def run(argv: list[str]) -> None:
    p = subprocess.run(argv, capture_output=True, text=True, env={**os.environ, "PYTHONPATH": str(ROOT)})
    if p.returncode != 0:
        raise SystemExit(f"{' '.join(argv)} failed:\n{p.stdout}{p.stderr}")


def timed(argv: list[str], before=None) -> float:
    if before:
        before()
    t = time.perf_counter()
    run(argv)
    return time.perf_counter() - t


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--size", default="512M")
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--conf", help="ceph.conf of a running cluster (default: start one)")
    ap.add_argument("--out-dir", default="/dev/shm" if os.path.isdir("/dev/shm") else None,
                    help="directory of the out case's target file (default /dev/shm: the local disk's write-back "
                         "swings either tool's time 2x from run to run)")
    ap.add_argument("--from-tree", action="store_true",
                    help="time this checkout (python -m qcowpy, byte-compiled) instead of a venv install")
    args = ap.parse_args()
    ensure_bytecode()
    tmp = Path(tempfile.mkdtemp(prefix="qcowpy-rbd-bench-"))
    dst = Path(args.out_dir or tmp) / f"qcowpy-rbd-bench-{os.getpid()}.raw"
    cluster = None
    conf = args.conf
    if conf is None:
        cluster = Cluster(tmp / "ceph").start()
        conf = str(cluster.conf)
    try:
        qcowpy = [sys.executable, "-m", "qcowpy"] if args.from_tree else installed(tmp / "venv")
        size_mib = int(args.size.rstrip("Mm"))
        src, srcz = tmp / "src.qcow2", tmp / "src-zlib.qcow2"
        run(["qemu-img", "create", "-q", "-f", "qcow2", str(src), args.size])
        cmds = [f"write -P {(i % 250) + 1} {i}M 4M" for i in range(0, size_mib, 8)]
        for i in range(0, len(cmds), 64):
            run(["qemu-io", "-f", "qcow2", *sum((["-c", c] for c in cmds[i:i + 64]), []), str(src)])
        run(["qemu-img", "convert", "-c", "-O", "qcow2", str(src), str(srcz)])
        name = f"rbd:rbd/bench:conf={conf}"

        def rm() -> None:
            subprocess.run(["rbd", "-c", conf, "rm", "bench"], capture_output=True)

        cases = {
            "into": ([["convert", "-O", "raw", str(src), name]], rm),
            "zlib": ([["convert", "-O", "raw", str(srcz), name]], rm),
            "out": ([["convert", "-O", "raw", name, str(dst)]], lambda: dst.unlink(missing_ok=True)),
        }
        print(f"qcowpy: {' '.join(qcowpy)}")
        print(f"source {args.size} qcow2, half written; {args.repeats} runs each; "
              f"load average before: {os.getloadavg()[0]:.2f}")
        for case, (argvs, before) in cases.items():
            if case == "out":
                rm()
                run(["qemu-img", "convert", "-O", "raw", str(src), name])
            times: dict[str, list[float]] = {"qemu-img": [], "qcowpy": []}
            for rep in range(args.repeats + 1):
                for tool, prefix in (("qemu-img", ["qemu-img"]), ("qcowpy", qcowpy)):
                    t = timed(prefix + argvs[0], before)
                    if rep:
                        times[tool].append(t)
            q, p = statistics.median(times["qemu-img"]), statistics.median(times["qcowpy"])
            spread = "  ".join(f"{t} {min(v):.2f}-{max(v):.2f}" for t, v in times.items())
            print(f"{case:5s} qemu-img {q:6.2f} s  qcowpy {p:6.2f} s  ratio {p / q:4.2f}  "
                  f"({size_mib / p:.0f} MiB/s virtual)  [{spread}]  load {os.getloadavg()[0]:.2f}")
    finally:
        dst.unlink(missing_ok=True)
        if cluster is not None:
            cluster.stop()
        subprocess.run(["rm", "-rf", str(tmp)])
    return 0


if __name__ == "__main__":
    sys.exit(main())
