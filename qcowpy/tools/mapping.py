"""``map``: qemu-img's map output (human and JSON) built from BlockDevice.block_status."""
from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Iterator

from ..block.device import BlockDevice
from ..errors import QcowError
from ..units import c_hex


class MapError(QcowError):
    pass


@dataclass
class MapEntry:
    start: int
    length: int
    depth: int = 0
    present: bool = False
    zero: bool = False
    data: bool = False
    offset: int | None = None
    filename: str | None = None


def _mergeable(curr: MapEntry, nxt: MapEntry) -> bool:
    """qemu-img's entry_mergeable."""
    if curr.length == 0:
        return False
    if (curr.zero != nxt.zero or curr.data != nxt.data or curr.depth != nxt.depth or curr.present != nxt.present
            or (curr.filename is None) != (nxt.filename is None) or (curr.offset is None) != (nxt.offset is None)):
        return False
    if curr.filename is not None and curr.filename != nxt.filename:
        return False
    if curr.offset is not None and curr.offset + curr.length != nxt.offset:
        return False
    return True


def entries(dev: BlockDevice, start: int = 0, max_length: int | None = None) -> Iterator[MapEntry]:
    """Raw status runs of ``dev`` from ``start`` (the unmerged input of map)."""
    end = dev.size if max_length is None else min(start + max_length, dev.size)
    pos = start
    while pos < end:
        for e in dev.block_status(pos, end - pos):
            yield MapEntry(e.start, e.length, e.depth, e.present, e.zero, e.data, e.offset,
                           e.filename if e.offset is not None else None)
            pos = e.start + e.length


def _json(e: MapEntry) -> str:
    s = (f'{{ "start": {e.start}, "length": {e.length}, "depth": {e.depth}, '
         f'"present": {_b(e.present)}, "zero": {_b(e.zero)}, "data": {_b(e.data)}')
    if e.offset is not None:
        s += f', "offset": {e.offset}'
    return s + "}"


def _b(v: bool) -> str:
    return "true" if v else "false"


def _human(e: MapEntry) -> str | None:
    if e.data and e.offset is None:
        raise MapError("File contains external, encrypted or compressed clusters.")
    if e.data and not e.zero:
        return "%-16s%-16s%-16s%s\n" % (c_hex(e.start), c_hex(e.length), c_hex(e.offset or 0), e.filename or "")
    return None


def map_lines(dev: BlockDevice, output: str = "human", start: int = 0,
              max_length: int | None = None) -> Iterator[str]:
    """The text of ``qemu-img map`` for ``dev``, in pieces (merge rules of qemu-img)."""
    human = output == "human"
    if human:
        yield "%-16s%-16s%-16s%s\n" % ("Offset", "Length", "Mapped to", "File")
    else:
        yield "["
    curr = MapEntry(start, 0)
    for nxt in entries(dev, start, max_length):
        if _mergeable(curr, nxt):
            curr.length += nxt.length
            continue
        if curr.length > 0:
            if human:
                line = _human(curr)
                if line:
                    yield line
                if not nxt.data or nxt.zero:
                    nxt = replace(nxt, data=False, zero=True)
            else:
                yield _json(curr) + ",\n"
        curr = nxt
    if human:
        line = _human(curr)
        if line:
            yield line
    else:
        yield _json(curr) + "]\n"
