"""The qcow2 full disk encryption header pointer extension (0x0537be77): where the LUKS
header area lies in the image file (offset, length), two big-endian 64-bit numbers."""
from __future__ import annotations

import struct

from ..errors import CorruptImage
from . import constants as C

_FDE = struct.Struct(">QQ")


def pack_fde(offset: int, length: int) -> bytes:
    return _FDE.pack(offset, length)


def parse_fde(data: bytes, crypt_method: int, cluster_size: int) -> tuple[int, int]:
    """(offset, length), refused as QEMU's qcow2_read_extensions refuses them."""
    if crypt_method != C.CRYPT_LUKS:
        raise CorruptImage("CRYPTO header extension only expected with LUKS encryption method")
    if len(data) != _FDE.size:
        raise CorruptImage(f"CRYPTO header extension size {len(data)}, but expected size {_FDE.size}")
    offset, length = _FDE.unpack(data)
    if offset % cluster_size:
        raise CorruptImage(f"Encryption header offset '{offset}' is not a multiple of cluster size '{cluster_size}'")
    return offset, length
