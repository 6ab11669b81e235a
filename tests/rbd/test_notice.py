"""The C completion notices librbd's callbacks signal (ext/_notice.pyx), without Ceph: the
callback is called through its address from other threads, as librbd's finisher thread does."""
from __future__ import annotations

import ctypes
import threading
import time

import pytest

_notice = pytest.importorskip("qcowpy._notice", reason="the compiled extension is not built")

CALLBACK = ctypes.CFUNCTYPE(None, ctypes.c_void_p, ctypes.c_void_p)
RELEASE = ctypes.CFUNCTYPE(None, ctypes.c_void_p)


@pytest.fixture
def release():
    """A stand-in for rbd_aio_release that records the completions it is given."""
    released: list[int] = []
    fn = RELEASE(lambda completion: released.append(completion))
    yield ctypes.cast(fn, ctypes.c_void_p).value, released
    del fn


def _complete_later(notice: int, completion: int, delay: float) -> threading.Thread:
    cb = CALLBACK(_notice.callback())

    def run() -> None:
        time.sleep(delay)
        cb(completion, notice)

    t = threading.Thread(target=run)
    t.start()
    return t


def test_wait_returns_once_the_callback_ran_on_another_thread(release):
    addr, released = release
    for timeout in (-1.0, 10.0):
        n = _notice.new(addr)
        t = _complete_later(n, 0x1234, 0.05)
        start = time.monotonic()
        assert _notice.wait(n, timeout) is True
        assert 0.04 <= time.monotonic() - start < 5
        t.join()
        _notice.free_notice(n)
    assert released == []  # completed waits release the completion themselves


def test_a_callback_before_the_wait_is_not_lost(release):
    n = _notice.new(release[0])
    _complete_later(n, 0x1, 0).join()
    assert _notice.wait(n, 0.0) is True
    _notice.free_notice(n)


def test_timed_out_wait_abandons_and_the_late_callback_releases(release):
    addr, released = release
    n = _notice.new(addr)
    start = time.monotonic()
    assert _notice.wait(n, 0.1) is False
    assert 0.09 <= time.monotonic() - start < 5
    _complete_later(n, 0xBEEF, 0).join()  # the callback owns (and frees) the notice now
    assert released == [0xBEEF]


def test_released_notices_do_not_leak_into_each_other(release):
    """Many notices at once, completed in reverse order from several threads."""
    addr, released = release
    notices = [_notice.new(addr) for _ in range(64)]
    threads = [_complete_later(n, i + 1, 0.001 * (64 - i)) for i, n in enumerate(notices)]
    assert all(_notice.wait(n, 10.0) for n in notices)
    for t in threads:
        t.join()
    for n in notices:
        _notice.free_notice(n)
    assert released == []
