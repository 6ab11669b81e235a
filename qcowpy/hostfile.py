"""The host file under an image: positioned I/O on a file descriptor.

Every driver and the qcow2 engine talk to storage only through this small interface, so a
fault-injecting or recording layer can stand in for it in tests.
"""
from __future__ import annotations

import errno
import os
from typing import Any, Callable

from .errors import ImageNotFound, QcowError, ReadOnlyError


class HostFile:
    """An OS file with pread/pwrite/flush/truncate and a record of unflushed writes.

    ``dirty`` is true while some write has not been followed by a flush: the qcow2 engine uses it
    as the ordering barrier of its crash-safety contract (flush only when something is pending).
    ``cache="unsafe"`` makes flush a no-op, as qemu-img convert does for its target.
    """

    def __init__(self, path: str, writable: bool = False, create: bool = False, cache: str = "writeback",
                 lock: bool = True, force_share: bool = False):
        self.path = path
        self.writable = writable
        self.unsafe = cache == "unsafe"
        self.dirty = False
        flags = os.O_RDWR if writable else os.O_RDONLY
        if create:
            # No O_TRUNC: truncating before the lock is taken would destroy an image that a
            # running QEMU holds. Truncate only once the lock is ours (below).
            flags |= os.O_CREAT
        flags |= getattr(os, "O_CLOEXEC", 0)
        try:
            self.fd = os.open(path, flags, 0o644)
        except FileNotFoundError:
            raise ImageNotFound(f"Could not open '{path}': No such file or directory") from None
        except IsADirectoryError:
            raise QcowError(f"Could not open '{path}': Is a directory") from None
        except PermissionError:
            raise QcowError(f"Could not open '{path}': Permission denied") from None
        except OSError as e:
            raise QcowError(f"Could not open '{path}': {e.strerror}") from None
        if lock:  # QEMU-compatible OFD locks (qcowpy/lock.py); released when the fd is closed
            from .lock import lock_file
            try:
                lock_file(self.fd, path, writable, force_share)
            except BaseException:
                os.close(self.fd)
                self.fd = -1
                raise
        if create and writable:
            try:
                os.ftruncate(self.fd, 0)
            except OSError as e:
                os.close(self.fd)
                self.fd = -1
                raise QcowError(f"Could not create '{path}': {e.strerror}") from None

    def size(self) -> int:
        return os.fstat(self.fd).st_size

    def pread(self, length: int, offset: int) -> bytes:
        """Read exactly ``length`` bytes; bytes past end of file read as zeros."""
        data = os.pread(self.fd, length, offset)
        if len(data) < length:
            parts = [data]
            got = len(data)
            while got < length:
                more = os.pread(self.fd, length - got, offset + got)
                if not more:
                    parts.append(bytes(length - got))
                    break
                parts.append(more)
                got += len(more)
            data = b"".join(parts)
        return data

    def preadinto(self, buf: memoryview, offset: int) -> None:
        """Fill ``buf`` from ``offset`` without an intermediate copy; past end of file reads zeros."""
        got, want = os.preadv(self.fd, [buf], offset), len(buf)
        while got < want:
            n = os.preadv(self.fd, [buf[got:]], offset + got)
            if n == 0:
                zero_fill(buf[got:])
                return
            got += n

    def preadv(self, bufs: list[memoryview], offset: int) -> None:
        """Fill ``bufs`` from consecutive bytes at ``offset`` with one system call (at most
        IOV_MAX buffers); past end of file reads zeros."""
        got = os.preadv(self.fd, bufs, offset)
        for buf in bufs:
            n = len(buf)
            if got < n:  # a short read: the rest of this buffer and the ones after it, one by one
                self.preadinto(buf[got:], offset + got)
                got = 0
            else:
                got -= n
            offset += n

    def pwrite(self, data: bytes | bytearray | memoryview, offset: int) -> None:
        if not self.writable:
            raise ReadOnlyError(f"'{self.path}' is opened read-only")
        mv = memoryview(data)
        while len(mv):
            n = os.pwrite(self.fd, mv, offset)
            mv = mv[n:]
            offset += n
        self.dirty = True

    def flush(self) -> None:
        if self.dirty and self.writable and not self.unsafe:
            os.fdatasync(self.fd)
        self.dirty = False

    def truncate(self, size: int) -> None:
        if not self.writable:
            raise ReadOnlyError(f"'{self.path}' is opened read-only")
        os.ftruncate(self.fd, size)
        self.dirty = True

    def allocate(self, offset: int, length: int) -> None:
        """Reserve space (preallocation=falloc)."""
        try:
            os.posix_fallocate(self.fd, offset, length)
        except OSError:
            if self.size() < offset + length:
                self.truncate(offset + length)
        self.dirty = True

    def punch(self, offset: int, length: int) -> bool:
        """Deallocate a byte range (it reads as zeros afterwards); False where the OS cannot."""
        if not self.writable:
            raise ReadOnlyError(f"'{self.path}' is opened read-only")
        return punch_hole(self.fd, offset, length)

    def allocated_bytes(self) -> int:
        return os.fstat(self.fd).st_blocks * 512

    def close(self) -> None:
        if self.fd >= 0:
            try:
                self.flush()
            finally:
                os.close(self.fd)
                self.fd = -1


#: name prefix ("rbd:") -> opener taking HostFile's arguments and returning an object with its
#: methods: the block layer's protocol drivers register here, so the qcow2 engine opens and
#: creates images stored on them exactly as it does local files (open_host_file below)
PROTOCOLS: dict[str, Callable[..., Any]] = {}


def open_host_file(path: str, writable: bool = False, create: bool = False, cache: str = "writeback",
                   lock: bool = True, force_share: bool = False) -> Any:
    """A HostFile for ``path``, or the registered protocol's equivalent for a protocol name."""
    for prefix, opener in PROTOCOLS.items():
        if path.startswith(prefix):
            return opener(path, writable=writable, create=create, cache=cache, force_share=force_share)
    return HostFile(path, writable=writable, create=create, cache=cache, lock=lock, force_share=force_share)


_FALLOC_FL_KEEP_SIZE = 0x01
_FALLOC_FL_PUNCH_HOLE = 0x02
_libc = None


FIRST_BLOCK = 4096  # what QEMU's file driver writes at offset 0 of a new file (allocate_first_block)


def size_new_file(f: HostFile, length: int, preallocation: str = "off") -> None:
    """Give a new, empty file ``length`` bytes the way the file protocol preallocates them:
    ``off`` a sparse file (but for its first block), ``falloc`` reserved blocks, ``full`` written
    zeros."""
    if preallocation == "full":
        chunk = 1 << 20
        for off in range(0, length, chunk):
            f.pwrite(bytes(min(chunk, length - off)), off)
        return
    f.truncate(length)
    if preallocation == "falloc":
        f.allocate(0, length)
    if length:  # as file-posix does for alignment probing: the first block is allocated
        f.pwrite(bytes(FIRST_BLOCK if length >= FIRST_BLOCK else 512), 0)


def punch_hole(fd: int, offset: int, length: int) -> bool:
    """Deallocate a byte range (reads as zeros afterwards); False where the OS cannot."""
    global _libc
    if _libc is None:
        try:
            import ctypes  # on first use: most commands never punch a hole
            _libc = _load_libc(ctypes)
            _libc.fallocate.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.c_int64, ctypes.c_int64]
        except (OSError, AttributeError):
            _libc = False
    if not _libc or length <= 0:
        return False
    return _libc.fallocate(fd, _FALLOC_FL_PUNCH_HOLE | _FALLOC_FL_KEEP_SIZE, offset, length) == 0


_ZEROS = bytes(1 << 20)


def zero_fill(buf: memoryview) -> None:
    """Zero a writable byte view in place (from a shared zero buffer, no per-call allocation)."""
    pos, n = 0, len(buf)
    while pos < n:
        k = min(n - pos, len(_ZEROS))
        buf[pos:pos + k] = _ZEROS[:k]
        pos += k


def iov_slice(bufs: list[memoryview], start: int, length: int) -> list[memoryview]:
    """The views covering bytes ``[start, start + length)`` of the concatenation of ``bufs``."""
    if start == 0 and length == sum(len(b) for b in bufs):
        return bufs
    out: list[memoryview] = []
    for buf in bufs:
        n = len(buf)
        if start >= n:
            start -= n
            continue
        take = min(n - start, length)
        out.append(buf[start:start + take])
        length -= take
        start = 0
        if not length:
            break
    return out


def data_or_hole(fd: int, pos: int, size: int, device_end: int) -> tuple[bool, int]:
    """(is data, end of the run) at ``pos``; past the file's ``size`` (the tail of its last
    sector, up to ``device_end``) reads as a hole, as QEMU's file driver reports it."""
    if pos >= size:
        return False, device_end
    try:
        data = os.lseek(fd, pos, os.SEEK_DATA)
    except OSError as e:
        if e.errno == errno.ENXIO:  # only a hole remains up to EOF
            return False, device_end
        return True, size
    if data > pos:
        return False, data
    try:
        hole = os.lseek(fd, pos, os.SEEK_HOLE)
    except OSError:
        hole = size
    return True, min(hole, size)


# linux/fs.h: FS_IOC_GETFLAGS/SETFLAGS (long), FS_IOC_FSGETXATTR/FSSETXATTR (struct fsxattr, 28 bytes)
_FS_IOC_GETFLAGS, _FS_IOC_SETFLAGS, _FS_NOCOW_FL = 0x80086601, 0x40086602, 0x00800000
_FS_IOC_FSGETXATTR, _FS_IOC_FSSETXATTR, _FS_XFLAG_EXTSIZE = 0x801C581F, 0x401C5820, 0x00000800
DEFAULT_EXTENT_SIZE_HINT = 1 << 20  # QEMU's file driver asks for 1 MiB extents unless told otherwise


def set_create_hints(fd: int, nocow: bool = False, extent_size_hint: int | None = None) -> str | None:
    """What QEMU's file driver does to a file it creates: ``nocow`` sets btrfs's no-copy-on-write
    flag (failure ignored), and an extent size hint goes to file systems that keep one (XFS).
    Returns the warning QEMU prints when an explicitly given, nonzero hint cannot be set."""
    import fcntl
    import struct
    if nocow:
        try:
            flags = bytearray(8)
            fcntl.ioctl(fd, _FS_IOC_GETFLAGS, flags)
            value = struct.unpack("=l", flags[:4])[0] | _FS_NOCOW_FL
            fcntl.ioctl(fd, _FS_IOC_SETFLAGS, struct.pack("=l", value) + bytes(4))
        except OSError:
            pass
    hint = DEFAULT_EXTENT_SIZE_HINT if extent_size_hint is None else extent_size_hint
    try:
        attr = bytearray(28)
        fcntl.ioctl(fd, _FS_IOC_FSGETXATTR, attr)
        xflags = struct.unpack_from("=I", attr)[0] | _FS_XFLAG_EXTSIZE
        struct.pack_into("=II", attr, 0, xflags, hint)
        fcntl.ioctl(fd, _FS_IOC_FSSETXATTR, bytes(attr))
    except OSError as e:
        if extent_size_hint:
            return f"Failed to set extent size hint: {os.strerror(e.errno) if e.errno else e}"
    return None


def _load_libc(ctypes):
    """The C library already mapped into the process (no ``find_library``: it runs ldconfig)."""
    try:
        return ctypes.CDLL("libc.so.6", use_errno=True)
    except OSError:
        return ctypes.CDLL(None, use_errno=True)
