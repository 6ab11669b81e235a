"""A small typed ctypes layer over Ceph's stable C APIs (librados.so.2, librbd.so.1).

Why ctypes and not Ceph's Python bindings (python3-rbd/python3-rados): those are Cython
extensions built for the distribution's own interpreter and live in its dist-packages, so they
are not importable from a virtualenv or another CPython (pyenv, a CI image) without path
tricks that break as soon as the minor versions differ. The C ABI of librbd/librados has been
stable for a decade; binding the ~35 functions qcowpy uses keeps rbd support to one shared
library that any CPython can load, and lets the driver issue asynchronous requests and wait on
them with the GIL released (ctypes drops it around every foreign call).

``QCOWPY_LIBRBD``/``QCOWPY_LIBRADOS`` name other builds of the libraries. Nothing is loaded
until an ``rbd:`` image is opened, so qcowpy installs and runs
without Ceph; :func:`lib` raises :class:`RbdUnavailable` (one line) when librbd is missing.
"""
from __future__ import annotations

import ctypes
import os
import threading
from ctypes import (CFUNCTYPE, POINTER, Structure, byref, c_char, c_char_p, c_int, c_int64, c_size_t, c_ssize_t,
                    c_uint8, c_uint64, c_void_p)
from typing import Callable

from ..errors import QcowError

FEATURE_STRIPINGV2 = 1 << 1
FEATURE_FAST_DIFF = 1 << 4
FLAG_FAST_DIFF_INVALID = 1 << 1
WRITE_ZEROES_FLAG_THICK_PROVISION = 1 << 0


class RbdUnavailable(QcowError):
    """librbd/librados cannot be loaded: rbd: images cannot be opened on this machine."""


class RbdError(QcowError):
    """A librados/librbd call failed; ``errno`` is the positive error number."""

    def __init__(self, message: str, errno_: int):
        super().__init__(message)
        self.errno = errno_


def fail(what: str, r: int) -> RbdError:
    """QEMU's error_setg_errno wording: ``what: strerror``."""
    return RbdError(f"{what}: {os.strerror(-r)}", -r)


class ImageInfo(Structure):
    """rbd_image_info_t."""
    _fields_ = [("size", c_uint64), ("obj_size", c_uint64), ("num_objs", c_uint64), ("order", c_int),
                ("block_name_prefix", c_char * 24), ("parent_pool", c_int64), ("parent_name", c_char * 96)]


class SnapInfo(Structure):
    """rbd_snap_info_t."""
    _fields_ = [("id", c_uint64), ("size", c_uint64), ("name", c_char_p)]


DIFF_CB = CFUNCTYPE(c_int, c_uint64, c_size_t, c_int, c_void_p)

_P = c_void_p  # rados_t, rados_ioctx_t, rbd_image_t, rbd_completion_t are opaque pointers
_SIGS: dict[str, tuple] = {
    # librados
    "rados_create": (c_int, [POINTER(_P), c_char_p]),
    "rados_conf_read_file": (c_int, [_P, c_char_p]),
    "rados_conf_set": (c_int, [_P, c_char_p, c_char_p]),
    "rados_conf_get": (c_int, [_P, c_char_p, c_char_p, c_size_t]),
    "rados_connect": (c_int, [_P]),
    "rados_shutdown": (None, [_P]),
    "rados_ioctx_create": (c_int, [_P, c_char_p, POINTER(_P)]),
    "rados_ioctx_destroy": (None, [_P]),
    "rados_ioctx_set_namespace": (None, [_P, c_char_p]),
    # librbd
    "rbd_namespace_exists": (c_int, [_P, c_char_p, POINTER(ctypes.c_bool)]),
    "rbd_create": (c_int, [_P, c_char_p, c_uint64, POINTER(c_int)]),
    "rbd_remove": (c_int, [_P, c_char_p]),
    "rbd_open": (c_int, [_P, c_char_p, POINTER(_P), c_char_p]),
    "rbd_open_read_only": (c_int, [_P, c_char_p, POINTER(_P), c_char_p]),
    "rbd_close": (c_int, [_P]),
    "rbd_stat": (c_int, [_P, POINTER(ImageInfo), c_size_t]),
    "rbd_get_size": (c_int, [_P, POINTER(c_uint64)]),
    "rbd_resize": (c_int, [_P, c_uint64]),
    "rbd_get_features": (c_int, [_P, POINTER(c_uint64)]),
    "rbd_get_flags": (c_int, [_P, POINTER(c_uint64)]),
    "rbd_get_parent_info": (c_int, [_P, c_char_p, c_size_t, c_char_p, c_size_t, c_char_p, c_size_t]),
    "rbd_flush": (c_int, [_P]),
    "rbd_diff_iterate2": (c_int, [_P, c_char_p, c_uint64, c_uint64, c_uint8, c_uint8, DIFF_CB, c_void_p]),
    "rbd_snap_list": (c_int, [_P, POINTER(SnapInfo), POINTER(c_int)]),
    "rbd_snap_list_end": (None, [POINTER(SnapInfo)]),
    "rbd_snap_create": (c_int, [_P, c_char_p]),
    "rbd_snap_remove": (c_int, [_P, c_char_p]),
    "rbd_snap_rollback": (c_int, [_P, c_char_p]),
    "rbd_aio_create_completion": (c_int, [c_void_p, c_void_p, POINTER(_P)]),
    "rbd_aio_read": (c_int, [_P, c_uint64, c_size_t, c_void_p, _P]),
    "rbd_aio_write": (c_int, [_P, c_uint64, c_size_t, c_void_p, _P]),
    "rbd_aio_discard": (c_int, [_P, c_uint64, c_uint64, _P]),
    "rbd_aio_write_zeroes": (c_int, [_P, c_uint64, c_size_t, _P, c_int, c_int]),
    "rbd_aio_flush": (c_int, [_P, _P]),
    "rbd_aio_wait_for_complete": (c_int, [_P]),
    "rbd_aio_get_return_value": (c_ssize_t, [_P]),
    "rbd_aio_release": (None, [_P]),
}

_lib: "Lib | None" = None
_lib_lock = threading.Lock()


class Lib:
    """The loaded functions, as attributes named like the C functions."""

    def __init__(self, rados: ctypes.CDLL, rbd: ctypes.CDLL):
        for name, (restype, argtypes) in _SIGS.items():
            fn = getattr(rados if name.startswith("rados_") else rbd, name)
            fn.restype = restype
            fn.argtypes = argtypes
            setattr(self, name, fn)


def lib() -> Lib:
    """librados and librbd, loaded once; RbdUnavailable (one line) when they are absent."""
    global _lib
    with _lib_lock:
        if _lib is None:
            try:
                rados = ctypes.CDLL(os.environ.get("QCOWPY_LIBRADOS", "librados.so.2"))
                rbd = ctypes.CDLL(os.environ.get("QCOWPY_LIBRBD", "librbd.so.1"))
                _lib = Lib(rados, rbd)
            except (OSError, AttributeError) as e:
                raise RbdUnavailable("rbd support needs Ceph's client libraries librbd.so.1 and librados.so.2 "
                                     f"(Debian: apt-get install librbd1): {e}") from None
        return _lib


def available() -> bool:
    try:
        lib()
    except RbdUnavailable:
        return False
    return True


# ---------------------------------------------------------------- buffers without copies
class _PyBuffer(Structure):
    _fields_ = [("buf", c_void_p), ("obj", c_void_p), ("len", c_ssize_t), ("itemsize", c_ssize_t),
                ("readonly", c_int), ("ndim", c_int), ("format", c_char_p), ("shape", c_void_p),
                ("strides", c_void_p), ("suboffsets", c_void_p), ("internal", c_void_p)]


_get_buffer = ctypes.pythonapi.PyObject_GetBuffer
_get_buffer.argtypes = [ctypes.py_object, POINTER(_PyBuffer), c_int]
_get_buffer.restype = c_int
_release_buffer = ctypes.pythonapi.PyBuffer_Release
_release_buffer.argtypes = [POINTER(_PyBuffer)]
_release_buffer.restype = None


def address(view: memoryview) -> int:
    """The address of a contiguous buffer's first byte (read-only buffers too). The caller keeps
    ``view`` alive for as long as the address is used."""
    pb = _PyBuffer()
    if _get_buffer(view, byref(pb), 0) != 0:  # PyBUF_SIMPLE: contiguous bytes
        raise ValueError("buffer is not contiguous")
    try:
        return pb.buf or 0
    finally:
        _release_buffer(byref(pb))


# ---------------------------------------------------------------- asynchronous requests
try:  # completions signalled from C without the GIL (ext/_notice.pyx)
    from .. import _notice
except ImportError:  # a source checkout without a build: ctypes callbacks, which take the GIL
    _notice = None  # type: ignore[assignment]

COMPLETE_CB = CFUNCTYPE(None, c_void_p, c_void_p)  # rbd_callback_t(rbd_completion_t, void *arg)
ETIMEDOUT = 110
_inflight: dict[int, "Completion"] = {}  # ctypes path: token -> request, until it completes
_inflight_lock = threading.Lock()
_tokens = iter(range(1, 1 << 62))
_abandoned: list["Completion"] = []  # notice path: requests given up on keep their buffers here
_c_callback: tuple[int, int] | None = None  # the notice callback's address, rbd_aio_release's


@COMPLETE_CB
def _on_complete(handle, arg) -> None:
    """librbd's completion callback (one of its threads) on the ctypes path: record the result,
    wake the waiter; an abandoned request (its waiter gave up) is released here, and its buffer
    with it."""
    with _inflight_lock:
        c = _inflight.get(arg or 0)
        if c is None:
            return
        c.ret = _lib.rbd_aio_get_return_value(handle) if _lib is not None else -5
        c.event.set()
        if c.abandoned:
            del _inflight[arg]
            _lib.rbd_aio_release(handle)  # type: ignore[union-attr]
            c.keep = None


def _notice_functions(lib_: Lib) -> tuple[int, int]:
    global _c_callback
    if _c_callback is None:
        _c_callback = (_notice.callback(), ctypes.cast(lib_.rbd_aio_release, c_void_p).value)
    return _c_callback


class Completion:
    """One librbd request in flight. :meth:`wait` returns its result; with a time limit a request
    that has not completed by then is abandoned (-ETIMEDOUT): librbd keeps using its buffer, so
    the buffer is kept alive (on the notice path, until the process ends: only a cluster that
    stopped answering abandons requests, and the device then refuses further I/O).

    Constructing one gives a :class:`NoticeCompletion` when the C notices are built, else a
    :class:`CallbackCompletion`; the two differ only in how librbd's callback reaches the waiter."""

    __slots__ = ("handle", "keep", "what", "ret", "abandoned")

    def __new__(cls, what: str, keep: object = None):
        if cls is Completion:
            cls = NoticeCompletion if _notice is not None else CallbackCompletion
        return super().__new__(cls)

    def __init__(self, what: str, keep: object = None):
        self.handle = c_void_p()
        self.keep = keep  # the buffer librbd reads from or writes into, alive until completion
        self.what = what
        self.ret = 0
        self.abandoned = False
        lib_ = lib()
        arg, callback = self._register(lib_)
        r = lib_.rbd_aio_create_completion(c_void_p(arg), c_void_p(callback), byref(self.handle))
        if r < 0:
            self._forget()
            raise fail("rbd aio completion", r)

    def cancel(self) -> None:
        """The request was refused at submission: no callback will come."""
        self._forget()
        lib().rbd_aio_release(self.handle)
        self.keep = None

    def wait(self, timeout: float | None = None) -> int:
        if not self._wait(timeout):
            return -ETIMEDOUT
        lib().rbd_aio_release(self.handle)
        self.keep = None
        return self.ret

    def _register(self, lib_: Lib) -> tuple[int, int]:
        """The callback's argument and the callback's address."""
        raise NotImplementedError

    def _forget(self) -> None:
        """No callback will come: drop what :meth:`_register` set up."""
        raise NotImplementedError

    def _wait(self, timeout: float | None) -> bool:
        """Wait for the callback and set ``ret`` (True), or abandon the request (False)."""
        raise NotImplementedError


class NoticeCompletion(Completion):
    """Signalled from C (ext/_notice.pyx) without the GIL."""

    __slots__ = ("notice",)

    def _register(self, lib_: Lib) -> tuple[int, int]:
        callback, release = _notice_functions(lib_)
        self.notice = _notice.new(release)
        return self.notice, callback

    def _forget(self) -> None:
        _notice.free_notice(self.notice)

    def _wait(self, timeout: float | None) -> bool:
        if not _notice.wait(self.notice, -1.0 if timeout is None else max(0.0, timeout)):
            self.abandoned = True  # the C callback frees the notice and releases the completion
            with _inflight_lock:
                _abandoned.append(self)  # librbd may still use the buffer
            return False
        _notice.free_notice(self.notice)
        self.ret = lib().rbd_aio_get_return_value(self.handle)
        return True


class CallbackCompletion(Completion):
    """Signalled by a ctypes callback (a checkout without a build): it takes the GIL."""

    __slots__ = ("token", "event")

    def _register(self, lib_: Lib) -> tuple[int, int]:
        self.event = threading.Event()
        self.token = next(_tokens)
        with _inflight_lock:
            _inflight[self.token] = self
        return self.token, ctypes.cast(_on_complete, c_void_p).value  # type: ignore[return-value]

    def _forget(self) -> None:
        with _inflight_lock:
            _inflight.pop(self.token, None)

    def _wait(self, timeout: float | None) -> bool:
        if not self.event.wait(timeout):
            with _inflight_lock:
                if not self.event.is_set():
                    self.abandoned = True  # _on_complete releases it when librbd is done
                    return False
        self._forget()
        return True


def run_all(submit: Callable[[object], Completion | None], items: list, window: int,
            timeout: float | None = None) -> None:
    """Submit ``items`` with at most ``window`` requests in flight; wait for every one and raise
    the first failure (as RbdError naming the request) after all have finished. ``timeout``
    bounds the wait for each request (counted from when its wait begins)."""
    inflight: list[Completion] = []
    first: RbdError | None = None

    def reap(c: Completion) -> None:
        nonlocal first
        r = c.wait(timeout if first is None or first.errno != ETIMEDOUT else 0)
        if r < 0 and first is None:
            first = fail(c.what, r)

    try:
        for item in items:
            if len(inflight) >= window:
                reap(inflight.pop(0))
                if first is not None:
                    break
            c = submit(item)
            if c is not None:
                inflight.append(c)
    finally:
        for c in inflight:
            reap(c)
    if first is not None:
        raise first


def wait_all(completions: list[Completion], timeout: float | None = None) -> None:
    """Wait for requests submitted earlier (all of them) and raise the first failure."""
    first: RbdError | None = None
    for c in completions:
        r = c.wait(timeout if first is None or first.errno != ETIMEDOUT else 0)
        if r < 0 and first is None:
            first = fail(c.what, r)
    if first is not None:
        raise first
