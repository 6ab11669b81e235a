"""Sector-wise encryption of a buffer, as QEMU's qcrypto_block_{en,de}crypt_helper: each
512-byte sector gets the IV its number generates (offset / 512)."""
from __future__ import annotations

from .algorithms import BlockCipher
from .ivgen import IVGen

SECTOR_SIZE = 512


class SectorCipher:
    def __init__(self, cipher: BlockCipher, ivgen: IVGen | None):
        self.cipher, self.ivgen = cipher, ivgen

    def _run(self, data, offset: int, encrypt: bool) -> bytes:
        mv = memoryview(data).cast("B")
        if offset % SECTOR_SIZE or len(mv) % SECTOR_SIZE:
            raise ValueError("encryption works on whole 512-byte sectors")
        fn = self.cipher.encrypt if encrypt else self.cipher.decrypt
        if not self.cipher.niv:  # ECB: no IV, one call
            return fn(mv)
        sector = offset // SECTOR_SIZE
        iv = self.ivgen.iv  # type: ignore[union-attr]
        return b"".join(fn(mv[i:i + SECTOR_SIZE], iv(sector + i // SECTOR_SIZE))
                        for i in range(0, len(mv), SECTOR_SIZE))

    def encrypt(self, data, offset: int) -> bytes:
        return self._run(data, offset, True)

    def decrypt(self, data, offset: int) -> bytes:
        return self._run(data, offset, False)
