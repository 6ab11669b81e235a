"""Encryption in a qcow2 image: which method, where the LUKS header lies, and the cipher.

The engine calls ``ImageCrypto.read_into``/``encrypt`` for every data cluster it reads or
writes. LUKS (crypt_method 2) numbers sectors by *host* offset, as QEMU does (so a cluster
moved by copy-on-write is re-encrypted); the legacy AES method (1) by guest offset. The LUKS
header area is a run of clusters the refcounts own, named by the 0x0537be77 extension; it is
allocated and written here, through the metadata owner, at creation, and its key slots change
on amend. Compressed clusters are stored unencrypted, as QEMU stores them.
"""
from __future__ import annotations

from typing import TYPE_CHECKING

from ..errors import CorruptImage, EncryptionError, InvalidArgument, UnsupportedFeature
from ..format import constants as C
from ..format.fde import pack_fde, parse_fde
from ..format.header import Header

if TYPE_CHECKING:
    from ..crypto import luks as L
    from ..crypto.sector import SectorCipher

FORMATS = {C.CRYPT_AES: "aes", C.CRYPT_LUKS: "luks"}
SECTOR_SIZE = 512


def _luks():
    """The LUKS module, imported on first use: the ciphers (``cryptography``) load only for
    images that are encrypted, not on every start-up."""
    from ..crypto import luks
    return luks


def aes_cipher(password: bytes) -> "SectorCipher":
    from ..crypto.qcowaes import aes_cipher as make
    return make(password)
NO_KEY = "Parameter 'encrypt.key-secret' is required for cipher"


class ImageCrypto:
    """One image's encryption: ``cipher`` is None until a passphrase unlocked it."""

    def __init__(self, method: int, luks: L.Luks | None = None, area: tuple[int, int] | None = None,
                 physical: bool | None = None):
        self.method = method
        self.luks = luks
        self.area = area  # (offset, length) of the LUKS header area in the file
        self.cipher: SectorCipher | None = None
        self.password: bytes | None = None  # what unlocked it (amend adds key slots with it)
        # QEMU numbers sectors by host offset in qcow2 LUKS; by guest offset for legacy AES and
        # for the raw LUKS format (block/luks.py), whose payload starts at sector 0
        self.physical = method != C.CRYPT_AES if physical is None else physical

    @property
    def format(self) -> str:
        return FORMATS[self.method]

    def unlock(self, password: bytes, file) -> None:
        self.password = password
        if self.luks is None:
            self.cipher = aes_cipher(password)
        else:
            self.luks.unlock(password, area_reader(file, self.area))  # type: ignore[arg-type]
            self.cipher = self.luks.data_cipher()

    def _require(self) -> SectorCipher:
        if self.cipher is None:
            raise EncryptionError(NO_KEY)
        return self.cipher

    def read_into(self, file, dst: memoryview, host: int, guest: int) -> None:
        """Decrypt ``len(dst)`` bytes stored at ``host`` (guest offset ``guest``) into ``dst``;
        the request may cut sectors: whole sectors are read around it."""
        cipher = self._require()
        head = guest % SECTOR_SIZE
        a = host - head
        n = (head + len(dst) + SECTOR_SIZE - 1) // SECTOR_SIZE * SECTOR_SIZE
        plain = cipher.decrypt(file.pread(n, a), a if self.physical else guest - head)
        dst[:] = memoryview(plain)[head:head + len(dst)]

    def encrypt(self, data, host: int, guest: int) -> bytes:
        """Ciphertext of whole sectors about to be stored at ``host``."""
        return self._require().encrypt(data, host if self.physical else guest)

    def info(self) -> dict:
        """QCryptoBlockInfo (format first, then the LUKS fields)."""
        out: dict = {"format": self.format}
        if self.luks is not None:
            out.update(self.luks.info())
        return out


def area_reader(file, area: tuple[int, int]):
    offset, length = area

    def read(off: int, n: int) -> bytes:
        if off + n > length:
            raise EncryptionError("Request for data outside of extension header")
        return file.pread(n, offset + off)
    return read


def area_writer(file, area: tuple[int, int]):
    offset, length = area

    def write(off: int, data: bytes) -> None:
        if off + len(data) > length:
            raise EncryptionError("Request for data outside of extension header")
        file.pwrite(data, offset + off)
    return write


def validate_method(h: Header) -> None:
    """What opening refuses from the header alone, before anything is read."""
    if h.crypt_method not in (C.CRYPT_NONE, C.CRYPT_AES, C.CRYPT_LUKS):
        raise UnsupportedFeature(f"Unsupported encryption method {h.crypt_method}")
    ext = h.find_extension(C.EXT_FDE)
    if ext is not None:
        parse_fde(ext.data, h.crypt_method, h.cluster_size)


def open_crypto(h: Header, file, password: bytes | None, no_io: bool = False,
                encrypt_format: str | None = None) -> ImageCrypto | None:
    """The image's encryption, unlocked with ``password`` unless ``no_io`` (qemu-img info's
    open, which reads the LUKS header but no data). QEMU's checks in QEMU's order."""
    if not h.crypt_method:
        if encrypt_format:
            raise EncryptionError(f"No encryption in image header, but options specified format '{encrypt_format}'")
        return None
    fmt = FORMATS[h.crypt_method]
    if encrypt_format and encrypt_format != fmt:
        raise EncryptionError(f"Header reported '{fmt}' encryption format but options specify '{encrypt_format}'")
    if not no_io and password is None:
        raise EncryptionError(NO_KEY)
    if h.crypt_method == C.CRYPT_AES:
        crypto = ImageCrypto(C.CRYPT_AES)
    else:
        ext = h.find_extension(C.EXT_FDE)
        if ext is None:  # (qemu-img 7.2 info crashes on such an image; qcowpy refuses it cleanly)
            raise EncryptionError(f"Missing CRYPTO header for crypt method {h.crypt_method}")
        area = parse_fde(ext.data, h.crypt_method, h.cluster_size)
        try:
            crypto = ImageCrypto(C.CRYPT_LUKS, _luks().Luks.load(area_reader(file, area)), area)
        except _luks().LuksError as e:
            raise EncryptionError(str(e)) from None
    if not no_io:
        try:
            crypto.unlock(password, file)  # type: ignore[arg-type]
        except _luks().LuksError as e:
            raise EncryptionError(str(e)) from None
    return crypto


# ---------------------------------------------------------------------- creation
def set_up(img, fmt: str, password: bytes, opts: L.CreateOptions | None = None) -> ImageCrypto:
    """Make the freshly created, still empty ``img`` encrypted (QEMU's qcow2_set_up_encryption):
    for LUKS, allocate the header area after the existing clusters, zero it, write the LUKS
    header and key slot 0, then point the qcow2 header at it."""
    meta = img.meta
    h = meta.header.copy()
    if fmt == "aes":
        h.crypt_method = C.CRYPT_AES
        crypto = ImageCrypto(C.CRYPT_AES)
        crypto.cipher = aes_cipher(password)
    elif fmt == "luks":
        holder: dict = {}

        def init(length: int):
            offset = meta.refcounts.alloc_clusters(meta.clusters_for(length))
            clusters = meta.clusters_for(length) * img.cluster_size
            img.file.pwrite(bytes(clusters), offset)
            holder["area"] = (offset, length)
            return area_writer(img.file, holder["area"])
        luks = _luks().create(opts or _luks().CreateOptions(), password, init)
        h.crypt_method = C.CRYPT_LUKS
        h.set_extension(C.EXT_FDE, pack_fde(*holder["area"]))
        crypto = ImageCrypto(C.CRYPT_LUKS, luks, holder["area"])
        crypto.cipher = luks.data_cipher()
    else:
        raise InvalidArgument(f"Parameter 'format' does not accept value '{fmt}'")
    meta.sync()  # the area's refcounts reach the disk before the header names it
    meta.rewrite_header(h)
    img.file.flush()
    img.crypto = crypto
    return crypto


# ---------------------------------------------------------------------- amend
def amend_keyslots(img, opts: L.AmendOptions, force: bool = False) -> None:
    """Add or erase LUKS key slots of an image opened read-write (qemu-img amend's
    ``encrypt.*`` options); QEMU's refusals and messages."""
    crypto = img.crypto
    if crypto is None:
        raise InvalidArgument("image is not encrypted, can't amend")
    if crypto.luks is None:
        raise UnsupportedFeature("Amending encryption options is only supported for LUKS")
    img.require_writable()
    try:
        _luks().amend(crypto.luks, opts, area_reader(img.file, crypto.area), area_writer(img.file, crypto.area), force)
    except _luks().LuksError as e:
        raise EncryptionError(str(e)) from None
    img.file.flush()


def check_area(h: Header) -> tuple[int, int] | None:
    """The LUKS header area's (offset, length) for the refcount check, if the image has one."""
    ext = h.find_extension(C.EXT_FDE)
    if ext is None or h.crypt_method != C.CRYPT_LUKS:
        return None
    try:
        return parse_fde(ext.data, h.crypt_method, h.cluster_size)
    except CorruptImage:
        return None
