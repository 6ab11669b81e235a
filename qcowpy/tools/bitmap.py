"""``bitmap``: qemu-img's img_bitmap — a list of operations on one persistent bitmap of an image.

The image is opened read-write without its backing chain; ``--merge`` reads a source bitmap
from the same image or from ``-b FILE`` (opened read-only). Operations run in the order given;
the first failure stops the list, and what the earlier ones did is kept (stored at close), as
in qemu-img.
"""
from __future__ import annotations

from ..block.open import open_image
from ..errors import QcowError


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
