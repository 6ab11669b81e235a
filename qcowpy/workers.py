"""A small shared pool of threads for CPU work that releases the GIL (codecs, ciphers).

Only leaf work runs here: a task never waits for another task of this pool, so the pool
cannot deadlock however many callers share it. The size defaults to the number of CPUs the
process may use (at most 8); ``set_workers`` changes it (``convert -m``), 1 turns it off.
"""
from __future__ import annotations

import contextlib
import os
import threading
from typing import TYPE_CHECKING, Callable, Iterable, TypeVar

if TYPE_CHECKING:
    from concurrent.futures import ThreadPoolExecutor

T = TypeVar("T")
R = TypeVar("R")

_lock = threading.Lock()
_pool: ThreadPoolExecutor | None = None
_size = max(1, min(8, len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1))


def workers() -> int:
    return _size


def set_workers(n: int) -> None:
    """Use ``n`` threads from now on (the old pool finishes its tasks and goes away)."""
    global _pool, _size
    with _lock:
        old, _pool, _size = _pool, None, max(1, n)
    if old is not None:
        old.shutdown(wait=False)


@contextlib.contextmanager
def limit(n: int | None):
    """At most ``n`` threads while the block runs (``convert -m``); None leaves the pool alone."""
    if n is None or n >= _size:
        yield
        return
    before = _size
    set_workers(n)
    try:
        yield
    finally:
        set_workers(before)


def _executor() -> ThreadPoolExecutor:
    global _pool
    with _lock:
        if _pool is None:
            from concurrent.futures import ThreadPoolExecutor  # on first use (it imports logging)
            _pool = ThreadPoolExecutor(_size, thread_name_prefix="qcowpy-worker")
        return _pool


def run_all(fn: Callable[[T], R], items: Iterable[T]) -> list[R]:
    """``[fn(x) for x in items]``, spread over the pool in one batch per worker; the first
    exception (in item order) propagates once every batch has finished."""
    items = list(items)
    n = min(_size, len(items))
    if n <= 1:
        return [fn(x) for x in items]
    step = -(-len(items) // n)
    batches = [items[i:i + step] for i in range(0, len(items), step)]
    from concurrent.futures import wait
    futures = [_executor().submit(_apply, fn, b) for b in batches[1:]]
    try:
        out = _apply(fn, batches[0])  # the caller's thread takes one share of the work
    finally:
        wait(futures)  # no batch outlives the call, even when this share failed
    for f in futures:
        out.extend(f.result())  # the first failure in item order is raised here
    return out


def _apply(fn: Callable[[T], R], batch: list[T]) -> list[R]:
    return [fn(x) for x in batch]
