"""Persistent dirty bitmaps as NBD ``qemu:dirty-bitmap:NAME`` contexts (qemu-nbd -B, QSD ``bitmaps``).

The server needs one thing from the block layer: ``bitmap_dirty(name: bytes) -> [(offset, length),
...]``, the dirty ranges of a persistent bitmap over the whole disk (the engine's bitmap API, on the
``bitmaps`` branch); a device without it (the engine cannot read bitmap data yet) refuses ``-B``
with a clear message rather than export a map it cannot read. A writable export needs an
engine that marks writes in its bitmaps (``supports_bitmaps``), else the map would go stale.
"""
from __future__ import annotations

from functools import partial
from typing import Any, Callable

from ..keyval import OptionError
from .export import DirtyExtents


def bitmap_readers(dev: Any, names: list[str], writable: bool) -> dict[str, DirtyExtents]:
    """{name: reader} for the bitmaps ``names`` of ``dev``, checked as qemu-nbd checks them."""
    out: dict[str, DirtyExtents] = {}
    if not names:
        return out
    present = {b.name.decode("utf-8", "replace"): b for b in dev.bitmaps()}
    for name in reversed(names):  # qemu-nbd prepends each -B: the last one given is context 2
        if name not in present:
            raise OptionError(f"Bitmap '{name}' is not found")
        if getattr(present[name], "in_use", False):
            raise OptionError(f"Bitmap '{name}' is inconsistent and cannot be used")
        whole = getattr(dev, "bitmap_dirty", None)
        if whole is None:
            raise OptionError(f"Bitmap '{name}' cannot be read: this build does not read bitmap data yet")
        if writable and not getattr(dev, "supports_bitmaps", False):
            raise OptionError(f"Bitmap '{name}' can only be exported read-only "
                              "(writes through this server do not update it)")
        out[name] = partial(_window, whole, name.encode())
    return out


def _window(whole: Callable[[bytes], list[tuple[int, int]]], name: bytes, offset: int,
            length: int) -> list[tuple[int, int, bool]]:
    """(start, length, dirty) runs over offset..offset+length from the whole disk's dirty ranges."""
    out: list[tuple[int, int, bool]] = []
    pos, end = offset, offset + length
    for start, n in whole(name):
        if start + n <= pos:
            continue
        if start >= end:
            break
        if start > pos:
            out.append((pos, start - pos, False))
        stop = min(start + n, end)
        out.append((max(start, pos), stop - max(start, pos), True))
        pos = stop
    if pos < end:
        out.append((pos, end - pos, False))
    return out
