"""Persistent dirty bitmaps as NBD ``qemu:dirty-bitmap:NAME`` contexts (qemu-nbd -B, QSD ``bitmaps``).

The server needs one thing from the block layer: the dirty runs of a named bitmap over a range. A
device offers it as ``dirty_extents(name, offset, length) -> [(start, length, dirty), ...]``; a
device without that method (the engine cannot read bitmap data yet) refuses ``-B`` with a clear
message rather than export a map it cannot read. Writes through the export do not update the
bitmap here, so a bitmap is exported only on a read-only export (QEMU keeps an enabled bitmap
up to date on writes; it refuses enabled bitmaps on read-only exports of writable nodes instead).
"""
from __future__ import annotations

from functools import partial
from typing import Any

from ..keyval import OptionError
from .export import DirtyExtents


def bitmap_readers(dev: Any, names: list[str], writable: bool) -> dict[str, DirtyExtents]:
    """{name: reader} for the bitmaps ``names`` of ``dev``, checked as qemu-nbd checks them."""
    out: dict[str, DirtyExtents] = {}
    if not names:
        return out
    present = {b.name.decode("utf-8", "replace") for b in dev.bitmaps()}
    for name in names:
        if name not in present:
            raise OptionError(f"Bitmap '{name}' is not found")
        reader = getattr(dev, "dirty_extents", None)
        if reader is None:
            raise OptionError(f"Bitmap '{name}' cannot be read: this build does not read bitmap data yet")
        if writable:
            raise OptionError(f"Bitmap '{name}' can only be exported read-only "
                              "(writes through this server do not update it)")
        out[name] = partial(reader, name)
    return out
