#!/usr/bin/env python3
"""Time ``qcowpy convert`` against ``qemu-img convert`` side by side, in one run.

Builds test images with qemu-img/qemu-io in a temporary directory:

  full        SIZE (default 1 GiB) fully written with random-ish, partly compressible data
  full-zlib   the same, converted with ``qemu-img convert -c`` (zlib)
  full-zstd   the same, converted with ``-c -o compression_type=zstd``
  sparse      SPARSE_SIZE (default 20 GiB) with 10% of it written by qemu-io at scattered offsets

then times ``qcowpy convert -O raw|qcow2 SRC DST`` and ``qemu-img convert -O raw|qcow2 SRC DST``
alternately (qemu-img first, then qcowpy, N repeats, after one untimed warm-up each so both
read from the page cache) and prints medians and the qcowpy/qemu-img ratio.

``qcowpy convert`` is run as ``python -m qcowpy convert`` when that command exists; otherwise a
minimal API-based copy loop (block_status + pread + pwrite, skipping zero/unallocated runs) stands
in for it and the output says so.

Quick run:   python bench/compare_convert.py --size 256M --sparse-size 4G --repeats 3
Full run:    python bench/compare_convert.py
"""
from __future__ import annotations

import argparse
import os
import random
import shutil
import statistics
import subprocess
import sys
import tempfile
import time

from bytecode import ensure_bytecode  # (bench/ is the script's directory)

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

MiB = 1 << 20
GiB = 1 << 30


def parse_size(s: str) -> int:
    s = s.strip().upper().rstrip("B")
    mult = {"K": 1 << 10, "M": MiB, "G": GiB, "T": 1 << 40}
    if s and s[-1] in mult:
        return int(float(s[:-1]) * mult[s[-1]])
    return int(s)


def fmt_size(n: int) -> str:
    for unit, m in (("G", GiB), ("M", MiB), ("K", 1024)):
        if n >= m and n % m == 0:
            return f"{n // m}{unit}"
    return str(n)


def run(argv: list[str], **kw) -> subprocess.CompletedProcess:
    p = subprocess.run(argv, capture_output=True, text=True, **kw)
    if p.returncode != 0:
        raise SystemExit(f"command failed ({p.returncode}): {' '.join(argv)}\n{p.stdout}{p.stderr}")
    return p


# --------------------------------------------------------------------------- building images

def random_ish_block(rnd: random.Random, n: int) -> bytes:
    """n bytes: half random, half a short repeating phrase (compresses to roughly 55%)."""
    half = n // 2
    phrase = (b"qcowpy-%08x-" % rnd.getrandbits(32)) * (half // 16 + 1)
    return rnd.randbytes(n - half) + phrase[:half]


def build_full_raw(path: str, size: int, seed: int = 1) -> None:
    rnd = random.Random(seed)
    chunk = 4 * MiB
    with open(path, "wb") as f:
        left = size
        while left:
            n = min(chunk, left)
            # 64 KiB blocks so every cluster has both halves (no all-zero cluster anywhere)
            f.write(b"".join(random_ish_block(rnd, 65536) for _ in range(n // 65536))
                    + (random_ish_block(rnd, n % 65536) if n % 65536 else b""))
            left -= n


def build_sparse(path: str, size: int, fraction: float = 0.10, seed: int = 2) -> None:
    """qemu-img create + qemu-io writes of 64 KiB..1 MiB pieces at scattered 64 KiB-aligned offsets."""
    run(["qemu-img", "create", "-q", "-f", "qcow2", path, str(size)])
    rnd = random.Random(seed)
    slot = 64 * 1024
    nslots = size // slot
    want = int(nslots * fraction)
    used = bytearray(nslots)
    cmds: list[str] = []
    got = 0
    while got < want:
        run_len = min(rnd.choice((1, 2, 4, 8, 16)), want - got)
        start = rnd.randrange(0, nslots - run_len)
        if any(used[start:start + run_len]):
            continue
        used[start:start + run_len] = b"\x01" * run_len
        cmds.append(f"write -q -P {rnd.randrange(1, 256)} {start * slot} {run_len * slot}")
        got += run_len
    # qemu-io reads commands from stdin when given none on the command line
    for i in range(0, len(cmds), 2000):
        argv = ["qemu-io", "-f", "qcow2"]
        for c in cmds[i:i + 2000]:
            argv += ["-c", c]
        run(argv + [path])


def build_images(d: str, size: int, sparse_size: int, which: set[str]) -> dict[str, str]:
    imgs: dict[str, str] = {}
    t0 = time.perf_counter()
    if which & {"full", "full-zlib", "full-zstd"}:
        raw = os.path.join(d, "full.raw")
        build_full_raw(raw, size)
        if "full" in which:
            imgs["full"] = os.path.join(d, "full.qcow2")
            run(["qemu-img", "convert", "-f", "raw", "-O", "qcow2", raw, imgs["full"]])
        if "full-zlib" in which:
            imgs["full-zlib"] = os.path.join(d, "full-zlib.qcow2")
            run(["qemu-img", "convert", "-f", "raw", "-O", "qcow2", "-c", raw, imgs["full-zlib"]])
        if "full-zstd" in which:
            imgs["full-zstd"] = os.path.join(d, "full-zstd.qcow2")
            run(["qemu-img", "convert", "-f", "raw", "-O", "qcow2", "-c", "-o", "compression_type=zstd",
                 raw, imgs["full-zstd"]])
        os.unlink(raw)
    if "sparse" in which:
        imgs["sparse"] = os.path.join(d, "sparse.qcow2")
        build_sparse(imgs["sparse"], sparse_size)
    print(f"# built {', '.join(imgs)} in {time.perf_counter() - t0:.1f}s", flush=True)
    return imgs


# --------------------------------------------------------------------------- the two converters

QROOT = ROOT  # source tree qcowpy runs from (--qcowpy-path)


def qcowpy_cli_available() -> bool:
    p = subprocess.run([sys.executable, "-m", "qcowpy", "convert", "--help"], capture_output=True, text=True,
                       cwd=QROOT)
    return p.returncode == 0


FALLBACK = r"""
import sys
sys.path.insert(0, %(root)r)
import qcowpy
from qcowpy.kernels import is_zero

def convert(src, dst, fmt):
    chunk = 2 << 20
    with qcowpy.open(src) as s:
        size = s.size
        if fmt == "raw":
            with open(dst, "wb") as f:
                f.truncate(size)
            out = qcowpy.open(dst, "r+", format="raw", cache="unsafe")
        else:
            qcowpy.create(dst, size, format="qcow2")
            out = qcowpy.open(dst, "r+", format="qcow2", cache="unsafe")
        with out:
            for e in s.block_status():
                if not e.present or e.zero:
                    continue
                pos, end = e.start, e.start + e.length
                while pos < end:
                    n = min(chunk, end - pos)
                    data = s.pread(n, pos)
                    if not is_zero(data):
                        out.pwrite(data, pos)
                    pos += n

convert(sys.argv[1], sys.argv[2], sys.argv[3])
"""


def converters(use_cli: bool, tmp: str) -> dict[str, callable]:
    def qemu(src: str, dst: str, fmt: str, extra: list[str]) -> list[str]:
        return ["qemu-img", "convert", "-O", fmt, *extra, src, dst]

    if use_cli:
        def qcowpy_(src: str, dst: str, fmt: str, extra: list[str]) -> list[str]:
            return [sys.executable, "-m", "qcowpy", "convert", "-O", fmt, *extra, src, dst]
    else:
        script = os.path.join(tmp, "fallback_convert.py")
        with open(script, "w") as f:
            f.write(FALLBACK % {"root": QROOT})

        def qcowpy_(src: str, dst: str, fmt: str, extra: list[str]) -> list[str]:
            return [sys.executable, script, src, dst, fmt]
    return {"qemu-img": qemu, "qcowpy": qcowpy_}


def time_once(argv: list[str], dst: str) -> float:
    if os.path.exists(dst):
        os.unlink(dst)
    os.sync()  # write back the previous run's dirty pages now, not during this run
    t0 = time.perf_counter()
    p = subprocess.run(argv, capture_output=True, text=True, cwd=QROOT)
    dt = time.perf_counter() - t0
    if p.returncode != 0:
        raise SystemExit(f"command failed ({p.returncode}): {' '.join(argv)}\n{p.stdout}{p.stderr}")
    return dt


def verify(src: str, dst: str, fmt: str) -> str:
    p = subprocess.run(["qemu-img", "compare", "-F", fmt, src, dst], capture_output=True, text=True)
    if p.returncode != 0:
        return f"DIFFERENT ({p.stdout.strip()} {p.stderr.strip()})"
    if fmt == "qcow2":
        c = subprocess.run(["qemu-img", "check", dst], capture_output=True, text=True)
        if c.returncode != 0:
            return f"check failed ({c.returncode})"
    return "ok"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--size", default="1G", help="size of the fully written images (default 1G)")
    ap.add_argument("--sparse-size", default="20G", help="virtual size of the sparse image (default 20G)")
    ap.add_argument("--repeats", "-n", type=int, default=5, help="timed runs of each command (default 5)")
    ap.add_argument("--images", default="full,full-zlib,full-zstd,sparse",
                    help="comma-separated subset of full,full-zlib,full-zstd,sparse")
    ap.add_argument("--formats", default="raw,qcow2", help="output formats to time (default raw,qcow2)")
    ap.add_argument("--dir", help="work directory (kept; images reused if present). Default: a temp dir")
    ap.add_argument("--fallback", action="store_true", help="use the API copy loop even if the CLI exists")
    ap.add_argument("--no-verify", action="store_true", help="skip qemu-img compare of the outputs")
    ap.add_argument("--verbose", "-v", action="store_true", help="print every timing")
    ap.add_argument("--qcowpy-path", help="run qcowpy from this source tree instead (e.g. an older checkout)")
    args = ap.parse_args()
    ensure_bytecode(args.qcowpy_path)

    global QROOT
    if args.qcowpy_path:
        QROOT = os.path.abspath(args.qcowpy_path)
    size, sparse_size = parse_size(args.size), parse_size(args.sparse_size)
    which = set(args.images.split(","))
    formats = args.formats.split(",")
    tmp = args.dir or tempfile.mkdtemp(prefix="qcowpy-bench-", dir=os.environ.get("TMPDIR", "/var/tmp"))
    os.makedirs(tmp, exist_ok=True)
    try:
        existing = {k: os.path.join(tmp, f"{k}.qcow2") for k in which}
        if args.dir and all(os.path.exists(p) for p in existing.values()):
            imgs = existing
            print(f"# reusing images in {tmp}", flush=True)
        else:
            imgs = build_images(tmp, size, sparse_size, which)
        use_cli = not args.fallback and qcowpy_cli_available()
        conv = converters(use_cli, tmp)
        have_ext = subprocess.run([sys.executable, "-c", "import qcowpy._ext"], cwd=QROOT,
                                  capture_output=True).returncode == 0
        print(f"# qcowpy: {'python -m qcowpy convert' if use_cli else 'API copy loop (bench fallback: qcowpy convert CLI not available)'}"
              f"; Cython kernels: {'built' if have_ext else 'NOT built (pure-Python fallbacks)'}")
        print(f"# qcowpy source tree: {QROOT}")
        print(f"# qemu-img: {run(['qemu-img', '--version']).stdout.splitlines()[0]}; "
              f"{os.cpu_count()} CPUs; repeats={args.repeats} (medians, alternating, after 1 warm-up each)")
        print()
        hdr = (f"{'image':<10} {'virtual':>7} {'-O':>5} {'qemu-img med':>12} {'min':>6} {'qcowpy med':>10} {'min':>6}"
               f" {'ratio med':>9} {'min':>6}  output")
        print(hdr)
        print("-" * len(hdr), flush=True)
        for name in ("full", "full-zlib", "full-zstd", "sparse"):
            if name not in imgs:
                continue
            src = imgs[name]
            vsize = sparse_size if name == "sparse" else size
            for fmt in formats:
                dst = {k: os.path.join(tmp, f"out-{k}.{fmt}") for k in conv}
                times: dict[str, list[float]] = {k: [] for k in conv}
                for k in conv:  # warm-up (page cache, imports)
                    time_once(conv[k](src, dst[k], fmt, []), dst[k])
                for _ in range(args.repeats):
                    for k in conv:
                        times[k].append(time_once(conv[k](src, dst[k], fmt, []), dst[k]))
                q, qmin = statistics.median(times["qemu-img"]), min(times["qemu-img"])
                p, pmin = statistics.median(times["qcowpy"]), min(times["qcowpy"])
                status = "" if args.no_verify else verify(src, dst["qcowpy"], fmt)
                print(f"{name:<10} {fmt_size(vsize):>7} {fmt:>5} {q:>12.3f} {qmin:>6.3f} {p:>10.3f} {pmin:>6.3f}"
                      f" {p / q:>8.2f}x {pmin / qmin:>5.2f}x  {status}", flush=True)
                if args.verbose:
                    for k, v in times.items():
                        print(f"#   {k}: {' '.join(f'{x:.3f}' for x in v)}")
                for d in dst.values():
                    if os.path.exists(d):
                        os.unlink(d)
    finally:
        if not args.dir:
            shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
