# cython: language_level=3
"""Guest memory as a device sees it: regions of guest-physical (and, for vhost-user, the
frontend's user) addresses mapped into this process. pyhv's VMM hands its `GuestMemory`;
a vhost-user backend maps the memfds of SET_MEM_TABLE. Every access a device makes to
guest memory goes through `gpa_span`/`gpa_ptr`, which refuse what is not mapped."""

from cpython.buffer cimport PyBUF_WRITABLE, PyBuffer_Release, PyObject_GetBuffer
from libc.stdint cimport uint8_t, uint64_t, uintptr_t

from hvcore.memory cimport GuestMemory


cdef class _Pin:
    """Holds a writable buffer export of a mapping (an mmap cannot close under it)."""
    cdef Py_buffer view
    cdef bint held

    def __cinit__(self, obj):
        PyObject_GetBuffer(obj, &self.view, PyBUF_WRITABLE)
        self.held = True

    def __dealloc__(self):
        if self.held:
            PyBuffer_Release(&self.view)


cdef class MemMap:
    """Regions of guest memory mapped into this process."""

    def __cinit__(self):
        self.n = 0
        self.keep = []

    @staticmethod
    def of_guest(GuestMemory mem not None) -> MemMap:
        """pyhv's own VMM: its RAM, where ring addresses are guest-physical too."""
        cdef MemMap m = MemMap()
        for gpa, size, host, _offset in mem.layout:
            m._add(gpa, size, gpa, <uint8_t *><uintptr_t>host)
        m.keep.append(mem)
        return m

    def add(self, uint64_t gpa, uint64_t size, uint64_t uaddr, mapping) -> None:
        """A region mapped by the caller (`mapping`: a writable buffer of at least `size`
        bytes, e.g. an mmap of the frontend's memfd)."""
        cdef _Pin pin = _Pin(mapping)
        if <uint64_t>pin.view.len < size:
            raise ValueError(f"mapping of {pin.view.len:#x} bytes for a region of {size:#x}")
        self._add(gpa, size, uaddr, <uint8_t *>pin.view.buf)
        self.keep.append(pin)

    cdef _add(self, uint64_t gpa, uint64_t size, uint64_t uaddr, uint8_t *host):
        if self.n == MAX_MEM_REGIONS:
            raise ValueError(f"more than {MAX_MEM_REGIONS} memory regions")
        if size == 0 or gpa + size < gpa or uaddr + size < uaddr:
            raise ValueError(f"memory region {gpa:#x}+{size:#x} is empty or wraps")
        self.r[self.n].gpa, self.r[self.n].size = gpa, size
        self.r[self.n].uaddr, self.r[self.n].host = uaddr, host
        self.n += 1

    cdef uint8_t *gpa_span(self, uint64_t gpa, uint64_t length, uint64_t *got) noexcept nogil:
        """Where `gpa` is mapped, and in `got` how many of `length` bytes follow it there
        (less when the range goes on in another region); NULL when it is not mapped."""
        cdef int i
        cdef uint64_t off
        for i in range(self.n):
            off = gpa - self.r[i].gpa
            if gpa >= self.r[i].gpa and off < self.r[i].size:
                got[0] = min(length, self.r[i].size - off)
                return self.r[i].host + off
        return NULL

    cdef uint8_t *gpa_ptr(self, uint64_t gpa, uint64_t length) noexcept nogil:
        """`length` bytes at `gpa` all in one region, or NULL."""
        cdef uint64_t got = 0
        cdef uint8_t *p = self.gpa_span(gpa, length, &got)
        return p if p != NULL and got == length else NULL

    def uva_to_gpa(self, uint64_t uaddr, uint64_t length) -> int:
        """A frontend user address range (vhost-user's ring addresses) as guest-physical;
        ValueError when no one region holds it."""
        cdef int i
        for i in range(self.n):
            if uaddr >= self.r[i].uaddr and uaddr - self.r[i].uaddr < self.r[i].size and \
                    length <= self.r[i].size - (uaddr - self.r[i].uaddr):
                return self.r[i].gpa + (uaddr - self.r[i].uaddr)
        raise ValueError(f"user address {uaddr:#x}+{length:#x} is in no memory region")

    def contains(self, uint64_t gpa, uint64_t length) -> bool:
        return self.gpa_ptr(gpa, length) != NULL

    @property
    def regions(self) -> list:
        """[(gpa, size, uaddr)]"""
        return [(self.r[i].gpa, self.r[i].size, self.r[i].uaddr) for i in range(self.n)]
