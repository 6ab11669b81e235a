"""Compressed clusters in batches, (de)compressed on the worker pool.

qemu-img inflates one cluster per request and compresses convert's clusters one after the
other; here a large read (convert's chunks, an NBD client's big requests) reads each
contiguous run of compressed bytes with one host read and inflates its clusters on the shared
worker pool, and a batch of compressed writes is deflated on the pool before the clusters are
stored in order (the codecs release the GIL), so both use every CPU. Partial clusters go
through the image's one-cluster cache.
"""
from __future__ import annotations

from typing import TYPE_CHECKING

from . import codec
from ..errors import InvalidArgument, UnsupportedFeature
from ..workers import run_all

if TYPE_CHECKING:
    from .image import Qcow2Image


def read_compressed(img: "Qcow2Image", items: list[tuple[memoryview, int]]) -> None:
    """Compressed guest bytes into buffers: ``(dst, start)`` fills ``dst`` with guest bytes
    ``[start, start+len(dst))``; all the compressed extents of one request come in one call.

    A partial cluster goes through a one-cluster cache (small sequential reads inflate it
    once); whole clusters are read with one host read per contiguous run of compressed bytes
    and inflated on the worker pool together, so a request whose compressed clusters alternate
    with plain ones (what ``convert -c`` leaves of data that does not compress) still inflates
    on every CPU."""
    cs = img.cluster_size
    whole: list[tuple[memoryview, int]] = []  # (one cluster of a dst, its L2 entry) read whole
    for dst, start in items:
        end = start + len(dst)
        p = start
        while p < end:
            cstart = p & ~(cs - 1)
            n = min(end, cstart + cs) - p
            if n == cs:
                whole.append((dst[p - start:p - start + cs], img.meta.l2_entry(cstart)[0]))
            else:
                data = img._read_compressed_cluster(cstart)
                dst[p - start:p - start + n] = memoryview(data)[p - cstart:p - cstart + n]
            p += n
    if not whole:
        return
    fsize = img.file.size()
    descs = [img._compressed_desc(entry, fsize) for _, entry in whole]
    pieces: list[tuple[memoryview, memoryview]] = []  # (compressed bytes, destination)
    for a, b, members in _host_spans(descs):
        raw = memoryview(img.file.pread(b - a, a))
        for i in members:
            h, nb = descs[i]
            pieces.append((raw[h - a:h - a + nb], whole[i][0]))
    ctype = img.header.compression_type

    def inflate(item: tuple[memoryview, memoryview]) -> None:
        item[1][:] = codec.decompress(item[0], ctype, cs)

    run_all(inflate, pieces)


def _host_spans(descs: list[tuple[int, int]], max_gap: int = 4096,
                max_span: int = 8 << 20) -> list[tuple[int, int, list[int]]]:
    """Group compressed clusters ``(host, nbytes)`` into host runs read with one ``pread`` each:
    consecutive ones whose bytes follow within ``max_gap`` (compressed clusters are packed, a
    sector's padding apart; a wider gap is other data, not worth reading), up to ``max_span``
    bytes a run."""
    spans: list[list] = []
    for i, (h, nb) in enumerate(descs):
        last = spans[-1] if spans else None
        if last is not None and last[0] <= h <= last[1] + max_gap and max(last[1], h + nb) - last[0] <= max_span:
            last[1] = max(last[1], h + nb)
            last[2].append(i)
        else:
            spans.append([h, h + nb, [i]])
    return [(a, b, m) for a, b, m in spans]


def write_compressed_many(img: "Qcow2Image", items: list[tuple[bytes, int]]) -> None:
    """Whole clusters ``(data, guest offset)`` (the image's last one may be short: zero-padded)
    written compressed; a cluster that does not shrink is written plainly, as QEMU does."""
    img.require_writable()
    if img.external_data:  # QEMU: -ENOTSUP
        raise UnsupportedFeature("Operation not supported")
    cs = img.cluster_size
    for data, offset in items:
        if offset % cs or len(data) > cs or (len(data) < cs and offset + len(data) != img.size):
            raise InvalidArgument("Compressed writes must cover exactly one cluster")
        img.check_range(offset, len(data))
    ctype = img.header.compression_type
    padded = [bytes(d) if len(d) == cs else bytes(d) + bytes(cs - len(d)) for d, _ in items]
    comps = run_all(lambda d: codec.compress(d, ctype, cs), padded)
    with img.lock:
        img.begin_change()
        for (data, offset), full, comp in zip(items, padded, comps):
            img.bitmaps.mark(offset, len(data))
            if comp is None:
                img.pwrite(full[:min(cs, img.size - offset)], offset)
            else:
                img.store_compressed(offset, comp)
