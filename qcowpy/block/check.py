"""Consistency check and repair of an image file: what the block layer offers ``check``.

qemu-img check opens the file itself (read-only unless repairing), runs the open-time
validation, then checks; a repair that fixed something is followed by a second, read-only
pass whose counts are the ones reported.
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Callable

from ..crypto.secret import resolve_key
from ..errors import ImageNotFound, QcowError
from ..format.constants import MAX_CLUSTER_BITS
from ..format.bitmaps import directory_location
from ..format.header import parse_header
from ..hostfile import PROTOCOLS, open_host_file
from ..qcow2.check import FIX_ERRORS, FIX_LEAKS, CheckFailed, CheckResult, Hint, check_file, stderr_log
from ..qcow2.encryption import open_crypto
from ..qcow2.image import Qcow2Image
from .open import open_backing, open_image, probe_bytes

__all__ = ["FIX_ERRORS", "FIX_LEAKS", "CheckNotSupported", "CheckOutcome", "CheckResult", "Hint",
           "check_image", "probe_for_check", "stderr_log"]


class CheckNotSupported(QcowError):
    """The image format has no consistency checks (qemu-img exits 63)."""


@dataclass
class CheckOutcome:
    result: CheckResult
    repaired: CheckResult | None = None  # the first pass, when it fixed something
    failed: str | None = None  # "Check failed" reason (exit 1)
    failed_lines: list[str] | None = None  # error reports printed before "Check failed"


def probe_for_check(path: str) -> str:
    """qcow2 or luks by their magic, anything else raw (which has no checks)."""
    if path.startswith(tuple(PROTOCOLS)):  # an image on a protocol (rbd:)
        f = open_host_file(path)
        try:
            return _checked_format(f.pread(8, 0))
        finally:
            f.close()
    try:
        with open(path, "rb") as f:
            return _checked_format(f.read(8))
    except FileNotFoundError:
        raise ImageNotFound(f"Could not open '{path}': No such file or directory") from None
    except OSError as e:
        raise QcowError(f"Could not open '{path}': {e.strerror}") from None


def _checked_format(head: bytes) -> str:
    fmt = probe_bytes(head)
    return fmt if fmt in ("qcow2", "luks") else "raw"


def _store_bitmaps(file) -> None:
    """After a repair, write the persistent bitmaps anew, as qemu-img check -r does by opening
    the image read-write (QEMU stores them at close): new tables and directory, the old ones
    freed, so a table entry naming a cluster past the end of the file is gone too."""
    header = parse_header(file.pread(min(file.size(), 1 << MAX_CLUSTER_BITS), 0), file.size())
    if directory_location(header) is None or header.crypt_method:
        return  # no bitmaps (an encrypted image keeps its bitmaps as they are: qcowpy deviation)
    img = Qcow2Image(file, header, writable=True)
    if img.bitmaps.items:
        img.bitmaps.activate()
        img.bitmaps.store()
        img.meta.sync()


def check_image(filename: str, fmt: str, fix: int, force_share: bool = False,
                log: Callable[[str], None] | None = None, secret: bytes | None = None) -> CheckOutcome:
    """Check (and with ``fix``, FIX_LEAKS | FIX_ERRORS, repair) one image file; an encrypted
    one needs its ``secret`` (or one the CLI attached), as qemu-img check opens it fully."""
    if fmt == "luks":  # opened (and unlocked) as qemu-img check does, then refused
        open_image(filename, "r", "luks", backing=False, force_share=force_share, secret=secret).close()
        raise CheckNotSupported("This image format does not support checks")
    file = open_host_file(filename, writable=bool(fix), force_share=force_share)
    try:
        if fmt == "raw":
            raise CheckNotSupported("This image format does not support checks")
        header = parse_header(file.pread(min(file.size(), 1 << MAX_CLUSTER_BITS), 0), file.size())
        # the open-time validation (same errors as any open; the snapshot table is the check's)
        Qcow2Image(file, header, writable=False, check_mode=True)
        key, efmt = resolve_key(filename, secret)
        open_crypto(header, file, key, encrypt_format=efmt)
        if header.backing_file:  # qemu-img check opens the whole chain first (no BDRV_O_NO_BACKING)
            st = None if filename.startswith(tuple(PROTOCOLS)) else os.stat(filename)
            open_backing(filename, header.backing_file, header.backing_format,
                         ((st.st_dev, st.st_ino),) if st else (), force_share).close()
        try:
            first = check_file(file, header, fix, log)
        except CheckFailed as e:
            return CheckOutcome(e.result, failed=str(e), failed_lines=e.lines)
        if not (first.corruptions_fixed or first.leaks_fixed):
            outcome = CheckOutcome(first)
        else:
            outcome = CheckOutcome(first, repaired=first)
            try:
                again = check_file(file, header, 0, log)
            except CheckFailed as e:
                again, outcome.failed = e.result, str(e)
            again.leaks_fixed, again.corruptions_fixed = first.leaks_fixed, first.corruptions_fixed
            outcome.result = again
        if fix and not outcome.failed and (fix & FIX_ERRORS or not outcome.result.corruptions):
            _store_bitmaps(file)  # as QEMU's close after check -r (with -r leaks only on a sound image)
        return outcome
    finally:
        file.close()
