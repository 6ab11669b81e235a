"""``resize``: qemu-img's img_resize flow (size forms and checks in QEMU's order)."""
from __future__ import annotations

from typing import Callable

from ..block.open import key_errors_name, open_image
from ..errors import QcowError
from ..units import INT64_MAX, parse_option_size

PREALLOC_MODES = ("off", "metadata", "falloc", "full")
SHRINK_WARNING = ("Shrinking an image will delete all data beyond the shrunken image's end. Before performing "
                  "such an operation, make sure there is no important data there.")


class ResizeError(QcowError):
    """A resize failure; ``hint`` lines follow the message unprefixed, ``warning`` as a warning."""

    def __init__(self, message: str, hint: str | None = None, warning: str | None = None):
        super().__init__(message)
        self.hint = hint
        self.warning = warning


def run_resize(filename: str, size: str, fmt: str | None = None, preallocation: str | None = None,
               shrink: bool = False, echo: Callable[[str], None] = print) -> None:
    """``qemu-img resize [-f fmt] [--preallocation=mode] [--shrink] filename [+|-]size``.

    ``size`` with a leading ``+`` or ``-`` is relative to the current virtual size. Growing keeps
    the data; shrinking needs ``shrink`` and drops everything past the new end."""
    prealloc = preallocation or "off"
    if prealloc not in PREALLOC_MODES:
        raise ResizeError(f"Invalid preallocation mode '{prealloc}'")
    relative = {"+": 1, "-": -1}.get(size[:1], 0)
    text = size[1:] if relative else size
    try:
        n = parse_option_size("size", text)
    except QcowError as e:
        raise ResizeError(str(e), getattr(e, "hint", None)) from None
    with key_errors_name(filename):
        try:
            dev = open_image(filename, "r+", fmt)
        except QcowError as e:
            if filename.startswith("rbd:") and not str(e).startswith("Could not open"):  # the driver's own words
                raise QcowError(f"Could not open '{filename}': {e}") from None
            raise
    try:
        current = (dev.size + 511) & ~511  # the block layer counts whole sectors (raw files)
        total = current + relative * n if relative else n
        if total <= 0 or total > INT64_MAX:
            raise ResizeError("New image size must be positive")
        if total <= current and prealloc != "off":
            raise ResizeError("Preallocation can only be used for growing images")
        if total < current and not shrink:
            raise ResizeError("Use the --shrink option to perform a shrink operation.", warning=SHRINK_WARNING)
        dev.truncate(total, prealloc)
    finally:
        dev.close()
    echo("Image resized.")
