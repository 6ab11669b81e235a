"""Deterministic guest workloads that exercise every allocating path of the engine."""
from __future__ import annotations

import os
import random
import tempfile
from dataclasses import dataclass

import qcowpy
from qcowpy.qcow2 import snapshot
from qcowpy.qcow2.resize import resize

from .harness import GuestModel, MemBacking, RecordingFile, open_on


@dataclass
class Recorded:
    name: str
    file: RecordingFile
    model: GuestModel
    backing: bytes | None
    header_backing: str | None
    extended: bool = False


def _pattern(rng: random.Random, n: int) -> bytes:
    b = rng.randrange(1, 256)
    return bytes([b]) * n if rng.random() < 0.5 else rng.randbytes(n)


def _base_image(size: int, backing_name: str | None, **opts) -> bytes:
    with tempfile.TemporaryDirectory() as d:
        p = os.path.join(d, "base.qcow2")
        if backing_name:
            with open(os.path.join(d, backing_name), "wb") as f:
                f.truncate(size)
            qcowpy.create(p, size, backing_file=backing_name, backing_fmt="raw", **opts)
        else:
            qcowpy.create(p, size, **opts)
        with open(p, "rb") as f:
            return f.read()


WORKLOADS = {
    # name: (image size, create options, uses backing, op mix)
    "alloc": (1 << 20, dict(cluster_size=512, refcount_bits=64), False, "wwwwzdf"),
    "refgrow": (4 << 20, dict(cluster_size=512, refcount_bits=64), False, "WWWwf"),
    "backing_cow": (512 << 10, dict(cluster_size=4096), True, "wwwzdf"),
    "compressed": (512 << 10, dict(cluster_size=4096), False, "cccwzdf"),
    "zero_discard_v2": (512 << 10, dict(cluster_size=1024, compat="0.10"), True, "wwzdddf"),
    "lazy": (1 << 20, dict(cluster_size=1024, lazy_refcounts=True), False, "wwwzdcf"),
    "l1_growth": (64 << 10, dict(cluster_size=512), False, "rwwwf"),
    "extended_l2": (512 << 10, dict(cluster_size=16384, extended_l2=True), True, "wwwzdcf"),
    # snapshot create (s), apply (a) and delete (x) among guest writes: each switches at one header write
    "snapshots": (256 << 10, dict(cluster_size=4096), False, "wwwzcsaxsf"),
    "snapshots_ext": (256 << 10, dict(cluster_size=16384, extended_l2=True), True, "wwzsaxsf"),
}


def record(name: str, seed: int, nops: int = 40) -> Recorded:
    size, opts, uses_backing, mix = WORKLOADS[name]
    rng = random.Random(f"{name}-{seed}")
    backing = rng.randbytes(size) if uses_backing else None
    base = _base_image(size, "backing.raw" if uses_backing else None, **opts)
    file = RecordingFile(base)
    model = GuestModel(size, backing or b"")
    img = open_on(file, True, MemBacking(backing) if backing else None)
    cs = img.cluster_size
    cur_size = size
    snaps: dict[str, bytes] = {}  # name -> guest contents when it was taken
    for _ in range(nops):
        op = rng.choice(mix)
        if op in "wW":
            maxlen = 3 * cs if op == "w" else 64 * cs
            n = rng.randrange(1, maxlen)
            off = rng.randrange(0, cur_size - n) if op == "w" else rng.randrange(0, cur_size // cs) * cs
            n = min(n, cur_size - off)
            data = _pattern(rng, n)
            img.pwrite(data, off)
            model.write(file, off, data)
        elif op == "z":
            n = rng.randrange(1, 4 * cs)
            off = rng.randrange(0, cur_size - n)
            img.write_zeroes(n, off, unmap=rng.random() < 0.5)
            model.write(file, off, bytes(n))
        elif op == "d":
            n = rng.randrange(cs, 6 * cs)
            off = rng.randrange(0, cur_size - n)
            # discard: whole clusters inside the range lose their contents (zeros on v3, backing on v2)
            before = bytes(model.cur)
            img.discard(n, off)
            after = img.pread(cur_size, 0)
            model.writes.append((len(file.ops), off, n))
            model.cur[:] = after
            assert after[:off] == before[:off] and after[off + n:] == before[off + n:]
        elif op == "c":
            c = rng.randrange(0, cur_size // cs)
            data = bytes([rng.randrange(256)]) * (cs // 2) + rng.randbytes(16) + bytes(cs // 2 - 16)
            img.write_compressed(data, c * cs)
            model.write(file, c * cs, data)
        elif op == "s":
            sname = f"s{len(snaps)}-{rng.randrange(1000)}"
            snapshot.create(img, sname)
            snaps[sname] = bytes(model.cur)
        elif op == "a" and snaps:
            sname = rng.choice(sorted(snaps))
            model.write(file, 0, snaps[sname])  # unsure until the apply returns (durable then)
            snapshot.apply(img, sname)
            model.flushed(file)
        elif op == "x" and snaps:
            sname = rng.choice(sorted(snaps))
            snapshot.delete(img, sname)
            del snaps[sname]
        elif op == "r" and cur_size < (4 << 20):
            new = cur_size * 4
            resize(img, new)
            model.cur.extend(bytes(new - cur_size))
            model.size = cur_size = new
        if op == "f" or rng.random() < 0.15:
            img.flush()
            model.flushed(file)
    img.close()
    model.flushed(file)
    return Recorded(name, file, model, backing, "backing.raw" if uses_backing else None,
                    extended=opts.get("extended_l2", False))
