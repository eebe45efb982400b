# cython: language_level=3
"""Out-of-order TCP data of one flow (the receive side of reassembly): a ring buffer
allocated only while something is held, and at most 64 sorted byte intervals. The copies
run with the GIL released; `tests.helpers.net_reassembly_ref` is its pure-Python twin."""

from cpython.bytes cimport PyBytes_FromStringAndSize, PyBytes_AS_STRING
from libc.stdint cimport uint8_t, uint64_t
from libc.stdlib cimport malloc, free
from libc.string cimport memcpy

DEF MAX_INTERVALS = 64


cdef class Reassembly:
    """Out-of-order TCP data of one flow, held in a ring of `capacity` bytes (allocated only
    while something is held) as at most 64 sorted byte intervals. Sequence numbers are
    unwrapped 64-bit values; `base` is the next byte expected in order (rcv_nxt)."""
    cdef uint8_t *ring
    cdef readonly Py_ssize_t capacity
    cdef readonly uint64_t base
    cdef uint64_t starts[MAX_INTERVALS]
    cdef uint64_t ends[MAX_INTERVALS]
    cdef int n

    def __cinit__(self, Py_ssize_t capacity, uint64_t base=0):
        if capacity <= 0:
            raise ValueError("capacity must be positive")
        self.capacity = capacity
        self.base = base
        self.ring = NULL
        self.n = 0

    def __dealloc__(self):
        free(self.ring)

    @property
    def pending(self) -> int:
        """Bytes held (in or out of order)."""
        cdef uint64_t total = 0
        cdef int i
        for i in range(self.n):
            total += self.ends[i] - self.starts[i]
        return total

    @property
    def intervals(self) -> list:
        return [(self.starts[i], self.ends[i]) for i in range(self.n)]

    def set_base(self, uint64_t base) -> None:
        """Move the in-order point (only while nothing is held)."""
        if self.n:
            raise ValueError("cannot move the base while data is held")
        self.base = base

    def add(self, uint64_t seq, data) -> int:
        """Store data at `seq`, clipped to [base, base + capacity); returns the bytes now
        ready in order at `base`, or -1 when the segment was dropped (too many holes)."""
        cdef const uint8_t[::1] b = memoryview(data).cast("B")
        cdef uint64_t s = seq, e = seq + <uint64_t>b.shape[0]
        cdef uint64_t lim = self.base + <uint64_t>self.capacity
        cdef Py_ssize_t skip, pos, first, k
        cdef int i, j, lo, hi
        if s < self.base:
            s = self.base
        if e > lim:
            e = lim
        if e <= s:
            return self._ready()
        # where the new interval goes, and which existing ones it touches
        lo = 0
        while lo < self.n and self.ends[lo] < s:
            lo += 1
        hi = lo
        while hi < self.n and self.starts[hi] <= e:
            hi += 1
        if lo == hi and self.n == MAX_INTERVALS:
            return -1
        if self.ring == NULL:
            self.ring = <uint8_t *>malloc(self.capacity)
            if self.ring == NULL:
                raise MemoryError()
        skip = <Py_ssize_t>(s - seq)
        pos = <Py_ssize_t>(s % <uint64_t>self.capacity)
        k = <Py_ssize_t>(e - s)
        first = min(k, self.capacity - pos)
        with nogil:
            memcpy(self.ring + pos, &b[skip], first)
            if k > first:
                memcpy(self.ring, &b[skip + first], k - first)
        if lo < hi:                            # merge [lo, hi) with the new interval
            if self.starts[lo] < s:
                s = self.starts[lo]
            if self.ends[hi - 1] > e:
                e = self.ends[hi - 1]
            j = lo + 1
            for i in range(hi, self.n):
                self.starts[j] = self.starts[i]
                self.ends[j] = self.ends[i]
                j += 1
            self.n = j
        else:                                  # insert at lo
            i = self.n
            while i > lo:
                self.starts[i] = self.starts[i - 1]
                self.ends[i] = self.ends[i - 1]
                i -= 1
            self.n += 1
        self.starts[lo] = s
        self.ends[lo] = e
        return self._ready()

    cdef Py_ssize_t _ready(self):
        if self.n and self.starts[0] == self.base:
            return <Py_ssize_t>(self.ends[0] - self.base)
        return 0

    def take(self) -> bytes:
        """The bytes ready in order at `base` (possibly empty); `base` moves past them."""
        cdef Py_ssize_t k = self._ready(), pos, first
        cdef bytes out
        cdef char *dst
        cdef int i
        if k == 0:
            return b""
        out = PyBytes_FromStringAndSize(NULL, k)
        dst = PyBytes_AS_STRING(out)
        pos = <Py_ssize_t>(self.base % <uint64_t>self.capacity)
        first = min(k, self.capacity - pos)
        with nogil:
            memcpy(dst, self.ring + pos, first)
            if k > first:
                memcpy(dst + first, self.ring, k - first)
        self.base = self.ends[0]
        for i in range(1, self.n):
            self.starts[i - 1] = self.starts[i]
            self.ends[i - 1] = self.ends[i]
        self.n -= 1
        if self.n == 0:
            free(self.ring)
            self.ring = NULL
        return out
