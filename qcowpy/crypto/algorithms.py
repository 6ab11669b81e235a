"""QEMU's names for ciphers, modes and hashes, mapped to ``cryptography`` objects.

QEMU's LUKS driver knows aes-128/192/256, cast5-128, serpent-* and twofish-*; the library has
AES and (in its ``decrepit`` module) CAST5, so Serpent and Twofish are refused with a clear
message rather than implemented by hand. Hashes are the library's, except RIPEMD-160, which it
does not offer: that one comes from ``hashlib`` (OpenSSL), never from our own code.
"""
from __future__ import annotations

import hashlib
from dataclasses import dataclass

from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes
from cryptography.hazmat.primitives.kdf.pbkdf2 import PBKDF2HMAC

from ..errors import UnsupportedFeature

#: QEMU's QCryptoCipherAlgorithm names -> (family, key bytes)
CIPHER_ALGS = {
    "aes-128": ("aes", 16), "aes-192": ("aes", 24), "aes-256": ("aes", 32),
    "des": ("des", 8), "3des": ("3des", 24), "cast5-128": ("cast5", 16),
    "serpent-128": ("serpent", 16), "serpent-192": ("serpent", 24), "serpent-256": ("serpent", 32),
    "twofish-128": ("twofish", 16), "twofish-192": ("twofish", 24), "twofish-256": ("twofish", 32),
}
#: the families LUKS may name in its header (QEMU's qcrypto_block_luks_cipher_name_map)
LUKS_FAMILIES = {"aes": (16, 24, 32), "cast5": (16,), "serpent": (16, 24, 32), "twofish": (16, 24, 32)}
CIPHER_MODES = ("ecb", "cbc", "xts", "ctr")
IVGEN_ALGS = ("plain", "plain64", "essiv")
#: QEMU's QCryptoHashAlgorithm names, in its enum order -> digest length
HASH_ALGS = {"md5": 16, "sha1": 20, "sha224": 28, "sha256": 32, "sha384": 48, "sha512": 64, "ripemd160": 20}

_LIB_HASHES = {"md5": hashes.MD5, "sha1": hashes.SHA1, "sha224": hashes.SHA224, "sha256": hashes.SHA256,
               "sha384": hashes.SHA384, "sha512": hashes.SHA512}


def cipher_name(family: str, key_bytes: int) -> str:
    return "cast5-128" if family == "cast5" else f"{family}-{key_bytes * 8}"


def block_size(alg: str) -> int:
    return 8 if CIPHER_ALGS[alg][0] in ("cast5", "des", "3des") else 16


def key_len(alg: str) -> int:
    return CIPHER_ALGS[alg][1]


def iv_len(alg: str, mode: str) -> int:
    """QEMU's qcrypto_cipher_get_iv_len: no IV in ECB, one block otherwise."""
    return 0 if mode == "ecb" else block_size(alg)


def check_supported(alg: str, mode: str) -> None:
    """Refuse what QEMU refuses (its messages) and what the library cannot do (ours)."""
    family = CIPHER_ALGS[alg][0]
    if mode == "xts" and block_size(alg) != 16:
        raise UnsupportedFeature(f"Unsupported cipher mode {mode}")
    if family in ("serpent", "twofish", "des", "3des"):
        raise UnsupportedFeature(f"Cipher algorithm '{alg}' is not supported by qcowpy "
                                 "(the cryptography package has no implementation of it)")
    if family == "cast5" and mode not in ("ecb", "cbc", "ctr"):
        raise UnsupportedFeature(f"Unsupported cipher mode {mode}")
    if mode == "xts" and alg == "aes-192":
        raise UnsupportedFeature("Cipher 'aes-192' in XTS mode is not supported by qcowpy "
                                 "(the cryptography package has XTS for 256- and 512-bit keys only)")


def _algorithm(alg: str, key: bytes):
    family = CIPHER_ALGS[alg][0]
    if family == "aes":
        return algorithms.AES(key)
    if family == "cast5":
        from cryptography.hazmat.decrepit.ciphers.algorithms import CAST5
        return CAST5(key)
    raise UnsupportedFeature(f"Cipher algorithm '{alg}' is not supported by qcowpy")


class BlockCipher:
    """One key of one algorithm in one mode; ``run`` en/decrypts ``data`` under ``iv`` (None
    in ECB). XTS takes the two halves of a double-length key, as QEMU does."""

    def __init__(self, alg: str, mode: str, key: bytes):
        check_supported(alg, mode)
        self.alg, self.mode = alg, mode
        self._key = bytes(key)
        self.niv = iv_len(alg, mode)
        self._algo = algorithms.AES(self._key) if mode == "xts" else _algorithm(alg, self._key)
        if mode == "ecb":
            self._ecb = Cipher(self._algo, modes.ECB())

    def _cipher(self, iv: bytes | None) -> Cipher:
        if self.mode == "ecb":
            return self._ecb
        if self.mode == "cbc":
            return Cipher(self._algo, modes.CBC(iv))
        if self.mode == "ctr":
            return Cipher(self._algo, modes.CTR(iv))
        return Cipher(self._algo, modes.XTS(iv))

    def encrypt(self, data, iv: bytes | None = None) -> bytes:
        c = self._cipher(iv).encryptor()
        return c.update(data) + c.finalize()

    def decrypt(self, data, iv: bytes | None = None) -> bytes:
        c = self._cipher(iv).decryptor()
        return c.update(data) + c.finalize()


@dataclass(frozen=True)
class Hash:
    """A hash by QEMU's name: digest length, one-shot digest, PBKDF2."""

    name: str

    @property
    def digest_size(self) -> int:
        return HASH_ALGS[self.name]

    def digest(self, *parts: bytes) -> bytes:
        lib = _LIB_HASHES.get(self.name)
        if lib is None:
            h = hashlib.new(self.name)
            for p in parts:
                h.update(p)
            return h.digest()
        hh = hashes.Hash(lib())
        for p in parts:
            hh.update(p)
        return hh.finalize()

    def pbkdf2(self, password: bytes, salt: bytes, iterations: int, length: int) -> bytes:
        lib = _LIB_HASHES.get(self.name)
        if lib is None:
            return hashlib.pbkdf2_hmac(self.name, password, salt, iterations, length)
        return PBKDF2HMAC(lib(), length, salt, iterations).derive(password)


def hash_alg(name: str) -> Hash:
    if name not in HASH_ALGS:
        raise UnsupportedFeature(f"Hash algorithm '{name}' not supported")
    return Hash(name)
