"""The ``luks`` format: a LUKS1 container as QEMU's block/crypto.c drives it.

The file starts with the LUKS header and its eight key-slot areas; the guest's bytes follow at
the header's payload offset, every 512-byte sector encrypted with the master key, the IV taken
from the sector's number *in the payload* (guest offset / 512). Everything LUKS itself means
(header, key slots, ciphers) is qcowpy/crypto; this driver only places it in a file, over the
raw driver as QEMU puts it over the file protocol. As in QEMU the format has no allocation
state (every byte is data), discards are ignored and zero writes store encrypted zeros.
"""
from __future__ import annotations

import os
import threading
from typing import Callable, Iterator

from ..crypto import luks as L
from ..crypto.sector import SECTOR_SIZE
from ..errors import FormatError, InvalidArgument, QcowError, ReadOnlyError
from ..format import constants as C
from ..hostfile import HostFile, set_create_hints, size_new_file
from ..qcow2.encryption import EncryptionError, ImageCrypto
from .device import BlockDevice, LayerStatus, ReadsInto
from .raw import RawDevice

NO_KEY = "Parameter 'key-secret' is required for cipher"
CHUNK = 1 << 20  # bytes encrypted per step of a long request


def _luks_errors(fn):
    """LUKS failures carry QEMU's message as EncryptionError, as the qcow2 path raises them."""
    def wrapped(*args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except L.LuksError as e:
            raise EncryptionError(str(e)) from None
    return wrapped


@_luks_errors
def load(raw: RawDevice, password: bytes | None, no_io: bool = False) -> ImageCrypto:
    """The container's crypto state, unlocked with ``password`` unless ``no_io``."""
    if raw.file.pread(len(L.MAGIC), 0) != L.MAGIC:
        raise FormatError("Volume is not in LUKS format")
    luks = L.Luks.load(lambda off, n: raw.file.pread(n, off))
    crypto = ImageCrypto(C.CRYPT_LUKS, luks, (0, luks.payload_offset), physical=False)
    if not no_io:
        if password is None:
            raise EncryptionError(NO_KEY)
        crypto.unlock(password, raw.file)
    return crypto


class LuksDevice(ReadsInto, BlockDevice):
    """A LUKS container image; ``crypto`` is qcow2's ImageCrypto with guest-numbered sectors."""

    format = "luks"
    encrypted = True
    has_zero_init = False  # a new container's payload decrypts to noise

    def __init__(self, raw: RawDevice, password: bytes | None, no_io: bool = False):
        self.raw, self.file = raw, raw.file
        self.filename, self.read_only = raw.filename, raw.read_only
        self._lock = threading.RLock()
        try:
            self.crypto = load(raw, password, no_io)
        except BaseException:
            raw.close()
            raise
        self.payload = self.crypto.luks.payload_offset  # type: ignore[union-attr]
        if self.payload > raw.size:
            raw.close()
            raise QcowError("Could not refresh total sector count: Input/output error")

    @property
    def size(self) -> int:
        return self.raw.size - self.payload

    # ---------------------------------------------------------------- data
    def preadinto(self, buf: bytearray | memoryview, offset: int) -> None:
        view = memoryview(buf).cast("B")
        self.check_range(offset, len(view))
        for pos in range(0, len(view), CHUNK):
            part = view[pos:pos + CHUNK]
            self.crypto.read_into(self.file, part, self.payload + offset + pos, offset + pos)

    def pwrite(self, data: bytes | bytearray | memoryview, offset: int) -> None:
        """Encrypt whole sectors; a request that cuts a sector first reads (decrypts) it, as
        QEMU's block layer does for a driver whose request alignment is one sector."""
        mv = memoryview(data).cast("B")
        self.require_writable()
        self.check_range(offset, len(mv))
        with self._lock:
            for pos in range(0, len(mv), CHUNK):
                self._write_sectors(mv[pos:pos + CHUNK], offset + pos)

    def _write_sectors(self, mv: memoryview, offset: int) -> None:
        head = offset % SECTOR_SIZE
        start = offset - head
        end = -(-(offset + len(mv)) // SECTOR_SIZE) * SECTOR_SIZE
        if head or (offset + len(mv)) % SECTOR_SIZE:
            plain = bytearray(end - start)
            self.preadinto(memoryview(plain)[:SECTOR_SIZE], start)
            self.preadinto(memoryview(plain)[-SECTOR_SIZE:], end - SECTOR_SIZE)
            plain[head:head + len(mv)] = mv
            mv = memoryview(plain)
        self.file.pwrite(self.crypto.encrypt(mv, self.payload + start, start), self.payload + start)

    def write_zeroes(self, length: int, offset: int, unmap: bool = False) -> None:
        """Encrypted zeros (QEMU's crypto driver has no zero-write operation of its own)."""
        self.require_writable()
        self.check_range(offset, length)
        for pos in range(offset, offset + length, CHUNK):
            self.pwrite(bytes(min(CHUNK, offset + length - pos)), pos)

    def discard(self, length: int, offset: int) -> None:
        """Ignored, as in QEMU: a hole in the file would decrypt to garbage."""
        self.require_writable()
        self.check_range(offset, length)

    def flush(self) -> None:
        self.raw.flush()

    def truncate(self, size: int, preallocation: str = "off") -> None:
        """The file becomes payload offset + ``size`` bytes; the raw driver's preallocation
        applies to the new bytes (unencrypted, as QEMU leaves them)."""
        self.require_writable()
        self.raw.truncate(self.payload + size, preallocation)

    def layer_status(self, offset: int, length: int, max_extents: int | None = None) -> Iterator[LayerStatus]:
        """All data, no host offset: QEMU's answer for a format without block status."""
        self.check_range(offset, length)
        yield LayerStatus(offset, length, data=True, zero=False)

    # ---------------------------------------------------------------- what qemu-img shows
    def allocated_size(self) -> int | None:
        return self.raw.allocated_size()

    def specific_info(self) -> tuple[str, dict]:
        """ImageInfoSpecific: ``{"type": "luks", "data": QCryptoBlockInfoLUKS}``."""
        return "luks", self.crypto.luks.info()  # type: ignore[union-attr]

    # ---------------------------------------------------------------- key slots
    # qemu-img amend -f luks: tools/encrypt_amend.py hands this device (crypto, file,
    # require_writable) to qcow2.encryption.amend_keyslots, whose key-slot area here is the
    # file's head

    def require_writable(self) -> None:
        if self.read_only:
            raise ReadOnlyError(f"'{self.filename}' is opened read-only")

    def _close_self(self) -> None:
        self.raw.close()


# -------------------------------------------------------------------- creation
def create_luks(path: str, size: int, opts: L.CreateOptions, password: bytes | Callable[[], bytes],
                preallocation: str = "off", nocow: bool = False, extent_size_hint: int | None = None,
                warn: Callable[[str], None] | None = None) -> None:
    """A new LUKS container of ``size`` guest bytes (QEMU's block_crypto_co_create_opts_luks):
    the file is created first (the file protocol's hints apply), then sized to the header area
    plus ``size`` with ``preallocation`` (metadata means off), then the header and key slot 0
    are written. ``password`` may be a callable: the secret is looked up only then, as QEMU
    does. On failure the file is removed, even one that existed before (QEMU: it was
    truncated and corrupted anyway)."""
    if preallocation == "metadata":
        preallocation = "off"
    if preallocation not in ("off", "falloc", "full"):
        raise InvalidArgument(f"Unsupported preallocation mode: {preallocation}")
    f = HostFile(path, writable=True, create=True)
    try:
        message = set_create_hints(f.fd, nocow, extent_size_hint)
        if message and warn is not None:
            warn(message)
        key = password() if callable(password) else password

        def init(length: int) -> L.Writer:
            size_new_file(f, length + size, preallocation)
            return lambda off, data: f.pwrite(data, off)
        try:
            L.create(opts, key, init)
        except L.LuksError as e:
            raise EncryptionError(str(e)) from None
        f.flush()
    except BaseException:
        f.close()
        os.unlink(path)
        raise
    f.close()

