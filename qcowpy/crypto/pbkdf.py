"""PBKDF2 iteration counts from a time budget, as QEMU's qcrypto_pbkdf2_count_iters: time
PBKDF2 on this thread's CPU clock until a run takes over half a second, then scale to 1 s.

The rate is measured once per (hash, output length) and process: iteration counts only have
to cost about ``iter_time`` milliseconds, and measuring takes most of a second each time.
"""
from __future__ import annotations

import os
import time

from ..errors import QcowError
from .algorithms import Hash

_RATE: dict[tuple[str, int], int] = {}


def iters_per_second(h: Hash, nout: int) -> int:
    key = (h.name, nout)
    if key not in _RATE:
        iterations = 1 << 15
        salt, password = os.urandom(32), os.urandom(32)
        while True:
            start = time.thread_time()
            h.pbkdf2(password, salt, iterations, nout)
            delta_ms = int((time.thread_time() - start) * 1000)
            if delta_ms == 0:
                raise QcowError("Unable to get accurate CPU usage")
            if delta_ms > 500:
                break
            iterations = iterations * 10 if delta_ms < 100 else iterations * 1000 // delta_ms
        _RATE[key] = iterations * 1000 // delta_ms
    return _RATE[key]


def count_iters(h: Hash, nout: int, iter_time_ms: int, divisor: int = 1, minimum: int = 1000) -> int:
    """Iterations costing ``iter_time_ms`` (divided by ``divisor``), at least ``minimum``;
    QEMU's range errors for counts that do not fit its fields."""
    iters = iters_per_second(h, nout)
    if iter_time_ms and iters > (2**64 - 1) // iter_time_ms:
        raise QcowError(f"PBKDF iterations {iters} too large to scale: Numerical result out of range")
    iters = iters * iter_time_ms // 1000 // divisor
    if iters > 0xFFFFFFFF:
        raise QcowError(f"PBKDF iterations {iters} larger than {0xFFFFFFFF}: Numerical result out of range")
    return max(iters, minimum)
