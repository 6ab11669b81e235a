"""Writes through qcowpy keep QEMU's persistent bitmaps true.

Bitmaps are made by qemu-img (``qemu-img bitmap --add``), data is written by qemu-io (QEMU marks
its bitmaps) and then by qcowpy — the Python API, CLI commands, the NBD export — and afterwards
QEMU itself must see consistent bitmaps (``qemu-img info``: no ``in-use``) whose exported dirty
ranges (``qemu-nbd -B`` + ``nbdinfo --map``) equal a model of every written range rounded to the
bitmap's granularity; a disabled bitmap keeps exactly what it had. ``qemu-img check`` is clean.
"""
from __future__ import annotations

import os
import random
import shutil
import signal
import subprocess
import sys

import pytest

import qcowpy

from . import oracle as Q

MiB = 1 << 20


def _make(path, size: int, cluster_size: int, bitmaps: list[tuple[str, int | None, bool]]) -> None:
    assert Q.img("create", "-q", "-f", "qcow2", "-o", f"cluster_size={cluster_size}", path, size).returncode == 0
    for name, gran, disabled in bitmaps:
        args = ["bitmap", "--add", *(["-g", gran] if gran else []), *(["--disable"] if disabled else []), path, name]
        p = Q.img(*args)
        assert p.returncode == 0, p.stderr


class Model:
    """Dirty granules per bitmap, fed with every range written (QEMU's and ours)."""

    def __init__(self, size: int, bitmaps: dict[str, tuple[int, bool]]):
        self.size = size
        self.bitmaps = bitmaps  # name -> (granularity, enabled)
        self.dirty: dict[str, set[int]] = {n: set() for n in bitmaps}

    def write(self, offset: int, length: int) -> None:
        for name, (gran, enabled) in self.bitmaps.items():
            if enabled:
                self.dirty[name] |= Q.granules(offset, length, gran)

    def assert_qemu_agrees(self, path) -> None:
        listed = {b["name"]: b for b in Q.bitmaps(path)}
        assert set(listed) == set(self.bitmaps)
        for name, (gran, enabled) in self.bitmaps.items():
            assert listed[name]["granularity"] == gran
            assert listed[name]["flags"] == (["auto"] if enabled else []), listed[name]
            assert Q.dirty_map(path, name) == Q.runs_of(self.dirty[name], gran, self.size), name
        Q.assert_clean(path)


BITMAPS = [("b64k", None, False), ("b512", 512, False), ("b1m", MiB, False), ("off", None, True)]


def _model(size: int, cluster_size: int) -> Model:
    default = max(4096, min(65536, cluster_size))
    return Model(size, {n: (g or default, not d) for n, g, d in BITMAPS})


@pytest.mark.parametrize("cluster_size", [512, 4096, 65536, 2 * MiB])
def test_api_writes_zeroes_and_discards_are_marked(tmp_path, cluster_size):
    size = 48 * MiB + 3 * 512
    p = tmp_path / "a.qcow2"
    _make(p, size, cluster_size, BITMAPS)
    model = _model(size, cluster_size)
    Q.io(p, "write -P 1 100k 3k", "write -P 2 40M 1M")  # QEMU marks its enabled bitmaps
    model.write(100 << 10, 3 << 10)
    model.write(40 * MiB, MiB)
    rng = random.Random(cluster_size)
    with qcowpy.open(str(p), "r+") as d:
        for _ in range(60):
            op = rng.choice(["write", "write", "zero", "discard", "compressed"])
            off = rng.randrange(0, size - 1) & ~rng.choice([0, 511])
            n = min(size - off, rng.choice([1, 512, 700, 4096, 70000, 3 * MiB]))
            if op == "write":
                d.pwrite(bytes([rng.randrange(1, 255)]) * n, off)
            elif op == "zero":
                d.write_zeroes(n, off, unmap=rng.random() < 0.5)
            elif op == "discard":
                d.discard(n, off)
            else:
                cs = cluster_size
                off = off & ~(cs - 1)
                n = min(cs, size - off)
                d.write_compressed(os.urandom(16) * (n // 16) + bytes(n % 16), off)
            model.write(off, n)
    model.assert_qemu_agrees(p)
    # and QEMU keeps marking on top of what we stored
    Q.io(p, "write 47M 4k")
    model.write(47 * MiB, 4096)
    model.assert_qemu_agrees(p)


def test_extended_l2_writes_are_marked(tmp_path):
    p = tmp_path / "a.qcow2"
    size = 16 * MiB
    assert Q.img("create", "-q", "-f", "qcow2", "-o", "extended_l2=on", p, size).returncode == 0
    assert Q.img("bitmap", "--add", "-g", "4k", p, "b").returncode == 0
    model = Model(size, {"b": (4096, True)})
    with qcowpy.open(str(p), "r+") as d:
        for off, n in [(5000, 100), (3 * MiB, 70000), (9 * MiB + 1, 2)]:
            d.pwrite(b"x" * n, off)
            model.write(off, n)
        d.write_zeroes(8192, 12 * MiB)
        model.write(12 * MiB, 8192)
    model.assert_qemu_agrees(p)


def test_readonly_open_leaves_the_file_alone(tmp_path):
    p = tmp_path / "a.qcow2"
    _make(p, 8 * MiB, 65536, BITMAPS)
    Q.io(p, "write 0 64k")
    before = p.read_bytes()
    with qcowpy.open(str(p)) as d:
        d.pread(4096, 0)
        assert [b.name for b in d.bitmaps()] == [n.encode() for n, _, _ in BITMAPS]
    assert p.read_bytes() == before


def test_read_write_open_without_writes_leaves_the_file_alone(tmp_path):
    p = tmp_path / "a.qcow2"
    _make(p, 8 * MiB, 65536, BITMAPS)
    before = p.read_bytes()
    with qcowpy.open(str(p), "r+") as d:
        d.pread(4096, 0)
        d.flush()
    assert p.read_bytes() == before


def _bitmap_flags(path) -> dict[str, list[str]]:
    return {b["name"]: b["flags"] for b in Q.bitmaps(path)}


def test_in_use_is_on_disk_before_the_first_write_and_a_crash_leaves_it(tmp_path):
    """While qcowpy has the image open for writing, the directory says in_use (flushed before the
    first guest write); a process killed then leaves it so, as QEMU would, and the image only leaks."""
    p = tmp_path / "a.qcow2"
    _make(p, 8 * MiB, 65536, BITMAPS)
    script = ("import qcowpy, sys, os\n"
              f"d = qcowpy.open({str(p)!r}, 'r+')\n"
              "d.pwrite(b'x' * 4096, 0)\n"
              "d.flush()\n"
              "sys.stdout.write('written\\n'); sys.stdout.flush()\n"
              "sys.stdin.read()\n")
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [os.getcwd(), os.environ.get("PYTHONPATH")])))
    proc = subprocess.Popen([sys.executable, "-c", script], stdin=subprocess.PIPE, stdout=subprocess.PIPE, env=env)
    try:
        assert proc.stdout.readline() == b"written\n"
        flags = _bitmap_flags(p)
        assert all("in-use" in f for f in flags.values()), flags
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    assert all("in-use" in f for f in _bitmap_flags(p).values())
    check = Q.img("check", p)
    assert check.returncode in (0, 3), check.stdout + check.stderr


def test_inconsistent_bitmaps_are_left_alone_and_can_be_removed(tmp_path):
    """Bitmaps found in_use are inconsistent (QEMU's load): writes do not mark them, close keeps
    their entries as they are, the consistent ones are stored; ``bitmap --remove`` drops them
    and ``check -r`` is as clean as after QEMU."""
    p = tmp_path / "a.qcow2"
    _make(p, 8 * MiB, 65536, [("good", None, False)])
    subprocess.run([sys.executable, "-c", "import qcowpy, os\n"
                    f"d = qcowpy.open({str(p)!r}, 'r+'); d.pwrite(b'x', 0); d.flush(); os._exit(0)"],
                   check=True, env=dict(os.environ, PYTHONPATH=os.getcwd()))
    assert _bitmap_flags(p) == {"good": ["in-use", "auto"]}
    assert Q.img("bitmap", "--add", p, "fresh").returncode == 0  # QEMU adds a consistent one beside it
    twin = tmp_path / "twin.qcow2"
    shutil.copy(p, twin)
    with qcowpy.open(str(p), "r+") as d:
        d.pwrite(b"y" * 5000, 2 * MiB)
    Q.io(twin, "write 2M 5000")
    assert _bitmap_flags(p) == _bitmap_flags(twin) == {"good": ["in-use", "auto"], "fresh": ["auto"]}
    assert Q.dirty_map(p, "fresh") == Q.dirty_map(twin, "fresh") == [(2 * MiB, 65536)]
    from tests.cli.helpers import qcowpy as run
    got = run("bitmap", "--remove", p, "good")
    assert got.code == 0, got.err
    assert _bitmap_flags(p) == {"fresh": ["auto"]}
    Q.assert_clean(p)


def test_stale_bitmaps_of_a_program_without_bitmap_support_are_dropped(tmp_path):
    """An image whose bitmaps autoclear bit was cleared (older qcowpy did that): opening it for
    writing drops the extension as QEMU does; check -r then repairs the leaked clusters."""
    p = tmp_path / "a.qcow2"
    _make(p, 8 * MiB, 65536, [("b", None, False)])
    raw = bytearray(p.read_bytes()[:104])
    auto = int.from_bytes(raw[88:96], "big") & ~1
    with open(p, "r+b") as f:
        f.seek(88)
        f.write(auto.to_bytes(8, "big"))
    twin = tmp_path / "twin.qcow2"
    shutil.copy(p, twin)
    with qcowpy.open(str(p), "r+") as d:
        d.pwrite(b"z", 0)
    Q.io(twin, "write 0 1")
    assert Q.bitmaps(p) == Q.bitmaps(twin) == []
    from tests.cli.helpers import qcowpy as run
    mine, theirs = run("check", "-r", "all", p), Q.img("check", "-r", "all", twin)
    assert (mine.code, mine.out) == (theirs.returncode, theirs.stdout)


def test_nbd_export_writes_are_marked(tmp_path):
    """``qcowpy nbd`` serving the image read-write: qemu-io's writes and zero writes over NBD mark
    the bitmaps (trims are ignored without --discard=unmap, as qemu-nbd ignores them and QEMU
    then marks nothing); stored when the server exits."""
    p = tmp_path / "a.qcow2"
    size = 16 * MiB
    _make(p, size, 65536, [("b", 4096, False)])
    sock = tmp_path / "s.sock"
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [os.getcwd(), os.environ.get("PYTHONPATH")])))
    server = subprocess.Popen([sys.executable, "-m", "qcowpy", "nbd", "-f", "qcow2", "-k", str(sock), str(p)],
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env)
    try:
        import time
        deadline = time.monotonic() + 30
        while not sock.exists():
            assert server.poll() is None and time.monotonic() < deadline, "qcowpy nbd did not start"
            time.sleep(0.05)
        out = subprocess.run([Q.tool("qemu-io"), "-f", "raw", "-c", "write 1M 5000", "-c", "write -z 3M 8k",
                              "-c", "discard 8M 64k", f"nbd+unix:///?socket={sock}"], capture_output=True, text=True)
        assert out.returncode == 0, out.stderr
    finally:
        server.wait(timeout=30)  # a served client's disconnect ends qcowpy nbd (no -t), as qemu-nbd
    model = Model(size, {"b": (4096, True)})
    model.write(MiB, 5000)
    model.write(3 * MiB, 8192)
    model.assert_qemu_agrees(p)


def test_emulator_guest_writes_are_marked(tmp_path):
    """A guest writing through the emulator's virtio-blk device marks the bitmaps."""
    from qcowpy.emu.guest import workloads as wl
    from qcowpy.emu.guest.system import boot
    from qcowpy.emu.machine import create_machine
    p = tmp_path / "a.qcow2"
    size = 4 * MiB
    _make(p, size, 65536, [("b", 512, False), ("d", None, True)])
    m = create_machine("mini-pc", "64M")
    m.drive_add(str(p), format="qcow2", id="d0")
    _, disks, _ = boot(m)
    ok, lines = wl.pattern_test(disks[0], 0x8000, 0x10000, seed=5)
    assert ok, lines
    m.shutdown()
    model = Model(size, {"b": (512, True), "d": (65536, False)})
    model.write(0x8000, 0x10000)
    model.assert_qemu_agrees(p)


@pytest.mark.parametrize("seed", range(int(os.environ.get("QCOWPY_BITMAP_SEEDS", "4"))))
def test_random_sessions_of_writes_and_bitmap_operations(tmp_path, seed):
    """Several open/close sessions of random writes, zero writes, discards and bitmap operations
    (add, remove, clear, enable, disable, merge) through the API, against a model of every
    bitmap's granularity, enabled state, dirty granules and directory order (QEMU's: kept
    entries in place, each session's new bitmaps newest first); QEMU must read it all back."""
    rng = random.Random(seed)
    size = rng.choice([8, 20, 33]) * MiB + rng.choice([0, 512])
    cs = rng.choice([4096, 65536])
    p = tmp_path / "a.qcow2"
    assert Q.img("create", "-q", "-f", "qcow2", "-o", f"cluster_size={cs}", p, size).returncode == 0
    order: list[str] = []
    model = Model(size, {})
    counter = 0
    for _session in range(4):
        new: list[str] = []
        with qcowpy.open(str(p), "r+") as d:
            for _ in range(25):
                op = rng.choice(["write", "write", "zero", "discard", "add", "add", "remove", "clear", "toggle", "merge"])
                names = list(model.bitmaps)
                if op in ("write", "zero", "discard"):
                    off = rng.randrange(0, size - 1)
                    n = min(size - off, rng.choice([1, 512, 5000, 70000, MiB]))
                    if op == "write":
                        d.pwrite(b"\x5a" * n, off)
                    elif op == "zero":
                        d.write_zeroes(n, off)
                    else:
                        d.discard(n, off)
                    model.write(off, n)
                elif op == "add":
                    counter += 1
                    name, gran = f"bm{counter}", rng.choice([512, 4096, 65536, MiB])
                    disabled = rng.random() < 0.3
                    d.bitmap_op("add", name.encode(), granularity=gran, disabled=disabled)
                    model.bitmaps[name] = (gran, not disabled)
                    model.dirty[name] = set()
                    new.append(name)
                elif names and op == "remove":
                    name = rng.choice(names)
                    d.bitmap_op("remove", name.encode())
                    del model.bitmaps[name], model.dirty[name]
                    (new if name in new else order).remove(name)
                elif names and op == "clear":
                    name = rng.choice(names)
                    d.bitmap_op("clear", name.encode())
                    model.dirty[name] = set()
                elif names and op == "toggle":
                    name = rng.choice(names)
                    gran, enabled = model.bitmaps[name]
                    d.bitmap_op("disable" if enabled else "enable", name.encode())
                    model.bitmaps[name] = (gran, not enabled)
                elif names and op == "merge":
                    dst, src = rng.choice(names), rng.choice(names)
                    d.bitmap_op("merge", dst.encode(), source_name=src.encode())
                    gd, gs = model.bitmaps[dst][0], model.bitmaps[src][0]
                    for g in list(model.dirty[src]):
                        model.dirty[dst] |= Q.granules(g * gs, min(size, (g + 1) * gs) - g * gs, gd)
        order += list(reversed(new))
        assert [b["name"] for b in Q.bitmaps(p)] == order
    model.assert_qemu_agrees(p)


def test_only_inconsistent_bitmaps_write_nothing_more_than_qemu(tmp_path):
    """An image whose every bitmap is in_use: a write changes the data and nothing of the bitmaps,
    byte for byte what qemu-io leaves after the same write."""
    p = tmp_path / "a.qcow2"
    _make(p, 16 * MiB, 65536, [("a", None, False), ("b", 4096, True)])
    subprocess.run([sys.executable, "-c", "import qcowpy, os\n"
                    f"d = qcowpy.open({str(p)!r}, 'r+'); d.pwrite(b'x', 0); d.flush(); os._exit(0)"],
                   check=True, env=dict(os.environ, PYTHONPATH=os.getcwd()))
    twin = tmp_path / "twin.qcow2"
    shutil.copy(p, twin)
    with qcowpy.open(str(p), "r+") as d:
        d.pwrite(b"x" * 10, 5000)
    Q.io(twin, "write -P 0x78 5000 10")
    assert p.read_bytes() == twin.read_bytes()
