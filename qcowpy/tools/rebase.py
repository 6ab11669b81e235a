"""``rebase``: qemu-img's img_rebase — put an image on another backing file, keeping what it reads.

Safe mode (the default) walks the ranges the image itself does not allocate; where the old
backing chain and the new backing file read differently there, the old bytes are written into the
image (as zeros when they lie past the old backing file's end), sector run by sector run, exactly
as qemu-img compares and writes them. Then the header names the new backing file. ``-u`` only
rewrites the header.
"""
from __future__ import annotations

import os
from typing import Callable

from ..block.device import BlockDevice, is_allocated, is_allocated_above
from ..block.open import open_image, resolve_backing_path
from ..errors import CorruptedRead, QcowError

IO_BUF_SIZE = 2 << 20  # qemu-img's chunk
SECTOR = 512


class RebaseError(QcowError):
    pass


def _read(dev: BlockDevice | None, offset: int, n: int) -> bytes:
    return dev.pread(n, offset) if dev is not None else bytes(n)


def _differing_runs(old: bytes, new: bytes):
    """qemu-img's compare_buffers, repeatedly: (start, length, differs) runs of whole sectors
    (the last one may be short), each as long as the first sector's verdict holds."""
    pos, n = 0, len(old)
    while pos < n:
        differs = old[pos:pos + SECTOR] != new[pos:pos + SECTOR]
        end = pos + SECTOR
        while end < n and (old[end:end + SECTOR] != new[end:end + SECTOR]) == differs:
            end += SECTOR
        end = min(end, n)
        yield pos, end - pos, differs
        pos = end


def run_rebase(filename: str, backing: str | None, backing_fmt: str | None, fmt: str | None = None,
               unsafe: bool = False, progress: Callable[[float], None] | None = None) -> None:
    if not unsafe and backing is None:
        raise RebaseError("Must specify backing file (-b) or use unsafe mode (-u)")
    new_name = backing or ""
    dev = open_image(filename, "r+", fmt, backing=not unsafe)
    new_dev: BlockDevice | None = None
    own_new = False
    try:
        if not unsafe:
            old_dev = dev.backing
            prefix: BlockDevice | None = None
            if new_name:
                real = os.path.realpath(resolve_backing_path(filename, new_name))
                layer = old_dev
                while layer is not None:  # rebasing onto an image further down the chain?
                    if os.path.realpath(getattr(layer, "filename", "")) == real:
                        prefix = layer
                        break
                    layer = layer.backing
                if prefix is not None:
                    new_dev = prefix
                else:
                    try:
                        new_dev = open_image(resolve_backing_path(filename, new_name), "r", backing_fmt)
                    except QcowError as e:
                        raise RebaseError(f"Could not open new backing file '{new_name}': {e}") from None
                    own_new = True
            _copy_differences(dev, old_dev, new_dev, prefix)
        if new_name and not backing_fmt:  # as qemu-img: found only when the header is changed, after the copy
            raise RebaseError(f"Could not change the backing file to '{new_name}': backing format must be "
                              "specified")
        if dev.format != "qcow2":  # raw has no backing file to change
            raise RebaseError(f"Could not change the backing file to '{new_name}': Operation not supported")
        dev.change_backing_file(new_name or None, backing_fmt)
    finally:
        if own_new and new_dev is not None:
            new_dev.close()
        dev.close()


def _metadata(query, *args) -> tuple[bool, int]:
    """An allocation query, failing with qemu-img rebase's words when the metadata is broken."""
    try:
        return query(*args)
    except CorruptedRead as e:
        raise RebaseError(f"error while reading image metadata: {e}") from None


def _copy_differences(dev: BlockDevice, old: BlockDevice | None, new: BlockDevice | None,
                      prefix: BlockDevice | None) -> None:
    size = dev.size
    old_size = old.size if old is not None else 0
    new_size = new.size if new is not None else 0
    offset = 0
    while offset < size:
        n = min(IO_BUF_SIZE, size - offset)
        alloc, n = _metadata(is_allocated, dev, offset, n)
        if alloc:
            offset += n
            continue
        if prefix is not None and offset < old_size:
            # past the old backing file's end the overlay read zeros whatever the layers below
            # hold, so only ranges inside it can be skipped as "unchanged since the prefix"
            alloc, n = _metadata(is_allocated_above, old, prefix, offset, min(n, old_size - offset))
            if not alloc:
                offset += n
                continue
        old_is_zero = offset >= old_size
        if not old_is_zero and offset + n > old_size:
            n = old_size - offset
        if new is not None and offset < new_size and offset + n > new_size:
            n = new_size - offset
        buf_old = bytes(n) if old_is_zero else _read(old, offset, n)
        buf_new = _read(new, offset, n) if new is not None and offset < new_size else bytes(n)
        for start, length, differs in _differing_runs(buf_old, buf_new):
            if not differs:
                continue
            if old_is_zero:
                dev.write_zeroes(length, offset + start)
            else:
                dev.pwrite(buf_old[start:start + length], offset + start)
        offset += n
