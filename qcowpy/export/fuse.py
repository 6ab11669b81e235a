"""The FUSE export: a block node as one regular file at the mountpoint (itself a regular file),
through libfuse3 via mfusepy (pure Python over ctypes: nothing to compile).

Reads and writes are clipped at the end of the image (short read/write at EOF, as QSD does;
``growable=on`` grows the image instead). ``fsync`` flushes the node. ``fallocate``:
PUNCH_HOLE|KEEP_SIZE is a write of zeroes that unmaps whole clusters (QSD discards instead, and
a qcow2 discard of a partial cluster keeps its data; a punched hole must read back as zeros),
ZERO_RANGE writes zeroes keeping the allocation, plain allocation inside the image is
EOPNOTSUPP (as QSD). ``lseek`` SEEK_DATA/SEEK_HOLE answer from block status. libfuse serves requests on one thread, under the node's lock. Closing the
export unmounts it (``fusermount3 -u``), which ends the session; SIGTERM closes every export.
"""
from __future__ import annotations

import errno
import logging
import ctypes.util
import os
import stat
import subprocess
import threading
import time
from typing import Any

from qcowpy.block.device import status_at
from qcowpy.errors import QcowError

from .daemon import BlockNode, Daemon, Export, register_export_type
from .keyval import OptionError, no_more, take, take_bool

log = logging.getLogger(__name__)

FALLOC_FL_KEEP_SIZE = 1
FALLOC_FL_PUNCH_HOLE = 2
FALLOC_FL_ZERO_RANGE = 0x10
MAX_IO = 32 << 20  # libfuse caps requests far below this; anything larger is refused (EINVAL)

_mounted: set[str] = set()


def load_mfusepy() -> Any:
    """mfusepy bound to libfuse3: it prefers libfuse2 when both are installed (Ceph's packages
    pull libfuse2 in), and libfuse2 has no ``lseek`` callback, so SEEK_DATA/SEEK_HOLE would
    silently see one big data run. ``FUSE_LIBRARY_PATH`` set by the user still wins."""
    if "FUSE_LIBRARY_PATH" not in os.environ:
        lib = ctypes.util.find_library("fuse3")
        if lib:
            os.environ["FUSE_LIBRARY_PATH"] = lib
    try:
        import mfusepy
    except (ImportError, OSError) as e:  # OSError: libfuse3 itself is missing
        raise OptionError(f"FUSE exports need mfusepy and libfuse3 ({e})") from None
    if mfusepy.fuse_version_major != 3:
        raise OptionError("FUSE exports need libfuse3 (mfusepy loaded libfuse "
                          f"{mfusepy.fuse_version_major}; set FUSE_LIBRARY_PATH)")
    return mfusepy


def _ops_class() -> Any:
    mfusepy = load_mfusepy()

    class ImageFile(mfusepy.Operations):
        """The mounted file: path "/" only."""

        use_ns = True

        def __init__(self, export: "FuseExport") -> None:
            self.x = export

        def _check(self, path: str) -> None:
            if path != "/":
                raise mfusepy.FuseOSError(errno.ENOENT)

        def _io(self, fn: Any, *args: Any) -> Any:
            try:
                with self.x.node.lock:
                    return fn(*args)
            except (QcowError, OSError) as e:
                log.warning("FUSE export %s: %s", self.x.id, e)
                raise mfusepy.FuseOSError(errno.EIO) from None

        def getattr(self, path: str, fh: Any = None) -> dict[str, Any]:
            self._check(path)
            now = time.time_ns()
            size = self.x.node.dev.size
            return {"st_mode": self.x.mode, "st_nlink": 1, "st_size": size, "st_blocks": (size + 511) // 512,
                    "st_uid": os.getuid(), "st_gid": os.getgid(), "st_atime": now, "st_mtime": now,
                    "st_ctime": now}

        def open(self, path: str, flags: int) -> int:
            self._check(path)
            if (flags & os.O_ACCMODE) != os.O_RDONLY and not self.x.writable:
                raise mfusepy.FuseOSError(errno.EACCES)
            return 0

        def read(self, path: str, size: int, offset: int, fh: int) -> bytes:
            if size > MAX_IO:
                raise mfusepy.FuseOSError(errno.EINVAL)
            end = min(offset + size, self.x.node.dev.size)
            if offset >= end:
                return b""
            return self._io(self.x.node.dev.pread, end - offset, offset)

        def write(self, path: str, data: bytes, offset: int, fh: int) -> int:
            if not self.x.writable:
                raise mfusepy.FuseOSError(errno.EACCES)
            if len(data) > MAX_IO:
                raise mfusepy.FuseOSError(errno.EINVAL)
            dev = self.x.node.dev
            n = len(data)
            if offset + n > dev.size:
                if self.x.growable:
                    self._io(dev.truncate, offset + n)
                else:
                    n = max(0, dev.size - offset)
                    if n == 0:
                        raise mfusepy.FuseOSError(errno.ENOSPC)
            self._io(dev.pwrite, memoryview(data)[:n], offset)
            return n

        def truncate(self, path: str, length: int, fh: Any = None) -> int:
            self._check(path)
            dev = self.x.node.dev
            if length == dev.size:
                return 0
            if not self.x.growable and length > dev.size or not self.x.writable:
                raise mfusepy.FuseOSError(errno.EACCES)
            self._io(dev.truncate, length)
            return 0

        def fsync(self, path: str, datasync: int, fh: int) -> int:
            if self.x.writable:
                self._io(self.x.node.dev.flush)
            return 0

        def flush(self, path: str, fh: int) -> int:
            return 0

        def fallocate(self, path: str, mode: int, offset: int, length: int, fh: int) -> int:
            if not self.x.writable:
                raise mfusepy.FuseOSError(errno.EACCES)
            dev = self.x.node.dev
            if mode & FALLOC_FL_KEEP_SIZE:
                length = min(length, dev.size - offset)
            if length <= 0 or offset < 0:
                return 0
            if mode == FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE:
                self._io(dev.write_zeroes, length, offset, True)
            elif mode & FALLOC_FL_ZERO_RANGE and offset + length <= dev.size:
                self._io(dev.write_zeroes, length, offset, False)
            elif mode & FALLOC_FL_PUNCH_HOLE:
                raise mfusepy.FuseOSError(errno.EINVAL)
            else:
                raise mfusepy.FuseOSError(errno.EOPNOTSUPP)
            return 0

        def lseek(self, path: str, offset: int, whence: int, fh: int) -> int:
            """SEEK_DATA / SEEK_HOLE from block status (QSD's rule: data is what has the DATA
            bit; zero and unallocated runs are holes; a hole ends the file)."""
            if whence not in (os.SEEK_DATA, os.SEEK_HOLE):
                raise mfusepy.FuseOSError(errno.EINVAL)
            dev = self.x.node.dev
            size = dev.size
            if offset < 0 or offset > size or (offset == size and whence == os.SEEK_DATA):
                raise mfusepy.FuseOSError(errno.ENXIO)
            pos = offset
            with self.x.node.lock:
                while pos < size:
                    ext = status_at(dev, pos, size - pos)
                    if ext.data == (whence == os.SEEK_DATA):
                        return pos
                    pos += ext.length
            if whence == os.SEEK_DATA:
                raise mfusepy.FuseOSError(errno.ENXIO)
            return size

    class Fuse(mfusepy.FUSE):
        """mfusepy with libfuse3's ``lseek`` callback wired (the binding lists it, wraps none)."""

        def lseek(self, path: Any, off: int, whence: int, fip: Any) -> int:
            return self.operations.lseek(None if path is None else path.decode(), off, whence,
                                         fip.contents.fh if fip else 0)

    return Fuse, ImageFile


class FuseExport(Export):
    type = "fuse"

    def __init__(self, daemon: Daemon, eid: str, node: BlockNode, writable: bool, opts: dict[str, Any]) -> None:
        path = str(take(opts, "mountpoint", required=True))
        self.growable = take_bool(opts, "growable", False)
        opts.pop("allow-other", None)
        no_more(opts)
        try:
            st = os.stat(path)
        except OSError as e:
            raise OptionError(f"Failed to stat '{path}': {e.strerror}") from None
        if not stat.S_ISREG(st.st_mode):
            raise OptionError(f"'{path}' is not a regular file")
        path = os.path.realpath(path)
        if path in _mounted:
            raise OptionError(f"There already is a FUSE export on '{path}'")
        fuse_cls, ops = _ops_class()
        if not os.path.exists("/dev/fuse"):
            raise OptionError("Failed to set up FUSE session")
        self.id, self.node, self.writable, self.mountpoint = eid, node, writable, path
        self.mode = stat.S_IFREG | stat.S_IRUSR | (stat.S_IWUSR if writable else 0)
        self.failed: list[BaseException] = []
        self._thread = threading.Thread(target=self._run, args=(fuse_cls, ops(self)), name=f"fuse {eid}",
                                        daemon=True)
        self._thread.start()
        dev = st.st_dev
        deadline = time.monotonic() + 10
        while os.stat(path).st_dev == dev:  # mounted once the mountpoint belongs to another device
            if not self._thread.is_alive() or time.monotonic() > deadline:
                raise OptionError("Failed to mount FUSE session to export")
            time.sleep(0.01)
        _mounted.add(path)

    def _run(self, fuse_cls: Any, ops: Any) -> None:
        try:
            fuse_cls(ops, self.mountpoint, foreground=True, nothreads=True, fsname=f"qcowpy:{self.id}",
                         default_permissions=True, **({} if self.writable else {"ro": True}))
        except BaseException as e:  # reported by the mount wait / close
            self.failed.append(e)

    def close(self) -> None:
        if self.mountpoint in _mounted:
            subprocess.run(["fusermount3", "-u", "-z", self.mountpoint], capture_output=True)
            _mounted.discard(self.mountpoint)
        self._thread.join(10)


register_export_type("fuse", FuseExport)
