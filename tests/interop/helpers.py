"""Helpers shared by the interop tests: comparing qcowpy against qemu-img output."""
from __future__ import annotations

import os

import qcowpy


def first_diff(a: bytes, b: bytes) -> int | None:
    if a == b:
        return None
    if len(a) != len(b):
        n = min(len(a), len(b))
        return next((i for i in range(n) if a[i] != b[i]), n)
    # find the first differing offset quickly
    step = 1 << 16
    for base in range(0, len(a), step):
        if a[base:base + step] != b[base:base + step]:
            for i in range(base, min(base + step, len(a))):
                if a[i] != b[i]:
                    return i
    return None  # pragma: no cover


def assert_same_bytes(got: bytes, want: bytes, what: str = "") -> None:
    off = first_diff(got, want)
    assert off is None, (f"{what}: contents differ at offset {off} (len got {len(got)}, want {len(want)}); "
                         f"got {got[off:off + 16].hex()} want {want[off:off + 16].hex()}")


def read_all_qcowpy(path: str, chunk: int | None = None) -> bytes:
    with qcowpy.open(path) as dev:
        if chunk is None:
            return dev.pread(dev.size, 0)
        return b"".join(dev.pread(min(chunk, dev.size - o), o) for o in range(0, dev.size, chunk))


def read_all_qcowpy_into(path: str, step: int) -> bytes:
    """The whole device through ``preadinto`` in odd-sized pieces, into a buffer pre-filled with 0xaa
    (so a piece the driver forgets to fill shows)."""
    with qcowpy.open(path) as dev:
        buf = bytearray(b"\xaa") * dev.size
        view = memoryview(buf)
        for o in range(0, dev.size, step):
            dev.preadinto(view[o:o + step], o)
        return bytes(buf)


def assert_reads_like_qemu(qemu, path: str, tmp_path, chunk: int | None = None) -> bytes:
    """qcowpy.open(path).pread(size, 0) — and preadinto in odd pieces — must equal
    ``qemu-img convert -O raw`` of the same file."""
    raw = os.path.join(str(tmp_path), os.path.basename(path) + ".oracle.raw")
    want = qemu.to_raw(path, raw)
    got = read_all_qcowpy(path, chunk)
    assert_same_bytes(got, want, f"qcowpy read of {path} vs qemu-img convert -O raw")
    got = read_all_qcowpy_into(path, 3 * 65536 + 1000 + 7)
    assert_same_bytes(got, want, f"qcowpy preadinto of {path} vs qemu-img convert -O raw")
    return want


def merge_map(entries: list[dict]) -> list[dict]:
    """Merge adjacent entries as qemu-img map does (on the fields its JSON shows)."""
    out: list[dict] = []
    for e in entries:
        e = {k: e[k] for k in ("start", "length", "depth", "present", "zero", "data", "offset") if k in e}
        if out:
            c = out[-1]
            same = all(c[k] == e[k] for k in ("depth", "present", "zero", "data")) and \
                ("offset" in c) == ("offset" in e) and c["start"] + c["length"] == e["start"]
            if same and ("offset" not in c or c["offset"] + c["length"] == e["offset"]):
                c["length"] += e["length"]
                continue
        out.append(dict(e))
    return out


def qcowpy_map(path: str) -> list[dict]:
    with qcowpy.open(path) as dev:
        entries = []
        for x in dev.block_status(0, dev.size):
            e = {"start": x.start, "length": x.length, "depth": x.depth, "present": x.present,
                 "zero": x.zero, "data": x.data}
            if x.offset is not None:
                e["offset"] = x.offset
            entries.append(e)
    return merge_map(entries)


def assert_map_like_qemu(qemu, path: str) -> None:
    """Compare merged block_status with merged ``qemu-img map --output=json`` (including the
    zero+data runs QEMU reports where a metadata-preallocated image's clusters sit on holes)."""
    want = merge_map(qemu.map_json(path))
    got = qcowpy_map(path)
    if got != want:
        for i, (g, w) in enumerate(zip(got, want)):
            if g != w:
                raise AssertionError(f"block_status of {path} differs from qemu-img map at entry {i}:\n"
                                     f" qcowpy: {g}\n qemu:   {w}\n(qcowpy {len(got)} entries, qemu {len(want)})")
        raise AssertionError(f"block_status of {path}: {len(got)} entries vs qemu-img map {len(want)}:\n"
                             f"{got[-3:]}\n{want[-3:]}")
