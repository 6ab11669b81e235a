"""Compressed cluster codecs, byte-compatible with QEMU's.

zlib: raw deflate with a 4 KiB window (windowBits -12); QEMU refuses larger windows. The codec
is zlib-ng's (``zlib-ng`` package) when it is installed: the same stream format and the same
window rules as zlib (far matches are refused on inflate, never produced on deflate), about
2x faster to inflate and 4-5x faster to deflate than Python's zlib, which stays the fallback.
libdeflate and ISA-L were measured too and rejected: libdeflate cannot limit its window (its
streams can be unreadable to QEMU, and it inflates streams QEMU refuses); ISA-L inflates slower
than zlib-ng and compresses worse at the levels where it is faster.
zstd: one or more frames with no length prefix, decoded as a stream until a whole cluster
comes out (the stored length is rounded up to sectors, so trailing bytes are ignored).

Both functions are pure and thread-safe (contexts are per thread), so clusters can be
(de)compressed on worker threads: every codec here releases the GIL while it works.
"""
from __future__ import annotations

import os
import threading
import zlib

from ..errors import CompressedReadError, CorruptImage
from ..format import constants as C

try:  # optional speed-up, same stream format (see the module docstring)
    from zlib_ng import zlib_ng as _zlib_ng
except ImportError:  # pragma: no cover - depends on the environment
    _zlib_ng = None

_LIBRARIES = {"zlib": zlib, **({"zlib-ng": _zlib_ng} if _zlib_ng is not None else {})}
_deflate = zlib
_DEFLATE_ERRORS: tuple[type[Exception], ...] = (zlib.error,)
_local = threading.local()


def set_deflate_library(name: str) -> str:
    """Use ``"zlib-ng"`` or ``"zlib"`` for deflate clusters; returns the previous choice.

    Python's zlib writes the very bytes qemu-img writes (both use the system zlib with QEMU's
    parameters), so ``QCOWPY_DEFLATE=zlib`` makes ``convert -c`` output byte-identical to
    qemu-img's; zlib-ng writes different, equally valid streams, much faster."""
    global _deflate, _DEFLATE_ERRORS
    if name not in _LIBRARIES:
        raise ValueError(f"deflate library {name!r} is not available (have: {', '.join(_LIBRARIES)})")
    previous = deflate_library()
    _deflate = _LIBRARIES[name]
    _DEFLATE_ERRORS = tuple({zlib.error, _deflate.error})
    return previous


def fast_deflate_available() -> bool:
    return _zlib_ng is not None


def deflate_library() -> str:
    return next(k for k, v in _LIBRARIES.items() if v is _deflate)


_wanted = os.environ.get("QCOWPY_DEFLATE", "")
set_deflate_library(_wanted if _wanted in _LIBRARIES else "zlib-ng" if _zlib_ng is not None else "zlib")


def compress(data: bytes, ctype: int, limit: int) -> bytes | None:
    """Compress one cluster; None when the result would not be smaller than ``limit`` bytes."""
    if ctype == C.COMPRESSION_ZLIB:
        # QEMU: deflateInit2(Z_DEFAULT_COMPRESSION, Z_DEFLATED, -12, 9, Z_DEFAULT_STRATEGY)
        c = _deflate.compressobj(_deflate.Z_DEFAULT_COMPRESSION, _deflate.DEFLATED, -12, 9)
        out = c.compress(data) + c.flush()
    elif ctype == C.COMPRESSION_ZSTD:
        # QEMU: ZSTD_compressStream2(e_end) with default parameters (level 3, content size)
        out = _zstd_compressor().compress(data)
    else:
        raise CorruptImage(f"Unknown compression type {ctype}")
    return out if len(out) < limit else None


def decompress(data: bytes | memoryview, ctype: int, cluster_size: int) -> bytes:
    """Inflate one cluster; anything but exactly ``cluster_size`` bytes of output is an error."""
    try:
        if ctype == C.COMPRESSION_ZLIB:
            out = _deflate.decompressobj(-12).decompress(data, cluster_size)
        elif ctype == C.COMPRESSION_ZSTD:
            out = _zstd_cluster(data, cluster_size)
        else:
            raise CorruptImage(f"Unknown compression type {ctype}")
    except _DEFLATE_ERRORS as e:
        raise CompressedReadError(f"Could not decompress cluster: {e}") from None
    if len(out) != cluster_size:
        raise CompressedReadError("Could not decompress cluster: data ends before the cluster is complete")
    return out


def _zstd_compressor():
    c = getattr(_local, "zc", None)
    if c is None:
        import zstandard  # on first use: images without zstd clusters never load it
        c = _local.zc = zstandard.ZstdCompressor(level=3)
    return c


def _zstd_decompressor():
    d = getattr(_local, "zd", None)
    if d is None:
        import zstandard
        d = _local.zd = zstandard.ZstdDecompressor()
    return d


def _zstd_cluster(data: bytes | memoryview, cluster_size: int) -> bytes:
    import zstandard
    try:
        return _zstd_frames(zstandard, data, cluster_size)
    except zstandard.ZstdError as e:
        raise CompressedReadError(f"Could not decompress cluster: {e}") from None


def _zstd_frames(zstandard, data: bytes | memoryview, cluster_size: int) -> bytes:
    """QEMU's reading of a zstd cluster: frames are decoded one after another until a whole
    cluster has come out, and a frame that would give more than that is an error (EIO).

    A frame that declares exactly one cluster (what QEMU writes) is decoded in one call; any
    other shape is fed in small pieces so a hostile frame cannot balloon memory (one piece of
    input inflates to a bounded amount)."""
    try:
        declared = zstandard.frame_content_size(data)
    except zstandard.ZstdError:  # not even a frame header: the stream path says why
        declared = -1
    if declared == cluster_size:
        return _zstd_decompressor().decompress(data)
    if declared > cluster_size:
        raise CompressedReadError("Could not decompress cluster: the stream inflates past the cluster size")
    view = memoryview(data)
    out = bytearray()
    pos = 0
    while len(out) < cluster_size and pos < len(view):
        frame = _zstd_decompressor().decompressobj()
        while not frame.eof and pos < len(view):
            out += frame.decompress(view[pos:pos + _ZSTD_PIECE])
            pos += _ZSTD_PIECE
            if len(out) > cluster_size:
                raise CompressedReadError("Could not decompress cluster: the stream inflates past the cluster size")
        if not frame.eof:
            break
        pos -= len(frame.unused_data)  # the next frame starts where this one ended
    return bytes(out)


_ZSTD_PIECE = 256  # input bytes per step: at most ~11 MiB of output even for a hostile frame
