"""Random sequences of guest writes, snapshots and resizes, run side by side: qemu-img on one copy,
qcowpy on the other (guest writes go to both through qemu-io). After every step the two files must
be the same disk to qemu-img (contents, snapshots and their contents; helpers.assert_same_disks),
ours must pass ``qemu-img check`` without a leak, and both tools must have said the same thing.
A few seeds run by default; ``-m torture`` runs many more and longer sequences.
"""
from __future__ import annotations

import random

import pytest

from .helpers import as_qemu, assert_same_disks, image_pair, qcowpy as run, qemu

MiB = 1 << 20
LAYOUTS = [[], ["-o", "cluster_size=4k"], ["-o", "extended_l2=on,cluster_size=16k"], ["-o", "compat=0.10"],
           ["-o", "refcount_bits=2,cluster_size=1k"]]


def _sizes(opts) -> int:
    return 64 * MiB if "compat=0.10" not in " ".join(opts) else 32 * MiB


def _step(rng: random.Random, size: int, names: list[str], v2: bool) -> tuple[str, list[str]]:
    """One operation: ("io", [qemu-io command]) or ("img", [qemu-img arguments before the file])."""
    roll = rng.random()
    if roll < 0.45:
        off = rng.randrange(0, size, 512)
        n = min(size - off, rng.choice([512, 4096, 65536, 300 * 1024, 2 * MiB]))
        kind = rng.choice(["write -P %d" % rng.randrange(1, 255), "write -z", "discard"])
        return "io", [f"{kind} {off} {n}"]
    if roll < 0.6:
        return "img", ["snapshot", "-c", f"s{rng.randrange(1000)}"]
    if roll < 0.7 and names:
        return "img", ["snapshot", "-a", rng.choice(names)]
    if roll < 0.8 and names:
        return "img", ["snapshot", "-d", rng.choice(names)]
    if v2 and names:  # v2 images with snapshots cannot be resized: both tools refuse
        return "img", ["resize", "+1M"]
    delta = rng.choice(["+1M", "+37M", "--shrink -3M", "--shrink -512k", "+64k"])
    return "img", ["resize", *delta.split()]


def _io(qemu_img, path, command: str) -> tuple[int, str]:
    import os
    import subprocess
    exe = os.path.join(os.path.dirname(qemu_img), "qemu-io")
    p = subprocess.run([exe, "-f", "qcow2", "-c", command, str(path)], capture_output=True, text=True)
    first = (p.stdout + p.stderr).splitlines()[:1]  # the timing line differs from run to run
    return p.returncode, first[0] if first and "failed" in first[0] else ""


def _names(qemu_img, path) -> list[str]:
    lines = qemu(qemu_img, "snapshot", "-l", path).out.splitlines()[2:]
    return [line.split()[1] for line in lines if line.split()]


def _run_sequence(tmp_path, qemu_img, opts, seed: int, steps: int) -> None:
    rng = random.Random(seed)
    a, b = image_pair(tmp_path, qemu_img, opts, str(_sizes(opts)), ["write -P 9 0 1M"])
    size = _sizes(opts)
    v2 = "compat=0.10" in " ".join(opts)
    for i in range(steps):
        what, args = _step(rng, size, _names(qemu_img, a), v2)
        if what == "io":  # may fail alike on both (a COW write whose refcount would overflow)
            ra, rb = (_io(qemu_img, p, args[0]) for p in (a, b))
            assert ra == rb, (seed, i, args)
        else:
            cmd, *rest = args
            head, tail = (rest[:-1], [rest[-1]]) if cmd == "resize" else (rest, [])
            want = qemu(qemu_img, cmd, *head, a, *tail)
            got = run(cmd, *head, b, *tail)
            assert (got.code, got.out, as_qemu(got.err)) == (want.code, want.out, want.err), (seed, i, args)
            if cmd == "resize" and want.code == 0:
                size = int(qemu(qemu_img, "info", "--output=json", a).out.split('"virtual-size": ')[1].split(",")[0])
        assert_same_disks(qemu_img, a, b, f"seed {seed}, step {i}: {what} {args}")
    # QEMU may end with leaks (refcount_bits=2: a third reference overflows half-way); we may not
    theirs = qemu(qemu_img, "check", a)
    assert theirs.code in (0, 3), theirs.out + theirs.err


@pytest.mark.parametrize("layout", range(len(LAYOUTS)))
def test_random_sequences(tmp_path, qemu_img, layout):
    _run_sequence(tmp_path, qemu_img, LAYOUTS[layout], seed=layout, steps=25)


@pytest.mark.torture
@pytest.mark.parametrize("seed", range(40))
def test_random_sequences_torture(tmp_path, qemu_img, seed):
    _run_sequence(tmp_path, qemu_img, LAYOUTS[seed % len(LAYOUTS)], seed=100 + seed, steps=80)
