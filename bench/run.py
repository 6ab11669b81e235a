#!/usr/bin/env python3
"""Every performance row of docs/performance.md, side by side with qemu-img, in one table.

Builds the images as ``compare_convert.py`` does (1 GiB fully written; its zlib and zstd
compressed copies; 20 GiB with 10 % written), then times, alternating qemu-img and qcowpy after
one untimed warm-up each:

  convert rows   full/zlib/zstd -> raw, full -> qcow2 -c (zlib and zstd), sparse -> raw/qcow2
  start-up rows  ``info`` of the full image, ``create -f qcow2 X 20G``
  API row        4 KiB random reads in-process, IOPS, against libqcow-python and
                 dissect.hypervisor (installed into a throw-away venv when the package index
                 has them; skipped with a note otherwise)

and prints medians, min-max, the qcowpy/qemu-img ratio of medians, each tool's peak RSS (the
child's ru_maxrss) and the load average at the start. Every output is checked with
``qemu-img compare`` (and ``check`` for qcow2 outputs); a wrong output fails the run.

qcowpy is what a user runs: this checkout pip-installed into a throw-away venv (bench/bytecode.py);
``--from-tree`` times ``python -m qcowpy`` from the tree instead (byte-compiled first).

Quick run:  python bench/run.py --size 256M --sparse-size 4G --repeats 3
Full run:   python bench/run.py
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
import venv
from dataclasses import dataclass, field

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
import compare_convert as cc  # noqa: E402  (image builders shared with the older script)
from bytecode import ensure_bytecode, installed  # noqa: E402

ROOT = os.path.dirname(HERE)


@dataclass
class Row:
    name: str
    goal: str
    argv: dict[str, list[str]]  # tool -> command line (OUT stands for the output path)
    out: str | None = None  # output format to verify ("raw" / "qcow2"), "new": a created image
    src: str | None = None  # the image the output must equal
    times: dict[str, list[float]] = field(default_factory=dict)
    rss: dict[str, int] = field(default_factory=dict)  # KiB, the largest of the runs
    status: str = ""


def run_timed(argv: list[str], cwd: str) -> tuple[float, int]:
    """Wall time and peak RSS (KiB) of one run of ``argv``."""
    os.sync()  # the previous run's dirty pages are written back now, not during this run
    t0 = time.perf_counter()
    p = subprocess.Popen(argv, cwd=cwd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    _, status, usage = os.wait4(p.pid, 0)
    dt = time.perf_counter() - t0
    p.returncode = os.waitstatus_to_exitcode(status)
    err = p.stderr.read().decode() if p.stderr else ""
    if p.returncode != 0:
        raise SystemExit(f"command failed ({p.returncode}): {' '.join(argv)}\n{err}")
    return dt, usage.ru_maxrss


def verify(row: Row, out: str) -> str:
    if row.out is None:
        return "ok"
    if row.out == "new":
        c = subprocess.run(["qemu-img", "check", out], capture_output=True, text=True)
        return "ok" if c.returncode == 0 else f"check failed ({c.returncode})"
    p = subprocess.run(["qemu-img", "compare", "-F", row.out, row.src, out], capture_output=True, text=True)
    if p.returncode != 0:
        return f"DIFFERENT ({p.stdout.strip()} {p.stderr.strip()})"
    if row.out == "qcow2":
        c = subprocess.run(["qemu-img", "check", out], capture_output=True, text=True)
        if c.returncode != 0:
            return f"check failed ({c.returncode})"
    return "ok"


def measure(row: Row, repeats: int, tmp: str, verbose: bool) -> None:
    outs = {tool: os.path.join(tmp, f"out-{tool}") for tool in row.argv}

    def once(tool: str) -> tuple[float, int]:
        if os.path.exists(outs[tool]):
            os.unlink(outs[tool])
        return run_timed([a.replace("OUT", outs[tool]) for a in row.argv[tool]], tmp)

    for tool in row.argv:
        once(tool)  # warm-up: page cache, .pyc files
    row.times = {tool: [] for tool in row.argv}
    for _ in range(repeats):
        for tool in row.argv:
            dt, rss = once(tool)
            row.times[tool].append(dt)
            row.rss[tool] = max(row.rss.get(tool, 0), rss)
    row.status = verify(row, outs["qcowpy"])
    if verbose:
        for tool, v in row.times.items():
            print(f"#   {row.name} {tool}: {' '.join(f'{x:.3f}' for x in v)}", flush=True)
    for o in outs.values():
        if os.path.exists(o):
            os.unlink(o)


def rows_for(imgs: dict[str, str], qcowpy: list[str]) -> list[Row]:
    q, p = ["qemu-img"], qcowpy
    rows = []
    for name, goal in (("full", "<= 1.0x"), ("full-zlib", "<= 0.6x"), ("full-zstd", "<= 0.8x")):
        rows.append(Row(f"{name} -> raw", goal, {"qemu-img": q + ["convert", "-O", "raw", imgs[name], "OUT"],
                                                 "qcowpy": p + ["convert", "-O", "raw", imgs[name], "OUT"]},
                        "raw", imgs[name]))
    for ctype, goal in (("zlib", "<= 0.5x"), ("zstd", "<= 0.7x")):
        args = ["convert", "-c", "-O", "qcow2", "-o", f"compression_type={ctype}", imgs["full"], "OUT"]
        rows.append(Row(f"full -> qcow2 -c {ctype}", goal, {"qemu-img": q + args, "qcowpy": p + args},
                        "qcow2", imgs["full"]))
    for fmt in ("raw", "qcow2"):
        args = ["convert", "-O", fmt, imgs["sparse"], "OUT"]
        rows.append(Row(f"sparse -> {fmt}", "<= 1.0x", {"qemu-img": q + args, "qcowpy": p + args}, fmt,
                        imgs["sparse"]))
    rows.append(Row("info", "<= 2x", {"qemu-img": q + ["info", imgs["full"]], "qcowpy": p + ["info", imgs["full"]]}))
    create = ["create", "-q", "-f", "qcow2", "OUT", "20G"]
    rows.append(Row("create 20G", "<= 2x", {"qemu-img": q + create, "qcowpy": p + create}, "new"))
    return rows


# ------------------------------------------------------------------------------- API reads

API_SCRIPT = r"""
import random, sys, time
lib, path, n, seed = sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4])
if lib == "qcowpy":
    sys.path.insert(0, sys.argv[5])
    import qcowpy
    dev = qcowpy.open(path)
    size = dev.size
    read = lambda off: dev.pread(4096, off)
elif lib == "libqcow":
    import pyqcow
    f = pyqcow.file()
    f.open(path)
    size = f.get_media_size()
    read = lambda off: f.read_buffer_at_offset(4096, off)
else:
    from dissect.hypervisor.disk.qcow2 import QCow2
    fh = open(path, "rb")
    stream = QCow2(fh).open()
    size = stream.size
    def read(off):
        stream.seek(off)
        return stream.read(4096)
rnd = random.Random(seed)
offs = [rnd.randrange(size // 4096) * 4096 for _ in range(n)]
for off in offs[:1000]:
    read(off)
t0 = time.perf_counter()
total = 0
for off in offs:
    total += len(read(off))
dt = time.perf_counter() - t0
assert total == 4096 * n
print(n / dt)
"""


def api_python(tmp: str) -> dict[str, str]:
    """Interpreters for each reader: ours, and a throw-away venv with the other readers."""
    pythons = {"qcowpy": sys.executable}
    env = os.path.join(tmp, "venv-readers")
    if not os.path.exists(env):
        venv.create(env, with_pip=True)
    py = os.path.join(env, "bin", "python")
    for lib, pkg, mod in (("libqcow", "libqcow-python", "pyqcow"),
                          ("dissect", "dissect.hypervisor", "dissect.hypervisor.disk.qcow2")):
        ok = subprocess.run([py, "-c", f"import {mod}"], capture_output=True).returncode == 0
        if not ok:
            ok = subprocess.run([py, "-m", "pip", "install", "-q", pkg], capture_output=True).returncode == 0
        if ok:
            pythons[lib] = py
        else:
            print(f"# {pkg} is not installable here: its API row is skipped", flush=True)
    return pythons


def api_reads(img: str, tmp: str, repeats: int, n: int) -> dict[str, list[float]]:
    script = os.path.join(tmp, "api_reads.py")
    with open(script, "w") as f:
        f.write(API_SCRIPT)
    pythons = api_python(tmp)
    iops: dict[str, list[float]] = {lib: [] for lib in pythons}
    for r in range(repeats):
        for lib, py in pythons.items():
            p = subprocess.run([py, script, lib, img, str(n), str(r), ROOT], capture_output=True, text=True)
            if p.returncode != 0:
                raise SystemExit(f"API reads with {lib} failed:\n{p.stderr}")
            iops[lib].append(float(p.stdout))
    return iops


# ------------------------------------------------------------------------------- output

def print_table(rows: list[Row], iops: dict[str, list[float]] | None) -> None:
    hdr = (f"{'workload':<26} {'qemu-img s (min-max)':>22} {'qcowpy s (min-max)':>22} {'ratio':>7} "
           f"{'goal':>8} {'RSS MiB q/p':>12}  output")
    print(hdr)
    print("-" * len(hdr))
    for r in rows:
        q, p = r.times["qemu-img"], r.times["qcowpy"]
        cell = lambda v: f"{statistics.median(v):.3f} ({min(v):.3f}-{max(v):.3f})"  # noqa: E731
        print(f"{r.name:<26} {cell(q):>22} {cell(p):>22} {statistics.median(p) / statistics.median(q):>6.2f}x "
              f"{r.goal:>8} {r.rss['qemu-img'] / 1024:>5.0f}/{r.rss['qcowpy'] / 1024:<6.0f}  {r.status}")
    if iops:
        ours = statistics.median(iops["qcowpy"])
        for lib, v in iops.items():
            m = statistics.median(v)
            ratio = "" if lib == "qcowpy" else f"  qcowpy/{lib} {ours / m:.2f}x (goal >= 1.0x)"
            print(f"API 4 KiB random reads, {lib:<8} {m:>10.0f} IOPS ({min(v):.0f}-{max(v):.0f}){ratio}")
    sparse = [r for r in rows if r.name.startswith("sparse")]
    if sparse:
        peak = max(r.rss["qcowpy"] for r in sparse) / 1024
        print(f"peak RSS of qcowpy converting the sparse image: {peak:.0f} MiB (goal <= 64 MiB)")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--size", default="1G", help="fully written images (default 1G)")
    ap.add_argument("--sparse-size", default="20G", help="the sparse image's virtual size (default 20G)")
    ap.add_argument("--repeats", "-n", type=int, default=5, help="timed runs per tool and row (default 5)")
    ap.add_argument("--rows", help="only rows whose name contains one of these comma-separated words")
    ap.add_argument("--api-reads", type=int, default=20000, help="4 KiB reads per API run (default 20000)")
    ap.add_argument("--no-api", action="store_true", help="skip the API row (no venv is made)")
    ap.add_argument("--dir", help="work directory (kept; images reused if present)")
    ap.add_argument("--qcowpy-path", default=ROOT, help="source tree qcowpy runs from (default: this one)")
    ap.add_argument("--from-tree", action="store_true",
                    help="run qcowpy from the source tree (python -m qcowpy, byte-compiled) instead of "
                         "pip-installing it into a throw-away venv (what a user runs; the default)")
    ap.add_argument("--verbose", "-v", action="store_true")
    args = ap.parse_args()
    ensure_bytecode(args.qcowpy_path)
    load = os.getloadavg()
    tmp = args.dir or tempfile.mkdtemp(prefix="qcowpy-run-", dir=os.environ.get("TMPDIR", "/var/tmp"))
    os.makedirs(tmp, exist_ok=True)
    try:
        which = {"full", "full-zlib", "full-zstd", "sparse"}
        existing = {k: os.path.join(tmp, f"{k}.qcow2") for k in which}
        imgs = existing if all(map(os.path.exists, existing.values())) else \
            cc.build_images(tmp, cc.parse_size(args.size), cc.parse_size(args.sparse_size), which)
        qroot = os.path.abspath(args.qcowpy_path)
        if args.from_tree:
            os.environ["PYTHONPATH"] = qroot  # for qcowpy's children (qemu-img ignores it)
            qcowpy = [sys.executable, "-m", "qcowpy"]
        else:
            tag = qroot.strip("/").replace("/", "_")  # one venv per tree: --dir is reused across trees
            qcowpy = installed(os.path.join(tmp, f"venv-qcowpy-{tag}"), qroot)
        print(f"# load average at start: {load[0]:.2f} {load[1]:.2f} {load[2]:.2f}; {os.cpu_count()} CPUs; "
              f"repeats={args.repeats}; qcowpy from {qroot}" + ("" if args.from_tree else f" ({qcowpy[0]})"))
        print(f"# {subprocess.run(['qemu-img', '--version'], capture_output=True, text=True).stdout.splitlines()[0]}",
              flush=True)
        rows = rows_for(imgs, qcowpy)
        if args.rows:
            words = args.rows.split(",")
            rows = [r for r in rows if any(w in r.name for w in words)]
        for r in rows:
            measure(r, args.repeats, tmp, args.verbose)
            if r.status != "ok":
                raise SystemExit(f"{r.name}: qcowpy's output is wrong: {r.status}")
        iops = None if args.no_api else api_reads(imgs["full"], tmp, args.repeats, args.api_reads)
        print()
        print_table(rows, iops)
    finally:
        if not args.dir:
            shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    random.seed(0)
    main()
