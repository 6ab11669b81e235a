"""API read timings (``qcowpy.open(path).pread``) and the engine's run-based mapping against the
per-cluster reference it replaced.

Images are written by qcowpy itself (fast, no qemu needed); interop tests check that QEMU agrees
with such images. With ``--benchmark-disable`` (the default) each body runs once.
"""
from __future__ import annotations

import random

import pytest

import qcowpy
from qcowpy import kernels as K
from qcowpy.qcow2 import mapping as image_mod
from qcowpy.qcow2.mapping import _KIND, LayerExtent, cluster_pieces

MiB = 1 << 20
SIZE = 64 * MiB


@pytest.fixture(scope="module")
def full_image(tmp_path_factory) -> str:
    """64 MiB, every byte written (random data), 64 KiB clusters."""
    path = str(tmp_path_factory.mktemp("bench") / "full.qcow2")
    qcowpy.create(path, SIZE)
    rnd = random.Random(1)
    with qcowpy.open(path, "r+") as d:
        for off in range(0, SIZE, 4 * MiB):
            d.pwrite(rnd.randbytes(4 * MiB), off)
    return path


@pytest.fixture(scope="module")
def mixed_image(tmp_path_factory) -> tuple[str, bytearray]:
    """A fragmented 32 MiB image (4 KiB clusters): data, zero clusters, discards, holes; and its model."""
    path = str(tmp_path_factory.mktemp("bench") / "mixed.qcow2")
    size = 32 * MiB
    qcowpy.create(path, size, cluster_size=4096)
    model = bytearray(size)
    rnd = random.Random(7)
    with qcowpy.open(path, "r+") as d:
        for _ in range(400):
            off = rnd.randrange(size)
            n = min(rnd.randrange(1, 256 * 1024), size - off)
            op = rnd.random()
            if op < 0.6:
                data = rnd.randbytes(n)
                d.pwrite(data, off)
                model[off:off + n] = data
            elif op < 0.8:
                d.write_zeroes(n, off)
                model[off:off + n] = bytes(n)
            else:
                d.discard(n, off)
                s, e = (off + 4095) // 4096 * 4096, (off + n) // 4096 * 4096
                if e > s:
                    model[s:e] = bytes(e - s)
    return path, model


# --------------------------------------------------------------------------- correctness of the mapping path

def _per_cluster_extents(img, offset: int, length: int) -> list[LayerExtent]:
    """The mapping as the engine computed it before l2_runs: one cluster at a time, then merged."""
    out: list[list] = []
    cs = img.cluster_size
    meta = img.meta
    pos, end = offset, offset + length
    while pos < end:
        l1_index = pos >> (img.cluster_bits + meta.l2_bits)
        got = meta.l2_table(l1_index)
        cstart = pos & ~(cs - 1)
        idx = (pos >> img.cluster_bits) & (meta.l2_entries - 1)
        for t, pstart, plen, host in cluster_pieces(meta, got.data if got else None, idx):
            a, b = max(pos, cstart + pstart), min(end, cstart + pstart + plen)
            if a >= b:
                continue
            kind, h = _KIND[t], (host + (a - cstart - pstart) if host else None)
            c = out[-1] if out else None
            if c and c[0] == kind and c[1] + c[2] == a and ((c[3] is None) == (h is None)) and \
                    (h is None or c[3] + c[2] == h):
                c[2] += b - a
            else:
                out.append([kind, a, b - a, h])
        pos = cstart + cs
    return [LayerExtent(*c) for c in out]


@pytest.mark.parametrize("impl", ["cython", "python"])
def test_layer_extents_match_per_cluster_reference(mixed_image, monkeypatch, impl: str) -> None:
    path, model = mixed_image
    if impl == "python":
        monkeypatch.setattr(image_mod, "l2_runs", K.py_l2_runs)
    rnd = random.Random(3)
    with qcowpy.open(path) as d:
        img = d.image
        ranges = [(0, img.size)] + [(o, rnd.randrange(1, img.size - o + 1))
                                    for o in (rnd.randrange(img.size) for _ in range(50))]
        for off, n in ranges:
            assert img.layer_extents(off, n) == _per_cluster_extents(img, off, n)
            assert img.layer_extents(off, n, 1) == _per_cluster_extents(img, off, n)[:1]
        assert d.pread(img.size, 0) == model
        for off, n in ranges[1:]:
            assert d.pread(n, off) == model[off:off + n]


# --------------------------------------------------------------------------- timings

@pytest.mark.bench
def test_bench_pread_4k_random(benchmark, full_image) -> None:
    """256 reads of 4 KiB at random 4 KiB-aligned offsets per round."""
    offsets = [random.Random(9).randrange(SIZE // 4096) * 4096 for _ in range(256)]
    with qcowpy.open(full_image) as d:
        def run() -> int:
            total = 0
            for off in offsets:
                total += len(d.pread(4096, off))
            return total
        assert benchmark(run) == 256 * 4096


@pytest.mark.bench
def test_bench_pread_1m_sequential(benchmark, full_image) -> None:
    """The whole 64 MiB image in 1 MiB reads per round."""
    with qcowpy.open(full_image) as d:
        def run() -> int:
            total = 0
            for off in range(0, SIZE, MiB):
                total += len(d.pread(MiB, off))
            return total
        assert benchmark(run) == SIZE


@pytest.mark.bench
def test_bench_pread_1m_fragmented(benchmark, mixed_image) -> None:
    """The fragmented 32 MiB image (4 KiB clusters) in 1 MiB reads per round."""
    path, model = mixed_image
    with qcowpy.open(path) as d:
        def run() -> int:
            return sum(len(d.pread(MiB, off)) for off in range(0, len(model), MiB))
        assert benchmark(run) == len(model)


@pytest.mark.bench
def test_bench_block_status_fragmented(benchmark, mixed_image) -> None:
    """block_status over the fragmented image (what convert and map do first)."""
    path, model = mixed_image
    with qcowpy.open(path) as d:
        ext = benchmark(d.block_status)
        assert sum(e.length for e in ext) == len(model)
