"""Crash safety, proven by fault injection (docs/architecture.md "Crash-safety contract").

Each workload runs once on a recording host file; then for chosen crash points ``k`` the disk
image a power loss could leave is rebuilt — everything before the last barrier, plus either all
or a random subset of the writes issued since — and we assert:

* our check finds no corruption and no internal error (leaks are allowed);
* every guest byte acknowledged by a completed flush reads back (bytes written since the last
  completed flush may read old or new);
* for lazy_refcounts images, which may legitimately be inconsistent while dirty, the automatic
  repair done by a read-write open leaves a clean image with the acknowledged data;
* in the interop variant, ``qemu-img check`` agrees (exit 0 or 3) on a sample of crash images.

Default suite: a few hundred crash points. ``pytest -m torture tests/crash`` runs tens of
thousands (more seeds, every crash point, many random subsets); ``QCOWPY_TORTURE_SEEDS=N`` scales it.
"""
from __future__ import annotations

import os
import random
import subprocess

import pytest

from qcowpy.format import constants as C
from qcowpy.format.header import parse_header
from qcowpy.qcow2.check import FIX_ERRORS, FIX_LEAKS, check_file

from .harness import MemBacking, RecordingFile, compare_acknowledged, open_on
from .workloads import WORKLOADS, Recorded, record


def verify(rec: Recorded, k: int, keep=None) -> bytes:
    """Check one simulated crash; returns the crash image bytes."""
    disk = rec.file.crash_image(k, keep)
    backing = MemBacking(rec.backing) if rec.backing else None
    mem = RecordingFile(disk)
    header = parse_header(mem.pread(min(mem.size(), 1 << 21), 0), mem.size())
    where = f"{rec.name} crash after op {k}/{len(rec.file.ops)}"
    if header.incompatible_features & C.INCOMPAT_DIRTY:
        assert rec.name == "lazy", f"{where}: dirty bit on a non-lazy image"
        img = open_on(mem, True, backing)  # repairs, as QEMU does on a read-write open
        img.close()
        header = parse_header(mem.pread(min(mem.size(), 1 << 21), 0), mem.size())
        assert not header.incompatible_features & C.INCOMPAT_DIRTY, where
    res = check_file(mem, header, 0)
    assert res.corruptions == 0 and res.check_errors == 0, f"{where}: {res.messages[:10]}"
    img = open_on(mem, False, backing)
    try:
        want, unsure = rec.model.acknowledged(k)
        got = img.pread(min(img.size, len(want)), 0)
    finally:
        img.close()
    bad = compare_acknowledged(got, want[:len(got)], unsure)
    assert bad is None, f"{where}: acknowledged byte at guest offset {bad} lost"
    return bytes(mem.buf)


def crash_points(rec: Recorded, limit: int | None, rng: random.Random) -> list[int]:
    n = len(rec.file.ops)
    points = list(range(0, n + 1))
    if limit is None or limit >= len(points):
        return points
    return sorted(rng.sample(points, limit))


def run_points(rec: Recorded, points: list[int], subsets: int, rng: random.Random) -> int:
    count = 0
    for k in points:
        verify(rec, k)
        count += 1
        start = rec.file.durable_at(k)
        if k - start > 1:
            for _ in range(subsets):
                chosen = {i for i in range(start, k) if rng.random() < 0.5}
                verify(rec, k, chosen.__contains__)
                count += 1
    return count


@pytest.mark.parametrize("name", sorted(WORKLOADS))
def test_crash_points(name):
    rng = random.Random(name)
    rec = record(name, seed=1, nops=30)
    n = run_points(rec, crash_points(rec, 60, rng), subsets=1, rng=rng)
    assert n >= 60


@pytest.mark.interop
@pytest.mark.parametrize("name", ["alloc", "backing_cow", "compressed", "lazy", "extended_l2", "refgrow"])
def test_crash_points_qemu_agrees(name, tmp_path, qemu_img):
    rng = random.Random("qemu" + name)
    rec = record(name, seed=2, nops=20)
    if rec.backing:
        (tmp_path / rec.header_backing).write_bytes(rec.backing)
    n = len(rec.file.ops)
    for k in sorted(rng.sample(range(n + 1), min(8, n + 1))):
        disk = rec.file.crash_image(k)
        path = tmp_path / "crash.qcow2"
        path.write_bytes(disk)
        args = [qemu_img, "check", "-f", "qcow2", str(path)]
        hdr = parse_header(disk[:1 << 16], len(disk))
        if hdr.incompatible_features & C.INCOMPAT_DIRTY:
            # QEMU repairs a dirty image when it opens it read-write; do that, then check
            subprocess.run([qemu_img, "check", "-r", "all", str(path)], capture_output=True)
        p = subprocess.run(args, capture_output=True, text=True)
        assert p.returncode in (0, 3), f"{name} crash at {k}: qemu-img check exit {p.returncode}\n{p.stdout}{p.stderr}"
        verify(rec, k)


@pytest.mark.torture
@pytest.mark.parametrize("name", sorted(WORKLOADS))
def test_crash_torture(name):
    seeds = int(os.environ.get("QCOWPY_TORTURE_SEEDS", "6"))
    total = 0
    for seed in range(100, 100 + seeds):
        rng = random.Random(seed)
        rec = record(name, seed=seed, nops=80)
        total += run_points(rec, crash_points(rec, None, rng), subsets=4, rng=rng)
    print(f"{name}: {total} crash images verified")
    assert total > 0
