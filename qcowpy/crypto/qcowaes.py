"""The legacy qcow/qcow2 AES encryption (crypt_method 1), readable and writable as QEMU 7.2
still allows: AES-128-CBC, a plain64 IV from the *guest* sector number, and a key that is the
passphrase itself, zero-padded or cut to 16 bytes (no KDF: that is why it is deprecated)."""
from __future__ import annotations

from .algorithms import BlockCipher
from .ivgen import IVGen
from .sector import SectorCipher


def aes_cipher(password: bytes) -> SectorCipher:
    key = password[:16].ljust(16, b"\0")
    return SectorCipher(BlockCipher("aes-128", "cbc", key), IVGen("plain64", 16))
