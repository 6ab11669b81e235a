"""``bench``: qemu-img's img_bench — ``count`` reads or writes of ``bufsize`` bytes, ``depth`` of
them in flight, each ``step`` bytes after the previous one and wrapping around the image.

The request schedule is QEMU's completion-driven state machine (``bench_cb`` in qemu-img.c),
run on this thread: workers do the I/O and post completions to a queue, and each completion is
handled in turn, refilling the queue up to ``depth`` and, every ``flush_interval`` requests,
either draining the queue and flushing or (``drain=False``) flushing beside the writes. That
keeps the requests, their offsets and the number of flushes exactly QEMU's, whatever order
the workers finish in. The workers are a pool of at most 64 threads, the size of QEMU's own
thread pool for ``aio=threads``; a deeper queue waits in the pool as it waits there.
"""
from __future__ import annotations

import errno
import os
import queue
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

from ..block.device import BlockDevice
from ..errors import InvalidArgument, QcowError

#: QEMU's thread pool never runs more than 64 workers
MAX_WORKERS = 64


class BenchFailed(QcowError):
    """A request or flush failed: qemu-img's "Failed request: ..." (exit 1)."""


@dataclass
class BenchSpec:
    """What ``qemu-img bench`` is asked to do (its option defaults)."""

    count: int = 75000
    depth: int = 64
    offset: int = 0
    bufsize: int = 4096
    step: int = 0  # 0: bufsize
    write: bool = False
    pattern: int = 0
    flush_interval: int = 0
    drain: bool = True
    writethrough: bool = False  # cache=writethrough/directsync: every write is followed by a flush

    @property
    def stride(self) -> int:
        return self.step or self.bufsize


def header_lines(spec: BenchSpec) -> list[str]:
    """The lines qemu-img prints before it starts."""
    lines = [f"Sending {spec.count} {'write' if spec.write else 'read'} requests, {spec.bufsize} bytes each, "
             f"{spec.depth} in parallel (starting at offset {spec.offset}, step size {spec.stride})"]
    if spec.flush_interval:
        lines.append(f"Sending flush every {spec.flush_interval} requests")
    return lines


def _strerror(e: BaseException) -> str:
    if isinstance(e, OSError) and e.errno:
        return os.strerror(e.errno)
    return str(e)


class _Schedule:
    """QEMU's BenchData and bench_cb: which request or flush to start after each completion."""

    def __init__(self, spec: BenchSpec, size: int, start):
        self.spec = spec
        self.size = size
        self.start = start  # start(kind, offset): kind is "io", "flush" or "flush-undrained"
        self.n = spec.count  # requests not yet completed
        self.in_flight = 0
        self.in_flush = False
        self.offset = spec.offset

    def complete(self, kind: str | None, error: BaseException | None) -> None:
        """Handle one completion (``kind`` None: the first call, which only submits)."""
        if kind == "flush-undrained":
            if error is not None:
                raise BenchFailed(f"Failed flush request: {_strerror(error)}")
            return
        if error is not None:
            raise BenchFailed(f"Failed request: {_strerror(error)}")
        spec = self.spec
        if self.in_flush:  # a drained flush finished: carry on
            self.in_flush = False
        elif kind == "io":
            remaining = self.n - self.in_flight  # requests not yet submitted
            self.n -= 1
            self.in_flight -= 1
            if spec.flush_interval and remaining % spec.flush_interval == 0:
                if not self.in_flight or not spec.drain:
                    self.in_flush = spec.drain
                    self.start("flush" if spec.drain else "flush-undrained", 0)
                if spec.drain:
                    return
        while self.n > self.in_flight and self.in_flight < spec.depth:
            offset = self.offset
            self.in_flight += 1
            self.offset += spec.stride
            if self.size:  # qemu-img 7.2 divides by zero here on an empty image
                self.offset %= self.size
            self.start("io", offset)


def run_bench(dev: BlockDevice, spec: BenchSpec, workers: int | None = None) -> float:
    """Run the benchmark on an open device; return the seconds until the last request completed.

    Requests that reach past the end of the device fail with EIO, as QEMU's block backend
    refuses them; every failure raises :class:`BenchFailed` with qemu-img's message.
    """
    if spec.depth == 0 and spec.count:
        raise InvalidArgument("Invalid queue depth specified")  # qemu-img 7.2 would wait forever
    size = dev.size
    bufsize = spec.bufsize
    data = bytes([spec.pattern]) * bufsize
    local = threading.local()

    def io(offset: int) -> None:
        if offset > size or size - offset < bufsize:
            raise OSError(errno.EIO, os.strerror(errno.EIO))
        if spec.write:
            dev.pwrite(data, offset)
            if spec.writethrough:
                dev.flush()
        else:
            buf = getattr(local, "buf", None)
            if buf is None:
                buf = local.buf = bytearray(bufsize)
            dev.preadinto(buf, offset)

    done: queue.SimpleQueue = queue.SimpleQueue()
    outstanding = 0
    pool = ThreadPoolExecutor(max_workers=workers or max(1, min(spec.depth, MAX_WORKERS)),
                              thread_name_prefix="bench")

    def start(kind: str, offset: int) -> None:
        nonlocal outstanding
        outstanding += 1
        future = pool.submit(io, offset) if kind == "io" else pool.submit(dev.flush)
        future.add_done_callback(lambda f: f.cancelled() or done.put((kind, f.exception())))

    sched = _Schedule(spec, size, start)
    try:
        t0 = time.monotonic()
        sched.complete(None, None)
        while sched.n > 0:
            kind, error = done.get()
            outstanding -= 1
            sched.complete(kind, error)
        elapsed = time.monotonic() - t0
        while outstanding:  # flushes still running, as qemu-img's final drain waits for them
            kind, error = done.get()
            outstanding -= 1
            sched.complete(kind, error)
    finally:
        pool.shutdown(wait=True, cancel_futures=True)
    return elapsed
