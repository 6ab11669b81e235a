"""Image locking compatible with QEMU: open-file-description (OFD) byte-range locks.

QEMU's file-posix driver expresses block-layer permissions as one-byte locks in the image file:
byte ``100 + i`` is read-locked by a holder that *uses* permission bit ``i``; byte ``200 + i`` is
read-locked by a holder that does *not share* it with others. Before taking its own bytes a
newcomer tests (F_OFD_GETLK with a write lock) the bytes that would conflict: ``200 + i`` for
each permission it wants, ``100 + i`` for each permission it will not share.

Permission bits (include/block/block-common.h): consistent read 0, write 1, write unchanged 2,
resize 3. A QEMU writer (qemu-io, a VM) uses read, write and resize and shares only read and
write-unchanged; a reader uses read and shares the same. ``force_share`` (``-U``) shares
everything, so it neither conflicts with a writer nor stops one.

Set ``QCOWPY_LOCKING=off`` in the environment to disable locking (QEMU's ``file.locking=off``).
"""
from __future__ import annotations

import errno
import fcntl
import os
import struct

from .errors import ImageLocked

PERM_CONSISTENT_READ = 0x1
PERM_WRITE = 0x2
PERM_WRITE_UNCHANGED = 0x4
PERM_RESIZE = 0x8
PERM_ALL = 0xF
PERM_BASE = 100
SHARED_BASE = 200
PERM_NAMES = {PERM_CONSISTENT_READ: "consistent read", PERM_WRITE: "write",
              PERM_WRITE_UNCHANGED: "write unchanged", PERM_RESIZE: "resize"}

_F_OFD_GETLK = getattr(fcntl, "F_OFD_GETLK", 36)
_F_OFD_SETLK = getattr(fcntl, "F_OFD_SETLK", 37)
_FLOCK = "hhqqi"  # struct flock on Linux: l_type, l_whence, l_start, l_len, l_pid


def enabled() -> bool:
    return os.environ.get("QCOWPY_LOCKING", "on").lower() not in ("off", "0", "no", "false")


def permissions(writable: bool, force_share: bool = False) -> tuple[int, int]:
    """(permissions used, permissions shared) the way qemu-img/qemu-io open an image."""
    perm = PERM_CONSISTENT_READ | (PERM_WRITE | PERM_RESIZE if writable else 0)
    shared = PERM_ALL if force_share else PERM_CONSISTENT_READ | PERM_WRITE_UNCHANGED
    return perm, shared


def _flock(fd: int, cmd: int, ltype: int, start: int) -> int:
    arg = struct.pack(_FLOCK, ltype, os.SEEK_SET, start, 1, 0)
    while True:
        try:
            res = fcntl.fcntl(fd, cmd, arg)
            break
        except InterruptedError:
            continue
    return struct.unpack(_FLOCK, res[:struct.calcsize(_FLOCK)])[0]


def _held_by_other(fd: int, byte: int) -> bool:
    return _flock(fd, _F_OFD_GETLK, fcntl.F_WRLCK, byte) != fcntl.F_UNLCK


def _bits(mask: int):
    for i in range(4):
        if mask & (1 << i):
            yield i, 1 << i


def check_and_lock(fd: int, path: str, perm: int, shared: int) -> None:
    """Raise ImageLocked if another holder conflicts; otherwise take our lock bytes."""
    try:
        for i, p in _bits(perm):
            if _held_by_other(fd, SHARED_BASE + i):
                raise _locked(f'Failed to get "{PERM_NAMES[p]}" lock', path)
        for i, p in _bits(PERM_ALL & ~shared):
            if _held_by_other(fd, PERM_BASE + i):
                raise _locked(f'Failed to get shared "{PERM_NAMES[p]}" lock', path)
        for i, _ in _bits(perm):
            _flock(fd, _F_OFD_SETLK, fcntl.F_RDLCK, PERM_BASE + i)
        for i, _ in _bits(PERM_ALL & ~shared):
            _flock(fd, _F_OFD_SETLK, fcntl.F_RDLCK, SHARED_BASE + i)
    except OSError as e:
        if e.errno in (errno.EAGAIN, errno.EACCES):
            raise _locked("Failed to lock byte", path) from None
        if e.errno in (errno.EINVAL, errno.ENOSYS, errno.EOPNOTSUPP, errno.ENOLCK):
            return  # the file system cannot lock; QEMU warns and carries on (locking=auto)
        raise


def _locked(message: str, path: str) -> ImageLocked:
    err = ImageLocked(message)
    err.hint = f"Is another process using the image [{path}]?\n"  # type: ignore[attr-defined]
    return err


def lock_file(fd: int, path: str, writable: bool, force_share: bool = False) -> None:
    """Take QEMU-compatible locks for an image opened read-only or read-write on ``fd``."""
    if not enabled():
        return
    perm, shared = permissions(writable, force_share)
    check_and_lock(fd, path, perm, shared)
