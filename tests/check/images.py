"""Build qcow2 images with qemu-img/qemu-io and damage them in precise places (iotests 060/108/138 style)."""
from __future__ import annotations

import struct
import subprocess

from qcowpy.format import constants as C
from qcowpy.format.header import parse_header
from qcowpy.format.refcount import get_refcount, set_refcount


def sh(*argv: str) -> str:
    p = subprocess.run([str(a) for a in argv], capture_output=True, text=True)
    assert p.returncode == 0, f"{argv}: {p.stdout}{p.stderr}"
    return p.stdout


def create(path, size="4M", *io_cmds: str, **opts) -> str:
    o = ",".join(f"{k}={v}" for k, v in opts.items())
    sh("qemu-img", "create", "-q", "-f", "qcow2", *(["-o", o] if o else []), path, size)
    if io_cmds:
        argv = ["qemu-io", "-f", "qcow2"]
        for c in io_cmds:
            argv += ["-c", c]
        sh(*argv, path)
    return str(path)


def header(path):
    with open(path, "rb") as f:
        buf = f.read(1 << 16)
    import os
    return parse_header(buf, os.path.getsize(path))


def peek(path, off: int, n: int) -> bytes:
    with open(path, "rb") as f:
        f.seek(off)
        return f.read(n)


def poke(path, off: int, data: bytes) -> None:
    with open(path, "r+b") as f:
        f.seek(off)
        f.write(data)


def u64(path, off: int) -> int:
    return struct.unpack(">Q", peek(path, off, 8))[0]


def poke64(path, off: int, value: int) -> None:
    poke(path, off, struct.pack(">Q", value))


def flip64(path, off: int, set_bits: int = 0, clear_bits: int = 0) -> None:
    """Set and clear bits of the big-endian 64-bit entry at ``off`` (table-entry surgery)."""
    poke64(path, off, (u64(path, off) | set_bits) & ~clear_bits)


def l1_entry_offset(path, index: int = 0) -> int:
    return header(path).l1_table_offset + 8 * index


def l2_table(path, l1_index: int = 0) -> int:
    return u64(path, l1_entry_offset(path, l1_index)) & C.L1E_OFFSET_MASK


def l2_entry_offset(path, guest_cluster: int, l1_index: int = 0) -> int:
    h = header(path)
    width = 16 if h.extended_l2 else 8
    return l2_table(path, l1_index) + width * guest_cluster


def refblock_of(path, cluster: int) -> tuple[int, int]:
    """(refblock offset, index in block) for a host cluster."""
    h = header(path)
    per = 1 << (h.cluster_bits + 3 - h.refcount_order)
    rt = u64(path, h.refcount_table_offset + 8 * (cluster // per)) & ~0x1FF
    return rt, cluster % per


def set_rc(path, cluster: int, value: int) -> None:
    h = header(path)
    off, idx = refblock_of(path, cluster)
    block = bytearray(peek(path, off, h.cluster_size))
    set_refcount(block, idx, h.refcount_order, value)
    poke(path, off, bytes(block))


def get_rc(path, cluster: int) -> int:
    h = header(path)
    off, idx = refblock_of(path, cluster)
    return get_refcount(peek(path, off, h.cluster_size), idx, h.refcount_order)
