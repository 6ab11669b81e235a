"""``convert``: copy one or more images (concatenated) into a new or existing image.

The shape follows qemu-img convert: a first pass over block status classifies every range as
data, zero or "leave to the backing file"; the copy then reads data ranges in large chunks,
skips (or, without zero-initialised target, zero-writes) zero ranges, and drops runs of
``min_sparse`` all-zero bytes inside data (``-S``). Compressed output (``-c``) writes whole
clusters through ``write_compressed``. A new qcow2 target is opened with cache=unsafe and
flushed once at the end, as qemu-img does.
"""
from __future__ import annotations

import sys
from collections import deque
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Callable, Iterator

from ..hostfile import zero_fill
from ..kernels import is_zero, zero_runs
from ..block.device import BlockDevice, Extent
from ..block.open import open_image
from ..errors import READ_ERRORS, CorruptedRead, QcowError, UnsupportedFeature, read_error_reason
from .bitmap import check_copyable, copy_bitmaps
from ..block.create import create_image, create_qcow2, qcow2_options
from .create import validate
from .options import parse_create_options, require_creatable

CHUNK = 2 << 20  # bytes per read/write of data, as qemu-img's buffer (the copy keeps ~8 of them)

DATA, ZERO, BACKING = "data", "zero", "backing"


class ConvertError(QcowError):
    def __init__(self, message: str, hint: str | None = None):
        super().__init__(message)
        self.hint = hint


@dataclass
class ConvertRequest:
    sources: list[str]
    target: str
    src_fmt: str | None = None
    out_fmt: str | None = None
    options: str | None = None
    compress: bool = False
    backing: str | None = None
    backing_fmt: str | None = None
    no_create: bool = False
    min_sparse: int = 4096
    cache: str = "unsafe"
    target_is_zero: bool = False
    force_share: bool = False
    load_snapshot: Callable[[BlockDevice], None] | None = None  # -l: make the first source read a snapshot
    salvage: Callable[[str], None] | None = None  # --salvage: unreadable sectors become zeros, reported here
    bitmaps: bool = False  # --bitmaps: copy the source's persistent bitmaps
    skip_broken_bitmaps: bool = False  # --skip-broken-bitmaps: inconsistent ones are skipped with a warning
    warn: Callable[[str], None] = lambda msg: None


class Progress:
    """qemu-img's progress line: "    (12.34/100%)" + CR, reprinted when it moves by min_skip."""

    def __init__(self, enabled: bool, min_skip: float = 1.0, stream=None):
        self.enabled = enabled
        self.min_skip = min_skip
        self.current = 0.0
        self.last = 0.0
        self.stream = stream or sys.stdout

    def set(self, value: float) -> None:
        value = min(100.0, value)
        self.current = value
        if not self.enabled:
            return
        if value > self.last + self.min_skip or value < self.last - self.min_skip or value in (0.0, 100.0):
            self.last = value
            self.stream.write("    (%3.2f/100%%)\r" % value)
            self.stream.flush()

    def end(self) -> None:
        if self.enabled:
            self.stream.write("\n")
            self.stream.flush()


@dataclass
class _Run:
    start: int  # offset in the target
    length: int
    kind: str
    src: BlockDevice = field(repr=False, default=None)  # type: ignore[assignment]
    src_offset: int = 0


def _plan(sources: list[BlockDevice], sizes: list[int], top_only: bool, backing_end: int | None) -> list[_Run]:
    """Classify every byte of the (concatenated) sources as DATA, ZERO or BACKING."""
    runs: list[_Run] = []
    base = 0
    for dev, padded in zip(sources, sizes):
        for e in _block_status(dev):
            if top_only and e.depth > 0:
                kind = BACKING
            elif e.zero:
                kind = ZERO
            elif e.data:
                kind = DATA
            else:
                kind = BACKING if top_only else DATA
            start = base + e.start
            if kind == ZERO and backing_end is not None:
                # zeros past the end of the target's backing file need not be written
                if start >= backing_end:
                    kind = BACKING
                elif start + e.length > backing_end:
                    cut = backing_end - start
                    _append(runs, _Run(start, cut, kind, dev, e.start))
                    _append(runs, _Run(backing_end, e.length - cut, BACKING, dev, e.start + cut))
                    continue
            _append(runs, _Run(start, e.length, kind, dev, e.start))
        if padded > dev.size:  # sizes are rounded up to 512 bytes, as qemu-img counts sectors
            _append(runs, _Run(base + dev.size, padded - dev.size, ZERO, dev, dev.size))
        base += padded
    return runs


def _block_status(dev: BlockDevice) -> Iterator[Extent]:
    """The device's block status, a failure worded as qemu-img's."""
    try:
        yield from dev.block_status(0, dev.size)
    except CorruptedRead as e:
        raise ConvertError(f"error while reading block status at offset {e.offset}: {e}") from None


def _append(runs: list[_Run], r: _Run) -> None:
    last = runs[-1] if runs else None
    if (last is not None and last.kind == r.kind and last.src is r.src and last.start + last.length == r.start
            and last.src_offset + last.length == r.src_offset):
        last.length += r.length
    else:
        runs.append(r)


def _read(run: _Run, offset: int, length: int, salvage: Callable[[str], None] | None = None) -> bytes:
    """Source bytes for target range [offset, offset+length) of ``run`` (zeros past the source end).

    With ``salvage`` a failing read is retried sector by sector and the sectors that still fail
    read as zeros, each reported (qemu-img convert --salvage)."""
    src_off = run.src_offset + (offset - run.start)
    avail = max(0, min(length, run.src.size - src_off))
    try:
        data = run.src.pread(avail, src_off) if avail else b""
    except (OSError, QcowError) as e:
        if salvage is None:
            if isinstance(e, READ_ERRORS):
                raise ConvertError(f"error while reading at byte {offset}: {read_error_reason(e)}") from None
            raise
        data = b"".join(_salvage_sector(run.src, pos, min(SECTOR, src_off + avail - pos), salvage)
                        for pos in range(src_off, src_off + avail, SECTOR))
    return data if avail == length else data + bytes(length - avail)


SECTOR = 512


def _salvage_sector(src: BlockDevice, pos: int, n: int, report: Callable[[str], None]) -> bytes:
    try:
        return src.pread(n, pos)
    except (OSError, QcowError) as e:
        reason = e.strerror if isinstance(e, OSError) and e.strerror else "Input/output error"
        report(f"error while reading offset {pos}: {reason}")
        return bytes(n)


_MAX_PENDING_WRITES = 4  # chunks being written (at least): with the read-ahead, bounds memory to ~8 chunks


def _read_into(run: _Run, offset: int, view: memoryview, salvage: Callable[[str], None] | None = None) -> None:
    """:func:`_read` into a caller's buffer (no new buffer per chunk: a fresh 4 MiB buffer costs
    page faults and zeroing every time, more than the copy itself)."""
    src_off = run.src_offset + (offset - run.start)
    avail = max(0, min(len(view), run.src.size - src_off))
    if avail:
        try:
            run.src.preadinto(view[:avail], src_off)
        except (OSError, QcowError):
            view[:avail] = _read(run, offset, avail, salvage)  # the error, or sector-wise salvage
    if avail < len(view):
        zero_fill(view[avail:])


class _Copier:
    """The uncompressed copy: chunks read into a few reusable buffers, all-zero blocks left
    out (``-S``), data written in place; raw targets take their writes on two worker threads
    (``os.pwrite`` drops the GIL), so writing overlaps reading the next chunk, as qemu-img's
    parallel requests do. A buffer is reused once the writes from it have completed."""

    def __init__(self, target: BlockDevice, zero_init: bool, min_sparse: int, progress: Callable[[int], None],
                 salvage: Callable[[str], None] | None = None, read_depth: int = 2):
        self.salvage = salvage
        self.target = target
        self.zero_init = zero_init
        self.min_sparse = min_sparse
        self.done = progress
        self.cluster = target.cluster_size or 65536
        self.chunk = max(CHUNK - CHUNK % self.cluster, self.cluster)
        # Writes run on worker threads: the target's io_depth for a raw target (any order:
        # os.pwrite and librbd's waits drop the GIL), one for other formats, whose writes and
        # zero writes must keep their order (the allocation order, hence the file layout, is
        # qemu-img's). A network target (rbd) keeps as many chunks in flight as qemu-img's
        # eight coroutines do.
        self._ordered = target.format != "raw"
        writers = 1 if self._ordered else target.io_depth
        self._max_pending = max(_MAX_PENDING_WRITES, writers)
        self._read_depth = read_depth  # chunks being read (by as many threads) ahead of the writes
        self._pool = ThreadPoolExecutor(writers)
        self._pending: deque[tuple[Future, bytearray | None]] = deque()
        self._free: list[bytearray] = []
        # Reads of the next chunks run on a thread while this one is scanned and written (host
        # reads and decompression drop the GIL). Salvage reads stay in order on this thread,
        # so their reports come out in qemu-img's order.
        self._reader = ThreadPoolExecutor(read_depth) if salvage is None else None
        self._queue: deque[tuple] = deque()  # work in target order: ("data", ...) / ("zero", ...)

    def _buffer(self) -> bytearray:
        while not self._free and len(self._pending) >= self._max_pending:
            self._reap()
        return self._free.pop() if self._free else bytearray(self.chunk)

    def _reap(self) -> None:
        """Wait for the oldest queued write (re-raising its failure); its buffer is free again."""
        future, buf = self._pending.popleft()
        future.result()
        if buf is not None:
            self._free.append(buf)

    def run(self, runs: list[_Run], advance_zero: Callable[[int], None]) -> None:
        """Copy every DATA run and zero every ZERO run, in target order."""
        for r in runs:
            if r.kind == DATA:
                self.data(r, r.start, r.length)
            elif r.kind == ZERO:
                self._queue.append(("zero", r.start, r.length))
                self._drain(self._read_depth)
                if not self.min_sparse:
                    advance_zero(r.length)
        self._drain(0)

    def _drain(self, keep: int) -> None:
        """Finish queued work, oldest first, until at most ``keep`` chunks are still being read."""
        while self._queue and (self._queue[0][0] == "zero" or len(self._queue) > keep):
            item = self._queue.popleft()
            if item[0] == "zero":
                self.zero(item[1], item[2])
                continue
            _, future, buf, view, pos = item
            if future is not None:
                future.result()
            self._write(buf, view, pos)
            self.done(len(view))

    def _submit(self, buf: bytearray, writes: list[tuple[memoryview, int]]) -> None:
        """Write ``writes`` (views of ``buf``); ``buf`` is free again once they are done."""
        if not writes:
            self._free.append(buf)
            return
        self._pending.append((self._pool.submit(_write_all, self.target, writes), buf))

    def finish(self) -> None:
        """Wait for every queued write (re-raising the first failure) and stop the workers."""
        try:
            while self._pending:
                self._pending.popleft()[0].result()
        finally:
            for pool in (self._pool, self._reader):
                if pool is not None:
                    pool.shutdown(wait=True, cancel_futures=True)

    def zero(self, offset: int, length: int) -> None:
        if not self.min_sparse:  # -S 0: the target is fully allocated, zeros written as data
            for pos in range(offset, offset + length, self.chunk):
                n = min(self.chunk, offset + length - pos)
                buf = self._buffer()
                view = memoryview(buf)[:n]
                zero_fill(view)
                self._submit(buf, [(view, pos)])
            return
        if self.zero_init or not length:
            return
        if self._ordered:
            while len(self._pending) >= self._max_pending:
                self._reap()
            self._pending.append((self._pool.submit(self.target.write_zeroes, length, offset, True), None))
        else:
            self.target.write_zeroes(length, offset, unmap=True)

    def data(self, run: _Run, offset: int, length: int) -> None:
        end = offset + length
        pos = offset
        while pos < end:
            n = min(self.chunk - pos % self.chunk, end - pos)
            buf = self._buffer()
            view = memoryview(buf)[:n]
            if self._reader is None:
                _read_into(run, pos, view, self.salvage)
                future = None
            else:
                future = self._reader.submit(_read_into, run, pos, view)
            self._queue.append(("data", future, buf, view, pos))
            self._drain(self._read_depth)
            pos += n

    def _write(self, buf: bytearray, view: memoryview, offset: int) -> None:
        if not self.min_sparse:
            self._submit(buf, [(view, offset)])
            return
        if is_zero(view):
            self._free.append(buf)
            self.zero(offset, len(view))
            return
        # runs of all-zero min_sparse blocks (aligned to target offsets) are not written
        writes = []
        for a, b, z in zero_runs(view, offset, self.min_sparse):
            if z:
                self.zero(offset + a, b - a)
            else:
                writes.append((view[a:b], offset + a))
        self._submit(buf, writes)


def _write_all(target: BlockDevice, writes: list[tuple[memoryview, int]]) -> None:
    for data, offset in writes:
        target.pwrite(data, offset)


def _new_target_key(kwargs: dict) -> bytes | None:
    """The passphrase of a target just created encrypted: qcow2's ``encrypt`` spec, or the luks
    format's ``password`` (a lookup of its key-secret)."""
    if kwargs.get("encrypt") is not None:
        return kwargs["encrypt"].passphrase
    return kwargs["password"]() if "password" in kwargs else None


def _copy_compressed(runs: list[_Run], target: BlockDevice, total: int, zero_init: bool,
                     progress: Callable[[int], None], salvage: Callable[[str], None] | None = None,
                     allocate_all: bool = False) -> None:
    """Whole clusters: all-zero ones are skipped (or zero-written), others written compressed;
    ``allocate_all`` (``-S 0``) compresses the all-zero ones too, as qemu-img does.

    Clusters to compress are handed over in batches, which the target compresses in parallel
    and stores in cluster order (a zero write first flushes the batch, so the file's layout
    is the one qemu-img's cluster-by-cluster loop gives)."""
    cs = target.cluster_size or 65536
    batch: list[tuple[bytes, int]] = []

    def flush() -> None:
        if not batch:
            return
        try:
            target.write_compressed_many(batch)
        except UnsupportedFeature as e:  # e.g. a target with an external data file (QEMU: -ENOTSUP)
            raise ConvertError(f"error while writing at byte {batch[0][1]}: {e}") from None
        progress(sum(len(d) for d, _ in batch))
        batch.clear()

    def zero(cstart: int, cend: int) -> None:
        flush()
        if not zero_init:
            target.write_zeroes(cend - cstart, cstart, unmap=True)
        progress(cend - cstart)

    for cstart, cend, pieces in _clusters(runs, total, cs):
        if all(p.kind == BACKING for p in pieces):
            continue
        if all(p.kind == ZERO for p in pieces) and not allocate_all:
            zero(cstart, cend)
            continue
        buf = bytearray(cend - cstart)
        for p in pieces:
            a = max(p.start, cstart)
            b = min(p.start + p.length, cend)
            if p.kind == DATA or p.kind == BACKING:
                buf[a - cstart:b - cstart] = _read(p, a, b - a, salvage)
        if is_zero(memoryview(buf)) and not allocate_all:
            zero(cstart, cend)
            continue
        batch.append((bytes(buf), cstart))
        if len(batch) * cs >= _COMPRESS_BATCH:
            flush()
    flush()


_COMPRESS_BATCH = 4 << 20  # bytes of clusters compressed together (bounds memory, feeds every worker)


def _clusters(runs: list[_Run], total: int, cs: int) -> Iterator[tuple[int, int, list[_Run]]]:
    """Each target cluster ``[cstart, cend)`` with the runs that cover it."""
    idx = 0
    for cstart in range(0, total, cs):
        cend = min(cstart + cs, total)
        while runs[idx].start + runs[idx].length <= cstart:
            idx += 1
        pieces = []
        j = idx
        while j < len(runs) and runs[j].start < cend:
            pieces.append(runs[j])
            j += 1
        yield cstart, cend, pieces


def run_convert(req: ConvertRequest, progress: bool = False, stream=None) -> None:
    prog = Progress(progress, 1.0, stream)
    prog.set(0.0)
    sources: list[BlockDevice] = []
    target: BlockDevice | None = None
    ok = False
    try:
        for name in req.sources:
            try:
                sources.append(open_image(name, "r", req.src_fmt, force_share=req.force_share))
            except QcowError as e:
                raise ConvertError(f"Could not open '{name}': {e}") from None
        sizes = [(d.size + 511) & ~511 for d in sources]
        total = sum(sizes)
        if req.load_snapshot is not None and sources:
            try:
                req.load_snapshot(sources[0])
            except QcowError as e:
                raise ConvertError(f"Failed to load snapshot: {e}") from None
        out_fmt = req.out_fmt or "raw"
        backing = req.backing
        backing_fmt = req.backing_fmt
        if not req.no_create:
            if out_fmt not in ("qcow2", "raw", "luks"):
                try:
                    require_creatable(out_fmt)
                except QcowError as e:
                    raise ConvertError(str(e)) from None
                raise ConvertError(f"Unknown file format '{out_fmt}'")  # -O file: no format to convert into
            try:
                opts = parse_create_options(out_fmt, req.options, req.target)
            except QcowError as e:
                raise ConvertError(str(e), getattr(e, "hint", None)) from None
            opts.set("size", total)
            if backing is not None:
                if out_fmt in ("raw", "luks"):
                    raise ConvertError(f"Backing file not supported for file format '{out_fmt}'")
                opts.set("backing_file", backing)
            if backing_fmt is not None:
                if out_fmt in ("raw", "luks"):
                    raise ConvertError(f"Backing file format not supported for file format '{out_fmt}'")
                opts.set("backing_fmt", backing_fmt)
            backing = opts.values.get("backing_file")  # type: ignore[assignment]
        elif req.options:
            raise ConvertError("-o has no effect when skipping image creation")
        if req.target_is_zero and not req.no_create:
            raise ConvertError("--target-is-zero requires use of -n flag")
        if req.target_is_zero and backing:
            raise ConvertError("Cannot use --target-is-zero when the destination image has a backing file")
        if len(sources) > 1 and backing:
            raise ConvertError("Having a backing file for the target makes no sense when concatenating multiple "
                               "input images")
        if not req.no_create and backing and not opts.values.get("backing_fmt"):
            raise ConvertError("Use of backing file requires explicit backing format")
        if req.compress and not req.no_create:
            if out_fmt != "qcow2":
                raise ConvertError("Compression not supported for this file format")
            if opts.values.get("encryption") in ("on", True) or opts.values.get("encrypt.format"):
                raise ConvertError("Compression and encryption not supported at the same time")
            if str(opts.values.get("preallocation", "off")) != "off":
                raise ConvertError("Compression and preallocation not supported at the same time")
        if req.bitmaps:
            if len(sources) > 1:
                raise ConvertError("Copying bitmaps only possible with single source")
            check_copyable(sources[0], req.skip_broken_bitmaps)
        if not req.no_create:
            try:
                kwargs = validate(out_fmt, opts)  # type: ignore[arg-type]
                if out_fmt == "qcow2":
                    create_qcow2(req.target, qcow2_options(total, **kwargs))
                else:
                    create_image(req.target, total, out_fmt, **kwargs)  # type: ignore[arg-type]
            except QcowError as e:
                msg = str(e).replace(f"Could not open '{req.target}'", f"Could not create '{req.target}'")
                raise ConvertError(f"{req.target}: error while converting {out_fmt}: {msg}") from None
        key = None if req.no_create else _new_target_key(kwargs)
        try:
            target = open_image(req.target, "r+", out_fmt, cache=req.cache, secret=key)
        except QcowError as e:
            raise ConvertError(f"Could not open '{req.target}': {e}") from None
        if req.bitmaps and not target.supports_bitmaps:
            raise ConvertError(f"Format driver '{target.format}' does not support bitmaps")
        if req.no_create:
            if target.size < total:
                raise ConvertError("output file is smaller than input file")
        if req.compress and not target.can_write_compressed:
            raise ConvertError("Compression not supported for this file format")
        top_only = bool(backing)
        backing_end = None
        if backing and not req.no_create and target.backing is not None:
            backing_end = target.backing.size
        zero_init = req.target_is_zero or (not req.no_create and req.min_sparse > 0 and not backing and
                                           str(opts.values.get("preallocation", "off")) in ("off", "metadata")
                                           and target.has_zero_init)
        runs = _plan(sources, sizes, top_only, backing_end)
        work = sum(r.length for r in runs if r.kind == DATA or (not req.min_sparse and r.kind == ZERO))
        if req.compress:
            work = total
        done = [0]

        def advance(n: int) -> None:
            done[0] += n
            if work:
                prog.set(100.0 * done[0] / work)

        if req.compress:
            _copy_compressed(runs, target, total, zero_init, advance, req.salvage, allocate_all=not req.min_sparse)
            target.write_compressed(b"", 0)  # qemu-img's last call: end the file on a sector boundary
            target.flush()
        else:
            copier = _Copier(target, zero_init, req.min_sparse, advance, req.salvage,
                             read_depth=max(d.io_depth for d in sources))
            for d in sources:  # the copier reads ahead itself (a device's own read-ahead would collide)
                d.read_ahead = req.salvage is not None
            try:
                copier.run(runs, advance)
            finally:
                copier.finish()
        if req.bitmaps:
            copy_bitmaps(sources[0], target, req.skip_broken_bitmaps, req.warn)
        target.flush()
        ok = True
    except OSError as e:
        raise ConvertError(f"error while writing at byte: {e.strerror or e}") from None
    finally:
        for d in sources:
            d.close()
        if target is not None:
            target.close()
        if ok:
            prog.set(100.0)
        prog.end()
