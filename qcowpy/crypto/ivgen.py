"""IV generators of QEMU's block crypto: plain (32-bit little-endian sector), plain64 (64-bit)
and essiv (the plain64 sector encrypted in ECB under a hash of the key)."""
from __future__ import annotations

from .algorithms import BlockCipher, block_size, hash_alg, key_len


class IVGen:
    """``iv(sector)`` -> ``niv`` bytes."""

    def __init__(self, alg: str, niv: int, cipher_alg: str | None = None, hash_name: str | None = None,
                 key: bytes = b""):
        self.alg, self.niv = alg, niv
        if alg == "essiv":
            salt = hash_alg(hash_name or "sha256").digest(key)
            n = min(len(salt), key_len(cipher_alg))  # type: ignore[arg-type]
            self._essiv = BlockCipher(cipher_alg, "ecb", salt[:n])  # type: ignore[arg-type]
            self._nblock = block_size(cipher_alg)  # type: ignore[arg-type]

    def iv(self, sector: int) -> bytes:
        n = self.niv
        if self.alg == "plain":
            raw = (sector & 0xFFFFFFFF).to_bytes(4, "little")
        elif self.alg == "plain64":
            raw = (sector & (2**64 - 1)).to_bytes(8, "little")
        else:
            data = (sector & (2**64 - 1)).to_bytes(8, "little")[:self._nblock]
            raw = self._essiv.encrypt(data + bytes(self._nblock - len(data)))
        return raw[:n] + bytes(max(0, n - len(raw)))
