"""Whole-image layout changes: resize (grow, shrink), preallocation, make_empty.

Each works through the image's metadata owner under the image lock, and follows the QEMU
function named in its docstring, so the bytes written are the ones qemu-img writes.
"""
from __future__ import annotations

from ..errors import CorruptImage, CorruptTable, InvalidArgument, UnsupportedFeature
from ..format import constants as C
from ..format.bitmaps import directory_location
from .image import MAX_RUN_BYTES, Qcow2Image, l1_entries_for


def resize(img: Qcow2Image, new_size: int, exact_l1: bool = True, preallocation: str = "off",
           zero_new: bool = False) -> None:
    """Change the virtual size as QEMU's ``qcow2_co_truncate`` does.

    Growing widens the L1 table (exactly, when asked) and, with ``preallocation``, maps the
    new area; ``zero_new`` (the block layer asks for it when a backing file reaches past the old
    end) makes the new area read as zeros instead of the backing file's bytes. Shrinking drops every cluster past the new end (the entries become unallocated),
    frees the L2 tables past it, drops refcount blocks left describing nothing, and cuts the
    file after the last cluster still in use."""
    with img.lock:
        img.require_writable()
        h, meta = img.header, img.meta
        if new_size % 512:
            raise InvalidArgument("The new size must be a multiple of 512")
        if h.nb_snapshots and h.version < 3:
            raise UnsupportedFeature("Can't resize a v2 image which has snapshots")
        img.bitmaps.check_resizable()
        old_size = img.size
        if new_size < old_size:
            if preallocation != "off":
                raise InvalidArgument("Preallocation can't be used for shrinking an image")
            img.begin_change()
            _shrink(img, new_size)
        else:
            need = l1_entries_for(h, new_size)
            if need > len(meta.l1):
                meta.grow_l1(need, exact=exact_l1)
                meta.sync()  # QEMU frees the old L1 at once: preallocation may reuse it
        img.size = new_size
        img.bitmaps.resize(new_size)
        if new_size > old_size and preallocation == "off" and h.autoclear_features & C.AUTOCLEAR_DATA_FILE_RAW:
            preallocation = "metadata"  # QEMU: a raw data file stays mapped 1:1 as it grows
        # falloc/full: the grown file reads zeros, so the new clusters are data (QEMU truncates
        # the file with BDRV_REQ_ZERO_WRITE and needs no zero clusters then)
        zero_file = zero_new and preallocation in ("falloc", "full")
        if new_size > old_size and preallocation != "off":
            preallocate(img, preallocation, start=old_size, data=zero_file)
        elif img.external_data and img.data.size() != new_size:
            img.data.truncate(new_size)  # QEMU forwards the resize (shrinking too) to the data file
        if zero_new and not zero_file and new_size > old_size:
            with img.bitmaps.unmarked():  # QEMU zeroes inside the driver: no dirty bits
                _zero_new_area(img, old_size, new_size)
        meta.sync()
        meta.update_header(size=new_size)
        img.file.flush()


def preallocate(img: Qcow2Image, mode: str, start: int = 0, data: bool = False) -> None:
    """Map every unmapped cluster from ``start`` on to a host cluster (metadata), reserving
    (falloc) or zero-filling (full) the data, as ``-o preallocation=`` does. ``data`` marks the
    subclusters of extended L2 entries allocated (the new file area is known to read zeros)."""
    with img.lock:
        img.require_writable()
        meta = img.meta
        cs = img.cluster_size
        span = cs << meta.l2_bits
        pos = start & ~(cs - 1)
        end_needed = 0
        while pos < img.size:
            span_end = min(img.size, (pos // span + 1) * span)
            meta.writable_l2(pos // span)
            first = pos
            while first < span_end:
                first, last = _unmapped_run(img, first, span_end)
                if last == first:
                    break
                n = (last - first + cs - 1) // cs
                # the cluster the old end falls in keeps its head, as QEMU's copy-on-write gives it
                # (the backing file's bytes, with extended L2 the subclusters keep reading them)
                head = img.pread(start - first, first) if first < start and (data or not img.extended) else b""
                host = img.alloc_data(first, n)
                used = min(last, img.size) - first
                # The file reaches the clusters before any L2 entry names them: a crash must not
                # leave entries past the end of the file (which no repair could fix).
                if mode == "falloc":
                    img.data.allocate(host, used)
                elif mode == "full":
                    for off in range(0, used, MAX_RUN_BYTES):
                        img.data.pwrite(bytes(min(MAX_RUN_BYTES, used - off)), host + off)
                elif img.data.size() < host + used:
                    img.data.truncate(host + used)
                if head:
                    img.write_data(head, host, first)  # encrypted like any guest data
                for i in range(n):  # extended: host cluster reserved, subclusters read as before
                    guest = first + i * cs
                    bitmap = C.L2_BITMAP_ALL_ALLOC if data else meta.l2_entry(guest)[1]
                    meta.set_l2_entry(guest, (host + i * cs) | C.OFLAG_COPIED, bitmap)
                end_needed = max(end_needed, host + used)
                first = last
            pos = span_end
        meta.sync()
        if img.data.size() < end_needed:
            img.data.truncate(end_needed)


def _zero_new_area(img: Qcow2Image, old_size: int, new_size: int) -> None:
    """Zero clusters from the first whole (sub)cluster on, explicit zeros for the head of the
    cluster the old end fell in: the grown area must not show the backing file (QEMU's
    BDRV_REQ_ZERO_WRITE truncate). v2 has no zero clusters, so QEMU fails there, and so do we."""
    unit = img.subcluster_size
    zero_start = -(-old_size // unit) * unit
    if new_size > zero_start:
        if img.header.version < 3:
            raise UnsupportedFeature("Failed to zero out new clusters: Operation not supported")
        img.write_zeroes(new_size - zero_start, zero_start)
    if zero_start > old_size:
        img.pwrite(bytes(min(zero_start, new_size) - old_size), old_size)


def _unmapped_run(img: Qcow2Image, first: int, span_end: int) -> tuple[int, int]:
    """[first, last) of the next run of clusters without a host cluster (at most MAX_RUN_BYTES)."""
    cs, meta = img.cluster_size, img.meta
    while first < span_end and meta.l2_entry(first)[0] & C.L2E_OFFSET_MASK:
        first += cs
    last = first
    while last < span_end and not meta.l2_entry(last)[0] & C.L2E_OFFSET_MASK and last - first < MAX_RUN_BYTES:
        last += cs
    return first, last


def _shrink(img: Qcow2Image, new_size: int) -> None:
    meta = img.meta
    with meta.punching_freed():
        full_discard(img, (new_size + img.cluster_size - 1) & ~(img.cluster_size - 1), img.size)
        meta.shrink_l1(l1_entries_for(img.header, new_size))
        try:
            meta.refcounts.drop_unused_blocks(meta.fatal_corruption)
        except CorruptImage as e:  # signalled (stderr); QEMU fails the resize with EIO or EINVAL
            text = e.strerror if isinstance(e, CorruptTable) else "Input/output error"
            raise CorruptImage(f"Failed to discard unused refblocks: {text}") from None
    file_size = img.file.size()
    last = meta.refcounts.last_cluster(file_size)
    if (last + 1) * img.cluster_size < file_size:
        img.file.truncate((last + 1) * img.cluster_size)


def full_discard(img: Qcow2Image, start: int, end: int) -> None:
    """QEMU's qcow2_cluster_discard(full_discard=true) of whole clusters [start, end): each L2
    table it touches is made writable first (allocated even when absent, or copied when
    shared, as get_cluster_table does), then the entries become 0 (unallocated)."""
    meta = img.meta
    cs = img.cluster_size
    span_bits = img.cluster_bits + meta.l2_bits
    step = meta.entry_words
    for l1_index in range(start >> span_bits, ((end - 1) >> span_bits) + 1 if end > start else 0):
        table = meta.writable_l2(l1_index)
        base = l1_index << span_bits
        first = (max(start, base) - base) >> img.cluster_bits
        last = (min(end, base + (1 << span_bits)) - base + cs - 1) >> img.cluster_bits
        for idx in range(first, last):
            i = idx * step
            old = table.data[i]
            if old or (step == 2 and table.data[i + 1]):
                table[i:i + step] = [0] * step
                if old:
                    meta.free_entry_later(old)
        # QEMU frees each dropped cluster at once, so the next table allocated may reuse it
        meta.sync()


def make_empty(img: Qcow2Image) -> None:
    """Drop every cluster of the active layer (what ``qemu-img commit`` leaves of the top),
    as QEMU's qcow2_make_empty: a v3 image without snapshots or bitmaps is rebuilt from
    scratch (header, one refcount table and block, an empty L1); otherwise everything is
    discarded cluster by cluster."""
    with img.lock:
        img.require_writable()
        h, meta = img.header, img.meta
        l1_clusters = meta.clusters_for(len(meta.l1) * 8)
        if h.version >= 3 and not h.nb_snapshots and directory_location(h) is None and \
                h.crypt_method != C.CRYPT_LUKS and 3 + l1_clusters <= meta.refcounts.per_block and \
                not img.external_data:  # the LUKS area and the data file are kept
            img.begin_change()
            meta.rebuild_empty(l1_clusters)
            return
        img.begin_change()
        with meta.punching_freed():
            full_discard(img, 0, img.size)
