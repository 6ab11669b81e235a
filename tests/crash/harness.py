"""Fault injection under the qcow2 engine: a recording host file and simulated power loss.

``RecordingFile`` stands in for :class:`qcowpy.hostfile.HostFile` (the engine's one I/O seam). It
keeps the file in memory, serves reads from the latest writes (a page cache) and records every
write, truncate and flush. ``crash_image(k, keep)`` rebuilds what the disk could hold after a power
loss once ``k`` operations had been issued: everything up to the last flush before ``k`` is durable;
of the operations issued since that flush, only those chosen by ``keep`` reached the disk (the disk
may reorder unflushed writes, so any subset is possible).

``GuestModel`` follows the guest-visible contents and remembers, at each completed guest flush,
what is acknowledged; ``acknowledged(k)`` gives the bytes that must read back after a crash at ``k``
and the guest ranges written since (which may read old, new or mixed).
"""
from __future__ import annotations

import struct
from dataclasses import dataclass, field

from qcowpy.format.header import parse_header
from qcowpy.qcow2.image import Qcow2Image


class RecordingFile:
    """HostFile's interface over a bytearray, recording ('w', off, data) / ('t', size) / ('f',)."""

    def __init__(self, data: bytes, path: str = "<memory>", writable: bool = True):
        self.buf = bytearray(data)
        self.path = path
        self.writable = writable
        self.unsafe = False
        self.dirty = False
        self.fd = -1
        self.ops: list[tuple] = []
        self.flush_points: list[int] = []  # index into ops just after each barrier
        self.base = bytes(data)

    def size(self) -> int:
        return len(self.buf)

    def pread(self, length: int, offset: int) -> bytes:
        chunk = bytes(self.buf[offset:offset + length])
        return chunk + bytes(length - len(chunk))

    def preadinto(self, buf: memoryview, offset: int) -> None:
        buf[:] = self.pread(len(buf), offset)

    def pwrite(self, data, offset: int) -> None:
        data = bytes(memoryview(data).cast("B"))
        if offset + len(data) > len(self.buf):
            self.buf.extend(bytes(offset + len(data) - len(self.buf)))
        self.buf[offset:offset + len(data)] = data
        self.ops.append(("w", offset, data))
        self.dirty = True

    def truncate(self, size: int) -> None:
        if size < len(self.buf):
            del self.buf[size:]
        else:
            self.buf.extend(bytes(size - len(self.buf)))
        self.ops.append(("t", size))
        self.dirty = True

    def allocate(self, offset: int, length: int) -> None:
        if offset + length > len(self.buf):
            self.truncate(offset + length)

    def flush(self) -> None:
        if self.dirty:
            self.ops.append(("f",))
            self.flush_points.append(len(self.ops))
        self.dirty = False

    def allocated_bytes(self) -> int:
        return len(self.buf)

    def close(self) -> None:
        self.flush()

    # ---------------------------------------------------------------- crash simulation
    def durable_at(self, k: int) -> int:
        """Index of the first op not covered by a completed barrier before op ``k``."""
        last = 0
        for fp in self.flush_points:
            if fp <= k:
                last = fp
            else:
                break
        return last

    def crash_image(self, k: int, keep=None) -> bytes:
        """Disk contents if power failed after ``k`` ops; ``keep(i)`` picks unflushed ops (default all)."""
        start = self.durable_at(k)
        state = self._state_at(start)
        for i in range(start, k):
            op = self.ops[i]
            if keep is not None and not keep(i):
                continue
            _apply(state, op)
        return bytes(state)

    def _state_at(self, k: int) -> bytearray:
        cache = getattr(self, "_snap", None)
        if cache is None:
            cache = self._snap = {0: bytes(self.base)}
            self._snap_keys = [0]
        best = max(x for x in self._snap_keys if x <= k)
        state = bytearray(cache[best])
        for i in range(best, k):
            _apply(state, self.ops[i])
        if k - best > 64:
            cache[k] = bytes(state)
            self._snap_keys.append(k)
            self._snap_keys.sort()
        return state


def _apply(state: bytearray, op: tuple) -> None:
    if op[0] == "w":
        _, off, data = op
        if off + len(data) > len(state):
            state.extend(bytes(off + len(data) - len(state)))
        state[off:off + len(data)] = data
    elif op[0] == "t":
        size = op[1]
        if size < len(state):
            del state[size:]
        else:
            state.extend(bytes(size - len(state)))


def open_on(file, writable: bool, backing=None) -> Qcow2Image:
    """Qcow2Image.open, but over an already-open file object (the fault-injection seam)."""
    head = file.pread(min(file.size(), 1 << 21), 0)
    header = parse_header(head, file.size())
    if writable and header.incompatible_features & 1:
        from qcowpy.qcow2.check import repair_dirty
        repair_dirty(file, header)
    img = Qcow2Image(file, header, writable)
    if writable:
        img._open_read_write()
    img.backing = backing
    return img


class MemBacking:
    """A raw backing "file" for copy-on-write workloads."""

    def __init__(self, data: bytes):
        self.data = data
        self.size = len(data)

    def pread(self, length: int, offset: int) -> bytes:
        return self.data[offset:offset + length]

    def preadinto(self, buf: memoryview, offset: int) -> None:
        buf[:] = self.data[offset:offset + len(buf)]


@dataclass
class GuestModel:
    size: int
    backing: bytes = b""
    cur: bytearray = field(init=False)
    acks: list[tuple[int, bytes, int]] = field(default_factory=list)  # (op index, contents, guest-op count)
    writes: list[tuple[int, int, int]] = field(default_factory=list)  # (op index issued at, offset, length)

    def __post_init__(self):
        self.cur = bytearray(self.backing[:self.size].ljust(self.size, b"\0"))
        self.acks.append((0, bytes(self.cur), 0))

    def write(self, file: RecordingFile, offset: int, data: bytes) -> None:
        self.writes.append((len(file.ops), offset, len(data)))
        self.cur[offset:offset + len(data)] = data

    def flushed(self, file: RecordingFile) -> None:
        self.acks.append((len(file.ops), bytes(self.cur), len(self.writes)))

    def acknowledged(self, k: int) -> tuple[bytes, list[tuple[int, int]]]:
        """(contents at the last guest flush completed by op ``k``, guest ranges written after it)."""
        ack = self.acks[0]
        for a in self.acks:
            if a[0] <= k:
                ack = a
        unsure = [(off, n) for _, off, n in self.writes[ack[2]:]]
        return ack[1], unsure


def compare_acknowledged(got: bytes, want: bytes, unsure: list[tuple[int, int]]) -> int | None:
    """First guest offset where ``got`` differs from ``want`` outside the ``unsure`` ranges, or None."""
    if got == want:
        return None
    n = min(len(got), len(want))
    ranges = sorted((off, min(n, off + ln)) for off, ln in unsure if off < n)
    pos = 0
    segments = []
    for a, b in ranges:
        if a > pos:
            segments.append((pos, a))
        pos = max(pos, b)
    if pos < n:
        segments.append((pos, n))
    for a, b in segments:
        if got[a:b] != want[a:b]:
            for i in range(a, b):
                if got[i] != want[i]:
                    return i
    return None
