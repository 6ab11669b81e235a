"""PID files as QEMU writes them (util/oslib-posix.c qemu_write_pidfile): created 0600, locked with
a POSIX write lock held for the life of the process, so a second daemon given the same file fails
("Cannot lock pid file: ...") instead of overwriting the first one's pid."""
from __future__ import annotations

import fcntl
import os


class PidfileError(Exception):
    """QEMU's message for a PID file that cannot be created, locked or written."""


def write_pidfile(path: str) -> int:
    """Create, lock and fill ``path``; returns the descriptor that holds the lock (keep it open)."""
    while True:
        try:
            fd = os.open(path, os.O_WRONLY | os.O_CREAT, 0o600)
        except OSError as e:
            raise PidfileError(f"Could not create '{path}': {e.strerror}") from None
        try:
            mine = os.fstat(fd)
            fcntl.lockf(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as e:
            os.close(fd)
            raise PidfileError(f"Cannot lock pid file: {e.strerror}") from None
        try:
            now = os.stat(path)
        except FileNotFoundError:  # removed by a racing process: lock the new one
            os.close(fd)
            continue
        if now.st_ino == mine.st_ino and now.st_dev == mine.st_dev:
            break
        os.close(fd)
    try:
        os.ftruncate(fd, 0)
        os.write(fd, f"{os.getpid()}\n".encode())
    except OSError:
        os.close(fd)
        os.unlink(path)
        raise PidfileError("Failed to write pid file") from None
    return fd
