# cython: language_level=3, boundscheck=False, wraparound=False
"""Cython kernels: pure functions over buffers. No I/O, no policy."""

from libc.string cimport memcmp


cdef bint _is_zero(const unsigned char *p, Py_ssize_t n) noexcept nogil:
    cdef Py_ssize_t i
    for i in range(min(n, 16)):
        if p[i]:
            return False
    if n <= 16:
        return True
    return memcmp(p, p + 16, n - 16) == 0


def is_zero(const unsigned char[::1] buf not None) -> bool:
    """True if every byte of ``buf`` is zero (memcmp of the buffer against itself shifted by 16)."""
    cdef bint r
    if buf.shape[0] == 0:
        return True
    with nogil:
        r = _is_zero(&buf[0], buf.shape[0])
    return r
