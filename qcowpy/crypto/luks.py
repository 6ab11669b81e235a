"""LUKS1 (the on-disk format cryptsetup defined, as QEMU's crypto/block-luks.c uses it).

A 592-byte header names the cipher, mode, IV generator and hash, and carries a digest of the
master key; eight key slots each hold the master key, anti-forensically split and encrypted
under a key PBKDF2 derives from a passphrase. This module parses, validates (with QEMU's
messages, before anything else is read), creates, unlocks and amends that structure. It does
no I/O itself: callers hand in ``read(offset, length)`` and ``write(offset, data)`` relative
to the start of the LUKS header area.
"""
from __future__ import annotations

import os
import struct
import uuid
from dataclasses import dataclass, field
from typing import Callable

from ..errors import InvalidArgument, QcowError, UnsupportedFeature
from ..format.constants import LUKS_MAGIC
from . import afsplit
from .algorithms import (CIPHER_ALGS, CIPHER_MODES, HASH_ALGS, IVGEN_ALGS, LUKS_FAMILIES, BlockCipher,
                         check_supported, cipher_name, hash_alg, iv_len, key_len)
from .ivgen import IVGen
from .pbkdf import count_iters
from .sector import SECTOR_SIZE, SectorCipher

MAGIC = LUKS_MAGIC
VERSION = 1
NUM_SLOTS = 8
STRIPES = 4000
SALT_LEN = 32
DIGEST_LEN = 20
KEY_SLOT_OFFSET = 4096
HEADER_SECTORS = KEY_SLOT_OFFSET // SECTOR_SIZE
SLOT_ENABLED = 0x00AC71F3
SLOT_DISABLED = 0x0000DEAD
MIN_SLOT_ITERS = 1000
MIN_MASTER_KEY_ITERS = 1000
DEFAULT_ITER_TIME = 2000
ERASE_ITERATIONS = 40

_HEAD = struct.Struct(">6sH32s32s32sII20s32sI40s")
_SLOT = struct.Struct(">II32sII")
HEADER_SIZE = _HEAD.size + NUM_SLOTS * _SLOT.size
assert HEADER_SIZE == 592

Reader = Callable[[int, int], bytes]
Writer = Callable[[int, bytes], None]


class LuksError(QcowError):
    """A LUKS failure; the message is QEMU's."""


@dataclass
class KeySlot:
    active: int = SLOT_DISABLED
    iterations: int = 0
    salt: bytes = bytes(SALT_LEN)
    key_offset_sector: int = 0
    stripes: int = STRIPES

    @property
    def enabled(self) -> bool:
        return self.active == SLOT_ENABLED


@dataclass
class Header:
    magic: bytes = MAGIC
    version: int = VERSION
    cipher_name: bytes = b""
    cipher_mode: bytes = b""
    hash_spec: bytes = b""
    payload_offset_sector: int = 0
    master_key_len: int = 0
    master_key_digest: bytes = bytes(DIGEST_LEN)
    master_key_salt: bytes = bytes(SALT_LEN)
    master_key_iterations: int = 0
    uuid: bytes = bytes(40)
    slots: list[KeySlot] = field(default_factory=lambda: [KeySlot() for _ in range(NUM_SLOTS)])

    def pack(self) -> bytes:
        out = _HEAD.pack(self.magic, self.version, self.cipher_name, self.cipher_mode, self.hash_spec,
                         self.payload_offset_sector, self.master_key_len, self.master_key_digest,
                         self.master_key_salt, self.master_key_iterations, self.uuid)
        return out + b"".join(_SLOT.pack(s.active, s.iterations, s.salt, s.key_offset_sector, s.stripes)
                              for s in self.slots)


def parse_header(buf: bytes) -> Header:
    if len(buf) < HEADER_SIZE:
        raise LuksError("Request for data outside of extension header")
    f = _HEAD.unpack_from(buf, 0)
    slots = [KeySlot(*_SLOT.unpack_from(buf, _HEAD.size + i * _SLOT.size)) for i in range(NUM_SLOTS)]
    return Header(*f, slots=slots)


def _cstr(b: bytes) -> str:
    return b.split(b"\0", 1)[0].decode("latin-1")


def _splitkey_sectors(master_key_len: int, stripes: int) -> int:
    """Sectors of one slot's key material, rounded to the header's 8 sectors; the product
    wraps at 32 bits as QEMU computes it, so hostile headers get QEMU's verdicts."""
    sectors = ((master_key_len * stripes) % (1 << 32) + SECTOR_SIZE - 1) // SECTOR_SIZE
    return (sectors + HEADER_SECTORS - 1) // HEADER_SECTORS * HEADER_SECTORS


def check_header(h: Header) -> None:
    """QEMU's qcrypto_block_luks_check_header, in its order and words."""
    if h.magic != MAGIC:
        raise LuksError("Volume is not in LUKS format")
    if h.version != VERSION:
        raise LuksError(f"LUKS version {h.version} is not supported")
    for value, what in ((h.cipher_name, "cipher name"), (h.cipher_mode, "cipher mode"), (h.hash_spec, "hash spec")):
        if b"\0" not in value:
            raise LuksError(f"LUKS header {what} is not NUL terminated")
    if h.payload_offset_sector < HEADER_SECTORS:
        raise LuksError("LUKS payload is overlapping with the header")
    if h.master_key_iterations == 0:
        raise LuksError("LUKS key iteration count is zero")
    spans = []
    for i, s in enumerate(h.slots):
        start, length = s.key_offset_sector, _splitkey_sectors(h.master_key_len, s.stripes)
        if s.stripes != STRIPES:
            raise LuksError(f"Keyslot {i} is corrupted (stripes {_i32(s.stripes)} != {STRIPES})")
        if s.active not in (SLOT_ENABLED, SLOT_DISABLED):
            raise LuksError(f"Keyslot {i} state (active/disable) is corrupted")
        if s.enabled and s.iterations == 0:
            raise LuksError(f"Keyslot {i} iteration count is zero")
        if start < HEADER_SECTORS:
            raise LuksError(f"Keyslot {i} is overlapping with the LUKS header")
        if start + length > h.payload_offset_sector:
            raise LuksError(f"Keyslot {i} is overlapping with the encrypted payload")
        spans.append((start, length))
    for i in range(NUM_SLOTS):
        for j in range(i + 1, NUM_SLOTS):
            (a, alen), (b, blen) = spans[i], spans[j]
            if a + alen > b and b + blen > a:
                raise LuksError(f"Keyslots {i} and {j} are overlapping in the header")


def _i32(v: int) -> int:
    return v - (1 << 32) if v >= 1 << 31 else v


@dataclass(frozen=True)
class Algorithms:
    """What a header's names mean (QEMU's qcrypto_block_luks_parse_header)."""

    cipher_alg: str
    cipher_mode: str
    ivgen_alg: str
    ivgen_hash_alg: str | None
    ivgen_cipher_alg: str
    hash_alg: str


def essiv_cipher(cipher_alg: str, hash_name: str) -> str:
    """The cipher ESSIV encrypts sector numbers with: the data cipher's family, keyed by the
    hash's digest length (QEMU's qcrypto_block_luks_essiv_cipher)."""
    digest = HASH_ALGS[hash_name]
    if digest == key_len(cipher_alg):
        return cipher_alg
    family = CIPHER_ALGS[cipher_alg][0]
    names = {"aes": "AES", "serpent": "Serpent", "twofish": "Twofish"}
    if family in names:
        if digest in (16, 24, 32):
            return f"{family}-{digest * 8}"
        raise InvalidArgument(f"No {names[family]} cipher with key size {digest} available")
    raise InvalidArgument(f"Cipher {cipher_alg} not supported with essiv")


def parse_algorithms(h: Header) -> Algorithms:
    mode_spec = _cstr(h.cipher_mode)
    mode, dash, ivspec = mode_spec.partition("-")
    if not dash:
        raise LuksError(f"Unexpected cipher mode string format '{mode_spec}'")
    ivgen, colon, ivhash = ivspec.partition(":")
    if colon and ivhash not in HASH_ALGS:
        raise LuksError(f"Hash algorithm '{ivhash}' not supported")
    if mode not in CIPHER_MODES:
        raise LuksError(f"Cipher mode '{mode}' not supported")
    name = _cstr(h.cipher_name)
    nbytes = h.master_key_len // 2 if mode == "xts" else h.master_key_len
    if name not in LUKS_FAMILIES or nbytes not in LUKS_FAMILIES[name] or (mode == "xts" and h.master_key_len % 2):
        raise LuksError(f"Algorithm '{name}' with key size {_i32(nbytes)} bytes not supported")
    cipher = cipher_name(name, nbytes)
    hname = _cstr(h.hash_spec)
    if hname not in HASH_ALGS:
        raise LuksError(f"Hash algorithm '{hname}' not supported")
    if ivgen not in IVGEN_ALGS:
        raise LuksError(f"IV generator '{ivgen}' not supported")
    if ivgen == "essiv":
        if not colon:
            raise LuksError("Missing IV generator hash specification")
        try:
            ivcipher = essiv_cipher(cipher, ivhash)
        except InvalidArgument as e:
            raise LuksError(str(e)) from None
    else:
        ivcipher = cipher
    return Algorithms(cipher, mode, ivgen, ivhash if colon else None, ivcipher, hname)


def _check_material(h: Header, alg: Algorithms) -> None:
    """Refuse what QEMU 7.2 cannot process either (it aborts on an assertion): key material
    that is not a whole number of 512-byte sectors (aes-192 outside XTS)."""
    if h.master_key_len * STRIPES % SECTOR_SIZE:
        raise UnsupportedFeature(f"LUKS key material of {h.master_key_len * STRIPES} bytes is not a whole "
                                 f"number of sectors ({alg.cipher_alg} in {alg.cipher_mode} mode); QEMU 7.2 "
                                 "cannot use such an image either")


class Luks:
    """A parsed, validated LUKS header and, once unlocked, the master key."""

    def __init__(self, header: Header):
        check_header(header)
        self.header = header
        self.alg = parse_algorithms(header)
        self.hash = hash_alg(self.alg.hash_alg)
        self.master_key: bytes | None = None

    @classmethod
    def load(cls, read: Reader) -> "Luks":
        return cls(parse_header(read(0, HEADER_SIZE)))

    @property
    def payload_offset(self) -> int:
        return self.header.payload_offset_sector * SECTOR_SIZE

    # ------------------------------------------------------------------ key slots
    def _slot_sector_cipher(self, key: bytes) -> SectorCipher:
        a = self.alg
        niv = iv_len(a.cipher_alg, a.cipher_mode)
        return SectorCipher(BlockCipher(a.cipher_alg, a.cipher_mode, key),
                            IVGen(a.ivgen_alg, niv, a.ivgen_cipher_alg, a.ivgen_hash_alg, key))

    def load_key(self, index: int, password: bytes, read: Reader) -> bytes | None:
        """The master key if ``password`` opens slot ``index``, else None."""
        h, slot = self.header, self.header.slots[index]
        if not slot.enabled:
            return None
        _check_material(h, self.alg)
        check_supported(self.alg.cipher_alg, self.alg.cipher_mode)
        nkey = h.master_key_len
        possible = self.hash.pbkdf2(password, slot.salt, slot.iterations, nkey)
        material = read(slot.key_offset_sector * SECTOR_SIZE, nkey * slot.stripes)
        split = self._slot_sector_cipher(possible).decrypt(material, 0)
        key = afsplit.decode(self.hash, split, nkey, slot.stripes)
        digest = self.hash.pbkdf2(key, h.master_key_salt, h.master_key_iterations, DIGEST_LEN)
        return key if digest == h.master_key_digest else None

    def unlock(self, password: bytes, read: Reader) -> bytes:
        """Try every slot, as QEMU does; the master key, or QEMU's error."""
        for i in range(NUM_SLOTS):
            key = self.load_key(i, password, read)
            if key is not None:
                self.master_key = key
                return key
        raise LuksError("Invalid password, cannot unlock any keyslot")

    def store_key(self, index: int, password: bytes, master_key: bytes, iter_time: int, write: Writer) -> None:
        """Put ``master_key`` in slot ``index`` under ``password``, then write the header."""
        h, slot = self.header, self.header.slots[index]
        slot.salt = os.urandom(SALT_LEN)
        slot.iterations = count_iters(self.hash, h.master_key_len, iter_time, minimum=MIN_SLOT_ITERS)
        slot_key = self.hash.pbkdf2(password, slot.salt, slot.iterations, h.master_key_len)
        split = afsplit.encode(self.hash, master_key, slot.stripes)
        write(slot.key_offset_sector * SECTOR_SIZE, self._slot_sector_cipher(slot_key).encrypt(split, 0))
        slot.active = SLOT_ENABLED
        write(0, h.pack())

    def erase_key(self, index: int, write: Writer) -> None:
        """Disable slot ``index`` (header first), then overwrite its material with random bytes."""
        h, slot = self.header, self.header.slots[index]
        slot.salt, slot.iterations, slot.active = bytes(SALT_LEN), 0, SLOT_DISABLED
        write(0, h.pack())
        for _ in range(ERASE_ITERATIONS):
            write(slot.key_offset_sector * SECTOR_SIZE, os.urandom(h.master_key_len * slot.stripes))

    def active_slots(self) -> list[int]:
        return [i for i, s in enumerate(self.header.slots) if s.enabled]

    # ------------------------------------------------------------------ data
    def data_cipher(self, master_key: bytes | None = None) -> SectorCipher:
        key = master_key or self.master_key
        if key is None:
            raise LuksError("Parameter 'encrypt.key-secret' is required for cipher")
        return self._slot_sector_cipher(key)

    def info(self) -> dict:
        """QCryptoBlockInfoLUKS, in the QAPI schema's field order (after ``format``)."""
        a, h = self.alg, self.header
        out: dict = {"cipher-alg": a.cipher_alg, "cipher-mode": a.cipher_mode, "ivgen-alg": a.ivgen_alg}
        if a.ivgen_alg == "essiv":
            out["ivgen-hash-alg"] = a.ivgen_hash_alg
        out["hash-alg"] = a.hash_alg
        out["payload-offset"] = self.payload_offset
        out["master-key-iters"] = h.master_key_iterations
        out["uuid"] = h.uuid.split(b"\0", 1)[0].decode("latin-1")
        slots = []
        for s in h.slots:
            d: dict = {"active": s.enabled}
            if s.enabled:
                d["iters"] = s.iterations
                d["stripes"] = s.stripes
            d["key-offset"] = s.key_offset_sector * SECTOR_SIZE
            slots.append(d)
        out["slots"] = slots
        return out


@dataclass
class CreateOptions:
    """``encrypt.*`` creation options, with QEMU's defaults."""

    cipher_alg: str = "aes-256"
    cipher_mode: str = "xts"
    ivgen_alg: str = "plain64"
    ivgen_hash_alg: str | None = None
    hash_alg: str = "sha256"
    iter_time: int = DEFAULT_ITER_TIME

    def validate(self) -> None:
        for value, name, allowed in ((self.cipher_alg, "cipher-alg", CIPHER_ALGS),
                                     (self.cipher_mode, "cipher-mode", CIPHER_MODES),
                                     (self.ivgen_alg, "ivgen-alg", IVGEN_ALGS),
                                     (self.hash_alg, "hash-alg", HASH_ALGS)):
            if value not in allowed:
                raise InvalidArgument(f"Parameter '{name}' does not accept value '{value}'")
        if self.ivgen_hash_alg is not None and self.ivgen_hash_alg not in HASH_ALGS:
            raise InvalidArgument(f"Parameter 'ivgen-hash-alg' does not accept value '{self.ivgen_hash_alg}'")


def create(opts: CreateOptions, password: bytes, init: Callable[[int], Writer]) -> Luks:
    """A new LUKS header with slot 0 holding a random master key under ``password``.

    ``init(length)`` reserves (and zero-fills) the header area of ``length`` bytes and returns
    the writer for it, as QEMU's initfunc does; the master key stays in the returned object."""
    opts.validate()
    ivhash = opts.ivgen_hash_alg
    if opts.ivgen_alg == "essiv" and ivhash is None:
        ivhash = "sha256"
    family = CIPHER_ALGS[opts.cipher_alg][0]
    if family not in LUKS_FAMILIES:
        raise InvalidArgument(f"Algorithm '{opts.cipher_alg}' not supported")
    mode_spec = f"{opts.cipher_mode}-{opts.ivgen_alg}" + (f":{ivhash}" if ivhash else "")
    ivcipher = essiv_cipher(opts.cipher_alg, ivhash) if opts.ivgen_alg == "essiv" else opts.cipher_alg  # type: ignore[arg-type]
    nkey = key_len(opts.cipher_alg) * (2 if opts.cipher_mode == "xts" else 1)
    check_supported(opts.cipher_alg, opts.cipher_mode)
    check_supported(ivcipher, "ecb")
    for text, what in ((family, "Cipher name"), (mode_spec, "Cipher mode"), (opts.hash_alg, "Hash name")):
        if len(text) >= 32:
            raise InvalidArgument(f"{what} '{text}' is too long for LUKS header")
    h = Header(cipher_name=family.encode().ljust(32, b"\0"), cipher_mode=mode_spec.encode().ljust(32, b"\0"),
               hash_spec=opts.hash_alg.encode().ljust(32, b"\0"),
               master_key_len=nkey, master_key_salt=os.urandom(SALT_LEN),
               uuid=str(uuid.uuid4()).encode().ljust(40, b"\0"))
    alg = Algorithms(opts.cipher_alg, opts.cipher_mode, opts.ivgen_alg, ivhash, ivcipher, opts.hash_alg)
    _check_material(h, alg)
    master_key = os.urandom(nkey)
    hsh = hash_alg(opts.hash_alg)
    h.master_key_iterations = count_iters(hsh, DIGEST_LEN, opts.iter_time, divisor=8, minimum=MIN_MASTER_KEY_ITERS)
    h.master_key_digest = hsh.pbkdf2(master_key, h.master_key_salt, h.master_key_iterations, DIGEST_LEN)
    split_sectors = _splitkey_sectors(nkey, STRIPES)
    for i, s in enumerate(h.slots):
        s.key_offset_sector = HEADER_SECTORS + i * split_sectors
    h.payload_offset_sector = HEADER_SECTORS + NUM_SLOTS * split_sectors
    luks = Luks(h)
    write = init(luks.payload_offset)
    luks.store_key(0, password, master_key, opts.iter_time, write)
    luks.master_key = master_key
    return luks


def header_area_size(opts: CreateOptions) -> int:
    """Bytes of the header and eight key slots ``create`` would lay out (the payload offset,
    as QEMU's qcrypto_block_calculate_payload_offset computes it for measure)."""
    opts.validate()
    nkey = key_len(opts.cipher_alg) * (2 if opts.cipher_mode == "xts" else 1)
    return (HEADER_SECTORS + NUM_SLOTS * _splitkey_sectors(nkey, STRIPES)) * SECTOR_SIZE


# ---------------------------------------------------------------------- amending key slots
@dataclass
class AmendOptions:
    """QEMU's QCryptoBlockAmendOptionsLUKS: ``state`` is "active" or "inactive"; secrets are
    the passphrases themselves (callers resolve ids)."""

    state: str
    new_secret: bytes | None = None
    old_secret: bytes | None = None
    keyslot: int | None = None
    iter_time: int | None = None
    secret: bytes | None = None  # the passphrase that unlocks the image (to add a slot)


def amend(luks: Luks, opts: AmendOptions, read: Reader, write: Writer, force: bool = False) -> None:
    """Add or erase key slots with QEMU's checks and messages (crypto/block-luks.c amend)."""
    if opts.state == "active":
        _add_keyslot(luks, opts, read, write, force)
    elif opts.state == "inactive":
        _erase_keyslots(luks, opts, read, write, force)
    else:
        raise InvalidArgument(f"Parameter 'state' does not accept value '{opts.state}'")


def _add_keyslot(luks: Luks, o: AmendOptions, read: Reader, write: Writer, force: bool) -> None:
    if o.new_secret is None:
        raise LuksError("'new-secret' is required to activate a keyslot")
    if o.old_secret is not None:
        raise LuksError("'old-secret' must not be given when activating keyslots")
    if o.keyslot is not None:
        slot = o.keyslot
        if not 0 <= slot < NUM_SLOTS:
            raise LuksError(f"Invalid keyslot {slot % (1 << 32)} specified, must be between 0 and {NUM_SLOTS - 1}")
    else:
        free = [i for i in range(NUM_SLOTS) if not luks.header.slots[i].enabled]
        if not free:
            raise LuksError("Can't add a keyslot - all keyslots are in use")
        slot = free[0]
    if not force and luks.header.slots[slot].enabled:
        raise LuksError(f"Refusing to overwrite active keyslot {slot} - please erase it first")
    if o.secret is None:
        raise LuksError("Parameter 'encrypt.key-secret' is required for cipher")
    try:
        master = luks.unlock(o.secret, read)
    except LuksError as e:
        raise LuksError(f"{e}\nFailed to retrieve the master key") from None
    luks.store_key(slot, o.new_secret, master, DEFAULT_ITER_TIME if o.iter_time is None else o.iter_time, write)


def _erase_keyslots(luks: Luks, o: AmendOptions, read: Reader, write: Writer, force: bool) -> None:
    if o.new_secret is not None:
        raise LuksError("'new-secret' must not be given when erasing keyslots")
    if o.iter_time is not None:
        raise LuksError("'iter-time' must not be given when erasing keyslots")
    if o.secret is not None:
        raise LuksError("'secret' must not be given when erasing keyslots")
    active = luks.active_slots()
    if o.keyslot is not None:
        slot = o.keyslot
        if not 0 <= slot < NUM_SLOTS:
            raise LuksError(f"Invalid keyslot {slot} specified, must be between 0 and {NUM_SLOTS - 1}")
        if o.old_secret is not None and luks.load_key(slot, o.old_secret, read) is None:
            raise LuksError(f"Given keyslot {slot} doesn't contain the given old password for erase operation")
        if not force and slot not in active:
            raise LuksError(f"Given keyslot {slot} is already erased (inactive) ")
        if not force and len(active) == 1:
            raise LuksError(f"Attempt to erase the only active keyslot {slot} which will erase all the data in "
                            "the image irreversibly - refusing operation")
        luks.erase_key(slot, write)
    elif o.old_secret is not None:
        matching = [i for i in range(NUM_SLOTS) if luks.load_key(i, o.old_secret, read) is not None]
        if not matching:
            raise LuksError("No keyslots match given (old) password for erase operation")
        if not force and len(matching) == len(active):
            raise LuksError("All the active keyslots match the (old) password that was given and erasing them "
                            "will erase all the data in the image irreversibly - refusing operation")
        for i in matching:
            luks.erase_key(i, write)
    else:
        raise LuksError("To erase keyslot(s), either explicit keyslot index or the password currently "
                        "contained in them must be given")
