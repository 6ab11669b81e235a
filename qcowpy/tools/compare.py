"""``compare``: guest contents of two images, with qemu-img's messages and exit codes.

0 identical, 1 different (the first differing 512-byte sector is reported), 2 could not open,
4 read error. Ranges that read as zeros in both images are not read at all.
"""
from __future__ import annotations

import sys
from typing import Callable

from ..kernels import is_zero
from ..block.device import BlockDevice, Extent
from ..block.open import open_image
from ..errors import READ_ERRORS, CorruptedRead, QcowError, read_error_reason
from .convert import Progress

CHUNK = 4 << 20
SECTOR = 512


def _first_diff(a: bytes, b: bytes) -> int:
    """Offset of the first 512-byte sector where a and b differ (a != b)."""
    lo, hi = 0, len(a)
    while hi - lo > 4096:  # bisect with C-speed slice comparisons
        mid = (lo + hi) // 2
        if a[lo:mid] != b[lo:mid]:
            hi = mid
        else:
            lo = mid
    for i in range(lo, hi):
        if a[i] != b[i]:
            return i - i % SECTOR
    return hi - hi % SECTOR


def _first_nonzero(buf: bytes) -> int:
    i = len(buf) - len(buf.lstrip(b"\0"))
    return i - i % SECTOR


def _status(dev: BlockDevice, offset: int, end: int) -> Extent:
    return dev.block_status(offset, end - offset)[0]


class _AllocFailed(Exception):
    """Block status failed (qemu-img compare exits 3)."""


class _Walker:
    """block_status runs of one device, fetched lazily and cached per call range."""

    def __init__(self, dev: BlockDevice, name: str):
        self.dev = dev
        self.name = name
        self.runs: list[Extent] = []
        self.i = 0

    def at(self, offset: int, end: int) -> Extent:
        while self.i < len(self.runs) and self.runs[self.i].start + self.runs[self.i].length <= offset:
            self.i += 1
        if self.i >= len(self.runs) or self.runs[self.i].start > offset:
            try:
                self.runs = self.dev.block_status(offset, end - offset)
            except CorruptedRead:  # qemu-img's wording and exit code (3) for a failed block status
                raise _AllocFailed(f"Sector allocation test failed for {self.name}") from None
            self.i = 0
        return self.runs[self.i]


def run_compare(file1: str, file2: str, fmt1: str | None = None, fmt2: str | None = None, strict: bool = False,
                quiet: bool = False, progress: bool = False, force_share: bool = False, echo: Callable[[str], None] = sys.stdout.write,
                error: Callable[[str], None] = lambda m: sys.stderr.write(m + "\n")) -> int:
    say = (lambda s: None) if quiet else echo
    prog = Progress(progress, 2.0)
    devs: list[BlockDevice] = []
    try:
        for name, fmt in ((file1, fmt1), (file2, fmt2)):
            try:
                devs.append(open_image(name, "r", fmt, force_share=force_share))
            except QcowError as e:
                error(f"Could not open '{name}': {e}")
                return 2
        d1, d2 = devs
        size1, size2 = d1.size, d2.size
        total = min(size1, size2)
        base = max(size1, size2)
        prog.set(0.0)
        if strict and size1 != size2:
            say("Strict mode: Image size mismatch!\n")
            return 1
        w1, w2 = _Walker(d1, file1), _Walker(d2, file2)
        offset = 0
        done = 0

        def step(n: int) -> None:
            nonlocal done
            done += n
            if base:
                prog.set(100.0 * done / base)

        while offset < total:
            e1 = w1.at(offset, total)
            e2 = w2.at(offset, total)
            chunk = min(e1.start + e1.length, e2.start + e2.length) - offset
            if strict and (e1.present, e1.zero, e1.data, e1.offset is not None) != \
                    (e2.present, e2.zero, e2.data, e2.offset is not None):
                say(f"Strict mode: Offset {offset} block status mismatch!\n")
                return 1
            if e1.zero and e2.zero:
                pass
            elif e1.present == e2.present:
                pos = offset
                while pos < offset + chunk:
                    n = min(CHUNK, offset + chunk - pos)
                    b1, b2 = _read(d1, file1, n, pos), _read(d2, file2, n, pos)
                    if b1 != b2:
                        say(f"Content mismatch at offset {pos + _first_diff(b1, b2)}!\n")
                        return 1
                    pos += n
            else:
                dev, name = (d1, file1) if e1.present else (d2, file2)
                if _check_empty(dev, name, offset, chunk, say):
                    return 1
            offset += chunk
            step(chunk)
        if size1 != size2:
            say("Warning: Image size mismatch!\n")
            dev, name = (d1, file1) if size1 > size2 else (d2, file2)
            w = _Walker(dev, name)
            while offset < base:
                e = w.at(offset, base)
                chunk = e.start + e.length - offset
                if e.present and not e.zero:
                    if _check_empty(dev, name, offset, chunk, say):
                        return 1
                offset += chunk
                step(chunk)
        say("Images are identical.\n")
        return 0
    except _ReadFailed as e:
        error(str(e))
        return 4
    except _AllocFailed as e:
        error(str(e))
        return 3
    finally:
        for d in devs:
            d.close()
        prog.end()


class _ReadFailed(Exception):
    """A read error: qemu-img compare reports it and exits 4."""


def _read(dev: BlockDevice, name: str, length: int, offset: int) -> bytes:
    try:
        return dev.pread(length, offset)
    except READ_ERRORS as e:
        raise _ReadFailed(f"Error while reading offset {offset} of {name}: {read_error_reason(e)}") from None
    except QcowError as e:
        raise _ReadFailed(f"Error while reading offset {offset} of {name}: {e}") from None


def _check_empty(dev: BlockDevice, name: str, offset: int, length: int, say) -> bool:
    """True (after reporting it) if the range holds a nonzero byte."""
    pos = offset
    while pos < offset + length:
        n = min(CHUNK, offset + length - pos)
        buf = _read(dev, name, n, pos)
        if not is_zero(memoryview(buf)):
            say(f"Content mismatch at offset {pos + _first_nonzero(buf)}!\n")
            return True
        pos += n
    return False
