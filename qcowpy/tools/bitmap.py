"""``bitmap``: qemu-img's img_bitmap — a list of operations on one persistent bitmap of an image.

The image is opened read-write without its backing chain; ``--merge`` reads a source bitmap
from the same image or from ``-b FILE`` (opened read-only). Operations run in the order given;
the first failure stops the list, and what the earlier ones did is kept (stored at close), as
in qemu-img.
"""
from __future__ import annotations

from typing import Callable

from ..block.device import BlockDevice
from ..block.open import open_image
from ..errors import QcowError, with_hint


def run_bitmap(filename: str, fmt: str | None, name: str, actions: list[tuple[str, str | None]],
               granularity: int | None = None, source: str | None = None,
               source_fmt: str | None = None) -> None:
    """Apply ``actions`` ((op, merge source name or None), ...) to bitmap ``name`` of ``filename``."""
    bname = name.encode("utf-8", "surrogateescape")
    try:
        dev = open_image(filename, "r+", fmt, backing=False)
    except QcowError as e:
        raise QcowError(f"Could not open '{filename}': {e}") from None
    with dev:
        src = None
        if source is not None:
            try:
                src = open_image(source, "r", source_fmt, backing=False)
            except QcowError as e:
                raise QcowError(f"Could not open '{source}': {e}") from None
        try:
            for op, arg in actions:
                try:
                    if op == "merge":
                        dev.bitmap_op(op, bname, source=src, source_name=(arg or "").encode("utf-8", "surrogateescape"))
                    else:
                        dev.bitmap_op(op, bname, granularity=granularity)
                except QcowError as e:
                    raise QcowError(f"Operation {op} on bitmap {name} failed: {e}") from None
        finally:
            if src is not None:
                src.close()


def check_copyable(src: BlockDevice, skip_broken: bool) -> None:
    """qemu-img convert --bitmaps' check of its single source (convert_check_bitmaps)."""
    if not src.supports_bitmaps:
        raise QcowError("Source lacks bitmap support")
    for bm in reversed(src.bitmaps()):  # QEMU walks a bitmap list built by inserting at the head
        if bm.in_use and not skip_broken:
            raise QcowError(with_hint(f"Cannot copy inconsistent bitmap '{_name(bm.name)}'",
                                      "Try --skip-broken-bitmaps, or use 'qemu-img bitmap --remove' to delete it"))


def copy_bitmaps(src: BlockDevice, dst: BlockDevice, skip_broken: bool, warn: Callable[[str], None]) -> None:
    """Add each of the source's persistent bitmaps to ``dst`` (same granularity and enabled
    state) and merge the source's bits into it (convert_copy_bitmaps); inconsistent ones are
    skipped with a warning (``--skip-broken-bitmaps``). Added newest-first, the target stores
    them in the source's order, as QEMU does."""
    for bm in reversed(src.bitmaps()):
        name = _name(bm.name)
        if skip_broken and bm.in_use:
            warn(f"Skipping inconsistent bitmap '{name}'")
            continue
        try:
            dst.bitmap_op("add", bm.name, granularity=1 << bm.granularity_bits, disabled=not bm.enabled)
        except QcowError as e:
            raise QcowError(f"Failed to create bitmap {name}: {e}") from None
        try:
            dst.bitmap_op("merge", bm.name, source=src, source_name=bm.name)
        except QcowError as e:
            dst.bitmap_op("remove", bm.name)
            raise QcowError(f"Failed to populate bitmap {name}: {e}") from None


def _name(raw: bytes) -> str:
    return raw.decode("utf-8", "replace")
