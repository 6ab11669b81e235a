# cython: language_level=3, boundscheck=False, wraparound=False
"""Cython kernels: pure functions over buffers. No I/O, no policy.

Each kernel has a pure-Python reference with the same results in ``qcowpy/kernels.py``
(tests/bench/test_kernels.py checks they agree); docs/performance.md records what each bought.
"""

from libc.stdint cimport uint64_t
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


def zero_runs(const unsigned char[::1] buf not None, unsigned long long offset, Py_ssize_t block):
    """Split ``buf`` (which starts at byte ``offset`` of its image) into maximal alternating runs
    of all-zero and not-all-zero ``block``-sized pieces, pieces aligned to multiples of ``block``
    in image offsets (the first and last may be short).

    Returns a list of ``(start, end, zero)`` with positions inside ``buf``; the runs cover the
    buffer exactly, in order, and neighbours differ in ``zero``. This is qemu-img convert's
    ``-S`` (min_sparse) detection done in one call per chunk instead of one per block.
    """
    cdef Py_ssize_t n = buf.shape[0]
    cdef Py_ssize_t pos = 0, step, run_start = 0
    cdef int z, cur = -1
    cdef list out = []
    if block <= 0:
        raise ValueError("block must be positive")
    if n == 0:
        return out
    cdef const unsigned char *p = &buf[0]
    while pos < n:
        step = block - <Py_ssize_t>((offset + <unsigned long long>pos) % <unsigned long long>block)
        if step > n - pos:
            step = n - pos
        with nogil:
            z = _is_zero(p + pos, step)
        if cur == -1:
            cur = z
        elif z != cur:
            out.append((run_start, pos, bool(cur)))
            run_start = pos
            cur = z
        pos += step
    out.append((run_start, n, bool(cur)))
    return out


# Standard (non-extended) L2 entry bits; values mirror qcowpy.format.constants.
cdef uint64_t OFLAG_COMPRESSED = 1ULL << 62
cdef uint64_t OFLAG_ZERO = 1ULL
cdef uint64_t L2E_OFFSET_MASK = 0x00FFFFFFFFFFFE00ULL
cdef uint64_t L2E_STD_RESERVED_MASK = 0x3F000000000001FEULL

# Run types: qcowpy.format.entries.ClusterType values, plus two error markers.
cdef enum:
    T_UNALLOCATED = 0
    T_ZERO_PLAIN = 1
    T_ZERO_ALLOC = 2
    T_NORMAL = 3
    T_COMPRESSED = 4
    T_BAD_RESERVED = -1
    T_BAD_ALIGN = -2


cdef inline int _l2_type(uint64_t e, uint64_t cmask) noexcept nogil:
    if e & OFLAG_COMPRESSED:
        return T_COMPRESSED
    if e & L2E_STD_RESERVED_MASK:
        return T_BAD_RESERVED
    if e & OFLAG_ZERO:
        return T_ZERO_ALLOC if e & L2E_OFFSET_MASK else T_ZERO_PLAIN
    if e & L2E_OFFSET_MASK:
        return T_BAD_ALIGN if e & L2E_OFFSET_MASK & cmask else T_NORMAL
    return T_UNALLOCATED


def l2_runs(list table not None, Py_ssize_t start, Py_ssize_t stop, int cluster_bits, Py_ssize_t max_runs=-1):
    """Scan standard L2 entries ``table[start:stop]`` into runs ``(type, first, count, host)``.

    ``type`` is a ClusterType value (0 unallocated, 1 zero, 2 zero with a preallocated host
    cluster, 3 normal, 4 compressed). A run extends while the type stays the same and, for
    types 2 and 3, the host offset advances by one cluster per entry; ``host`` is the first
    entry's host offset (0 for types 0, 1, 4). At most ``max_runs`` runs are returned when it is
    non-negative (the last one complete); the scan resumes at ``first + count`` of the last run.

    A bad entry ends the list with ``(-1, index, 1, entry)`` (reserved bits set) or
    ``(-2, index, 1, entry)`` (normal cluster offset not cluster aligned); the caller raises.

    It takes the engine's decoded table (a list of ints, what the L2 cache holds) directly:
    converting a list to a buffer first costs more than this scan.
    """
    cdef list out = []
    cdef Py_ssize_t i, first
    cdef uint64_t e, host, next_host, cs = 1ULL << cluster_bits
    cdef uint64_t cmask = cs - 1
    cdef int t, cur
    if start < 0 or stop > len(table) or start > stop:
        raise IndexError("l2_runs: range outside the table")
    i = start
    while i < stop:
        if max_runs >= 0 and len(out) >= max_runs:
            break
        e = table[i]
        t = _l2_type(e, cmask)
        if t < 0:
            out.append((t, i, 1, e))
            break
        first = i
        host = e & L2E_OFFSET_MASK if (t == T_NORMAL or t == T_ZERO_ALLOC) else 0
        next_host = host + cs
        i += 1
        if t == T_NORMAL or t == T_ZERO_ALLOC:
            while i < stop:
                e = table[i]
                if _l2_type(e, cmask) != t or (e & L2E_OFFSET_MASK) != next_host:
                    break
                next_host += cs
                i += 1
        else:
            while i < stop:
                e = table[i]
                if _l2_type(e, cmask) != t:
                    break
                i += 1
        out.append((t, first, i - first, host))
    return out


def find_offset_in(list table not None, uint64_t mask, uint64_t lo, uint64_t hi) -> int:
    """Index of the first entry whose offset ``entry & mask`` is nonzero and in ``[lo, hi)``, or -1.

    The metadata overlap check asks this of the L1 table (is an L2 table in the range?) and of
    the refcount table (a refcount block?) before every write; a refcount table is thousands of
    mostly-zero entries. Takes the engine's decoded tables (lists of ints) directly.
    """
    cdef Py_ssize_t i, n = len(table)
    cdef uint64_t o
    for i in range(n):
        o = <uint64_t>table[i] & mask
        if o and lo <= o < hi:
            return i
    return -1


# ------------------------------------------------------------------------ split virtqueue chains

cdef enum:
    VRING_DESC_F_NEXT = 1
    VRING_DESC_F_WRITE = 2
    VRING_DESC_F_INDIRECT = 4


cdef object _chain(const unsigned char *table, Py_ssize_t head, Py_ssize_t limit,
                   object ram, uint64_t win_start, uint64_t win_end):
    """vring_chain's walk over a table of ``limit`` entries already checked to be that long."""
    cdef Py_ssize_t i = head, count = 0
    cdef uint64_t addr
    cdef unsigned int length, flags, nxt
    cdef const unsigned char *d
    cdef uint64_t out_len = 0, in_len = 0
    cdef list out_sg = [], in_sg = [], out_iov = [], in_iov = []
    if i < 0 or i >= limit:
        return None
    while True:
        count += 1
        if count > limit:
            return None
        d = table + 16 * i
        addr = (<uint64_t>d[0] | <uint64_t>d[1] << 8 | <uint64_t>d[2] << 16 | <uint64_t>d[3] << 24
                | <uint64_t>d[4] << 32 | <uint64_t>d[5] << 40 | <uint64_t>d[6] << 48 | <uint64_t>d[7] << 56)
        length = d[8] | d[9] << 8 | d[10] << 16 | <unsigned int>d[11] << 24
        flags = d[12] | d[13] << 8
        nxt = d[14] | d[15] << 8
        if flags & VRING_DESC_F_INDIRECT:
            return None
        if length and (addr < win_start or addr > win_end or length > win_end - addr):
            return None
        if flags & VRING_DESC_F_WRITE:
            in_sg.append((addr, length))
            if length:
                in_iov.append(ram[addr - win_start:addr - win_start + length])
                in_len += length
        else:
            if in_sg:
                return None
            out_sg.append((addr, length))
            if length:
                out_iov.append(ram[addr - win_start:addr - win_start + length])
                out_len += length
        if not flags & VRING_DESC_F_NEXT:
            return out_sg, in_sg, out_iov, in_iov, out_len, in_len
        if nxt >= limit:
            return None
        i = nxt


def vring_chain(const unsigned char[::1] table not None, Py_ssize_t head, Py_ssize_t limit,
                object ram, uint64_t win_start, uint64_t win_end):
    """Follow the descriptor chain from ``head`` in ``table`` (``limit`` entries, little-endian
    ``addr u64, len u32, flags u16, next u16``) when every buffer lies in the RAM window
    ``[win_start, win_end)`` whose bytes are ``ram``.

    Returns ``(out_sg, in_sg, out_iov, in_iov, out_len, in_len)`` — (addr, len) pairs and ``ram``
    slices, zero-length buffers in the sg lists only — or None when the chain needs the general
    walker: an indirect descriptor, a buffer outside the window, or any broken rule (loop, next
    out of range, device-readable after device-writable), which the walker then reports.
    """
    if limit * 16 > table.shape[0] or limit <= 0:
        return None
    return _chain(&table[0], head, limit, ram, win_start, win_end)


def vring_chains(const unsigned char[::1] table not None, const unsigned char[::1] avail not None,
                 Py_ssize_t limit, Py_ssize_t first, Py_ssize_t count,
                 object ram, uint64_t win_start, uint64_t win_end):
    """The next ``count`` available chains in one call: heads from the driver ring ``avail``
    (``flags u16, idx u16, ring[limit] u16``) starting at ring position ``first`` (mod ``limit``),
    each walked as :func:`vring_chain` does.

    Returns ``[(head, out_sg, in_sg, out_iov, in_iov, out_len, in_len), ...]`` for the leading
    chains that walk does; it stops at the first one it cannot (a head out of range too), which
    the caller then pops on its own, so errors are reported in ring order.
    """
    cdef Py_ssize_t k, slot, head
    cdef list out = []
    if limit <= 0 or limit * 16 > table.shape[0] or 4 + 2 * limit > avail.shape[0]:
        return out
    for k in range(count):
        slot = 4 + 2 * ((first + k) % limit)
        head = avail[slot] | avail[slot + 1] << 8
        got = _chain(&table[0], head, limit, ram, win_start, win_end)
        if got is None:
            break
        out.append((head,) + got)
    return out
