"""The pure LUKS pieces against their specs: AF splitter, IV generators, header codec and
QEMU's header validation (hostile headers give QEMU's messages, bounded work)."""
from __future__ import annotations

import os

import pytest
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes

from qcowpy.crypto import afsplit
from qcowpy.crypto import luks as L
from qcowpy.crypto.algorithms import BlockCipher, hash_alg
from qcowpy.crypto.ivgen import IVGen
from qcowpy.crypto.sector import SectorCipher


@pytest.mark.parametrize("hname", ["sha1", "sha256", "sha512", "ripemd160", "md5"])
@pytest.mark.parametrize("nkey", [16, 32, 64])
def test_afsplit_round_trip_and_diffusion(hname, nkey):
    h = hash_alg(hname)
    key = os.urandom(nkey)
    material = afsplit.encode(h, key, 40)
    assert len(material) == 40 * nkey
    assert afsplit.decode(h, material, nkey, 40) == key
    damaged = bytearray(material)
    damaged[3] ^= 1  # any change to any stripe loses the key (the splitter's point)
    assert afsplit.decode(h, bytes(damaged), nkey, 40) != key


def test_afsplit_matches_the_spec_by_hand():
    """LUKS1 spec, AF-split with 2 stripes: key = s1 XOR H(s0), H hashing digest-sized pieces
    each prefixed with its 32-bit big-endian index."""
    h = hash_alg("sha256")
    s0, key = os.urandom(40), os.urandom(40)  # 40 bytes: one whole digest and an 8-byte tail
    diffused = h.digest(b"\0\0\0\0", s0[:32]) + h.digest(b"\0\0\0\1", s0[32:])[:8]
    s1 = bytes(a ^ b for a, b in zip(key, diffused))
    assert afsplit.decode(h, s0 + s1, 40, 2) == key
    assert afsplit.encode(h, key, 2, random=lambda n: s0) == s0 + s1


def test_ivgens():
    assert IVGen("plain64", 16).iv(0x1122334455) == bytes.fromhex("5544332211000000") + bytes(8)
    assert IVGen("plain", 16).iv(0x1122334455) == bytes.fromhex("55443322") + bytes(12)
    key = os.urandom(64)
    salt = hash_alg("sha256").digest(key)
    enc = Cipher(algorithms.AES(salt), modes.ECB()).encryptor()
    want = enc.update((7).to_bytes(8, "little") + bytes(8)) + enc.finalize()
    assert IVGen("essiv", 16, "aes-256", "sha256", key).iv(7) == want


def test_sector_cipher_xts_plain64_per_sector():
    key = os.urandom(64)
    sc = SectorCipher(BlockCipher("aes-256", "xts", key), IVGen("plain64", 16))
    data = os.urandom(1024)
    out = sc.encrypt(data, 0x10000)
    for i in range(2):
        tweak = (0x10000 // 512 + i).to_bytes(8, "little") + bytes(8)
        e = Cipher(algorithms.AES(key), modes.XTS(tweak)).encryptor()
        assert out[i * 512:(i + 1) * 512] == e.update(data[i * 512:(i + 1) * 512]) + e.finalize()
    assert sc.decrypt(out, 0x10000) == data
    with pytest.raises(ValueError):
        sc.encrypt(data[:100], 0)


def _header() -> L.Header:
    """A valid header built the way create() builds one (without the PBKDF work)."""
    h = L.Header(cipher_name=b"aes".ljust(32, b"\0"), cipher_mode=b"xts-plain64".ljust(32, b"\0"),
                 hash_spec=b"sha256".ljust(32, b"\0"), master_key_len=64, master_key_iterations=1000)
    for i, s in enumerate(h.slots):
        s.key_offset_sector = 8 + i * 504
    h.payload_offset_sector = 8 + 8 * 504
    return h


def test_header_round_trip():
    h = _header()
    raw = h.pack()
    assert len(raw) == 592 and raw[:6] == b"LUKS\xba\xbe"
    assert L.parse_header(raw) == h
    L.check_header(h)


@pytest.mark.parametrize("mutate,message", [
    (lambda h: setattr(h, "magic", b"LUKS\0\0"), "Volume is not in LUKS format"),
    (lambda h: setattr(h, "version", 2), "LUKS version 2 is not supported"),
    (lambda h: setattr(h, "cipher_name", b"a" * 32), "LUKS header cipher name is not NUL terminated"),
    (lambda h: setattr(h, "hash_spec", b"s" * 32), "LUKS header hash spec is not NUL terminated"),
    (lambda h: setattr(h, "payload_offset_sector", 7), "LUKS payload is overlapping with the header"),
    (lambda h: setattr(h, "master_key_iterations", 0), "LUKS key iteration count is zero"),
    (lambda h: setattr(h.slots[2], "stripes", 4001), "Keyslot 2 is corrupted (stripes 4001 != 4000)"),
    (lambda h: setattr(h.slots[1], "active", 5), "Keyslot 1 state (active/disable) is corrupted"),
    (lambda h: (setattr(h.slots[0], "active", L.SLOT_ENABLED), setattr(h.slots[0], "iterations", 0)),
     "Keyslot 0 iteration count is zero"),
    (lambda h: setattr(h.slots[0], "key_offset_sector", 2), "Keyslot 0 is overlapping with the LUKS header"),
    (lambda h: setattr(h.slots[7], "key_offset_sector", 8 + 8 * 504), "Keyslot 7 is overlapping with the encrypted payload"),
    (lambda h: setattr(h.slots[3], "key_offset_sector", 8 + 2 * 504 + 8), "Keyslots 2 and 3 are overlapping in the header"),
    # absurd key sizes: refused by name lookup before any key material is read
    (lambda h: setattr(h, "master_key_len", 0xFFFFFFF0), "Keyslot 0 is overlapping with the encrypted payload"),
])
def test_hostile_headers_refused_with_qemus_messages(mutate, message):
    h = _header()
    mutate(h)
    with pytest.raises(L.LuksError) as e:
        L.Luks(L.parse_header(h.pack()))
    assert str(e.value) == message


@pytest.mark.parametrize("field,value,message", [
    ("cipher_mode", b"xts", "Unexpected cipher mode string format 'xts'"),
    ("cipher_mode", b"gcm-plain64", "Cipher mode 'gcm' not supported"),
    ("cipher_mode", b"xts-essiv", "Missing IV generator hash specification"),
    ("cipher_mode", b"xts-foo", "IV generator 'foo' not supported"),
    ("cipher_mode", b"xts-essiv:whirl", "Hash algorithm 'whirl' not supported"),
    ("cipher_name", b"blowfish", "Algorithm 'blowfish' with key size 32 bytes not supported"),
    ("hash_spec", b"sha3", "Hash algorithm 'sha3' not supported"),
])
def test_unknown_algorithms_refused(field, value, message):
    h = _header()
    setattr(h, field, value.ljust(32, b"\0"))
    with pytest.raises(L.LuksError) as e:
        L.Luks(L.parse_header(h.pack()))
    assert str(e.value) == message


def test_key_material_read_is_bounded():
    """A slot reads master_key_len * 4000 bytes at most; master_key_len is limited to the
    cipher's key sizes by parse_algorithms, so no header makes us read more than 256000."""
    h = _header()
    h.slots[0].active, h.slots[0].iterations = L.SLOT_ENABLED, 1000
    luks = L.Luks(L.parse_header(h.pack()))
    asked = []

    def read(off, n):
        asked.append(n)
        return bytes(n)
    assert luks.load_key(0, b"x", read) is None
    assert asked == [64 * 4000]


def test_create_unlock_and_amend_round_trip():
    area = bytearray()

    def init(length):
        area.extend(bytes(length))

        def write(off, data):
            area[off:off + len(data)] = data
        return write

    def read(off, n):
        return bytes(area[off:off + n])
    luks = L.create(L.CreateOptions(iter_time=10), b"one", init)
    master = luks.master_key
    write = init(0)
    again = L.Luks.load(read)
    assert again.unlock(b"one", read) == master
    with pytest.raises(L.LuksError, match="Invalid password, cannot unlock any keyslot"):
        L.Luks.load(read).unlock(b"two", read)
    L.amend(again, L.AmendOptions("active", new_secret=b"two", secret=b"one", iter_time=10), read, write)
    assert L.Luks.load(read).active_slots() == [0, 1]
    assert L.Luks.load(read).unlock(b"two", read) == master
    with pytest.raises(L.LuksError, match="Refusing to overwrite active keyslot 1 - please erase it first"):
        L.amend(L.Luks.load(read), L.AmendOptions("active", new_secret=b"x", secret=b"one", keyslot=1), read, write)
    L.amend(L.Luks.load(read), L.AmendOptions("inactive", old_secret=b"one"), read, write)
    after = L.Luks.load(read)
    assert after.active_slots() == [1]
    assert after.header.slots[0].salt == bytes(32) and after.header.slots[0].iterations == 0
    with pytest.raises(L.LuksError, match="Invalid password"):
        L.Luks.load(read).unlock(b"one", read)
    with pytest.raises(L.LuksError, match="Attempt to erase the only active keyslot 1"):
        L.amend(after, L.AmendOptions("inactive", keyslot=1), read, write)
    with pytest.raises(L.LuksError, match="All the active keyslots match the \\(old\\) password"):
        L.amend(after, L.AmendOptions("inactive", old_secret=b"two"), read, write)
    with pytest.raises(L.LuksError, match="To erase keyslot\\(s\\), either explicit keyslot index"):
        L.amend(after, L.AmendOptions("inactive"), read, write)
    with pytest.raises(L.LuksError, match="Invalid keyslot 9 specified, must be between 0 and 7"):
        L.amend(after, L.AmendOptions("active", new_secret=b"x", secret=b"two", keyslot=9), read, write)


def test_unsupported_ciphers_are_refused_not_hand_rolled():
    with pytest.raises(Exception, match="not supported by qcowpy"):
        L.create(L.CreateOptions(cipher_alg="serpent-256", iter_time=1), b"p", lambda n: (lambda o, d: None))
    with pytest.raises(Exception, match="Unsupported cipher mode xts"):
        L.create(L.CreateOptions(cipher_alg="cast5-128", iter_time=1), b"p", lambda n: (lambda o, d: None))
    with pytest.raises(Exception, match="XTS mode is not supported by qcowpy"):
        L.create(L.CreateOptions(cipher_alg="aes-192", iter_time=1), b"p", lambda n: (lambda o, d: None))
    with pytest.raises(Exception, match="QEMU 7.2 cannot use such an image either"):
        L.create(L.CreateOptions(cipher_alg="aes-192", cipher_mode="cbc", iter_time=1), b"p",
                 lambda n: (lambda o, d: None))
    with pytest.raises(Exception, match="No AES cipher with key size 20 available"):
        L.create(L.CreateOptions(ivgen_alg="essiv", ivgen_hash_alg="sha1", iter_time=1), b"p",
                 lambda n: (lambda o, d: None))
