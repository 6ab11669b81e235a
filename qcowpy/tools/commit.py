"""``commit``: qemu-img's img_commit — write what an image (and the layers between it and the base)
holds into the base, then empty the image (unless -d, or -b names a deeper base).

QEMU runs this as an active commit (a mirror job): every base-cluster-sized chunk that some layer
above the base allocates is copied from the top's view of the chain, zero ranges as zero writes
with unmap, and a base smaller than the top is grown first. The emptied top is QEMU's
qcow2_make_empty, byte for byte; the base gets the same guest content as with qemu-img (its
cluster order can differ, as the mirror job runs requests in parallel).
"""
from __future__ import annotations

import os

from ..block.device import BlockDevice, is_allocated_above, status_at
from ..block.open import open_image, resolve_backing_path
from ..errors import QcowError


class CommitError(QcowError):
    pass


def _open_chain(filename: str, fmt: str | None, base_name: str | None) -> tuple[BlockDevice, BlockDevice]:
    """The top (read-write, unless its base is found to be missing) with its chain attached; the
    base among them opened read-write, every other layer read-only."""
    top = open_image(filename, "r+", fmt, backing=False)
    try:
        layers = [top]
        base: BlockDevice | None = None
        dev = top
        while True:
            info = dev.format_info()
            name = info.backing_file if info is not None else ""
            if not name:
                break
            path = resolve_backing_path(dev.filename, name)  # type: ignore[attr-defined]
            is_base = base is None and (
                (base_name is None and dev is top) or
                (base_name is not None and (name == base_name or
                                            os.path.realpath(path) == os.path.realpath(
                                                resolve_backing_path(filename, base_name)))))
            nxt = open_image(path, "r+" if is_base else "r", info.backing_format, backing=False)  # type: ignore[union-attr]
            dev.attach_backing(nxt)  # type: ignore[attr-defined]
            layers.append(nxt)
            if is_base:
                base = nxt
            dev = nxt
        if base is None:
            if base_name is not None:
                raise CommitError(f"Did not find '{base_name}' in the backing chain of '{filename}'")
            raise CommitError("Image does not have a backing file")
        return top, base
    except BaseException:
        top.close()
        raise


def run_commit(filename: str, fmt: str | None = None, base: str | None = None, drop: bool = False) -> None:
    if base is not None:
        drop = True  # -b implies -d: the top would otherwise be emptied above an intermediate
    top, base_dev = _open_chain(filename, fmt, base)
    try:
        if base_dev.size < top.size:
            base_dev.truncate(top.size)
        cs = base_dev.cluster_size or 65536
        offset, size = 0, top.size
        while offset < size:
            alloc, n = is_allocated_above(top, base_dev, offset, size - offset)
            if not alloc:
                offset += n
                continue
            # the mirror job's dirty bitmap has the base's cluster granularity: whole chunks move
            start = offset - offset % cs
            end = min(size, -(-(offset + n) // cs) * cs)
            _copy(top, base_dev, start, end)
            offset = end
        base_dev.flush()
        if not drop and top.format_info() is not None:
            top.make_empty()
    finally:
        top.close()


def _copy(top: BlockDevice, base: BlockDevice, start: int, end: int) -> None:
    """One mirror chunk: zero runs of the top's view become zero writes (unmapping), data is copied."""
    pos = start
    while pos < end:
        ext = status_at(top, pos, end - pos)
        n = ext.length
        if ext.zero and not ext.data:
            base.write_zeroes(n, pos, unmap=True)
        else:
            step = 1 << 20
            for off in range(pos, pos + n, step):
                base.pwrite(top.pread(min(step, pos + n - off), off), off)
        pos += n
