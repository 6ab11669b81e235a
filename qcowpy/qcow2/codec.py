"""Compressed cluster codecs, byte-compatible with QEMU's.

zlib: raw deflate with a 4 KiB window (windowBits -12); QEMU refuses larger windows.
zstd: one or more frames with no length prefix, decoded as a stream until a whole cluster
comes out (the stored length is rounded up to sectors, so trailing bytes are ignored).
"""
from __future__ import annotations

import io
import zlib

import zstandard

from ..errors import CorruptImage
from ..format import constants as C


def compress(data: bytes, ctype: int, limit: int) -> bytes | None:
    """Compress one cluster; None when the result would not be smaller than ``limit`` bytes."""
    if ctype == C.COMPRESSION_ZLIB:
        c = zlib.compressobj(zlib.Z_DEFAULT_COMPRESSION, zlib.DEFLATED, -12, 9)
        out = c.compress(data) + c.flush()
    elif ctype == C.COMPRESSION_ZSTD:
        # QEMU: ZSTD_compressStream2(e_end) with default parameters (level 3, content size)
        out = zstandard.ZstdCompressor(level=3).compress(data)
    else:
        raise CorruptImage(f"Unknown compression type {ctype}")
    return out if len(out) < limit else None


def decompress(data: bytes, ctype: int, cluster_size: int) -> bytes:
    """Inflate one cluster; anything but exactly ``cluster_size`` bytes of output is an error."""
    try:
        if ctype == C.COMPRESSION_ZLIB:
            out = zlib.decompressobj(-12).decompress(data, cluster_size)
        elif ctype == C.COMPRESSION_ZSTD:
            out = _zstd_stream(data, cluster_size)
        else:
            raise CorruptImage(f"Unknown compression type {ctype}")
    except (zlib.error, zstandard.ZstdError) as e:
        raise CorruptImage(f"Could not decompress cluster: {e}") from None
    if len(out) != cluster_size:
        raise CorruptImage("Could not decompress cluster: data ends before the cluster is complete")
    return out


def _zstd_stream(data: bytes, cluster_size: int) -> bytes:
    """Read at most one cluster across frames, so a hostile frame cannot balloon memory."""
    reader = zstandard.ZstdDecompressor().stream_reader(io.BytesIO(data), read_across_frames=True)
    out = bytearray()
    while len(out) < cluster_size:
        chunk = reader.read(cluster_size - len(out))
        if not chunk:
            break
        out += chunk
    return bytes(out)
