from libc.stdint cimport uint8_t, uint64_t

cdef enum:
    MAX_REGIONS = 8

cdef struct MemRegion:
    uint64_t gpa
    uint64_t size
    uint64_t offset
    uint8_t* host

cdef class GuestMemory:
    cdef MemRegion regions[MAX_REGIONS]
    cdef int nregions
    cdef uint64_t total
    cdef int fd
    cdef object _map
    cdef uint8_t[::1] _pin
    cdef uint8_t* base
    cdef uint8_t* translate(self, uint64_t gpa, uint64_t length) noexcept nogil
    cdef uint64_t _offset(self, uint64_t gpa, uint64_t length) except? 0xffffffffffffffff
