# cython: language_level=3
"""Guest RAM: one memfd mapped once, cut into guest-physical regions.

memfd-backed so a vhost-user backend in another thread or process can map the same pages.
Every guest-physical access goes through `translate`, which refuses anything not wholly
inside one region: a bad address raises, it never reads host memory.
"""

import mmap as _mmap
import os

from libc.stdint cimport uint8_t, uint64_t
from libc.errno cimport errno
from libc.string cimport memcpy

from hvcore.includes.sys cimport memfd_create, MFD_CLOEXEC


cdef class GuestMemory:
    """Guest RAM laid out as `[(gpa, size), ...]` (sorted, non-overlapping, page-aligned)."""

    def __cinit__(self, regions, name="pyhv-ram"):
        cdef uint64_t offset = 0
        cdef uint64_t prev_end = 0
        cdef int i
        self.fd = -1            # before anything can raise: __dealloc__ closes it
        regions = sorted((int(g), int(s)) for g, s in regions)
        if not 0 < len(regions) <= MAX_REGIONS:
            raise ValueError(f"guest RAM needs 1 to {MAX_REGIONS} regions, got {len(regions)}")
        for i, (gpa, size) in enumerate(regions):
            if size <= 0 or gpa % 4096 or size % 4096:
                raise ValueError(f"RAM region {gpa:#x}+{size:#x} is empty or not page-aligned")
            if gpa < prev_end:
                raise ValueError(f"RAM region at {gpa:#x} overlaps the one before it")
            self.regions[i].gpa = gpa
            self.regions[i].size = size
            self.regions[i].offset = offset
            offset += size
            prev_end = gpa + size
        self.nregions = len(regions)
        self.total = offset
        self.fd = memfd_create(name.encode(), MFD_CLOEXEC)
        if self.fd < 0:
            raise OSError(errno, f"memfd_create failed: {os.strerror(errno)}")
        try:
            os.ftruncate(self.fd, self.total)
            self._map = _mmap.mmap(self.fd, self.total, flags=_mmap.MAP_SHARED,
                                   prot=_mmap.PROT_READ | _mmap.PROT_WRITE)
        except OSError as e:
            os.close(self.fd)
            self.fd = -1
            raise OSError(f"cannot allocate {self.total >> 20} MiB of guest RAM: {e.strerror}")
        self._pin = self._map  # a typed buffer export: the mapping cannot be closed under us
        self.base = &self._pin[0]
        for i in range(self.nregions):
            self.regions[i].host = self.base + self.regions[i].offset

    def __dealloc__(self):
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1

    cdef uint8_t* translate(self, uint64_t gpa, uint64_t length) noexcept nogil:
        cdef int i
        for i in range(self.nregions):
            if gpa >= self.regions[i].gpa and gpa - self.regions[i].gpa < self.regions[i].size:
                if length > self.regions[i].size - (gpa - self.regions[i].gpa):
                    return NULL
                return self.regions[i].host + (gpa - self.regions[i].gpa)
        return NULL

    cdef uint64_t _offset(self, uint64_t gpa, uint64_t length) except? 0xffffffffffffffff:
        cdef uint8_t* p = self.translate(gpa, length)
        if p == NULL:
            raise IndexError(f"guest address {gpa:#x}+{length:#x} is outside guest RAM")
        return <uint64_t>(p - self.base)

    @property
    def size(self) -> int:
        """Total RAM in bytes (the memfd's size)."""
        return self.total

    @property
    def memfd(self) -> int:
        """The memfd backing all RAM, for sharing with vhost-user backends."""
        return self.fd

    @property
    def layout(self):
        """[(gpa, size, host_address, memfd_offset)] per region: what KVM and vhost-user need."""
        return [(self.regions[i].gpa, self.regions[i].size,
                 <uint64_t>self.regions[i].host, self.regions[i].offset)
                for i in range(self.nregions)]

    def view(self, uint64_t gpa, uint64_t length) -> memoryview:
        """A writable memoryview of guest RAM; raises IndexError outside RAM."""
        cdef uint64_t off = self._offset(gpa, length)
        return memoryview(self._map)[off:off + length]

    def read(self, uint64_t gpa, uint64_t length) -> bytes:
        cdef uint64_t off = self._offset(gpa, length)
        return self._map[off:off + length]

    def write(self, uint64_t gpa, data) -> None:
        """Copy a bytes-like object into guest RAM at gpa."""
        cdef const uint8_t[::1] src = memoryview(data).cast("B")
        cdef uint64_t n = src.shape[0]
        if n == 0:
            return
        cdef uint8_t* dst = self.translate(gpa, n)
        if dst == NULL:
            raise IndexError(f"guest address {gpa:#x}+{n:#x} is outside guest RAM")
        with nogil:
            memcpy(dst, &src[0], n)

    def contains(self, uint64_t gpa, uint64_t length=1) -> bool:
        return self.translate(gpa, length) != NULL
