"""The LUKS1 anti-forensic splitter (the spec's AF-split, as QEMU's crypto/afsplit.c): a key is
spread over ``stripes`` blocks, each diffused with the hash, so erasing any part loses it."""
from __future__ import annotations

import os

from .algorithms import Hash


def _xor(a: bytes | bytearray, b: bytes | bytearray) -> bytes:
    return (int.from_bytes(a, "big") ^ int.from_bytes(b, "big")).to_bytes(len(a), "big")


def _diffuse(h: Hash, block: bytes) -> bytes:
    """Hash the block digest-sized piece by piece, each piece prefixed by its big-endian index."""
    n = h.digest_size
    out = bytearray()
    for i in range(0, len(block), n):
        piece = block[i:i + n]
        out += h.digest((i // n).to_bytes(4, "big"), piece)[:len(piece)]
    return bytes(out)


def encode(h: Hash, key: bytes, stripes: int, random=os.urandom) -> bytes:
    """``stripes * len(key)`` bytes that decode to ``key``."""
    n = len(key)
    acc = bytes(n)
    out = bytearray()
    for _ in range(stripes - 1):
        r = random(n)
        out += r
        acc = _diffuse(h, _xor(r, acc))
    out += _xor(key, acc)
    return bytes(out)


def decode(h: Hash, material: bytes, key_len: int, stripes: int) -> bytes:
    acc = bytes(key_len)
    for i in range(stripes - 1):
        acc = _diffuse(h, _xor(material[i * key_len:(i + 1) * key_len], acc))
    last = stripes - 1
    return _xor(material[last * key_len:(last + 1) * key_len], acc)
