"""One exception hierarchy for the whole package.

Library code raises these with messages a user can act on; the CLI prints the message as a
single stderr line and maps the class to qemu-img's exit code.
"""
from __future__ import annotations

import errno
import os


class QcowError(Exception):
    """Base of every error qcowpy raises on purpose."""


class InvalidArgument(QcowError, ValueError):
    """A caller passed a bad option, size or range."""


class UnsupportedFeature(QcowError):
    """The image uses something qcowpy does not implement (yet)."""


class CorruptImage(QcowError):
    """On-disk metadata is inconsistent or out of range."""


class CorruptTable(CorruptImage):
    """A table's offset or size read from the image is out of range (QEMU's
    qcow2_validate_table); ``strerror`` is the errno text QEMU fails the operation with
    (EFBIG for a size, EINVAL for an offset), which some commands print after the message."""

    EFBIG, EINVAL, EAGAIN = errno.EFBIG, errno.EINVAL, errno.EAGAIN

    def __init__(self, message: str, errno_: int):
        super().__init__(message)
        self.errno_ = errno_

    @property
    def strerror(self) -> str:
        return os.strerror(self.errno_)


class EncryptionError(QcowError):
    """Opening or using an encrypted image failed; the message is QEMU's."""


class ImageNotFound(QcowError, FileNotFoundError):
    """An image or backing file does not exist."""


class ReadOnlyError(QcowError, PermissionError):
    """A write was attempted on an image opened read-only (or forced read-only)."""


class FormatError(QcowError):
    """The file is not in the expected format (bad magic, version, probing failure)."""


class RefcountOverflow(QcowError):
    """A refcount would pass what refcount_bits can hold (QEMU's update_refcount: EINVAL)."""


class SnapshotNotFound(QcowError):
    """No internal snapshot has the id or name asked for."""


class ImageLocked(QcowError):
    """Another process holds a conflicting lock on the image."""


_HINTS: set[str] = set()


def with_hint(message: str, hint: str) -> str:
    """``message`` followed by QEMU's hint line (error_append_hint): the CLI prints the hint on
    the next line without the program name, as qemu-img does, wherever the message is wrapped."""
    _HINTS.add(hint)
    return f"{message}\n{hint}"


def is_hint(line: str) -> bool:
    """True for a line that :func:`with_hint` added to a message."""
    return line in _HINTS


class CorruptedRead(CorruptImage):
    """An access met metadata QEMU calls corrupt (qcow2_signal_corruption): it fails with EIO,
    and the event itself is reported once per image on stderr, as QEMU reports it."""

    def __init__(self, event: str, offset: int):
        super().__init__("Input/output error")
        self.event = event
        self.offset = offset  # the guest offset whose metadata is corrupt


class CompressedReadError(CorruptImage):
    """A compressed cluster that does not inflate to exactly one cluster. QEMU fails the read
    with EIO and reports no corruption event; ``str`` says why, ``strerror`` is qemu-img's."""

    strerror = "Input/output error"


READ_ERRORS = (OSError, CorruptedRead, CompressedReadError)  # a guest read failing, as QEMU's -errno


def read_error_reason(e: BaseException) -> str:
    """What qemu-img prints for a failed read: the errno's text."""
    return getattr(e, "strerror", None) or str(e)
