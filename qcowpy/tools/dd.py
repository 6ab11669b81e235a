"""``dd``: qemu-img's img_dd — copy ``count`` blocks of ``bs`` bytes, after skipping ``skip`` of
them, from an image into a new image of the output format (raw by default).

qemu-img reads and writes one block at a time; the output only depends on the bytes and their
order (every block is written, zeros included, in ascending order), so the copy here moves many
blocks per call (up to 1 MiB) and leaves the same file.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

from ..block.create import create_image, create_qcow2, qcow2_options
from ..block.open import open_image
from ..errors import QcowError
from ..units import INT64_MAX, cvtnum

_CHUNK = 1 << 20
_QEMU_ONLY = ("vmdk", "vdi", "vpc", "vhdx", "qed", "qcow", "parallels", "luks")


class DDError(QcowError):
    pass


@dataclass
class DDRequest:
    input: str | None = None
    output: str | None = None
    bs: int = 512
    count: int | None = None
    skip: int | None = None


def parse_operands(operands: list[str]) -> DDRequest:
    """``bs=``, ``count=``, ``if=``, ``of=``, ``skip=`` with qemu-img's checks and messages."""
    req = DDRequest()
    for op in operands:
        name, eq, value = op.partition("=")
        if not eq:
            raise DDError(f"unrecognized operand {op}")
        if name not in ("bs", "count", "if", "of", "skip"):
            raise DDError(f"unrecognized operand {name}")
        if name == "bs":
            req.bs = cvtnum("bs", value, 1, (1 << 31) - 1)
        elif name == "count":
            req.count = cvtnum("count", value)
        elif name == "skip":
            req.skip = cvtnum("skip", value)
        elif name == "if":
            req.input = value
        else:
            req.output = value
    if req.input is None or req.output is None:
        raise DDError("Must specify both input and output files")
    return req


def run_dd(req: DDRequest, fmt: str | None = None, out_fmt: str = "raw", force_share: bool = False,
           warn: Callable[[str], None] = lambda msg: None) -> None:
    assert req.input is not None and req.output is not None
    try:
        src = open_image(req.input, "r", fmt, force_share=force_share)
    except QcowError as e:
        raise DDError(f"Could not open '{req.input}': {e}") from None
    try:
        if out_fmt not in ("raw", "qcow2"):
            if out_fmt in _QEMU_ONLY:
                raise DDError(f"Output format '{out_fmt}' is not supported by qcowpy (raw and qcow2 are)")
            raise DDError("Unknown file format")
        size = src.size
        bs = req.bs
        if req.count is not None and req.count <= INT64_MAX // bs and req.count * bs < size:
            size = req.count * bs
        skip = req.skip or 0
        beyond = req.skip is not None and (skip > INT64_MAX // bs or size < bs * skip)
        out_size = 0 if beyond else size - bs * skip
        try:
            if out_fmt == "qcow2":
                create_qcow2(req.output, qcow2_options(out_size))
            else:
                create_image(req.output, out_size, "raw")
        except QcowError as e:
            raise DDError(f"{req.output}: error while creating output image: {e}") from None
        dst = open_image(req.output, "r+", out_fmt, backing=False)
        try:
            if beyond:  # like dd(1): a warning and an empty output
                warn(f"{req.input}: cannot skip to specified offset")
                in_pos = size
            else:
                in_pos = skip * bs
            out_pos = 0
            step = max(bs, _CHUNK - _CHUNK % bs)
            while in_pos < size:
                n = min(step, size - in_pos)
                dst.pwrite(src.pread(n, in_pos), out_pos)
                in_pos += n
                out_pos += n
        finally:
            dst.close()
    finally:
        src.close()
